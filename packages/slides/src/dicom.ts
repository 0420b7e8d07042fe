import { readdir } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { SlideError } from './errors.js';
import { decodeWithSharp, rawToRgb, spliceJpeg, UnsupportedError, type RgbImage } from './codecs.js';
import {
  BaseSlide,
  makeLevels,
  plausibleMpp,
  readWholeGrid,
  type Mpp,
  type SlideLevel,
  type SlideOptions,
  type SlideStats,
  type TileGrid,
} from './slide.js';
import { FileSource, type ByteSource } from './source.js';

// ---------------------------------------------------------------------------------------------
// A minimal DICOM Part 10 parser: little-endian explicit / implicit VR, nested sequences, stops at
// Pixel Data (its position is recorded; frames are read on demand).

const T = {
  TransferSyntaxUID: 0x00020010,
  ImageType: 0x00080008,
  SOPClassUID: 0x00080016,
  SOPInstanceUID: 0x00080018,
  SeriesInstanceUID: 0x0020000e,
  DimensionOrganizationType: 0x00209311,
  SamplesPerPixel: 0x00280002,
  Photometric: 0x00280004,
  PlanarConfiguration: 0x00280006,
  NumberOfFrames: 0x00280008,
  Rows: 0x00280010,
  Columns: 0x00280011,
  PixelSpacing: 0x00280030,
  BitsAllocated: 0x00280100,
  PixelMeasuresSequence: 0x00289110,
  ImagedVolumeWidth: 0x00480001,
  ImagedVolumeHeight: 0x00480002,
  TotalPixelMatrixColumns: 0x00480006,
  TotalPixelMatrixRows: 0x00480007,
  PlanePositionSlideSequence: 0x0048021a,
  ColumnPositionInTotalImagePixelMatrix: 0x0048021e,
  RowPositionInTotalImagePixelMatrix: 0x0048021f,
  SharedFunctionalGroupsSequence: 0x52009229,
  PerFrameFunctionalGroupsSequence: 0x52009230,
  ExtendedOffsetTable: 0x7fe00001,
  ExtendedOffsetTableLengths: 0x7fe00002,
  PixelData: 0x7fe00010,
} as const;

const LONG_VRS = new Set(['OB', 'OD', 'OF', 'OL', 'OV', 'OW', 'SQ', 'SV', 'UC', 'UN', 'UR', 'UT', 'UV']);
/** VRs of the tags we read, for implicit-VR files. */
const IMPLICIT_VR: Record<number, string> = {
  [T.SamplesPerPixel]: 'US',
  [T.PlanarConfiguration]: 'US',
  [T.Rows]: 'US',
  [T.Columns]: 'US',
  [T.BitsAllocated]: 'US',
  [T.TotalPixelMatrixColumns]: 'UL',
  [T.TotalPixelMatrixRows]: 'UL',
  [T.ColumnPositionInTotalImagePixelMatrix]: 'SL',
  [T.RowPositionInTotalImagePixelMatrix]: 'SL',
  [T.SharedFunctionalGroupsSequence]: 'SQ',
  [T.PerFrameFunctionalGroupsSequence]: 'SQ',
  [T.PixelMeasuresSequence]: 'SQ',
  [T.PlanePositionSlideSequence]: 'SQ',
  0x00209111: 'SQ',
  0x00480105: 'SQ',
  0x00480008: 'SQ',
  0x00400560: 'SQ',
  [T.ExtendedOffsetTable]: 'OV',
  [T.ExtendedOffsetTableLengths]: 'OV',
  [T.PixelData]: 'OB',
};
const UNDEFINED = 0xffffffff;
const MAX_VALUE = 1 << 20;

interface DcmElement {
  vr: string;
  length: number;
  offset: number;
  value?: Buffer;
  items?: DcmDataset[];
}
type DcmDataset = Map<number, DcmElement>;

