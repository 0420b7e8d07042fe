import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export const SAMPLES = process.env.CFRSAM_SLIDES_DIR ?? join(__dirname, '../../../../shared/slides');

export function tempDir(): { dir: string; file: (name: string, data: Buffer) => string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), 'cfrsam-slides-'));
  return {
    dir,
    file: (name, data) => {
      const p = join(dir, name);
      writeFileSync(p, data);
      return p;
    },
    cleanup: () => rmSync(dir, { recursive: true, force: true }),
  };
}

/** A deterministic RGB test pattern: smooth gradients plus a checker, so offsets are detectable. */
export function pattern(width: number, height: number, seed = 0): Buffer {
  const b = Buffer.alloc(width * height * 3);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const p = (y * width + x) * 3;
      b[p] = (x * 7 + seed) & 0xff;
      b[p + 1] = (y * 5 + seed * 3) & 0xff;
      b[p + 2] = ((x >> 3) + (y >> 3)) & 1 ? 200 : 40;
    }
  }
  return b;
}

/** Crops a raw RGB buffer (no bounds checks). */
export function crop(src: Buffer, srcW: number, x: number, y: number, w: number, h: number): Buffer {
  const out = Buffer.alloc(w * h * 3);
  for (let yy = 0; yy < h; yy++) src.copy(out, yy * w * 3, ((y + yy) * srcW + x) * 3, ((y + yy) * srcW + x + w) * 3);
  return out;
}

/** Box-downsamples a raw RGB buffer by an integer factor (floor size), as TIFF writers do. */
export function downsample(src: Buffer, w: number, h: number, f: number): { data: Buffer; width: number; height: number } {
  const W = Math.floor(w / f),
    H = Math.floor(h / f);
  const out = Buffer.alloc(W * H * 3);
  for (let y = 0; y < H; y++)
    for (let x = 0; x < W; x++)
      for (let c = 0; c < 3; c++) {
        let s = 0;
        for (let dy = 0; dy < f; dy++) for (let dx = 0; dx < f; dx++) s += src[((y * f + dy) * w + x * f + dx) * 3 + c];
        out[(y * W + x) * 3 + c] = Math.round(s / (f * f));
      }
  return { data: out, width: W, height: H };
}

