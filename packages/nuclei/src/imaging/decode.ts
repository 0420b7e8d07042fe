// Decoding and validation of client images: PNG, JPEG or TIFF bytes -> 8-bit RGB pixels.
//
// Everything a client sends is untrusted. The format is recognised from its magic bytes (so an
// unsupported format is named in the error instead of failing somewhere inside libvips), and the
// dimensions are read from the header before any pixel is decoded, so that a small file that
// claims a huge image (a decompression bomb) is refused without allocating it. sharp's
// limitInputPixels is set as well, as a second guard inside libvips.
import sharp from 'sharp';

/** Formats the service accepts. */
export const SUPPORTED_IMAGE_FORMATS = ['png', 'jpeg', 'tiff', 'webp', 'gif'] as const;
export type SupportedImageFormat = (typeof SUPPORTED_IMAGE_FORMATS)[number];

/** An 8-bit RGB image, row-major, 3 bytes per pixel, no padding. */
export interface RgbImage {
  width: number;
  height: number;
  data: Uint8Array;
}

export interface ImageLimits {
  /** Largest accepted width x height. */
  maxPixels: number;
  /** Smallest accepted width and height. */
  minSide: number;
}

export const DEFAULT_IMAGE_LIMITS: ImageLimits = { maxPixels: 64 * 1024 * 1024, minSide: 8 };

/**
 * A problem with the client's image. The message is meant for the client (it says what is wrong
 * and what is accepted); services map this to INVALID_ARGUMENT.
 */
export class ImageInputError extends Error {
  override readonly name = 'ImageInputError';
  /** gRPC INVALID_ARGUMENT, read by status.toServiceError. */
  readonly grpcStatus = 3;
}

const SUPPORTED_LIST = 'PNG, JPEG, TIFF, WebP or GIF (8 or 16 bit; grey, grey+alpha, RGB, RGBA or CMYK JPEG)';

/** Recognises a format from its first bytes; returns a lowercase name, or undefined. */
export function sniffImageFormat(bytes: Uint8Array): string | undefined {
  const b = bytes;
  const starts = (...sig: number[]) => sig.every((v, i) => b[i] === v);
  if (b.length >= 8 && starts(0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a)) return 'png';
  if (b.length >= 3 && starts(0xff, 0xd8, 0xff)) return 'jpeg';
  if (b.length >= 4 && (starts(0x49, 0x49, 0x2a, 0x00) || starts(0x4d, 0x4d, 0x00, 0x2a))) return 'tiff';
  // BigTIFF
  if (b.length >= 4 && (starts(0x49, 0x49, 0x2b, 0x00) || starts(0x4d, 0x4d, 0x00, 0x2b))) return 'tiff';
  if (b.length >= 6 && (starts(0x47, 0x49, 0x46, 0x38, 0x37, 0x61) || starts(0x47, 0x49, 0x46, 0x38, 0x39, 0x61))) return 'gif';
  if (b.length >= 2 && starts(0x42, 0x4d)) return 'bmp';
  if (b.length >= 12 && starts(0x52, 0x49, 0x46, 0x46) && b[8] === 0x57 && b[9] === 0x45 && b[10] === 0x42 && b[11] === 0x50) return 'webp';
  if (b.length >= 12 && b[4] === 0x66 && b[5] === 0x74 && b[6] === 0x79 && b[7] === 0x70) return 'heif/avif';
  if (b.length >= 4 && starts(0x25, 0x50, 0x44, 0x46)) return 'pdf';
  if (b.length >= 4 && starts(0x00, 0x00, 0x00, 0x0c) && b[4] === 0x6a && b[5] === 0x50) return 'jpeg2000';
  const head = Buffer.from(b.subarray(0, 256)).toString('latin1').trimStart().toLowerCase();
  if (head.startsWith('<svg') || (head.startsWith('<?xml') && head.includes('<svg'))) return 'svg';
  return undefined;
}

function isSupported(format: string | undefined): format is SupportedImageFormat {
  return (SUPPORTED_IMAGE_FORMATS as readonly string[]).includes(format ?? '');
}

/** Checks width and height (from a header) against the limits; throws ImageInputError. */
export function checkImageSize(width: number, height: number, limits: ImageLimits): void {
  if (!Number.isFinite(width) || !Number.isFinite(height) || width <= 0 || height <= 0) {
    throw new ImageInputError(`image has no pixels (width ${width}, height ${height})`);
  }
  if (width < limits.minSide || height < limits.minSide) {
    throw new ImageInputError(`image is ${width}x${height} pixels, smaller than the minimum of ${limits.minSide}x${limits.minSide}`);
  }
  if (width * height > limits.maxPixels) {
    throw new ImageInputError(
      `image is ${width}x${height} = ${width * height} pixels, over the limit of ${limits.maxPixels} pixels; ` + 'cut it into smaller regions',
    );
  }
}

export interface DecodedImage extends RgbImage {
  /** The container format. */
  format: SupportedImageFormat;
  /** Bits per sample of the source (8 or 16). */
  sourceBitDepth: number;
  /** Channels of the source (1 grey, 2 grey+alpha, 3 RGB, 4 RGBA or CMYK). */
  sourceChannels: number;
  /** What was done to the image that the caller should know (first frame of an animation, CMYK converted). */
  notes: string[];
}