class Cursor {
  pos = 0;
  private buf: Buffer = Buffer.alloc(0);
  private start = 0;
  constructor(readonly src: ByteSource) {}
  async need(n: number): Promise<Buffer> {
    if (this.pos < this.start || this.pos + n > this.start + this.buf.length) {
      if (this.pos + n > this.src.size) {
        throw new SlideError('TRUNCATED', `file is truncated or corrupt: DICOM element at byte ${this.pos} runs past the end`, this.src.name);
      }
      const len = Math.min(this.src.size - this.pos, Math.max(n, 64 * 1024));
      this.buf = await this.src.read(this.pos, len);
      this.start = this.pos;
    }
    const o = this.pos - this.start;
    return this.buf.subarray(o, o + n);
  }
  async u16(): Promise<number> {
    const b = await this.need(2);
    this.pos += 2;
    return b.readUInt16LE(0);
  }
  async u32(): Promise<number> {
    const b = await this.need(4);
    this.pos += 4;
    return b.readUInt32LE(0);
  }
  async tag(): Promise<number> {
    const g = await this.u16();
    const e = await this.u16();
    return ((g << 16) | e) >>> 0;
  }
}

async function parseDataset(c: Cursor, explicit: boolean, end: number | undefined, top: boolean, ds: DcmDataset = new Map()): Promise<DcmDataset> {
  while (end === undefined ? c.pos < c.src.size : c.pos < end) {
    const tag = await c.tag();
    if (tag === 0xfffee00d) {
      await c.u32();
      break;
    } // item delimiter
    let vr: string;
    let length: number;
    const isMeta = tag >>> 16 === 0x0002;
    if (explicit || isMeta) {
      const b = await c.need(2);
      vr = b.toString('latin1', 0, 2);
      c.pos += 2;
      if (!/^[A-Z]{2}$/.test(vr)) throw new SlideError('CORRUPT', `bad DICOM VR at byte ${c.pos - 2}`, c.src.name);
      if (LONG_VRS.has(vr)) {
        c.pos += 2;
        length = await c.u32();
      } else length = await c.u16();
    } else {
      length = await c.u32();
      vr = IMPLICIT_VR[tag] ?? (length === UNDEFINED ? 'SQ' : 'UN');
    }
    const offset = c.pos;
    if (tag === T.PixelData) {
      ds.set(tag, { vr, length, offset });
      if (top) return ds;
      if (length === UNDEFINED) throw new SlideError('CORRUPT', 'nested encapsulated pixel data', c.src.name);
      c.pos += length;
      continue;
    }
    if (vr === 'SQ' || length === UNDEFINED) {
      const items: DcmDataset[] = [];
      const sqEnd = length === UNDEFINED ? undefined : offset + length;
      while (sqEnd === undefined || c.pos < sqEnd) {
        const it = await c.tag();
        const ilen = await c.u32();
        if (it === 0xfffee0dd) break; // sequence delimiter
        if (it !== 0xfffee000) throw new SlideError('CORRUPT', `bad DICOM sequence item at byte ${c.pos - 8}`, c.src.name);
        items.push(await parseDataset(c, vr === 'UN' ? false : explicit, ilen === UNDEFINED ? undefined : c.pos + ilen, false));
      }
      ds.set(tag, { vr: 'SQ', length, offset, items });
      continue;
    }
    const el: DcmElement = { vr, length, offset };
    if (length <= MAX_VALUE) {
      el.value = Buffer.from(await c.need(length));
    }
    c.pos = offset + length;
    if (c.pos > c.src.size)
      throw new SlideError('TRUNCATED', `file is truncated or corrupt: DICOM element ${hex(tag)} runs past the end`, c.src.name);
    ds.set(tag, el);
  }
  return ds;
}

function hex(tag: number): string {
  return `(${(tag >>> 16).toString(16).padStart(4, '0')},${(tag & 0xffff).toString(16).padStart(4, '0')})`;
}

function str(ds: DcmDataset | undefined, tag: number): string | undefined {
  const v = ds?.get(tag)?.value;
  return v
    ?.toString('latin1')
    .replace(/[\0 ]+$/, '')
    .trim();
}

function num(ds: DcmDataset | undefined, tag: number): number | undefined {
  const e = ds?.get(tag);
  if (!e?.value) return undefined;
  const b = e.value;
  switch (e.vr) {
    case 'US':
      return b.length >= 2 ? b.readUInt16LE(0) : undefined;
    case 'SS':
      return b.length >= 2 ? b.readInt16LE(0) : undefined;
    case 'UL':
      return b.length >= 4 ? b.readUInt32LE(0) : undefined;
    case 'SL':
      return b.length >= 4 ? b.readInt32LE(0) : undefined;
    case 'UN':
      // implicit VR without a dictionary entry: guess from the length
      return b.length === 2 ? b.readUInt16LE(0) : b.length === 4 ? b.readUInt32LE(0) : parseFloat(b.toString('latin1'));
    default: {
      const v = parseFloat(b.toString('latin1'));
      return Number.isFinite(v) ? v : undefined;
    }
  }
}

