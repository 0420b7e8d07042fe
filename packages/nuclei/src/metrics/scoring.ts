// Scoring one image with every metric, and aggregating images into dataset scores.
//
// Averaging, spelled out (the literature mixes these up):
//
// Per image (`ImageScore`): PQ/DQ/SQ, AJI, AJI+, Dice, ensemble Dice, detection counts, and with
// classes the per-class PQ (NaN for a class with no ground-truth nucleus in that image: PanNuke
// leaves such a class out for that image) and the image's mPQ = mean of its non-NaN class PQs.
//
// Dataset (`DatasetScore`):
// - perImageMean: the mean over images of each per-image value, NaN (undefined) images left out.
//   This is how HoVer-Net's `compute_stats.py` averages PQ/DQ/SQ/AJI/AJI+/Dice, and how
//   PanNuke averages bPQ and mPQ. `bpq` follows PanNuke: an image whose ground truth is empty is
//   left out of bPQ (its false positives are not counted); `pq` follows HoVer-Net's
//   `get_fast_pq`: such an image scores 0 when it has predictions (NaN only when both are empty).
//   `mpq` = mean over images of the image mPQ; `perClassPq[c]` = mean over images of PQ_c (the
//   "class metric" of PanNuke's `run.py`).
// - grouped (only when images have groups, e.g. tissue type): PanNuke's headline numbers: within
//   each group the mean over its images, then the mean over groups (of bPQ and of image mPQ).
// - pooled: TP, FP, FN and summed IoU added over all images before computing PQ (one matching
//   per image, one score per dataset; CoNIC's "PQ+" / "mPQ+"). `pooled.perClass[c]` is PQ_c from
//   class c's pooled counts (NaN when class c has no ground truth anywhere) and `pooled.mpq`
//   their mean. Pooled values weight every nucleus equally; per-image means weight every image
//   equally, so the two differ whenever images hold different numbers of nuclei.
// - detection: HoVer-Net pools all images' centroid pairs, then computes F1d, precision,
//   recall, type accuracy and per-class F1 once (see detection.ts).

import { aggregatedJaccardIndex, aggregatedJaccardIndexPlus } from './aji';
import {
  addDetectionCounts,
  DEFAULT_PAIRING_RADIUS,
  DetectionCounts,
  detectionCounts,
  detectionScores,
  DetectionScores,
  emptyDetectionCounts,
  pairCentroids,
  PairingMode,
} from './detection';
import { ensembleDice, foregroundDice } from './dice';
import { computeOverlap, LabelImage } from './labels';
import { panopticQuality, PqCounts, perClassPqCounts, pqFromCounts, PqResult } from './pq';

/** Class of each instance by label id; a missing id has unknown class (-1). */
export type ClassLookup = ReadonlyMap<number, number> | Readonly<Record<string, number>> | ((id: number) => number | undefined);

export interface ScoreOptions {
  /** IoU above which a predicted and a true nucleus match for PQ (default 0.5). */
  matchIou?: number;
  /** Centroid pairing radius in pixels for detection and classification (default 12, at 40x). */
  radius?: number;
  pairing?: PairingMode;
  /** Number of classes; 0 (default) scores no class metrics. */
  numClasses?: number;
}

export interface ImageInput {
  name?: string;
  /** Group for PanNuke-style averaging (tissue type, source dataset...). */
  group?: string;
  gt: LabelImage;
  pred: LabelImage;
  gtClasses?: ClassLookup;
  predClasses?: ClassLookup;
}

export interface ImageClassScore {
  nGt: number[];
  nPred: number[];
  counts: PqCounts[];
  /** PQ of each class; NaN for a class absent from this image's ground truth. */
  pq: number[];
  /** Mean of the non-NaN class PQs; NaN when the ground truth has no nucleus of a known class. */
  mpq: number;
}

