// `cfrsam slide run SLIDE... --out DIR`: segments whole slides region by region at the model's
// resolution, through a gateway (or a local stack started for the purpose), and writes per slide
// NAME (the file name without its extension), as the regions finish:
//   NAME.geojson.gz     gzip stream of a QuPath FeatureCollection: one `detection` per nucleus in
//                       level-0 pixel coordinates; model, slide mpp, tissue fraction and ROI in the
//                       collection's `properties`
//   NAME.csv            one row per nucleus: the columns of `cfrsam segment`'s CSV, with centroid,
//                       bbox and the px measurements in level-0 pixels, plus the owning region
//   NAME.overview.png   a thumbnail of the slide (long side --overview-size) with the tissue outline,
//                       the ROI and every nucleus centroid as a class-coloured dot
//   NAME.summary.json   the run's summary (sizes, mpp, tissue, regions, nuclei, throughput, peak RSS)
//
// How a slide runs: open it (@cfrsam/slides), take its resolution (the file's mpp, else --mpp),
// find the tissue on a low-resolution level, lay a grid of cells of --region-size pixels at the
// model's resolution (in level 0: region size x modelMpp / slideMpp) over the slide or the ROI and
// keep the cells that touch tissue. Each cell is read with --overlap model pixels of margin on every
// side, resampled to the model's mpp, sent to Segment as PNG with its actual mpp, and the returned
// nuclei are mapped to level 0 (level0 = origin + pixel x scale). A nucleus is kept when its
// level-0 centroid lies in the cell itself (the core; the cells tile the plane) and inside the ROI;
// on a seam, where two regions place the same nucleus' centroid a pixel apart on either side of the
// line, the copies are matched by outline and written once (SeamLedger). Regions run --concurrency at a time; each region's
// nuclei are written and dropped as soon as it finishes, so memory is bounded by the regions in
// flight and the fixed-size overview, never by the slide.
import { promises as fs, readFileSync } from 'node:fs';
import * as path from 'node:path';
import sharp from 'sharp';
import {
  ConfigError,
  defaultBundleDir,
  type FlagSpec,
  makeClient,
  parseFlags,
  segmentationProto,
  status,
  unary,
  usage,
  waitForReady,
} from '@cfrsam/rpc';
import { encodeRgbPng, nucleiToCsv, nucleiToGeoJson, parseHexColor, type ClassStyle, type Rgb, UNCLASSIFIED_COLOR } from '@cfrsam/nuclei';
import {
  detectTissue,
  openSlide,
  pointInRoi,
  readRegionAtMpp,
  resolveMpp,
  SlideError,
  tissueRegions,
  type Mpp,
  type Rect,
  type Roi,
  type Slide,
  type TissueMask,
  type TissueRegion,
} from '@cfrsam/slides';
import { DEFAULT_SLIDE_MARGIN, DEFAULT_SLIDE_REGION_SIZE } from '../config';
import { BlurTally, InOrderWriter, nucleusToLevel0, SeamLedger, TextSink } from '../slideRegions';
import { runSlideJobCommand, SLIDE_JOB_USAGE } from './slideJobCommands';
import { startStack, type RunningStack } from './stack';
import { announceImage } from '../admission/announce';

export { nucleusToLevel0, SeamLedger };

type Nucleus = segmentationProto.Nucleus;

export interface CliIo {
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WritableStream & { isTTY?: boolean };
}

const defaultIo: CliIo = { stdout: process.stdout, stderr: process.stderr };

const RUN_FLAGS = {
  out: { type: 'string', help: 'output directory (created if needed)' },
  gateway: { type: 'string', env: 'CFRSAM_GATEWAY', default: '', help: 'gateway address host:port; without it a local stack is started' },
  bundle: { type: 'string', default: '', help: 'model bundle of the local stack (default models/tiny)' },
  decoders: { type: 'int', default: 1, help: 'decoder replicas of the local stack (decoder workers with --standalone)' },
  standalone: {
    type: 'boolean',
    default: false,
    help: 'run the local stack as one process (services/standalone: the stages in the gateway process, no gRPC between them; faster on one machine)',
  },
  roi: { type: 'string', default: '', help: 'region of interest x,y,w,h in level-0 pixels' },
  roiGeojson: {
    type: 'string',
    default: '',
    help: 'region of interest: a GeoJSON file with one Polygon in level-0 pixels (e.g. a QuPath annotation)',
  },
  mpp: { type: 'number', default: 0, help: "micrometres per level-0 pixel for slides whose file has no resolution (the file's own mpp wins)" },
  regionSize: {
    type: 'int',
    default: DEFAULT_SLIDE_REGION_SIZE,
    help: "side of a region in pixels at the model's resolution (the default reads exactly 6 x 6 tiles of a 256 px model)",
  },
  overlap: {
    type: 'int',
    default: DEFAULT_SLIDE_MARGIN,
    help: "margin read around each region, in pixels at the model's resolution (the default is half the gateway's tile overlap)",
  },
  concurrency: { type: 'int', default: 2, help: 'regions in flight' },
  minScore: { type: 'number', default: 0, help: 'drop nuclei scoring below this' },
  tissueMaxSide: { type: 'int', default: 1024, help: 'long side of the tissue mask in pixels' },
  overviewSize: { type: 'int', default: 2048, help: 'long side of the overview picture in pixels' },
  timeoutS: { type: 'number', default: 600, help: 'deadline of each Segment call in seconds' },
  retries: {
    type: 'int',
    default: 3,
    help: 'retries of a region whose Segment call failed with UNAVAILABLE, RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED',
  },
  maxMessageMb: { type: 'int', default: 256, help: 'max gRPC message size in MiB' },
  quiet: { type: 'boolean', default: false, help: 'no progress output, only errors and the summary' },
} satisfies Record<string, FlagSpec>;

