import { stat } from 'node:fs/promises';
import { extname } from 'node:path';
import { SlideError } from './errors.js';
import { DicomSlide, isDicom, siblingFiles } from './dicom.js';
import { ImageSlide } from './imageSlide.js';
import { OpenSlideSlide } from './openslide.js';
import type { Slide, SlideOptions } from './slide.js';
import { FileSource, type ByteSource } from './source.js';
import { classifyTiff, TiffSlide } from './tiffSlide.js';
import { TiffReader } from './tiff.js';

/** Extensions of formats only OpenSlide reads (no TIFF structure we could parse ourselves). */
const OPENSLIDE_EXT: Record<string, string> = {
  '.mrxs': '3DHISTECH MIRAX',
  '.vms': 'Hamamatsu VMS',
  '.vmu': 'Hamamatsu VMU',
  '.ndpi': 'Hamamatsu NDPI',
  '.scn': 'Leica SCN',
  '.bif': 'Ventana BIF',
  '.svslide': 'Sakura SVSlide',
};

function isFileSource(s: ByteSource): s is FileSource {
  return s instanceof FileSource;
}

/**
 * Opens a slide from a path (a file, or a directory holding one DICOM series), a list of DICOM
 * files of one series, or a {@link ByteSource}. The format is detected from the content (TIFF
 * flavours by their first directory, DICOM by its preamble, images by their signature); OpenSlide
 * formats by extension or TIFF markers.
 */
export async function openSlide(input: string | string[] | ByteSource, opts: SlideOptions = {}): Promise<Slide> {
  if (Array.isArray(input)) {
    if (input.length === 0) throw new SlideError('BAD_ARGUMENT', 'no files given');
    const src = await FileSource.open(input[0]);
    return withClose(src, async () => DicomSlide.open(src, opts, input.slice(1)));
  }
  if (typeof input === 'string') {
    let st;
    try {
      st = await stat(input);
    } catch (err) {
      throw new SlideError('NOT_FOUND', `cannot open slide: ${(err as Error).message}`, input, { cause: err });
    }
    if (st.isDirectory()) {
      const files = (await siblingFiles(input + '/x')).sort();
      for (const f of files) {
        const s = await FileSource.open(f);
        const dcm = await isDicom(s).catch(() => false);
        if (dcm) return withClose(s, () => DicomSlide.open(s, opts, files));
        await s.close();
      }
      throw new SlideError('UNKNOWN_FORMAT', 'directory holds no DICOM files', input);
    }
    const ext = extname(input).toLowerCase();
    if (opts.backend === 'openslide') return OpenSlideSlide.open(input, 'slide', opts);
    if (OPENSLIDE_EXT[ext] && ext !== '.ndpi' && ext !== '.scn' && ext !== '.bif') {
      return OpenSlideSlide.open(input, OPENSLIDE_EXT[ext], opts);
    }
    const src = await FileSource.open(input);
    return withClose(src, () => openSource(src, opts));
  }
  return openSource(input, opts);
}

async function withClose<T>(src: ByteSource, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    await src.close().catch(() => {});
    throw err;
  }
}

async function openSource(src: ByteSource, opts: SlideOptions): Promise<Slide> {
  const name = src.name;
  if (src.size === 0) throw new SlideError('CORRUPT', 'file is empty', name);
  const head = await src.read(0, Math.min(16, src.size));
  const sig = head.toString('latin1', 0, 4);
  if (sig === 'II*\0' || sig === 'MM\0*' || sig === 'II+\0' || sig === 'MM\0+') {
    const tiff = await TiffReader.open(src);
    const chain = await tiff.readChain();
    const { kind, description } = await classifyTiff(chain[0], name);
    if (typeof kind === 'object') {
      if (!isFileSource(src)) throw new SlideError('UNSUPPORTED', `${kind.openslide} needs OpenSlide, which reads only local files`, name);
      await src.close();
      return OpenSlideSlide.open(name, kind.openslide, opts);
    }
    try {
      return await TiffSlide.open(src, tiff, kind, description, chain, opts);
    } catch (err) {
      // JPEG 2000 SVS: fall back to OpenSlide where it is installed
      if (err instanceof SlideError && err.code === 'UNSUPPORTED' && /JPEG 2000/.test(err.message) && isFileSource(src)) {
        try {
          const s = OpenSlideSlide.open(name, 'JPEG 2000 TIFF', opts);
          await src.close();
          return s;
        } catch (e2) {
          if (!(e2 instanceof SlideError && e2.code === 'OPENSLIDE_MISSING')) throw e2;
        }
      }
      throw err;
    }
  }
  if (await isDicom(src)) {
    const extra = opts.dicomScanDirectory === false || !isFileSource(src) ? [] : await siblingFiles(name);
    return DicomSlide.open(src, opts, extra);
  }
  const isPng = head.length >= 8 && head.readUInt32BE(0) === 0x89504e47;
  const isJpeg = head[0] === 0xff && head[1] === 0xd8 && head[2] === 0xff;
  const isWebp = sig === 'RIFF' && head.toString('latin1', 8, 12) === 'WEBP';
  const isGif = sig === 'GIF8';
  if (isPng || isJpeg || isWebp || isGif) return ImageSlide.open(src, opts);
  const ext = extname(name).toLowerCase();
  if (OPENSLIDE_EXT[ext]) {
    if (!isFileSource(src)) throw new SlideError('UNSUPPORTED', `${OPENSLIDE_EXT[ext]} needs OpenSlide, which reads only local files`, name);
    await src.close();
    return OpenSlideSlide.open(name, OPENSLIDE_EXT[ext], opts);
  }
  throw new SlideError('UNKNOWN_FORMAT', 'unknown slide format (not TIFF/SVS/OME-TIFF, DICOM, PNG, JPEG, WebP or an OpenSlide format)', name);
}