export interface ImageScore {
  name: string;
  group?: string;
  width: number;
  height: number;
  nGt: number;
  nPred: number;
  /** All nuclei as one class, HoVer-Net's get_fast_pq (NaN only when both maps are empty). */
  pq: PqResult;
  /** PanNuke's per-image bPQ: the PQ above, NaN when the ground truth is empty. */
  bpq: number;
  aji: number;
  ajiPlus: number;
  dice: number;
  dice2: number;
  detection: DetectionCounts;
  detectionF1: number;
  pairingMode: 'dense' | 'gated';
  classes?: ImageClassScore;
}

function lookupFn(lookup: ClassLookup | undefined): (id: number) => number {
  if (!lookup) return () => -1;
  if (typeof lookup === 'function') return (id) => lookup(id) ?? -1;
  if (lookup instanceof Map) return (id) => lookup.get(id) ?? -1;
  const record = lookup as Readonly<Record<string, number>>;
  return (id) => {
    const v = record[String(id)];
    return typeof v === 'number' && Number.isInteger(v) ? v : -1;
  };
}

function classesOf(ids: Float64Array, lookup: ClassLookup | undefined, numClasses: number): Int32Array {
  const fn = lookupFn(lookup);
  return Int32Array.from(ids, (id) => {
    const c = fn(id);
    return c >= 0 && c < numClasses ? c : -1;
  });
}

export function nanMean(values: ArrayLike<number>): number {
  let s = 0;
  let n = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (!Number.isNaN(v)) {
      s += v;
      n++;
    }
  }
  return n > 0 ? s / n : NaN;
}

/** Scores one image with every metric from a single pass over its pixels. */
export function scoreImage(input: ImageInput, options: ScoreOptions = {}): ImageScore {
  const matchIou = options.matchIou ?? 0.5;
  const radius = options.radius ?? DEFAULT_PAIRING_RADIUS;
  const numClasses = options.numClasses ?? 0;
  const ov = computeOverlap(input.gt, input.pred);
  const { match: _match, ...pq } = panopticQuality(ov, matchIou);
  const nGt = ov.gt.area.length;
  const nPred = ov.pred.area.length;
  const pairing = pairCentroids({ x: ov.gt.cx, y: ov.gt.cy }, { x: ov.pred.cx, y: ov.pred.cy }, radius, options.pairing);
  let gtClass: Int32Array | undefined;
  let predClass: Int32Array | undefined;
  let classes: ImageClassScore | undefined;
  if (numClasses > 0) {
    gtClass = classesOf(ov.gt.ids, input.gtClasses, numClasses);
    predClass = classesOf(ov.pred.ids, input.predClasses, numClasses);
    const pc = perClassPqCounts(ov, gtClass, predClass, numClasses, matchIou);
    const classPq = pc.counts.map((c, k) => (pc.nGt[k] > 0 ? pqFromCounts(c).pq : NaN));
    classes = { ...pc, pq: classPq, mpq: nanMean(classPq) };
  }
  const detection = detectionCounts(pairing, nPred, numClasses, gtClass, predClass);
  return {
    name: input.name ?? '',
    group: input.group,
    width: ov.width,
    height: ov.height,
    nGt,
    nPred,
    pq,
    bpq: nGt > 0 ? pq.pq : NaN,
    aji: aggregatedJaccardIndex(ov),
    ajiPlus: aggregatedJaccardIndexPlus(ov),
    dice: foregroundDice(ov),
    dice2: ensembleDice(ov),
    detection,
    detectionF1: detectionScores(detection).f1,
    pairingMode: pairing.mode,
    classes,
  };
}

export interface PerImageMeans {
  pq: number;
  dq: number;
  sq: number;
  bpq: number;
  aji: number;
  ajiPlus: number;
  dice: number;
  dice2: number;
  mpq?: number;
  perClassPq?: number[];
}

export interface GroupScore {
  name: string;
  images: number;
  bpq: number;
  mpq?: number;
}

export interface DatasetScore {
  images: number;
  numClasses: number;
  nGt: number;
  nPred: number;
  perImageMean: PerImageMeans;
  pooled: PqResult & { mpq?: number; perClass?: PqResult[] };
  groups?: GroupScore[];
  grouped?: { bpq: number; mpq?: number };
  detection: DetectionScores & { tp: number; fp: number; fn: number };
}