export const SLIDE_RUN_USAGE =
  'usage: cfrsam slide run SLIDE... --out DIR [--gateway host:port] [--roi x,y,w,h | --roi-geojson FILE] [--mpp X]\n' +
  `                        [--region-size ${DEFAULT_SLIDE_REGION_SIZE}] [--overlap ${DEFAULT_SLIDE_MARGIN}] [--concurrency 2]\n` +
  'Segments every tissue region of each slide (Aperio SVS, pyramidal/OME-TIFF, DICOM WSI, OpenSlide formats, PNG/JPEG/TIFF)\n' +
  "at the model's resolution and writes NAME.geojson.gz, NAME.csv, NAME.overview.png and NAME.summary.json.\n" +
  'Exit code: 0 all slides done, 2 a slide was bad input (the others are still processed), 1 other failures.\n' +
  usage(RUN_FLAGS);

export const SLIDE_USAGE = `usage: cfrsam slide <subcommand> [flags]\n\nsubcommands:\n  run        segment whole slides region by region (cfrsam slide run --help)\n${SLIDE_JOB_USAGE}`;

/** Thrown for bad input of one slide: reported as one line, exit code 2, the other slides go on. */
class BadInput extends Error {}

export async function runSlide(argv: readonly string[], io: CliIo = defaultIo): Promise<number> {
  const [sub, ...rest] = argv;
  if (!sub || sub === '--help' || sub === '-h' || sub === 'help') {
    io.stdout.write(`${SLIDE_USAGE}\n`);
    return sub ? 0 : 2;
  }
  if (sub === 'run') return runSlideRun(rest, io);
  if (['submit', 'status', 'list', 'cancel', 'result', 'upload'].includes(sub)) return runSlideJobCommand(sub, rest, io, parseRoiGeoJson);
  io.stderr.write(`cfrsam slide: unknown subcommand "${sub}"\n${SLIDE_USAGE}\n`);
  return 2;
}

function splitArgs(argv: readonly string[]): { slides: string[]; flags: string[] } {
  const slides: string[] = [];
  const flags: string[] = [];
  const booleans = new Set(['--quiet', '--no-quiet', '--help', '-h']);
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a.startsWith('-') && a.length > 1) {
      flags.push(a);
      if (!a.includes('=') && !booleans.has(a) && i + 1 < argv.length) flags.push(argv[++i]);
    } else {
      slides.push(a);
    }
  }
  return { slides, flags };
}

/** `x,y,w,h` in level-0 pixels. */
export function parseRoiRect(text: string): Roi {
  const parts = text.split(',').map((s) => s.trim());
  const v = parts.map(Number);
  if (parts.length !== 4 || v.some((n, i) => parts[i] === '' || !Number.isFinite(n))) {
    throw new ConfigError(`--roi wants x,y,w,h (four numbers in level-0 pixels), got "${text}"`);
  }
  if (!(v[2] > 0 && v[3] > 0)) throw new ConfigError(`--roi width and height must be positive, got "${text}"`);
  return { x: v[0], y: v[1], width: v[2], height: v[3] };
}

/** The one Polygon (outer ring) of a GeoJSON geometry, Feature or FeatureCollection. */
export function parseRoiGeoJson(text: string, file: string): Roi {
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (err) {
    throw new ConfigError(`--roi-geojson ${file}: not JSON (${(err as Error).message})`);
  }
  const rings: number[][][] = [];
  const visit = (g: unknown): void => {
    if (!g || typeof g !== 'object') return;
    const o = g as { type?: string; features?: unknown[]; geometry?: unknown; geometries?: unknown[]; coordinates?: unknown };
    if (o.type === 'FeatureCollection') (o.features ?? []).forEach(visit);
    else if (o.type === 'Feature') visit(o.geometry);
    else if (o.type === 'GeometryCollection') (o.geometries ?? []).forEach(visit);
    else if (o.type === 'Polygon' && Array.isArray(o.coordinates)) rings.push(o.coordinates[0] as number[][]);
    else if (o.type === 'MultiPolygon' && Array.isArray(o.coordinates)) for (const p of o.coordinates as number[][][][]) rings.push(p[0]);
  };
  visit(doc);
  if (rings.length !== 1) {
    throw new ConfigError(`--roi-geojson ${file}: expected exactly one Polygon, found ${rings.length}`);
  }
  const ring = rings[0];
  if (!Array.isArray(ring) || ring.length < 3 || ring.some((p) => !Array.isArray(p) || !Number.isFinite(p[0]) || !Number.isFinite(p[1]))) {
    throw new ConfigError(`--roi-geojson ${file}: the polygon needs at least 3 [x, y] points`);
  }
  const pts = ring.map((p) => [Number(p[0]), Number(p[1])] as [number, number]);
  const [a, b] = [pts[0], pts[pts.length - 1]];
  if (pts.length > 3 && a[0] === b[0] && a[1] === b[1]) pts.pop();
  return { polygon: pts };
}

/** NAME of the outputs: the file name without its extension(s) (.ome.tif, .svs, ...). */
export function slideName(file: string): string {
  const base = path.basename(file.replace(/[\\/]+$/, ''));
  const stripped = /\.ome\.tiff?$/i.test(base) ? base.replace(/\.ome\.tiff?$/i, '') : base.replace(/\.[A-Za-z0-9]{1,5}$/, '');
  return stripped || base;
}

// ---------------------------------------------------------------------------------------------
// Writers

/** The slide's thumbnail, painted into a fixed-size RGB buffer. */
class Overview {
  private constructor(
    readonly width: number,
    readonly height: number,
    /** overview pixels per level-0 pixel */
    readonly sx: number,
    readonly sy: number,
    readonly data: Buffer,
    readonly dotRadius: number,
  ) {}

