import sharp from 'sharp';
import { describe, expect, it } from 'vitest';
import {
  decodeLabelPng,
  drawOutlines,
  encodeLabelPng,
  encodeOverlayPng,
  cellToProto,
  expandCells,
  heOpticalDensity,
  nucleiToCsv,
  nucleiToGeoJson,
  nucleiToSidecar,
  parseCsv,
  parseHexColor,
  parseQuPathClassMap,
  segmentResponseToGeoJson,
} from '../src/formats';
import { segmentationProto } from '@cfrsam/rpc';

const { PromptSource } = segmentationProto;
type Nucleus = segmentationProto.Nucleus;

const classes = [
  { index: 0, name: 'other', color: '#808080' },
  { index: 1, name: 'inflammatory', color: '#ff0000' },
  { index: 2, name: 'epithelial, "glandular"', color: '#00ff00' },
];

function nucleus(id: number, classIndex: number): Nucleus {
  return {
    id,
    classIndex,
    className: classIndex >= 0 ? classes[classIndex].name : 'unclassified',
    score: 0.81234567,
    classProbabilities: classIndex >= 0 ? [0.1, 0.2, 0.7] : [],
    centroid: { x: 12.5, y: 7.25 },
    bbox: { x0: 10, y0: 5, x1: 15, y1: 10 },
    polygon: [
      { x: 10, y: 5 },
      { x: 15, y: 5 },
      { x: 15, y: 10 },
      { x: 10, y: 10 },
    ],
    measurements: {
      areaPx: 25,
      areaUm2: 1.5625,
      perimeterPx: 19.5,
      circularity: 0.8,
      eccentricity: 0.1,
      majorAxisPx: 5.1,
      minorAxisPx: 5,
      solidity: 1,
      meanR: 120,
      meanG: 80,
      meanB: 160,
    },
    source: PromptSource.PROMPT_SOURCE_AUTO,
    prompt: { x: 12, y: 7 },
    predictedIou: 0.9,
  };
}

