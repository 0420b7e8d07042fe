// Instance label maps: 0 = background, i = the instance with id i, one uint16 per pixel.
import { forEachPixel, type PlacedMask } from './mask';

/** The largest id a 16-bit label map can hold. */
export const MAX_LABEL = 65535;

/** Paints masks[i] with label i + 1. Throws when there are more masks than 16 bits can label. */
export function buildLabelMap(width: number, height: number, masks: readonly PlacedMask[]): Uint16Array {
  if (masks.length > MAX_LABEL) {
    throw new RangeError(`${masks.length} instances do not fit a 16-bit label map (at most ${MAX_LABEL})`);
  }
  const out = new Uint16Array(width * height);
  masks.forEach((mask, i) => {
    const label = i + 1;
    forEachPixel(mask, (x, y) => {
      if (x >= 0 && y >= 0 && x < width && y < height) out[y * width + x] = label;
    });
  });
  return out;
}

/** The wire form of LabelMap.data: little-endian uint16, row-major. */
export function labelMapToBytes(labels: Uint16Array): Buffer {
  const out = Buffer.alloc(labels.length * 2);
  for (let i = 0; i < labels.length; i++) out.writeUInt16LE(labels[i], i * 2);
  return out;
}

export function labelMapFromBytes(bytes: Uint8Array, width: number, height: number): Uint16Array {
  if (bytes.length !== width * height * 2) {
    throw new RangeError(`label map of ${width}x${height} needs ${width * height * 2} bytes, got ${bytes.length}`);
  }
  const out = new Uint16Array(width * height);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let i = 0; i < out.length; i++) out[i] = view.getUint16(i * 2, true);
  return out;
}

/** The masks of a label map, by label (index 0 = label 1), each cropped to its bounding box. */
export function masksFromLabelMap(labels: Uint16Array | Uint32Array | Int32Array, width: number, height: number): PlacedMask[] {
  const boxes = new Map<number, { x0: number; y0: number; x1: number; y1: number }>();
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const l = labels[y * width + x];
      if (!l) continue;
      const b = boxes.get(l);
      if (!b) boxes.set(l, { x0: x, y0: y, x1: x + 1, y1: y + 1 });
      else {
        if (x < b.x0) b.x0 = x;
        if (x + 1 > b.x1) b.x1 = x + 1;
        b.y1 = y + 1;
      }
    }
  }
  const maxLabel = boxes.size ? Math.max(...boxes.keys()) : 0;
  const out: PlacedMask[] = [];
  for (let l = 1; l <= maxLabel; l++) {
    const b = boxes.get(l);
    if (!b) {
      out.push({ x0: 0, y0: 0, width: 0, height: 0, data: new Uint8Array(0) });
      continue;
    }
    const w = b.x1 - b.x0;
    const h = b.y1 - b.y0;
    const data = new Uint8Array(w * h);
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) if (labels[(y + b.y0) * width + x + b.x0] === l) data[y * w + x] = 1;
    }
    out.push({ x0: b.x0, y0: b.y0, width: w, height: h, data });
  }
  return out;
}
