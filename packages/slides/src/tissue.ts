import { SlideError } from './errors.js';
import type { Rect } from './resample.js';
import type { Slide } from './slide.js';

export interface TissueMask {
  /** 1 = tissue, 0 = background; row-major `width` x `height`. */
  mask: Uint8Array;
  width: number;
  height: number;
  /** Level-0 pixels per mask pixel (level0 = mask * downsample). */
  downsample: { x: number; y: number };
  /** Level-0 size of the slide the mask covers. */
  level0: { width: number; height: number };
  /** Fraction of the slide's area that is tissue. */
  fraction: number;
  /** The saturation threshold used (0-255). */
  threshold: number;
  /** The pyramid level that was read. */
  level: number;
}

export interface TissueOptions {
  /** Longest side of the mask in pixels (default 1024). */
  maxSide?: number;
  /** Fixed saturation threshold (0-255); default Otsu clamped to [minThreshold, maxThreshold]. */
  threshold?: number;
  minThreshold?: number;
  maxThreshold?: number;
  /** Radius in mask pixels of the opening and closing clean-up (default 1; 0 disables). */
  morphRadius?: number;
  /** Components smaller than this fraction of the mask are removed (default 0.0005). */
  minComponentFraction?: number;
}

/**
 * Finds tissue on a low-resolution level: per mask pixel the mean HSV saturation (glass is grey or
 * white, stained tissue is coloured; near-black pixels count as not tissue), thresholded with Otsu's
 * method clamped to a sane range, then cleaned with a morphological opening + closing and by
 * removing small connected components.
 */
export async function detectTissue(slide: Slide, opts: TissueOptions = {}): Promise<TissueMask> {
  const maxSide = Math.max(8, Math.round(opts.maxSide ?? 1024));
  const L0 = slide.levels[0];
  // the coarsest level that still has at least maxSide pixels on its long side
  let level = 0;
  slide.levels.forEach((L, i) => {
    if (Math.max(L.width, L.height) >= maxSide && L.downsample > slide.levels[level].downsample) level = i;
  });
  const L = slide.levels[level];
  const f = Math.max(1, Math.ceil(Math.max(L.width, L.height) / maxSide));
  const mw = Math.ceil(L.width / f),
    mh = Math.ceil(L.height / f);
  const sum = new Float64Array(mw * mh);
  const cnt = new Uint32Array(mw * mh);
  // read in bands of whole mask rows, ~4 Mpx each, so memory stays bounded on single-level slides
  const bandRows = Math.max(1, Math.floor((4 * 1024 * 1024) / (L.width * f))) * f;
  for (let y0 = 0; y0 < L.height; y0 += bandRows) {
    const h = Math.min(bandRows, L.height - y0);
    const { data } = await slide.readRegion({ level, x: 0, y: y0, width: L.width, height: h });
    for (let y = 0; y < h; y++) {
      const row = Math.floor((y0 + y) / f) * mw;
      for (let x = 0, p = y * L.width * 3; x < L.width; x++, p += 3) {
        const r = data[p],
          g = data[p + 1],
          b = data[p + 2];
        const mx = r > g ? (r > b ? r : b) : g > b ? g : b;
        const mn = r < g ? (r < b ? r : b) : g < b ? g : b;
        // saturation; very dark pixels (pen, scanner borders) are not tissue
        const s = mx < 25 ? 0 : ((mx - mn) * 255) / mx;
        const k = row + Math.floor(x / f);
        sum[k] += s;
        cnt[k]++;
      }
    }
  }
  const feat = new Uint8Array(mw * mh);
  const hist = new Float64Array(256);
  for (let i = 0; i < feat.length; i++) {
    feat[i] = cnt[i] ? Math.round(sum[i] / cnt[i]) : 0;
    hist[feat[i]]++;
  }
  const threshold = opts.threshold ?? Math.min(opts.maxThreshold ?? 40, Math.max(opts.minThreshold ?? 15, otsu(hist)));
  let mask: Uint8Array = new Uint8Array(mw * mh);
  for (let i = 0; i < feat.length; i++) mask[i] = feat[i] > threshold ? 1 : 0;
  const r = opts.morphRadius ?? 1;
  if (r > 0) {
    mask = dilate(erode(mask, mw, mh, r), mw, mh, r); // opening: removes specks
    mask = erode(dilate(mask, mw, mh, r), mw, mh, r); // closing: fills pinholes
  }
  removeSmallComponents(mask, mw, mh, Math.max(2, Math.round((opts.minComponentFraction ?? 0.0005) * mw * mh)));
  let n = 0;
  for (let i = 0; i < mask.length; i++) n += mask[i];
  return {
    mask,
    width: mw,
    height: mh,
    downsample: { x: L.downsampleX * f, y: L.downsampleY * f },
    level0: { width: L0.width, height: L0.height },
    fraction: n / mask.length,
    threshold,
    level,
  };
}