describe('QuPath GeoJSON', () => {
  it("is a FeatureCollection of closed polygons with objectType, QuPath's class names and measurement names", () => {
    const fc = nucleiToGeoJson([nucleus(1, 1), nucleus(2, -1)], classes, 'img', { mpp: 0.25 });
    expect(fc.type).toBe('FeatureCollection');
    expect(fc.features).toHaveLength(2);
    const [f, g] = fc.features;
    expect(f.type).toBe('Feature');
    expect(f.geometry.type).toBe('Polygon');
    const ring = f.geometry.coordinates[0];
    expect(ring).toHaveLength(5);
    expect(ring[0]).toEqual(ring[4]);
    expect(f.properties.objectType).toBe('detection');
    // inflammatory -> QuPath's "Immune cells" with QuPath's colour.
    expect(f.properties.classification).toEqual({ name: 'Immune cells', color: [160, 90, 160] });
    const m = f.properties.measurements;
    expect(m['Nucleus ID']).toBe(1);
    expect(m['Area µm^2']).toBe(1.5625);
    expect(m['Length µm']).toBeCloseTo(19.5 * 0.25);
    // The 5 x 5 square: max caliper the diagonal, min caliper the side.
    expect(m['Max diameter µm']).toBeCloseTo(Math.SQRT2 * 5 * 0.25);
    expect(m['Min diameter µm']).toBeCloseTo(5 * 0.25);
    expect(m['Probability: Immune cells']).toBe(0.2);
    expect(Object.keys(m).some((k) => / um|^(Area|Length|Perimeter|Major|Minor).*px/.test(k))).toBe(false);
    expect([m['Centroid X px'], m['Centroid Y px']]).toEqual([12.5, 7.25]);
    expect(f.id).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    expect(g.properties.classification).toBeUndefined();
    // QuPath keeps only its own properties: nothing else rides on the feature.
    expect(Object.keys(f.properties).sort()).toEqual(['classification', 'isLocked', 'measurements', 'objectType']);
    // JSON round trip keeps everything (no typed arrays or undefined in the output)
    expect(JSON.parse(JSON.stringify(fc))).toEqual(fc);
  });

  it('takes µm from the nucleus itself without an mpp, and px names when there is none', () => {
    const withUm = nucleiToGeoJson([nucleus(1, 0)], classes).features[0].properties.measurements;
    expect(withUm['Length µm']).toBeCloseTo(19.5 * 0.25);
    const bare = nucleus(1, 0);
    bare.measurements!.areaUm2 = 0;
    const px = nucleiToGeoJson([bare], classes).features[0].properties.measurements;
    expect(px['Area px^2']).toBe(25);
    expect(px['Area µm^2']).toBeUndefined();
  });

  it("places a region's outlines in the slide's coordinates (origin + downsample) with the model at the collection level", () => {
    const response: segmentationProto.SegmentResponse = {
      imageId: 'r1',
      width: 64,
      height: 64,
      nuclei: [nucleus(1, 0), nucleus(2, 2)],
      counts: [],
      modelName: 'cfrsam-tiny',
      modelVersion: '0.1.0+abc',
      timings: [],
      tiles: 1,
      blurredTiles: 1,
      imageMpp: 0.5,
      mppAssumed: false,
      modelMpp: 0.25,
      origin: { x: 1000, y: 2000 },
      downsample: 4,
    };
    const fc = segmentResponseToGeoJson(response, classes, parseQuPathClassMap(JSON.stringify({ 'epithelial, "glandular"': 'Tumor' })));
    expect(fc.features[0].geometry.coordinates[0][0]).toEqual([1000 + 4 * 10, 2000 + 4 * 5]);
    expect(fc.features[0].geometry.coordinates[0][2]).toEqual([1000 + 4 * 15, 2000 + 4 * 10]);
    expect(fc.features[0].properties.measurements['Centroid X px']).toBe(1000 + 4 * 12.5);
    // µm from the image's own mpp (0.5), which the downsample does not change.
    expect(fc.features[0].properties.measurements['Length µm']).toBeCloseTo(19.5 * 0.5);
    expect(fc.features[0].properties.classification?.name).toBe('Other');
    expect(fc.features[1].properties.classification).toEqual({ name: 'Tumor', color: [200, 0, 0] });
    expect(fc.properties?.model).toEqual({ name: 'cfrsam-tiny', version: '0.1.0+abc', mpp: 0.25 });
    expect(fc.properties?.image).toMatchObject({ mpp: 0.5, origin: [1000, 2000], downsample: 4, tiles: 1, blurredTiles: 1 });
  });

  it('parses class maps as model=QuPath[#rrggbb] lists or JSON, and names a bad entry', () => {
    expect(parseQuPathClassMap('epithelial=Tumor, other=Other#010203')).toEqual({
      epithelial: { name: 'Tumor' },
      other: { name: 'Other', color: [1, 2, 3] },
    });
    expect(parseQuPathClassMap('{"epithelial": "Tumor"}')).toEqual({ epithelial: 'Tumor' });
    expect(() => parseQuPathClassMap('epithelial')).toThrow(/class map entry "epithelial"/);
  });
});

describe('CSV', () => {
  it('has a header and one row per nucleus, quoting names with commas and quotes', () => {
    const text = nucleiToCsv([nucleus(1, 2), nucleus(2, 0)], classes);
    const rows = parseCsv(text);
    expect(rows).toHaveLength(3);
    const header = rows[0];
    expect(header.slice(0, 6)).toEqual(['id', 'class_index', 'class', 'score', 'predicted_iou', 'source']);
    expect(header[header.length - 1]).toBe('p_epithelial, "glandular"');
    expect(rows[1][header.indexOf('class')]).toBe('epithelial, "glandular"');
    expect(rows[1][header.indexOf('score')]).toBe('0.8123');
    expect(rows[1][header.indexOf('source')]).toBe('auto');
    expect(rows[2][header.indexOf('area_px')]).toBe('25');
    expect(rows.every((r) => r.length === header.length)).toBe(true);
  });
});

describe('label PNG, overlay, sidecar', () => {
  it('16-bit label PNG round-trips values above 255', async () => {
    const labels = new Uint16Array(6 * 4).map((_, i) => (i % 3 === 0 ? 0 : 1000 + i));
    const png = await encodeLabelPng(labels, 6, 4);
    const meta = await sharp(png).metadata();
    expect([meta.format, meta.depth, meta.channels]).toEqual(['png', 'ushort', 1]);
    const back = await decodeLabelPng(png);
    expect([back.width, back.height]).toEqual([6, 4]);
    expect([...back.labels]).toEqual([...labels]);
  });

  it('overlay draws outlines in class colours and leaves the rest of the image', async () => {
    const w = 10;
    const image = { width: w, height: w, data: new Uint8Array(w * w * 3).fill(200) };
    const labels = new Uint16Array(w * w);
    for (let y = 2; y < 7; y++) for (let x = 2; x < 7; x++) labels[y * w + x] = 1;
    const px = drawOutlines(image, labels, () => parseHexColor('#ff0000'));
    const at = (x: number, y: number) => [...px.subarray((y * w + x) * 3, (y * w + x) * 3 + 3)];
    expect(at(2, 2)).toEqual([255, 0, 0]); // boundary
    expect(at(4, 4)).toEqual([200, 200, 200]); // interior
    expect(at(0, 0)).toEqual([200, 200, 200]); // background
    const png = await encodeOverlayPng(image, labels, () => [0, 0, 255]);
    expect((await sharp(png).metadata()).width).toBe(w);
  });

  it('sidecar JSON follows the shared data layout', () => {
    const s = nucleiToSidecar(
      [nucleus(1, 2), nucleus(2, -1), nucleus(3, 0)],
      classes.map((c) => c.name),
      'cfrsam segment',
      0.25,
    );
    expect(s).toEqual({
      source: 'cfrsam segment',
      classNames: classes.map((c) => c.name),
      instances: 3,
      classes: { '1': 2, '3': 0 },
      mpp: 0.25,
    });
  });
});

