import { SlideError } from './errors.js';
import { compressionName, decodeTiffBlock, isJpeg2000, UnsupportedError, type RgbImage, type TiffPixelLayout } from './codecs.js';
import {
  BaseSlide,
  makeLevels,
  plausibleMpp,
  readWholeGrid,
  type Mpp,
  type SlideFormat,
  type SlideLevel,
  type SlideOptions,
  type SlideStats,
  type TileGrid,
} from './slide.js';
import type { ByteSource } from './source.js';
import { Tag, type Ifd, type TiffReader } from './tiff.js';

/** One TIFF image (directory) read as a grid of tiles or strips. */
export class TiffImage implements TileGrid {
  readonly width: number;
  readonly height: number;
  readonly tileWidth: number;
  readonly tileHeight: number;
  readonly tiled: boolean;
  private offsets?: number[];
  private counts?: number[];
  private layout?: TiffPixelLayout;
  onDecode?: () => void;

  constructor(
    readonly ifd: Ifd,
    private readonly name: string,
  ) {
    this.width = ifd.width;
    this.height = ifd.height;
    if (!(this.width > 0 && this.height > 0)) throw new SlideError('CORRUPT', 'TIFF image has no size', name);
    this.tiled = ifd.tiled;
    if (this.tiled) {
      this.tileWidth = ifd.num(Tag.TileWidth, 0);
      this.tileHeight = ifd.num(Tag.TileLength, 0);
    } else {
      if (!ifd.has(Tag.StripOffsets)) throw new SlideError('CORRUPT', 'TIFF image has neither tiles nor strips', name);
      this.tileWidth = this.width;
      this.tileHeight = Math.min(this.height, ifd.num(Tag.RowsPerStrip, this.height) || this.height);
    }
    if (!(this.tileWidth > 0 && this.tileHeight > 0)) throw new SlideError('CORRUPT', 'TIFF tile size is 0', name);
  }

  get compression(): number {
    return this.ifd.compression;
  }

  private async init(): Promise<void> {
    if (this.layout) return;
    const ifd = this.ifd;
    const [offsets, counts, tables, colorMap] = await Promise.all([
      ifd.numbers(this.tiled ? Tag.TileOffsets : Tag.StripOffsets),
      ifd.numbers(this.tiled ? Tag.TileByteCounts : Tag.StripByteCounts),
      ifd.raw(Tag.JPEGTables),
      ifd.numbers(Tag.ColorMap),
    ]);
    if (!offsets || !counts || counts.length < offsets.length) {
      throw new SlideError('CORRUPT', 'TIFF tile offsets or byte counts are missing', this.name);
    }
    const across = Math.ceil(this.width / this.tileWidth),
      down = Math.ceil(this.height / this.tileHeight);
    const planar = ifd.num(Tag.PlanarConfiguration, 1);
    const spp = ifd.num(Tag.SamplesPerPixel, 1);
    if (offsets.length < across * down) {
      throw new SlideError('CORRUPT', `TIFF has ${offsets.length} tiles, expected ${across * down}`, this.name);
    }
    this.offsets = offsets;
    this.counts = counts;
    this.layout = {
      compression: ifd.compression,
      photometric: ifd.num(Tag.Photometric, spp >= 3 ? 2 : 1),
      samplesPerPixel: spp,
      bitsPerSample: ifd.num(Tag.BitsPerSample, 1),
      predictor: ifd.num(Tag.Predictor, 1),
      planar,
      littleEndian: ifd.tiff.littleEndian,
      jpegTables: tables,
      colorMap,
    };
  }

  async tile(col: number, row: number): Promise<RgbImage | null> {
    await this.init();
    const across = Math.ceil(this.width / this.tileWidth);
    const i = row * across + col;
    const off = this.offsets![i],
      len = this.counts![i];
    if (!off || !len) return null;
    const bytes = await this.ifd.tiff.src.read(off, len);
    const rows = this.tiled ? this.tileHeight : Math.min(this.tileHeight, this.height - row * this.tileHeight);
    try {
      const t = await decodeTiffBlock(bytes, this.tileWidth, rows, this.layout!);
      this.onDecode?.();
      return t;
    } catch (err) {
      if (err instanceof SlideError) throw err;
      if (err instanceof UnsupportedError) {
        throw new SlideError('UNSUPPORTED', `TIFF image uses ${err.message}, which is not supported`, this.name);
      }
      throw new SlideError(
        'CORRUPT',
        `corrupt ${compressionName(this.layout!.compression)} tile ${col},${row} at byte ${off}: ${(err as Error).message.replace(/\s*\n\s*/g, '; ')}`,
        this.name,
        { cause: err },
      );
    }
  }
}