function item(ds: DcmDataset | undefined, tag: number, i = 0): DcmDataset | undefined {
  return ds?.get(tag)?.items?.[i];
}

const TS = {
  ImplicitLE: '1.2.840.10008.1.2',
  ExplicitLE: '1.2.840.10008.1.2.1',
  DeflatedLE: '1.2.840.10008.1.2.1.99',
  ExplicitBE: '1.2.840.10008.1.2.2',
};
const JPEG_TS = new Set(['1.2.840.10008.1.2.4.50', '1.2.840.10008.1.2.4.51', '1.2.840.10008.1.2.4.57', '1.2.840.10008.1.2.4.70']);
const J2K_TS = new Set([
  '1.2.840.10008.1.2.4.90',
  '1.2.840.10008.1.2.4.91',
  '1.2.840.10008.1.2.4.201',
  '1.2.840.10008.1.2.4.202',
  '1.2.840.10008.1.2.4.203',
]);

export async function isDicom(src: ByteSource): Promise<boolean> {
  if (src.size < 132) return false;
  return (await src.read(128, 4)).toString('latin1') === 'DICM';
}

/** One DICOM instance (file): header parsed, frames read on demand. */
export class DicomInstance implements TileGrid {
  readonly width: number;
  readonly height: number;
  readonly tileWidth: number;
  readonly tileHeight: number;
  readonly kind: 'VOLUME' | 'THUMBNAIL' | 'LABEL' | 'OVERVIEW' | string;
  readonly seriesUid: string;
  readonly frames: number;
  private frameIndex?: Promise<{ off: number; len: number }[][]>;
  private positions?: Map<string, number>;

  private constructor(
    readonly src: FileSource | ByteSource,
    readonly ds: DcmDataset,
    readonly ts: string,
  ) {
    const name = src.name;
    this.tileWidth = num(ds, T.Columns) ?? 0;
    this.tileHeight = num(ds, T.Rows) ?? 0;
    this.width = num(ds, T.TotalPixelMatrixColumns) ?? this.tileWidth;
    this.height = num(ds, T.TotalPixelMatrixRows) ?? this.tileHeight;
    if (!(this.tileWidth > 0 && this.tileHeight > 0 && this.width > 0 && this.height > 0)) {
      throw new SlideError('CORRUPT', 'DICOM image has no Rows/Columns', name);
    }
    this.frames = num(ds, T.NumberOfFrames) ?? 1;
    const types = (str(ds, T.ImageType) ?? '').split('\\');
    this.kind = types[2] || (ds.has(T.TotalPixelMatrixColumns) ? 'VOLUME' : 'VOLUME');
    this.seriesUid = str(ds, T.SeriesInstanceUID) ?? '';
    const pd = ds.get(T.PixelData);
    if (!pd) throw new SlideError('CORRUPT', 'DICOM file has no Pixel Data', name);
    if (pd.length !== UNDEFINED && pd.offset + pd.length > src.size) {
      throw new SlideError(
        'TRUNCATED',
        `file is truncated or corrupt: Pixel Data needs ${pd.length} bytes, the file ends after ${src.size - pd.offset}`,
        name,
      );
    }
    const org = str(ds, T.DimensionOrganizationType);
    const perFrame = ds.get(T.PerFrameFunctionalGroupsSequence)?.items;
    if (org !== 'TILED_FULL' && perFrame && perFrame.length === this.frames) {
      const m = new Map<string, number>();
      perFrame.forEach((f, i) => {
        const pos = item(f, T.PlanePositionSlideSequence);
        const col = num(pos, T.ColumnPositionInTotalImagePixelMatrix),
          row = num(pos, T.RowPositionInTotalImagePixelMatrix);
        if (col !== undefined && row !== undefined) {
          const key = `${Math.floor((col - 1) / this.tileWidth)},${Math.floor((row - 1) / this.tileHeight)}`;
          if (!m.has(key)) m.set(key, i);
        }
      });
      if (m.size > 0) this.positions = m;
    }
  }

