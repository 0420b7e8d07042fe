import sharp from 'sharp';
import { SlideError } from './errors.js';
import type { RgbImage } from './codecs.js';
import type { Mpp, Slide } from './slide.js';

/** A rectangle in level-0 pixels. */
export interface Rect {
  x: number;
  y: number;
  width: number;
  height: number;
}

export interface ResampledRegion extends RgbImage {
  /** The pyramid level that was read. */
  level: number;
  /**
   * Output pixel (i, j) covers level-0 [origin.x + i*scale.x, origin.x + (i+1)*scale.x) x
   * [origin.y + j*scale.y, ...): level0 = origin + outputPixel * scale (pixel corners).
   * The covered area contains the requested rectangle (it is snapped outwards to the read level's
   * pixel grid; with level 0 read, origin is exactly the request's x, y).
   */
  origin: { x: number; y: number };
  /** Level-0 pixels per output pixel. */
  scale: { x: number; y: number };
  /** The output's actual micrometres per pixel (the target up to rounding of the output size). */
  mpp: { x: number; y: number };
  /** Where the slide's mpp came from ('option' when given by the caller). */
  mppSource: string;
}

export interface ResampleOptions {
  /** The slide's level-0 resolution, overriding (or standing in for) the file's. */
  slideMpp?: number | { x: number; y: number };
}

/** The slide's mpp, or the caller's, or a NO_RESOLUTION error. */
export function resolveMpp(slide: Slide, given?: number | { x: number; y: number }): Mpp {
  if (given !== undefined) {
    const m = typeof given === 'number' ? { x: given, y: given } : given;
    if (!(m.x > 0 && m.y > 0 && Number.isFinite(m.x) && Number.isFinite(m.y))) {
      throw new SlideError('BAD_ARGUMENT', `invalid slide mpp ${JSON.stringify(given)}`, slide.path);
    }
    return { ...m, source: 'option' };
  }
  if (!slide.mpp) {
    throw new SlideError('NO_RESOLUTION', 'the slide has no resolution (mpp) in its metadata and none was given', slide.path);
  }
  return slide.mpp;
}

/**
 * The pyramid level whose resolution is the nearest one finer than or equal to `targetMpp`
 * (level 0 when even level 0 is coarser: the region is then upsampled).
 */
export function levelForMpp(slide: Slide, mpp: { x: number; y: number }, targetMpp: number): number {
  let best = 0;
  slide.levels.forEach((L, i) => {
    const lm = Math.max(mpp.x * L.downsampleX, mpp.y * L.downsampleY);
    if (lm <= targetMpp * (1 + 1e-3) && L.downsample > slide.levels[best].downsample) best = i;
  });
  return best;
}

/**
 * Reads a level-0 rectangle resampled to `targetMpp` micrometres per pixel: reads the nearest finer
 * (or equal) pyramid level, then resizes with sharp (Lanczos 3). Returns the pixels with the exact
 * mapping back to level 0.
 */
export async function readRegionAtMpp(slide: Slide, rect: Rect, targetMpp: number, opts: ResampleOptions = {}): Promise<ResampledRegion> {
  if (!(targetMpp > 0 && Number.isFinite(targetMpp))) {
    throw new SlideError('BAD_ARGUMENT', `target mpp must be a positive number, got ${targetMpp}`, slide.path);
  }
  if (!(rect.width > 0 && rect.height > 0)) {
    throw new SlideError('BAD_ARGUMENT', `region size ${rect.width}x${rect.height} is empty`, slide.path);
  }
  const mpp = resolveMpp(slide, opts.slideMpp);
  const level = levelForMpp(slide, mpp, targetMpp);
  const L = slide.levels[level];
  const dsx = L.downsampleX,
    dsy = L.downsampleY;
  const lx0 = Math.floor(rect.x / dsx + 1e-9),
    ly0 = Math.floor(rect.y / dsy + 1e-9);
  const lx1 = Math.ceil((rect.x + rect.width) / dsx - 1e-9),
    ly1 = Math.ceil((rect.y + rect.height) / dsy - 1e-9);
  const lw = lx1 - lx0,
    lh = ly1 - ly0;
  const img = await slide.readRegion({ level, x: lx0, y: ly0, width: lw, height: lh });
  const spanW = lw * dsx,
    spanH = lh * dsy;
  const outW = Math.max(1, Math.round((spanW * mpp.x) / targetMpp));
  const outH = Math.max(1, Math.round((spanH * mpp.y) / targetMpp));
  let data = img.data;
  if (outW !== lw || outH !== lh) {
    data = await sharp(img.data, { raw: { width: lw, height: lh, channels: 3 }, limitInputPixels: false })
      .resize(outW, outH, { fit: 'fill', kernel: 'lanczos3' })
      .raw()
      .toBuffer();
  }
  const scale = { x: spanW / outW, y: spanH / outH };
  return {
    data,
    width: outW,
    height: outH,
    level,
    origin: { x: lx0 * dsx, y: ly0 * dsy },
    scale,
    mpp: { x: mpp.x * scale.x, y: mpp.y * scale.y },
    mppSource: mpp.source,
  };
}
