// Synthetic H&E-like test images: a pink background with mild texture and dark purple elliptical
// "nuclei" at known centres, so tests can prompt at known positions.
import { encodeRgbPng } from '@cfrsam/nuclei';
import { prng as rng } from '@cfrsam/testing';

export interface Blob {
  x: number;
  y: number;
  /** Semi-axes in pixels. */
  rx: number;
  ry: number;
}

export function syntheticRgb(width: number, height: number, blobs: readonly Blob[], seed = 1): Uint8Array {
  const rand = rng(seed);
  const data = new Uint8Array(width * height * 3);
  for (let i = 0; i < width * height; i++) {
    const n = (rand() - 0.5) * 16;
    data[i * 3] = 236 + n;
    data[i * 3 + 1] = 190 + n;
    data[i * 3 + 2] = 214 + n;
  }
  for (const b of blobs) {
    const x0 = Math.max(0, Math.floor(b.x - b.rx - 2));
    const x1 = Math.min(width, Math.ceil(b.x + b.rx + 2));
    const y0 = Math.max(0, Math.floor(b.y - b.ry - 2));
    const y1 = Math.min(height, Math.ceil(b.y + b.ry + 2));
    for (let y = y0; y < y1; y++) {
      for (let x = x0; x < x1; x++) {
        const d = Math.sqrt(((x + 0.5 - b.x) / b.rx) ** 2 + ((y + 0.5 - b.y) / b.ry) ** 2);
        // Dark inside, a one-pixel soft edge.
        const w = Math.max(0, Math.min(1, (1.08 - d) / 0.16));
        if (w <= 0) continue;
        const i = (y * width + x) * 3;
        const n = (rand() - 0.5) * 20;
        data[i] = data[i] * (1 - w) + (72 + n) * w;
        data[i + 1] = data[i + 1] * (1 - w) + (38 + n) * w;
        data[i + 2] = data[i + 2] * (1 - w) + (118 + n) * w;
      }
    }
  }
  return data;
}

export async function syntheticPng(width: number, height: number, blobs: readonly Blob[], seed = 1): Promise<Buffer> {
  return encodeRgbPng({ width, height, data: syntheticRgb(width, height, blobs, seed) });
}

/** Blobs on a grid of centres (xs x ys), radius alternating a little. */
export function blobGrid(xs: readonly number[], ys: readonly number[]): Blob[] {
  const out: Blob[] = [];
  ys.forEach((y, j) => xs.forEach((x, i) => out.push({ x, y, rx: 8 + ((i + j) % 3), ry: 7 + ((i * 2 + j) % 3) })));
  return out;
}
