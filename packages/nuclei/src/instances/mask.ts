// Binary instance masks placed in a larger frame (a tile or the whole image): unpacking the
// decoder's bit-packed masks, moving them into image coordinates, clipping, connected components.
import type { Rect } from '../imaging/tiling';
import { packBits, unpackBits } from '@cfrsam/contract';

/**
 * A binary mask covering the box [x0, x0 + width) x [y0, y0 + height) of some frame, one byte per
 * pixel (0 or 1), row-major. An empty mask has width = height = 0.
 */
export interface PlacedMask {
  x0: number;
  y0: number;
  width: number;
  height: number;
  data: Uint8Array;
}

/** The decoder's wire form: the bbox and its bits, row-major, 8 per byte, most significant first. */
export interface PackedMask {
  x0: number;
  y0: number;
  width: number;
  height: number;
  bits: Uint8Array;
}

export const EMPTY_MASK: PlacedMask = Object.freeze({ x0: 0, y0: 0, width: 0, height: 0, data: new Uint8Array(0) }) as PlacedMask;

export function unpackMask(packed: PackedMask): PlacedMask {
  const { x0, y0, width, height, bits } = packed;
  if (width <= 0 || height <= 0) return EMPTY_MASK;
  return { x0, y0, width, height, data: unpackBits(bits, width, height) };
}

export function packMask(mask: PlacedMask): PackedMask {
  return { x0: mask.x0, y0: mask.y0, width: mask.width, height: mask.height, bits: packBits(mask.data, mask.width, mask.height) };
}

export function maskArea(mask: PlacedMask): number {
  let a = 0;
  for (let i = 0; i < mask.data.length; i++) a += mask.data[i];
  return a;
}

export function maskGet(mask: PlacedMask, x: number, y: number): number {
  const lx = x - mask.x0;
  const ly = y - mask.y0;
  if (lx < 0 || ly < 0 || lx >= mask.width || ly >= mask.height) return 0;
  return mask.data[ly * mask.width + lx];
}

export function translateMask(mask: PlacedMask, dx: number, dy: number): PlacedMask {
  return { ...mask, x0: mask.x0 + dx, y0: mask.y0 + dy };
}

/** Shrinks the mask to the bounding box of its foreground (EMPTY_MASK when there is none). */
export function cropToForeground(mask: PlacedMask): PlacedMask {
  const { width: w, height: h, data } = mask;
  let minX = w;
  let minY = h;
  let maxX = -1;
  let maxY = -1;
  for (let y = 0; y < h; y++) {
    const row = y * w;
    for (let x = 0; x < w; x++) {
      if (data[row + x]) {
        if (x < minX) minX = x;
        if (x > maxX) maxX = x;
        if (y < minY) minY = y;
        maxY = y;
      }
    }
  }
  if (maxX < 0) return EMPTY_MASK;
  if (minX === 0 && minY === 0 && maxX === w - 1 && maxY === h - 1) return mask;
  const nw = maxX - minX + 1;
  const nh = maxY - minY + 1;
  const out = new Uint8Array(nw * nh);
  for (let y = 0; y < nh; y++) {
    const src = (y + minY) * w + minX;
    out.set(data.subarray(src, src + nw), y * nw);
  }
  return { x0: mask.x0 + minX, y0: mask.y0 + minY, width: nw, height: nh, data: out };
}

/** The part of the mask inside rect, cropped to its foreground. */
export function clipMask(mask: PlacedMask, rect: Rect): PlacedMask {
  const x0 = Math.max(mask.x0, rect.x0);
  const y0 = Math.max(mask.y0, rect.y0);
  const x1 = Math.min(mask.x0 + mask.width, rect.x1);
  const y1 = Math.min(mask.y0 + mask.height, rect.y1);
  if (x1 <= x0 || y1 <= y0) return EMPTY_MASK;
  if (x0 === mask.x0 && y0 === mask.y0 && x1 === mask.x0 + mask.width && y1 === mask.y0 + mask.height) {
    return cropToForeground(mask);
  }
  const w = x1 - x0;
  const h = y1 - y0;
  const out = new Uint8Array(w * h);
  for (let y = 0; y < h; y++) {
    const src = (y + y0 - mask.y0) * mask.width + (x0 - mask.x0);
    out.set(mask.data.subarray(src, src + w), y * w);
  }
  return cropToForeground({ x0, y0, width: w, height: h, data: out });
}