  static async create(slide: Slide, maxSide: number, mpp: Mpp): Promise<Overview> {
    const L0 = slide.levels[0];
    const s = Math.min(1, maxSide / Math.max(L0.width, L0.height));
    const width = Math.max(1, Math.round(L0.width * s)),
      height = Math.max(1, Math.round(L0.height * s));
    const data = Buffer.alloc(width * height * 3, 255);
    // The coarsest level still at least as large as the overview; read in blocks (memory bounded
    // by a block, never the level) and resized into place.
    let level = 0;
    slide.levels.forEach((L, i) => {
      if (L.width >= width && L.height >= height && L.downsample > slide.levels[level].downsample) level = i;
    });
    const L = slide.levels[level];
    const fx = L.width / width,
      fy = L.height / height;
    const block = Math.max(32, Math.min(512, Math.round(2048 / Math.max(fx, fy))));
    for (let oy = 0; oy < height; oy += block) {
      for (let ox = 0; ox < width; ox += block) {
        const ow = Math.min(block, width - ox),
          oh = Math.min(block, height - oy);
        const lx0 = Math.floor(ox * fx),
          ly0 = Math.floor(oy * fy);
        const lx1 = Math.min(L.width, Math.max(lx0 + 1, Math.ceil((ox + ow) * fx)));
        const ly1 = Math.min(L.height, Math.max(ly0 + 1, Math.ceil((oy + oh) * fy)));
        const img = await slide.readRegion({ level, x: lx0, y: ly0, width: lx1 - lx0, height: ly1 - ly0 });
        const px =
          img.width === ow && img.height === oh
            ? Buffer.from(img.data.buffer, img.data.byteOffset, img.data.byteLength)
            : await sharp(img.data, { raw: { width: img.width, height: img.height, channels: 3 } })
                .resize(ow, oh, { fit: 'fill', kernel: 'lanczos3' })
                .raw()
                .toBuffer();
        for (let r = 0; r < oh; r++) px.copy(data, ((oy + r) * width + ox) * 3, r * ow * 3, (r + 1) * ow * 3);
      }
    }
    // Dots of about 2.5 um radius, at most 3 px (0: one pixel on a large slide).
    const dotRadius = Math.max(0, Math.min(3, Math.round((2.5 * s) / mpp.x)));
    return new Overview(width, height, width / L0.width, height / L0.height, data, dotRadius);
  }

  private set(x: number, y: number, c: Rgb): void {
    if (x < 0 || y < 0 || x >= this.width || y >= this.height) return;
    const i = (y * this.width + x) * 3;
    this.data[i] = c[0];
    this.data[i + 1] = c[1];
    this.data[i + 2] = c[2];
  }

  /** A class-coloured dot at a level-0 point. */
  dot(x0: number, y0: number, c: Rgb): void {
    const cx = Math.floor(x0 * this.sx),
      cy = Math.floor(y0 * this.sy),
      r = this.dotRadius;
    for (let dy = -r; dy <= r; dy++) {
      for (let dx = -r; dx <= r; dx++) if (dx * dx + dy * dy <= r * r + r) this.set(cx + dx, cy + dy, c);
    }
  }

  /** The tissue mask's outline (1 px) and a light tint of the glass outside it. */
  tissue(t: TissueMask): void {
    const { width: W, height: H } = this;
    const inside = new Uint8Array(W * H);
    for (let y = 0; y < H; y++) {
      const my = Math.min(t.height - 1, Math.floor((y + 0.5) / this.sy / t.downsample.y));
      for (let x = 0; x < W; x++) {
        const mx = Math.min(t.width - 1, Math.floor((x + 0.5) / this.sx / t.downsample.x));
        inside[y * W + x] = t.mask[my * t.width + mx];
      }
    }
    const outline: Rgb = [0, 150, 60];
    for (let y = 0; y < H; y++) {
      for (let x = 0; x < W; x++) {
        const i = y * W + x;
        if (!inside[i]) {
          // glass: blend 25% towards light grey so tissue stands out
          for (let k = 0; k < 3; k++) this.data[i * 3 + k] = Math.round(this.data[i * 3 + k] * 0.75 + 200 * 0.25);
          continue;
        }
        const edge = x === 0 || y === 0 || x === W - 1 || y === H - 1 || !inside[i - 1] || !inside[i + 1] || !inside[i - W] || !inside[i + W];
        if (edge) this.set(x, y, outline);
      }
    }
  }

  /** The ROI's outline (rectangle or polygon) in blue. */
  roi(roi: Roi): void {
    this.outline('polygon' in roi ? roi.polygon : corners(roi), [30, 60, 230]);
  }

  /** A region whose tiles the model mostly called blurred, outlined in orange. */
  blurred(region: Rect): void {
    this.outline(corners(region), [240, 130, 0]);
  }

  /** A closed polygon of level-0 points, 1 px wide. */
  private outline(pts: readonly (readonly [number, number])[], c: Rgb): void {
    for (let i = 0; i < pts.length; i++) {
      const [ax, ay] = pts[i],
        [bx, by] = pts[(i + 1) % pts.length];
      const x0 = ax * this.sx,
        y0 = ay * this.sy,
        x1 = bx * this.sx,
        y1 = by * this.sy;
      const n = Math.max(1, Math.ceil(2 * Math.hypot(x1 - x0, y1 - y0)));
      for (let k = 0; k <= n; k++) {
        const x = Math.min(this.width - 1, Math.floor(x0 + ((x1 - x0) * k) / n));
        const y = Math.min(this.height - 1, Math.floor(y0 + ((y1 - y0) * k) / n));
        this.set(x, y, c);
      }
    }
  }

  png(): Promise<Buffer> {
    return sharp(this.data, { raw: { width: this.width, height: this.height, channels: 3 } })
      .png({ compressionLevel: 6 })
      .toBuffer();
  }
}

