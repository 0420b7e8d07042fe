import { existsSync } from 'node:fs';
import { join } from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { detectTissue, openSlide, openslideUnavailableReason, readRegionAtMpp, SlideError, tissueRegions, type Slide } from '../src/index.js';
import { crop, meanAbsDiff, SAMPLES, tempDir } from './helpers.js';

const have = existsSync(join(SAMPLES, 'CMU-1-Small-Region.svs'));
if (!have) console.warn(`slides samples not found in ${SAMPLES}: skipping the real-file tests (set CFRSAM_SLIDES_DIR)`);
const f = (name: string) => join(SAMPLES, name);

/** Where the derived 1024x1024 crops sit in the SVS (found by exhaustive comparison, exact match). */
const CROP = { x: 500, y: 900 };

describe.skipIf(!have)('real sample slides (../shared/slides)', () => {
  let svs: Slide;
  beforeAll(async () => {
    svs = await openSlide(f('CMU-1-Small-Region.svs'));
  });
  afterAll(async () => {
    await svs?.close();
  });

  it('levels, sizes and mpp of every sample', async () => {
    expect(svs.format).toBe('aperio-svs');
    expect(svs.levels.map((l) => [l.width, l.height])).toEqual([[2220, 2967]]);
    expect(svs.levels[0]).toMatchObject({ tileWidth: 240, tileHeight: 240 });
    expect(svs.mpp).toMatchObject({ x: 0.499, y: 0.499, source: 'aperio ImageDescription MPP' });
    expect(svs.associatedImages).toEqual(['thumbnail', 'label', 'macro']);
    expect(svs.properties['aperio.AppMag']).toBe('20');

    const expectations: [string, string, number[][], number | null][] = [
      ['openslide-python_small.svs', 'aperio-svs', [[16, 16]], 0.499],
      [
        'openslide-python_boxes.tiff',
        'tiff',
        [
          [300, 250],
          [150, 125],
          [75, 62],
          [37, 31],
        ],
        null,
      ],
      ['openslide-python_boxes_0.dcm', 'dicom', [[16, 16]], 0.499],
      [
        'derived/CMU-1-Small-Region.crop.ome.tif',
        'ome-tiff',
        [
          [1024, 1024],
          [512, 512],
          [256, 256],
          [128, 128],
        ],
        0.499,
      ],
      [
        'derived/CMU-1-Small-Region.crop.tif',
        'tiff',
        [
          [1024, 1024],
          [512, 512],
          [256, 256],
          [128, 128],
        ],
        0.499,
      ],
    ];
    for (const [name, format, sizes, mpp] of expectations) {
      const s = await openSlide(f(name));
      expect(s.format, name).toBe(format);
      expect(
        s.levels.map((l) => [l.width, l.height]),
        name,
      ).toEqual(sizes);
      if (mpp === null) expect(s.mpp, name).toBeNull();
      else {
        expect(s.mpp!.x, name).toBeCloseTo(mpp, 5);
        expect(s.mpp!.y, name).toBeCloseTo(mpp, 5);
      }
      await s.close();
    }
  });

  it('the DICOM pair is one series: level + thumbnail, same pixels as the 16x16 SVS', async () => {
    const d = await openSlide(f('openslide-python_boxes_0.dcm'));
    expect(d.associatedImages).toEqual(['thumbnail']);
    expect(d.mpp?.source).toMatch(/PixelSpacing/);
    const small = await openSlide(f('openslide-python_small.svs'));
    const a = await d.readRegion({ x: 0, y: 0, width: 16, height: 16 });
    const b = await small.readRegion({ x: 0, y: 0, width: 16, height: 16 });
    expect(meanAbsDiff(a.data, b.data)).toBeLessThan(4);
    const th = await d.readAssociated('thumbnail');
    expect([th.width, th.height]).toEqual([16, 16]);
    expect(meanAbsDiff(th.data, a.data)).toBeLessThan(10);
    // opened from the thumbnail file, the series is the same slide
    const d1 = await openSlide(f('openslide-python_boxes_1.dcm'));
    expect(d1.levels.map((l) => [l.width, l.height])).toEqual([[16, 16]]);
    await Promise.all([d.close(), small.close(), d1.close()]);
  });

  it('the derived OME-TIFF and TIFF pyramids hold the SVS crop at (500, 900)', async () => {
    const ref = await svs.readRegion({ x: CROP.x, y: CROP.y, width: 1024, height: 1024 });
    for (const name of ['derived/CMU-1-Small-Region.crop.ome.tif', 'derived/CMU-1-Small-Region.crop.tif']) {
      const s = await openSlide(f(name));
      const r = await s.readRegion({ x: 0, y: 0, width: 1024, height: 1024 });
      expect(meanAbsDiff(r.data, ref.data), name).toBeLessThan(1);
      // a region across tile seams at an odd offset
      const part = await s.readRegion({ x: 250, y: 130, width: 300, height: 260 });
      expect(meanAbsDiff(part.data, crop(ref.data, 1024, 250, 130, 300, 260)), name).toBeLessThan(1);
      // reduced level vs the SVS region downsampled
      const l2 = await s.readRegion({ level: 2, x: 0, y: 0, width: 256, height: 256 });
      const down = await sharp(ref.data, { raw: { width: 1024, height: 1024, channels: 3 } })
        .resize(256, 256, { kernel: 'linear' })
        .raw()
        .toBuffer();
      expect(meanAbsDiff(l2.data, down), name).toBeLessThan(6);
      await s.close();
    }
  });

  it("SVS colour: level 0 downsampled matches the file's own thumbnail page", async () => {
    const th = await svs.readAssociated('thumbnail');
    expect([th.width, th.height]).toEqual([574, 768]);
    const L = svs.levels[0];
    const full = await svs.readRegion({ x: 0, y: 0, width: L.width, height: L.height });
    const small = await sharp(full.data, { raw: { width: L.width, height: L.height, channels: 3 } })
      .resize(th.width, th.height, { fit: 'fill' })
      .raw()
      .toBuffer();
    expect(meanAbsDiff(small, th.data)).toBeLessThan(8);
    // per-channel means agree closely (a YCbCr/RGB mix-up shifts them by tens)
    const means = (b: Buffer) =>
      [0, 1, 2].map((c) => {
        let s = 0;
        for (let i = c; i < b.length; i += 3) s += b[i];
        return s / (b.length / 3);
      });
    const [m1, m2] = [means(small), means(th.data)];
    for (let c = 0; c < 3; c++) expect(Math.abs(m1[c] - m2[c])).toBeLessThan(2);
    // H&E: stained tissue is pink/purple, red > green
    expect(m1[0]).toBeGreaterThan(m1[1] + 8);
    const label = await svs.readAssociated('label');
    const macro = await svs.readAssociated('macro');
    expect([label.width, label.height, macro.width, macro.height]).toEqual([387, 463, 1280, 431]);
  });

  it.skipIf(!!openslideUnavailableReason())('matches OpenSlide pixel for pixel where libopenslide is installed', async () => {
    const os = await openSlide(f('CMU-1-Small-Region.svs'), { backend: 'openslide' });
    expect(os.format).toBe('openslide');
    expect(os.mpp?.x).toBeCloseTo(0.499, 6);
    const a = await svs.readRegion({ x: 1000, y: 1500, width: 500, height: 400 });
    const b = await os.readRegion({ x: 1000, y: 1500, width: 500, height: 400 });
    expect(meanAbsDiff(a.data, b.data)).toBeLessThan(0.5);
    await os.close();
    // the generic TIFF pyramid, every level, with white padding past the edge
    const mine = await openSlide(f('openslide-python_boxes.tiff'));
    const theirs = await openSlide(f('openslide-python_boxes.tiff'), { backend: 'openslide' });
    expect(theirs.levels.map((l) => [l.width, l.height])).toEqual(mine.levels.map((l) => [l.width, l.height]));
    for (let level = 0; level < mine.levels.length; level++) {
      const L = mine.levels[level];
      const req = { level, x: 0, y: 0, width: L.width + 5, height: L.height };
      expect(meanAbsDiff((await mine.readRegion(req)).data, (await theirs.readRegion(req)).data), `level ${level}`).toBeLessThan(0.5);
    }
    await Promise.all([mine.close(), theirs.close()]);
  });

  it('reads only the tiles a region needs (bounded memory)', async () => {
    const s = await openSlide(f('CMU-1-Small-Region.svs'), { tileCacheBytes: 0 });
    const before = s.stats();
    // 200x200 inside one 240x240 tile... and one straddling 4 tiles
    await s.readRegion({ x: 250, y: 250, width: 200, height: 200 });
    const one = s.stats();
    expect(one.tilesDecoded - before.tilesDecoded).toBe(1);
    await s.readRegion({ x: 400, y: 400, width: 200, height: 200 });
    const four = s.stats();
    expect(four.tilesDecoded - one.tilesDecoded).toBe(4);
    const size = (await import('node:fs')).statSync(f('CMU-1-Small-Region.svs')).size;
    expect(four.bytesRead).toBeLessThan(size / 20);
    // external memory while reading small regions stays far below the decoded level (2220x2967x3 = 19.8 MB)
    const level = 2220 * 2967 * 3;
    global.gc?.();
    const m0 = process.memoryUsage().arrayBuffers;
    let peak = 0;
    for (let i = 0; i < 20; i++) {
      await s.readRegion({ x: 100 + i * 90, y: 100 + i * 130, width: 256, height: 256 });
      peak = Math.max(peak, process.memoryUsage().arrayBuffers - m0);
    }
    expect(peak).toBeLessThan(level / 2);
    expect(s.stats().tilesDecoded - four.tilesDecoded).toBeLessThanOrEqual(20 * 9);
    await s.close();
  });

  it("readRegionAtMpp: 20x SVS to the model's 0.25 um/px, and back to level 0", async () => {
    const r = await readRegionAtMpp(svs, { x: 1000, y: 1000, width: 256, height: 256 }, 0.25);
    expect(r.level).toBe(0);
    expect([r.width, r.height]).toEqual([511, 511]);
    expect(r.origin).toEqual({ x: 1000, y: 1000 });
    expect(r.scale.x * r.width).toBeCloseTo(256, 9);
    expect(r.mpp.x).toBeCloseTo(0.25, 2);
    // downsampling it back gives the original region
    const back = await sharp(r.data, { raw: { width: r.width, height: r.height, channels: 3 } })
      .resize(256, 256, { fit: 'fill' })
      .raw()
      .toBuffer();
    const orig = await svs.readRegion({ x: 1000, y: 1000, width: 256, height: 256 });
    expect(meanAbsDiff(back, orig.data)).toBeLessThan(10);
    // the derived pyramid: 2 um/px comes from level 2 (0.998) resized
    const tif = await openSlide(f('derived/CMU-1-Small-Region.crop.tif'));
    const c = await readRegionAtMpp(tif, { x: 0, y: 0, width: 1024, height: 1024 }, 2.0);
    expect(c.level).toBe(2);
    expect(c.width).toBe(Math.round((1024 * tif.mpp!.x) / 2));
    await tif.close();
    // no resolution in boxes.tiff
    const boxes = await openSlide(f('openslide-python_boxes.tiff'));
    await expect(readRegionAtMpp(boxes, { x: 0, y: 0, width: 10, height: 10 }, 0.5)).rejects.toThrow(/no resolution.*boxes\.tiff/);
    await boxes.close();
  });

  it('tissue mask on the SVS: plausible fraction, glass excluded', async () => {
    const t = await detectTissue(svs, { maxSide: 512 });
    expect(t.level).toBe(0);
    expect(Math.max(t.width, t.height)).toBeLessThanOrEqual(512);
    expect(t.fraction).toBeGreaterThan(0.2);
    expect(t.fraction).toBeLessThan(0.9);
    // glass, from the image itself: mask pixels whose level-0 block is bright and grey are background
    const L = svs.levels[0];
    const full = await svs.readRegion({ x: 0, y: 0, width: L.width, height: L.height });
    let glass = 0,
      glassInMask = 0,
      dark = 0,
      darkInMask = 0;
    for (let my = 0; my < t.height; my++)
      for (let mx = 0; mx < t.width; mx++) {
        const x = Math.min(L.width - 1, Math.floor((mx + 0.5) * t.downsample.x)),
          y = Math.min(L.height - 1, Math.floor((my + 0.5) * t.downsample.y));
        const p = (y * L.width + x) * 3;
        const [r, g, b] = [full.data[p], full.data[p + 1], full.data[p + 2]];
        const m = t.mask[my * t.width + mx];
        if (Math.min(r, g, b) > 225 && Math.max(r, g, b) - Math.min(r, g, b) < 8) {
          glass++;
          glassInMask += m;
        }
        if (r < 190 && g < 160 && r - g > 30) {
          dark++;
          darkInMask += m;
        } // clearly stained
      }
    expect(glass).toBeGreaterThan(100);
    expect(glassInMask / glass).toBeLessThan(0.1);
    expect(darkInMask / dark).toBeGreaterThan(0.95);
    const regions = tissueRegions(t, 512);
    const allCells = Math.ceil(L.width / 512) * Math.ceil(L.height / 512);
    expect(regions.length).toBeGreaterThan(0);
    expect(regions.length).toBeLessThan(allCells);
    for (const r of regions) {
      expect(r.x + r.width).toBeLessThanOrEqual(L.width);
      expect(r.y + r.height).toBeLessThanOrEqual(L.height);
    }
    expect(() => tissueRegions(t, 512, { roi: { x: 3000, y: 0, width: 100, height: 100 } })).toThrow(SlideError);
  });

  it('bad input: truncated and corrupt copies of the SVS', async () => {
    const d = tempDir();
    try {
      const { readFileSync } = await import('node:fs');
      const bytes = readFileSync(f('CMU-1-Small-Region.svs'));
      const cut = d.file('cut.svs', bytes.subarray(0, Math.floor(bytes.length / 2)));
      const err = await (async () => {
        const s = await openSlide(cut);
        try {
          const L = s.levels[0];
          await s.readRegion({ x: 0, y: 0, width: L.width, height: L.height });
        } finally {
          await s.close();
        }
      })().then(
        () => null,
        (e: unknown) => e as SlideError,
      );
      expect(err).toBeInstanceOf(SlideError);
      expect(['TRUNCATED', 'CORRUPT']).toContain(err!.code);
      expect(err!.message).toMatch(/truncated|corrupt/);
      expect(err!.message).toContain('cut.svs');
      const junk = Buffer.from(bytes.subarray(0, 4096));
      junk.fill(0xab, 8);
      const e2 = await openSlide(d.file('junk.svs', junk)).then(
        () => null,
        (e: unknown) => e as SlideError,
      );
      expect(e2).toBeInstanceOf(SlideError);
      expect(e2!.message).toContain('junk.svs');
    } finally {
      d.cleanup();
    }
  });
});
