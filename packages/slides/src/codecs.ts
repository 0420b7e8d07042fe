import { inflateSync, inflateRawSync } from 'node:zlib';
import sharp from 'sharp';

/** 8-bit RGB pixels, interleaved, row-major, no padding. */
export interface RgbImage {
  data: Buffer;
  width: number;
  height: number;
}

/** Compression values of TIFF tag 259 that this package knows by name. */
export const Compression = {
  None: 1,
  LZW: 5,
  OldJPEG: 6,
  JPEG: 7,
  AdobeDeflate: 8,
  PackBits: 32773,
  Deflate: 32946,
  AperioJP2kYCbCr: 33003,
  AperioJP2kRGB: 33005,
  JPEG2000: 34712,
  ZSTD: 50000,
  WebP: 50001,
} as const;

export function compressionName(c: number): string {
  switch (c) {
    case 1:
      return 'none';
    case 5:
      return 'LZW';
    case 6:
      return 'old-style JPEG';
    case 7:
      return 'JPEG';
    case 8:
    case 32946:
      return 'deflate';
    case 32773:
      return 'PackBits';
    case 33003:
    case 33005:
    case 34712:
      return 'JPEG 2000';
    case 34887:
      return 'LERC';
    case 50000:
      return 'ZSTD';
    case 50001:
      return 'WebP';
    default:
      return `compression ${c}`;
  }
}

export function isJpeg2000(c: number): boolean {
  return c === 33003 || c === 33005 || c === 34712;
}

/** Adobe APP14 segment with transform 0: tells libjpeg the 3 components are RGB, not YCbCr. */
const ADOBE_RGB = Buffer.from([0xff, 0xee, 0x00, 0x0e, 0x41, 0x64, 0x6f, 0x62, 0x65, 0x00, 0x64, 0x00, 0x00, 0x00, 0x00, 0x00]);

/**
 * Builds a complete JPEG stream from an abbreviated TIFF/DICOM tile: splices the shared JPEGTables
 * (quantisation and Huffman tables) after SOI and, when `rgb` is set, drops JFIF/Adobe markers and
 * inserts an Adobe APP14 marker with transform 0 so the decoder does not apply a YCbCr→RGB
 * conversion to components that are already RGB (Aperio SVS, photometric RGB).
 */
export function spliceJpeg(tile: Buffer, tables: Buffer | undefined, rgb: boolean): Buffer {
  if (tile.length < 4 || tile[0] !== 0xff || tile[1] !== 0xd8) {
    throw new Error('JPEG tile does not start with SOI');
  }
  const parts: Buffer[] = [tile.subarray(0, 2)];
  if (rgb) parts.push(ADOBE_RGB);
  if (tables && tables.length > 4) {
    // strip the tables' SOI and EOI
    let end = tables.length;
    if (tables[end - 2] === 0xff && tables[end - 1] === 0xd9) end -= 2;
    parts.push(tables.subarray(tables[0] === 0xff && tables[1] === 0xd8 ? 2 : 0, end));
  }
  if (!rgb) {
    parts.push(tile.subarray(2));
  } else {
    // copy the tile's segments up to SOS, skipping APP0 (JFIF) and APP14 (Adobe)
    let p = 2;
    while (p + 4 <= tile.length && tile[p] === 0xff) {
      const m = tile[p + 1];
      if (m === 0xda || m === 0xd9) break; // SOS / EOI: entropy-coded data follows
      if (m === 0xff) {
        p++;
        continue;
      }
      const len = tile.readUInt16BE(p + 2);
      if (m !== 0xe0 && m !== 0xee) parts.push(tile.subarray(p, p + 2 + len));
      p += 2 + len;
    }
    parts.push(tile.subarray(p));
  }
  return Buffer.concat(parts);
}

/** Decodes any image stream sharp knows (JPEG, WebP, PNG, ...) to 8-bit RGB. */
export async function decodeWithSharp(buf: Buffer): Promise<RgbImage> {
  const { data, info } = await sharp(buf, { failOn: 'error', limitInputPixels: false }).raw().toBuffer({ resolveWithObject: true });
  return toRgbFromChannels(data, info.width, info.height, info.channels);
}

