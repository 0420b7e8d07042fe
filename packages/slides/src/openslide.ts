import { SlideError } from './errors.js';
import type { RgbImage } from './codecs.js';
import { BaseSlide, makeLevels, plausibleMpp, type Mpp, type SlideLevel, type SlideOptions, type SlideStats, type TileGrid } from './slide.js';

/* eslint-disable @typescript-eslint/no-explicit-any */
interface OsLib {
  open: (path: string) => unknown;
  close: (osr: unknown) => void;
  getError: (osr: unknown) => string | null;
  levelCount: (osr: unknown) => number;
  levelDims: (osr: unknown, level: number, w: [bigint | number], h: [bigint | number]) => void;
  levelDownsample: (osr: unknown, level: number) => number;
  prop: (osr: unknown, name: string) => string | null;
  propNames: (osr: unknown) => string[] | null;
  assocNames: (osr: unknown) => string[] | null;
  assocDims: (osr: unknown, name: string, w: [bigint | number], h: [bigint | number]) => void;
  readAssoc: (osr: unknown, name: string, dest: Uint32Array) => void;
  readRegion: any;
  detectVendor: (path: string) => string | null;
}

let lib: OsLib | null | undefined;
let libError = '';

/** libopenslide through koffi, or null (with `openslideUnavailableReason()`) where either is missing. */
export function loadOpenSlide(): OsLib | null {
  if (lib !== undefined) return lib;
  let koffi: any;
  try {
    koffi = require('koffi');
  } catch (err) {
    libError = `the koffi FFI package is not installed (${(err as Error).message.split('\n')[0]})`;
    return (lib = null);
  }
  let so: any;
  for (const n of ['libopenslide.so.1', 'libopenslide.so.0', 'libopenslide.dylib', 'libopenslide-1.dll', 'libopenslide-0.dll']) {
    try {
      so = koffi.load(n);
      break;
    } catch {
      /* next */
    }
  }
  if (!so) {
    libError = 'libopenslide is not installed (Debian: apt-get install libopenslide0)';
    return (lib = null);
  }
  const handle = koffi.pointer('openslide_t', koffi.opaque());
  lib = {
    open: so.func('openslide_t *openslide_open(const char *filename)'),
    close: so.func('void openslide_close(openslide_t *osr)'),
    getError: so.func('const char *openslide_get_error(openslide_t *osr)'),
    levelCount: so.func('int32_t openslide_get_level_count(openslide_t *osr)'),
    levelDims: so.func('void openslide_get_level_dimensions(openslide_t *osr, int32_t level, _Out_ int64_t *w, _Out_ int64_t *h)'),
    levelDownsample: so.func('double openslide_get_level_downsample(openslide_t *osr, int32_t level)'),
    prop: so.func('const char *openslide_get_property_value(openslide_t *osr, const char *name)'),
    propNames: so.func('const char **openslide_get_property_names(openslide_t *osr)'),
    assocNames: so.func('const char **openslide_get_associated_image_names(openslide_t *osr)'),
    assocDims: so.func('void openslide_get_associated_image_dimensions(openslide_t *osr, const char *name, _Out_ int64_t *w, _Out_ int64_t *h)'),
    readAssoc: so.func('void openslide_read_associated_image(openslide_t *osr, const char *name, _Out_ uint32_t *dest)'),
    readRegion: so.func(
      'void openslide_read_region(openslide_t *osr, _Out_ uint32_t *dest, int64_t x, int64_t y, int32_t level, int64_t w, int64_t h)',
    ),
    detectVendor: so.func('const char *openslide_detect_vendor(const char *filename)'),
  };
  void handle;
  // const char ** arrays are NULL-terminated: decode them by hand
  const decodeStrings =
    (fn: any) =>
    (osr: unknown): string[] | null => {
      const ptr = fn(osr);
      if (!ptr) return null;
      const out: string[] = [];
      for (let i = 0; ; i++) {
        const s = koffi.decode(ptr, i * 8, 'const char *');
        if (!s) break;
        out.push(s);
      }
      return out;
    };
  lib.propNames = decodeStrings(so.func('void *openslide_get_property_names(openslide_t *osr)'));
  lib.assocNames = decodeStrings(so.func('void *openslide_get_associated_image_names(openslide_t *osr)'));
  return lib;
}

export function openslideUnavailableReason(): string {
  loadOpenSlide();
  return libError;
}

/** Premultiplied ARGB (OpenSlide) to RGB composited over white. */
function argbToRgb(src: Uint32Array, out: Buffer, outOff: number, n: number): void {
  for (let i = 0; i < n; i++) {
    const p = src[i];
    const a = p >>> 24;
    const k = 255 - a; // premultiplied: c + (1 - a) * white
    out[outOff + i * 3] = ((p >>> 16) & 0xff) + k;
    out[outOff + i * 3 + 1] = ((p >>> 8) & 0xff) + k;
    out[outOff + i * 3 + 2] = (p & 0xff) + k;
  }
}