/**
 * Decodes PNG, JPEG or TIFF bytes into 8-bit RGB. Grey is replicated to RGB, 16-bit samples are
 * scaled to 8 bits, an alpha channel is composited over white (the colour of empty glass in a
 * brightfield slide). Multi-page TIFFs: the first page. EXIF orientation is not applied: pixel
 * coordinates in requests and answers refer to the stored pixel grid, as whole-slide viewers do.
 * Throws ImageInputError for anything the client should fix.
 */
export async function decodeImage(bytes: Uint8Array, limits: ImageLimits = DEFAULT_IMAGE_LIMITS): Promise<DecodedImage> {
  if (bytes.length === 0) throw new ImageInputError(`image is empty (0 bytes); send ${SUPPORTED_LIST} bytes`);
  const sniffed = sniffImageFormat(bytes);
  if (!isSupported(sniffed)) {
    const what = sniffed ? `${sniffed.toUpperCase()} images are not supported` : 'image format not recognised';
    throw new ImageInputError(`${what}; send ${SUPPORTED_LIST}`);
  }
  const input = Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const options: sharp.SharpOptions = { limitInputPixels: limits.maxPixels, failOn: 'error', page: 0, pages: 1 };
  let meta: sharp.Metadata;
  try {
    // Header only: no pixel is decoded, so no limit is needed here; the size is checked just below.
    meta = await sharp(input, { ...options, limitInputPixels: false }).metadata();
  } catch (err) {
    throw new ImageInputError(`image is corrupt: cannot read the ${sniffed.toUpperCase()} header (${errorText(err)})`);
  }
  if (meta.format && meta.format !== sniffed) {
    // A file whose magic bytes and content disagree is not something we want to guess about.
    throw new ImageInputError(`image is corrupt: ${sniffed.toUpperCase()} signature but ${meta.format} content`);
  }
  const width = meta.width ?? 0;
  const height = meta.height ?? 0;
  checkImageSize(width, height, limits);
  const channels = meta.channels ?? 3;
  const cmyk = meta.space === 'cmyk';
  if (channels > 4 || (cmyk && !(sniffed === 'jpeg' || sniffed === 'tiff'))) {
    throw new ImageInputError(`image has ${channels} channels (${meta.space ?? 'unknown'} colour space); send grey, RGB, RGBA or CMYK JPEG`);
  }
  const notes: string[] = [];
  // libvips converts CMYK to sRGB through its bundled CMYK profile (or the file's embedded one).
  if (cmyk) notes.push(`CMYK ${sniffed.toUpperCase()} converted to RGB`);
  const frames = meta.pages ?? 1;
  if (frames > 1 && (sniffed === 'gif' || sniffed === 'webp')) {
    notes.push(`animated ${sniffed.toUpperCase()} with ${frames} frames: the first frame was segmented`);
  } else if (frames > 1 && sniffed === 'tiff') {
    notes.push(`TIFF with ${frames} pages: the first page was segmented`);
  }
  const sourceBitDepth = depthBits(meta.depth);
  let pipeline = sharp(input, options);
  if (meta.hasAlpha) pipeline = pipeline.flatten({ background: '#ffffff' });
  let out: { data: Buffer; info: sharp.OutputInfo };
  try {
    out = await pipeline.toColourspace('srgb').raw({ depth: 'uchar' }).toBuffer({ resolveWithObject: true });
  } catch (err) {
    const msg = errorText(err);
    if (/pixel limit/i.test(msg)) checkImageSize(width, height, limits);
    throw new ImageInputError(`image is corrupt or truncated: cannot decode the ${sniffed.toUpperCase()} pixels (${msg})`);
  }
  const { info, data } = out;
  if (info.channels !== 3 || info.width !== width || info.height !== height) {
    throw new ImageInputError(`image decoded to an unexpected layout (${info.width}x${info.height}x${info.channels}); send ${SUPPORTED_LIST}`);
  }
  return {
    width,
    height,
    data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength),
    format: sniffed,
    sourceBitDepth,
    sourceChannels: channels,
    notes,
  };
}

function depthBits(depth: string | undefined): number {
  switch (depth) {
    case 'ushort':
    case 'short':
      return 16;
    case 'uint':
    case 'int':
    case 'float':
      return 32;
    case 'double':
      return 64;
    default:
      return 8;
  }
}

function errorText(err: unknown): string {
  const msg = err instanceof Error ? err.message : String(err);
  // libvips messages can be multi-line and long; the first line names the problem.
  return msg.split('\n')[0].slice(0, 200);
}

/** Encodes 8-bit RGB pixels as PNG (used by tests and exports). */
export async function encodeRgbPng(image: RgbImage): Promise<Buffer> {
  return sharp(Buffer.from(image.data.buffer, image.data.byteOffset, image.data.byteLength), {
    raw: { width: image.width, height: image.height, channels: 3 },
  })
    .png()
    .toBuffer();
}
