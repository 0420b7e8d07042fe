// Reading and writing annotated samples in the data layout of ../shared/data:
// NAME.png (RGB), NAME.labels.png (16-bit grey instance map), NAME.json (classNames, classes...).
// Predictions are written in the same layout, so any tool's output is scored on the same footing.

import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import sharp from 'sharp';
import { DEFAULT_PAIRING_RADIUS } from './detection';
import { checkLabelImage, LabelImage } from './labels';
import { aggregateScores, ClassLookup, DatasetScore, ImageScore, scoreImage, ScoreOptions } from './scoring';

export const LABELS_SUFFIX = '.labels.png';

/** NAME.json. */
export interface SampleMeta {
  source?: string;
  classNames?: string[];
  instances?: number;
  /** Class index of each instance id: {"<id>": classIndex}. */
  classes?: Record<string, number>;
  mpp?: number;
  [key: string]: unknown;
}

/** Reads a 16-bit (or 8-bit) grey PNG instance map exactly. */
export async function readLabelPng(file: string): Promise<LabelImage> {
  const { data, info } = await sharp(file).toColourspace('grey16').raw({ depth: 'ushort' }).toBuffer({ resolveWithObject: true });
  if (info.channels !== 1) throw new Error(`${file}: expected a single-channel label map, got ${info.channels} channels`);
  // Copy into a fresh, aligned Uint16Array (the Buffer may start at an odd offset of a pool).
  const out = new Uint16Array(info.width * info.height);
  new Uint8Array(out.buffer).set(data.subarray(0, out.byteLength));
  return { width: info.width, height: info.height, data: out };
}

/** Encodes a label map as a 16-bit grey PNG (ids must fit in 16 bits). */
export async function encodeLabelPng(label: LabelImage): Promise<Buffer> {
  checkLabelImage(label, 'label map');
  let data: Uint16Array;
  if (label.data instanceof Uint16Array) {
    data = label.data;
  } else {
    data = new Uint16Array(label.data.length);
    for (let i = 0; i < data.length; i++) {
      const v = label.data[i];
      if (v < 0 || v > 65535) throw new RangeError(`label ${v} does not fit a 16-bit PNG`);
      data[i] = v;
    }
  }
  // sharp takes the sample depth of raw input from the typed array (a Uint16Array is 'ushort').
  return sharp(data, { raw: { width: label.width, height: label.height, channels: 1 } })
    .toColourspace('grey16')
    .png({ compressionLevel: 6 })
    .toBuffer();
}

export async function writeLabelPng(file: string, label: LabelImage): Promise<void> {
  await fs.writeFile(file, await encodeLabelPng(label));
}

/** Reads NAME.json; undefined when the file does not exist. */
export async function readSampleMeta(file: string): Promise<SampleMeta | undefined> {
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
  let meta: unknown;
  try {
    meta = JSON.parse(text);
  } catch (err) {
    throw new Error(`${file}: invalid JSON: ${(err as Error).message}`);
  }
  if (typeof meta !== 'object' || meta === null || Array.isArray(meta)) throw new Error(`${file}: expected a JSON object`);
  const m = meta as SampleMeta;
  if (m.classNames !== undefined && (!Array.isArray(m.classNames) || !m.classNames.every((n) => typeof n === 'string'))) {
    throw new Error(`${file}: classNames must be a list of strings`);
  }
  if (m.classes !== undefined) {
    if (typeof m.classes !== 'object' || m.classes === null || Array.isArray(m.classes)) {
      throw new Error(`${file}: classes must be an object {"<id>": classIndex}`);
    }
    for (const [id, c] of Object.entries(m.classes)) {
      if (!Number.isInteger(c)) throw new Error(`${file}: class of instance ${id} is not an integer`);
    }
  }
  return m;
}

/** Names (NAME of NAME.labels.png) of the samples in a directory, in natural order. */
export async function listSamples(dir: string): Promise<string[]> {
  const entries = await fs.readdir(dir);
  return entries
    .filter((f) => f.endsWith(LABELS_SUFFIX))
    .map((f) => f.slice(0, -LABELS_SUFFIX.length))
    .sort((a, b) => a.localeCompare(b, 'en', { numeric: true }));
}

