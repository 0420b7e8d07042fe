// `cfrsam evaluate`: runs every image of an annotated dataset (NAME.png, NAME.labels.png,
// NAME.json) through a running gateway's Segment RPC, writes the predictions in the same layout
// (so `cfrsam score` can re-score them later, against any tool's), and prints the same tables.

import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { ConfigError, type FlagSpec, makeClient, parseFlags, segmentationProto, unary, waitForReady } from '@cfrsam/rpc';
import { CLIENT_FLAGS, clientSecurity, withRetries } from './clientOptions';
import { formatHelp } from './help';
import { metrics } from '@cfrsam/nuclei';
import { reportRun, SCORING_FLAGS, scoringOptions, type CliIo } from './score';
import { announceImage } from '../admission/announce';

const EVALUATE_FLAGS = {
  data: { type: 'string', help: 'dataset directory: NAME.png, NAME.labels.png, NAME.json' },
  gateway: { type: 'string', env: 'CFRSAM_GATEWAY', default: 'localhost:50051', help: 'gateway address host:port' },
  limit: { type: 'int', default: 0, help: 'evaluate only the first N images (0: all)' },
  concurrency: { type: 'int', default: 2, help: 'Segment calls in flight at once' },
  timeoutS: { type: 'number', default: 300, help: 'deadline of each Segment call in seconds' },
  connectTimeoutS: { type: 'number', default: 10, help: 'how long to wait for the gateway to accept a connection' },
  minScore: { type: 'number', default: 0, help: 'drop predicted nuclei scoring below this' },
  ...SCORING_FLAGS,
  ...CLIENT_FLAGS,
} satisfies Record<string, FlagSpec>;

export const EVALUATE_USAGE = formatHelp(
  'cfrsam evaluate --data DIR [--gateway HOST:PORT] [--out DIR] [--limit N]',
  'Segments every image of an annotated dataset (NAME.png, NAME.labels.png, NAME.json) through a running gateway and scores it (PQ, AJI, Dice, detection F1, classes).',
  { flags: EVALUATE_FLAGS },
  { data: 'DIR', gateway: 'HOST:PORT', ca: 'FILE', token: 'TOKEN' },
);

const defaultIo: CliIo = { stdout: process.stdout, stderr: process.stderr };

/** The response's 16-bit label map as an instance map; throws when absent or malformed. */
export function labelMapFromResponse(res: segmentationProto.SegmentResponse): metrics.LabelImage {
  const lm = res.labelMap;
  if (!lm) throw new Error('the response has no label map (return_label_map was not honoured)');
  const n = lm.width * lm.height;
  if (!(lm.width > 0 && lm.height > 0) || lm.data.length !== 2 * n) {
    throw new Error(`label map of ${lm.width}x${lm.height} carries ${lm.data.length} bytes (expected ${2 * n})`);
  }
  const data = new Uint16Array(n);
  for (let i = 0; i < n; i++) data[i] = lm.data.readUInt16LE(2 * i);
  return { width: lm.width, height: lm.height, data };
}

/** NAME.json of a prediction, in the dataset's layout, with the model's taxonomy. */
export function predictionMeta(res: segmentationProto.SegmentResponse, model: segmentationProto.ModelInfo): metrics.SampleMeta {
  const classes: Record<string, number> = {};
  for (const n of res.nuclei) classes[String(n.id)] = n.classIndex;
  return {
    source: `cfrsam evaluate: ${res.modelName || model.name} ${res.modelVersion || model.version}`,
    classNames: model.classes
      .slice()
      .sort((a, b) => a.index - b.index)
      .map((c) => c.name),
    instances: res.nuclei.length,
    classes,
  };
}

/**
 * The model's class names by index. Class indices are taken as positions in this list, so the
 * list must be exactly 0..K-1.
 */
export function modelClassNames(model: segmentationProto.ModelInfo): string[] {
  const sorted = model.classes.slice().sort((a, b) => a.index - b.index);
  sorted.forEach((c, k) => {
    if (c.index !== k) throw new Error(`model classes are not indexed 0..${sorted.length - 1} (found index ${c.index})`);
  });
  return sorted.map((c) => c.name);
}

export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds)) return '?';
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  return h > 0 ? `${h}h${String(m).padStart(2, '0')}m` : m > 0 ? `${m}m${String(sec).padStart(2, '0')}s` : `${sec}s`;
}