/** Aggregates image scores (all scored with the same options) into dataset scores. */
export function aggregateScores(images: readonly ImageScore[]): DatasetScore {
  const numClasses = images.find((im) => im.classes)?.classes?.pq.length ?? 0;
  const withClasses = numClasses > 0 && images.every((im) => im.classes?.pq.length === numClasses);
  const mean = (f: (im: ImageScore) => number) => nanMean(images.map(f));
  const perImageMean: PerImageMeans = {
    pq: mean((im) => im.pq.pq),
    dq: mean((im) => im.pq.dq),
    sq: mean((im) => im.pq.sq),
    bpq: mean((im) => im.bpq),
    aji: mean((im) => im.aji),
    ajiPlus: mean((im) => im.ajiPlus),
    dice: mean((im) => im.dice),
    dice2: mean((im) => im.dice2),
  };
  const pooledCounts: PqCounts = { tp: 0, fp: 0, fn: 0, sumIou: 0 };
  const det = emptyDetectionCounts(withClasses ? numClasses : 0);
  for (const im of images) {
    pooledCounts.tp += im.pq.tp;
    pooledCounts.fp += im.pq.fp;
    pooledCounts.fn += im.pq.fn;
    pooledCounts.sumIou += im.pq.sumIou;
    addDetectionCounts(det, withClasses ? im.detection : stripClasses(im.detection));
  }
  const pooled: DatasetScore['pooled'] = pqFromCounts(pooledCounts);
  if (withClasses) {
    perImageMean.mpq = mean((im) => im.classes!.mpq);
    perImageMean.perClassPq = Array.from({ length: numClasses }, (_, c) => mean((im) => im.classes!.pq[c]));
    const perClass: PqResult[] = [];
    for (let c = 0; c < numClasses; c++) {
      const sum: PqCounts = { tp: 0, fp: 0, fn: 0, sumIou: 0 };
      let nGt = 0;
      for (const im of images) {
        const k = im.classes!.counts[c];
        sum.tp += k.tp;
        sum.fp += k.fp;
        sum.fn += k.fn;
        sum.sumIou += k.sumIou;
        nGt += im.classes!.nGt[c];
      }
      const r = pqFromCounts(sum);
      perClass.push(nGt > 0 ? r : { ...r, dq: NaN, sq: NaN, pq: NaN });
    }
    pooled.perClass = perClass;
    pooled.mpq = nanMean(perClass.map((r) => r.pq));
  }
  const result: DatasetScore = {
    images: images.length,
    numClasses: withClasses ? numClasses : 0,
    nGt: images.reduce((s, im) => s + im.nGt, 0),
    nPred: images.reduce((s, im) => s + im.nPred, 0),
    perImageMean,
    pooled,
    detection: { tp: det.tp, fp: det.fp, fn: det.fn, ...detectionScores(det) },
  };
  if (images.some((im) => im.group !== undefined)) {
    const byGroup = new Map<string, ImageScore[]>();
    for (const im of images) {
      const g = im.group ?? '';
      let list = byGroup.get(g);
      if (!list) byGroup.set(g, (list = []));
      list.push(im);
    }
    result.groups = [...byGroup.entries()]
      .sort((a, b) => a[0].localeCompare(b[0]))
      .map(([name, list]) => ({
        name,
        images: list.length,
        bpq: nanMean(list.map((im) => im.bpq)),
        ...(withClasses ? { mpq: nanMean(list.map((im) => im.classes!.mpq)) } : {}),
      }));
    result.grouped = {
      bpq: nanMean(result.groups.map((g) => g.bpq)),
      ...(withClasses ? { mpq: nanMean(result.groups.map((g) => g.mpq!)) } : {}),
    };
  }
  return result;
}

function stripClasses(c: DetectionCounts): DetectionCounts {
  const out = emptyDetectionCounts(0);
  out.tp = c.tp;
  out.fp = c.fp;
  out.fn = c.fn;
  out.paired[0] = c.tp;
  out.unpairedGt[0] = c.fn;
  out.unpairedPred[0] = c.fp;
  return out;
}
