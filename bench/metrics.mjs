// Benchmark of the evaluation metrics: a synthetic 1000x1000 tile with about 1000 nuclei and a
// perturbed prediction (shifted, grown, split, merged, missed and spurious nuclei), scored many
// times; prints the median (and min) milliseconds of each metric and of a full scoreImage.
//
//   npm run build && node bench/metrics.mjs [--size 1000] [--reps 15] [--json]

import { createRequire } from 'node:module';
import { parseArgs } from 'node:util';

const require = createRequire(import.meta.url);
const { metrics } = require('../packages/nuclei/dist/index.js');

const { values: args } = parseArgs({
  options: {
    size: { type: 'string', default: '1000' },
    reps: { type: 'string', default: '15' },
    json: { type: 'boolean', default: false },
  },
});
const SIZE = Number(args.size);
const REPS = Number(args.reps);
const CLASSES = 4;

let seed = 20240601;
const rand = () => (seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648;

/** Ellipses on a jittered grid (spacing 31 px -> ~1000 nuclei on 1000x1000), later ones on top. */
function syntheticGroundTruth(size) {
  const data = new Uint16Array(size * size);
  const classes = new Map();
  const spacing = 31;
  let id = 0;
  for (let gy = spacing / 2; gy < size; gy += spacing) {
    for (let gx = spacing / 2; gx < size; gx += spacing) {
      id++;
      classes.set(id, Math.floor(rand() * CLASSES));
      const cx = gx + (rand() - 0.5) * 10;
      const cy = gy + (rand() - 0.5) * 10;
      const a = 5 + rand() * 7;
      const b = 4 + rand() * 5;
      const t = rand() * Math.PI;
      const [c, s] = [Math.cos(t), Math.sin(t)];
      const r = Math.ceil(Math.max(a, b));
      for (let y = Math.max(0, Math.floor(cy - r)); y <= Math.min(size - 1, Math.ceil(cy + r)); y++) {
        for (let x = Math.max(0, Math.floor(cx - r)); x <= Math.min(size - 1, Math.ceil(cx + r)); x++) {
          const u = ((x - cx) * c + (y - cy) * s) / a;
          const v = (-(x - cx) * s + (y - cy) * c) / b;
          if (u * u + v * v <= 1) data[y * size + x] = id;
        }
      }
    }
  }
  return { label: { width: size, height: size, data }, classes, count: id };
}

/** Prediction: 8% missed, 10% shifted 1-3 px, 8% split, 10% grown by a pixel, merges, spurious blobs; ids scrambled. */
function perturb(gt, gtClasses, count) {
  const { width: W, height: H, data: g } = gt;
  const p = new Uint32Array(W * H);
  const pix = Array.from({ length: count + 1 }, () => []);
  for (let i = 0; i < g.length; i++) if (g[i]) pix[g[i]].push(i);
  const predClasses = new Map();
  let next = 1;
  const newId = (c) => {
    const id = next++ * 7 + 3;
    predClasses.set(id, c);
    return id;
  };
  for (let id = 1; id <= count; id++) {
    const px = pix[id];
    if (px.length === 0) continue;
    const c = rand() < 0.85 ? gtClasses.get(id) : Math.floor(rand() * CLASSES);
    const r = rand();
    if (r < 0.08) continue;
    if (r < 0.18) {
      const sx = Math.round((rand() - 0.5) * 6);
      const sy = Math.round((rand() - 0.5) * 6);
      const nid = newId(c);
      for (const i of px) {
        const x = (i % W) + sx;
        const y = Math.floor(i / W) + sy;
        if (x >= 0 && y >= 0 && x < W && y < H) p[y * W + x] = nid;
      }
      continue;
    }
    if (r < 0.26) {
      const cx = px.reduce((s, i) => s + (i % W), 0) / px.length;
      const a = newId(c);
      const b = newId(c);
      for (const i of px) p[i] = i % W < cx ? a : b;
      continue;
    }
    const nid = newId(c);
    for (const i of px) p[i] = nid;
    if (r < 0.36) {
      for (const i of px) for (const d of [1, -1, W, -W]) if (p[i + d] === 0 && g[i + d] === 0) p[i + d] = nid;
    }
  }
  for (let f = 0; f < count * 0.05; f++) {
    const x0 = Math.floor(rand() * (W - 12));
    const y0 = Math.floor(rand() * (H - 12));
    const nid = newId(Math.floor(rand() * CLASSES));
    for (let y = y0; y < y0 + 9; y++) for (let x = x0; x < x0 + 9; x++) if (!p[y * W + x]) p[y * W + x] = nid;
  }
  return { label: { width: W, height: H, data: p }, classes: predClasses };
}

function time(fn) {
  const samples = [];
  for (let k = 0; k < 3; k++) fn(); // warm-up
  for (let k = 0; k < REPS; k++) {
    const t0 = process.hrtime.bigint();
    fn();
    samples.push(Number(process.hrtime.bigint() - t0) / 1e6);
  }
  samples.sort((a, b) => a - b);
  return { median: samples[Math.floor(samples.length / 2)], min: samples[0] };
}

const gt = syntheticGroundTruth(SIZE);
const pred = perturb(gt.label, gt.classes, gt.count);
const ov = metrics.computeOverlap(gt.label, pred.label);
const gtClass = Int32Array.from(ov.gt.ids, (id) => gt.classes.get(id));
const predClass = Int32Array.from(ov.pred.ids, (id) => pred.classes.get(id));
const pts = (s) => ({ x: s.cx, y: s.cy });

const rows = [
  ['overlap table (one pass)', () => metrics.computeOverlap(gt.label, pred.label)],
  ['PQ / DQ / SQ', () => metrics.panopticQuality(ov, 0.5)],
  ['PQ at IoU 0.3 (Munkres)', () => metrics.panopticQuality(ov, 0.3)],
  [`per-class PQ (${CLASSES} classes)`, () => metrics.perClassPqCounts(ov, gtClass, predClass, CLASSES)],
  ['AJI', () => metrics.aggregatedJaccardIndex(ov)],
  ['AJI+ (Munkres)', () => metrics.aggregatedJaccardIndexPlus(ov)],
  ['Dice', () => metrics.foregroundDice(ov)],
  ['Dice2 (ensemble)', () => metrics.ensembleDice(ov)],
  ['centroid pairing, dense (HoVer-Net)', () => metrics.pairCentroids(pts(ov.gt), pts(ov.pred), 12, 'dense')],
  ['centroid pairing, gated', () => metrics.pairCentroids(pts(ov.gt), pts(ov.pred), 12, 'gated')],
  [
    'scoreImage total (all of the above, classes)',
    () => metrics.scoreImage({ gt: gt.label, pred: pred.label, gtClasses: gt.classes, predClasses: pred.classes }, { numClasses: CLASSES }),
  ],
  ['scoreImage total (no classes)', () => metrics.scoreImage({ gt: gt.label, pred: pred.label })],
].map(([name, fn]) => ({ name, ...time(fn) }));

const score = metrics.scoreImage({ gt: gt.label, pred: pred.label, gtClasses: gt.classes, predClasses: pred.classes }, { numClasses: CLASSES });
if (args.json) {
  console.log(JSON.stringify({ size: SIZE, reps: REPS, nGt: ov.gt.ids.length, nPred: ov.pred.ids.length, pairs: ov.pairGt.length, rows }));
} else {
  console.log(
    `metrics benchmark: ${SIZE}x${SIZE}, ${ov.gt.ids.length} GT nuclei, ${ov.pred.ids.length} predicted, ` +
      `${ov.pairGt.length} intersecting pairs; median of ${REPS} (node ${process.version})`,
  );
  console.log(
    `scores: PQ ${score.pq.pq.toFixed(4)}, AJI ${score.aji.toFixed(4)}, AJI+ ${score.ajiPlus.toFixed(4)}, ` +
      `Dice ${score.dice.toFixed(4)}, Dice2 ${score.dice2.toFixed(4)}, F1d ${score.detectionF1.toFixed(4)}, mPQ ${score.classes.mpq.toFixed(4)}`,
  );
  const w = Math.max(...rows.map((r) => r.name.length));
  console.log(`${'metric'.padEnd(w)}  median ms     min ms`);
  for (const r of rows) console.log(`${r.name.padEnd(w)}  ${r.median.toFixed(2).padStart(9)}  ${r.min.toFixed(2).padStart(9)}`);
}
