import { SlideError } from './errors.js';
import type { ByteSource } from './source.js';

/** TIFF tag numbers used by the readers. */
export const Tag = {
  NewSubfileType: 254,
  ImageWidth: 256,
  ImageLength: 257,
  BitsPerSample: 258,
  Compression: 259,
  Photometric: 262,
  ImageDescription: 270,
  StripOffsets: 273,
  SamplesPerPixel: 277,
  RowsPerStrip: 278,
  StripByteCounts: 279,
  XResolution: 282,
  YResolution: 283,
  PlanarConfiguration: 284,
  ResolutionUnit: 296,
  Predictor: 317,
  ColorMap: 320,
  TileWidth: 322,
  TileLength: 323,
  TileOffsets: 324,
  TileByteCounts: 325,
  SubIFDs: 330,
  ExtraSamples: 338,
  SampleFormat: 339,
  JPEGTables: 347,
  XMP: 700,
  NDPI_FORMAT_FLAG: 65420,
} as const;

// byte size of each TIFF field type
const TYPE_SIZE: Record<number, number> = {
  1: 1,
  2: 1,
  3: 2,
  4: 4,
  5: 8,
  6: 1,
  7: 1,
  8: 2,
  9: 4,
  10: 8,
  11: 4,
  12: 8,
  13: 4,
  16: 8,
  17: 8,
  18: 8,
};

/** Values up to this many bytes are read with the directory; larger ones (tile tables) on demand. */
const EAGER_BYTES = 64 * 1024;

interface Entry {
  tag: number;
  type: number;
  count: number;
  /** File offset of the value bytes. */
  offset: number;
  /** Value bytes if already loaded. */
  bytes?: Buffer;
}

export class TiffReader {
  private constructor(
    readonly src: ByteSource,
    readonly littleEndian: boolean,
    readonly bigTiff: boolean,
    readonly firstIfd: number,
  ) {}

  static async open(src: ByteSource): Promise<TiffReader> {
    const head = await src.read(0, Math.min(16, src.size));
    if (head.length < 8) throw new SlideError('TRUNCATED', 'file too short for a TIFF header', src.name);
    const bo = head.toString('latin1', 0, 2);
    if (bo !== 'II' && bo !== 'MM') throw new SlideError('UNKNOWN_FORMAT', 'not a TIFF file', src.name);
    const le = bo === 'II';
    const magic = le ? head.readUInt16LE(2) : head.readUInt16BE(2);
    if (magic === 42) {
      return new TiffReader(src, le, false, le ? head.readUInt32LE(4) : head.readUInt32BE(4));
    }
    if (magic === 43) {
      if (head.length < 16) throw new SlideError('TRUNCATED', 'file too short for a BigTIFF header', src.name);
      const first = le ? head.readBigUInt64LE(8) : head.readBigUInt64BE(8);
      return new TiffReader(src, le, true, toSafe(first, src.name));
    }
    throw new SlideError('UNKNOWN_FORMAT', `not a TIFF file (magic ${magic})`, src.name);
  }

  u16(b: Buffer, o: number): number {
    return this.littleEndian ? b.readUInt16LE(o) : b.readUInt16BE(o);
  }
  u32(b: Buffer, o: number): number {
    return this.littleEndian ? b.readUInt32LE(o) : b.readUInt32BE(o);
  }
  u64(b: Buffer, o: number): number {
    return toSafe(this.littleEndian ? b.readBigUInt64LE(o) : b.readBigUInt64BE(o), this.src.name);
  }

  /** Reads one image file directory at `offset`. */
  async readIfd(offset: number): Promise<Ifd> {
    const name = this.src.name;
    if (offset < 8 || offset >= this.src.size) {
      throw new SlideError(
        'CORRUPT',
        `file is truncated or corrupt: TIFF directory offset ${offset} is outside the file (${this.src.size} bytes)`,
        name,
      );
    }
    const cntSize = this.bigTiff ? 8 : 2;
    const entSize = this.bigTiff ? 20 : 12;
    const inline = this.bigTiff ? 8 : 4;
    const cb = await this.src.read(offset, cntSize);
    const n = this.bigTiff ? this.u64(cb, 0) : this.u16(cb, 0);
    if (n === 0 || n > 4096) throw new SlideError('CORRUPT', `TIFF directory at ${offset} has ${n} entries`, name);
    const body = await this.src.read(offset + cntSize, n * entSize + (this.bigTiff ? 8 : 4));
    const entries = new Map<number, Entry>();
    const deferred: Entry[] = [];
    for (let i = 0; i < n; i++) {
      const p = i * entSize;
      const tag = this.u16(body, p);
      const type = this.u16(body, p + 2);
      const count = this.bigTiff ? this.u64(body, p + 4) : this.u32(body, p + 4);
      const ts = TYPE_SIZE[type];
      if (!ts) continue; // unknown type: ignore the tag, as libtiff does
      const size = ts * count;
      const vp = p + (this.bigTiff ? 12 : 8);
      const e: Entry = { tag, type, count, offset: 0 };
      if (size <= inline) {
        e.offset = offset + cntSize + vp;
        e.bytes = body.subarray(vp, vp + size);
      } else {
        e.offset = this.bigTiff ? this.u64(body, vp) : this.u32(body, vp);
        if (e.offset + size > this.src.size) {
          throw new SlideError('TRUNCATED', `file is truncated or corrupt: TIFF tag ${tag} points past the end of the file`, name);
        }
        if (size <= EAGER_BYTES) deferred.push(e);
      }
      entries.set(tag, e);
    }
    await Promise.all(
      deferred.map(async (e) => {
        e.bytes = await this.src.read(e.offset, TYPE_SIZE[e.type] * e.count);
      }),
    );
    const next = this.bigTiff ? this.u64(body, n * entSize) : this.u32(body, n * entSize);
    return new Ifd(this, offset, entries, next);
  }

