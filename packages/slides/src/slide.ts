import { SlideError } from './errors.js';
import type { RgbImage } from './codecs.js';

export type { RgbImage } from './codecs.js';

export type SlideFormat = 'aperio-svs' | 'tiff' | 'ome-tiff' | 'dicom' | 'openslide' | 'image';

export interface SlideLevel {
  width: number;
  height: number;
  /** Mean of `downsampleX` and `downsampleY` (OpenSlide's convention). */
  downsample: number;
  /** level-0 width / this level's width. */
  downsampleX: number;
  /** level-0 height / this level's height. */
  downsampleY: number;
  tileWidth?: number;
  tileHeight?: number;
}

/** Micrometres per level-0 pixel, and where the value came from. */
export interface Mpp {
  x: number;
  y: number;
  /** e.g. 'aperio ImageDescription MPP', 'OME-XML PhysicalSizeX/Y', 'TIFF XResolution/YResolution (cm)', 'DICOM PixelSpacing', 'openslide.mpp-x/y', 'option' */
  source: string;
}

/**
 * A rectangle in the pixel grid **of the level it names** (level 0 by default): `x`, `y` may be
 * negative and the rectangle may extend past the level; the parts outside are white. A rectangle
 * that does not intersect the level at all is refused with `REGION_OUTSIDE`.
 */
export interface RegionRequest {
  level?: number;
  x: number;
  y: number;
  width: number;
  height: number;
}

export interface SlideStats {
  /** Tiles (or strips / frames) decoded since opening. */
  tilesDecoded: number;
  /** Bytes read from the byte source since opening (0 where a native library reads the file). */
  bytesRead: number;
}

export interface Slide {
  /** The file (or byte source name) the slide was opened from. */
  readonly path: string;
  readonly format: SlideFormat;
  /** Scanner / writer vendor where known ('aperio', 'hamamatsu', ...). */
  /** Largest first. Level 0 is full resolution. */
  readonly levels: readonly SlideLevel[];
  readonly mpp: Mpp | null;
  /** Names of the associated images: 'thumbnail', 'label', 'macro' where present. */
  readonly associatedImages: readonly string[];
  /** Raw metadata (vendor key/values, description) for display; not needed for reading. */
  readonly properties: Readonly<Record<string, string>>;
  readRegion(req: RegionRequest): Promise<RgbImage>;
  readAssociated(name: string): Promise<RgbImage>;
  stats(): SlideStats;
  close(): Promise<void>;
}

export interface SlideOptions {
  /** Largest region readRegion accepts, in pixels (default 128 Mpx = 384 MiB of RGB). */
  maxRegionPixels?: number;
  /** Byte budget of the decoded-tile LRU cache (default 32 MiB; 0 disables). */
  tileCacheBytes?: number;
  /** Tiles decoded concurrently per region (default 4). */
  decodeConcurrency?: number;
  /** Use libopenslide (through koffi) even for formats this package reads itself. */
  backend?: 'auto' | 'openslide';
  /**
   * DICOM: group the other instances of the same series found in the file's directory
   * (default true). A directory path or an array of files can also be passed to openSlide.
   */
  dicomScanDirectory?: boolean;
}

/** A level stored as a grid of tiles (TIFF tiles or strips, DICOM frames). */
export interface TileGrid {
  width: number;
  height: number;
  tileWidth: number;
  tileHeight: number;
  /** The decoded tile (may be smaller at the edges for strips); null for a missing (sparse) tile = white. */
  tile(col: number, row: number): Promise<RgbImage | null>;
}

export function makeLevels(dims: { width: number; height: number; tileWidth?: number; tileHeight?: number }[], downsamples?: number[]): SlideLevel[] {
  const w0 = dims[0].width,
    h0 = dims[0].height;
  return dims.map((d, i) => {
    const dx = w0 / d.width,
      dy = h0 / d.height;
    return {
      width: d.width,
      height: d.height,
      downsample: downsamples?.[i] ?? (dx + dy) / 2,
      downsampleX: dx,
      downsampleY: dy,
      ...(d.tileWidth ? { tileWidth: d.tileWidth, tileHeight: d.tileHeight } : {}),
    };
  });
}

/** Byte-bounded LRU of decoded tiles, with in-flight de-duplication. */
export class TileCache {
  private map = new Map<string, RgbImage | null>();
  private inflight = new Map<string, Promise<RgbImage | null>>();
  private bytes = 0;
  constructor(private readonly budget: number) {}

  async get(key: string, load: () => Promise<RgbImage | null>): Promise<RgbImage | null> {
    const hit = this.map.get(key);
    if (hit !== undefined) {
      this.map.delete(key);
      this.map.set(key, hit);
      return hit;
    }
    const running = this.inflight.get(key);
    if (running) return running;
    const p = load().finally(() => this.inflight.delete(key));
    this.inflight.set(key, p);
    const v = await p;
    const size = v ? v.data.length : 0;
    if (this.budget > 0 && size <= this.budget / 4) {
      this.map.set(key, v);
      this.bytes += size;
      for (const [k, old] of this.map) {
        if (this.bytes <= this.budget) break;
        this.map.delete(k);
        this.bytes -= old ? old.data.length : 0;
      }
    }
    return v;
  }

  clear(): void {
    this.map.clear();
    this.bytes = 0;
  }
}

async function mapLimit<T>(items: T[], limit: number, fn: (t: T) => Promise<void>): Promise<void> {
  let i = 0;
  const workers = Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (i < items.length) await fn(items[i++]);
  });
  await Promise.all(workers);
}