function corners(r: Rect): [number, number][] {
  return [
    [r.x, r.y],
    [r.x + r.width, r.y],
    [r.x + r.width, r.y + r.height],
    [r.x, r.y + r.height],
  ];
}

// ---------------------------------------------------------------------------------------------
// Progress

function formatDuration(s: number): string {
  if (!Number.isFinite(s) || s < 0) return '--';
  s = Math.round(s);
  const h = Math.floor(s / 3600),
    m = Math.floor((s % 3600) / 60),
    sec = s % 60;
  return h > 0 ? `${h}h${String(m).padStart(2, '0')}m` : m > 0 ? `${m}m${String(sec).padStart(2, '0')}s` : `${sec}s`;
}

class Progress {
  private lastDraw = 0;
  private readonly started = performance.now();
  private readonly tty: boolean;

  constructor(
    private readonly io: CliIo,
    private readonly name: string,
    private readonly totalRegions: number,
    private readonly totalTissueMpx: number,
    private readonly enabled: boolean,
  ) {
    this.tty = Boolean(io.stderr.isTTY);
  }

  update(done: number, nuclei: number, tissueMpxDone: number, force = false): void {
    if (!this.enabled) return;
    const now = performance.now();
    const interval = this.tty ? 200 : 5000;
    if (!force && now - this.lastDraw < interval) return;
    this.lastDraw = now;
    const elapsed = (now - this.started) / 1000;
    const rate = elapsed > 0 ? tissueMpxDone / elapsed : 0;
    const eta = rate > 0 ? (this.totalTissueMpx - tissueMpxDone) / rate : NaN;
    const frac = this.totalRegions > 0 ? done / this.totalRegions : 1;
    const stats =
      `${done}/${this.totalRegions} regions, ${nuclei} nuclei, ${rate.toFixed(3)} tissue Mpx/s, ` +
      `${formatDuration(elapsed)} elapsed, ETA ${done >= this.totalRegions ? '0s' : formatDuration(eta)}`;
    if (this.tty) {
      const w = 24,
        filled = Math.round(frac * w);
      this.io.stderr.write(`\r\x1b[K${this.name} [${'#'.repeat(filled)}${'-'.repeat(w - filled)}] ${(frac * 100).toFixed(0)}% ${stats}`);
    } else {
      this.io.stderr.write(`${this.name}: ${stats}\n`);
    }
  }

  finish(): void {
    if (this.enabled && this.tty) this.io.stderr.write('\n');
  }
}

// ---------------------------------------------------------------------------------------------
// Peak memory

/** VmHWM (peak resident set) of a process in MiB, from /proc (Linux); null where unreadable. */
export function peakRssMbOfPid(pid: number | undefined): number | null {
  if (!pid) return null;
  try {
    const m = /^VmHWM:\s+(\d+)\s+kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Math.round((Number(m[1]) / 1024) * 10) / 10 : null;
  } catch {
    return null;
  }
}

function ownPeakRssMb(): number {
  return Math.round((process.resourceUsage().maxRSS / 1024) * 10) / 10; // maxRSS is in KiB
}

// ---------------------------------------------------------------------------------------------
// The run

interface Segmenter {
  model: segmentationProto.ModelInfo;
  client: segmentationProto.SegmentationClient;
  stack?: RunningStack;
  stackStartS?: number;
}

export interface SlideSummary {
  slide: string;
  name: string;
  format: string;
  level0: { width: number; height: number };
  levels: number;
  mpp: { x: number; y: number; source: string };
  model: { name: string; version: string; mpp: number };
  tissueFraction: number;
  roi: Roi | null;
  regionSize: { model: number; level0: { width: number; height: number } };
  overlap: number;
  concurrency: number;
  regions: number;
  regionsFailed: number;
  nuclei: number;
  nucleiByClass: Record<string, number>;
  /**
   * Model tiles run, and those the model's blur gate called blurred (their nuclei held to
   * its lower score bar); the regions where they were more than half, in level-0 pixels.
   */
  tiles: { model: number; blurred: number };
  blurredRegions: Rect[];
  tissueMpx: { level0: number; model: number };
  wallS: number;
  prepareS: number;
  segmentS: number;
  tissueMpxPerS: number;
  regionsPerS: number;
  peakRssMb: Record<string, number | null>;
  outputs: { geojson: string; csv: string; overview: string; summary: string };
}

interface Prepared {
  slide: Slide;
  mpp: Mpp;
  tissue: TissueMask;
  regions: TissueRegion[];
  cellL0: { width: number; height: number };
  prepareS: number;
}

function describeError(err: unknown): string {
  const e = err as { details?: string; message?: string };
  return (e.details ?? e.message ?? String(err)).split('\n')[0];
}