export function meanAbsDiff(a: Buffer, b: Buffer): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} != ${b.length}`);
  let s = 0;
  for (let i = 0; i < a.length; i++) s += Math.abs(a[i] - b[i]);
  return s / a.length;
}

// ------------------------------------------------------------------------------------------
// A minimal tiled TIFF / BigTIFF writer: uncompressed RGB tiles, optional SubIFD pyramid and
// resolution tags, little endian.

interface TiffLevel {
  data: Buffer;
  width: number;
  height: number;
}

export function writeTiledTiff(
  levels: TiffLevel[],
  opts: { bigTiff?: boolean; tile?: number; subIfds?: boolean; resolution?: { value: number; unit: 1 | 2 | 3 }; description?: string } = {},
): Buffer {
  const big = !!opts.bigTiff,
    T = opts.tile ?? 16;
  const chunks: Buffer[] = [];
  let pos = 0;
  const push = (b: Buffer): number => {
    if (pos % 2) {
      chunks.push(Buffer.alloc(1));
      pos++;
    }
    const at = pos;
    chunks.push(b);
    pos += b.length;
    return at;
  };
  const header = Buffer.alloc(big ? 16 : 8);
  header.write('II', 0, 'latin1');
  if (big) {
    header.writeUInt16LE(43, 2);
    header.writeUInt16LE(8, 4);
  } else header.writeUInt16LE(42, 2);
  push(header);
  // tile data for every level
  const tileInfo = levels.map((L) => {
    const across = Math.ceil(L.width / T),
      down = Math.ceil(L.height / T);
    const offs: number[] = [],
      counts: number[] = [];
    for (let r = 0; r < down; r++)
      for (let c = 0; c < across; c++) {
        const t = Buffer.alloc(T * T * 3);
        for (let y = 0; y < T && r * T + y < L.height; y++) {
          const w = Math.min(T, L.width - c * T);
          L.data.copy(t, y * T * 3, ((r * T + y) * L.width + c * T) * 3, ((r * T + y) * L.width + c * T + w) * 3);
        }
        offs.push(push(t));
        counts.push(t.length);
      }
    return { offs, counts };
  });
  type E = [number, number, number[] | Buffer]; // tag, type, values
  const writeValues = (type: number, v: number[] | Buffer): Buffer => {
    if (Buffer.isBuffer(v)) return v;
    const size = { 3: 2, 4: 4, 5: 8, 16: 8, 13: 4, 18: 8 }[type]!;
    const b = Buffer.alloc(v.length * size);
    v.forEach((x, i) => {
      if (type === 3) b.writeUInt16LE(x, i * 2);
      else if (type === 4 || type === 13) b.writeUInt32LE(x, i * 4);
      else if (type === 5) {
        b.writeUInt32LE(Math.round(x * 1000), i * 8);
        b.writeUInt32LE(1000, i * 8 + 4);
      } else b.writeBigUInt64LE(BigInt(x), i * 8);
    });
    return b;
  };
  const writeIfd = (entries: E[], next: number): { at: number; patchNext: (v: number) => void; buf: Buffer } => {
    entries.sort((a, b) => a[0] - b[0]);
    const entSize = big ? 20 : 12,
      inline = big ? 8 : 4;
    const vals = entries.map(([, type, v]) => writeValues(type, v));
    const ext = vals.map((b) => (b.length > inline ? push(b) : 0));
    const n = entries.length;
    const buf = Buffer.alloc((big ? 8 : 2) + n * entSize + (big ? 8 : 4));
    if (big) buf.writeBigUInt64LE(BigInt(n), 0);
    else buf.writeUInt16LE(n, 0);
    entries.forEach(([tag, type, v], i) => {
      const p = (big ? 8 : 2) + i * entSize;
      const count = Buffer.isBuffer(v) ? v.length : v.length;
      buf.writeUInt16LE(tag, p);
      buf.writeUInt16LE(type, p + 2);
      if (big) buf.writeBigUInt64LE(BigInt(count), p + 4);
      else buf.writeUInt32LE(count, p + 4);
      const vp = p + (big ? 12 : 8);
      if (vals[i].length > inline) {
        if (big) buf.writeBigUInt64LE(BigInt(ext[i]), vp);
        else buf.writeUInt32LE(ext[i], vp);
      } else vals[i].copy(buf, vp);
    });
    const np = buf.length - (big ? 8 : 4);
    const setNext = (v: number) => (big ? buf.writeBigUInt64LE(BigInt(v), np) : buf.writeUInt32LE(v, np));
    setNext(next);
    const at = push(buf);
    return { at, patchNext: setNext, buf };
  };
  const off = big ? 16 : 4;
  const levelEntries = (i: number, extra: E[] = []): E[] => {
    const L = levels[i];
    const e: E[] = [
      [254, 4, [i === 0 ? 0 : 1]],
      [256, 4, [L.width]],
      [257, 4, [L.height]],
      [258, 3, [8, 8, 8]],
      [259, 3, [1]],
      [262, 3, [2]],
      [277, 3, [3]],
      [284, 3, [1]],
      [322, 3, [T]],
      [323, 3, [T]],
      [324, big ? 16 : 4, tileInfo[i].offs],
      [325, big ? 16 : 4, tileInfo[i].counts],
      ...extra,
    ];
    if (opts.resolution) {
      e.push([282, 5, [opts.resolution.value]], [283, 5, [opts.resolution.value]], [296, 3, [opts.resolution.unit]]);
    }
    if (i === 0 && opts.description) e.push([270, 2, Buffer.from(opts.description + '\0', 'latin1')]);
    return e;
  };
  let firstAt: number;
  if (opts.subIfds && levels.length > 1) {
    const subs = levels.slice(1).map((_, k) => writeIfd(levelEntries(k + 1), 0).at);
    firstAt = writeIfd(levelEntries(0, [[330, big ? 18 : 13, subs]]), 0).at;
  } else {
    const ifds = levels.map((_, i) => writeIfd(levelEntries(i), 0));
    for (let i = 0; i + 1 < ifds.length; i++) ifds[i].patchNext(ifds[i + 1].at);
    firstAt = ifds[0].at;
  }
  if (big) header.writeBigUInt64LE(BigInt(firstAt), 8);
  else header.writeUInt32LE(firstAt, off);
  return Buffer.concat(chunks);
}

// ------------------------------------------------------------------------------------------
// A minimal DICOM VL Whole Slide Microscopy writer (explicit VR little endian, TILED_FULL).

function dcmEl(group: number, elem: number, vr: string, value: Buffer): Buffer {
  if (value.length % 2) value = Buffer.concat([value, Buffer.from(vr === 'UI' || vr === 'OB' ? [0] : [0x20])]);
  const long = ['OB', 'OW', 'SQ', 'UN', 'UT'].includes(vr);
  const h = Buffer.alloc(long ? 12 : 8);
  h.writeUInt16LE(group, 0);
  h.writeUInt16LE(elem, 2);
  h.write(vr, 4, 'latin1');
  if (long) h.writeUInt32LE(value.length, 8);
  else h.writeUInt16LE(value.length, 6);
  return Buffer.concat([h, value]);
}
const s = (v: string) => Buffer.from(v, 'latin1');
const us = (v: number) => {
  const b = Buffer.alloc(2);
  b.writeUInt16LE(v);
  return b;
};
const ul = (v: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v);
  return b;
};
function sq(group: number, elem: number, items: Buffer[]): Buffer {
  const body = Buffer.concat(
    items.map((it) => {
      const h = Buffer.alloc(8);
      h.writeUInt16LE(0xfffe, 0);
      h.writeUInt16LE(0xe000, 2);
      h.writeUInt32LE(it.length, 4);
      return Buffer.concat([h, it]);
    }),
  );
  return dcmEl(group, elem, 'SQ', body);
}

export interface DicomLevel {
  data: Buffer;
  width: number;
  height: number;
  tile: number;
  kind?: 'VOLUME' | 'THUMBNAIL' | 'LABEL' | 'OVERVIEW';
  /** JPEG-encode each frame with this function instead of storing raw pixels. */
  jpeg?: (tile: Buffer, w: number, h: number) => Buffer;
}

export function writeDicomWsi(L: DicomLevel, series: string, instance: string, pixelSpacingMm: number): Buffer {
  const T = L.tile;
  const across = Math.ceil(L.width / T),
    down = Math.ceil(L.height / T);
  const frames: Buffer[] = [];
  for (let r = 0; r < down; r++)
    for (let c = 0; c < across; c++) {
      const t = Buffer.alloc(T * T * 3, 255);
      for (let y = 0; y < T && r * T + y < L.height; y++) {
        const w = Math.min(T, L.width - c * T);
        L.data.copy(t, y * T * 3, ((r * T + y) * L.width + c * T) * 3, ((r * T + y) * L.width + c * T + w) * 3);
      }
      frames.push(L.jpeg ? L.jpeg(t, T, T) : t);
    }
  const ts = L.jpeg ? '1.2.840.10008.1.2.4.50' : '1.2.840.10008.1.2.1';
  const sop = '1.2.840.10008.5.1.4.1.1.77.1.6';
  const metaBody = Buffer.concat([
    dcmEl(2, 1, 'OB', Buffer.from([0, 1])),
    dcmEl(2, 2, 'UI', s(sop)),
    dcmEl(2, 3, 'UI', s(instance)),
    dcmEl(2, 0x10, 'UI', s(ts)),
  ]);
  const meta = Buffer.concat([dcmEl(2, 0, 'UL', ul(metaBody.length)), metaBody]);
  let pixel: Buffer;
  if (L.jpeg) {
    const item = (b: Buffer) => {
      const h = Buffer.alloc(8);
      h.writeUInt16LE(0xfffe, 0);
      h.writeUInt16LE(0xe000, 2);
      const v = b.length % 2 ? Buffer.concat([b, Buffer.from([0])]) : b;
      h.writeUInt32LE(v.length, 4);
      return Buffer.concat([h, v]);
    };
    const h = Buffer.alloc(12);
    h.writeUInt16LE(0x7fe0, 0);
    h.writeUInt16LE(0x10, 2);
    h.write('OB', 4, 'latin1');
    h.writeUInt32LE(0xffffffff, 8);
    const end = Buffer.alloc(8);
    end.writeUInt16LE(0xfffe, 0);
    end.writeUInt16LE(0xe0dd, 2);
    pixel = Buffer.concat([h, item(Buffer.alloc(0)), ...frames.map(item), end]);
  } else {
    pixel = dcmEl(0x7fe0, 0x10, 'OB', Buffer.concat(frames));
  }
  const ds = Buffer.concat([
    dcmEl(8, 8, 'CS', s(`ORIGINAL\\PRIMARY\\${L.kind ?? 'VOLUME'}\\NONE`)),
    dcmEl(8, 0x16, 'UI', s(sop)),
    dcmEl(8, 0x18, 'UI', s(instance)),
    dcmEl(0x20, 0xe, 'UI', s(series)),
    dcmEl(0x20, 0x9311, 'CS', s('TILED_FULL')),
    dcmEl(0x28, 2, 'US', us(3)),
    dcmEl(0x28, 4, 'CS', s(L.jpeg ? 'YBR_FULL_422' : 'RGB')),
    dcmEl(0x28, 6, 'US', us(0)),
    dcmEl(0x28, 8, 'IS', s(String(frames.length))),
    dcmEl(0x28, 0x10, 'US', us(T)),
    dcmEl(0x28, 0x11, 'US', us(T)),
    dcmEl(0x28, 0x100, 'US', us(8)),
    dcmEl(0x28, 0x101, 'US', us(8)),
    dcmEl(0x28, 0x102, 'US', us(7)),
    dcmEl(0x28, 0x103, 'US', us(0)),
    dcmEl(0x48, 6, 'UL', ul(L.width)),
    dcmEl(0x48, 7, 'UL', ul(L.height)),
    sq(0x5200, 0x9229, [sq(0x28, 0x9110, [dcmEl(0x28, 0x30, 'DS', s(`${pixelSpacingMm}\\${pixelSpacingMm}`))])]),
    pixel,
  ]);
  return Buffer.concat([Buffer.alloc(128), s('DICM'), meta, ds]);
}