/** "  12/432 images  1.90 img/s  ETA 3m41s" */
export function formatProgress(done: number, total: number, elapsedMs: number, failed = 0): string {
  const rate = elapsedMs > 0 ? (done * 1000) / elapsedMs : 0;
  const eta = rate > 0 ? (total - done) / rate : NaN;
  const width = String(total).length;
  return (
    `${String(done).padStart(width)}/${total} images  ${rate.toFixed(2)} img/s  ` +
    (done < total ? `ETA ${formatDuration(eta)}` : `took ${formatDuration(elapsedMs / 1000)}`) +
    (failed ? `  (${failed} failed)` : '')
  );
}

/** Progress on stderr: rewritten in place on a terminal, a line every 5 s otherwise. */
class Progress {
  private readonly start = Date.now();
  private lastLine = 0;
  constructor(
    private readonly total: number,
    private readonly stream: NodeJS.WritableStream,
  ) {}
  update(done: number, failed: number): void {
    const text = formatProgress(done, this.total, Date.now() - this.start, failed);
    const tty = (this.stream as NodeJS.WriteStream).isTTY;
    if (tty) {
      this.stream.write(`\r${text}\x1b[K${done === this.total ? '\n' : ''}`);
    } else if (done === this.total || Date.now() - this.lastLine >= 5000) {
      this.lastLine = Date.now();
      this.stream.write(`${text}\n`);
    }
  }
}

/** Runs `task` over `items` with at most `concurrency` in flight, in order of start. */
async function forEachConcurrent<T>(items: readonly T[], concurrency: number, task: (item: T, index: number) => Promise<void>): Promise<void> {
  let next = 0;
  const lanes = Array.from({ length: Math.min(concurrency, items.length) }, async () => {
    while (next < items.length) {
      const k = next++;
      await task(items[k], k);
    }
  });
  await Promise.all(lanes);
}

/**
 * `cfrsam evaluate --data DIR [...]`. Returns the exit status: 0 all images evaluated, 1 the
 * gateway could not be used or some images failed (the rest are still scored and reported),
 * 2 bad usage.
 */