  /** Parses the header (up to Pixel Data) of a DICOM file. */
  static async open(src: ByteSource): Promise<DicomInstance> {
    if (!(await isDicom(src))) throw new SlideError('UNKNOWN_FORMAT', 'not a DICOM file', src.name);
    const c = new Cursor(src);
    c.pos = 132;
    // file meta information: always explicit VR little endian, group 0002
    const meta: DcmDataset = new Map();
    while (c.pos < src.size) {
      const b = await c.need(2);
      if (b.readUInt16LE(0) !== 0x0002) break;
      await parseDataset(c, true, c.pos + 1, false, meta); // parses exactly one element
    }
    const ts = str(meta, T.TransferSyntaxUID) ?? TS.ExplicitLE;
    if (ts === TS.ExplicitBE) throw new SlideError('UNSUPPORTED', 'big-endian DICOM is not supported', src.name);
    if (ts === TS.DeflatedLE) throw new SlideError('UNSUPPORTED', 'deflated DICOM is not supported', src.name);
    const ds = await parseDataset(c, ts !== TS.ImplicitLE, undefined, true);
    return new DicomInstance(src, ds, ts);
  }

  get sopClass(): string {
    return str(this.ds, T.SOPClassUID) ?? '';
  }
  get photometric(): string {
    return str(this.ds, T.Photometric) ?? 'RGB';
  }

  pixelSpacing(): Mpp | null {
    const pm = item(item(this.ds, T.SharedFunctionalGroupsSequence), T.PixelMeasuresSequence);
    const ps = (str(pm, T.PixelSpacing) ?? str(this.ds, T.PixelSpacing))?.split('\\').map(parseFloat);
    if (ps && ps.length >= 2 && plausibleMpp(ps[0] * 1000) && plausibleMpp(ps[1] * 1000)) {
      // PixelSpacing is (row spacing = vertical, column spacing = horizontal) in mm
      return { x: ps[1] * 1000, y: ps[0] * 1000, source: 'DICOM PixelSpacing (shared functional groups)' };
    }
    const w = num(this.ds, T.ImagedVolumeWidth),
      h = num(this.ds, T.ImagedVolumeHeight);
    if (w && h && plausibleMpp((w * 1000) / this.width)) {
      return { x: (w * 1000) / this.width, y: (h * 1000) / this.height, source: 'DICOM ImagedVolumeWidth/Height' };
    }
    return null;
  }

  private async buildIndex(): Promise<{ off: number; len: number }[][]> {
    const pd = this.ds.get(T.PixelData)!;
    const name = this.src.name;
    if (pd.length !== UNDEFINED) {
      const spp = num(this.ds, T.SamplesPerPixel) ?? 1,
        bits = num(this.ds, T.BitsAllocated) ?? 8;
      const fb = this.tileWidth * this.tileHeight * spp * (bits / 8);
      if (pd.offset + fb * this.frames > this.src.size || pd.length < fb * this.frames) {
        throw new SlideError(
          'TRUNCATED',
          `file is truncated or corrupt: Pixel Data holds ${pd.length} bytes, ${this.frames} frames need ${fb * this.frames}`,
          name,
        );
      }
      return Array.from({ length: this.frames }, (_, i) => [{ off: pd.offset + i * fb, len: fb }]);
    }
    // encapsulated: items of fragments; the first item is the Basic Offset Table
    const hdr = async (p: number) => {
      const b = await this.src.read(p, 8);
      return { tag: ((b.readUInt16LE(0) << 16) | b.readUInt16LE(2)) >>> 0, len: b.readUInt32LE(4) };
    };
    let p = pd.offset;
    const bot = await hdr(p);
    if (bot.tag !== 0xfffee000) throw new SlideError('CORRUPT', 'encapsulated Pixel Data has no offset table item', name);
    const botBytes = bot.len ? await this.src.read(p + 8, bot.len) : Buffer.alloc(0);
    p += 8 + bot.len;
    const first = p;
    const frags: { off: number; len: number; at: number }[] = [];
    const eot = this.ds.get(T.ExtendedOffsetTable)?.value,
      eotl = this.ds.get(T.ExtendedOffsetTableLengths)?.value;
    if (eot && eotl && eot.length / 8 === this.frames) {
      return Array.from({ length: this.frames }, (_, i) => [
        { off: first + Number(eot.readBigUInt64LE(i * 8)) + 8, len: Number(eotl.readBigUInt64LE(i * 8)) },
      ]);
    }
    for (;;) {
      const h = await hdr(p);
      if (h.tag === 0xfffee0dd) break;
      if (h.tag !== 0xfffee000) throw new SlideError('CORRUPT', `bad Pixel Data fragment at byte ${p}`, name);
      if (p + 8 + h.len > this.src.size)
        throw new SlideError('TRUNCATED', 'file is truncated or corrupt: a Pixel Data fragment runs past the end', name);
      frags.push({ off: p + 8, len: h.len, at: p - first });
      p += 8 + h.len;
    }
    if (botBytes.length >= 4 * this.frames && this.frames > 1) {
      const starts = Array.from({ length: this.frames }, (_, i) => botBytes.readUInt32LE(i * 4));
      return starts.map((s, i) => frags.filter((f) => f.at >= s && (i + 1 >= starts.length || f.at < starts[i + 1])));
    }
    if (frags.length === this.frames) return frags.map((f) => [f]);
    if (this.frames === 1) return [frags];
    // group by JPEG start-of-image markers
    const out: { off: number; len: number }[][] = [];
    for (const f of frags) {
      const b = await this.src.read(f.off, Math.min(2, f.len));
      if ((b[0] === 0xff && b[1] === 0xd8) || out.length === 0) out.push([f]);
      else out[out.length - 1].push(f);
    }
    if (out.length !== this.frames) throw new SlideError('CORRUPT', `Pixel Data has ${out.length} frames, expected ${this.frames}`, name);
    return out;
  }

