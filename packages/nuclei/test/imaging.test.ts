import sharp from 'sharp';
import { describe, expect, it } from 'vitest';
import { denormalizeToRgb, normalizeRgb } from '@cfrsam/contract';
import {
  decodeImage,
  extractTileRgb,
  glassRects,
  ImageInputError,
  ownerTile,
  PAD_RGB,
  planAxis,
  planTiles,
  rectContains,
  sniffImageFormat,
  tileAlignedRegionSize,
  tissueFraction,
} from '../src/imaging';

const limits = { maxPixels: 1_000_000, minSide: 8 };

function gradientRgb(width: number, height: number): Buffer {
  const data = Buffer.alloc(width * height * 3);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = (y * width + x) * 3;
      data[i] = x % 256;
      data[i + 1] = y % 256;
      data[i + 2] = (x + y) % 256;
    }
  }
  return data;
}

async function expectInputError(bytes: Uint8Array, pattern: RegExp, l = limits) {
  const err = await decodeImage(bytes, l).then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(ImageInputError);
  expect((err as Error).message).toMatch(pattern);
  expect((err as ImageInputError).grpcStatus).toBe(3);
}

describe('decodeImage', () => {
  it('decodes 8-bit RGB PNG exactly', async () => {
    const raw = gradientRgb(20, 12);
    const png = await sharp(raw, { raw: { width: 20, height: 12, channels: 3 } })
      .png()
      .toBuffer();
    const img = await decodeImage(png, limits);
    expect([img.width, img.height, img.format, img.sourceBitDepth]).toEqual([20, 12, 'png', 8]);
    expect(Buffer.from(img.data).equals(raw)).toBe(true);
  });

  it('converts 16-bit grey PNG to 8-bit RGB and decodes TIFF', async () => {
    const u16 = new Uint16Array(10 * 10).map((_, i) => i * 600);
    const png = await sharp(u16, { raw: { width: 10, height: 10, channels: 1 } })
      .toColourspace('grey16')
      .png()
      .toBuffer();
    const img = await decodeImage(png, limits);
    expect(img.sourceBitDepth).toBe(16);
    expect(img.sourceChannels).toBe(1);
    for (const i of [0, 17, 99]) {
      // libvips scales 16 -> 8 bits by truncation (v >> 8), within 1 of v / 257
      const expected = (i * 600) / 257;
      expect(Math.abs(img.data[i * 3] - expected)).toBeLessThanOrEqual(1);
      expect(img.data[i * 3 + 1]).toBe(img.data[i * 3]);
      expect(img.data[i * 3 + 2]).toBe(img.data[i * 3]);
    }
    const tif = await sharp(gradientRgb(9, 9), { raw: { width: 9, height: 9, channels: 3 } })
      .tiff({ compression: 'lzw' })
      .toBuffer();
    const t = await decodeImage(tif, limits);
    expect([t.format, t.width, t.height]).toEqual(['tiff', 9, 9]);
    expect(Buffer.from(t.data).equals(gradientRgb(9, 9))).toBe(true);
  });

  it('composites RGBA over white and decodes JPEG', async () => {
    const rgba = await sharp({ create: { width: 8, height: 8, channels: 4, background: { r: 0, g: 0, b: 0, alpha: 0 } } })
      .png()
      .toBuffer();
    const img = await decodeImage(rgba, limits);
    expect(img.data.every((v) => v === 255)).toBe(true);
    const jpg = await sharp(gradientRgb(16, 16), { raw: { width: 16, height: 16, channels: 3 } })
      .jpeg()
      .toBuffer();
    const j = await decodeImage(jpg, limits);
    expect([j.format, j.width, j.height, j.data.length]).toEqual(['jpeg', 16, 16, 16 * 16 * 3]);
  });

  it('decodes WebP, the first frame of an animated GIF (said in notes) and CMYK JPEG (converted to RGB)', async () => {
    const webp = await sharp(gradientRgb(32, 24), { raw: { width: 32, height: 24, channels: 3 } })
      .webp({ lossless: true })
      .toBuffer();
    expect(sniffImageFormat(webp)).toBe('webp');
    const w = await decodeImage(webp, limits);
    expect([w.format, w.width, w.height, w.notes]).toEqual(['webp', 32, 24, []]);
    expect(Buffer.from(w.data).equals(gradientRgb(32, 24))).toBe(true);

    // Two frames, red then blue: the first (red) is segmented and the note says so.
    const frame = (background: string) =>
      sharp({ create: { width: 16, height: 16, channels: 3, background } })
        .png()
        .toBuffer();
    const gif = await sharp([await frame('red'), await frame('blue')], { join: { animated: true } })
      .gif()
      .toBuffer();
    expect(sniffImageFormat(gif)).toBe('gif');
    const g = await decodeImage(gif, limits);
    expect([g.format, g.width, g.height]).toEqual(['gif', 16, 16]);
    expect(g.notes.join()).toMatch(/GIF with 2 frames: the first frame was segmented/);
    expect([g.data[0], g.data[1], g.data[2]]).toEqual([255, 0, 0]);

    const cmyk = await sharp({ create: { width: 16, height: 16, channels: 3, background: { r: 200, g: 40, b: 40 } } })
      .toColourspace('cmyk')
      .jpeg({ quality: 95 })
      .toBuffer();
    expect((await sharp(cmyk).metadata()).space).toBe('cmyk');
    const c = await decodeImage(cmyk, limits);
    expect(c.notes.join()).toMatch(/CMYK JPEG converted to RGB/);
    // A red stays red (within the round trip through a CMYK profile).
    expect(c.data[0]).toBeGreaterThan(150);
    expect(c.data[1]).toBeLessThan(110);
    expect(c.data[2]).toBeLessThan(110);
  });

  it('rejects empty, corrupt, truncated and unsupported input with a clear message', async () => {
    await expectInputError(new Uint8Array(0), /empty/);
    await expectInputError(Buffer.from('definitely not an image'), /not recognised.*PNG, JPEG, TIFF, WebP or GIF/);
    await expectInputError(Buffer.from('%PDF-1.4\n1 0 obj\n'), /PDF images are not supported.*PNG, JPEG, TIFF, WebP or GIF/);
    await expectInputError(Buffer.concat([Buffer.from('BM'), Buffer.alloc(60)]), /BMP images are not supported/);
    const png = await sharp(gradientRgb(64, 64), { raw: { width: 64, height: 64, channels: 3 } })
      .png()
      .toBuffer();
    await expectInputError(png.subarray(0, png.length - 40), /corrupt or truncated/);
    await expectInputError(png.subarray(0, 20), /corrupt/);
  });

  it('rejects images below the minimum size and over the pixel limit (from the header)', async () => {
    const one = await sharp({ create: { width: 1, height: 1, channels: 3, background: 'red' } })
      .png()
      .toBuffer();
    await expectInputError(one, /1x1 pixels, smaller than the minimum of 8x8/);
    const big = await sharp({ create: { width: 2000, height: 1000, channels: 3, background: 'white' } })
      .png()
      .toBuffer();
    await expectInputError(big, /2000x1000 = 2000000 pixels, over the limit of 1000000/);
  });
});

