// Run-length encoding of a mask inside its bounding box (segmentation.proto RleMask): row-major,
// alternating runs starting with a run of zeros (which may be empty).
import type { PlacedMask } from './mask';

export interface Rle {
  width: number;
  height: number;
  counts: number[];
}

export function encodeRle(mask: PlacedMask): Rle {
  const counts: number[] = [];
  let current = 0;
  let run = 0;
  for (let i = 0; i < mask.data.length; i++) {
    const v = mask.data[i] ? 1 : 0;
    if (v === current) {
      run++;
    } else {
      counts.push(run);
      current = v;
      run = 1;
    }
  }
  counts.push(run);
  return { width: mask.width, height: mask.height, counts };
}

/** Inverse of encodeRle; throws when the runs do not add up to width * height. */
export function decodeRle(rle: Rle): Uint8Array {
  const n = rle.width * rle.height;
  const out = new Uint8Array(n);
  let pos = 0;
  let value = 0;
  for (const c of rle.counts) {
    if (pos + c > n) throw new RangeError(`RLE runs exceed ${rle.width}x${rle.height}`);
    if (value) out.fill(1, pos, pos + c);
    pos += c;
    value ^= 1;
  }
  if (pos !== n) throw new RangeError(`RLE runs cover ${pos} of ${n} pixels`);
  return out;
}
