// `cfrsam segment IMAGE... --out DIR [--gateway host:port | --local]`: segments images through a
// gateway (or a stack started for the purpose and stopped afterwards) and writes, per image NAME:
//   NAME.geojson      QuPath-compatible FeatureCollection (one detection per nucleus)
//   NAME.csv          one row per nucleus: id, class, score, centroid, bbox, measurements
//   NAME.labels.png   16-bit label map (0 background, i = nucleus i)
//   NAME.json         the ../shared/data sidecar: classNames, instances, classes {id: classIndex}
//   NAME.overlay.png  outlines coloured by class over the image
import { openSlide } from '@cfrsam/slides';
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { ConfigError, type FlagSpec, makeClient, parseFlags, segmentationProto, unary, usage, waitForReady } from '@cfrsam/rpc';
import {
  decodeImage,
  encodeLabelPng,
  encodeOverlayPng,
  labelMapFromBytes,
  nucleiToCsv,
  nucleiToGeoJson,
  nucleiToSidecar,
  parseHexColor,
  type Rgb,
  UNCLASSIFIED_COLOR,
} from '@cfrsam/nuclei';
import { startStack, type RunningStack } from './stack';

export interface CliIo {
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WritableStream;
}

const defaultIo: CliIo = { stdout: process.stdout, stderr: process.stderr };

const SEGMENT_FLAGS = {
  out: { type: 'string', help: 'output directory (created if needed)' },
  gateway: { type: 'string', env: 'CFRSAM_GATEWAY', default: '', help: 'gateway address host:port; without it a local stack is started' },
  local: { type: 'boolean', default: false, help: 'start a local stack (the default when no --gateway is given)' },
  bundle: { type: 'string', default: '', help: 'model bundle for --local (default models/tiny)' },
  decoders: { type: 'int', default: 1, help: 'decoder replicas for --local' },
  minScore: { type: 'number', default: 0, help: 'drop nuclei scoring below this' },
  mpp: {
    type: 'number',
    default: 0,
    help: "micrometres per pixel of the images; they are resampled to the model's resolution (0: assume the model's)",
  },
  timeoutS: { type: 'number', default: 600, help: 'deadline of each Segment call in seconds' },
  maxMessageMb: { type: 'int', default: 256, help: 'max gRPC message size in MiB (label maps of large images)' },
  quiet: { type: 'boolean', default: false, help: 'print only the summary' },
} satisfies Record<string, FlagSpec>;

export const SEGMENT_USAGE = `usage: cfrsam segment IMAGE... --out DIR [--gateway host:port | --local]\n${usage(SEGMENT_FLAGS)}`;

/** Splits argv into image paths (leading non-flag arguments and any after flags) and flags. */
function splitArgs(argv: readonly string[]): { images: string[]; flags: string[] } {
  const images: string[] = [];
  const flags: string[] = [];
  const booleans = new Set(['--local', '--no-local', '--quiet', '--no-quiet', '--help', '-h']);
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a.startsWith('-')) {
      flags.push(a);
      if (!a.includes('=') && !booleans.has(a) && i + 1 < argv.length) flags.push(argv[++i]);
    } else {
      images.push(a);
    }
  }
  return { images, flags };
}

export interface SegmentOutputs {
  geojson: string;
  csv: string;
  labels: string;
  sidecar: string;
  overlay: string;
}

/** Writes the five outputs of one segmented image. */
export async function writeOutputs(
  outDir: string,
  name: string,
  imageBytes: Buffer,
  response: segmentationProto.SegmentResponse,
  model: segmentationProto.ModelInfo,
  mpp: number,
): Promise<SegmentOutputs> {
  const classes = model.classes.map((c) => ({ index: c.index, name: c.name, color: c.color }));
  const files: SegmentOutputs = {
    geojson: path.join(outDir, `${name}.geojson`),
    csv: path.join(outDir, `${name}.csv`),
    labels: path.join(outDir, `${name}.labels.png`),
    sidecar: path.join(outDir, `${name}.json`),
    overlay: path.join(outDir, `${name}.overlay.png`),
  };
  await fs.writeFile(files.geojson, JSON.stringify(nucleiToGeoJson(response.nuclei, classes, response.imageId)) + '\n');
  await fs.writeFile(files.csv, nucleiToCsv(response.nuclei, classes));
  const lm = response.labelMap;
  if (!lm) throw new Error('the gateway returned no label map');
  const labels = labelMapFromBytes(lm.data, lm.width, lm.height);
  await fs.writeFile(files.labels, await encodeLabelPng(labels, lm.width, lm.height));
  const sidecar = nucleiToSidecar(
    response.nuclei,
    classes.map((c) => c.name),
    `cfrsam segment (${response.modelName} ${response.modelVersion})`,
    mpp > 0 ? mpp : undefined,
  );
  await fs.writeFile(files.sidecar, JSON.stringify(sidecar, null, 1) + '\n');
  // The overlay is drawn on the image as the gateway saw it (same decoder, same conversion).
  const image = await decodeImage(imageBytes, { maxPixels: Number.MAX_SAFE_INTEGER, minSide: 1 });
  const colorById = new Map<number, Rgb>();
  for (const n of response.nuclei) {
    colorById.set(n.id, n.classIndex >= 0 ? parseHexColor(classes.find((c) => c.index === n.classIndex)?.color ?? '') : [...UNCLASSIFIED_COLOR]);
  }
  await fs.writeFile(files.overlay, await encodeOverlayPng(image, labels, (l) => colorById.get(l) ?? [...UNCLASSIFIED_COLOR], 2));
  return files;
}

