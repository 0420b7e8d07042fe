// Per-nucleus shape and intensity measurements from a mask in image coordinates.
import type { RgbImage } from '../imaging/decode';
import { contourPerimeter, convexHull, polygonArea, traceOuterContour, type Contour, type XY } from './contour';
import type { PlacedMask } from './mask';

export interface NucleusMeasurements {
  areaPx: number;
  /** Area in square micrometres (areaPx * mpp^2); 0 when mpp is unknown (<= 0). */
  areaUm2: number;
  perimeterPx: number;
  /** 4 pi A / P^2, clamped to [0, 1]. */
  circularity: number;
  eccentricity: number;
  majorAxisPx: number;
  minorAxisPx: number;
  /** Area / area of the convex hull of the pixels (pixel squares, not centres). */
  solidity: number;
  meanR: number;
  meanG: number;
  meanB: number;
}

export interface ShapeSummary {
  measurements: NucleusMeasurements;
  /** Centroid of the pixels (pixel centres at +0.5). */
  centroid: XY;
  /** Half-open bounding box. */
  bbox: { x0: number; y0: number; x1: number; y1: number };
  contour: Contour;
}

/**
 * Measures one mask. Axes and eccentricity come from the second central moments of the pixel
 * squares (the moments of the centres plus 1/12, the variance of a unit square), so an ellipse of
 * semi-axes a, b measures major = 2a and minor = 2b. The image (same frame as the mask) gives the
 * mean colour; mpp converts area to um^2.
 */
export function measureMask(mask: PlacedMask, image: RgbImage | undefined, mpp: number): ShapeSummary {
  const { x0, y0, width: w, height: h, data } = mask;
  let n = 0;
  let sx = 0;
  let sy = 0;
  let sr = 0;
  let sg = 0;
  let sb = 0;
  // Convex hull candidates: the outer corners of the first and last pixel of every row.
  const corners: XY[] = [];
  for (let y = 0; y < h; y++) {
    let first = -1;
    let last = -1;
    const row = y * w;
    for (let x = 0; x < w; x++) {
      if (!data[row + x]) continue;
      if (first < 0) first = x;
      last = x;
      n++;
      sx += x;
      sy += y;
      if (image) {
        const p = ((y0 + y) * image.width + (x0 + x)) * 3;
        sr += image.data[p];
        sg += image.data[p + 1];
        sb += image.data[p + 2];
      }
    }
    if (first >= 0) {
      corners.push({ x: x0 + first, y: y0 + y }, { x: x0 + first, y: y0 + y + 1 });
      corners.push({ x: x0 + last + 1, y: y0 + y }, { x: x0 + last + 1, y: y0 + y + 1 });
    }
  }
  if (n === 0) throw new RangeError('cannot measure an empty mask');
  const mx = sx / n;
  const my = sy / n;
  let sxx = 0;
  let syy = 0;
  let sxy = 0;
  for (let y = 0; y < h; y++) {
    const row = y * w;
    for (let x = 0; x < w; x++) {
      if (!data[row + x]) continue;
      const dx = x - mx;
      const dy = y - my;
      sxx += dx * dx;
      syy += dy * dy;
      sxy += dx * dy;
    }
  }
  const mu20 = sxx / n + 1 / 12;
  const mu02 = syy / n + 1 / 12;
  const mu11 = sxy / n;
  const half = (mu20 + mu02) / 2;
  const disc = Math.sqrt(((mu20 - mu02) / 2) ** 2 + mu11 ** 2);
  const l1 = half + disc;
  const l2 = Math.max(0, half - disc);
  const contour = traceOuterContour(mask);
  const perimeter = contourPerimeter(contour);
  const hullArea = polygonArea(convexHull(corners));
  let minX = w;
  let maxX = -1;
  let minY = h;
  let maxY = -1;
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      if (data[y * w + x]) {
        if (x < minX) minX = x;
        if (x > maxX) maxX = x;
        if (y < minY) minY = y;
        if (y > maxY) maxY = y;
      }
    }
  }
  return {
    measurements: {
      areaPx: n,
      areaUm2: mpp > 0 ? n * mpp * mpp : 0,
      perimeterPx: perimeter,
      circularity: perimeter > 0 ? Math.min(1, (4 * Math.PI * n) / (perimeter * perimeter)) : 0,
      eccentricity: l1 > 0 ? Math.sqrt(Math.max(0, 1 - l2 / l1)) : 0,
      majorAxisPx: 4 * Math.sqrt(l1),
      minorAxisPx: 4 * Math.sqrt(l2),
      solidity: hullArea > 0 ? Math.min(1, n / hullArea) : 1,
      meanR: image ? sr / n : 0,
      meanG: image ? sg / n : 0,
      meanB: image ? sb / n : 0,
    },
    centroid: { x: x0 + mx + 0.5, y: y0 + my + 0.5 },
    bbox: { x0: x0 + minX, y0: y0 + minY, x1: x0 + maxX + 1, y1: y0 + maxY + 1 },
    contour,
  };
}
