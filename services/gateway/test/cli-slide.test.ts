// The pure parts of `cfrsam slide run`: ROI parsing, output names, the mapping of a region's nuclei to
// level 0, and the seam ledger that writes each nucleus once across region seams. The end-to-end
// run on the real SVS is in test/slide-run.test.ts.
import { PassThrough } from 'node:stream';
import { segmentationProto } from '@cfrsam/rpc';
import { describe, expect, it } from 'vitest';
import { nucleusToLevel0, parseRoiGeoJson, parseRoiRect, runSlide, SeamLedger, slideName } from '../src/cli/slide';
import { InOrderWriter } from '../src/slideRegions';

type Nucleus = segmentationProto.Nucleus;

/** A square nucleus of side 2r centred at (x, y), level-0 coordinates. */
function square(x: number, y: number, r = 4, id = 0): Nucleus {
  return segmentationProto.Nucleus.fromPartial({
    id,
    centroid: { x, y },
    polygon: [
      { x: x - r, y: y - r },
      { x: x + r, y: y - r },
      { x: x + r, y: y + r },
      { x: x - r, y: y + r },
    ],
  });
}

describe('cfrsam slide run: arguments', () => {
  it('parses --roi x,y,w,h and refuses anything else', () => {
    expect(parseRoiRect('10,20,300,400')).toEqual({ x: 10, y: 20, width: 300, height: 400 });
    expect(() => parseRoiRect('10,20,300')).toThrow(/x,y,w,h/);
    expect(() => parseRoiRect('10,20,0,5')).toThrow(/positive/);
    expect(() => parseRoiRect('a,b,c,d')).toThrow(/x,y,w,h/);
  });

  it('parses a GeoJSON ROI: one Polygon from a geometry, Feature or FeatureCollection', () => {
    const ring = [
      [0, 0],
      [100, 0],
      [100, 50],
      [0, 0],
    ];
    const poly = { type: 'Polygon', coordinates: [ring] };
    const expected = {
      polygon: [
        [0, 0],
        [100, 0],
        [100, 50],
      ],
    };
    expect(parseRoiGeoJson(JSON.stringify(poly), 'a.geojson')).toEqual(expected);
    expect(parseRoiGeoJson(JSON.stringify({ type: 'Feature', geometry: poly, properties: {} }), 'a')).toEqual(expected);
    expect(parseRoiGeoJson(JSON.stringify({ type: 'FeatureCollection', features: [{ type: 'Feature', geometry: poly }] }), 'a')).toEqual(expected);
    expect(() => parseRoiGeoJson('{', 'bad.geojson')).toThrow(/bad.geojson: not JSON/);
    expect(() => parseRoiGeoJson(JSON.stringify({ type: 'FeatureCollection', features: [] }), 'e.geojson')).toThrow(/exactly one Polygon, found 0/);
  });

  it('names outputs after the file without its extension', () => {
    expect(slideName('/x/CMU-1-Small-Region.svs')).toBe('CMU-1-Small-Region');
    expect(slideName('a/b/crop.ome.tif')).toBe('crop');
    expect(slideName('derived/CMU-1-Small-Region.crop.ome.tif')).toBe('CMU-1-Small-Region.crop');
    expect(slideName('derived/CMU-1-Small-Region.crop.tif')).toBe('CMU-1-Small-Region.crop');
    expect(slideName('a/b/slide.ome.tiff')).toBe('slide');
    expect(slideName('dicom-dir/')).toBe('dicom-dir');
  });

  it('usage errors exit with code 2', async () => {
    const err: string[] = [];
    const stderr = new PassThrough();
    stderr.on('data', (c) => err.push(String(c)));
    const io = { stdout: new PassThrough(), stderr };
    expect(await runSlide([], io)).toBe(2);
    expect(await runSlide(['frobnicate'], io)).toBe(2);
    expect(await runSlide(['run', 'x.svs'], io)).toBe(2);
    expect(await runSlide(['run', 'x.svs', '--out', '/tmp/x', '--roi', '1,2,3'], io)).toBe(2);
    expect(await runSlide(['run', 'x.svs', '--out', '/tmp/x', '--overlap', '2000'], io)).toBe(2);
    expect(err.join('')).toMatch(/--out DIR is required/);
    expect(err.join('')).toMatch(/--roi wants x,y,w,h/);
  });
});

