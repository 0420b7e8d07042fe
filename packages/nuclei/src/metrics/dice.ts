// Dice coefficients of nuclei segmentation.

import { Overlap } from './labels';

function sum(a: Float64Array): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i];
  return s;
}

/**
 * Foreground Dice (HoVer-Net's `get_dice_1`): 2|T ∩ P| / (|T| + |P|) on the binary masks
 * (every nucleus pixel is foreground). NaN when both maps are empty.
 */
export function foregroundDice(ov: Overlap): number {
  const denom = sum(ov.gt.area) + sum(ov.pred.area);
  return denom > 0 ? (2 * ov.foregroundIntersection) / denom : NaN;
}

/**
 * Ensemble Dice (HoVer-Net's `get_dice_2` / `get_fast_dice_2`, Vu et al. 2019): over every pair
 * of a ground-truth and a predicted nucleus that intersect,
 *
 *   Dice2 = 2 sum |G ∩ S| / sum (|G| + |S|)
 *
 * so a nucleus split in two, or two nuclei merged, is penalised by the pieces' extra area.
 * NaN when both maps are empty. When no pair intersects but some map has nuclei the reference
 * code computes 0/0; we return 0 (nothing was segmented right) so that such images count.
 */
export function ensembleDice(ov: Overlap): number {
  if (ov.gt.area.length === 0 && ov.pred.area.length === 0) return NaN;
  let inter = 0;
  let total = 0;
  for (let k = 0; k < ov.pairGt.length; k++) {
    inter += ov.pairInter[k];
    total += ov.gt.area[ov.pairGt[k]] + ov.pred.area[ov.pairPred[k]];
  }
  return total > 0 ? (2 * inter) / total : 0;
}