export async function runSlideRun(argv: readonly string[], io: CliIo = defaultIo): Promise<number> {
  if (argv.includes('--help') || argv.includes('-h')) {
    io.stdout.write(`${SLIDE_RUN_USAGE}\n`);
    return 0;
  }
  const { slides, flags: flagArgs } = splitArgs(argv);
  let flags;
  let roi: Roi | null = null;
  try {
    flags = parseFlags(RUN_FLAGS, flagArgs);
    if (!flags.out) throw new ConfigError('--out DIR is required');
    if (slides.length === 0) throw new ConfigError('no slides given');
    if (flags.roi && flags.roiGeojson) throw new ConfigError('give --roi or --roi-geojson, not both');
    if (flags.regionSize < 64) throw new ConfigError(`--region-size must be >= 64, got ${flags.regionSize}`);
    if (flags.overlap < 0 || flags.overlap >= flags.regionSize) throw new ConfigError(`--overlap must be in [0, region size), got ${flags.overlap}`);
    if (flags.concurrency < 1) throw new ConfigError(`--concurrency must be >= 1, got ${flags.concurrency}`);
    if (flags.decoders < 1) throw new ConfigError(`--decoders must be >= 1, got ${flags.decoders}`);
    if (flags.mpp < 0 || !Number.isFinite(flags.mpp)) throw new ConfigError(`--mpp must be a positive number, got ${flags.mpp}`);
    if (flags.overviewSize < 16) throw new ConfigError(`--overview-size must be >= 16, got ${flags.overviewSize}`);
    if (flags.roi) roi = parseRoiRect(flags.roi);
    if (flags.roiGeojson) {
      let text: string;
      try {
        text = await fs.readFile(flags.roiGeojson, 'utf8');
      } catch (err) {
        throw new ConfigError(`--roi-geojson: cannot read ${flags.roiGeojson}: ${(err as Error).message}`);
      }
      roi = parseRoiGeoJson(text, flags.roiGeojson);
    }
  } catch (err) {
    if (err instanceof ConfigError) {
      io.stderr.write(`cfrsam slide run: ${err.message.split('\n')[0]}\n${SLIDE_RUN_USAGE}\n`);
      return 2;
    }
    throw err;
  }
  await fs.mkdir(flags.out, { recursive: true });

  // The model's mpp: from the gateway, or from the bundle the local stack will serve (so slides are
  // opened and checked before the stack is started, and a run of only bad slides starts nothing).
  let segmenter: Segmenter | undefined;
  const maxBytes = flags.maxMessageMb * 1024 * 1024;
  let modelMpp: number;
  const connect = async (address: string): Promise<Segmenter> => {
    const client = makeClient(segmentationProto.SegmentationClient, address, { maxMessageBytes: maxBytes });
    try {
      await waitForReady(client, 10_000);
    } catch {
      client.close();
      throw new Error(`cannot reach the gateway at ${address}`);
    }
    const model = await unary(client, client.getModelInfo, {}, { timeoutMs: 10_000 });
    return { client, model };
  };
  // Ctrl-C / SIGTERM: stop the local stack's processes, then exit (partial outputs stay as written).
  const stopStack = (signal: NodeJS.Signals) =>
    void (segmenter?.stack?.stop() ?? Promise.resolve()).finally(() => process.exit(signal === 'SIGINT' ? 130 : 143));
  if (flags.gateway) {
    try {
      segmenter = await connect(flags.gateway);
    } catch (err) {
      io.stderr.write(`cfrsam slide run: ${describeError(err)}\n`);
      return 1;
    }
    modelMpp = segmenter.model.mpp;
    io.stderr.write(`model ${segmenter.model.name} ${segmenter.model.version} (${modelMpp} um/px) at ${flags.gateway}\n`);
  } else {
    const bundle = path.resolve(flags.bundle || defaultBundleDir());
    try {
      modelMpp = Number(JSON.parse(await fs.readFile(path.join(bundle, 'manifest.json'), 'utf8')).mpp);
    } catch (err) {
      io.stderr.write(`cfrsam slide run: cannot read the model bundle's manifest in ${bundle}: ${describeError(err)}\n`);
      return 1;
    }
  }
  if (!(modelMpp! > 0)) {
    io.stderr.write('cfrsam slide run: the model declares no resolution (mpp); cannot resample slides to it\n');
    return 1;
  }
  const ensureSegmenter = async (): Promise<Segmenter> => {
    if (segmenter) return segmenter;
    io.stderr.write(
      `starting a local stack (${flags.standalone ? 'one process, ' : ''}${flags.decoders} decoder${flags.decoders > 1 ? 's' : ''})...\n`,
    );
    const t0 = performance.now();
    const stack = await startStack({
      bundle: flags.bundle || undefined,
      decoders: flags.decoders,
      standalone: flags.standalone,
      port: 0,
      log: (name, line) => {
        if (!flags.quiet && /error|fail/i.test(line)) io.stderr.write(`[${name}] ${line}\n`);
      },
    });
    process.once('SIGINT', stopStack);
    process.once('SIGTERM', stopStack);
    try {
      const s = await connect(stack.gateway);
      segmenter = { ...s, stack, stackStartS: (performance.now() - t0) / 1000 };
    } catch (err) {
      await stack.stop();
      throw err;
    }
    if (Math.abs(segmenter.model.mpp - modelMpp) > 1e-6) {
      modelMpp = segmenter.model.mpp;
    }
    io.stderr.write(
      `model ${segmenter.model.name} ${segmenter.model.version} (${modelMpp} um/px), local stack at ${stack.gateway} (started in ${segmenter.stackStartS!.toFixed(1)} s)\n`,
    );
    return segmenter;
  };

  const usedNames = new Set<string>();
  let badInput = 0,
    failed = 0;
  try {
    for (const file of slides) {
      let prepared: Prepared | undefined;
      try {
        prepared = await prepareSlide(file, flags, roi, modelMpp);
      } catch (err) {
        badInput++;
        io.stderr.write(`cfrsam slide run: ${file}: ${slideErrorText(err, file)}\n`);
        continue;
      }
      // Two slides with the same file name in one run: NAME, NAME-2, ...
      let name = slideName(file);
      for (let k = 2; usedNames.has(name); k++) name = `${slideName(file)}-${k}`;
      usedNames.add(name);
      try {
        let seg: Segmenter;
        try {
          seg = await ensureSegmenter();
        } catch (err) {
          io.stderr.write(`cfrsam slide run: cannot start the local stack: ${describeError(err)}\n`);
          return 1;
        }
        const result = await runOneSlide(file, name, prepared, seg, flags, roi, modelMpp, io);
        if (result === 'bad-input') badInput++;
        else if (result === 'failed') failed++;
      } finally {
        await prepared.slide.close().catch(() => undefined);
      }
    }
  } finally {
    segmenter?.client.close();
    process.removeListener('SIGINT', stopStack);
    process.removeListener('SIGTERM', stopStack);
    if (segmenter?.stack) await segmenter.stack.stop();
  }
  const ok = slides.length - badInput - failed;
  io.stdout.write(
    `wrote ${ok} of ${slides.length} slide(s) to ${flags.out}${badInput ? `; ${badInput} bad input` : ''}${failed ? `; ${failed} failed` : ''}\n`,
  );
  return badInput > 0 ? 2 : failed > 0 ? 1 : 0;
}

