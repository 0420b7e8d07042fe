import { describe, expect, it } from 'vitest';
import {
  aggregatedJaccardIndex,
  aggregatedJaccardIndexPlus,
  aggregateScores,
  computeOverlap,
  detectionCounts,
  detectionScores,
  ensembleDice,
  foregroundDice,
  LabelImage,
  pairCentroids,
  panopticQuality,
  remapLabels,
  scoreImage,
} from '../src/metrics';
import { syntheticPair } from './metrics-synthetic';

/** A label map from rows of space-separated ids. */
function img(rows: string[], type: 'u16' | 'u32' | 'i32' = 'u16'): LabelImage {
  const cells = rows.map((r) => r.trim().split(/\s+/).map(Number));
  const width = cells[0].length;
  const flat = cells.flat();
  const data = type === 'u16' ? Uint16Array.from(flat) : type === 'u32' ? Uint32Array.from(flat) : Int32Array.from(flat);
  return { width, height: cells.length, data };
}

/** A blank map with axis-aligned rectangles [id, x0, y0, w, h]. */
function boxes(width: number, height: number, rects: [number, number, number, number, number][]): LabelImage {
  const data = new Uint16Array(width * height);
  for (const [id, x0, y0, w, h] of rects) {
    for (let y = y0; y < y0 + h; y++) for (let x = x0; x < x0 + w; x++) data[y * width + x] = id;
  }
  return { width, height, data };
}

function allMetrics(gt: LabelImage, pred: LabelImage, matchIou = 0.5) {
  const ov = computeOverlap(gt, pred);
  const pq = panopticQuality(ov, matchIou);
  const pairing = pairCentroids({ x: ov.gt.cx, y: ov.gt.cy }, { x: ov.pred.cx, y: ov.pred.cy }, 12);
  return {
    ov,
    pq,
    aji: aggregatedJaccardIndex(ov),
    ajiPlus: aggregatedJaccardIndexPlus(ov),
    dice: foregroundDice(ov),
    dice2: ensembleDice(ov),
    f1: detectionScores(detectionCounts(pairing, ov.pred.area.length)).f1,
  };
}

describe('overlap table', () => {
  it('remaps non-contiguous ids in id order and finds areas, centroids and intersections in one pass', () => {
    const gt = img(['0 9 9 0', '4 4 0 0', '4 4 0 0']);
    const pred = img(['0 2 2 2', '0 5 0 0', '5 5 0 0']);
    const ov = computeOverlap(gt, pred);
    expect(Array.from(ov.gt.ids)).toEqual([4, 9]);
    expect(Array.from(ov.gt.area)).toEqual([4, 2]);
    expect(ov.gt.cx[0]).toBeCloseTo(1);
    expect(ov.gt.cy[0]).toBeCloseTo(2);
    expect(ov.gt.cx[1]).toBeCloseTo(2);
    expect(ov.gt.cy[1]).toBeCloseTo(0.5);
    expect(Array.from(ov.pred.ids)).toEqual([2, 5]);
    // pairs sorted by gt then pred: (4,5)=3, (9,2)=2
    expect(Array.from(ov.pairGt)).toEqual([0, 1]);
    expect(Array.from(ov.pairPred)).toEqual([1, 0]);
    expect(Array.from(ov.pairInter)).toEqual([3, 2]);
    expect(ov.foregroundIntersection).toBe(5);
  });

  it('gives the same table for 16-bit, 32-bit and signed maps with wide ids', () => {
    const rows = ['0 70000 70000', '3 3 0'];
    const a = computeOverlap(img(rows, 'u32'), img(rows, 'i32'));
    expect(Array.from(a.gt.ids)).toEqual([3, 70000]);
    expect(Array.from(a.pairInter)).toEqual([2, 2]);
    const small = ['0 7 7', '3 3 0'];
    const b = computeOverlap(img(small, 'u16'), img(small, 'i32'));
    expect(Array.from(b.pairInter)).toEqual([2, 2]);
  });

  it('rejects mismatched sizes and negative labels', () => {
    expect(() => computeOverlap(img(['1 1']), img(['1', '1']))).toThrow(/2x1.*1x2/);
    expect(() => computeOverlap(img(['1 -1'], 'i32'), img(['1 1'], 'i32'))).toThrow(/negative label/);
    expect(() => computeOverlap({ width: 3, height: 3, data: new Uint16Array(8) }, img(['0']))).toThrow(/8 pixels/);
  });

  it('remapLabels renumbers 1..N in id order', () => {
    const { label, originalIds } = remapLabels(img(['0 9 9', '4 0 12']));
    expect(Array.from(label.data)).toEqual([0, 2, 2, 1, 0, 3]);
    expect(originalIds).toEqual([0, 4, 9, 12]);
  });
});