/** Otsu's threshold of a 256-bin histogram (the bin value maximising between-class variance). */
export function otsu(hist: ArrayLike<number>): number {
  let total = 0,
    sumAll = 0;
  for (let i = 0; i < 256; i++) {
    total += hist[i];
    sumAll += i * hist[i];
  }
  let wB = 0,
    sumB = 0,
    best = 0,
    bestVar = -1;
  for (let t = 0; t < 256; t++) {
    wB += hist[t];
    if (wB === 0) continue;
    const wF = total - wB;
    if (wF === 0) break;
    sumB += t * hist[t];
    const mB = sumB / wB,
      mF = (sumAll - sumB) / wF;
    const v = wB * wF * (mB - mF) ** 2;
    if (v > bestVar) {
      bestVar = v;
      best = t;
    }
  }
  return best;
}

function morph(m: Uint8Array, w: number, h: number, r: number, erodeOp: boolean): Uint8Array {
  // separable square structuring element (2r+1)^2; outside the image counts as background for
  // dilation and as foreground for erosion (so tissue touching the border is not eaten)
  const tmp = new Uint8Array(m.length),
    out = new Uint8Array(m.length);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      let v = erodeOp ? 1 : 0;
      for (let d = -r; d <= r; d++) {
        const xx = x + d;
        if (xx < 0 || xx >= w) continue;
        const s = m[y * w + xx];
        if (erodeOp ? !s : s) {
          v = erodeOp ? 0 : 1;
          break;
        }
      }
      tmp[y * w + x] = v;
    }
  }
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      let v = erodeOp ? 1 : 0;
      for (let d = -r; d <= r; d++) {
        const yy = y + d;
        if (yy < 0 || yy >= h) continue;
        const s = tmp[yy * w + x];
        if (erodeOp ? !s : s) {
          v = erodeOp ? 0 : 1;
          break;
        }
      }
      out[y * w + x] = v;
    }
  }
  return out;
}
const erode = (m: Uint8Array, w: number, h: number, r: number) => morph(m, w, h, r, true);
const dilate = (m: Uint8Array, w: number, h: number, r: number) => morph(m, w, h, r, false);

/** Clears 8-connected components smaller than `minSize` pixels (in place). */
export function removeSmallComponents(mask: Uint8Array, w: number, h: number, minSize: number): void {
  const label = new Int32Array(mask.length);
  const stack: number[] = [];
  const members: number[] = [];
  let next = 0;
  for (let i = 0; i < mask.length; i++) {
    if (!mask[i] || label[i]) continue;
    next++;
    members.length = 0;
    stack.push(i);
    label[i] = next;
    while (stack.length) {
      const p = stack.pop()!;
      members.push(p);
      const px = p % w,
        py = (p - px) / w;
      for (let dy = -1; dy <= 1; dy++) {
        const yy = py + dy;
        if (yy < 0 || yy >= h) continue;
        for (let dx = -1; dx <= 1; dx++) {
          const xx = px + dx;
          if (xx < 0 || xx >= w) continue;
          const q = yy * w + xx;
          if (mask[q] && !label[q]) {
            label[q] = next;
            stack.push(q);
          }
        }
      }
    }
    if (members.length < minSize) for (const p of members) mask[p] = 0;
  }
}

/** A region of interest in level-0 coordinates: a rectangle or a polygon ([x, y] vertices). */
export type Roi = Rect | { polygon: [number, number][] };

export interface TissueRegion extends Rect {
  /** Fraction of the region's mask pixels that are tissue (inside the ROI). */
  tissueFraction: number;
}

export interface TissueRegionOptions {
  roi?: Roi;
  /** Keep a region only if at least this fraction of it is tissue (default 0: any tissue). */
  minTissueFraction?: number;
}

function roiBounds(roi: Roi): Rect {
  if ('polygon' in roi) {
    const xs = roi.polygon.map((p) => p[0]),
      ys = roi.polygon.map((p) => p[1]);
    const x = Math.min(...xs),
      y = Math.min(...ys);
    return { x, y, width: Math.max(...xs) - x, height: Math.max(...ys) - y };
  }
  return roi;
}