/** Common request validation, white padding, tile compositing. */
export abstract class BaseSlide implements Slide {
  abstract readonly path: string;
  abstract readonly format: SlideFormat;
  abstract readonly levels: readonly SlideLevel[];
  abstract readonly mpp: Mpp | null;
  abstract readonly associatedImages: readonly string[];
  properties: Record<string, string> = {};
  protected closed = false;
  protected tilesDecoded = 0;
  protected readonly cache: TileCache;
  protected readonly maxRegionPixels: number;
  protected readonly concurrency: number;

  constructor(opts: SlideOptions = {}) {
    this.cache = new TileCache(opts.tileCacheBytes ?? 32 * 1024 * 1024);
    this.maxRegionPixels = opts.maxRegionPixels ?? 128 * 1024 * 1024;
    this.concurrency = Math.max(1, opts.decodeConcurrency ?? 4);
  }

  abstract readAssociated(name: string): Promise<RgbImage>;
  abstract stats(): SlideStats;
  protected abstract grid(level: number): TileGrid;
  protected abstract closeSource(): Promise<void>;

  protected err(code: ConstructorParameters<typeof SlideError>[0], msg: string): SlideError {
    return new SlideError(code, msg, this.path);
  }

  protected checkOpen(): void {
    if (this.closed) throw this.err('CLOSED', 'slide is closed');
  }

  async readRegion(req: RegionRequest): Promise<RgbImage> {
    this.checkOpen();
    const level = req.level ?? 0;
    if (!Number.isInteger(level) || level < 0 || level >= this.levels.length) {
      throw this.err('BAD_ARGUMENT', `level ${level} does not exist (the slide has ${this.levels.length})`);
    }
    const { x, y, width, height } = req;
    for (const [k, v] of Object.entries({ x, y, width, height })) {
      if (!Number.isSafeInteger(v)) throw this.err('BAD_ARGUMENT', `region ${k} must be an integer, got ${v}`);
    }
    if (width <= 0 || height <= 0) throw this.err('BAD_ARGUMENT', `region size ${width}x${height} is empty`);
    if (width * height > this.maxRegionPixels) {
      throw this.err('REGION_TOO_LARGE', `region ${width}x${height} exceeds the limit of ${this.maxRegionPixels} pixels; read it in parts`);
    }
    const L = this.levels[level];
    const x0 = Math.max(0, x),
      y0 = Math.max(0, y);
    const x1 = Math.min(L.width, x + width),
      y1 = Math.min(L.height, y + height);
    if (x1 <= x0 || y1 <= y0) {
      throw this.err('REGION_OUTSIDE', `region ${width}x${height} at (${x},${y}) is outside level ${level} (${L.width}x${L.height})`);
    }
    const out: RgbImage = { data: Buffer.alloc(width * height * 3, 255), width, height };
    await this.readInto(level, out, x0 - x, y0 - y, x0, y0, x1 - x0, y1 - y0);
    return out;
  }

  /** Copies level pixels [sx, sx+w) x [sy, sy+h) (inside the level) to `out` at (dx, dy). */
  protected async readInto(level: number, out: RgbImage, dx: number, dy: number, sx: number, sy: number, w: number, h: number): Promise<void> {
    const g = this.grid(level);
    const c0 = Math.floor(sx / g.tileWidth),
      c1 = Math.floor((sx + w - 1) / g.tileWidth);
    const r0 = Math.floor(sy / g.tileHeight),
      r1 = Math.floor((sy + h - 1) / g.tileHeight);
    const jobs: [number, number][] = [];
    for (let r = r0; r <= r1; r++) for (let c = c0; c <= c1; c++) jobs.push([c, r]);
    await mapLimit(jobs, this.concurrency, async ([c, r]) => {
      const t = await this.cache.get(`${level}:${c}:${r}`, async () => {
        const v = await g.tile(c, r);
        if (v) this.tilesDecoded++;
        return v;
      });
      if (!t) return; // sparse: stays white
      const tx = c * g.tileWidth,
        ty = r * g.tileHeight;
      // intersection of the tile's valid pixels with the request, in level coordinates
      const ix0 = Math.max(sx, tx),
        iy0 = Math.max(sy, ty);
      const ix1 = Math.min(sx + w, tx + t.width, g.width),
        iy1 = Math.min(sy + h, ty + t.height, g.height);
      if (ix1 <= ix0 || iy1 <= iy0) return;
      const rowBytes = (ix1 - ix0) * 3;
      for (let yy = iy0; yy < iy1; yy++) {
        const src = ((yy - ty) * t.width + (ix0 - tx)) * 3;
        const dst = ((yy - sy + dy) * out.width + (ix0 - sx + dx)) * 3;
        t.data.copy(out.data, dst, src, src + rowBytes);
      }
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.cache.clear();
    await this.closeSource();
  }
}

/** Reads a whole tile grid (associated images). */
export async function readWholeGrid(g: TileGrid): Promise<RgbImage> {
  const out: RgbImage = { data: Buffer.alloc(g.width * g.height * 3, 255), width: g.width, height: g.height };
  for (let ty = 0, r = 0; ty < g.height; ty += g.tileHeight, r++) {
    for (let tx = 0, c = 0; tx < g.width; tx += g.tileWidth, c++) {
      const t = await g.tile(c, r);
      if (!t) continue;
      const w = Math.min(t.width, g.width - tx),
        h = Math.min(t.height, g.height - ty);
      for (let yy = 0; yy < h; yy++) {
        t.data.copy(out.data, ((ty + yy) * g.width + tx) * 3, yy * t.width * 3, (yy * t.width + w) * 3);
      }
    }
  }
  return out;
}

/** A micrometre-per-pixel value is accepted only in this range (rejects 72-dpi defaults and junk). */
export function plausibleMpp(v: number): boolean {
  return Number.isFinite(v) && v > 0.01 && v < 100;
}