describe('metrics on hand-computed cases', () => {
  it('identical maps with non-contiguous ids score 1 everywhere', () => {
    const m = img(['2 2 0 7', '2 2 0 7', '0 0 0 0', '100 100 0 0']);
    const r = allMetrics(m, m);
    expect(r.pq.tp).toBe(3);
    expect([r.pq.dq, r.pq.sq, r.pq.pq, r.aji, r.ajiPlus, r.dice, r.dice2, r.f1]).toEqual([1, 1, 1, 1, 1, 1, 1, 1]);
  });

  it('one prediction covering two nuclei (merge)', () => {
    // GT1 area 6, GT2 area 2; the prediction (area 8) covers both. IoU 0.75 and 0.25.
    const gt = img(['1 1 1 2 0', '1 1 1 2 0']);
    const pred = img(['5 5 5 5 0', '5 5 5 5 0']);
    const r = allMetrics(gt, pred);
    expect([r.pq.tp, r.pq.fp, r.pq.fn]).toEqual([1, 0, 1]);
    expect(r.pq.dq).toBeCloseTo(2 / 3, 12);
    expect(r.pq.sq).toBeCloseTo(0.75, 12);
    expect(r.pq.pq).toBeCloseTo(0.5, 12);
    // AJI: both nuclei pick the merged prediction: (6+2) / (8+8).
    expect(r.aji).toBeCloseTo(0.5, 12);
    // AJI+: one-to-one: 6 / (8 + unpaired GT2 2).
    expect(r.ajiPlus).toBeCloseTo(0.6, 12);
    expect(r.dice).toBe(1);
    // Dice2: 2 (6 + 2) / ((6+8) + (2+8)).
    expect(r.dice2).toBeCloseTo(2 / 3, 12);
    // Centroids 0.5 and 1.5 px from the prediction's: one pair, one miss.
    expect(r.f1).toBeCloseTo(2 / 3, 12);
  });

  it('IoU exactly 0.5 does not match (strictly greater)', () => {
    const gt = img(['1 1 2 2']);
    const pred = img(['5 5 5 5']);
    const r = allMetrics(gt, pred);
    expect([r.pq.tp, r.pq.fp, r.pq.fn, r.pq.pq]).toEqual([0, 1, 2, 0]);
    expect(r.aji).toBeCloseTo(4 / 8, 12);
    // One of the two equal-IoU nuclei is paired: 2 / (4 + 2).
    expect(r.ajiPlus).toBeCloseTo(1 / 3, 12);
  });

  it('one nucleus split in two', () => {
    const gt = img(['1 1 1 1 0', '1 1 1 1 0']);
    const pred = img(['3 3 3 4 0', '3 3 3 4 0']);
    const r = allMetrics(gt, pred);
    expect([r.pq.tp, r.pq.fp, r.pq.fn]).toEqual([1, 1, 0]);
    expect(r.pq.pq).toBeCloseTo((2 / 3) * 0.75, 12);
    // AJI and AJI+: 6 / (8 + unpaired piece 2).
    expect(r.aji).toBeCloseTo(0.6, 12);
    expect(r.ajiPlus).toBeCloseTo(0.6, 12);
    expect(r.dice).toBe(1);
    expect(r.dice2).toBeCloseTo(16 / 24, 12);
    expect(r.f1).toBeCloseTo(2 / 3, 12);
  });

  it('partial overlap plus a false positive; PQ below IoU 0.5 uses Munkres pairing', () => {
    const gt = img(['1 1 0 0 0 0', '1 1 0 0 0 0']);
    const pred = img(['0 7 7 0 9 9', '0 7 7 0 0 9']);
    const r = allMetrics(gt, pred);
    expect([r.pq.tp, r.pq.fp, r.pq.fn, r.pq.pq]).toEqual([0, 2, 1, 0]);
    // AJI: 2 / (6 + unpaired prediction 3).
    expect(r.aji).toBeCloseTo(2 / 9, 12);
    expect(r.ajiPlus).toBeCloseTo(2 / 9, 12);
    expect(r.dice).toBeCloseTo(4 / 11, 12);
    expect(r.dice2).toBeCloseTo(0.5, 12);
    expect(r.f1).toBeCloseTo(2 / 3, 12);
    const low = panopticQuality(r.ov, 0.3);
    expect([low.tp, low.fp, low.fn]).toEqual([1, 1, 0]);
    expect(low.sq).toBeCloseTo(1 / 3, 12);
    expect(low.pq).toBeCloseTo(2 / 9, 12);
  });

  it('AJI lets a prediction serve several nuclei; AJI+ pairs one-to-one by maximal total IoU', () => {
    // GT 1 (area 4) and GT 2 (area 4); prediction 5 covers GT1 fully and half of GT2,
    // prediction 6 covers the other half of GT2.
    const gt = img(['1 1 2 2', '1 1 2 2']);
    const pred = img(['5 5 5 6', '5 5 5 6']);
    const r = allMetrics(gt, pred);
    // IoU(1,5)=4/6, IoU(2,5)=2/8, IoU(2,6)=2/4.
    // AJI: GT2 picks 6 (0.5 > 0.25): inter 4+2, union 6+4 => 0.6.
    expect(r.aji).toBeCloseTo(0.6, 12);
    expect(r.ajiPlus).toBeCloseTo(0.6, 12);
    // Now make prediction 6 tiny so that GT2 prefers 5 too.
    const pred2 = img(['5 5 5 5', '5 5 5 6']);
    const r2 = allMetrics(gt, pred2);
    // IoU(1,5)=4/7, IoU(2,5)=3/8, IoU(2,6)=1/4: AJI pairs both with 5:
    // inter 4+3, union 7+8 + unpaired 6 (1) => 7/16.
    expect(r2.aji).toBeCloseTo(7 / 16, 12);
    // AJI+: 1-5 and 2-6 (4/7 + 1/4 > 3/8 alone): inter 4+1, union 7+4 => 5/11.
    expect(r2.ajiPlus).toBeCloseTo(5 / 11, 12);
  });

  it('empty ground truth, empty prediction and both empty', () => {
    const empty = img(['0 0 0', '0 0 0']);
    const one = img(['0 3 3', '0 3 3']);
    const fpOnly = allMetrics(empty, one);
    expect([fpOnly.pq.dq, fpOnly.pq.sq, fpOnly.pq.pq]).toEqual([0, 0, 0]);
    expect([fpOnly.aji, fpOnly.ajiPlus, fpOnly.dice, fpOnly.dice2, fpOnly.f1]).toEqual([0, 0, 0, 0, 0]);
    const fnOnly = allMetrics(one, empty);
    expect([fnOnly.pq.pq, fnOnly.aji, fnOnly.ajiPlus, fnOnly.dice, fnOnly.dice2, fnOnly.f1]).toEqual([0, 0, 0, 0, 0, 0]);
    const none = allMetrics(empty, empty);
    for (const v of [none.pq.dq, none.pq.sq, none.pq.pq, none.aji, none.ajiPlus, none.dice, none.dice2, none.f1]) {
      expect(v).toBeNaN();
    }
    // bPQ (PanNuke) leaves out images with empty ground truth; PQ (HoVer-Net) counts FP-only as 0.
    const s = scoreImage({ gt: empty, pred: one });
    expect(s.pq.pq).toBe(0);
    expect(s.bpq).toBeNaN();
    const agg = aggregateScores([s, scoreImage({ gt: one, pred: one }), scoreImage({ gt: empty, pred: empty })]);
    expect(agg.perImageMean.pq).toBeCloseTo(0.5, 12);
    expect(agg.perImageMean.bpq).toBe(1);
    // Pooled: TP 1, FP 1 => DQ 2/3.
    expect(agg.pooled.pq).toBeCloseTo(2 / 3, 12);
  });
});