describe('cfrsam slide run: level 0', () => {
  it('maps outline, centroid, bbox and px measurements with level0 = origin + p * scale', () => {
    const n = segmentationProto.Nucleus.fromPartial({
      id: 7,
      centroid: { x: 10.5, y: 20.5 },
      bbox: { x0: 8, y0: 18, x1: 13, y1: 23 },
      polygon: [
        { x: 8, y: 18 },
        { x: 13, y: 18 },
        { x: 13, y: 23 },
        { x: 8, y: 23 },
      ],
      measurements: { areaPx: 25, areaUm2: 25 * 0.0625, perimeterPx: 20, majorAxisPx: 5, minorAxisPx: 5 },
    });
    const m = nucleusToLevel0(n, { x: 100, y: 200 }, { x: 0.5, y: 0.5 }, { width: 1000, height: 1000 }, 3);
    expect(m.id).toBe(3);
    expect(m.centroid).toEqual({ x: 105.25, y: 210.25 });
    expect(m.bbox).toEqual({ x0: 104, y0: 209, x1: 107, y1: 212 });
    expect(m.polygon[0]).toEqual({ x: 104, y: 209 });
    expect(m.polygon[2]).toEqual({ x: 106.5, y: 211.5 });
    expect(m.measurements!.areaPx).toBeCloseTo(6.25);
    expect(m.measurements!.areaUm2).toBeCloseTo(25 * 0.0625); // already in um^2: unchanged
    expect(m.measurements!.perimeterPx).toBeCloseTo(10);
    // clamped to level 0
    const edge = nucleusToLevel0(n, { x: -10, y: -20 }, { x: 1, y: 1 }, { width: 1000, height: 1000 }, 1);
    expect(Math.min(...edge.polygon.map((p) => p.x))).toBe(0);
    expect(Math.min(...edge.polygon.map((p) => p.y))).toBe(0);
  });
});

describe('cfrsam slide run: seams', () => {
  // Two cells side by side (seam at x = 100) and one below the first (seam at y = 100).
  const cells = [
    { x: 0, y: 0, width: 100, height: 100 },
    { x: 100, y: 0, width: 100, height: 100 },
    { x: 0, y: 100, width: 100, height: 100 },
  ];
  const band = { x: 4, y: 4 };

  it('a seam nucleus found by both regions, its centroid on either side of the line, is written once', () => {
    const ledger = new SeamLedger(cells, band);
    const a = ledger.admit(0, [square(50, 50), square(99.4, 40)]);
    const b = ledger.admit(1, [square(100.6, 40.5), square(150, 50)]);
    expect(a.map((n) => n.centroid!.x)).toEqual([50, 99.4]);
    expect(b.map((n) => n.centroid!.x)).toEqual([150]);
  });

  it('a seam nucleus whose centroid both regions place in the other one is still written once', () => {
    const ledger = new SeamLedger(cells, band);
    // region 0 sees it at x 100.8 (region 1's side), region 1 at x 99.5 (region 0's side)
    const a = ledger.admit(0, [square(100.8, 40)]);
    const b = ledger.admit(1, [square(99.5, 40)]);
    expect(a.length + b.length).toBe(1);
  });

  it('a twin deeper than the band on one side (the estimates several pixels apart) is still matched', () => {
    const ledger = new SeamLedger(cells, band);
    const a = ledger.admit(0, [square(94.5, 40)]); // 5.5 px inside region 0
    const b = ledger.admit(1, [square(97, 41)]); // region 1's estimate: 3 px past the seam
    expect(a).toHaveLength(1);
    expect(b).toHaveLength(0);
  });

  it('distinct nuclei that touch across a seam are both written; nuclei beyond the band are not', () => {
    const ledger = new SeamLedger(cells, band);
    const a = ledger.admit(0, [square(97, 40, 3), square(110, 40)]); // the second is region 1's
    const b = ledger.admit(1, [square(103, 40, 3)]);
    expect(a.map((n) => n.centroid!.x)).toEqual([97]);
    expect(b.map((n) => n.centroid!.x)).toEqual([103]);
  });

  it('diagonal and vertical neighbours count; seam nuclei are forgotten once every neighbour is written', () => {
    const ledger = new SeamLedger(cells, band);
    ledger.admit(0, [square(50, 99.5), square(99, 99)]);
    expect(ledger.remembered).toBe(2);
    expect(ledger.admit(2, [square(50, 100.5), square(99.5, 100.5)])).toHaveLength(0);
    // region 1 (the last neighbour of 0 and 2) written: nothing left to remember
    expect(ledger.admit(1, [square(100.5, 99.5)])).toHaveLength(0);
    expect(ledger.remembered).toBe(0);
  });
});

describe('InOrderWriter', () => {
  it('writes regions in index order whatever order they finish in, and a failed one holds nothing back', async () => {
    const written: string[] = [];
    let release!: () => void;
    const slowWrite = new Promise<void>((r) => (release = r));
    const writer = new InOrderWriter<string>(async (i, item) => {
      if (i === 0) await slowWrite; // the first write is still going when the others queue up
      written.push(`${i}:${item}`);
    });
    const third = writer.done(3, 'd');
    const second = writer.done(2, 'c');
    expect(writer.waiting).toBe(2); // both wait for regions 0 and 1
    const first = writer.done(0, 'a');
    writer.done(1, null).catch(() => undefined); // region 1 failed: nothing to write
    expect(writer.waiting).toBe(0);
    release();
    await Promise.all([first, second, third, writer.flush()]);
    expect(written).toEqual(['0:a', '2:c', '3:d']);
  });

  it('surfaces a write error to the regions waiting behind it', async () => {
    const writer = new InOrderWriter<number>(async (i) => {
      if (i === 0) throw new Error('disk full');
    });
    await expect(writer.done(0, 1)).rejects.toThrow('disk full');
    await expect(writer.done(1, 2)).rejects.toThrow('disk full');
    await expect(writer.flush()).rejects.toThrow('disk full');
  });
});