/** One line naming the problem (the file is printed before it). */
function slideErrorText(err: unknown, file: string): string {
  if (err instanceof SlideError) {
    let msg = err.message;
    if (err.file && msg.endsWith(` (${err.file})`)) msg = msg.slice(0, -(err.file.length + 3));
    if (err.code === 'NO_RESOLUTION') msg += '; pass --mpp X (micrometres per pixel of level 0)';
    return msg.split('\n')[0];
  }
  if (err instanceof BadInput) return err.message;
  const msg = describeError(err);
  return msg.replace(` (${file})`, '');
}

type RunFlags = ReturnType<typeof parseFlags<typeof RUN_FLAGS>>;

async function prepareSlide(file: string, flags: RunFlags, roi: Roi | null, modelMpp: number): Promise<Prepared> {
  const t0 = performance.now();
  try {
    await fs.access(file);
  } catch {
    throw new BadInput('cannot read the file (not found or no permission)');
  }
  const slide = await openSlide(file);
  try {
    const mpp = slide.mpp ?? resolveMpp(slide, flags.mpp > 0 ? flags.mpp : undefined);
    const tissue = await detectTissue(slide, { maxSide: flags.tissueMaxSide });
    const cellL0 = {
      width: Math.max(1, Math.round((flags.regionSize * modelMpp) / mpp.x)),
      height: Math.max(1, Math.round((flags.regionSize * modelMpp) / mpp.y)),
    };
    const regions = tissueRegions(tissue, cellL0, roi ? { roi } : {});
    return { slide, mpp, tissue, regions, cellL0, prepareS: (performance.now() - t0) / 1000 };
  } catch (err) {
    await slide.close().catch(() => undefined);
    throw err;
  }
}

const RETRYABLE = new Set<number>([status.UNAVAILABLE, status.RESOURCE_EXHAUSTED, status.DEADLINE_EXCEEDED]);