/** Whether a level-0 point lies in the ROI (even-odd rule for polygons). */
export function pointInRoi(roi: Roi, x: number, y: number): boolean {
  if (!('polygon' in roi)) return x >= roi.x && x < roi.x + roi.width && y >= roi.y && y < roi.y + roi.height;
  const pts = roi.polygon;
  let inside = false;
  for (let i = 0, j = pts.length - 1; i < pts.length; j = i++) {
    const [xi, yi] = pts[i],
      [xj, yj] = pts[j];
    if (yi > y !== yj > y && x < ((xj - xi) * (y - yi)) / (yj - yi) + xi) inside = !inside;
  }
  return inside;
}

/**
 * The level-0 rectangles of a grid of `regionSize` cells (clipped to the slide and to the ROI's
 * bounding box; the grid starts at the ROI's top-left corner, or at 0,0) that contain tissue
 * (inside the ROI where one is given). ROI outside the slide: `SlideError('ROI_OUTSIDE')`.
 */
export function tissueRegions(
  tissue: TissueMask,
  regionSize: number | { width: number; height: number },
  opts: TissueRegionOptions = {},
): TissueRegion[] {
  const rw = typeof regionSize === 'number' ? regionSize : regionSize.width;
  const rh = typeof regionSize === 'number' ? regionSize : regionSize.height;
  if (!(rw >= 1 && rh >= 1)) throw new SlideError('BAD_ARGUMENT', `region size must be at least 1 pixel, got ${rw}x${rh}`);
  const W0 = tissue.level0.width,
    H0 = tissue.level0.height;
  const { mask, width: mw, height: mh } = tissue;
  const { x: dsx, y: dsy } = tissue.downsample;
  let area: Rect = { x: 0, y: 0, width: W0, height: H0 };
  let roiMask: Uint8Array | null = null;
  const roi = opts.roi;
  if (roi) {
    if ('polygon' in roi) {
      if (roi.polygon.length < 3 || roi.polygon.some((p) => !Number.isFinite(p[0]) || !Number.isFinite(p[1]))) {
        throw new SlideError('BAD_ARGUMENT', 'an ROI polygon needs at least 3 finite [x, y] points');
      }
    } else if (![roi.x, roi.y, roi.width, roi.height].every(Number.isFinite) || roi.width <= 0 || roi.height <= 0) {
      throw new SlideError('BAD_ARGUMENT', `invalid ROI rectangle ${JSON.stringify(roi)}`);
    }
    const b = roiBounds(roi);
    const x0 = Math.max(0, Math.floor(b.x)),
      y0 = Math.max(0, Math.floor(b.y));
    const x1 = Math.min(W0, Math.ceil(b.x + b.width)),
      y1 = Math.min(H0, Math.ceil(b.y + b.height));
    if (x1 <= x0 || y1 <= y0) {
      throw new SlideError('ROI_OUTSIDE', `ROI with bounds ${b.width}x${b.height} at (${b.x},${b.y}) is outside the slide (${W0}x${H0})`);
    }
    area = { x: x0, y: y0, width: x1 - x0, height: y1 - y0 };
    if ('polygon' in roi) {
      roiMask = new Uint8Array(mw * mh);
      for (let my = 0; my < mh; my++) {
        for (let mx = 0; mx < mw; mx++) {
          if (pointInRoi(roi, (mx + 0.5) * dsx, (my + 0.5) * dsy)) roiMask[my * mw + mx] = 1;
        }
      }
      // tiny polygons that contain no mask pixel centre: the pixels under their vertices
      for (const [px, py] of roi.polygon) {
        const mx = Math.floor(px / dsx),
          my = Math.floor(py / dsy);
        if (mx >= 0 && mx < mw && my >= 0 && my < mh) roiMask[my * mw + mx] = 1;
      }
    }
  }
  const minFrac = opts.minTissueFraction ?? 0;
  const out: TissueRegion[] = [];
  for (let y = area.y; y < area.y + area.height; y += rh) {
    for (let x = area.x; x < area.x + area.width; x += rw) {
      const w = Math.min(rw, area.x + area.width - x),
        h = Math.min(rh, area.y + area.height - y);
      const mx0 = Math.floor(x / dsx),
        my0 = Math.floor(y / dsy);
      const mx1 = Math.min(mw, Math.max(mx0 + 1, Math.ceil((x + w) / dsx))),
        my1 = Math.min(mh, Math.max(my0 + 1, Math.ceil((y + h) / dsy)));
      let t = 0;
      for (let my = my0; my < my1; my++) {
        for (let mx = mx0; mx < mx1; mx++) {
          const i = my * mw + mx;
          if (roiMask && !roiMask[i]) continue;
          t += mask[i];
        }
      }
      if (t === 0) continue;
      const frac = t / ((mx1 - mx0) * (my1 - my0));
      if (frac < minFrac) continue;
      out.push({ x, y, width: w, height: h, tissueFraction: frac });
    }
  }
  return out;
}