/**
 * 4-connected components of the foreground: a label per pixel (0 = background, 1..count) and the
 * size of each component (sizes[0] unused).
 */
export function connectedComponents(mask: PlacedMask): { labels: Int32Array; count: number; sizes: number[] } {
  const { width: w, height: h, data } = mask;
  const labels = new Int32Array(w * h);
  const sizes = [0];
  const stack = new Int32Array(w * h);
  let count = 0;
  for (let start = 0; start < w * h; start++) {
    if (!data[start] || labels[start]) continue;
    count++;
    let size = 0;
    let top = 0;
    stack[top++] = start;
    labels[start] = count;
    while (top > 0) {
      const p = stack[--top];
      size++;
      const x = p % w;
      if (x > 0 && data[p - 1] && !labels[p - 1]) {
        labels[p - 1] = count;
        stack[top++] = p - 1;
      }
      if (x < w - 1 && data[p + 1] && !labels[p + 1]) {
        labels[p + 1] = count;
        stack[top++] = p + 1;
      }
      if (p >= w && data[p - w] && !labels[p - w]) {
        labels[p - w] = count;
        stack[top++] = p - w;
      }
      if (p + w < w * h && data[p + w] && !labels[p + w]) {
        labels[p + w] = count;
        stack[top++] = p + w;
      }
    }
    sizes.push(size);
  }
  return { labels, count, sizes };
}

/**
 * Keeps one 4-connected component: the one holding the point (x, y) (frame coordinates, continuous)
 * if the point is on the foreground, otherwise the largest (ties: the first in raster order).
 */
export function keepComponent(mask: PlacedMask, point?: { x: number; y: number }): PlacedMask {
  if (mask.width === 0) return mask;
  const { labels, count, sizes } = connectedComponents(mask);
  if (count <= 1) return count === 0 ? EMPTY_MASK : mask;
  let keep = 0;
  if (point) {
    const px = Math.floor(point.x) - mask.x0;
    const py = Math.floor(point.y) - mask.y0;
    if (px >= 0 && py >= 0 && px < mask.width && py < mask.height) keep = labels[py * mask.width + px];
  }
  if (keep === 0) {
    let best = 0;
    for (let i = 1; i <= count; i++)
      if (sizes[i] > best) {
        best = sizes[i];
        keep = i;
      }
  }
  const out = new Uint8Array(mask.data.length);
  for (let i = 0; i < out.length; i++) out[i] = labels[i] === keep ? 1 : 0;
  return cropToForeground({ ...mask, data: out });
}

/** Fills background regions that do not touch the mask's box edge (holes). */
export function fillHoles(mask: PlacedMask): PlacedMask {
  const { width: w, height: h, data } = mask;
  if (w === 0) return mask;
  // Flood the background from the box border; whatever background is not reached is a hole.
  const outside = new Uint8Array(w * h);
  const stack = new Int32Array(w * h);
  let top = 0;
  const seed = (p: number) => {
    if (!data[p] && !outside[p]) {
      outside[p] = 1;
      stack[top++] = p;
    }
  };
  for (let x = 0; x < w; x++) {
    seed(x);
    seed((h - 1) * w + x);
  }
  for (let y = 0; y < h; y++) {
    seed(y * w);
    seed(y * w + w - 1);
  }
  while (top > 0) {
    const p = stack[--top];
    const x = p % w;
    if (x > 0) seed(p - 1);
    if (x < w - 1) seed(p + 1);
    if (p >= w) seed(p - w);
    if (p + w < w * h) seed(p + w);
  }
  let holes = false;
  for (let i = 0; i < data.length; i++)
    if (!data[i] && !outside[i]) {
      holes = true;
      break;
    }
  if (!holes) return mask;
  const out = new Uint8Array(w * h);
  for (let i = 0; i < out.length; i++) out[i] = outside[i] ? 0 : 1;
  return { ...mask, data: out };
}

