// Aggregated Jaccard Index (Kumar et al. 2017) and AJI+ (Graham et al. 2019).

import { sparseAssignment } from './assignment';
import { Overlap, pairIou, pairUnion } from './labels';

function ajiFromPairs(ov: Overlap, pairs: number[]): number {
  let inter = 0;
  let union = 0;
  const gtPaired = new Uint8Array(ov.gt.area.length);
  const predPaired = new Uint8Array(ov.pred.area.length);
  for (const k of pairs) {
    inter += ov.pairInter[k];
    union += pairUnion(ov, k);
    gtPaired[ov.pairGt[k]] = 1;
    predPaired[ov.pairPred[k]] = 1;
  }
  for (let i = 0; i < gtPaired.length; i++) if (!gtPaired[i]) union += ov.gt.area[i];
  for (let j = 0; j < predPaired.length; j++) if (!predPaired[j]) union += ov.pred.area[j];
  return union > 0 ? inter / union : NaN;
}

/**
 * AJI as distributed with MoNuSeg and as HoVer-Net's `get_fast_aji`: each ground-truth nucleus G
 * is paired with the prediction S of highest IoU among those it touches (a prediction may be
 * paired with several nuclei; ties go to the lowest predicted id). Then
 *
 *   AJI = sum |G ∩ S| / (sum |G ∪ S| + area of unpaired G + area of predictions paired with none)
 *
 * where a prediction paired twice has its area counted in both unions (the over-penalisation AJI+
 * removes). Ground truth touching no prediction is unpaired. Returns NaN when both maps are empty,
 * 0 when only one is.
 */
export function aggregatedJaccardIndex(ov: Overlap): number {
  const best: number[] = [];
  let k = 0;
  const n = ov.pairGt.length;
  while (k < n) {
    const g = ov.pairGt[k];
    let bestK = k;
    // HoVer-Net's argmax is over inter / (union + 1e-6); keep the epsilon so ties break alike.
    let bestScore = ov.pairInter[k] / (pairUnion(ov, k) + 1e-6);
    k++;
    while (k < n && ov.pairGt[k] === g) {
      const s = ov.pairInter[k] / (pairUnion(ov, k) + 1e-6);
      if (s > bestScore) {
        bestScore = s;
        bestK = k;
      }
      k++;
    }
    best.push(bestK);
  }
  return ajiFromPairs(ov, best);
}

/**
 * AJI+ (HoVer-Net's `get_fast_aji_plus`): as AJI, but the pairing is one-to-one, chosen to maximise
 * the summed IoU (Munkres on pairwise IoU, as `linear_sum_assignment(-iou)`); pairs without
 * intersection are unpaired. Returns NaN when both maps are empty, 0 when only one is.
 */
export function aggregatedJaccardIndexPlus(ov: Overlap): number {
  const n = ov.pairGt.length;
  const cost = new Float64Array(n);
  for (let k = 0; k < n; k++) cost[k] = -pairIou(ov, k);
  const matchA = sparseAssignment({
    nA: ov.gt.area.length,
    nB: ov.pred.area.length,
    a: ov.pairGt,
    b: ov.pairPred,
    cost,
    missingCost: 0,
  });
  const pairs: number[] = [];
  for (let k = 0; k < n; k++) if (matchA[ov.pairGt[k]] === ov.pairPred[k]) pairs.push(k);
  return ajiFromPairs(ov, pairs);
}
