// Cells for QuPath: each nucleus grown by a distance in µm into the background, never into another
// nucleus or another cell (pixels go to the nearest nucleus, as QuPath's cell expansion after
// StarDist or InstanSeg does), with H&E optical densities inside the nucleus and the whole cell.
import type { segmentationProto } from '@cfrsam/rpc';
import type { RgbImage } from '../imaging/decode';
import { contourPerimeter, traceOuterContour, type XY } from '../instances/contour';
import { keepComponent, removePinches } from '../instances/mask';
import { masksFromLabelMap } from '../instances/labelmap';

/** QuPath's default H&E stain vectors (optical density per R, G, B; normalised). */
const HEMATOXYLIN = normalise([0.651, 0.701, 0.29]);
const EOSIN = normalise([0.216, 0.801, 0.558]);

function normalise(v: number[]): [number, number, number] {
  const n = Math.hypot(v[0], v[1], v[2]);
  return [v[0] / n, v[1] / n, v[2] / n];
}

/** Rows of the inverse of the stain matrix [H E residual] (OD = M * stains; stains = inverse * OD). */
function deconvolutionMatrix(): number[][] {
  const [h, e] = [HEMATOXYLIN, EOSIN];
  const r = normalise([h[1] * e[2] - h[2] * e[1], h[2] * e[0] - h[0] * e[2], h[0] * e[1] - h[1] * e[0]]);
  const m = [
    [h[0], e[0], r[0]],
    [h[1], e[1], r[1]],
    [h[2], e[2], r[2]],
  ];
  const det =
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) -
    m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0]) +
    m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
  const c = (a: number, b: number, cc: number, d: number) => (a * d - b * cc) / det;
  return [
    [c(m[1][1], m[1][2], m[2][1], m[2][2]), -c(m[0][1], m[0][2], m[2][1], m[2][2]), c(m[0][1], m[0][2], m[1][1], m[1][2])],
    [-c(m[1][0], m[1][2], m[2][0], m[2][2]), c(m[0][0], m[0][2], m[2][0], m[2][2]), -c(m[0][0], m[0][2], m[1][0], m[1][2])],
    [c(m[1][0], m[1][1], m[2][0], m[2][1]), -c(m[0][0], m[0][1], m[2][0], m[2][1]), c(m[0][0], m[0][1], m[1][0], m[1][1])],
  ];
}

const INVERSE = deconvolutionMatrix();
/** Optical density of an 8-bit intensity (background 255 is 0; 0 is clamped to 1). */
const OD = Array.from({ length: 256 }, (_, i) => -Math.log10(Math.max(1, i) / 255));

/** Hematoxylin and eosin optical densities of one RGB pixel (colour deconvolution). */
export function heOpticalDensity(r: number, g: number, b: number): { hematoxylin: number; eosin: number } {
  const od = [OD[r], OD[g], OD[b]];
  return {
    hematoxylin: INVERSE[0][0] * od[0] + INVERSE[0][1] * od[1] + INVERSE[0][2] * od[2],
    eosin: INVERSE[1][0] * od[0] + INVERSE[1][1] * od[1] + INVERSE[1][2] * od[2],
  };
}

export interface Cell {
  /** The nucleus's label (id). */
  id: number;
  /** Outer contour of the cell, image pixel corners. */
  polygon: XY[];
  areaPx: number;
  perimeterPx: number;
  nucleus: { hematoxylinOd: number; eosinOd: number };
  cell: { hematoxylinOd: number; eosinOd: number };
}

/**
 * Grows every labelled nucleus by up to `expansionPx` pixels (Euclidean, nearest nucleus first) and
 * measures each cell and its nucleus on `image` (same size as the label map).
 */