/** Drops alpha / expands grey: sharp's raw output (1-4 channels, 8-bit) to RGB. */
export function toRgbFromChannels(data: Buffer, width: number, height: number, channels: number): RgbImage {
  if (channels === 3) return { data, width, height };
  const n = width * height;
  const out = Buffer.allocUnsafe(n * 3);
  if (channels === 1 || channels === 2) {
    for (let i = 0, j = 0; i < n; i++, j += channels) {
      const v = data[j];
      out[i * 3] = v;
      out[i * 3 + 1] = v;
      out[i * 3 + 2] = v;
    }
  } else {
    for (let i = 0, j = 0; i < n; i++, j += channels) {
      out[i * 3] = data[j];
      out[i * 3 + 1] = data[j + 1];
      out[i * 3 + 2] = data[j + 2];
    }
  }
  return { data: out, width, height };
}

/** TIFF LZW (MSB-first codes, "early change"), as written by libtiff. */
export function lzwDecode(input: Buffer, expected: number): Buffer {
  const out = Buffer.alloc(expected);
  const prefix = new Int32Array(4096);
  const suffix = new Uint8Array(4096);
  const first = new Uint8Array(4096);
  const len = new Int32Array(4096);
  for (let i = 0; i < 256; i++) {
    prefix[i] = -1;
    suffix[i] = i;
    first[i] = i;
    len[i] = 1;
  }
  let next = 258,
    width = 9,
    old = -1,
    op = 0,
    bitPos = 0;
  const totalBits = input.length * 8;
  const write = (code: number): void => {
    const l = len[code];
    let c = code;
    for (let k = l - 1; k >= 0; k--) {
      if (op + k < expected) out[op + k] = suffix[c];
      c = prefix[c];
    }
    op += l;
  };
  while (bitPos + width <= totalBits && op < expected) {
    let code = 0;
    for (let k = 0; k < width; k++) {
      const bit = (input[(bitPos + k) >> 3] >> (7 - ((bitPos + k) & 7))) & 1;
      code = (code << 1) | bit;
    }
    bitPos += width;
    if (code === 257) break;
    if (code === 256) {
      next = 258;
      width = 9;
      old = -1;
      continue;
    }
    if (old === -1) {
      if (code > 255) throw new Error('LZW stream starts with a non-literal code');
      write(code);
      old = code;
      continue;
    }
    if (code < next) {
      write(code);
      if (next < 4096) {
        prefix[next] = old;
        suffix[next] = first[code];
        first[next] = first[old];
        len[next] = len[old] + 1;
        next++;
      }
    } else if (code === next) {
      if (next >= 4096) throw new Error('LZW table overflow');
      prefix[next] = old;
      suffix[next] = first[old];
      first[next] = first[old];
      len[next] = len[old] + 1;
      next++;
      write(code);
    } else {
      throw new Error(`bad LZW code ${code}`);
    }
    old = code;
    if (next >= (1 << width) - 1 && width < 12) width++;
  }
  return out;
}

export function packBitsDecode(input: Buffer, expected: number): Buffer {
  const out = Buffer.alloc(expected);
  let ip = 0,
    op = 0;
  while (ip < input.length && op < expected) {
    const n = input.readInt8(ip++);
    if (n >= 0) {
      input.copy(out, op, ip, ip + n + 1);
      ip += n + 1;
      op += n + 1;
    } else if (n !== -128) {
      out.fill(input[ip++], op, Math.min(expected, op + 1 - n));
      op += 1 - n;
    }
  }
  return out;
}

export interface TiffPixelLayout {
  compression: number;
  photometric: number;
  samplesPerPixel: number;
  bitsPerSample: number;
  predictor: number;
  planar: number;
  littleEndian: boolean;
  jpegTables?: Buffer;
  colorMap?: number[];
}

/**
 * Decodes one TIFF tile or strip (`width` x `rows` pixels as stored) to 8-bit RGB. Throws plain
 * Errors; the caller wraps them into SlideErrors naming the file.
 */
