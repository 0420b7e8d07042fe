import sharp from 'sharp';
import { afterAll, describe, expect, it } from 'vitest';
import { BufferSource, detectTissue, openSlide, readRegionAtMpp, SlideError, tissueRegions, type Slide } from '../src/index.js';
import { lzwDecode, spliceJpeg } from '../src/codecs.js';
import { TiffReader } from '../src/tiff.js';
import { crop, downsample, meanAbsDiff, pattern, tempDir, writeDicomWsi, writeTiledTiff } from './helpers.js';

const tmp = tempDir();
afterAll(() => tmp.cleanup());

async function expectSlideError(p: Promise<unknown>, code: string, re?: RegExp): Promise<SlideError> {
  const err = await p.then(
    () => null,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(SlideError);
  expect((err as SlideError).code).toBe(code);
  if (re) expect((err as SlideError).message).toMatch(re);
  return err as SlideError;
}

describe('generic pyramidal TIFF written by libvips (sharp)', () => {
  const W = 301,
    H = 203;
  const px = pattern(W, H);
  let slide: Slide;
  let file: string;

  it('opens with levels, tile size and the resolution in px/cm', async () => {
    const buf = await sharp(px, { raw: { width: W, height: H, channels: 3 } })
      .tiff({
        compression: 'deflate',
        predictor: 'horizontal',
        tile: true,
        tileWidth: 64,
        tileHeight: 64,
        pyramid: true,
        xres: ((2000 / 1000) * 1000) / 0.5 / 1000,
        yres: 2,
        resolutionUnit: 'cm',
      })
      .toBuffer();
    file = tmp.file('pyr.tif', buf);
    slide = await openSlide(file);
    expect(slide.format).toBe('tiff');
    expect(slide.levels[0]).toMatchObject({ width: W, height: H, downsample: 1, tileWidth: 64, tileHeight: 64 });
    expect(slide.levels.length).toBeGreaterThanOrEqual(2);
    expect(slide.levels[1].width).toBe(Math.floor(W / 2));
    // 2 px/mm is 500 um/px: implausible for a slide -> but a real value below; here xres=2 px/mm
    expect(slide.mpp).toBeNull();
  });

  it('reads a region equal to the source pixels (lossless), at any offset across tiles', async () => {
    const r = await slide.readRegion({ x: 37, y: 50, width: 100, height: 90 });
    expect(r.width).toBe(100);
    expect(r.data.equals(crop(px, W, 37, 50, 100, 90))).toBe(true);
  });

  it('pads the part of a region outside the level with white and refuses regions fully outside', async () => {
    const r = await slide.readRegion({ x: W - 10, y: -5, width: 20, height: 10 });
    expect(r.data.subarray(0, 3 * 10).every((v) => v === 255)).toBe(true); // row -5: outside
    const row5 = r.data.subarray(5 * 20 * 3, 6 * 20 * 3);
    expect(row5.subarray(0, 30).equals(crop(px, W, W - 10, 0, 10, 1))).toBe(true);
    expect(row5.subarray(30).every((v) => v === 255)).toBe(true);
    await expectSlideError(slide.readRegion({ x: W, y: 0, width: 5, height: 5 }), 'REGION_OUTSIDE', /outside level 0.*pyr\.tif/);
    await expectSlideError(slide.readRegion({ level: 9, x: 0, y: 0, width: 5, height: 5 }), 'BAD_ARGUMENT', /level 9/);
    await expectSlideError(slide.readRegion({ x: 0, y: 0, width: 0, height: 5 }), 'BAD_ARGUMENT');
  });

  it("reads reduced levels in that level's own pixel grid", async () => {
    const L = slide.levels[1];
    const r = await slide.readRegion({ level: 1, x: 0, y: 0, width: L.width, height: L.height });
    const ref = downsample(px, W, H, 2);
    expect(meanAbsDiff(r.data, ref.data)).toBeLessThan(3);
  });

  it('reads a TIFF with resolution tags as mpp (cm and inch)', async () => {
    // 20000 px/cm = 0.5 um/px
    const buf = await sharp(px, { raw: { width: W, height: H, channels: 3 } })
      .tiff({ compression: 'lzw', tile: true, tileWidth: 32, tileHeight: 32, xres: 2000, yres: 2000, resolutionUnit: 'cm' })
      .toBuffer();
    const s = await openSlide(new BufferSource(buf, 'res.tif'));
    expect(s.mpp?.x).toBeCloseTo(0.5, 6);
    expect(s.mpp?.source).toMatch(/cm/);
    const r = await s.readRegion({ x: 0, y: 0, width: W, height: H });
    expect(r.data.equals(px)).toBe(true); // LZW decoded exactly
    const inch = await sharp(px, { raw: { width: W, height: H, channels: 3 } })
      .tiff({ compression: 'packbits', xres: 2000, yres: 2000, resolutionUnit: 'inch' })
      .toBuffer();
    const s2 = await openSlide(new BufferSource(inch, 'inch.tif'));
    expect(s2.mpp?.x).toBeCloseTo(0.5, 3);
    expect(s2.mpp?.source).toMatch(/inch/);
    expect(s2.levels).toHaveLength(1); // stripped single-page TIFF: one level
    expect((await s2.readRegion({ x: 5, y: 7, width: 50, height: 60 })).data.equals(crop(px, W, 5, 7, 50, 60))).toBe(true);
  });

  it('reads JPEG-compressed tiles with a YCbCr pipeline close to the source', async () => {
    const buf = await sharp(px, { raw: { width: W, height: H, channels: 3 } })
      .tiff({ compression: 'jpeg', quality: 95, tile: true, tileWidth: 64, tileHeight: 64 })
      .toBuffer();
    const s = await openSlide(new BufferSource(buf, 'jpeg.tif'));
    const r = await s.readRegion({ x: 10, y: 10, width: 200, height: 150 });
    expect(meanAbsDiff(r.data, crop(px, W, 10, 10, 200, 150))).toBeLessThan(6);
  });
});

describe('hand-written TIFF variants', () => {
  const W = 100,
    H = 70;
  const px = pattern(W, H, 9);
  const levels = [{ data: px, width: W, height: H }, downsample(px, W, H, 2), downsample(px, W, H, 4)];

  for (const [label, opts] of [
    ['BigTIFF, main-chain pyramid', { bigTiff: true }],
    ['classic TIFF, SubIFD pyramid', { subIfds: true }],
    ['BigTIFF, SubIFD pyramid', { bigTiff: true, subIfds: true }],
  ] as const) {
    it(`reads ${label}`, async () => {
      const buf = writeTiledTiff(levels, { ...opts, tile: 16, resolution: { value: 20000, unit: 3 } });
      const s = await openSlide(new BufferSource(buf, `${label}.tif`));
      expect(s.levels.map((l) => [l.width, l.height])).toEqual([
        [100, 70],
        [50, 35],
        [25, 17],
      ]);
      expect(s.mpp?.x).toBeCloseTo(0.5, 6);
      expect((await s.readRegion({ x: 13, y: 9, width: 60, height: 50 })).data.equals(crop(px, W, 13, 9, 60, 50))).toBe(true);
      const l2 = await s.readRegion({ level: 2, x: 0, y: 0, width: 25, height: 17 });
      expect(l2.data.equals(levels[2].data)).toBe(true);
    });
  }

  it('reads an OME-TIFF with PhysicalSizeX/Y in nm', async () => {
    const xml =
      '<?xml version="1.0"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" SizeX="100" SizeY="70" SizeC="3" SizeZ="1" SizeT="1" PhysicalSizeX="250" PhysicalSizeXUnit="nm" PhysicalSizeY="260" PhysicalSizeYUnit="nm"><Channel ID="Channel:0" SamplesPerPixel="3"/><TiffData IFD="0"/></Pixels></Image></OME>';
    const buf = writeTiledTiff(levels, { subIfds: true, description: xml, resolution: { value: 1, unit: 1 } });
    const s = await openSlide(new BufferSource(buf, 'x.ome.tif'));
    expect(s.format).toBe('ome-tiff');
    expect(s.levels).toHaveLength(3);
    expect(s.mpp).toMatchObject({ x: 0.25, y: 0.26, source: 'OME-XML PhysicalSizeX/Y' });
  });

  it('reports truncated and corrupt files with the file name', async () => {
    const buf = writeTiledTiff(levels, { tile: 16 });
    // cut the file: the directories at its end are gone
    const p = tmp.file('cut.tif', buf.subarray(0, buf.length - 40));
    const err = await expectSlideError(openSlide(p), 'TRUNCATED');
    expect(err.message).toContain('cut.tif');
    // directory offset points outside the file
    const bad = Buffer.from(buf);
    bad.writeUInt32LE(buf.length + 1000, 4);
    await expectSlideError(openSlide(new BufferSource(bad, 'bad.tif')), 'CORRUPT', /bad\.tif/);
    // a tile whose bytes are garbage for its compression
    const jpg = await sharp(px, { raw: { width: W, height: H, channels: 3 } })
      .tiff({ compression: 'jpeg', tile: true, tileWidth: 32, tileHeight: 32 })
      .toBuffer();
    const s = await openSlide(new BufferSource(jpg, 'j.tif'));
    const tr = await TiffReader.open(new BufferSource(jpg));
    const firstTileAt = (await (await tr.readIfd(tr.firstIfd)).numbers(324))![0];
    const broken = Buffer.from(jpg);
    broken.fill(0x13, firstTileAt + 2, firstTileAt + 60); // tables / frame header destroyed
    const s2 = await openSlide(new BufferSource(broken, 'broken.tif'));
    await expectSlideError(s2.readRegion({ x: 0, y: 0, width: 32, height: 32 }), 'CORRUPT', /tile 0,0.*broken\.tif/);
    await s.close();
  });
});

describe('errors naming the problem and the file', () => {
  it('unknown format, empty file, missing file, closed slide', async () => {
    await expectSlideError(
      openSlide(tmp.file('notes.txt', Buffer.from('hello world, not a slide'))),
      'UNKNOWN_FORMAT',
      /unknown slide format.*notes\.txt/,
    );
    await expectSlideError(openSlide(tmp.file('empty.svs', Buffer.alloc(0))), 'CORRUPT', /empty.*empty\.svs/);
    await expectSlideError(openSlide(tmp.dir + '/nope.svs'), 'NOT_FOUND', /nope\.svs/);
    const png = await sharp({ create: { width: 10, height: 10, channels: 3, background: '#f00' } })
      .png()
      .toBuffer();
    const s = await openSlide(tmp.file('a.png', png));
    await s.close();
    await expectSlideError(s.readRegion({ x: 0, y: 0, width: 1, height: 1 }), 'CLOSED');
  });

  it('OpenSlide-only formats: opened through libopenslide, or an error naming the format and what is missing', async () => {
    const p = tmp.file('fake.mrxs', Buffer.from('not really a mirax'));
    const err = await openSlide(p).then(
      () => null,
      (e: unknown) => e as SlideError,
    );
    expect(err).toBeInstanceOf(SlideError);
    expect(['OPENSLIDE_MISSING', 'UNKNOWN_FORMAT', 'CORRUPT']).toContain(err!.code);
    expect(err!.message).toMatch(/MIRAX/);
    if (err!.code === 'OPENSLIDE_MISSING') expect(err!.message).toMatch(/libopenslide|koffi/);
  });

  it('a TIFF flagged as JPEG 2000 (Aperio 33003) is refused naming JPEG 2000 or opened by OpenSlide', async () => {
    const buf = writeTiledTiff([{ data: pattern(32, 32), width: 32, height: 32 }], {
      tile: 16,
      description: 'Aperio Image Library v10.0.50\r\n32x32 -> 32x32 - |MPP = 0.25',
    });
    // patch Compression (tag 259, value 1) to 33003
    const i = buf.indexOf(Buffer.from([0x03, 0x01, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00]));
    buf.writeUInt16LE(33003, i + 8);
    const p = tmp.file('j2k.svs', buf);
    const res = await openSlide(p).then(
      (s) => s,
      (e: unknown) => e as SlideError,
    );
    if (res instanceof SlideError) expect(res.message).toMatch(/JPEG 2000.*j2k\.svs/);
    else {
      expect(res.format).toBe('openslide');
      await res.close();
    }
  });
});

describe('plain images as single-level slides', () => {
  it('PNG, JPEG and WebP', async () => {
    const px = pattern(64, 48);
    for (const fmt of ['png', 'jpeg', 'webp'] as const) {
      const img = sharp(px, { raw: { width: 64, height: 48, channels: 3 } });
      const buf = await (fmt === 'png' ? img.png() : fmt === 'jpeg' ? img.jpeg({ quality: 95 }) : img.webp({ quality: 95 })).toBuffer();
      const s = await openSlide(tmp.file(`img.${fmt}`, buf));
      expect(s.format).toBe('image');
      expect(s.levels).toEqual([expect.objectContaining({ width: 64, height: 48, downsample: 1 })]);
      const r = await s.readRegion({ x: 8, y: 4, width: 40, height: 30 });
      expect(meanAbsDiff(r.data, crop(px, 64, 8, 4, 40, 30))).toBeLessThan(fmt === 'png' ? 0.001 : 15);
      await s.close();
    }
  });
});

describe('DICOM VL whole-slide series', () => {
  const W = 90,
    H = 70;
  const px = pattern(W, H, 4);
  it('groups a multi-file series into one slide (levels by TotalPixelMatrixColumns), mpp from PixelSpacing', async () => {
    const d = tempDir();
    try {
      const series = '1.2.3.4.5';
      const half = downsample(px, W, H, 2);
      // sharp is async; encode synchronously beforehand
      const encoded: Buffer[] = [];
      const T = 32;
      for (let r = 0; r < Math.ceil(half.height / T); r++)
        for (let c = 0; c < Math.ceil(half.width / T); c++) {
          const t = Buffer.alloc(T * T * 3, 255);
          for (let y = 0; y < T && r * T + y < half.height; y++) {
            const w = Math.min(T, half.width - c * T);
            half.data.copy(t, y * T * 3, ((r * T + y) * half.width + c * T) * 3, ((r * T + y) * half.width + c * T + w) * 3);
          }
          encoded.push(
            await sharp(t, { raw: { width: T, height: T, channels: 3 } })
              .jpeg({ quality: 95, chromaSubsampling: '4:4:4' })
              .toBuffer(),
          );
        }
      let k = 0;
      const l0 = d.file('a_level0.dcm', writeDicomWsi({ data: px, width: W, height: H, tile: 32 }, series, '1.2.3.4.5.1', 0.0005));
      d.file(
        'b_level1.dcm',
        writeDicomWsi({ data: half.data, width: half.width, height: half.height, tile: 32, jpeg: () => encoded[k++] }, series, '1.2.3.4.5.2', 0.001),
      );
      d.file(
        'c_thumb.dcm',
        writeDicomWsi({ data: half.data, width: half.width, height: half.height, tile: 64, kind: 'THUMBNAIL' }, series, '1.2.3.4.5.3', 0.001),
      );
      d.file('d_other.dcm', writeDicomWsi({ data: px, width: W, height: H, tile: 32 }, '9.9.9', '9.9.9.1', 0.0005));
      d.file('readme.txt', Buffer.from('not dicom'));
      for (const s of [await openSlide(l0), await openSlide(d.dir)]) {
        expect(s.format).toBe('dicom');
        expect(s.levels.map((l) => [l.width, l.height])).toEqual([
          [90, 70],
          [45, 35],
        ]);
        expect(s.levels[0]).toMatchObject({ tileWidth: 32, tileHeight: 32 });
        expect(s.mpp).toMatchObject({ x: 0.5, y: 0.5 });
        expect(s.associatedImages).toEqual(['thumbnail']);
        expect((await s.readRegion({ x: 20, y: 10, width: 50, height: 45 })).data.equals(crop(px, W, 20, 10, 50, 45))).toBe(true);
        const r1 = await s.readRegion({ level: 1, x: 0, y: 0, width: 45, height: 35 });
        expect(meanAbsDiff(r1.data, half.data)).toBeLessThan(6);
        const th = await s.readAssociated('thumbnail');
        expect(th.data.equals(half.data)).toBe(true);
        await s.close();
      }
      // an explicit file list, without scanning the directory
      const s3 = await openSlide([l0]);
      expect(s3.levels).toHaveLength(1);
      await s3.close();
      // truncated DICOM: the header opens, the frame read fails naming the file
      const full = writeDicomWsi({ data: px, width: W, height: H, tile: 32 }, series, '1.2.3.4.5.9', 0.0005);
      const cut = d.file('cut.dcm', full.subarray(0, full.length - 500));
      await expectSlideError(openSlide(cut, { dicomScanDirectory: false }), 'TRUNCATED', /Pixel Data.*cut\.dcm/);
      const cutHeader = d.file('cut2.dcm', full.subarray(0, 300));
      await expectSlideError(openSlide(cutHeader, { dicomScanDirectory: false }), 'TRUNCATED', /cut2\.dcm/);
    } finally {
      d.cleanup();
    }
  });
});

describe('readRegionAtMpp', () => {
  const W = 400,
    H = 300;
  const px = pattern(W, H, 2);
  const levels = [{ data: px, width: W, height: H }, downsample(px, W, H, 2), downsample(px, W, H, 4)];
  const buf = writeTiledTiff(levels, { tile: 32, resolution: { value: 40000, unit: 3 } }); // 0.25 um/px

  it('picks the nearest finer level and maps back to level 0 exactly', async () => {
    const s = await openSlide(new BufferSource(buf, 'mpp.tif'));
    expect(s.mpp?.x).toBeCloseTo(0.25, 9);
    // 0.5 um/px: level 1 exactly, no resize
    const a = await readRegionAtMpp(s, { x: 40, y: 60, width: 200, height: 100 }, 0.5);
    expect(a.level).toBe(1);
    expect([a.width, a.height]).toEqual([100, 50]);
    expect(a.origin).toEqual({ x: 40, y: 60 });
    expect(a.scale).toEqual({ x: 2, y: 2 });
    expect(a.data.equals(crop(levels[1].data, levels[1].width, 20, 30, 100, 50))).toBe(true);
    // 0.7 um/px: level 1 (0.5, finer) resized by 0.5/0.7
    const b = await readRegionAtMpp(s, { x: 41, y: 61, width: 200, height: 100 }, 0.7);
    expect(b.level).toBe(1);
    expect(b.origin).toEqual({ x: 40, y: 60 }); // snapped outwards to level 1's grid
    expect(b.mpp.x).toBeCloseTo(0.7, 1);
    expect(b.origin.x + b.width * b.scale.x).toBeGreaterThanOrEqual(41 + 200);
    expect(b.width * b.scale.x * 0.25).toBeCloseTo(b.width * b.mpp.x, 9);
    // 0.125 um/px: finer than level 0 -> level 0 upsampled 2x
    const c = await readRegionAtMpp(s, { x: 10, y: 10, width: 50, height: 40 }, 0.125);
    expect(c.level).toBe(0);
    expect([c.width, c.height, c.scale.x]).toEqual([100, 80, 0.5]);
    // the resampling property: a feature keeps its level-0 position through the mapping
    const d = await readRegionAtMpp(s, { x: 0, y: 0, width: 400, height: 300 }, 1.0);
    expect(d.level).toBe(2);
    expect(d.scale.x * d.width).toBeCloseTo(400, 6);
  });

  it('requires a resolution: from the file or given', async () => {
    const nores = writeTiledTiff(levels, { tile: 32 });
    const s = await openSlide(new BufferSource(nores, 'nores.tif'));
    expect(s.mpp).toBeNull();
    await expectSlideError(readRegionAtMpp(s, { x: 0, y: 0, width: 10, height: 10 }, 0.5), 'NO_RESOLUTION', /no resolution.*nores\.tif/);
    const r = await readRegionAtMpp(s, { x: 0, y: 0, width: 100, height: 100 }, 0.5, { slideMpp: 0.25 });
    expect(r.mppSource).toBe('option');
    expect(r.width).toBe(50);
  });
});

describe('tissue detection', () => {
  // white glass with a pink "tissue" blob, a few dust specks and a grey smudge
  const W = 800,
    H = 600;
  const img = Buffer.alloc(W * H * 3, 245);
  const inBlob = (x: number, y: number) => ((x - 300) / 200) ** 2 + ((y - 300) / 150) ** 2 < 1;
  for (let y = 0; y < H; y++)
    for (let x = 0; x < W; x++) {
      const p = (y * W + x) * 3;
      if (inBlob(x, y)) {
        img[p] = 200 + ((x * y) % 30);
        img[p + 1] = 120;
        img[p + 2] = 170;
      }
    }
  for (const [sx, sy] of [
    [700, 100],
    [650, 500],
    [100, 550],
  ]) {
    for (let y = sy; y < sy + 3; y++)
      for (let x = sx; x < sx + 3; x++) {
        const p = (y * W + x) * 3;
        img[p] = 150;
        img[p + 1] = 60;
        img[p + 2] = 120;
      }
  }
  for (let y = 50; y < 120; y++)
    for (let x = 600; x < 700; x++) {
      const p = (y * W + x) * 3;
      img.fill(200, p, p + 3);
    } // grey: not tissue

  it('finds the blob, ignores glass, grey and specks; tissueRegions with ROIs', async () => {
    const buf = await sharp(img, { raw: { width: W, height: H, channels: 3 } })
      .tiff({ compression: 'deflate', tile: true, tileWidth: 128, tileHeight: 128, pyramid: true })
      .toBuffer();
    const s = await openSlide(new BufferSource(buf, 'tissue.tif'));
    const t = await detectTissue(s, { maxSide: 200 });
    expect(Math.max(t.width, t.height)).toBeLessThanOrEqual(200);
    const blobFraction = (Math.PI * 200 * 150) / (W * H);
    expect(t.fraction).toBeGreaterThan(blobFraction * 0.9);
    expect(t.fraction).toBeLessThan(blobFraction * 1.1);
    const at = (x: number, y: number) => t.mask[Math.floor(y / t.downsample.y) * t.width + Math.floor(x / t.downsample.x)];
    expect(at(300, 300)).toBe(1);
    expect(at(701, 101)).toBe(0); // speck removed
    expect(at(650, 80)).toBe(0); // grey smudge
    expect(at(750, 300)).toBe(0); // glass

    const regions = tissueRegions(t, 100);
    expect(regions.length).toBeGreaterThan(0);
    for (const r of regions) {
      // every region touches the blob (allowing the mask's coarse pixels)
      const cx = Math.min(Math.max(300, r.x), r.x + r.width),
        cy = Math.min(Math.max(300, r.y), r.y + r.height);
      expect(((cx - 300) / 210) ** 2 + ((cy - 300) / 160) ** 2).toBeLessThan(1.05);
    }
    expect(regions.some((r) => r.x === 0 && r.y === 0)).toBe(false); // glass corner
    const all = tissueRegions(t, 100, { minTissueFraction: 0 });
    expect(all.length).toBe(regions.length);

    // rectangle ROI: clipped grid starting at the ROI
    const inRect = tissueRegions(t, 64, { roi: { x: 250, y: 250, width: 100, height: 100 } });
    expect(inRect.map((r) => [r.x, r.y, r.width, r.height])).toEqual([
      [250, 250, 64, 64],
      [314, 250, 36, 64],
      [250, 314, 64, 36],
      [314, 314, 36, 36],
    ]);
    // polygon ROI on glass only: nothing to do
    expect(
      tissueRegions(t, 64, {
        roi: {
          polygon: [
            [700, 400],
            [780, 400],
            [780, 580],
          ],
        },
      }),
    ).toEqual([]);
    // polygon over the blob
    expect(
      tissueRegions(t, 64, {
        roi: {
          polygon: [
            [200, 200],
            [400, 200],
            [300, 400],
          ],
        },
      }).length,
    ).toBeGreaterThan(0);
    // ROI outside the slide
    expect(() => tissueRegions(t, 64, { roi: { x: 5000, y: 0, width: 10, height: 10 } })).toThrow(/outside the slide/);
    try {
      tissueRegions(t, 64, {
        roi: {
          polygon: [
            [-50, -50],
            [-10, -50],
            [-10, -10],
          ],
        },
      });
    } catch (e) {
      expect((e as SlideError).code).toBe('ROI_OUTSIDE');
    }
    await s.close();
  });

  it('an all-glass slide has no tissue', async () => {
    const glass = await sharp({ create: { width: 300, height: 200, channels: 3, background: { r: 242, g: 240, b: 241 } } })
      .png()
      .toBuffer();
    const s = await openSlide(new BufferSource(glass, 'glass.png'));
    const t = await detectTissue(s);
    expect(t.fraction).toBe(0);
    expect(tissueRegions(t, 50)).toEqual([]);
  });
});

describe('codecs', () => {
  it('splices JPEG tables and marks RGB components with an Adobe APP14 segment', () => {
    const tables = Buffer.from([0xff, 0xd8, 0xff, 0xdb, 0x00, 0x03, 0x01, 0xff, 0xd9]);
    const tile = Buffer.from([0xff, 0xd8, 0xff, 0xe0, 0x00, 0x04, 0x4a, 0x46, 0xff, 0xda, 0x00, 0x02, 0x11, 0xff, 0xd9]);
    const rgb = spliceJpeg(tile, tables, true);
    expect([...rgb.subarray(0, 4)]).toEqual([0xff, 0xd8, 0xff, 0xee]);
    expect(rgb.includes(Buffer.from('Adobe'))).toBe(true);
    expect(rgb.includes(Buffer.from([0xff, 0xe0]))).toBe(false); // JFIF dropped
    expect(rgb.includes(Buffer.from([0xff, 0xdb, 0x00, 0x03, 0x01]))).toBe(true);
    const ycc = spliceJpeg(tile, tables, false);
    expect(ycc.includes(Buffer.from('Adobe'))).toBe(false);
    expect([...ycc.subarray(-2)]).toEqual([0xff, 0xd9]);
  });

  it('LZW decodes a libtiff stream', async () => {
    const px = pattern(50, 40, 7);
    const buf = await sharp(px, { raw: { width: 50, height: 40, channels: 3 } })
      .tiff({ compression: 'lzw', predictor: 'none' })
      .toBuffer();
    const s = await openSlide(new BufferSource(buf, 'l.tif'));
    expect((await s.readRegion({ x: 0, y: 0, width: 50, height: 40 })).data.equals(px)).toBe(true);
    expect(() => lzwDecode(Buffer.from([0xff, 0xff, 0xff]), 10)).toThrow();
  });
});