  async frame(i: number): Promise<RgbImage> {
    const name = this.src.name;
    this.frameIndex ??= this.buildIndex();
    const index = await this.frameIndex;
    const parts = index[i];
    if (!parts) throw new SlideError('CORRUPT', `DICOM frame ${i} does not exist`, name);
    const bytes =
      parts.length === 1
        ? await this.src.read(parts[0].off, parts[0].len)
        : Buffer.concat(await Promise.all(parts.map((f) => this.src.read(f.off, f.len))));
    const pm = this.photometric;
    try {
      if (JPEG_TS.has(this.ts)) return await decodeWithSharp(spliceJpeg(bytes, undefined, pm === 'RGB'));
      if (J2K_TS.has(this.ts)) throw new UnsupportedError('JPEG 2000 compressed frames (no JPEG 2000 decoder available)');
      if (this.ts !== TS.ExplicitLE && this.ts !== TS.ImplicitLE) throw new UnsupportedError(`transfer syntax ${this.ts}`);
      const spp = num(this.ds, T.SamplesPerPixel) ?? 1,
        bits = num(this.ds, T.BitsAllocated) ?? 8;
      let raw = bytes;
      if (num(this.ds, T.PlanarConfiguration) === 1 && spp === 3) {
        const n = this.tileWidth * this.tileHeight;
        raw = Buffer.allocUnsafe(n * 3);
        for (let k = 0; k < n; k++) {
          raw[k * 3] = bytes[k];
          raw[k * 3 + 1] = bytes[n + k];
          raw[k * 3 + 2] = bytes[2 * n + k];
        }
      }
      const photometric = pm === 'RGB' ? 2 : pm === 'MONOCHROME2' ? 1 : pm === 'MONOCHROME1' ? 0 : -1;
      if (photometric < 0) throw new UnsupportedError(`uncompressed ${pm} pixels`);
      return rawToRgb(raw, this.tileWidth, this.tileHeight, { photometric, samplesPerPixel: spp, bitsPerSample: bits, littleEndian: true });
    } catch (err) {
      if (err instanceof SlideError) throw err;
      if (err instanceof UnsupportedError) throw new SlideError('UNSUPPORTED', `DICOM ${err.message} are not supported`, name);
      throw new SlideError('CORRUPT', `corrupt DICOM frame ${i}: ${(err as Error).message.replace(/\s*\n\s*/g, '; ')}`, name, { cause: err });
    }
  }

