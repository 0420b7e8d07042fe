// Bit packing of binary masks as the DecodedMask message carries them: row-major over the mask's
// box, 8 pixels per byte, most significant bit first, rows not padded to whole bytes.

/** Packs a 0/1 (or 0/nonzero) mask of width*height pixels. */
export function packBits(mask: Uint8Array, width: number, height: number): Uint8Array {
  const n = width * height;
  if (mask.length < n) throw new Error(`packBits: mask has ${mask.length} pixels, ${width}x${height} needs ${n}`);
  const out = new Uint8Array((n + 7) >> 3);
  for (let i = 0; i < n; i++) if (mask[i]) out[i >> 3] |= 0x80 >> (i & 7);
  return out;
}

/** Unpacks `bits` into a 0/1 mask of width*height pixels. */
export function unpackBits(bits: Uint8Array, width: number, height: number): Uint8Array {
  const n = width * height;
  if (bits.length < (n + 7) >> 3) {
    throw new Error(`unpackBits: ${bits.length} bytes cannot hold ${width}x${height} = ${n} bits`);
  }
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = (bits[i >> 3] >> (7 - (i & 7))) & 1;
  return out;
}

/** A mask placed in a frame: the box of its foreground and a 0/1 mask over that box. */
export interface BoxedMask {
  x0: number;
  y0: number;
  width: number;
  height: number;
  /** width*height pixels, 0/1, row-major. */
  mask: Uint8Array;
}

/**
 * Thresholds `values` (a rows x cols grid placed at (originX, originY) in a frame of
 * frameWidth x frameHeight) at `value > threshold`, and crops to the foreground's bounding box,
 * clipped to the frame. An empty result has width = height = 0.
 */
export function thresholdAndCrop(
  values: Float32Array,
  rows: number,
  cols: number,
  originX: number,
  originY: number,
  frameWidth: number,
  frameHeight: number,
  threshold: number,
): BoxedMask {
  const rStart = Math.max(0, -originY);
  const rEnd = Math.min(rows, frameHeight - originY);
  const cStart = Math.max(0, -originX);
  const cEnd = Math.min(cols, frameWidth - originX);
  let minR = Infinity;
  let maxR = -1;
  let minC = Infinity;
  let maxC = -1;
  for (let r = rStart; r < rEnd; r++) {
    const row = r * cols;
    for (let c = cStart; c < cEnd; c++) {
      if (values[row + c] > threshold) {
        if (r < minR) minR = r;
        if (r > maxR) maxR = r;
        if (c < minC) minC = c;
        if (c > maxC) maxC = c;
      }
    }
  }
  if (maxR < 0) return { x0: 0, y0: 0, width: 0, height: 0, mask: new Uint8Array(0) };
  const width = maxC - minC + 1;
  const height = maxR - minR + 1;
  const mask = new Uint8Array(width * height);
  for (let r = 0; r < height; r++) {
    const src = (minR + r) * cols + minC;
    for (let c = 0; c < width; c++) mask[r * width + c] = values[src + c] > threshold ? 1 : 0;
  }
  return { x0: originX + minC, y0: originY + minR, width, height, mask };
}