const OME_UNIT_UM: Record<string, number> = {
  m: 1e6,
  dm: 1e5,
  cm: 1e4,
  mm: 1e3,
  µm: 1,
  μm: 1,
  um: 1,
  nm: 1e-3,
  pm: 1e-6,
  Å: 1e-4,
  A: 1e-4,
};

export function parseOmeMpp(xml: string): { x: number; y: number } | null {
  const pix = /<(?:\w+:)?Pixels\b([^>]*)>/.exec(xml);
  if (!pix) return null;
  const attr = (n: string) => new RegExp(`\\b${n}="([^"]*)"`).exec(pix[1])?.[1];
  const conv = (v?: string, u?: string) => {
    if (v === undefined) return NaN;
    const f = OME_UNIT_UM[u ?? 'µm'];
    return f === undefined ? NaN : parseFloat(v) * f;
  };
  const x = conv(attr('PhysicalSizeX'), attr('PhysicalSizeXUnit'));
  const y = conv(attr('PhysicalSizeY'), attr('PhysicalSizeYUnit'));
  if (!plausibleMpp(x)) return null;
  return { x, y: plausibleMpp(y) ? y : x };
}

export function parseAperioDescription(desc: string): Record<string, string> {
  const props: Record<string, string> = {};
  for (const part of desc.split('|').slice(1)) {
    const m = /^\s*([^=]+?)\s*=\s*(.*?)\s*$/.exec(part);
    if (m) props[`aperio.${m[1]}`] = m[2];
  }
  return props;
}

/** TIFF resolution tags to micrometres per pixel (null where absent, unit-less or implausible). */
export function tiffResolutionMpp(ifd: Ifd): Mpp | null {
  const xr = ifd.nums(Tag.XResolution)?.[0];
  const yr = ifd.nums(Tag.YResolution)?.[0];
  const unit = ifd.num(Tag.ResolutionUnit, 2);
  if (!xr || unit === 1) return null;
  const per = unit === 3 ? 1e4 : 25400;
  const x = per / xr,
    y = yr ? per / yr : x;
  if (!plausibleMpp(x) || !plausibleMpp(y)) return null;
  return { x, y, source: `TIFF XResolution/YResolution (${unit === 3 ? 'cm' : 'inch'})` };
}

export type TiffKind = 'aperio-svs' | 'ome-tiff' | 'tiff' | { openslide: string };

/** Classifies a TIFF by its first directory (vendor formats OpenSlide reads are reported as such). */
export async function classifyTiff(first: Ifd, path: string): Promise<{ kind: TiffKind; description: string }> {
  const description = (await first.string(Tag.ImageDescription)) ?? '';
  if (first.has(Tag.NDPI_FORMAT_FLAG) || /\.ndpi$/i.test(path)) return { kind: { openslide: 'Hamamatsu NDPI' }, description };
  if (description.startsWith('Aperio')) return { kind: 'aperio-svs', description };
  if (/<(\w+:)?OME\b/.test(description)) return { kind: 'ome-tiff', description };
  if (/leica/i.test(description) && description.includes('<?xml')) return { kind: { openslide: 'Leica SCN' }, description };
  if (description.includes('DPUfsImport')) return { kind: { openslide: 'Philips TIFF' }, description };
  const xmp = first.has(Tag.XMP) ? ((await first.raw(Tag.XMP))?.toString('latin1') ?? '') : '';
  if (/iScan/.test(xmp)) return { kind: { openslide: 'Ventana BIF' }, description };
  if (/\.(bif|scn|svslide)$/i.test(path)) return { kind: { openslide: 'OpenSlide vendor TIFF' }, description };
  return { kind: 'tiff', description };
}

export class TiffSlide extends BaseSlide {
  readonly levels: SlideLevel[];
  readonly associatedImages: string[];
  private readonly assoc: Map<string, TiffImage>;
  private readonly images: TiffImage[];

  private constructor(
    readonly path: string,
    readonly format: SlideFormat,
    readonly vendor: string | undefined,
    private readonly src: ByteSource & { bytesRead?: number },
    images: TiffImage[],
    assoc: Map<string, TiffImage>,
    readonly mpp: Mpp | null,
    properties: Record<string, string>,
    opts: SlideOptions,
  ) {
    super(opts);
    this.images = images;
    this.assoc = assoc;
    this.associatedImages = [...assoc.keys()];
    this.levels = makeLevels(images);
    this.properties = properties;
  }

  protected grid(level: number): TileGrid {
    return this.images[level];
  }

  async readAssociated(name: string): Promise<RgbImage> {
    this.checkOpen();
    const im = this.assoc.get(name);
    if (!im) throw this.err('BAD_ARGUMENT', `no associated image '${name}' (has: ${this.associatedImages.join(', ') || 'none'})`);
    return readWholeGrid(im);
  }

