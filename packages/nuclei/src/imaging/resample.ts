// Resampling to the model's resolution. The model was trained at one scale (manifest mpp, e.g.
// 0.25 um/px = 40x); an image scanned at another (0.5 um/px = 20x) is resized by
// image_mpp / model_mpp before tiling, and the masks found on it are mapped back to the image's
// own pixels, so outlines, centroids and measurements come out in the coordinates the user sent.
import sharp from 'sharp';
import type { RgbImage } from './decode';

/** Scale factors below this relative difference are treated as 1 (no resampling). */
export const SCALE_TOLERANCE = 0.02;

export interface ResampleScale {
  /** Model pixels per image pixel along x and y (image_mpp / model_mpp). */
  x: number;
  y: number;
}

/** The scale from an image at `imageMpp` to the model's `modelMpp`; identity within tolerance. */
export function scaleToModel(imageMpp: number, modelMpp: number): ResampleScale {
  const f = imageMpp / modelMpp;
  if (!(f > 0) || Math.abs(f - 1) < SCALE_TOLERANCE) return { x: 1, y: 1 };
  return { x: f, y: f };
}

export function isIdentity(scale: ResampleScale): boolean {
  return scale.x === 1 && scale.y === 1;
}

/** The size of an image of width x height after scaling (at least 1 px). */
export function scaledSize(width: number, height: number, scale: ResampleScale): { width: number; height: number } {
  return { width: Math.max(1, Math.round(width * scale.x)), height: Math.max(1, Math.round(height * scale.y)) };
}

/** Resizes an RGB image (Lanczos 3) to width x height. */
export async function resizeRgb(image: RgbImage, width: number, height: number): Promise<RgbImage> {
  if (width === image.width && height === image.height) return image;
  const { data, info } = await sharp(image.data, { raw: { width: image.width, height: image.height, channels: 3 } })
    .resize(width, height, { fit: 'fill', kernel: 'lanczos3' })
    .raw()
    .toBuffer({ resolveWithObject: true });
  if (info.channels !== 3) throw new Error(`resize produced ${info.channels} channels, expected 3`);
  return { width: info.width, height: info.height, data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) };
}