export class OpenSlideSlide extends BaseSlide {
  readonly format = 'openslide' as const;
  readonly levels: SlideLevel[];
  readonly associatedImages: string[];
  readonly mpp: Mpp | null;
  readonly vendor?: string;
  private osr: unknown;
  private regions = 0;

  private constructor(
    readonly path: string,
    private readonly os: OsLib,
    osr: unknown,
    opts: SlideOptions,
  ) {
    super(opts);
    this.osr = osr;
    const n = os.levelCount(osr);
    const dims: { width: number; height: number; tileWidth?: number; tileHeight?: number }[] = [];
    const ds: number[] = [];
    for (let i = 0; i < n; i++) {
      const w: [number] = [0],
        h: [number] = [0];
      os.levelDims(osr, i, w as any, h as any);
      const tw = Number(os.prop(osr, `openslide.level[${i}].tile-width`) ?? 0);
      const th = Number(os.prop(osr, `openslide.level[${i}].tile-height`) ?? 0);
      dims.push({ width: Number(w[0]), height: Number(h[0]), ...(tw && th ? { tileWidth: tw, tileHeight: th } : {}) });
      ds.push(os.levelDownsample(osr, i));
    }
    this.levels = makeLevels(dims, ds);
    for (const k of os.propNames(osr) ?? []) this.properties[k] = os.prop(osr, k) ?? '';
    this.vendor = this.properties['openslide.vendor'];
    const mx = parseFloat(this.properties['openslide.mpp-x']);
    const my = parseFloat(this.properties['openslide.mpp-y']);
    this.mpp = plausibleMpp(mx) ? { x: mx, y: plausibleMpp(my) ? my : mx, source: 'openslide.mpp-x/y' } : null;
    this.associatedImages = os.assocNames(osr) ?? [];
  }

  static open(path: string, formatName: string, opts: SlideOptions): OpenSlideSlide {
    const os = loadOpenSlide();
    if (!os) {
      throw new SlideError('OPENSLIDE_MISSING', `${formatName} slides are read through OpenSlide, but ${libError}`, path);
    }
    const osr = os.open(path);
    if (!osr) throw new SlideError('UNKNOWN_FORMAT', `OpenSlide does not recognise this ${formatName} file`, path);
    const e = os.getError(osr);
    if (e) {
      os.close(osr);
      throw new SlideError('CORRUPT', `OpenSlide cannot read this ${formatName} file: ${e}`, path);
    }
    return new OpenSlideSlide(path, os, osr, opts);
  }

  private checkError(): void {
    const e = this.os.getError(this.osr);
    if (e) throw this.err('CORRUPT', `OpenSlide error: ${e}`);
  }

  protected grid(): TileGrid {
    throw new Error('unused');
  }

  protected override async readInto(
    level: number,
    out: RgbImage,
    dx: number,
    dy: number,
    sx: number,
    sy: number,
    w: number,
    h: number,
  ): Promise<void> {
    const L = this.levels[level];
    // OpenSlide takes the top-left corner in level-0 coordinates
    const x0 = Math.round(sx * L.downsample),
      y0 = Math.round(sy * L.downsample);
    const band = Math.max(1, Math.floor((16 * 1024 * 1024) / (w * 4)));
    for (let r = 0; r < h; r += band) {
      const bh = Math.min(band, h - r);
      const buf = new Uint32Array(w * bh);
      await new Promise<void>((resolve, reject) =>
        this.os.readRegion.async(this.osr, buf, x0, y0 + Math.round(r * L.downsample), level, w, bh, (err: unknown) =>
          err ? reject(err) : resolve(),
        ),
      );
      this.checkError();
      this.regions++;
      for (let yy = 0; yy < bh; yy++) {
        argbToRgb(buf.subarray(yy * w, (yy + 1) * w), out.data, ((dy + r + yy) * out.width + dx) * 3, w);
      }
    }
  }

  async readAssociated(name: string): Promise<RgbImage> {
    this.checkOpen();
    if (!this.associatedImages.includes(name)) {
      throw this.err('BAD_ARGUMENT', `no associated image '${name}' (has: ${this.associatedImages.join(', ') || 'none'})`);
    }
    const w: [number] = [0],
      h: [number] = [0];
    this.os.assocDims(this.osr, name, w as any, h as any);
    const W = Number(w[0]),
      H = Number(h[0]);
    const buf = new Uint32Array(W * H);
    this.os.readAssoc(this.osr, name, buf);
    this.checkError();
    const out = Buffer.allocUnsafe(W * H * 3);
    argbToRgb(buf, out, 0, W * H);
    return { data: out, width: W, height: H };
  }

  stats(): SlideStats {
    return { tilesDecoded: this.regions, bytesRead: 0 };
  }

  protected async closeSource(): Promise<void> {
    if (this.osr) this.os.close(this.osr);
    this.osr = null;
  }
}
