import { promises as fs } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  formatScoreReport,
  LabelImage,
  listSamples,
  matchTaxonomy,
  readLabelPng,
  readSampleMeta,
  scoreDirectories,
  writeLabelPng,
  writeScoreReport,
} from '../src/metrics';

function boxes(width: number, height: number, rects: [number, number, number, number, number][]): LabelImage {
  const data = new Uint16Array(width * height);
  for (const [id, x0, y0, w, h] of rects) {
    for (let y = y0; y < y0 + h; y++) for (let x = x0; x < x0 + w; x++) data[y * width + x] = id;
  }
  return { width, height, data };
}

let dir: string;

async function writeSample(sub: string, name: string, label: LabelImage, meta: object) {
  await fs.mkdir(path.join(dir, sub), { recursive: true });
  await writeLabelPng(path.join(dir, sub, `${name}.labels.png`), label);
  await fs.writeFile(path.join(dir, sub, `${name}.json`), JSON.stringify(meta));
}

const CLASS_NAMES = ['non-tumor', 'tumor'];

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'cfrsam-metrics-'));
  // Image a_1: three nuclei, predicted exactly, with one class wrong.
  const a = boxes(48, 32, [
    [1, 2, 2, 6, 6],
    [2, 20, 2, 6, 6],
    [300, 36, 20, 6, 6],
  ]);
  await writeSample('gt', 'a_1', a, { classNames: CLASS_NAMES, instances: 3, classes: { '1': 0, '2': 1, '300': 1 } });
  await writeSample('pred', 'a_1', a, { classNames: ['Tumor', 'non-tumor'], classes: { '1': 1, '2': 1, '300': 0 } });
  // Image b_10: one nucleus split in two by the prediction (IoU 0.75 and 0.25).
  const b = boxes(48, 32, [[7, 10, 10, 8, 4]]);
  const bPred = boxes(48, 32, [
    [3, 10, 10, 6, 4],
    [9, 16, 10, 2, 4],
  ]);
  await writeSample('gt', 'b_10', b, { classNames: CLASS_NAMES, instances: 1, classes: { '7': 0 } });
  await writeSample('pred', 'b_10', bPred, { classNames: ['Tumor', 'non-tumor'], classes: { '3': 0, '9': 0 } });
  // b_2 has no prediction.
  await writeSample('gt', 'b_2', b, { classNames: CLASS_NAMES, instances: 1, classes: { '7': 0 } });
});