describe('classes: mPQ and classification F1', () => {
  // Nuclei are 3x3 squares far apart (> 12 px). Image A: a (class 0) right, b (class 0) predicted
  // as class 1, c (class 1) right. Image B: d (class 1) right, plus a false positive of class 0.
  const W = 40;
  const H = 8;
  const imageA = {
    name: 'A',
    gt: boxes(W, H, [
      [1, 1, 1, 3, 3],
      [2, 15, 1, 3, 3],
      [3, 29, 1, 3, 3],
    ]),
    pred: boxes(W, H, [
      [11, 1, 1, 3, 3],
      [12, 15, 1, 3, 3],
      [13, 29, 1, 3, 3],
    ]),
    gtClasses: { '1': 0, '2': 0, '3': 1 },
    predClasses: new Map([
      [11, 0],
      [12, 1],
      [13, 1],
    ]),
  };
  const imageB = {
    name: 'B',
    gt: boxes(W, H, [[4, 1, 1, 3, 3]]),
    pred: boxes(W, H, [
      [1, 1, 1, 3, 3],
      [2, 29, 1, 3, 3],
    ]),
    gtClasses: { '4': 1 },
    predClasses: (id: number) => (id === 1 ? 1 : 0),
  };
  const opts = { numClasses: 2 };

  it('per image: class PQ with absent classes left out', () => {
    const a = scoreImage(imageA, opts);
    expect(a.classes!.pq[0]).toBeCloseTo(2 / 3, 12);
    expect(a.classes!.pq[1]).toBeCloseTo(2 / 3, 12);
    expect(a.classes!.mpq).toBeCloseTo(2 / 3, 12);
    expect(a.pq.pq).toBe(1);
    const b = scoreImage(imageB, opts);
    expect(b.classes!.pq[0]).toBeNaN(); // no class-0 nucleus in B's ground truth: its FP is ignored
    expect(b.classes!.pq[1]).toBe(1);
    expect(b.classes!.mpq).toBe(1);
  });

  it('dataset: per-image mean, pooled, grouped, detection and HoVer-Net class F1', () => {
    const d = aggregateScores([scoreImage(imageA, opts), scoreImage(imageB, opts)]);
    expect(d.perImageMean.mpq).toBeCloseTo(5 / 6, 12);
    expect(d.perImageMean.perClassPq![0]).toBeCloseTo(2 / 3, 12);
    expect(d.perImageMean.perClassPq![1]).toBeCloseTo(5 / 6, 12);
    expect(d.perImageMean.bpq).toBeCloseTo(5 / 6, 12);
    // Pooled: class 0 TP 1, FP 1, FN 1 => 0.5; class 1 TP 2, FP 1 => 0.8.
    expect(d.pooled.perClass![0].pq).toBeCloseTo(0.5, 12);
    expect(d.pooled.perClass![1].pq).toBeCloseTo(0.8, 12);
    expect(d.pooled.mpq).toBeCloseTo(0.65, 12);
    expect(d.pooled.pq).toBeCloseTo(8 / 9, 12);
    expect([d.detection.tp, d.detection.fp, d.detection.fn]).toEqual([4, 1, 0]);
    expect(d.detection.f1).toBeCloseTo(8 / 9, 12);
    expect(d.detection.precision).toBeCloseTo(0.8, 12);
    expect(d.detection.recall).toBe(1);
    expect(d.detection.typeAccuracy).toBeCloseTo(0.75, 12);
    // F1_0 = 2*1 / (2*1 + 2*0 + 2*1 + 1 + 0); F1_1 = 2*2 / (2*2 + 2*1 + 0 + 0 + 0).
    expect(d.detection.perClassF1[0]).toBeCloseTo(0.4, 12);
    expect(d.detection.perClassF1[1]).toBeCloseTo(2 / 3, 12);
    expect(d.groups).toBeUndefined();
  });

  it('grouped averaging (PanNuke tissues): mean of group means', () => {
    const images = [
      scoreImage({ ...imageA, group: 'x' }, opts),
      scoreImage({ ...imageB, group: 'y' }, opts),
      scoreImage({ ...imageB, name: 'C', group: 'y' }, opts),
    ];
    const d = aggregateScores(images);
    expect(d.perImageMean.mpq).toBeCloseTo(8 / 9, 12);
    expect(d.groups!.map((g) => [g.name, g.images])).toEqual([
      ['x', 1],
      ['y', 2],
    ]);
    expect(d.grouped!.mpq).toBeCloseTo(5 / 6, 12);
    expect(d.grouped!.bpq).toBeCloseTo((1 + 2 / 3) / 2, 12);
  });

  it('unannotated ground-truth types (-1) count for detection but not for FP_c or type accuracy', () => {
    const gt = boxes(W, H, [
      [1, 1, 1, 3, 3],
      [2, 15, 1, 3, 3],
    ]);
    const s = scoreImage({ gt, pred: gt, gtClasses: { '1': 0 }, predClasses: { '1': 0, '2': 1 } }, opts);
    const d = aggregateScores([s]);
    expect(d.detection.f1).toBe(1);
    expect(d.detection.typeAccuracy).toBe(1);
    expect(d.detection.perClassF1[0]).toBe(1);
    expect(d.detection.perClassF1[1]).toBeNaN(); // no annotated class-1 nucleus
  });
});

