// Instance label maps and the one-pass overlap table every segmentation metric is computed from.

/** Pixel storage of an instance label map: 0 is background, any other value is an instance id. */
export type LabelArray = Uint16Array | Uint32Array | Int32Array;

/**
 * An instance label map, row-major. Ids need not be contiguous ([2, 3, 6, 10] is fine): they are
 * remapped internally in increasing id order, as HoVer-Net's `remap_label(by_size=False)` does.
 */
export interface LabelImage {
  width: number;
  height: number;
  data: LabelArray;
}

/** The instances of one label map, indexed 0..count-1 in increasing id order. */
export interface InstanceSet {
  /** Original label id of each instance. */
  ids: Float64Array;
  /** Area in pixels. */
  area: Float64Array;
  /** Centroid (mean of pixel centres; the centre of pixel (0,0) is (0.5, 0.5)). */
  cx: Float64Array;
  cy: Float64Array;
}

/**
 * Everything the metrics need from a pair of label maps: both instance sets and the sparse table of
 * intersecting (gt, pred) pairs. Pairs are sorted by gt index, then pred index; every listed pair
 * has intersection > 0 and pairs that do not touch are absent.
 */
export interface Overlap {
  width: number;
  height: number;
  gt: InstanceSet;
  pred: InstanceSet;
  pairGt: Int32Array;
  pairPred: Int32Array;
  /** Intersection of each pair in pixels. */
  pairInter: Float64Array;
  /** Pixels that are foreground in both maps (the intersection of the binary masks). */
  foregroundIntersection: number;
}

export function pairUnion(ov: Overlap, k: number): number {
  return ov.gt.area[ov.pairGt[k]] + ov.pred.area[ov.pairPred[k]] - ov.pairInter[k];
}

export function pairIou(ov: Overlap, k: number): number {
  return ov.pairInter[k] / pairUnion(ov, k);
}

/** Accumulates one label map's instances in order of first appearance; ids are sorted at the end. */
class InstanceAccumulator {
  readonly ids: number[] = [];
  readonly area: number[] = [];
  readonly sumX: number[] = [];
  readonly sumY: number[] = [];
  // 16-bit maps use a flat table (fast); wider ids go through a Map.
  private readonly table: Int32Array | null;
  private readonly map: Map<number, number> | null;

  constructor(wide: boolean) {
    this.table = wide ? null : new Int32Array(65536).fill(-1);
    this.map = wide ? new Map() : null;
  }

  index(id: number): number {
    if (this.table) {
      let k = this.table[id];
      if (k < 0) {
        k = this.ids.length;
        this.table[id] = k;
        this.push(id);
      }
      return k;
    }
    let k = this.map!.get(id);
    if (k === undefined) {
      k = this.ids.length;
      this.map!.set(id, k);
      this.push(id);
    }
    return k;
  }

  private push(id: number): void {
    this.ids.push(id);
    this.area.push(0);
    this.sumX.push(0);
    this.sumY.push(0);
  }

  /** Final instance set in increasing id order, and the map from appearance index to that order. */
  finish(): { set: InstanceSet; order: Int32Array } {
    const n = this.ids.length;
    const byId = Array.from({ length: n }, (_, i) => i).sort((a, b) => this.ids[a] - this.ids[b]);
    const order = new Int32Array(n);
    const set: InstanceSet = {
      ids: new Float64Array(n),
      area: new Float64Array(n),
      cx: new Float64Array(n),
      cy: new Float64Array(n),
    };
    byId.forEach((old, k) => {
      order[old] = k;
      set.ids[k] = this.ids[old];
      set.area[k] = this.area[old];
      set.cx[k] = this.sumX[old] / this.area[old];
      set.cy[k] = this.sumY[old] / this.area[old];
    });
    return { set, order };
  }
}

export function checkLabelImage(label: LabelImage, what: string): void {
  const { width, height, data } = label;
  if (!Number.isInteger(width) || !Number.isInteger(height) || width < 0 || height < 0) {
    throw new RangeError(`${what}: width and height must be non-negative integers, got ${width}x${height}`);
  }
  if (data.length !== width * height) {
    throw new RangeError(`${what}: ${data.length} pixels for a ${width}x${height} image (expected ${width * height})`);
  }
}

/**
 * Computes both instance sets and the pairwise intersection table in a single pass over the pixels.
 * The pass walks runs of constant (gt, pred) along each row, so the per-run work (id lookup, pair
 * accumulation) is paid once per run rather than once per pixel.
 */
