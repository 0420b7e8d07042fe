// Glass: the parts of an H&E image with no stained tissue. Stained tissue is coloured and glass is
// grey or white, so a pixel counts as tissue when its HSV saturation is above GLASS_SATURATION
// (the low end of the slides' tissue-mask threshold range, packages/slides tissue.ts) and it is
// not near-black (pen, scanner borders). Sampled on a grid: a fraction, not a mask.
import type { RgbImage } from './decode';
import type { Rect } from './tiling';

/** HSV saturation (0-255) above which a pixel is stained tissue. */
export const GLASS_SATURATION = 20;

/** Fraction of the pixels of `rect` (x1, y1 exclusive) that are tissue, sampled every `step` pixels. */
export function tissueFraction(image: RgbImage, rect: Rect, step = 2): number {
  const { data, width } = image;
  let tissue = 0;
  let n = 0;
  for (let y = rect.y0; y < rect.y1; y += step) {
    for (let x = rect.x0, p = (y * width + x) * 3; x < rect.x1; x += step, p += 3 * step) {
      const r = data[p];
      const g = data[p + 1];
      const b = data[p + 2];
      const mx = r > g ? (r > b ? r : b) : g > b ? g : b;
      const mn = r < g ? (r < b ? r : b) : g < b ? g : b;
      if (mx >= 25 && (mx - mn) * 255 > GLASS_SATURATION * mx) tissue++;
      n++;
    }
  }
  return n > 0 ? tissue / n : 0;
}

/**
 * Indices of the rects that are glass: less than `maxTissue` of their pixels tissue, in an image
 * whose tissue is at least `minImageTissue` of it. An image without stain overall (greyscale,
 * fluorescence, a synthetic grey test image) has no glass by this rule: nothing is skipped there.
 */
export function glassRects(image: RgbImage, rects: readonly Rect[], maxTissue: number, minImageTissue = 0.02): Set<number> {
  const glass = new Set<number>();
  if (!(maxTissue > 0) || rects.length < 2) return glass;
  if (tissueFraction(image, { x0: 0, y0: 0, x1: image.width, y1: image.height }, 4) < minImageTissue) return glass;
  rects.forEach((rect, i) => {
    if (tissueFraction(image, rect) < maxTissue) glass.add(i);
  });
  return glass;
}