describe('centroid pairing', () => {
  it('pairs within the radius (inclusive) and drops farther pairs', () => {
    const a = { x: [0, 100], y: [0, 0] };
    const b = { x: [12, 100], y: [0, 12.5] };
    for (const mode of ['dense', 'gated'] as const) {
      const p = pairCentroids(a, b, 12, mode);
      expect(Array.from(p.aToB)).toEqual([0, -1]);
      expect(p.mode).toBe(mode);
    }
  });

  it('dense (HoVer-Net) and gated pairing agree on well-separated random nuclei', () => {
    let seed = 7;
    const rand = () => (seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648;
    const gx: number[] = [];
    const gy: number[] = [];
    for (let i = 0; i < 20; i++)
      for (let j = 0; j < 20; j++) {
        gx.push(i * 25 + rand() * 6);
        gy.push(j * 25 + rand() * 6);
      }
    const px = gx.map((v) => v + (rand() - 0.5) * 14).filter((_, k) => k % 10 !== 3);
    const py = gy.map((v) => v + (rand() - 0.5) * 14).filter((_, k) => k % 10 !== 3);
    const dense = pairCentroids({ x: gx, y: gy }, { x: px, y: py }, 12, 'dense');
    const gated = pairCentroids({ x: gx, y: gy }, { x: px, y: py }, 12, 'gated');
    expect(dense.pairedCount).toBeGreaterThan(300);
    expect(Array.from(gated.aToB)).toEqual(Array.from(dense.aToB));
  });
});

describe('agreement with the reference implementation', () => {
  // Values computed by the reference algorithms (numpy + scipy.optimize.linear_sum_assignment, as
  // in HoVer-Net's stats_utils.py / compute_stats.py and PanNuke's run.py) on the same synthetic
  // images, with centroids as float pixel centres.
  const reference = {
    s1: {
      pq03: 0.8559682473251027,
      pq: 0.8559682473251027,
      dq: 0.9210526315789473,
      sq: 0.9293369542386829,
      aji: 0.8714974121006603,
      ajiPlus: 0.8714974121006603,
      dice: 0.9626168224299065,
      dice2: 0.950560316413975,
      mpq: 0.747180454220716,
    },
    s2: {
      pq03: 0.8214526522716157,
      pq: 0.8123730724247223,
      dq: 0.8780487804878049,
      sq: 0.9252026658170449,
      aji: 0.7949643705463183,
      ajiPlus: 0.7938342967244701,
      dice: 0.9263157894736842,
      dice2: 0.9181305227296923,
      mpq: 0.7624203889088127,
    },
    s3: {
      pq03: 0.8553815440573748,
      pq: 0.8553815440573748,
      dq: 0.9696969696969697,
      sq: 0.8821122173091677,
      aji: 0.8593123209169055,
      ajiPlus: 0.8593123209169055,
      dice: 0.9255663430420712,
      dice2: 0.8926872770511296,
      mpq: 0.8695500536776207,
    },
  };
  const images = [
    ['s1', 128, 20, 1],
    ['s2', 160, 16, 2],
    ['s3', 96, 24, 3],
  ] as const;
  const scores = images.map(([name, size, spacing, seed]) => {
    const s = syntheticPair(size, spacing, 3, seed);
    return scoreImage({ name, ...s }, { numClasses: 3 });
  });

  it('per image: PQ (at IoU 0.5 and 0.3), DQ, SQ, AJI, AJI+, Dice, Dice2, mPQ', () => {
    for (const [name, size, spacing, seed] of images) {
      const s = syntheticPair(size, spacing, 3, seed);
      const got = scores.find((x) => x.name === name)!;
      const ref = reference[name];
      const pq03 = panopticQuality(computeOverlap(s.gt, s.pred), 0.3).pq;
      const pairs: [number, number][] = [
        [pq03, ref.pq03],
        [got.pq.pq, ref.pq],
        [got.pq.dq, ref.dq],
        [got.pq.sq, ref.sq],
        [got.aji, ref.aji],
        [got.ajiPlus, ref.ajiPlus],
        [got.dice, ref.dice],
        [got.dice2, ref.dice2],
        [got.classes!.mpq, ref.mpq],
      ];
      for (const [a, b] of pairs) expect(a).toBeCloseTo(b, 12);
    }
  });

  it('dataset: pooled PQ, per-class PQ, mPQ and HoVer-Net detection / classification', () => {
    const d = aggregateScores(scores);
    expect([d.detection.tp, d.detection.fp, d.detection.fn]).toEqual([144, 18, 8]);
    expect(d.detection.f1).toBeCloseTo(0.9171974522292994, 12);
    expect(d.detection.typeAccuracy).toBeCloseTo(0.9236111111111112, 12);
    [0.7735849056603774, 0.8130081300813008, 0.7850467289719626].forEach((v, c) => expect(d.detection.perClassF1[c]).toBeCloseTo(v, 12));
    expect(d.pooled.pq).toBeCloseTo(0.8274447694193289, 12);
    [0.7668066691836402, 0.78826514998827, 0.7478051060853221].forEach((v, c) => expect(d.pooled.perClass![c].pq).toBeCloseTo(v, 12));
    expect(d.perImageMean.mpq).toBeCloseTo(0.7930502989357165, 12);
    [0.8141603436371345, 0.798969946127371, 0.7660206070426437].forEach((v, c) => expect(d.perImageMean.perClassPq![c]).toBeCloseTo(v, 12));
  });
});