  async tile(col: number, row: number): Promise<RgbImage | null> {
    const across = Math.ceil(this.width / this.tileWidth);
    let idx: number | undefined;
    if (this.positions) idx = this.positions.get(`${col},${row}`);
    else idx = row * across + col; // TILED_FULL, first focal plane / optical path
    if (idx === undefined || idx >= this.frames) return null;
    return this.frame(idx);
  }
}

export class DicomSlide extends BaseSlide {
  readonly format = 'dicom' as const;
  readonly levels: SlideLevel[];
  readonly associatedImages: string[];
  readonly mpp: Mpp | null;

  private constructor(
    readonly path: string,
    private readonly images: DicomInstance[],
    private readonly assoc: Map<string, DicomInstance>,
    private readonly all: DicomInstance[],
    opts: SlideOptions,
  ) {
    super(opts);
    this.levels = makeLevels(images);
    this.associatedImages = [...assoc.keys()];
    this.mpp = images[0].pixelSpacing();
    this.properties = {
      'dicom.SeriesInstanceUID': images[0].seriesUid,
      'dicom.TransferSyntaxUID': images[0].ts,
      'dicom.PhotometricInterpretation': images[0].photometric,
      'dicom.files': all.map((d) => d.src.name).join('\n'),
    };
  }

  /**
   * Opens a DICOM WSI series: `paths` are the files to consider (one file plus, with
   * `dicomScanDirectory`, the others in its directory); instances of the first file's series are
   * grouped into one slide.
   */
  static async open(first: ByteSource, opts: SlideOptions, extraPaths: string[] = []): Promise<DicomSlide> {
    const main = await DicomInstance.open(first);
    const instances = [main];
    const others: ByteSource[] = [];
    try {
      for (const p of extraPaths) {
        if (resolve(p) === resolve(first.name)) continue;
        let src: FileSource;
        try {
          src = await FileSource.open(p);
        } catch {
          continue;
        }
        let inst: DicomInstance | undefined;
        try {
          if (await isDicom(src)) inst = await DicomInstance.open(src);
        } catch {
          /* not part of the slide */
        }
        if (inst && inst.seriesUid === main.seriesUid && main.seriesUid) instances.push(inst);
        else others.push(src);
      }
    } finally {
      await Promise.all(others.map((s) => s.close()));
    }
    const volumes = instances.filter((d) => d.kind === 'VOLUME').sort((a, b) => b.width - a.width);
    const levels = volumes.filter((d, i) => i === 0 || d.width !== volumes[i - 1].width);
    const assoc = new Map<string, DicomInstance>();
    for (const d of instances) {
      const n = d.kind === 'THUMBNAIL' ? 'thumbnail' : d.kind === 'LABEL' ? 'label' : d.kind === 'OVERVIEW' ? 'macro' : undefined;
      if (n && !assoc.has(n)) assoc.set(n, d);
    }
    if (levels.length === 0) {
      await Promise.all(instances.map((d) => d.src.close()));
      throw new SlideError(
        'UNSUPPORTED',
        `DICOM series has no VOLUME image (only ${[...new Set(instances.map((d) => d.kind))].join(', ')}); open the series' pyramid instead`,
        first.name,
      );
    }
    return new DicomSlide(first.name, levels, assoc, instances, opts);
  }

  protected grid(level: number): TileGrid {
    return this.images[level];
  }

  async readAssociated(name: string): Promise<RgbImage> {
    this.checkOpen();
    const d = this.assoc.get(name);
    if (!d) throw this.err('BAD_ARGUMENT', `no associated image '${name}' (has: ${this.associatedImages.join(', ') || 'none'})`);
    return readWholeGrid(d);
  }

  stats(): SlideStats {
    return { tilesDecoded: this.tilesDecoded, bytesRead: this.all.reduce((s, d) => s + ((d.src as FileSource).bytesRead ?? 0), 0) };
  }

  protected async closeSource(): Promise<void> {
    await Promise.all(this.all.map((d) => d.src.close()));
  }
}

/** The other files in a DICOM file's directory (candidates for the same series). */
export async function siblingFiles(path: string, limit = 2000): Promise<string[]> {
  const dir = dirname(path);
  try {
    const ents = await readdir(dir, { withFileTypes: true });
    return ents
      .filter((e) => e.isFile() && !e.name.startsWith('.'))
      .slice(0, limit)
      .map((e) => join(dir, e.name));
  } catch {
    return [];
  }
}