const normaliseName = (s: string) => s.trim().toLowerCase();

export type TaxonomyMatch = { ok: true; predToGt: number[] } | { ok: false; reason: string };

/**
 * Whether two class taxonomies are the same set of names (case and surrounding spaces ignored;
 * order may differ). When they are, `predToGt[k]` is the ground-truth index of predicted class k.
 * Class metrics (mPQ, per-class F1) are only meaningful when this holds.
 */
export function matchTaxonomy(gtNames: readonly string[], predNames: readonly string[]): TaxonomyMatch {
  const gtIndex = new Map(gtNames.map((n, i) => [normaliseName(n), i]));
  const predSet = new Set(predNames.map(normaliseName));
  const missing = gtNames.filter((n) => !predSet.has(normaliseName(n)));
  const extra = predNames.filter((n) => !gtIndex.has(normaliseName(n)));
  if (gtIndex.size !== gtNames.length || predSet.size !== predNames.length) {
    return { ok: false, reason: 'a taxonomy lists the same class name twice' };
  }
  if (missing.length > 0 || extra.length > 0) {
    const parts: string[] = [];
    if (missing.length) parts.push(`not predicted: ${missing.join(', ')}`);
    if (extra.length) parts.push(`not in the ground truth: ${extra.join(', ')}`);
    return {
      ok: false,
      reason: `class names differ (ground truth [${gtNames.join(', ')}] vs prediction [${predNames.join(', ')}]; ${parts.join('; ')})`,
    };
  }
  return { ok: true, predToGt: predNames.map((n) => gtIndex.get(normaliseName(n))!) };
}

/** Class lookup of a prediction, with its class indices translated to the ground truth's. */
export function translatedClasses(classes: Record<string, number> | undefined, predToGt: readonly number[]): ClassLookup {
  const out = new Map<number, number>();
  for (const [id, c] of Object.entries(classes ?? {})) {
    const g = predToGt[c];
    if (g !== undefined) out.set(Number(id), g);
  }
  return out;
}

export interface ScoreDirectoriesOptions extends ScoreOptions {
  /** Score classes (mPQ, per-class F1) when both sides have compatible class files. */
  classes?: boolean;
  /** Group images by the first capture group (or whole match) of this pattern on the name. */
  groupRegex?: RegExp;
  /** Group images by this field of the ground truth's NAME.json (e.g. "tissue"). */
  groupField?: string;
  /** What to do when a prediction is missing: fail (default) or score it as an empty map. */
  missing?: 'error' | 'empty';
  onImage?: (score: ImageScore, done: number, total: number) => void;
}

export interface ScoreRun {
  images: ImageScore[];
  dataset: DatasetScore;
  classNames?: string[];
  /** Notes for the reader: why class metrics were skipped, missing predictions... */
  notes: string[];
  options: { matchIou: number; radius: number; classes: boolean };
}

/** Group of a sample from the regex on its name or a field of its ground-truth JSON. */
export function groupOf(
  name: string,
  meta: SampleMeta | undefined,
  opts: Pick<ScoreDirectoriesOptions, 'groupRegex' | 'groupField'>,
): string | undefined {
  if (opts.groupField) {
    const v = meta?.[opts.groupField];
    return v === undefined || v === null ? '' : String(v);
  }
  if (opts.groupRegex) {
    const m = opts.groupRegex.exec(name);
    return m ? (m[1] ?? m[0]) : '';
  }
  return undefined;
}

/**
 * Scores every ground-truth sample of `gtDir` (NAME.labels.png + NAME.json) against the
 * prediction of the same name in `predDir`.
 */