describe('QuPath cells', () => {
  // Two dark (haematoxylin-blue) nuclei 14 px apart on a pale pink (eosin) background.
  const W = 40;
  const H = 24;
  const labels = new Uint16Array(W * H);
  const image = { width: W, height: H, data: new Uint8Array(W * H * 3) };
  for (let y = 0; y < H; y++) {
    for (let x = 0; x < W; x++) {
      const i = y * W + x;
      const inA = (x - 12) ** 2 + (y - 12) ** 2 <= 16;
      const inB = (x - 26) ** 2 + (y - 12) ** 2 <= 16;
      labels[i] = inA ? 1 : inB ? 2 : 0;
      const [r, g, b] = inA || inB ? [70, 60, 140] : [235, 170, 200];
      image.data.set([r, g, b], i * 3);
    }
  }
  const nucleusArea = (id: number) => labels.filter((l) => l === id).length;

  it('grows each nucleus by the distance, never into its neighbour, with H&E optical densities', () => {
    const cells = expandCells(labels, image, 5);
    expect(cells.map((c) => c.id)).toEqual([1, 2]);
    const [a, b] = cells;
    expect(a.areaPx).toBeGreaterThan(nucleusArea(1) * 2);
    // Between the nuclei the border is half way (x = 19): neither cell crosses it.
    expect(Math.max(...a.polygon.map((p) => p.x))).toBeLessThanOrEqual(20);
    expect(Math.min(...b.polygon.map((p) => p.x))).toBeGreaterThanOrEqual(19);
    expect(isSimplePolygonRing(a.polygon)).toBe(true);
    // The nucleus is haematoxylin, the cytoplasm around it mostly eosin.
    expect(a.nucleus.hematoxylinOd).toBeGreaterThan(a.cell.hematoxylinOd);
    expect(a.cell.eosinOd).toBeGreaterThan(0);
    expect(heOpticalDensity(255, 255, 255)).toEqual({ hematoxylin: 0, eosin: 0 });
  });

  it('writes QuPath cell objects: the cell as geometry, the nucleus as nucleusGeometry, Nucleus:/Cell: measurements', () => {
    const n1 = {
      ...nucleus(1, 0),
      polygon: [
        { x: 8, y: 8 },
        { x: 16, y: 8 },
        { x: 16, y: 16 },
        { x: 8, y: 16 },
      ],
    };
    const cells = new Map(expandCells(labels, image, 5).map((c) => [c.id, c]));
    const f = nucleiToGeoJson([{ ...n1, cell: cellToProto(cells.get(1)!) }], classes, 'img', { mpp: 0.5 }).features[0];
    expect(f.properties.objectType).toBe('cell');
    expect(f.properties.nucleusGeometry?.coordinates[0][0]).toEqual([8, 8]);
    const m = f.properties.measurements;
    expect(m['Nucleus ID']).toBe(1);
    expect(m['Nucleus: Area µm^2']).toBe(1.5625);
    expect(m['Cell: Area µm^2']).toBeCloseTo(cells.get(1)!.areaPx * 0.25);
    expect(m['Nucleus: Hematoxylin OD mean']).toBeGreaterThan(m['Cell: Hematoxylin OD mean']);
    expect(m['Nucleus/Cell area ratio']).toBeGreaterThan(0);
    expect(m['Area µm^2']).toBeUndefined();
  });
});

function isSimplePolygonRing(points: readonly { x: number; y: number }[]): boolean {
  return new Set(points.map((p) => `${p.x},${p.y}`)).size === points.length && points.length >= 4;
}