export function computeOverlap(gt: LabelImage, pred: LabelImage): Overlap {
  checkLabelImage(gt, 'ground truth');
  checkLabelImage(pred, 'prediction');
  if (gt.width !== pred.width || gt.height !== pred.height) {
    throw new RangeError(`ground truth is ${gt.width}x${gt.height} but prediction is ${pred.width}x${pred.height}`);
  }
  const { width, height } = gt;
  const g = gt.data;
  const p = pred.data;
  const gAcc = new InstanceAccumulator(!(g instanceof Uint16Array));
  const pAcc = new InstanceAccumulator(!(p instanceof Uint16Array));
  // Per gt instance (appearance index): the pred instances it touches and the shared pixel counts.
  // Nuclei touch few others, so a short linear scan beats hashing.
  const rowPreds: number[][] = [];
  const rowInter: number[][] = [];
  let foregroundIntersection = 0;

  for (let y = 0; y < height; y++) {
    const rowStart = y * width;
    const cyRun = y + 0.5;
    let x = 0;
    while (x < width) {
      const i0 = rowStart + x;
      const gv = g[i0];
      const pv = p[i0];
      const start = x;
      x++;
      while (x < width && g[rowStart + x] === gv && p[rowStart + x] === pv) x++;
      if (gv === 0 && pv === 0) continue;
      const len = x - start;
      // Sum of pixel-centre x over the run: len * (start + 0.5) + len*(len-1)/2.
      const sx = len * (start + 0.5) + (len * (len - 1)) / 2;
      let gi = -1;
      let pi = -1;
      if (gv !== 0) {
        if (gv < 0) throw new RangeError(`ground truth: negative label ${gv} at (${start}, ${y})`);
        gi = gAcc.index(gv);
        gAcc.area[gi] += len;
        gAcc.sumX[gi] += sx;
        gAcc.sumY[gi] += len * cyRun;
      }
      if (pv !== 0) {
        if (pv < 0) throw new RangeError(`prediction: negative label ${pv} at (${start}, ${y})`);
        pi = pAcc.index(pv);
        pAcc.area[pi] += len;
        pAcc.sumX[pi] += sx;
        pAcc.sumY[pi] += len * cyRun;
      }
      if (gi >= 0 && pi >= 0) {
        foregroundIntersection += len;
        while (rowPreds.length <= gi) {
          rowPreds.push([]);
          rowInter.push([]);
        }
        const preds = rowPreds[gi];
        const k = preds.indexOf(pi);
        if (k < 0) {
          preds.push(pi);
          rowInter[gi].push(len);
        } else {
          rowInter[gi][k] += len;
        }
      }
    }
  }

  const gFinal = gAcc.finish();
  const pFinal = pAcc.finish();
  const triples: [number, number, number][] = [];
  for (let gi = 0; gi < rowPreds.length; gi++) {
    const preds = rowPreds[gi];
    for (let k = 0; k < preds.length; k++) {
      triples.push([gFinal.order[gi], pFinal.order[preds[k]], rowInter[gi][k]]);
    }
  }
  triples.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  const n = triples.length;
  const pairGt = new Int32Array(n);
  const pairPred = new Int32Array(n);
  const pairInter = new Float64Array(n);
  for (let k = 0; k < n; k++) {
    pairGt[k] = triples[k][0];
    pairPred[k] = triples[k][1];
    pairInter[k] = triples[k][2];
  }
  return { width, height, gt: gFinal.set, pred: pFinal.set, pairGt, pairPred, pairInter, foregroundIntersection };
}

/**
 * Renumbers a label map to contiguous ids 1..N in increasing order of the original ids (HoVer-Net's
 * `remap_label` with by_size=False). Returns the new map (Uint32Array) and the original id of each
 * new id (index 0 unused).
 */
export function remapLabels(label: LabelImage): { label: LabelImage; originalIds: number[] } {
  checkLabelImage(label, 'label map');
  const ids = new Set<number>();
  for (let i = 0; i < label.data.length; i++) if (label.data[i] !== 0) ids.add(label.data[i]);
  const sorted = [...ids].sort((a, b) => a - b);
  const next = new Map<number, number>();
  sorted.forEach((id, k) => next.set(id, k + 1));
  const out = new Uint32Array(label.data.length);
  for (let i = 0; i < out.length; i++) {
    const v = label.data[i];
    if (v !== 0) out[i] = next.get(v)!;
  }
  return { label: { width: label.width, height: label.height, data: out }, originalIds: [0, ...sorted] };
}
