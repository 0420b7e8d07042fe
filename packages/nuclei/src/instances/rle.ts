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

/**
 * COCO run-length encoding (pycocotools) of a mask placed in an image of `imageWidth` x
 * `imageHeight`: runs over the whole image in column-major order (x outer, y inner), starting with
 * a run of zeros. pycocotools reads `{size: [height, width], counts}` (see cocoCountsString).
 */
export function encodeCocoRle(mask: PlacedMask, imageWidth: number, imageHeight: number): number[] {
  const total = imageWidth * imageHeight;
  const counts: number[] = [];
  let pos = 0; // column-major index where the current zero run started
  let oneStart = -1;
  let oneEnd = -1;
  const flush = () => {
    if (oneStart < 0) return;
    counts.push(oneStart - pos, oneEnd - oneStart);
    pos = oneEnd;
    oneStart = -1;
  };
  for (let mx = 0; mx < mask.width; mx++) {
    const x = mask.x0 + mx;
    if (x < 0 || x >= imageWidth) continue;
    for (let my = 0; my < mask.height; my++) {
      const y = mask.y0 + my;
      if (y < 0 || y >= imageHeight || !mask.data[my * mask.width + mx]) continue;
      const i = x * imageHeight + y;
      if (oneStart >= 0 && i === oneEnd) {
        oneEnd++;
      } else {
        flush();
        oneStart = i;
        oneEnd = i + 1;
      }
    }
  }
  flush();
  counts.push(total - pos);
  // A trailing empty zero run is dropped, as pycocotools does (except for an empty mask).
  if (counts.length > 1 && counts[counts.length - 1] === 0) counts.pop();
  return counts;
}

/** pycocotools' compressed counts string (rleToString): LEB128-like, 5 bits a char, deltas from i-2. */
export function cocoCountsString(counts: readonly number[]): string {
  let s = '';
  for (let i = 0; i < counts.length; i++) {
    let x = counts[i];
    if (i > 2) x -= counts[i - 2];
    let more = true;
    while (more) {
      let c = x & 0x1f;
      x >>= 5;
      more = c & 0x10 ? x !== -1 : x !== 0;
      if (more) c |= 0x20;
      s += String.fromCharCode(c + 48);
    }
  }
  return s;
}

/** Inverse of cocoCountsString (pycocotools' rleFrString). */
export function cocoCountsFromString(s: string): number[] {
  const counts: number[] = [];
  let p = 0;
  while (p < s.length) {
    let x = 0;
    let k = 0;
    let more = true;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = (c & 0x20) !== 0;
      p++;
      k++;
      if (!more && c & 0x10) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

/** A COCO RLE decoded to a row-major image mask (1 inside). */
export function decodeCocoRle(counts: readonly number[], imageWidth: number, imageHeight: number): Uint8Array {
  const out = new Uint8Array(imageWidth * imageHeight);
  let pos = 0;
  let value = 0;
  for (const c of counts) {
    if (pos + c > out.length) throw new RangeError(`COCO RLE runs exceed ${imageWidth}x${imageHeight}`);
    if (value) {
      for (let i = pos; i < pos + c; i++) out[(i % imageHeight) * imageWidth + Math.floor(i / imageHeight)] = 1;
    }
    pos += c;
    value ^= 1;
  }
  return out;
}
