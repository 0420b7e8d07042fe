// Overlay PNG: the image with each nucleus's outline drawn in its class colour.
import sharp from 'sharp';
import type { RgbImage } from '../imaging/decode';
import { type Rgb } from './color';

/**
 * Draws outlines (label pixels with a 4-neighbour of another label, or on the image edge) over a
 * copy of the image. colorOfLabel gives the colour of each label (1-based).
 */
export function drawOutlines(image: RgbImage, labels: Uint16Array, colorOfLabel: (label: number) => Rgb, thickness = 1): Uint8Array {
  const { width: w, height: h } = image;
  if (labels.length !== w * h) throw new RangeError(`label map ${labels.length} does not match image ${w}x${h}`);
  const out = new Uint8Array(image.data);
  const colorCache = new Map<number, Rgb>();
  let edge = new Uint8Array(w * h);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const i = y * w + x;
      const l = labels[i];
      if (!l) continue;
      if (
        x === 0 ||
        y === 0 ||
        x === w - 1 ||
        y === h - 1 ||
        labels[i - 1] !== l ||
        labels[i + 1] !== l ||
        labels[i - w] !== l ||
        labels[i + w] !== l
      )
        edge[i] = 1;
    }
  }
  // Thicker outlines grow inwards, so neighbouring nuclei do not paint over each other.
  for (let t = 1; t < thickness; t++) {
    const grown = edge.slice();
    for (let i = 0; i < w * h; i++) {
      const l = labels[i];
      if (!l || edge[i]) continue;
      const x = i % w;
      if (
        (x > 0 && edge[i - 1] && labels[i - 1] === l) ||
        (x < w - 1 && edge[i + 1] && labels[i + 1] === l) ||
        (i >= w && edge[i - w] && labels[i - w] === l) ||
        (i + w < w * h && edge[i + w] && labels[i + w] === l)
      )
        grown[i] = 1;
    }
    edge = grown;
  }
  for (let i = 0; i < w * h; i++) {
    if (!edge[i]) continue;
    const l = labels[i];
    let c = colorCache.get(l);
    if (!c) {
      c = colorOfLabel(l);
      colorCache.set(l, c);
    }
    out[i * 3] = c[0];
    out[i * 3 + 1] = c[1];
    out[i * 3 + 2] = c[2];
  }
  return out;
}

export async function encodeOverlayPng(image: RgbImage, labels: Uint16Array, colorOfLabel: (label: number) => Rgb, thickness = 1): Promise<Buffer> {
  const pixels = drawOutlines(image, labels, colorOfLabel, thickness);
  return sharp(Buffer.from(pixels.buffer, pixels.byteOffset, pixels.byteLength), {
    raw: { width: image.width, height: image.height, channels: 3 },
  })
    .png()
    .toBuffer();
}