export async function scoreDirectories(gtDir: string, predDir: string, options: ScoreDirectoriesOptions = {}): Promise<ScoreRun> {
  const names = await listSamples(gtDir);
  if (names.length === 0) throw new Error(`no ground-truth label maps (*${LABELS_SUFFIX}) in ${gtDir}`);
  const predNames = new Set(await listSamples(predDir));
  const missing = names.filter((n) => !predNames.has(n));
  const notes: string[] = [];
  if (missing.length > 0) {
    const list = missing.slice(0, 5).join(', ') + (missing.length > 5 ? `, ... (${missing.length} in all)` : '');
    if (options.missing !== 'empty') throw new Error(`no prediction in ${predDir} for: ${list}`);
    notes.push(`${missing.length} image(s) have no prediction and were scored as empty: ${list}`);
  }

  // Class taxonomy: from the first ground-truth and prediction files that name their classes.
  const gtMetas = new Map<string, SampleMeta | undefined>();
  for (const n of names) gtMetas.set(n, await readSampleMeta(path.join(gtDir, `${n}.json`)));
  let classNames: string[] | undefined;
  let predToGt: number[] | undefined;
  if (options.classes) {
    classNames = [...gtMetas.values()].find((m) => m?.classNames)?.classNames;
    const differing = [...gtMetas.entries()].find(([, m]) => m?.classNames && m.classNames.join('\u0000') !== classNames!.join('\u0000'));
    const predMetaNames = await firstPredClassNames(
      predDir,
      names.filter((n) => predNames.has(n)),
    );
    if (!classNames) {
      notes.push('class metrics skipped: the ground truth names no classes (classNames in NAME.json)');
    } else if (differing) {
      notes.push(
        `class metrics skipped: ${differing[0]}.json has classNames [${differing[1]!.classNames!.join(', ')}], other images [${classNames.join(', ')}]`,
      );
      classNames = undefined;
    } else if (![...gtMetas.values()].some((m) => m?.classes)) {
      notes.push('class metrics skipped: the ground truth has no per-instance classes');
      classNames = undefined;
    } else {
      const pn = predMetaNames ?? classNames;
      if (!predMetaNames) notes.push("predictions name no classes; assuming the ground truth's class order");
      const match = matchTaxonomy(classNames, pn);
      if (match.ok) {
        predToGt = match.predToGt;
      } else {
        notes.push(`class metrics skipped: ${match.reason}`);
        classNames = undefined;
      }
    }
  }
  const numClasses = predToGt && classNames ? classNames.length : 0;

  const images: ImageScore[] = [];
  for (const name of names) {
    const gt = await readLabelPng(path.join(gtDir, `${name}${LABELS_SUFFIX}`));
    const gtMeta = gtMetas.get(name);
    let pred: LabelImage;
    let predMeta: SampleMeta | undefined;
    if (predNames.has(name)) {
      pred = await readLabelPng(path.join(predDir, `${name}${LABELS_SUFFIX}`));
      predMeta = await readSampleMeta(path.join(predDir, `${name}.json`));
    } else {
      pred = { width: gt.width, height: gt.height, data: new Uint16Array(gt.width * gt.height) };
    }
    if (pred.width !== gt.width || pred.height !== gt.height) {
      throw new Error(`${name}: prediction is ${pred.width}x${pred.height} but ground truth is ${gt.width}x${gt.height}`);
    }
    const score = scoreImage(
      {
        name,
        group: groupOf(name, gtMeta, options),
        gt,
        pred,
        gtClasses: gtMeta?.classes,
        predClasses: predToGt ? translatedClasses(predMeta?.classes, predToGt) : undefined,
      },
      { ...options, numClasses },
    );
    images.push(score);
    options.onImage?.(score, images.length, names.length);
  }
  return {
    images,
    dataset: aggregateScores(images),
    classNames: numClasses > 0 ? classNames : undefined,
    notes,
    options: { matchIou: options.matchIou ?? 0.5, radius: options.radius ?? DEFAULT_PAIRING_RADIUS, classes: numClasses > 0 },
  };
}

async function firstPredClassNames(predDir: string, names: string[]): Promise<string[] | undefined> {
  for (const n of names) {
    const m = await readSampleMeta(path.join(predDir, `${n}.json`));
    if (m?.classNames) return m.classNames;
  }
  return undefined;
}