describe('tiling', () => {
  it('keeps a small image as one padded tile', () => {
    const layout = planTiles(100, 80, 256, 48);
    expect(layout.tiles).toHaveLength(1);
    expect(layout.tiles[0].valid).toEqual({ x0: 0, y0: 0, x1: 100, y1: 80 });
    expect(layout.tiles[0].core).toEqual({ x0: 0, y0: 0, x1: 100, y1: 80 });
  });

  it('spreads tiles evenly with at least the overlap, the last one ending at the edge', () => {
    for (const length of [257, 300, 512, 600, 1000, 4096]) {
      const { starts, bounds } = planAxis(length, 256, 48);
      expect(starts[0]).toBe(0);
      expect(starts[starts.length - 1]).toBe(length - 256);
      for (let i = 0; i + 1 < starts.length; i++) {
        expect(starts[i] + 256 - starts[i + 1]).toBeGreaterThanOrEqual(48);
        // every core lies at least overlap/2 inside its tile (except at the image edges)
        expect(bounds[i + 1] - starts[i + 1]).toBeGreaterThanOrEqual(24);
        expect(starts[i] + 256 - bounds[i + 1]).toBeGreaterThanOrEqual(24);
      }
      expect(bounds[0]).toBe(0);
      expect(bounds[bounds.length - 1]).toBe(length);
    }
  });

  it('cores partition the image: every pixel has exactly one owner, inside its tile', () => {
    const layout = planTiles(600, 500, 256, 48);
    expect([layout.cols, layout.rows]).toEqual([3, 3]);
    const owners = new Uint8Array(600 * 500);
    for (const t of layout.tiles) {
      for (let y = t.core.y0; y < t.core.y1; y++) for (let x = t.core.x0; x < t.core.x1; x++) owners[y * 600 + x]++;
      expect(t.valid.x1 - t.valid.x0).toBe(256);
      expect(t.valid.y1 - t.valid.y0).toBe(256);
    }
    expect(owners.every((v) => v === 1)).toBe(true);
    for (const [x, y] of [
      [0, 0],
      [213.9, 214],
      [214, 213],
      [599.5, 499.5],
      [386, 100],
    ]) {
      const t = ownerTile(layout, x, y);
      expect(rectContains(t.core, x, y)).toBe(true);
      expect(rectContains(t.valid, x, y)).toBe(true);
    }
    // Points outside the image fall to the nearest edge tile.
    expect(ownerTile(layout, -5, 1000).index).toBe(6);
  });

  it('pads only the short side of a narrow, tall image', () => {
    const layout = planTiles(100, 600, 256, 64);
    expect([layout.cols, layout.rows]).toEqual([1, 3]);
    for (const t of layout.tiles) {
      expect([t.valid.x0, t.valid.x1, t.valid.y1 - t.valid.y0]).toEqual([0, 100, 256]);
      expect([t.core.x0, t.core.x1]).toEqual([0, 100]);
    }
  });

  it('sizes slide regions so that their reads are whole tile layouts', () => {
    const side = tileAlignedRegionSize(6, 256, 64, 32);
    expect(side).toBe(1144);
    // The read (side + 2 margins) and up to the 8 px of slack are 6 tiles; one pixel more is 7.
    for (const read of [side + 64, side + 64 + 8]) expect(planAxis(read, 256, 64).starts).toHaveLength(6);
    expect(planAxis(side + 64 + 9, 256, 64).starts).toHaveLength(7);
    // Four abutting regions cost what one image of their union does (24 tiles per axis).
    expect(planAxis(4 * side + 64, 256, 64).starts).toHaveLength(4 * 6);
    expect(() => tileAlignedRegionSize(1, 256, 64, 128)).toThrow(RangeError);
    expect(() => tileAlignedRegionSize(0, 256, 64, 32)).toThrow(RangeError);
  });

  it('extracts tile pixels and pads with white', () => {
    const img = { width: 20, height: 10, data: new Uint8Array(gradientRgb(20, 10)) };
    const layout = planTiles(20, 10, 16, 4);
    const t = layout.tiles[layout.tiles.length - 1];
    const rgb = extractTileRgb(img, t, 16);
    expect(rgb.length).toBe(16 * 16 * 3);
    // pixel (x=19, y=9) of the image sits at (19 - t.x, 9) in the tile
    const at = ((9 - t.y) * 16 + (19 - t.x)) * 3;
    expect([...rgb.subarray(at, at + 3)]).toEqual([19, 9, 28]);
    const pad = (15 * 16 + 0) * 3; // row 15 is below the image (height 10)
    expect([...rgb.subarray(pad, pad + 3)]).toEqual([...PAD_RGB]);
  });
});