/** One line per stage: "prompter 123.4 ms". */
export function formatTimings(timings: readonly segmentationProto.StageTiming[]): string {
  return timings.map((t) => `${t.stage} ${t.ms.toFixed(1)} ms`).join(', ');
}

export function formatCounts(counts: readonly segmentationProto.ClassCount[]): string {
  return counts.map((c) => `${c.className} ${c.count}`).join(', ');
}

export async function runSegment(argv: readonly string[], io: CliIo = defaultIo): Promise<number> {
  if (argv.includes('--help') || argv.includes('-h')) {
    io.stdout.write(`${SEGMENT_USAGE}\n`);
    return 0;
  }
  const { images, flags: flagArgs } = splitArgs(argv);
  let flags;
  try {
    flags = parseFlags(SEGMENT_FLAGS, flagArgs);
    if (!flags.out) throw new ConfigError('--out DIR is required');
    if (images.length === 0) throw new ConfigError('no images given');
    if (flags.gateway && flags.local) throw new ConfigError('give --gateway or --local, not both');
    if (flags.decoders < 1) throw new ConfigError(`--decoders must be >= 1, got ${flags.decoders}`);
  } catch (err) {
    if (err instanceof ConfigError) {
      io.stderr.write(`cfrsam segment: ${err.message.split('\n')[0]}\n${SEGMENT_USAGE}\n`);
      return 2;
    }
    throw err;
  }
  for (const image of images) {
    try {
      await fs.access(image);
    } catch {
      io.stderr.write(`cfrsam segment: cannot read ${image}\n`);
      return 2;
    }
  }
  await fs.mkdir(flags.out, { recursive: true });

  let stack: RunningStack | undefined;
  let address = flags.gateway;
  const stopStack = () => void stack?.stop();
  if (!address) {
    io.stderr.write(`starting a local stack (${flags.decoders} decoder${flags.decoders > 1 ? 's' : ''})...\n`);
    const serviceLog: string[] = [];
    try {
      stack = await startStack({
        bundle: flags.bundle || undefined,
        decoders: flags.decoders,
        port: 0,
        log: (name, line) => {
          serviceLog.push(`[${name}] ${line}`);
          if (!flags.quiet && /error|fail/i.test(line)) io.stderr.write(`[${name}] ${line}\n`);
        },
      });
    } catch (err) {
      io.stderr.write(`cfrsam segment: cannot start the local stack: ${(err as Error).message}\n`);
      return 1;
    }
    address = stack.gateway;
    process.once('SIGINT', stopStack);
    process.once('SIGTERM', stopStack);
  }
  const maxBytes = flags.maxMessageMb * 1024 * 1024;
  const client = makeClient(segmentationProto.SegmentationClient, address, { maxMessageBytes: maxBytes });
  let failures = 0;
  try {
    try {
      await waitForReady(client, 10_000);
    } catch {
      io.stderr.write(`cfrsam segment: cannot reach the gateway at ${address}\n`);
      return 1;
    }
    const model = await unary(client, client.getModelInfo, {}, { timeoutMs: 10_000 });
    io.stderr.write(`model ${model.name} ${model.version} at ${address}\n`);
    const totals = new Map<string, number>();
    for (const imagePath of images) {
      const name = path.basename(imagePath).replace(/\.(png|jpe?g|tiff?)$/i, '');
      try {
        const bytes = await fs.readFile(imagePath);
        // The image's resolution: --mpp, else what the file says (TIFF resolution tags, OME), else
        // none (the gateway then assumes the model's and says so).
        const mpp = flags.mpp > 0 ? flags.mpp : await fileMpp(imagePath);
        const response = await unary(
          client,
          client.segment,
          {
            image: bytes,
            model: '',
            prompts: [],
            promptMode: segmentationProto.PromptMode.PROMPT_MODE_AUTO,
            returnLabelMap: true,
            returnMasks: false,
            minScore: flags.minScore,
            mpp,
          },
          { timeoutMs: flags.timeoutS * 1000 },
        );
        await writeOutputs(flags.out, name, bytes, response, model, response.imageMpp || model.mpp);
        if (response.mppAssumed)
          io.stderr.write(`${name}: no resolution given or in the file; assumed the model's ${response.modelMpp} um/px (pass --mpp)\n`);
        for (const c of response.counts) totals.set(c.className, (totals.get(c.className) ?? 0) + c.count);
        io.stdout.write(
          `${name}: ${response.width}x${response.height}, ${response.tiles} tile${response.tiles > 1 ? 's' : ''}, ` +
            `${response.nuclei.length} nuclei (${formatCounts(response.counts)})\n`,
        );
        if (!flags.quiet) io.stdout.write(`  timings: ${formatTimings(response.timings)}\n`);
      } catch (err) {
        failures++;
        const e = err as { details?: string; message?: string };
        io.stderr.write(`${name}: failed: ${e.details ?? e.message ?? String(err)}\n`);
      }
    }
    if (images.length > 1) {
      io.stdout.write(`total: ${[...totals.entries()].map(([k, v]) => `${k} ${v}`).join(', ')}\n`);
    }
    io.stdout.write(`wrote ${images.length - failures} of ${images.length} image(s) to ${flags.out}\n`);
  } finally {
    client.close();
    process.removeListener('SIGINT', stopStack);
    process.removeListener('SIGTERM', stopStack);
    if (stack) await stack.stop();
  }
  return failures > 0 ? 1 : 0;
}

/** The resolution a TIFF-family file declares (0 when none, or not a format that carries one). */
async function fileMpp(file: string): Promise<number> {
  if (!/\.(tiff?|svs|dcm)$/i.test(file)) return 0;
  try {
    const slide = await openSlide(file);
    try {
      return slide.mpp?.x ?? 0;
    } finally {
      await slide.close();
    }
  } catch {
    return 0;
  }
}
