// `cfrsam score`: scores predicted label maps against ground truth, both in the data layout of
// ../shared/data (NAME.labels.png + NAME.json), so any tool's output is scored the same way.

import { ConfigError, type FlagSpec, parseFlags } from '@cfrsam/rpc';
import { formatHelp } from './help';
import { metrics } from '@cfrsam/nuclei';

export interface CliIo {
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WritableStream;
}

const defaultIo: CliIo = { stdout: process.stdout, stderr: process.stderr };

/** Flags shared by `score` and `evaluate`: how to score. */
export const SCORING_FLAGS = {
  radius: { type: 'number', default: metrics.DEFAULT_PAIRING_RADIUS, help: 'centroid pairing radius in pixels for detection F1 (12 at 40x)' },
  matchIou: { type: 'number', default: 0.5, help: 'IoU above which nuclei match for PQ (Munkres pairing below 0.5)' },
  pairing: { type: 'string', default: 'auto', help: 'centroid pairing: dense (HoVer-Net, Munkres on all distances), gated, or auto' },
  groupRegex: { type: 'string', default: '', help: 'group images by the first capture group of this regex on the name (PanNuke tissue averaging)' },
  groupField: { type: 'string', default: '', help: 'group images by this field of the ground truth NAME.json' },
  out: { type: 'string', default: '', help: 'directory for scores.json and the CSV tables' },
  summaryOnly: { type: 'boolean', default: false, help: 'print only the dataset tables, not one row per image' },
} satisfies Record<string, FlagSpec>;

const SCORE_FLAGS = {
  gt: { type: 'string', help: 'ground-truth directory (NAME.labels.png + NAME.json)' },
  pred: { type: 'string', help: 'prediction directory, same layout and names' },
  classes: { type: 'boolean', default: false, help: 'also score classes (mPQ, per-class F1) when the class names agree' },
  missing: { type: 'string', default: 'error', help: 'a missing prediction is an error, or "empty" (scored as no nuclei)' },
  ...SCORING_FLAGS,
} satisfies Record<string, FlagSpec>;

export const SCORE_USAGE = formatHelp(
  'cfrsam score --gt DIR --pred DIR [--radius 12] [--classes] [--out DIR]',
  'Scores predicted label maps against ground truth (PQ, bPQ, mPQ, AJI, Dice, detection and classification F1).',
  { flags: SCORE_FLAGS },
  { gt: 'DIR', pred: 'DIR', out: 'DIR', groupRegex: 'REGEX', groupField: 'FIELD' },
);

export interface ScoringFlagValues {
  radius: number;
  matchIou: number;
  pairing: string;
  groupRegex: string;
  groupField: string;
}

/** Validated scoring options from the shared flags; throws ConfigError naming the bad flag. */
export function scoringOptions(
  f: ScoringFlagValues,
): Pick<metrics.ScoreDirectoriesOptions, 'radius' | 'matchIou' | 'pairing' | 'groupRegex' | 'groupField'> {
  if (!(f.radius >= 0)) throw new ConfigError(`--radius must be >= 0, got ${f.radius}`);
  if (!(f.matchIou >= 0 && f.matchIou < 1)) throw new ConfigError(`--match-iou must be in [0, 1), got ${f.matchIou}`);
  if (!['auto', 'dense', 'gated'].includes(f.pairing)) throw new ConfigError(`--pairing must be auto, dense or gated, got "${f.pairing}"`);
  if (f.groupRegex && f.groupField) throw new ConfigError('give --group-regex or --group-field, not both');
  let groupRegex: RegExp | undefined;
  if (f.groupRegex) {
    try {
      groupRegex = new RegExp(f.groupRegex);
    } catch (err) {
      throw new ConfigError(`--group-regex: ${(err as Error).message}`);
    }
  }
  return {
    radius: f.radius,
    matchIou: f.matchIou,
    pairing: f.pairing as metrics.PairingMode,
    groupRegex,
    groupField: f.groupField || undefined,
  };
}

/** Prints the report and, with --out, writes scores.json and the CSV tables. */
export async function reportRun(
  run: metrics.ScoreRun,
  opts: { out: string; summaryOnly: boolean; extra?: Record<string, unknown> },
  io: CliIo,
): Promise<void> {
  io.stdout.write(metrics.formatScoreReport(run, { perImage: !opts.summaryOnly }));
  if (opts.out) {
    const files = await metrics.writeScoreReport(opts.out, run, opts.extra);
    io.stderr.write(`wrote ${files.join(', ')}\n`);
  }
}

/**
 * `cfrsam score --gt DIR --pred DIR [...]`. Returns the exit status: 0 scored, 1 failed (unreadable
 * or inconsistent data), 2 bad usage.
 */
export async function runScore(argv: readonly string[], io: CliIo = defaultIo): Promise<number> {
  let flags;
  let options;
  try {
    if (argv.includes('--help') || argv.includes('-h')) {
      io.stdout.write(`${SCORE_USAGE}\n`);
      return 0;
    }
    flags = parseFlags(SCORE_FLAGS, argv, {});
    if (!flags.gt || !flags.pred) throw new ConfigError('--gt and --pred are required');
    if (flags.missing !== 'error' && flags.missing !== 'empty') throw new ConfigError(`--missing must be error or empty, got "${flags.missing}"`);
    options = scoringOptions(flags);
  } catch (err) {
    if (err instanceof ConfigError) {
      io.stderr.write(`cfrsam score: ${err.message.split('\n')[0]}\n${SCORE_USAGE}\n`);
      return 2;
    }
    throw err;
  }
  try {
    const run = await metrics.scoreDirectories(flags.gt, flags.pred, {
      ...options,
      classes: flags.classes,
      missing: flags.missing as 'error' | 'empty',
    });
    await reportRun(run, { out: flags.out, summaryOnly: flags.summaryOnly, extra: { gt: flags.gt, pred: flags.pred } }, io);
    return 0;
  } catch (err) {
    io.stderr.write(`cfrsam score: ${(err as Error).message}\n`);
    return 1;
  }
}