afterAll(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

describe('label PNG and sample files', () => {
  it('round-trips 16-bit label maps exactly', async () => {
    const label = { width: 5, height: 3, data: Uint16Array.from({ length: 15 }, (_, i) => (i * 4679) % 65536) };
    const file = path.join(dir, 'rt.labels.png');
    await writeLabelPng(file, label);
    const back = await readLabelPng(file);
    expect([back.width, back.height]).toEqual([5, 3]);
    expect(Array.from(back.data)).toEqual(Array.from(label.data));
    await writeLabelPng(file, { width: 2, height: 1, data: Uint32Array.from([3, 65535]) });
    expect(Array.from((await readLabelPng(file)).data)).toEqual([3, 65535]);
    await expect(writeLabelPng(file, { width: 1, height: 1, data: Uint32Array.from([70000]) })).rejects.toThrow(/16-bit/);
  });

  it('lists samples in natural order and reads metadata, rejecting malformed class files', async () => {
    expect(await listSamples(path.join(dir, 'gt'))).toEqual(['a_1', 'b_2', 'b_10']);
    expect((await readSampleMeta(path.join(dir, 'gt', 'a_1.json')))!.classes).toEqual({ '1': 0, '2': 1, '300': 1 });
    expect(await readSampleMeta(path.join(dir, 'gt', 'missing.json'))).toBeUndefined();
    const bad = path.join(dir, 'bad.json');
    await fs.writeFile(bad, '{"classes": {"1": "tumor"}}');
    await expect(readSampleMeta(bad)).rejects.toThrow(/class of instance 1 is not an integer/);
    await fs.writeFile(bad, '{nope');
    await expect(readSampleMeta(bad)).rejects.toThrow(/invalid JSON/);
  });

  it('matches taxonomies by name, in any order and case', () => {
    expect(matchTaxonomy(['other', 'tumor'], ['Tumor', 'other '])).toEqual({ ok: true, predToGt: [1, 0] });
    const bad = matchTaxonomy(['non-tumor', 'tumor'], ['other', 'inflammatory', 'epithelial', 'spindle-shaped']);
    expect(bad.ok).toBe(false);
    expect(!bad.ok && bad.reason).toMatch(/not predicted: non-tumor, tumor/);
  });
});

describe('scoreDirectories', () => {
  it('fails naming the images without predictions, or scores them as empty', async () => {
    await expect(scoreDirectories(path.join(dir, 'gt'), path.join(dir, 'pred'))).rejects.toThrow(/no prediction .* b_2/);
    const run = await scoreDirectories(path.join(dir, 'gt'), path.join(dir, 'pred'), { missing: 'empty' });
    expect(run.images.map((im) => im.name)).toEqual(['a_1', 'b_2', 'b_10']);
    expect(run.images[1].nPred).toBe(0);
    expect(run.images[1].pq.pq).toBe(0);
    expect(run.notes.join()).toMatch(/1 image\(s\) have no prediction/);
  });

  it('scores every metric per image and for the dataset, with classes translated by name', async () => {
    const gtDir = path.join(dir, 'gt-two');
    await fs.mkdir(gtDir, { recursive: true });
    for (const n of ['a_1', 'b_10']) {
      for (const ext of ['.labels.png', '.json']) await fs.copyFile(path.join(dir, 'gt', n + ext), path.join(gtDir, n + ext));
    }
    const run = await scoreDirectories(gtDir, path.join(dir, 'pred'), { classes: true, groupRegex: /^([a-z])_/ });
    expect(run.classNames).toEqual(CLASS_NAMES);
    expect(run.options.classes).toBe(true);
    const [a, b] = run.images;
    expect([a.pq.pq, a.aji, a.ajiPlus, a.dice, a.dice2, a.detectionF1]).toEqual([1, 1, 1, 1, 1, 1]);
    // a_1 classes: GT [0, 1, 1], predicted (translated) [0, 0, 1].
    expect(a.classes!.pq[0]).toBeCloseTo(2 / 3, 12);
    expect(a.classes!.pq[1]).toBeCloseTo(2 / 3, 12);
    // b_10: split nucleus (see metrics.test.ts): PQ 0.5, AJI 0.6, Dice2 2/3.
    expect(b.pq.pq).toBeCloseTo(0.5, 12);
    expect(b.aji).toBeCloseTo(0.6, 12);
    expect(b.dice2).toBeCloseTo(2 / 3, 12);
    expect(b.classes!.pq[0]).toBe(0); // both pieces predicted tumor
    expect(b.classes!.pq[1]).toBeNaN();
    expect(run.dataset.perImageMean.pq).toBeCloseTo(0.75, 12);
    expect(run.dataset.groups!.map((g) => g.name)).toEqual(['a', 'b']);

    const text = formatScoreReport(run);
    expect(text).toMatch(/^image\s+GT\s+pred\s+PQ/m);
    expect(text).toMatch(/^b_10\s+1\s+2\s+0\.5000/m);
    expect(text).toMatch(/^mPQ pooled/m);
    expect(text).toMatch(/^non-tumor\s+2\s+2/m);

    const out = path.join(dir, 'report');
    const files = await writeScoreReport(out, run, { gt: gtDir });
    expect(files.map((f) => path.basename(f)).sort()).toEqual(['groups.csv', 'per_class.csv', 'per_image.csv', 'scores.json', 'summary.csv']);
    const json = JSON.parse(await fs.readFile(path.join(out, 'scores.json'), 'utf8'));
    expect(json.images[1].classes.pq[1]).toBeNull(); // NaN is written as null
    expect(json.dataset.detection.tp).toBe(4);
    const csv = await fs.readFile(path.join(out, 'per_image.csv'), 'utf8');
    expect(csv.split('\n')[0]).toBe('image,GT,pred,PQ,DQ,SQ,AJI,AJI+,Dice,Dice2,F1d,mPQ,group');
  });

  it('skips class metrics, saying why, when the taxonomies differ', async () => {
    const predDir = path.join(dir, 'pred-other');
    await writeSample('pred-other', 'a_1', boxes(48, 32, []), { classNames: ['other', 'inflammatory'], classes: {} });
    const gtDir = path.join(dir, 'gt-one');
    await fs.mkdir(gtDir, { recursive: true });
    for (const ext of ['.labels.png', '.json']) await fs.copyFile(path.join(dir, 'gt', 'a_1' + ext), path.join(gtDir, 'a_1' + ext));
    const run = await scoreDirectories(gtDir, predDir, { classes: true });
    expect(run.options.classes).toBe(false);
    expect(run.images[0].classes).toBeUndefined();
    expect(run.notes.join()).toMatch(/class metrics skipped: class names differ/);
    // Empty prediction: PQ, AJI, Dice and F1 are 0.
    const im = run.images[0];
    expect([im.pq.pq, im.aji, im.dice, im.dice2, im.detectionF1]).toEqual([0, 0, 0, 0, 0]);
  });

  it('rejects predictions of another size', async () => {
    const gtDir = path.join(dir, 'gt-one');
    const predDir = path.join(dir, 'pred-small');
    await writeSample('pred-small', 'a_1', boxes(16, 16, []), {});
    await expect(scoreDirectories(gtDir, predDir)).rejects.toThrow(/a_1: prediction is 16x16 but ground truth is 48x32/);
  });
});
