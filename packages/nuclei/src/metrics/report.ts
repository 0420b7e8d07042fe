// Text tables, CSV and JSON of a scoring run, shared by `cfrsam score` and `cfrsam evaluate`.

import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import type { ScoreRun } from './dataset';
import type { ImageScore } from './scoring';

type Cell = string | number | undefined;

const fmt = (v: Cell, count: boolean): string => {
  if (v === undefined) return '';
  if (typeof v === 'string') return v;
  if (Number.isNaN(v)) return 'n/a';
  return count ? String(v) : v.toFixed(4);
};

/**
 * A plain-text table with a header rule; numbers right-aligned, with 4 decimals except in the
 * `countColumns` (printed as integers).
 */
export function formatTable(header: string[], rows: Cell[][], countColumns: readonly number[] = []): string {
  const cells = rows.map((r) => r.map((c, i) => fmt(c, countColumns.includes(i))));
  const widths = header.map((h, i) => Math.max(h.length, ...cells.map((r) => (r[i] ?? '').length)));
  const numeric = header.map((_, i) => rows.every((r) => typeof r[i] !== 'string'));
  const line = (r: string[]) =>
    r
      .map((c, i) => (numeric[i] && i > 0 ? c.padStart(widths[i]) : c.padEnd(widths[i])))
      .join('  ')
      .trimEnd();
  return [line(header), widths.map((w) => '-'.repeat(w)).join('  '), ...cells.map(line)].join('\n');
}

