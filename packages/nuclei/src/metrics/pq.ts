// Panoptic quality (Kirillov et al. 2019) as HoVer-Net and PanNuke compute it for nuclei.

import { sparseAssignment } from './assignment';
import { Overlap, pairIou } from './labels';

/** Matched (gt, pred) instance pairs with their IoU. */
export interface InstanceMatch {
  gt: Int32Array;
  pred: Int32Array;
  iou: Float64Array;
}

/** Counts behind PQ; summable across images (the dataset-pooled variant adds them up). */
export interface PqCounts {
  tp: number;
  fp: number;
  fn: number;
  /** Sum of the IoU of the matched pairs. */
  sumIou: number;
}

export interface PqResult extends PqCounts {
  /** Detection quality: TP / (TP + FP/2 + FN/2), the F1 of detection at the IoU threshold. */
  dq: number;
  /** Segmentation quality: mean IoU of the matched pairs (0 when nothing is matched). */
  sq: number;
  /** Panoptic quality: DQ x SQ. */
  pq: number;
}

/**
 * Matches ground-truth and predicted instances, as HoVer-Net's `get_fast_pq`:
 *
 * - matchIou >= 0.5: a pair matches iff IoU > matchIou (strictly). At most one pair per instance
 *   can exceed 0.5, so the matching is unique and maximal without any search.
 * - matchIou < 0.5: maximal-IoU one-to-one pairing (Munkres, as `linear_sum_assignment(-iou)`),
 *   then pairs with IoU <= matchIou are dropped.
 *
 * `includePair(k)` restricts the candidate pairs (per-class PQ keeps pairs whose two instances are
 * both of the class).
 */
export function matchInstances(ov: Overlap, matchIou = 0.5, includePair?: (k: number) => boolean): InstanceMatch {
  if (!(matchIou >= 0)) throw new RangeError(`match IoU must be >= 0, got ${matchIou}`);
  const gt: number[] = [];
  const pred: number[] = [];
  const iou: number[] = [];
  const n = ov.pairGt.length;
  if (matchIou >= 0.5) {
    for (let k = 0; k < n; k++) {
      if (includePair && !includePair(k)) continue;
      const v = pairIou(ov, k);
      if (v > matchIou) {
        gt.push(ov.pairGt[k]);
        pred.push(ov.pairPred[k]);
        iou.push(v);
      }
    }
  } else {
    const ks: number[] = [];
    for (let k = 0; k < n; k++) if (!includePair || includePair(k)) ks.push(k);
    const cost = new Float64Array(ks.length);
    ks.forEach((k, i) => (cost[i] = -pairIou(ov, k)));
    const matchA = sparseAssignment({
      nA: ov.gt.area.length,
      nB: ov.pred.area.length,
      a: Int32Array.from(ks, (k) => ov.pairGt[k]),
      b: Int32Array.from(ks, (k) => ov.pairPred[k]),
      cost,
      missingCost: 0,
    });
    for (const k of ks) {
      if (matchA[ov.pairGt[k]] !== ov.pairPred[k]) continue;
      const v = pairIou(ov, k);
      if (v > matchIou) {
        gt.push(ov.pairGt[k]);
        pred.push(ov.pairPred[k]);
        iou.push(v);
      }
    }
  }
  return { gt: Int32Array.from(gt), pred: Int32Array.from(pred), iou: Float64Array.from(iou) };
}

/**
 * DQ, SQ and PQ from counts. When there is nothing at all (TP = FP = FN = 0) every value is NaN
 * (HoVer-Net's 0/0), and NaN values are left out of averages. SQ is exact (HoVer-Net divides by
 * TP + 1e-6, which makes a perfect score 0.9999999).
 */
export function pqFromCounts(c: PqCounts): PqResult {
  const { tp, fp, fn, sumIou } = c;
  if (tp + fp + fn === 0) return { tp, fp, fn, sumIou, dq: NaN, sq: NaN, pq: NaN };
  const dq = tp / (tp + 0.5 * fp + 0.5 * fn);
  const sq = tp > 0 ? sumIou / tp : 0;
  return { tp, fp, fn, sumIou, dq, sq, pq: dq * sq };
}

/** PQ of all instances of an image regardless of class (with one class, this is bPQ). */
export function panopticQuality(ov: Overlap, matchIou = 0.5): PqResult & { match: InstanceMatch } {
  const match = matchInstances(ov, matchIou);
  let sumIou = 0;
  for (let k = 0; k < match.iou.length; k++) sumIou += match.iou[k];
  const tp = match.iou.length;
  const result = pqFromCounts({ tp, fp: ov.pred.area.length - tp, fn: ov.gt.area.length - tp, sumIou });
  return { ...result, match };
}

/**
 * Per-class PQ counts of one image: for class c, only ground-truth instances of class c and
 * predicted instances of class c take part (PanNuke evaluates each class channel separately).
 * `gtClass[i]` / `predClass[j]` give each instance's class index, -1 when unknown (an instance of
 * unknown class takes part in no class).
 */
export function perClassPqCounts(
  ov: Overlap,
  gtClass: Int32Array,
  predClass: Int32Array,
  numClasses: number,
  matchIou = 0.5,
): { nGt: number[]; nPred: number[]; counts: PqCounts[] } {
  const nGt = new Array<number>(numClasses).fill(0);
  const nPred = new Array<number>(numClasses).fill(0);
  for (const c of gtClass) if (c >= 0 && c < numClasses) nGt[c]++;
  for (const c of predClass) if (c >= 0 && c < numClasses) nPred[c]++;
  const counts: PqCounts[] = [];
  for (let c = 0; c < numClasses; c++) {
    let tp = 0;
    let sumIou = 0;
    if (nGt[c] > 0 && nPred[c] > 0) {
      const m = matchInstances(ov, matchIou, (k) => gtClass[ov.pairGt[k]] === c && predClass[ov.pairPred[k]] === c);
      tp = m.iou.length;
      for (let k = 0; k < m.iou.length; k++) sumIou += m.iou[k];
    }
    counts.push({ tp, fp: nPred[c] - tp, fn: nGt[c] - tp, sumIou });
  }
  return { nGt, nPred, counts };
}