export async function decodeTiffBlock(data: Buffer, width: number, rows: number, l: TiffPixelLayout): Promise<RgbImage> {
  const c = l.compression;
  if (c === Compression.JPEG) {
    // photometric RGB (2) with JPEG: components are RGB without the YCbCr transform (Aperio)
    return decodeWithSharp(spliceJpeg(data, l.jpegTables, l.photometric === 2));
  }
  if (c === Compression.WebP) return decodeWithSharp(data);
  if (l.planar === 2 && l.samplesPerPixel > 1) throw new UnsupportedError('planar (separate) sample layout');
  const bytesPerSample = l.bitsPerSample / 8;
  if (l.bitsPerSample !== 8 && l.bitsPerSample !== 16) {
    throw new UnsupportedError(`${l.bitsPerSample} bits per sample`);
  }
  const rowBytes = width * l.samplesPerPixel * bytesPerSample;
  const expected = rowBytes * rows;
  let raw: Buffer;
  switch (c) {
    case Compression.None:
      raw = data;
      break;
    case Compression.LZW:
      raw = lzwDecode(data, expected);
      break;
    case Compression.PackBits:
      raw = packBitsDecode(data, expected);
      break;
    case Compression.AdobeDeflate:
    case Compression.Deflate:
      try {
        raw = inflateSync(data);
      } catch {
        raw = inflateRawSync(data);
      }
      break;
    default:
      throw new UnsupportedError(`${compressionName(c)} compression`);
  }
  if (raw.length < expected) throw new Error(`tile decodes to ${raw.length} bytes, expected ${expected}`);
  if (l.predictor === 2) {
    raw = Buffer.from(raw.subarray(0, expected)); // never modify the source bytes
    const spp = l.samplesPerPixel;
    if (bytesPerSample === 1) {
      for (let y = 0; y < rows; y++) {
        const o = y * rowBytes;
        for (let i = spp; i < rowBytes; i++) raw[o + i] = (raw[o + i] + raw[o + i - spp]) & 0xff;
      }
    } else {
      for (let y = 0; y < rows; y++) {
        const o = y * rowBytes;
        for (let i = spp; i < width * spp; i++) {
          const p = o + i * 2,
            q = o + (i - spp) * 2;
          const v = l.littleEndian ? raw.readUInt16LE(p) + raw.readUInt16LE(q) : raw.readUInt16BE(p) + raw.readUInt16BE(q);
          if (l.littleEndian) raw.writeUInt16LE(v & 0xffff, p);
          else raw.writeUInt16BE(v & 0xffff, p);
        }
      }
    }
  } else if (l.predictor !== 1) {
    throw new UnsupportedError(`TIFF predictor ${l.predictor}`);
  }
  return rawToRgb(raw, width, rows, l);
}

export class UnsupportedError extends Error {}

/** Uncompressed interleaved samples to RGB (grey, RGB(A), palette; 8 or 16 bits). */
export function rawToRgb(
  raw: Buffer,
  width: number,
  rows: number,
  l: Pick<TiffPixelLayout, 'photometric' | 'samplesPerPixel' | 'bitsPerSample' | 'littleEndian' | 'colorMap'>,
): RgbImage {
  const n = width * rows;
  const spp = l.samplesPerPixel;
  const out = Buffer.allocUnsafe(n * 3);
  const b16 = l.bitsPerSample === 16;
  const s = b16
    ? (i: number) => (l.littleEndian ? raw[i * 2 + 1] : raw[i * 2]) // high byte
    : (i: number) => raw[i];
  const pm = l.photometric;
  if (pm === 0 || pm === 1) {
    for (let i = 0; i < n; i++) {
      const v = pm === 0 ? 255 - s(i * spp) : s(i * spp);
      out[i * 3] = v;
      out[i * 3 + 1] = v;
      out[i * 3 + 2] = v;
    }
  } else if (pm === 2 && spp >= 3) {
    for (let i = 0; i < n; i++) {
      out[i * 3] = s(i * spp);
      out[i * 3 + 1] = s(i * spp + 1);
      out[i * 3 + 2] = s(i * spp + 2);
    }
  } else if (pm === 3 && l.colorMap && !b16) {
    const cm = l.colorMap,
      k = cm.length / 3;
    for (let i = 0; i < n; i++) {
      const v = raw[i * spp];
      out[i * 3] = cm[v] >> 8;
      out[i * 3 + 1] = cm[k + v] >> 8;
      out[i * 3 + 2] = cm[2 * k + v] >> 8;
    }
  } else {
    throw new UnsupportedError(`photometric interpretation ${pm} with ${spp} samples per pixel`);
  }
  return { data: out, width, height: rows };
}
