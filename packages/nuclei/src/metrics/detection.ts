// Detection and classification of nuclei by centroid pairing (HoVer-Net's `pair_coordinates` and
// `run_nuclei_type_stat`).

import { linearSumAssignment, sparseAssignment } from './assignment';

/** Default pairing radius in pixels: 12 px at 40x (about 3 um), HoVer-Net's value. */
export const DEFAULT_PAIRING_RADIUS = 12;

/**
 * Largest number of distance-matrix entries solved densely (about 2000 x 2000 points, 32 MB);
 * bigger images fall back to gated pairing.
 */
export const DENSE_PAIRING_LIMIT = 4_000_000;

/**
 * - `dense`: HoVer-Net's exact procedure: Munkres over the full Euclidean distance matrix (every
 *   point of A against every point of B), then pairs farther apart than the radius are dropped.
 * - `gated`: only pairs within the radius are candidates; the most pairs possible, then the least
 *   total distance. Differs from `dense` only when the global assignment trades a within-radius
 *   pair for a far one, which is rare for well-separated nuclei; scales to any size.
 * - `auto`: dense up to DENSE_PAIRING_LIMIT matrix entries, gated beyond.
 */
export type PairingMode = 'auto' | 'dense' | 'gated';

export interface Points {
  x: ArrayLike<number>;
  y: ArrayLike<number>;
}

export interface CentroidPairing {
  /** For each point of A, its paired point of B, or -1. */
  aToB: Int32Array;
  pairedCount: number;
  /** The mode that actually ran (`auto` resolved). */
  mode: 'dense' | 'gated';
}

/**
 * Pairs two point sets one-to-one within `radius` (inclusive, as HoVer-Net's `pair_cost <= radius`).
 */
export function pairCentroids(a: Points, b: Points, radius = DEFAULT_PAIRING_RADIUS, mode: PairingMode = 'auto'): CentroidPairing {
  if (!(radius >= 0)) throw new RangeError(`pairing radius must be >= 0, got ${radius}`);
  const nA = a.x.length;
  const nB = b.x.length;
  const aToB = new Int32Array(nA).fill(-1);
  const resolved = mode === 'auto' ? (nA * nB <= DENSE_PAIRING_LIMIT ? 'dense' : 'gated') : mode;
  if (nA === 0 || nB === 0) return { aToB, pairedCount: 0, mode: resolved };
  let paired = 0;
  if (resolved === 'dense') {
    const cost = new Float64Array(nA * nB);
    for (let i = 0; i < nA; i++) {
      const ax = a.x[i];
      const ay = a.y[i];
      const base = i * nB;
      for (let j = 0; j < nB; j++) {
        const dx = ax - b.x[j];
        const dy = ay - b.y[j];
        cost[base + j] = Math.sqrt(dx * dx + dy * dy);
      }
    }
    const colForRow = linearSumAssignment(cost, nA, nB);
    for (let i = 0; i < nA; i++) {
      const j = colForRow[i];
      if (j >= 0 && cost[i * nB + j] <= radius) {
        aToB[i] = j;
        paired++;
      }
    }
    return { aToB, pairedCount: paired, mode: 'dense' };
  }
  // Gated: candidate edges from a grid of cell size max(radius, 1).
  const cell = Math.max(radius, 1);
  const grid = new Map<string, number[]>();
  for (let j = 0; j < nB; j++) {
    const key = `${Math.floor(b.x[j] / cell)},${Math.floor(b.y[j] / cell)}`;
    let list = grid.get(key);
    if (!list) grid.set(key, (list = []));
    list.push(j);
  }
  const ea: number[] = [];
  const eb: number[] = [];
  const ec: number[] = [];
  for (let i = 0; i < nA; i++) {
    const cx = Math.floor(a.x[i] / cell);
    const cy = Math.floor(a.y[i] / cell);
    for (let dy = -1; dy <= 1; dy++) {
      for (let dx = -1; dx <= 1; dx++) {
        const list = grid.get(`${cx + dx},${cy + dy}`);
        if (!list) continue;
        for (const j of list) {
          const dx = a.x[i] - b.x[j];
          const dy = a.y[i] - b.y[j];
          const d = Math.sqrt(dx * dx + dy * dy);
          if (d <= radius) {
            ea.push(i);
            eb.push(j);
            ec.push(d);
          }
        }
      }
    }
  }
  const matchA = sparseAssignment({
    nA,
    nB,
    a: Int32Array.from(ea),
    b: Int32Array.from(eb),
    cost: Float64Array.from(ec),
    // Larger than any assignment of within-radius pairs, so the count of pairs is maximised first.
    missingCost: radius * (Math.min(nA, nB) + 1) + 1,
  });
  for (let i = 0; i < nA; i++) {
    if (matchA[i] >= 0) {
      aToB[i] = matchA[i];
      paired++;
    }
  }
  return { aToB, pairedCount: paired, mode: 'gated' };
}

/**
 * Detection and classification counts, summable across images (HoVer-Net pools all images'
 * pairs before computing the scores). Class index -1 means unknown; for the ground truth it marks
 * a nucleus whose type was not annotated (HoVer-Net's non-exhaustive `-1`).
 */
export interface DetectionCounts {
  tp: number;
  fp: number;
  fn: number;
  numClasses: number;
  /** Paired nuclei by (true class + 1) * (K + 1) + (predicted class + 1). */
  paired: number[];
  /** Unpaired ground truth (FN) by class + 1. */
  unpairedGt: number[];
  /** Unpaired predictions (FP) by class + 1. */
  unpairedPred: number[];
}

