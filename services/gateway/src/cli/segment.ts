// `cfrsam segment IMAGE... --out DIR [--gateway host:port | --local]`: segments images through a
// gateway (or a stack started for the purpose and stopped afterwards) and writes, per image NAME
// (the file name without its extension; made unique when two inputs share one):
//   NAME.geojson      QuPath FeatureCollection (one detection per nucleus, QuPath's names; in a
//                     slide's coordinates with --origin and --downsample)
//   NAME.csv          one row per nucleus: id, class, score, centroid, bbox, measurements
//   NAME.labels.png   16-bit label map (0 background, i = nucleus i)
//   NAME.json         the ../shared/data sidecar: classNames, instances, classes {id: classIndex}
//   NAME.overlay.png  outlines coloured by class over the image
import { openSlide } from '@cfrsam/slides';
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import sharp from 'sharp';
import { ConfigError, type FlagSpec, makeClient, parseFlags, segmentationProto, status, unary, waitForReady } from '@cfrsam/rpc';
import {
  decodeImage,
  encodeLabelPng,
  encodeOverlayPng,
  labelMapFromBytes,
  nucleiToCsv,
  nucleiToSidecar,
  parseHexColor,
  parseQuPathClassMap,
  type QuPathClassMap,
  type Rgb,
  segmentResponseToGeoJson,
  UNCLASSIFIED_COLOR,
} from '@cfrsam/nuclei';
import { CLIENT_FLAGS, clientSecurity, withRetries } from './clientOptions';
import { formatHelp } from './help';
import { WorkProgress } from './progress';
import { startStack, type RunningStack } from './stack';
import { announceImage } from '../admission/announce';

export interface CliIo {
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WritableStream & { isTTY?: boolean };
}

const defaultIo: CliIo = { stdout: process.stdout, stderr: process.stderr };

const SEGMENT_FLAGS = {
  out: { type: 'string', help: 'output directory (created if needed); required' },
  gateway: { type: 'string', env: 'CFRSAM_GATEWAY', default: '', help: 'gateway address host:port; without it a local stack is started' },
  mpp: {
    type: 'number',
    default: 0,
    help: "micrometres per pixel of the images, resampled to the model's resolution (0: from the file, else the model's)",
  },
  minScore: { type: 'number', default: 0, help: 'drop nuclei scoring below this' },
  timeoutS: { type: 'number', default: 600, help: 'deadline of each Segment call in seconds' },
  maxMessageMb: { type: 'int', default: 256, help: 'max gRPC message size in MiB (label maps of large images)' },
  progress: { type: 'boolean', default: false, help: 'progress with ETA on stderr even when it is not a terminal (on a terminal: always)' },
  quiet: { type: 'boolean', default: false, help: 'print only the summary, no progress' },
} satisfies Record<string, FlagSpec>;

const QUPATH_FLAGS = {
  origin: { type: 'string', default: '', help: "X,Y: the images' top-left corner in the slide they were cut from (level-0 pixels)" },
  downsample: { type: 'number', default: 1, help: 'level-0 pixels per image pixel (a region exported at downsample 4: 4)' },
  cells: {
    type: 'number',
    default: 0,
    help: 'grow each nucleus by this many µm into a QuPath cell object (Nucleus:/Cell: measurements, H&E optical densities); 0: nuclei only',
  },
  qupathClasses: {
    type: 'string',
    env: 'CFRSAM_QUPATH_CLASSES',
    default: '',
    help: 'model class -> QuPath class, "epithelial=Tumor,other=Other#ffc800" or JSON (default: other=Other, inflammatory=Immune cells, spindle-shaped=Stroma)',
  },
} satisfies Record<string, FlagSpec>;

const LOCAL_FLAGS = {
  local: { type: 'boolean', default: false, help: 'start a local stack (the default without --gateway)' },
  bundle: { type: 'string', default: '', help: 'model bundle of the local stack (models/tiny when empty)' },
  decoders: { type: 'int', default: 1, help: 'decoder replicas of the local stack (decoder workers with --standalone)' },
  standalone: {
    type: 'boolean',
    default: false,
    help: 'run the local stack as one process (services/standalone: the stages in the gateway process, no gRPC between them; faster on one machine)',
  },
} satisfies Record<string, FlagSpec>;

const ALL_SEGMENT_FLAGS = { ...SEGMENT_FLAGS, ...QUPATH_FLAGS, ...CLIENT_FLAGS, ...LOCAL_FLAGS };

export const SEGMENT_USAGE = formatHelp(
  'cfrsam segment IMAGE... --out DIR [--gateway HOST:PORT] [flags]',
  `Segments every nucleus of each image (PNG, JPEG, TIFF, WebP, GIF) and writes, per image NAME:
  NAME.geojson      QuPath detections (QuPath's class and measurement names)
  NAME.csv          one row per nucleus: class, score, centroid, bbox, measurements
  NAME.labels.png   16-bit instance label map;  NAME.json  its classes
  NAME.overlay.png  outlines coloured by class over the image
Two inputs with one name (a/x.png, b/x.png) are written as a_x and b_x.`,
  { flags: SEGMENT_FLAGS, "QuPath (GeoJSON in a slide's coordinates)": QUPATH_FLAGS, connection: CLIENT_FLAGS, 'local stack': LOCAL_FLAGS },
  { origin: 'X,Y', ca: 'FILE', token: 'TOKEN', out: 'DIR', gateway: 'HOST:PORT', bundle: 'DIR', qupathClasses: 'MAP' },
);