const csvCell = (v: Cell): string => {
  if (v === undefined || (typeof v === 'number' && Number.isNaN(v))) return '';
  const s = typeof v === 'number' ? String(v) : v;
  return /[",\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
};

export function toCsv(header: string[], rows: Cell[][]): string {
  return [header, ...rows].map((r) => r.map(csvCell).join(',')).join('\n') + '\n';
}

/** JSON with NaN/Infinity as null (JSON has no NaN) and typed arrays as lists. */
export function toJson(value: unknown): string {
  return JSON.stringify(
    value,
    (_key, v) => {
      if (typeof v === 'number' && !Number.isFinite(v)) return null;
      if (ArrayBuffer.isView(v) && !(v instanceof DataView)) return Array.from(v as unknown as ArrayLike<number>);
      return v;
    },
    1,
  );
}

function perImageTable(run: ScoreRun): { header: string[]; rows: Cell[][] } {
  const header = ['image', 'GT', 'pred', 'PQ', 'DQ', 'SQ', 'AJI', 'AJI+', 'Dice', 'Dice2', 'F1d'];
  if (run.options.classes) header.push('mPQ');
  if (run.images.some((im) => im.group !== undefined)) header.push('group');
  const rows = run.images.map((im: ImageScore) => {
    const r: Cell[] = [im.name, im.nGt, im.nPred, im.pq.pq, im.pq.dq, im.pq.sq, im.aji, im.ajiPlus, im.dice, im.dice2, im.detectionF1];
    if (run.options.classes) r.push(im.classes?.mpq ?? NaN);
    if (header.includes('group')) r.push(im.group ?? '');
    return r;
  });
  return { header, rows };
}

/** (metric, value, how it is averaged) rows of the dataset summary. */
function summaryRows(run: ScoreRun): Cell[][] {
  const d = run.dataset;
  const m = d.perImageMean;
  const rows: Cell[][] = [
    ['images', String(d.images), ''],
    ['nuclei (GT / pred)', `${d.nGt} / ${d.nPred}`, ''],
    ['bPQ', m.bpq, 'mean over images with GT nuclei (PanNuke)'],
    ['PQ', m.pq, 'mean over images (HoVer-Net)'],
    ['DQ', m.dq, 'mean over images'],
    ['SQ', m.sq, 'mean over images'],
    ['AJI', m.aji, 'mean over images'],
    ['AJI+', m.ajiPlus, 'mean over images'],
    ['Dice', m.dice, 'mean over images'],
    ['Dice2 (ensemble)', m.dice2, 'mean over images'],
    ['bPQ pooled', d.pooled.pq, 'TP/FP/FN/IoU pooled over the dataset'],
    ['DQ pooled', d.pooled.dq, 'pooled'],
    ['SQ pooled', d.pooled.sq, 'pooled'],
  ];
  if (m.mpq !== undefined) {
    rows.push(['mPQ', m.mpq, 'per image: mean of PQ over classes in its GT; then mean over images (PanNuke)']);
    rows.push(['mPQ pooled', d.pooled.mpq, 'per class pooled over the dataset, mean over classes (CoNIC mPQ+)']);
  }
  if (d.grouped) {
    rows.push(['bPQ by group', d.grouped.bpq, `mean over ${d.groups!.length} groups of the group's image mean (PanNuke)`]);
    if (d.grouped.mpq !== undefined) rows.push(['mPQ by group', d.grouped.mpq, "mean over groups of the group's image mean (PanNuke)"]);
  }
  const det = d.detection;
  const gated = run.images.filter((im) => im.pairingMode === 'gated').length;
  const pairing =
    gated === 0 ? 'Munkres on all distances' : gated === run.images.length ? 'gated pairing' : `Munkres, gated pairing in ${gated} large images`;
  rows.push(['F1d', det.f1, `centroids within ${run.options.radius} px (${pairing}), pooled: TP ${det.tp}, FP ${det.fp}, FN ${det.fn}`]);
  rows.push(['precision', det.precision, 'pooled']);
  rows.push(['recall', det.recall, 'pooled']);
  if (run.options.classes) rows.push(['type accuracy', det.typeAccuracy, 'paired nuclei with the right class, pooled']);
  return rows;
}

function perClassRows(run: ScoreRun): Cell[][] {
  const d = run.dataset;
  if (!run.options.classes || !run.classNames) return [];
  return run.classNames.map((name, c) => {
    let nGt = 0;
    let nPred = 0;
    for (const im of run.images) {
      nGt += im.classes?.nGt[c] ?? 0;
      nPred += im.classes?.nPred[c] ?? 0;
    }
    return [name, nGt, nPred, d.perImageMean.perClassPq?.[c] ?? NaN, d.pooled.perClass?.[c]?.pq ?? NaN, d.detection.perClassF1[c] ?? NaN];
  });
}

const PER_CLASS_HEADER = ['class', 'GT', 'pred', 'PQ (image mean)', 'PQ (pooled)', 'F1 (HoVer-Net)'];

/** The report printed by the CLI: per-image table (optional), summary, per class, per group. */
export function formatScoreReport(run: ScoreRun, opts: { perImage?: boolean } = {}): string {
  const parts: string[] = [];
  if (opts.perImage !== false) {
    const t = perImageTable(run);
    parts.push(formatTable(t.header, t.rows, [1, 2]));
  }
  parts.push(formatTable(['metric', 'value', 'averaging'], summaryRows(run)));
  const pc = perClassRows(run);
  if (pc.length) parts.push(formatTable(PER_CLASS_HEADER, pc, [1, 2]));
  if (run.dataset.groups) {
    const header = ['group', 'images', 'bPQ'];
    if (run.options.classes) header.push('mPQ');
    parts.push(
      formatTable(
        header,
        run.dataset.groups.map((g) => [g.name, g.images, g.bpq, ...(run.options.classes ? [g.mpq ?? NaN] : [])]),
        [1],
      ),
    );
  }
  for (const n of run.notes) parts.push(`note: ${n}`);
  return parts.join('\n\n') + '\n';
}

/**
 * Writes scores.json (everything), per_image.csv, summary.csv and, when present, per_class.csv
 * and groups.csv into `dir`. Returns the paths written.
 */
export async function writeScoreReport(dir: string, run: ScoreRun, extra: Record<string, unknown> = {}): Promise<string[]> {
  await fs.mkdir(dir, { recursive: true });
  const written: string[] = [];
  const put = async (name: string, text: string) => {
    const file = path.join(dir, name);
    await fs.writeFile(file, text);
    written.push(file);
  };
  const images = run.images.map((im) => ({
    name: im.name,
    group: im.group,
    width: im.width,
    height: im.height,
    nGt: im.nGt,
    nPred: im.nPred,
    pq: im.pq,
    bpq: im.bpq,
    aji: im.aji,
    ajiPlus: im.ajiPlus,
    dice: im.dice,
    dice2: im.dice2,
    detection: { tp: im.detection.tp, fp: im.detection.fp, fn: im.detection.fn, f1: im.detectionF1, pairing: im.pairingMode },
    classes: im.classes,
  }));
  await put(
    'scores.json',
    toJson({ ...extra, options: run.options, classNames: run.classNames, notes: run.notes, dataset: run.dataset, images }) + '\n',
  );
  const t = perImageTable(run);
  await put('per_image.csv', toCsv(t.header, t.rows));
  await put('summary.csv', toCsv(['metric', 'value', 'averaging'], summaryRows(run)));
  const pc = perClassRows(run);
  if (pc.length) await put('per_class.csv', toCsv(PER_CLASS_HEADER, pc));
  if (run.dataset.groups) {
    await put(
      'groups.csv',
      toCsv(
        ['group', 'images', 'bPQ', 'mPQ'],
        run.dataset.groups.map((g) => [g.name, g.images, g.bpq, g.mpq ?? NaN]),
      ),
    );
  }
  return written;
}