export async function runEvaluate(argv: readonly string[], io: CliIo = defaultIo): Promise<number> {
  let flags;
  let scoring;
  let security: ReturnType<typeof clientSecurity>;
  try {
    if (argv.includes('--help') || argv.includes('-h')) {
      io.stdout.write(`${EVALUATE_USAGE}\n`);
      return 0;
    }
    flags = parseFlags(EVALUATE_FLAGS, argv);
    if (!flags.data) throw new ConfigError('--data is required');
    if (flags.limit < 0) throw new ConfigError(`--limit must be >= 0, got ${flags.limit}`);
    if (flags.concurrency < 1) throw new ConfigError(`--concurrency must be >= 1, got ${flags.concurrency}`);
    if (!(flags.timeoutS > 0)) throw new ConfigError(`--timeout-s must be > 0, got ${flags.timeoutS}`);
    if (!(flags.connectTimeoutS > 0)) throw new ConfigError(`--connect-timeout-s must be > 0, got ${flags.connectTimeoutS}`);
    scoring = scoringOptions(flags);
    security = clientSecurity(flags);
  } catch (err) {
    if (err instanceof ConfigError) {
      io.stderr.write(`cfrsam evaluate: ${err.message.split('\n')[0]}\n${EVALUATE_USAGE}\n`);
      return 2;
    }
    throw err;
  }

  const dataDir = flags.data;
  const outDir = flags.out || `evaluation-${path.basename(path.resolve(dataDir))}`;
  const predDir = path.join(outDir, 'pred');
  let names: string[];
  try {
    names = await metrics.listSamples(dataDir);
  } catch (err) {
    io.stderr.write(`cfrsam evaluate: cannot read ${dataDir}: ${(err as Error).message}\n`);
    return 1;
  }
  if (flags.limit > 0) names = names.slice(0, flags.limit);
  if (names.length === 0) {
    io.stderr.write(`cfrsam evaluate: no samples (*${metrics.LABELS_SUFFIX}) in ${dataDir}\n`);
    return 1;
  }

  const client = makeClient(segmentationProto.SegmentationClient, flags.gateway, security);
  try {
    try {
      await waitForReady(client, flags.connectTimeoutS * 1000);
    } catch {
      io.stderr.write(`cfrsam evaluate: cannot reach the gateway at ${flags.gateway} within ${flags.connectTimeoutS} s\n`);
      return 1;
    }
    const model = await unary(client, client.getModelInfo, {}, { timeoutMs: 10_000 });
    const modelNames = modelClassNames(model);
    io.stderr.write(`model ${model.name} ${model.version}, classes [${modelNames.join(', ')}]; ${names.length} images from ${dataDir}\n`);

    // Class metrics only when the dataset's taxonomy is the model's (by name).
    const notes: string[] = [];
    const metas = new Map<string, metrics.SampleMeta | undefined>();
    for (const n of names) metas.set(n, await metrics.readSampleMeta(path.join(dataDir, `${n}.json`)));
    const datasetNames = [...metas.values()].find((m) => m?.classNames)?.classNames;
    let predToGt: number[] | undefined;
    if (!datasetNames) {
      notes.push('class metrics skipped: the dataset names no classes');
    } else {
      const match = metrics.matchTaxonomy(datasetNames, modelNames);
      if (match.ok && [...metas.values()].some((m) => m?.classes)) predToGt = match.predToGt;
      else
        notes.push(
          `class metrics skipped (bPQ, AJI, Dice and detection only): ${match.ok ? 'the dataset has no per-instance classes' : match.reason}`,
        );
    }
    const numClasses = predToGt ? datasetNames!.length : 0;

    await fs.mkdir(predDir, { recursive: true });
    const progress = new Progress(names.length, io.stderr);
    const scores: (metrics.ImageScore | undefined)[] = new Array(names.length);
    const failures: string[] = [];
    let done = 0;
    await forEachConcurrent(names, flags.concurrency, async (name, k) => {
      try {
        const meta = metas.get(name);
        const [image, gt] = await Promise.all([
          fs.readFile(path.join(dataDir, `${name}.png`)),
          metrics.readLabelPng(path.join(dataDir, `${name}${metrics.LABELS_SUFFIX}`)),
        ]);
        const request = segmentationProto.SegmentRequest.fromPartial({
          image,
          promptMode: segmentationProto.PromptMode.PROMPT_MODE_AUTO,
          returnLabelMap: true,
          minScore: flags.minScore,
          mpp: typeof meta?.mpp === 'number' ? meta.mpp : 0,
        });
        const res = await withRetries(
          () => unary(client, client.segment, request, { timeoutMs: flags.timeoutS * 1000, metadata: announceImage(request.image, request.mpp) }),
          { retries: flags.retries },
        );
        const pred = labelMapFromResponse(res);
        if (pred.width !== gt.width || pred.height !== gt.height) {
          throw new Error(`prediction is ${pred.width}x${pred.height} but the ground truth is ${gt.width}x${gt.height}`);
        }
        const predMeta = predictionMeta(res, model);
        await Promise.all([
          metrics.writeLabelPng(path.join(predDir, `${name}${metrics.LABELS_SUFFIX}`), pred),
          fs.writeFile(path.join(predDir, `${name}.json`), JSON.stringify(predMeta, null, 1) + '\n'),
        ]);
        scores[k] = metrics.scoreImage(
          {
            name,
            group: metrics.groupOf(name, meta, scoring),
            gt,
            pred,
            gtClasses: meta?.classes,
            predClasses: predToGt ? metrics.translatedClasses(predMeta.classes, predToGt) : undefined,
          },
          { ...scoring, numClasses },
        );
      } catch (err) {
        const e = err as Error & { code?: number; details?: string };
        failures.push(`${name}: ${e.details ?? e.message}`);
      }
      done++;
      progress.update(done, failures.length);
    });

    const images = scores.filter((s): s is metrics.ImageScore => s !== undefined);
    if (failures.length > 0) {
      notes.push(
        `${failures.length} of ${names.length} images failed and are not scored: ${failures.slice(0, 5).join('; ')}${failures.length > 5 ? '; ...' : ''}`,
      );
    }
    if (images.length === 0) {
      io.stderr.write(`cfrsam evaluate: every image failed; first: ${failures[0]}\n`);
      return 1;
    }
    const run: metrics.ScoreRun = {
      images,
      dataset: metrics.aggregateScores(images),
      classNames: numClasses > 0 ? datasetNames : undefined,
      notes,
      options: { matchIou: scoring.matchIou ?? 0.5, radius: scoring.radius ?? metrics.DEFAULT_PAIRING_RADIUS, classes: numClasses > 0 },
    };
    await reportRun(
      run,
      {
        out: outDir,
        summaryOnly: flags.summaryOnly,
        extra: { data: dataDir, gateway: flags.gateway, model: { name: model.name, version: model.version, classes: modelNames }, failures },
      },
      io,
    );
    return failures.length > 0 ? 1 : 0;
  } catch (err) {
    const e = err as Error & { details?: string };
    io.stderr.write(`cfrsam evaluate: ${e.details ?? e.message}\n`);
    return 1;
  } finally {
    client.close();
  }
}