async function runOneSlide(
  file: string,
  name: string,
  p: Prepared,
  seg: Segmenter,
  flags: RunFlags,
  roi: Roi | null,
  modelMpp: number,
  io: CliIo,
): Promise<'ok' | 'bad-input' | 'failed'> {
  const t0 = performance.now();
  const { slide, mpp, tissue, regions } = p;
  const L0 = slide.levels[0];
  const level0 = { width: L0.width, height: L0.height };
  const model = seg.model;
  const classes: ClassStyle[] = model.classes.map((c) => ({ index: c.index, name: c.name, color: c.color }));
  const colorOf = (i: number): Rgb => (i >= 0 ? parseHexColor(classes.find((c) => c.index === i)?.color ?? '') : [...UNCLASSIFIED_COLOR]);
  const outputs = {
    geojson: path.join(flags.out, `${name}.geojson.gz`),
    csv: path.join(flags.out, `${name}.csv`),
    overview: path.join(flags.out, `${name}.overview.png`),
    summary: path.join(flags.out, `${name}.summary.json`),
  };
  const toModel = (mpp.x / modelMpp) * (mpp.y / modelMpp);
  const regionTissueMpx = (r: TissueRegion) => (r.width * r.height * r.tissueFraction) / 1e6;
  const totalTissueL0 = regions.reduce((s, r) => s + regionTissueMpx(r), 0);
  const marginL0 = { x: (flags.overlap * modelMpp) / mpp.x, y: (flags.overlap * modelMpp) / mpp.y };

  io.stderr.write(
    `${name}: ${slide.format} ${L0.width}x${L0.height} px, ${slide.levels.length} level(s), ${mpp.x} um/px (${mpp.source}` +
      `${flags.mpp > 0 && slide.mpp ? '; --mpp ignored: the file has its own' : ''}), tissue ${(tissue.fraction * 100).toFixed(1)}%${roi ? ', ROI ' + JSON.stringify(roi) : ''}: ${regions.length} region(s) of ` +
      `${flags.regionSize} px at ${modelMpp} um/px (${p.cellL0.width}x${p.cellL0.height} level-0 px), ` +
      `${(totalTissueL0 * toModel).toFixed(2)} tissue Mpx at the model's resolution\n`,
  );

  let overview: Overview;
  try {
    overview = await Overview.create(slide, flags.overviewSize, mpp);
  } catch (err) {
    io.stderr.write(`cfrsam slide run: ${file}: ${slideErrorText(err, file)}\n`);
    return err instanceof SlideError ? 'bad-input' : 'failed';
  }
  overview.tissue(tissue);
  if (roi) overview.roi(roi);

  const geo = new TextSink(outputs.geojson, true);
  const csv = new TextSink(outputs.csv, false);
  const properties = {
    software: 'cfrsam slide run',
    coordinates: 'level-0 pixels',
    model: { name: model.name, version: model.version, mpp: modelMpp },
    slide: { file: path.basename(file), format: slide.format, width: L0.width, height: L0.height, mpp: { x: mpp.x, y: mpp.y, source: mpp.source } },
    tissueFraction: tissue.fraction,
    roi,
    regionSize: flags.regionSize,
    overlap: flags.overlap,
  };
  // Column header of `cfrsam segment`'s CSV, plus the region that owns the nucleus.
  const csvHeader = nucleiToCsv([], classes).trimEnd();
  let nucleiWritten = 0,
    featuresWritten = 0;
  const byClass: Record<string, number> = {};
  let done = 0,
    regionsFailed = 0,
    consecutiveFailures = 0,
    tissueDone = 0;
  const blur = new BlurTally();
  let abort: { kind: 'bad-input' | 'failed'; message: string } | undefined;
  const progress = new Progress(io, name, regions.length, totalTissueL0 * toModel, !flags.quiet);
  const imageKey = `${path.basename(file)}:${L0.width}x${L0.height}`;

  // Seam band: 16 px at the model's resolution (a nucleus' centroid estimated from two regions
  // differs by up to several pixels), at most the margin read around each region.
  const band = { x: Math.min(marginL0.x, (16 * modelMpp) / mpp.x), y: Math.min(marginL0.y, (16 * modelMpp) / mpp.y) };
  const seams = new SeamLedger(regions, band);
  // In region order, so that the seam nuclei (and the ids) do not depend on which region finished first.
  const writer = new InOrderWriter<Nucleus[]>(async (regionIndex, candidates) => {
    const feats: string[] = [];
    const kept: Nucleus[] = [];
    for (const n of seams.admit(regionIndex, candidates)) {
      n.id = nucleiWritten + kept.length + 1; // ids in write order: 1..N over the slide
      const f = nucleiToGeoJson([n], classes, imageKey).features[0];
      if (!f) continue; // no polygon: written nowhere, so the CSV and the GeoJSON agree
      feats.push(JSON.stringify(f));
      kept.push(n);
    }
    if (feats.length > 0) {
      await geo.write((featuresWritten > 0 ? ',\n' : '') + feats.join(',\n'));
      featuresWritten += feats.length;
      const rows = nucleiToCsv(kept, classes).split('\n').slice(1, -1);
      await csv.write(rows.map((r) => `${r},${regionIndex}`).join('\n') + '\n');
    }
    for (const n of kept) {
      overview.dot(n.centroid?.x ?? 0, n.centroid?.y ?? 0, colorOf(n.classIndex));
      byClass[n.className || 'unclassified'] = (byClass[n.className || 'unclassified'] ?? 0) + 1;
    }
    nucleiWritten += kept.length;
  });
  /** A failed region: nothing of it is written, and the regions after it are not held back. */
  const skipRegion = (index: number): void => {
    // A write error surfaces where the writes are awaited (the next region's, or the end).
    writer.done(index, null).catch(() => undefined);
  };

  const segmentRegion = async (index: number): Promise<void> => {
    const cell = regions[index];
    const rect = { x: cell.x - marginL0.x, y: cell.y - marginL0.y, width: cell.width + 2 * marginL0.x, height: cell.height + 2 * marginL0.y };
    let region;
    try {
      region = await readRegionAtMpp(slide, rect, modelMpp, { slideMpp: mpp });
    } catch (err) {
      abort ??= { kind: err instanceof SlideError ? 'bad-input' : 'failed', message: slideErrorText(err, file) };
      return skipRegion(index);
    }
    const png = await encodeRgbPng(region);
    const regionMpp = (region.mpp.x + region.mpp.y) / 2;
    const request = segmentationProto.SegmentRequest.fromPartial({
      image: png,
      promptMode: segmentationProto.PromptMode.PROMPT_MODE_AUTO,
      returnLabelMap: false,
      returnMasks: false,
      minScore: flags.minScore,
      mpp: regionMpp,
    });
    let response: segmentationProto.SegmentResponse | undefined;
    for (let attempt = 0; ; attempt++) {
      try {
        response = await unary(seg.client, seg.client.segment, request, {
          timeoutMs: flags.timeoutS * 1000,
          metadata: announceImage(request.image, request.mpp),
        });
        break;
      } catch (err) {
        const code = (err as { code?: number }).code;
        if (attempt < flags.retries && code !== undefined && RETRYABLE.has(code)) {
          await new Promise((r) => setTimeout(r, 500 * 2 ** attempt));
          continue;
        }
        regionsFailed++;
        consecutiveFailures++;
        io.stderr.write(`\n${name}: region ${index} at (${cell.x},${cell.y}) failed: ${describeError(err)}\n`);
        if (consecutiveFailures >= 5) abort ??= { kind: 'failed', message: `5 regions in a row failed; last: ${describeError(err)}` };
        return skipRegion(index);
      }
    }
    consecutiveFailures = 0;
    blur.add(cell, response);
    const candidates: Nucleus[] = [];
    for (const n of response.nuclei) {
      if (!n.centroid) continue;
      const cx = region.origin.x + n.centroid.x * region.scale.x;
      const cy = region.origin.y + n.centroid.y * region.scale.y;
      if (!seams.candidate(index, cx, cy)) continue; // the cell and a seam band around it (SeamLedger)
      if (cx < 0 || cy < 0 || cx >= level0.width || cy >= level0.height) continue;
      if (roi && !pointInRoi(roi, cx, cy)) continue;
      candidates.push(nucleusToLevel0(n, region.origin, region.scale, level0, 0));
    }
    // Not awaited: the worker goes on to its next region while this one waits for those before it
    // to be written. What waits is the candidates of regions done ahead of a slow one (a few
    // hundred nuclei each), not their images.
    writer.done(index, candidates).catch((err) => {
      abort ??= { kind: 'failed', message: `cannot write the outputs: ${describeError(err)}` };
    });
    tissueDone += regionTissueMpx(cell);
    done++;
    progress.update(done, nucleiWritten, tissueDone * toModel);
  };

  try {
    await geo.write(`{"type":"FeatureCollection","properties":${JSON.stringify(properties)},"features":[\n`);
    await csv.write(`${csvHeader},region\n`);
    let next = 0;
    const worker = async () => {
      while (!abort && next < regions.length) await segmentRegion(next++);
    };
    const tSeg = performance.now();
    progress.update(0, 0, 0, true);
    await Promise.all(Array.from({ length: Math.min(flags.concurrency, Math.max(1, regions.length)) }, worker));
    await writer.flush().catch(() => undefined); // a write error is in `abort`
    const segmentS = (performance.now() - tSeg) / 1000;
    progress.update(done, nucleiWritten, tissueDone * toModel, true);
    progress.finish();
    if (abort) throw Object.assign(new Error(abort.message), { kind: abort.kind });
    await geo.write('\n]}\n');
    await geo.end();
    await csv.end();
    for (const region of blur.blurredRegions) overview.blurred(region);
    await fs.writeFile(outputs.overview, await overview.png());

    const wallS = (performance.now() - t0) / 1000 + p.prepareS;
    const peakRssMb: Record<string, number | null> = { cli: ownPeakRssMb() };
    for (const proc of seg.stack?.processes ?? []) peakRssMb[proc.name] = peakRssMbOfPid(proc.child.pid);
    const tissueModelMpx = totalTissueL0 * toModel;
    const summary: SlideSummary = {
      slide: file,
      name,
      format: slide.format,
      level0,
      levels: slide.levels.length,
      mpp: { x: mpp.x, y: mpp.y, source: mpp.source },
      model: { name: model.name, version: model.version, mpp: modelMpp },
      tissueFraction: tissue.fraction,
      roi,
      regionSize: { model: flags.regionSize, level0: p.cellL0 },
      overlap: flags.overlap,
      concurrency: flags.concurrency,
      regions: regions.length,
      regionsFailed,
      nuclei: nucleiWritten,
      nucleiByClass: byClass,
      tiles: blur.tiles,
      blurredRegions: blur.blurredRegions,
      tissueMpx: { level0: totalTissueL0, model: tissueModelMpx },
      wallS,
      prepareS: p.prepareS,
      segmentS,
      tissueMpxPerS: wallS > 0 ? tissueModelMpx / wallS : 0,
      regionsPerS: wallS > 0 ? regions.length / wallS : 0,
      peakRssMb,
      outputs,
    };
    await fs.writeFile(outputs.summary, JSON.stringify(summary, null, 1) + '\n');
    io.stdout.write(formatSummary(summary, seg.stackStartS));
    if (regionsFailed > 0) {
      io.stderr.write(`cfrsam slide run: ${file}: ${regionsFailed} of ${regions.length} region(s) failed; the outputs miss their nuclei\n`);
      return 'failed';
    }
    return 'ok';
  } catch (err) {
    progress.finish();
    geo.destroy();
    csv.destroy();
    await Promise.all(Object.values(outputs).map((f) => fs.rm(f, { force: true })));
    const kind = (err as { kind?: 'bad-input' | 'failed' }).kind ?? (err instanceof SlideError ? 'bad-input' : 'failed');
    io.stderr.write(`cfrsam slide run: ${file}: ${kind === 'bad-input' ? '' : 'failed: '}${slideErrorText(err, file)}\n`);
    return kind;
  }
}

