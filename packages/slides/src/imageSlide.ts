import sharp from 'sharp';
import { SlideError } from './errors.js';
import { toRgbFromChannels, type RgbImage } from './codecs.js';
import { BaseSlide, makeLevels, plausibleMpp, type Mpp, type SlideLevel, type SlideOptions, type SlideStats, type TileGrid } from './slide.js';
import type { ByteSource } from './source.js';

/** Largest plain image accepted (decoded whole, once, on first read). */
const MAX_PIXELS = 512 * 1024 * 1024;

/** PNG / JPEG / WebP / GIF as a single-level slide (decoded whole by sharp on first read). */
export class ImageSlide extends BaseSlide {
  readonly format = 'image' as const;
  readonly levels: SlideLevel[];
  readonly associatedImages: string[] = [];
  private pixels?: Promise<RgbImage>;
  private decoded = 0;

  private constructor(
    readonly path: string,
    private readonly src: ByteSource & { bytesRead?: number },
    private readonly bytes: Buffer,
    width: number,
    height: number,
    readonly mpp: Mpp | null,
    readonly vendor: string,
    opts: SlideOptions,
  ) {
    super(opts);
    this.levels = makeLevels([{ width, height }]);
  }

  static async open(src: ByteSource, opts: SlideOptions): Promise<ImageSlide> {
    const bytes = await src.read(0, src.size);
    let meta: sharp.Metadata;
    try {
      meta = await sharp(bytes, { limitInputPixels: MAX_PIXELS }).metadata();
    } catch (err) {
      throw new SlideError('CORRUPT', `cannot read image: ${(err as Error).message}`, src.name, { cause: err });
    }
    if (!meta.width || !meta.height) throw new SlideError('CORRUPT', 'image has no size', src.name);
    let mpp: Mpp | null = null;
    if (meta.density) {
      const v = 25400 / meta.density; // sharp reports density in pixels per inch
      if (plausibleMpp(v)) mpp = { x: v, y: v, source: `${meta.format} density` };
    }
    const rot = (meta.orientation ?? 1) >= 5;
    return new ImageSlide(src.name, src, bytes, rot ? meta.height : meta.width, rot ? meta.width : meta.height, mpp, meta.format ?? 'image', opts);
  }

  private decode(): Promise<RgbImage> {
    this.pixels ??= (async () => {
      try {
        const { data, info } = await sharp(this.bytes, { failOn: 'error', limitInputPixels: MAX_PIXELS })
          .rotate() // EXIF orientation
          .raw()
          .toBuffer({ resolveWithObject: true });
        this.decoded++;
        return toRgbFromChannels(data, info.width, info.height, info.channels);
      } catch (err) {
        this.pixels = undefined;
        throw new SlideError('CORRUPT', `cannot decode image: ${(err as Error).message}`, this.path, { cause: err });
      }
    })();
    return this.pixels;
  }

  protected grid(): TileGrid {
    const L = this.levels[0];
    return {
      width: L.width,
      height: L.height,
      tileWidth: L.width,
      tileHeight: L.height,
      tile: () => this.decode(),
    };
  }

  async readAssociated(name: string): Promise<RgbImage> {
    throw this.err('BAD_ARGUMENT', `no associated image '${name}' (a plain image has none)`);
  }

  stats(): SlideStats {
    return { tilesDecoded: this.decoded, bytesRead: this.src.bytesRead ?? 0 };
  }

  protected async closeSource(): Promise<void> {
    this.pixels = undefined;
    await this.src.close();
  }
}