  /** The main chain of directories (guarding against loops). */
  async readChain(maxIfds = 1000): Promise<Ifd[]> {
    const out: Ifd[] = [];
    const seen = new Set<number>();
    let off = this.firstIfd;
    while (off !== 0 && out.length < maxIfds) {
      if (seen.has(off)) throw new SlideError('CORRUPT', 'TIFF directory chain loops', this.src.name);
      seen.add(off);
      const ifd = await this.readIfd(off);
      out.push(ifd);
      off = ifd.next;
    }
    return out;
  }
}

export class Ifd {
  constructor(
    readonly tiff: TiffReader,
    readonly offset: number,
    private readonly entries: Map<number, Entry>,
    readonly next: number,
  ) {}

  has(tag: number): boolean {
    return this.entries.has(tag);
  }

  private async bytes(tag: number): Promise<{ e: Entry; b: Buffer } | undefined> {
    const e = this.entries.get(tag);
    if (!e) return undefined;
    if (!e.bytes) e.bytes = await this.tiff.src.read(e.offset, TYPE_SIZE[e.type] * e.count);
    return { e, b: e.bytes };
  }

  /** Numeric values of a tag (rationals as num/den); lazily reads large arrays. */
  async numbers(tag: number): Promise<number[] | undefined> {
    const r = await this.bytes(tag);
    return r ? this.decode(r.e, r.b) : undefined;
  }

  /** Synchronous access for tags already loaded (all small tags). */
  nums(tag: number): number[] | undefined {
    const e = this.entries.get(tag);
    if (!e?.bytes) return undefined;
    return this.decode(e, e.bytes);
  }

  num(tag: number, dflt: number): number {
    return this.nums(tag)?.[0] ?? dflt;
  }

  async raw(tag: number): Promise<Buffer | undefined> {
    return (await this.bytes(tag))?.b;
  }

  async string(tag: number): Promise<string | undefined> {
    const b = await this.raw(tag);
    if (!b) return undefined;
    let end = b.length;
    while (end > 0 && b[end - 1] === 0) end--;
    return b.toString('utf8', 0, end);
  }

  private decode(e: Entry, b: Buffer): number[] {
    const t = this.tiff;
    const out = new Array<number>(e.count);
    const le = t.littleEndian;
    for (let i = 0; i < e.count; i++) {
      switch (e.type) {
        case 1:
        case 2:
        case 7:
          out[i] = b[i];
          break;
        case 6:
          out[i] = b.readInt8(i);
          break;
        case 3:
          out[i] = t.u16(b, i * 2);
          break;
        case 8:
          out[i] = le ? b.readInt16LE(i * 2) : b.readInt16BE(i * 2);
          break;
        case 4:
        case 13:
          out[i] = t.u32(b, i * 4);
          break;
        case 9:
          out[i] = le ? b.readInt32LE(i * 4) : b.readInt32BE(i * 4);
          break;
        case 5: {
          const d = t.u32(b, i * 8 + 4);
          out[i] = d === 0 ? 0 : t.u32(b, i * 8) / d;
          break;
        }
        case 10: {
          const n = le ? b.readInt32LE(i * 8) : b.readInt32BE(i * 8);
          const d = le ? b.readInt32LE(i * 8 + 4) : b.readInt32BE(i * 8 + 4);
          out[i] = d === 0 ? 0 : n / d;
          break;
        }
        case 11:
          out[i] = le ? b.readFloatLE(i * 4) : b.readFloatBE(i * 4);
          break;
        case 12:
          out[i] = le ? b.readDoubleLE(i * 8) : b.readDoubleBE(i * 8);
          break;
        case 16:
        case 18:
          out[i] = t.u64(b, i * 8);
          break;
        case 17:
          out[i] = Number(le ? b.readBigInt64LE(i * 8) : b.readBigInt64BE(i * 8));
          break;
        default:
          out[i] = 0;
      }
    }
    return out;
  }

  get width(): number {
    return this.num(Tag.ImageWidth, 0);
  }
  get height(): number {
    return this.num(Tag.ImageLength, 0);
  }
  get tiled(): boolean {
    return this.has(Tag.TileWidth) && this.has(Tag.TileOffsets);
  }
  get subfileType(): number {
    return this.num(Tag.NewSubfileType, 0);
  }
  get compression(): number {
    return this.num(Tag.Compression, 1);
  }
}

function toSafe(v: bigint, name: string): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new SlideError('CORRUPT', 'TIFF offset too large', name);
  return Number(v);
}