export function emptyDetectionCounts(numClasses: number): DetectionCounts {
  const k1 = numClasses + 1;
  return {
    tp: 0,
    fp: 0,
    fn: 0,
    numClasses,
    paired: new Array<number>(k1 * k1).fill(0),
    unpairedGt: new Array<number>(k1).fill(0),
    unpairedPred: new Array<number>(k1).fill(0),
  };
}

function classSlot(c: number | undefined, numClasses: number): number {
  return c !== undefined && c >= 0 && c < numClasses ? c + 1 : 0;
}

/** Counts of one image from a pairing of its ground-truth (A) and predicted (B) centroids. */
export function detectionCounts(
  pairing: CentroidPairing,
  nPred: number,
  numClasses = 0,
  gtClass?: ArrayLike<number>,
  predClass?: ArrayLike<number>,
): DetectionCounts {
  const counts = emptyDetectionCounts(numClasses);
  const k1 = numClasses + 1;
  const predPaired = new Uint8Array(nPred);
  for (let i = 0; i < pairing.aToB.length; i++) {
    const j = pairing.aToB[i];
    const t = classSlot(gtClass?.[i], numClasses);
    if (j >= 0) {
      predPaired[j] = 1;
      counts.tp++;
      counts.paired[t * k1 + classSlot(predClass?.[j], numClasses)]++;
    } else {
      counts.fn++;
      counts.unpairedGt[t]++;
    }
  }
  for (let j = 0; j < nPred; j++) {
    if (!predPaired[j]) {
      counts.fp++;
      counts.unpairedPred[classSlot(predClass?.[j], numClasses)]++;
    }
  }
  return counts;
}

export function addDetectionCounts(into: DetectionCounts, add: DetectionCounts): DetectionCounts {
  if (into.numClasses !== add.numClasses) throw new RangeError('cannot add detection counts of different class counts');
  into.tp += add.tp;
  into.fp += add.fp;
  into.fn += add.fn;
  for (let k = 0; k < into.paired.length; k++) into.paired[k] += add.paired[k];
  for (let k = 0; k < into.unpairedGt.length; k++) {
    into.unpairedGt[k] += add.unpairedGt[k];
    into.unpairedPred[k] += add.unpairedPred[k];
  }
  return into;
}

export interface DetectionScores {
  /** F1d = 2 TP / (2 TP + FP + FN). */
  f1: number;
  precision: number;
  recall: number;
  /** Fraction of paired nuclei (with annotated type) whose predicted class is right. */
  typeAccuracy: number;
  /** F1 of each class; NaN for a class absent from the ground truth. */
  perClassF1: number[];
}

/**
 * Scores from (pooled) counts. Per class c, following HoVer-Net's `_f1_type` with w = [2, 2, 1, 1]:
 *
 *   F1_c = 2 TP_c / (2 TP_c + 2 FP_c + 2 FN_c + FPd_c + FNd_c)
 *
 * TP_c: paired, true c, predicted c. FP_c: paired, true another annotated class, predicted c.
 * FN_c: paired, true c, predicted another class. FPd_c / FNd_c: unpaired predictions /
 * unpaired ground truth of class c. (HoVer-Net's formula also has TN_c in the numerator and
 * denominator, but it counts TN_c only among pairs where the true or the predicted class is c,
 * so TN_c is always 0 there; it is left out here.) Paired ground truth of unknown type (-1) is
 * left out of FP_c and of the type accuracy, as HoVer-Net's non-exhaustive mode does.
 * A class is scored when it occurs in the ground truth (HoVer-Net's default type list).
 */
export function detectionScores(c: DetectionCounts): DetectionScores {
  const k = c.numClasses;
  const k1 = k + 1;
  const f1 = 2 * c.tp + c.fp + c.fn > 0 ? (2 * c.tp) / (2 * c.tp + c.fp + c.fn) : NaN;
  const precision = c.tp + c.fp > 0 ? c.tp / (c.tp + c.fp) : NaN;
  const recall = c.tp + c.fn > 0 ? c.tp / (c.tp + c.fn) : NaN;
  let correct = 0;
  let labelled = 0;
  for (let t = 1; t < k1; t++) {
    for (let p = 0; p < k1; p++) {
      labelled += c.paired[t * k1 + p];
      if (p === t) correct += c.paired[t * k1 + p];
    }
  }
  const typeAccuracy = labelled > 0 ? correct / labelled : NaN;
  const perClassF1: number[] = [];
  for (let cls = 0; cls < k; cls++) {
    const s = cls + 1;
    let tpC = 0;
    let fpC = 0;
    let fnC = 0;
    let nGt = c.unpairedGt[s];
    for (let p = 0; p < k1; p++) {
      const v = c.paired[s * k1 + p];
      nGt += v;
      if (p === s) tpC += v;
      else fnC += v;
    }
    for (let t = 1; t < k1; t++) if (t !== s) fpC += c.paired[t * k1 + s];
    const denom = 2 * tpC + 2 * fpC + 2 * fnC + c.unpairedPred[s] + c.unpairedGt[s];
    perClassF1.push(nGt > 0 && denom > 0 ? (2 * tpC) / denom : NaN);
  }
  return { f1, precision, recall, typeAccuracy, perClassF1 };
}