describe('normalisation', () => {
  it('is planar (rgb - mean) / std and inverts', () => {
    const rgb = new Uint8Array(gradientRgb(4, 3));
    const norm = { mean: [123.675, 116.28, 103.53], std: [58.395, 57.12, 57.375] };
    const f = normalizeRgb(rgb, 4, 3, norm);
    expect(f.length).toBe(36);
    expect(f[5]).toBeCloseTo((rgb[15] - 123.675) / 58.395, 5);
    expect(f[12 + 5]).toBeCloseTo((rgb[16] - 116.28) / 57.12, 5);
    expect([...denormalizeToRgb(f, 4, 3, norm)]).toEqual([...rgb]);
  });
});

describe('glass', () => {
  const image = (w: number, h: number, rgb: (x: number, y: number) => [number, number, number]) => {
    const data = new Uint8Array(w * h * 3);
    for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) data.set(rgb(x, y), (y * w + x) * 3);
    return { width: w, height: h, data };
  };
  it('counts stained pixels as tissue, grey, white and near-black ones as glass', () => {
    const img = image(100, 100, (x) => (x < 25 ? [236, 190, 214] : x < 50 ? [128, 128, 128] : x < 75 ? [250, 250, 250] : [10, 0, 20]));
    expect(tissueFraction(img, { x0: 0, y0: 0, x1: 100, y1: 100 }, 1)).toBeCloseTo(0.25, 5);
    expect(tissueFraction(img, { x0: 50, y0: 0, x1: 100, y1: 100 }, 1)).toBe(0);
  });
  it('finds glass rects only in an image that has stained tissue', () => {
    const rects = [
      { x0: 0, y0: 0, x1: 50, y1: 100 },
      { x0: 50, y0: 0, x1: 100, y1: 100 },
    ];
    const half = image(100, 100, (x) => (x < 50 ? [236, 190, 214] : [245, 245, 245]));
    expect([...glassRects(half, rects, 0.001)]).toEqual([1]);
    const grey = image(100, 100, (x) => (x < 50 ? [60, 60, 60] : [245, 245, 245]));
    expect(glassRects(grey, rects, 0.001).size).toBe(0);
    expect(glassRects(half, rects, 0).size).toBe(0);
  });
});
