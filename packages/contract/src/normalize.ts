// Model-input normalisation: interleaved 8-bit RGB -> planar float32 (rgb - mean) / std, the layout
// every graph of the bundle takes ([3, S, S] per tile, NCHW when batched).

export interface Normalization {
  mean: readonly number[];
  std: readonly number[];
}

/** Interleaved RGB bytes (width * height * 3) -> planar float32 [3, height, width]. */
export function normalizeRgb(rgb: Uint8Array, width: number, height: number, norm: Normalization): Float32Array {
  const n = width * height;
  if (rgb.length !== n * 3) throw new RangeError(`expected ${n * 3} RGB bytes, got ${rgb.length}`);
  if (norm.mean.length !== 3 || norm.std.length !== 3) throw new RangeError('normalisation needs 3 means and 3 stds');
  const out = new Float32Array(n * 3);
  for (let c = 0; c < 3; c++) {
    // A lookup table per channel: 256 values, then one array read per pixel.
    const lut = new Float32Array(256);
    for (let v = 0; v < 256; v++) lut[v] = (v - norm.mean[c]) / norm.std[c];
    const plane = c * n;
    for (let i = 0, j = c; i < n; i++, j += 3) out[plane + i] = lut[rgb[j]];
  }
  return out;
}

/** Inverse of normalizeRgb (rounded and clamped to 0..255): planar float32 -> interleaved RGB. */
export function denormalizeToRgb(planar: Float32Array, width: number, height: number, norm: Normalization): Uint8Array {
  const n = width * height;
  if (planar.length !== n * 3) throw new RangeError(`expected ${n * 3} values, got ${planar.length}`);
  const out = new Uint8Array(n * 3);
  for (let c = 0; c < 3; c++) {
    const plane = c * n;
    for (let i = 0; i < n; i++) {
      const v = Math.round(planar[plane + i] * norm.std[c] + norm.mean[c]);
      out[i * 3 + c] = v < 0 ? 0 : v > 255 ? 255 : v;
    }
  }
  return out;
}