/** Splits argv into image paths (leading non-flag arguments and any after flags) and flags. */
function splitArgs(argv: readonly string[]): { images: string[]; flags: string[] } {
  const images: string[] = [];
  const flags: string[] = [];
  const booleans = new Set(['local', 'quiet', 'progress', 'tls'].flatMap((f) => [`--${f}`, `--no-${f}`]).concat(['--help', '-h']));
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

/**
 * Output names for the inputs, one each: the file name without its extension; where two inputs
 * share one, their folder is put in front (a/x.png, b/x.png -> a_x, b_x), then the extension
 * (x.png, x.tif -> x_png, x_tif), then a counter.
 */
export function uniqueOutputNames(inputs: readonly string[]): string[] {
  const stem = (p: string) => path.basename(p).replace(/\.(png|jpe?g|tiff?|webp|gif|svs)$/i, '');
  const ext = (p: string) => path.extname(p).slice(1).toLowerCase();
  const parent = (p: string) => path.basename(path.dirname(path.resolve(p)));
  const candidates: Array<(p: string) => string> = [
    stem,
    (p) => `${parent(p)}_${stem(p)}`,
    (p) => `${parent(p)}_${stem(p)}${ext(p) ? `_${ext(p)}` : ''}`,
  ];
  const names = inputs.map(stem);
  for (const make of candidates.slice(1)) {
    const counts = new Map<string, number>();
    for (const n of names) counts.set(n, (counts.get(n) ?? 0) + 1);
    inputs.forEach((p, i) => {
      if ((counts.get(names[i]) ?? 0) > 1) names[i] = make(p);
    });
  }
  const seen = new Map<string, number>();
  return names.map((n) => {
    const k = (seen.get(n) ?? 0) + 1;
    seen.set(n, k);
    return k === 1 ? n : `${n}-${k}`;
  });
}

/** Parses --origin "X,Y" (level-0 pixels). */
export function parseOrigin(text: string): { x: number; y: number } | undefined {
  if (!text.trim()) return undefined;
  const parts = text.split(',').map((v) => Number(v.trim()));
  if (parts.length !== 2 || !parts.every(Number.isFinite)) throw new ConfigError(`--origin must be X,Y in level-0 pixels, got "${text}"`);
  return { x: parts[0], y: parts[1] };
}

/** Writes the five outputs of one segmented image. */
export async function writeOutputs(
  outDir: string,
  name: string,
  imageBytes: Buffer,
  response: segmentationProto.SegmentResponse,
  model: segmentationProto.ModelInfo,
  classMap: QuPathClassMap = {},
): Promise<SegmentOutputs> {
  const classes = model.classes.map((c) => ({ index: c.index, name: c.name, color: c.color }));
  const files: SegmentOutputs = {
    geojson: path.join(outDir, `${name}.geojson`),
    csv: path.join(outDir, `${name}.csv`),
    labels: path.join(outDir, `${name}.labels.png`),
    sidecar: path.join(outDir, `${name}.json`),
    overlay: path.join(outDir, `${name}.overlay.png`),
  };
  const lm = response.labelMap;
  if (!lm) throw new Error('the gateway returned no label map');
  const labels = labelMapFromBytes(lm.data, lm.width, lm.height);
  // The image as the gateway saw it (same decoder, same conversion), for the overlay.
  const image = await decodeImage(imageBytes, { maxPixels: Number.MAX_SAFE_INTEGER, minSide: 1 });
  // Cells, when asked for, are in the response (Nucleus.cell).
  await fs.writeFile(files.geojson, JSON.stringify(segmentResponseToGeoJson(response, classes, classMap)) + '\n');
  await fs.writeFile(files.csv, nucleiToCsv(response.nuclei, classes));
  await fs.writeFile(files.labels, await encodeLabelPng(labels, lm.width, lm.height));
  const sidecar = nucleiToSidecar(
    response.nuclei,
    classes.map((c) => c.name),
    `cfrsam segment (${response.modelName} ${response.modelVersion})`,
    response.imageMpp || model.mpp || undefined,
  );
  await fs.writeFile(files.sidecar, JSON.stringify(sidecar, null, 1) + '\n');
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
  let origin: { x: number; y: number } | undefined;
  let classMap: QuPathClassMap;
  let security: ReturnType<typeof clientSecurity>;
  try {
    flags = parseFlags(ALL_SEGMENT_FLAGS, flagArgs);
    if (!flags.out) throw new ConfigError('--out DIR is required');
    if (images.length === 0) throw new ConfigError('no images given');
    if (flags.gateway && flags.local) throw new ConfigError('give --gateway or --local, not both');
    if (flags.decoders < 1) throw new ConfigError(`--decoders must be >= 1, got ${flags.decoders}`);
    if (!(flags.cells >= 0)) throw new ConfigError(`--cells must be >= 0 µm, got ${flags.cells}`);
    if (!(flags.downsample > 0)) throw new ConfigError(`--downsample must be > 0, got ${flags.downsample}`);
    origin = parseOrigin(flags.origin);
    try {
      classMap = parseQuPathClassMap(flags.qupathClasses);
    } catch (err) {
      throw new ConfigError(`--qupath-classes: ${(err as Error).message}`);
    }
    security = clientSecurity(flags);
  } catch (err) {
    if (err instanceof ConfigError) {
      io.stderr.write(`cfrsam segment: ${err.message.split('\n')[0]}\n(cfrsam segment --help lists the flags)\n`);
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
    io.stderr.write(
      `starting a local stack (${flags.standalone ? 'one process, ' : ''}${flags.decoders} decoder${flags.decoders > 1 ? 's' : ''})...\n`,
    );
    const serviceLog: string[] = [];
    try {
      stack = await startStack({
        bundle: flags.bundle || undefined,
        decoders: flags.decoders,
        standalone: flags.standalone,
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
  const client = makeClient(segmentationProto.SegmentationClient, address, { maxMessageBytes: maxBytes, ...security });
  let failures = 0;
  try {
    try {
      await waitForReady(client, 10_000);
    } catch {
      io.stderr.write(`cfrsam segment: cannot reach the gateway at ${address}\n`);
      return 1;
    }
    const retry = {
      retries: flags.retries,
      onRetry: (attempt: number, err: unknown, delayMs: number) =>
        io.stderr.write(
          `gateway busy or unavailable (${status[(err as { code: number }).code]}: ${(err as { details?: string }).details ?? ''}); ` +
            `retry ${attempt} of ${flags.retries} in ${(delayMs / 1000).toFixed(1)} s\n`,
        ),
    };
    let model: segmentationProto.ModelInfo;
    try {
      model = await withRetries(() => unary(client, client.getModelInfo, {}, { timeoutMs: 10_000 }), retry);
    } catch (err) {
      const e = err as { code?: number; details?: string; message?: string };
      io.stderr.write(
        `cfrsam segment: the gateway at ${address} refused: ${e.code !== undefined ? `${status[e.code]}: ` : ''}${e.details ?? e.message}\n`,
      );
      return 1;
    }
    io.stderr.write(`model ${model.name} ${model.version} at ${address}\n`);
    const totals = new Map<string, number>();
    const names = uniqueOutputNames(images);
    if (!flags.quiet) {
      const renamed = images.map((p, i) => [p, names[i]] as const).filter(([p, n]) => path.basename(p).replace(/\.[^.]*$/, '') !== n);
      for (const [p, n] of renamed) io.stderr.write(`${p}: written as ${n}.* (another input has the same name)\n`);
    }
    // Pixels per image from the headers, for the progress's ETA.
    const pixels = await Promise.all(
      images.map(async (p) => {
        try {
          const m = await sharp(p, { limitInputPixels: false }).metadata();
          return (m.width ?? 0) * (m.height ?? 0);
        } catch {
          return 0;
        }
      }),
    );
    const showProgress = !flags.quiet && (flags.progress || Boolean(io.stderr.isTTY));
    const progress = showProgress
      ? new WorkProgress(
          io,
          pixels.reduce((a, b) => a + b, 0),
          images.length,
          'images',
          (pxPerS) => `${(pxPerS / 1e6).toFixed(2)} Mpx/s`,
        )
      : undefined;
    for (const [index, imagePath] of images.entries()) {
      const name = names[index];
      progress?.start(name, pixels[index]);
      try {
        const bytes = await fs.readFile(imagePath);
        // The image's resolution: --mpp, else what the file says (TIFF resolution tags, OME), else
        // none (the gateway then assumes the model's and says so).
        const mpp = flags.mpp > 0 ? flags.mpp : await fileMpp(imagePath);
        const request: segmentationProto.SegmentRequest = {
          image: bytes,
          model: '',
          prompts: [],
          promptMode: segmentationProto.PromptMode.PROMPT_MODE_AUTO,
          returnLabelMap: true,
          returnMasks: false,
          minScore: flags.minScore,
          mpp,
          origin,
          downsample: flags.downsample,
          // The gateway grows the cells (Nucleus.cell), from its label map and the image it decoded.
          ...(flags.cells > 0 ? { cellExpansionUm: flags.cells } : {}),
        };
        const response = await withRetries(
          () => unary(client, client.segment, request, { timeoutMs: flags.timeoutS * 1000, metadata: announceImage(request.image, request.mpp) }),
          retry,
        );
        await writeOutputs(flags.out, name, bytes, response, model, classMap);
        if (response.mppAssumed)
          io.stderr.write(`${name}: no resolution given or in the file; assumed the model's ${response.modelMpp} um/px (pass --mpp)\n`);
        if (response.imageNotes) io.stderr.write(`${name}: ${response.imageNotes}\n`);
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
      progress?.finish();
    }
    progress?.close();
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