export function expandCells(labels: Uint16Array, image: RgbImage, expansionPx: number): Cell[] {
  const { width: w, height: h } = image;
  if (labels.length !== w * h) throw new RangeError(`label map has ${labels.length} pixels, the image ${w * h}`);
  const owner = new Uint16Array(labels);
  const dist2 = new Float64Array(w * h).fill(Infinity);
  const seedX = new Int32Array(w * h);
  const seedY = new Int32Array(w * h);
  let frontier: number[] = [];
  for (let i = 0; i < w * h; i++) {
    if (!labels[i]) continue;
    dist2[i] = 0;
    seedX[i] = i % w;
    seedY[i] = (i - (i % w)) / w;
    frontier.push(i);
  }
  // Breadth-first growth that carries each pixel's nearest seed (an exact-enough Euclidean
  // Voronoi for nucleus-sized distances), stopping at the expansion distance.
  const limit2 = expansionPx * expansionPx;
  while (frontier.length > 0) {
    const next: number[] = [];
    for (const p of frontier) {
      const x = p % w;
      const y = (p - x) / w;
      for (const [dx, dy] of [
        [1, 0],
        [-1, 0],
        [0, 1],
        [0, -1],
      ]) {
        const nx = x + dx;
        const ny = y + dy;
        if (nx < 0 || ny < 0 || nx >= w || ny >= h) continue;
        const q = ny * w + nx;
        if (labels[q]) continue;
        const d2 = (nx - seedX[p]) ** 2 + (ny - seedY[p]) ** 2;
        if (d2 > limit2 || d2 >= dist2[q]) continue;
        dist2[q] = d2;
        seedX[q] = seedX[p];
        seedY[q] = seedY[p];
        owner[q] = owner[p];
        next.push(q);
      }
    }
    frontier = next;
  }
  const sums = new Map<number, { n: number; nh: number; ne: number; c: number; ch: number; ce: number }>();
  for (let i = 0; i < w * h; i++) {
    const l = owner[i];
    if (!l) continue;
    const od = heOpticalDensity(image.data[i * 3], image.data[i * 3 + 1], image.data[i * 3 + 2]);
    let s = sums.get(l);
    if (!s) sums.set(l, (s = { n: 0, nh: 0, ne: 0, c: 0, ch: 0, ce: 0 }));
    s.c++;
    s.ch += od.hematoxylin;
    s.ce += od.eosin;
    if (labels[i]) {
      s.n++;
      s.nh += od.hematoxylin;
      s.ne += od.eosin;
    }
  }
  const cells: Cell[] = [];
  masksFromLabelMap(owner, w, h).forEach((mask, index) => {
    const id = index + 1;
    const s = sums.get(id);
    if (!s || mask.width === 0) return;
    // One ring per cell: the part around its nucleus, without pinches (as the nuclei's outlines).
    let anchor: XY | undefined;
    for (let i = 0; i < mask.data.length && !anchor; i++) {
      const x = mask.x0 + (i % mask.width);
      const y = mask.y0 + Math.floor(i / mask.width);
      if (mask.data[i] && labels[y * w + x] === id) anchor = { x: x + 0.5, y: y + 0.5 };
    }
    const clean = keepComponent(removePinches(mask), anchor);
    const contour = traceOuterContour(clean);
    let area = 0;
    for (const v of clean.data) area += v;
    cells.push({
      id,
      polygon: contour.points,
      areaPx: area,
      perimeterPx: contourPerimeter(contour),
      nucleus: { hematoxylinOd: s.n ? s.nh / s.n : 0, eosinOd: s.n ? s.ne / s.n : 0 },
      cell: { hematoxylinOd: s.ch / s.c, eosinOd: s.ce / s.c },
    });
  });
  return cells;
}

/** A cell as the API returns it (Nucleus.cell). */
export function cellToProto(cell: Cell): segmentationProto.Cell {
  return {
    polygon: cell.polygon.map((p) => ({ x: p.x, y: p.y })),
    areaPx: cell.areaPx,
    perimeterPx: cell.perimeterPx,
    nucleusHematoxylinOd: cell.nucleus.hematoxylinOd,
    nucleusEosinOd: cell.nucleus.eosinOd,
    cellHematoxylinOd: cell.cell.hematoxylinOd,
    cellEosinOd: cell.cell.eosinOd,
  };
}