export function formatSummary(s: SlideSummary, stackStartS?: number): string {
  const mb = (v: number | null) => (v === null ? 'n/a' : `${v.toFixed(0)} MB`);
  const lines = [
    `${s.name}: ${s.slide}`,
    `  level 0      ${s.level0.width} x ${s.level0.height} px, ${s.levels} level(s), ${s.format}`,
    `  mpp          ${s.mpp.x}${s.mpp.y !== s.mpp.x ? ` x ${s.mpp.y}` : ''} um/px (${s.mpp.source}); model ${s.model.name} ${s.model.version} at ${s.model.mpp} um/px`,
    `  tissue       ${(s.tissueFraction * 100).toFixed(1)}% of the slide; ${s.tissueMpx.model.toFixed(2)} Mpx at the model's resolution${s.roi ? ' in the ROI' : ''}`,
    `  regions      ${s.regions} (${s.regionSize.model} px + ${s.overlap} px margin at the model's resolution = ${s.regionSize.level0.width} level-0 px)${s.regionsFailed ? `, ${s.regionsFailed} failed` : ''}`,
    `  nuclei       ${s.nuclei} (${
      Object.entries(s.nucleiByClass)
        .map(([k, v]) => `${k} ${v}`)
        .join(', ') || 'none'
    })`,
    `  blur         ${s.tiles.blurred} of ${s.tiles.model} model tiles blurred at the model's resolution${s.mpp.x > s.model.mpp * 1.2 ? ` (the scan is upsampled ${(s.mpp.x / s.model.mpp).toFixed(1)}x: softer than a scan at the model's)` : ''}${
      s.blurredRegions.length > 0 ? `; ${s.blurredRegions.length} region(s) mostly so, outlined orange on the overview` : ''
    }`,
    `  wall time    ${s.wallS.toFixed(1)} s (open + tissue ${s.prepareS.toFixed(1)} s, regions ${s.segmentS.toFixed(1)} s${stackStartS !== undefined ? `; local stack start ${stackStartS.toFixed(1)} s not included` : ''})`,
    `  throughput   ${s.tissueMpxPerS.toFixed(3)} tissue Mpx/s at the model's resolution, ${s.regionsPerS.toFixed(3)} regions/s`,
    `  peak RSS     ${Object.entries(s.peakRssMb)
      .map(([k, v]) => `${k} ${mb(v)}`)
      .join(', ')}`,
    `  outputs      ${s.outputs.geojson}, ${s.outputs.csv}, ${s.outputs.overview}, ${s.outputs.summary}`,
  ];
  return lines.join('\n') + '\n';
}