  stats(): SlideStats {
    return { tilesDecoded: this.tilesDecoded, bytesRead: this.src.bytesRead ?? 0 };
  }

  protected async closeSource(): Promise<void> {
    await this.src.close();
  }

  static async open(
    src: ByteSource,
    tiff: TiffReader,
    kind: Exclude<TiffKind, { openslide: string }>,
    description: string,
    chain: Ifd[],
    opts: SlideOptions,
  ): Promise<TiffSlide> {
    const name = src.name;
    const props: Record<string, string> = {};
    if (description) props['tiff.ImageDescription'] = description;
    const assoc = new Map<string, TiffImage>();
    let levelIfds: Ifd[];
    let mpp: Mpp | null = null;
    let vendor: string | undefined;

    if (kind === 'aperio-svs') {
      vendor = 'aperio';
      Object.assign(props, parseAperioDescription(description));
      levelIfds = chain.filter((d) => d.tiled);
      for (let i = 1; i < chain.length; i++) {
        const d = chain[i];
        if (d.tiled) continue;
        const desc = (await d.string(Tag.ImageDescription)) ?? '';
        const n = /label/i.test(desc) ? 'label' : /macro/i.test(desc) ? 'macro' : i === 1 ? 'thumbnail' : undefined;
        if (n && !assoc.has(n)) assoc.set(n, new TiffImage(d, name));
      }
      const m = parseFloat(props['aperio.MPP']);
      if (plausibleMpp(m)) mpp = { x: m, y: m, source: 'aperio ImageDescription MPP' };
    } else if (kind === 'ome-tiff') {
      vendor = 'ome';
      const first = chain[0];
      const subs = (await first.numbers(Tag.SubIFDs)) ?? [];
      levelIfds = [first];
      for (const off of subs) levelIfds.push(await tiff.readIfd(off));
      const m = parseOmeMpp(description);
      if (m) mpp = { ...m, source: 'OME-XML PhysicalSizeX/Y' };
      // OME images named label / macro / thumbnail, stored as their own directories
      for (const im of description.matchAll(/<(?:\w+:)?Image\b[^>]*\bName="([^"]*)"[^]*?<\/(?:\w+:)?Image>/g)) {
        const nm = im[1].toLowerCase();
        const key = nm.includes('label') ? 'label' : nm.includes('macro') ? 'macro' : nm.includes('thumbnail') ? 'thumbnail' : undefined;
        const ifdIdx = /<(?:\w+:)?TiffData\b[^>]*\bIFD="(\d+)"/.exec(im[0])?.[1];
        if (key && ifdIdx && +ifdIdx > 0 && +ifdIdx < chain.length && !assoc.has(key)) assoc.set(key, new TiffImage(chain[+ifdIdx], name));
      }
    } else {
      // generic: every directory of the main chain and their SubIFDs with the aspect ratio of the
      // largest one is a level (tiled pyramids, reduced-resolution pages, SubIFD pyramids)
      const all: Ifd[] = [];
      for (const d of chain) {
        all.push(d);
        for (const off of (await d.numbers(Tag.SubIFDs)) ?? []) all.push(await tiff.readIfd(off));
      }
      const base = chain[0];
      levelIfds = all.filter((d) => {
        if (d.subfileType & 4) return false; // transparency mask
        if (d.width > base.width || d.height > base.height || d.width <= 0 || d.height <= 0) return false;
        const dx = base.width / d.width,
          dy = base.height / d.height;
        return Math.abs(dx - dy) <= 0.02 * dx + dx / Math.min(d.width, d.height) + 1e-9;
      });
    }
    if (levelIfds.length === 0) throw new SlideError('CORRUPT', 'TIFF has no readable image', name);
    levelIfds.sort((a, b) => b.width - a.width);
    levelIfds = levelIfds.filter((d, i) => i === 0 || d.width !== levelIfds[i - 1].width);
    const images = levelIfds.map((d) => new TiffImage(d, name));
    const j2k = images.find((im) => isJpeg2000(im.compression));
    if (j2k) {
      throw new SlideError(
        'UNSUPPORTED',
        `${kind === 'aperio-svs' ? 'Aperio SVS' : 'TIFF'} with JPEG 2000 tiles: no JPEG 2000 decoder is available (install libopenslide0 and koffi to read it through OpenSlide)`,
        name,
      );
    }
    mpp ??= tiffResolutionMpp(levelIfds[0]);
    const format: SlideFormat = kind;
    return new TiffSlide(name, format, vendor, src, images, assoc, mpp, props, opts);
  }
}