/** Iterates over foreground pixels in frame coordinates. */
export function forEachPixel(mask: PlacedMask, fn: (x: number, y: number) => void): void {
  const { x0, y0, width: w, height: h, data } = mask;
  for (let y = 0; y < h; y++) {
    const row = y * w;
    for (let x = 0; x < w; x++) if (data[row + x]) fn(x0 + x, y0 + y);
  }
}

/**
 * Maps a mask from a frame scaled by (sx, sy) relative to the target frame (source pixel =
 * target pixel x scale) into the target frame: each target pixel takes the source pixel under its
 * centre (nearest neighbour), then the result is cropped to its foreground. Used to bring masks
 * found at the model's resolution back to the image's own pixels.
 */
export function rescaleMask(mask: PlacedMask, sx: number, sy: number, frameWidth: number, frameHeight: number): PlacedMask {
  if (mask.width === 0 || mask.height === 0) return EMPTY_MASK;
  if (sx === 1 && sy === 1) return mask;
  const x0 = Math.max(0, Math.floor(mask.x0 / sx));
  const y0 = Math.max(0, Math.floor(mask.y0 / sy));
  const x1 = Math.min(frameWidth, Math.ceil((mask.x0 + mask.width) / sx));
  const y1 = Math.min(frameHeight, Math.ceil((mask.y0 + mask.height) / sy));
  const width = Math.max(0, x1 - x0);
  const height = Math.max(0, y1 - y0);
  if (width === 0 || height === 0) return EMPTY_MASK;
  const data = new Uint8Array(width * height);
  for (let r = 0; r < height; r++) {
    const sy0 = Math.floor((y0 + r + 0.5) * sy);
    for (let c = 0; c < width; c++) data[r * width + c] = maskGet(mask, Math.floor((x0 + c + 0.5) * sx), sy0);
  }
  return cropToForeground({ x0, y0, width, height, data });
}

/**
 * Removes "pinches": two foreground pixels meeting only at a corner, with background on both
 * other sides of it (a 2x2 block [1 0; 0 1] or [0 1; 1 0]). The crack-following outline of such a
 * mask passes that corner twice, a ring that touches itself (invalid geometry for QuPath's and
 * JTS's union operations). Of each pair the pixel with fewer 4-neighbours goes; repeated until none
 * is left (a removal can expose another). Connectivity is not restored here (see keepComponent).
 */
export function removePinches(mask: PlacedMask): PlacedMask {
  const { width: w, height: h } = mask;
  if (w < 2 || h < 2) return mask;
  let data: Uint8Array | undefined;
  const get = (x: number, y: number) => x >= 0 && y >= 0 && x < w && y < h && (data ?? mask.data)[y * w + x] === 1;
  const neighbours = (x: number, y: number) => +get(x - 1, y) + +get(x + 1, y) + +get(x, y - 1) + +get(x, y + 1);
  for (let pass = 0; pass < w * h; pass++) {
    let changed = false;
    for (let y = 0; y + 1 < h; y++) {
      for (let x = 0; x + 1 < w; x++) {
        const a = get(x, y);
        const b = get(x + 1, y);
        const c = get(x, y + 1);
        const d = get(x + 1, y + 1);
        let pair: [number, number, number, number] | undefined;
        if (a && d && !b && !c) pair = [x, y, x + 1, y + 1];
        else if (b && c && !a && !d) pair = [x + 1, y, x, y + 1];
        if (!pair) continue;
        data ??= mask.data.slice();
        const [x1, y1, x2, y2] = pair;
        if (neighbours(x1, y1) <= neighbours(x2, y2)) data[y1 * w + x1] = 0;
        else data[y2 * w + x2] = 0;
        changed = true;
      }
    }
    if (!changed) break;
  }
  return data ? { ...mask, data } : mask;
}
