import { describe, expect, it } from 'vitest';
import { planTiles } from '../src/imaging';
import {
  buildLabelMap,
  cocoCountsFromString,
  cocoCountsString,
  connectedComponents,
  contourPerimeter,
  convexHull,
  decodeCocoRle,
  decodeRle,
  encodeCocoRle,
  encodeRle,
  fillHoles,
  instanceOrder,
  isSimplePolygon,
  keepComponent,
  labelMapFromBytes,
  labelMapToBytes,
  maskArea,
  masksFromLabelMap,
  measureMask,
  packMask,
  pasteTileMask,
  polygonArea,
  rasterizePolygon,
  removePinches,
  resolveOverlaps,
  simplifyClosedPolygon,
  suppressNearbyPoints,
  traceOuterContour,
  unpackMask,
  type PlacedMask,
} from '../src/instances';

/** A mask from a predicate over a box [x0, x0+w) x [y0, y0+h). */
function maskOf(x0: number, y0: number, w: number, h: number, inside: (x: number, y: number) => boolean): PlacedMask {
  const data = new Uint8Array(w * h);
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) data[y * w + x] = inside(x0 + x + 0.5, y0 + y + 0.5) ? 1 : 0;
  return { x0, y0, width: w, height: h, data };
}

const disk = (cx: number, cy: number, r: number) =>
  maskOf(
    Math.floor(cx - r) - 1,
    Math.floor(cy - r) - 1,
    Math.ceil(2 * r) + 3,
    Math.ceil(2 * r) + 3,
    (x, y) => (x - cx) ** 2 + (y - cy) ** 2 <= r * r,
  );

function fromRows(rows: string[], x0 = 0, y0 = 0): PlacedMask {
  const h = rows.length;
  const w = rows[0].length;
  const data = new Uint8Array(w * h);
  rows.forEach((row, y) => [...row].forEach((c, x) => (data[y * w + x] = c === '#' ? 1 : 0)));
  return { x0, y0, width: w, height: h, data };
}

describe('mask packing and pasting', () => {
  it('packs MSB first and round-trips', () => {
    const m = fromRows(['#..#', '.##.', '#...']);
    const packed = packMask(m);
    expect([...packed.bits]).toEqual([0b10010110, 0b10000000]);
    expect([...unpackMask(packed).data]).toEqual([...m.data]);
  });

  it('pastes tile masks into image coordinates, clipped to the tile', () => {
    const layout = planTiles(100, 60, 64, 16);
    const tile = layout.tiles[1]; // second column
    const m = fromRows(['##', '##'], 10, 20);
    const pasted = pasteTileMask(packMask(m), tile);
    expect([pasted.x0, pasted.y0, pasted.width, pasted.height]).toEqual([tile.x + 10, tile.y + 20, 2, 2]);
    // A mask hanging over the image edge (padding) is clipped to the valid region.
    const small = planTiles(30, 30, 64, 16).tiles[0];
    const over = pasteTileMask(packMask(fromRows(['####', '####'], 28, 5)), small);
    expect([over.x0, over.y0, over.width, over.height]).toEqual([28, 5, 2, 2]);
    expect(pasteTileMask({ x0: 0, y0: 0, width: 0, height: 0, bits: new Uint8Array(0) }, small).width).toBe(0);
  });

  it('keeps the component under the prompt, else the largest, and fills holes', () => {
    const m = fromRows(['##....', '##.###', '...###', '...###']);
    expect(connectedComponents(m).count).toBe(2);
    expect(maskArea(keepComponent(m, { x: 0.5, y: 0.5 }))).toBe(4);
    expect(maskArea(keepComponent(m, { x: 2.5, y: 0.5 }))).toBe(9);
    const ring = fromRows(['###', '#.#', '###']);
    expect(maskArea(fillHoles(ring))).toBe(9);
    const open = fromRows(['###', '#..', '###']);
    expect(maskArea(fillHoles(open))).toBe(7);
  });
});

describe('overlap resolution', () => {
  it('gives contested pixels to the higher score and drops near-duplicates', () => {
    const a = { mask: disk(50, 50, 10), score: 0.9, prompt: { x: 50, y: 50 }, name: 'a' };
    const b = { mask: disk(62, 50, 10), score: 0.8, prompt: { x: 62, y: 50 }, name: 'b' };
    const dup = { mask: disk(51, 50, 10), score: 0.5, prompt: { x: 51, y: 50 }, name: 'dup' };
    const out = resolveOverlaps([b, dup, a]);
    expect(out.map((o) => o.name)).toEqual(['b', 'a']);
    const am = out.find((o) => o.name === 'a')!.mask;
    const bm = out.find((o) => o.name === 'b')!.mask;
    expect(maskArea(am)).toBe(maskArea(disk(50, 50, 10)));
    expect(maskArea(bm)).toBeLessThan(maskArea(disk(62, 50, 10)));
    const labels = buildLabelMap(100, 100, [am, bm]);
    let overlap = 0;
    for (let y = 0; y < 100; y++)
      for (let x = 0; x < 100; x++) {
        const inA = x >= am.x0 && x < am.x0 + am.width && y >= am.y0 && y < am.y0 + am.height && am.data[(y - am.y0) * am.width + x - am.x0];
        const inB = x >= bm.x0 && x < bm.x0 + bm.width && y >= bm.y0 && y < bm.y0 + bm.height && bm.data[(y - bm.y0) * bm.width + x - bm.x0];
        if (inA && inB) overlap++;
        if (inA) expect(labels[y * 100 + x]).toBe(1);
      }
    expect(overlap).toBe(0);
  });

  it('keeps one connected component when a higher score cuts an instance in two', () => {
    const bar = { mask: maskOf(0, 10, 40, 4, () => true), score: 0.9, prompt: { x: 20, y: 12 } };
    const cross = { mask: maskOf(18, 0, 4, 40, () => true), score: 0.5, prompt: { x: 19, y: 30 } };
    const out = resolveOverlaps([bar, cross], { minKeptFraction: 0.3, minAreaPx: 1 });
    const c = out[1].mask;
    expect([c.y0, c.height]).toEqual([14, 26]); // the part below the bar, which holds the prompt
  });

  it('leaves no pinch after a cut: every outline is a simple ring that never touches itself', () => {
    // A 10x10 instance loses a 3x3 block at (1, 1) and the corner pixel (0, 0) to higher scores:
    // its pixels (1, 0) and (0, 1) then meet only at the corner (1, 1), between two cut-out
    // cavities, one of them open to the outside; the outline would pass that corner twice.
    const low = { mask: maskOf(0, 0, 10, 10, () => true), score: 0.5, prompt: { x: 8, y: 8 } };
    const block = { mask: maskOf(1, 1, 3, 3, () => true), score: 0.9, prompt: { x: 2, y: 2 } };
    const corner = { mask: maskOf(0, 0, 1, 1, () => true), score: 0.8, prompt: { x: 0.5, y: 0.5 } };
    const cut = resolveOverlaps([low, block, corner], { minKeptFraction: 0.3, minAreaPx: 1 });
    expect(cut).toHaveLength(3);
    for (const { mask } of cut) {
      const ring = traceOuterContour(mask).points;
      expect(isSimplePolygon(ring)).toBe(true);
      expect(new Set(ring.map((p) => `${p.x},${p.y}`)).size).toBe(ring.length);
    }
    // One pixel of the pinch went; nothing else did, and no pixel is shared.
    expect(maskArea(cut[0].mask)).toBe(100 - 9 - 1 - 1);
    // Without the fix the same cut traces a ring through (1, 1) twice.
    const raw = maskOf(0, 0, 10, 10, (cx, cy) => {
      const [x, y] = [Math.floor(cx), Math.floor(cy)];
      return !((x >= 1 && x <= 3 && y >= 1 && y <= 3) || (x === 0 && y === 0));
    });
    const pinched = traceOuterContour(raw).points;
    expect(pinched.filter((p) => p.x === 1 && p.y === 1)).toHaveLength(2);
    expect(isSimplePolygon(pinched)).toBe(false);
    expect(maskArea(removePinches(raw))).toBe(maskArea(raw) - 1);
  });

  it('drops empty masks and orders ids by position', () => {
    const empty = { mask: { x0: 0, y0: 0, width: 0, height: 0, data: new Uint8Array(0) }, score: 1, prompt: { x: 0, y: 0 } };
    expect(resolveOverlaps([empty])).toEqual([]);
    expect(
      instanceOrder([
        { cx: 5, cy: 9, score: 1 },
        { cx: 50, cy: 2, score: 1 },
        { cx: 1, cy: 9.5, score: 1 },
      ]),
    ).toEqual([1, 2, 0]);
  });

  it('suppresses nearby points across tiles, keeping the more confident', () => {
    const kept = suppressNearbyPoints(
      [
        { x: 127.5, y: 40, score: 0.7 },
        { x: 129, y: 41, score: 0.9 },
        { x: 140, y: 40, score: 0.6 },
      ],
      4,
    );
    expect(kept).toEqual([1, 2]);
  });
});

describe('contours', () => {
  it('traces a square clockwise on pixel corners', () => {
    const c = traceOuterContour(fromRows(['###', '###'], 5, 7));
    expect(c.points).toEqual([
      { x: 5, y: 7 },
      { x: 8, y: 7 },
      { x: 8, y: 9 },
      { x: 5, y: 9 },
    ]);
    expect(c.edgeLength).toBe(10);
  });

  it('encloses exactly the mask for concave shapes and diagonal pinches', () => {
    const shapes = [
      fromRows(['#....', '#....', '#####']),
      fromRows(['.###.', '##.##', '.###.'].map((r) => r)),
      fromRows(['##..', '##..', '..##', '..##']), // diagonal touch: 4-connectivity traces the first part
      fromRows(['#.#', '###', '#.#']),
    ];
    for (const s of shapes) {
      const main = keepComponent(fillHoles(s));
      const c = traceOuterContour(main);
      const raster = rasterizePolygon(
        c.points.map((p) => ({ x: p.x - main.x0, y: p.y - main.y0 })),
        main.width,
        main.height,
      );
      expect([...raster]).toEqual([...main.data]);
      expect(polygonArea(c.points)).toBe(maskArea(main));
    }
  });

  it('simplifies staircases within tolerance and keeps pixel corners', () => {
    const d = disk(30, 30, 12);
    const c = traceOuterContour(d);
    const s = simplifyClosedPolygon(c.points, 0.5);
    expect(s.length).toBeLessThan(c.points.length);
    expect(s.every((p) => Number.isInteger(p.x) && Number.isInteger(p.y))).toBe(true);
    expect(Math.abs(polygonArea(s) - maskArea(d)) / maskArea(d)).toBeLessThan(0.05);
  });

  it('keeps simplified outlines simple (no self-crossing) on irregular shapes', () => {
    expect(
      isSimplePolygon([
        { x: 0, y: 0 },
        { x: 2, y: 0 },
        { x: 2, y: 2 },
        { x: 0, y: 2 },
      ]),
    ).toBe(true);
    expect(
      isSimplePolygon([
        { x: 0, y: 0 },
        { x: 2, y: 2 },
        { x: 2, y: 0 },
        { x: 0, y: 2 },
      ]),
    ).toBe(false); // bow tie
    expect(
      isSimplePolygon([
        { x: 0, y: 0 },
        { x: 3, y: 0 },
        { x: 1, y: 0 },
        { x: 1, y: 2 },
      ]),
    ).toBe(false); // folds back
    let seed = 3;
    const rand = () => (seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648;
    for (let k = 0; k < 40; k++) {
      const blobs = Array.from({ length: 4 }, () => ({ x: 8 + rand() * 16, y: 8 + rand() * 16, r: 2 + rand() * 5 }));
      const m = keepComponent(fillHoles(maskOf(0, 0, 32, 32, (x, y) => blobs.some((b) => (x - b.x) ** 2 + (y - b.y) ** 2 <= b.r * b.r))));
      const c = traceOuterContour(m);
      const s = simplifyClosedPolygon(c.points, 0.5);
      expect(isSimplePolygon(s) || s.length === c.points.length).toBe(true);
    }
  });

  it('convex hull of a square', () => {
    const hull = convexHull([
      { x: 0, y: 0 },
      { x: 2, y: 0 },
      { x: 1, y: 1 },
      { x: 2, y: 2 },
      { x: 0, y: 2 },
    ]);
    expect(hull).toHaveLength(4);
    expect(polygonArea(hull)).toBe(4);
  });
});

describe('measurements on known shapes', () => {
  it('disk: area pi r^2, perimeter 2 pi r, circular, round', () => {
    const r = 15;
    const m = measureMask(disk(40, 40, r), undefined, 0.5);
    expect(Math.abs(m.measurements.areaPx - Math.PI * r * r) / (Math.PI * r * r)).toBeLessThan(0.02);
    expect(m.measurements.areaUm2).toBeCloseTo(m.measurements.areaPx * 0.25, 6);
    expect(Math.abs(m.measurements.perimeterPx - 2 * Math.PI * r) / (2 * Math.PI * r)).toBeLessThan(0.04);
    expect(m.measurements.circularity).toBeGreaterThan(0.9);
    expect(m.measurements.eccentricity).toBeLessThan(0.15);
    expect(m.measurements.majorAxisPx).toBeCloseTo(2 * r, 0);
    expect(m.measurements.solidity).toBeGreaterThan(0.95);
    expect(m.centroid.x).toBeCloseTo(40, 1);
    expect(m.centroid.y).toBeCloseTo(40, 1);
  });

  it('ellipse: axes 2a and 2b, eccentricity sqrt(1 - b^2/a^2)', () => {
    const a = 20;
    const b = 10;
    const e = maskOf(0, 0, 60, 40, (x, y) => ((x - 30) / a) ** 2 + ((y - 20) / b) ** 2 <= 1);
    const m = measureMask(e, undefined, 0).measurements;
    expect(m.majorAxisPx).toBeCloseTo(2 * a, 0);
    expect(m.minorAxisPx).toBeCloseTo(2 * b, 0);
    expect(m.eccentricity).toBeCloseTo(Math.sqrt(1 - (b * b) / (a * a)), 2);
    expect(m.areaUm2).toBe(0);
  });

  it('square and L-shape: bbox, solidity, mean colour', () => {
    const sq = fromRows(['####', '####', '####', '####'], 2, 3);
    const image = { width: 10, height: 10, data: new Uint8Array(300).fill(0) };
    for (let i = 0; i < 100; i++) image.data[i * 3] = i;
    const m = measureMask(sq, image, 0);
    expect(m.bbox).toEqual({ x0: 2, y0: 3, x1: 6, y1: 7 });
    expect(m.measurements.solidity).toBe(1);
    expect(m.measurements.eccentricity).toBeCloseTo(0, 6);
    // mean of i = y*10 + x over x 2..5, y 3..6
    expect(m.measurements.meanR).toBeCloseTo(45 + 3.5, 6);
    const l = measureMask(fromRows(['#...', '#...', '#...', '####']), undefined, 0).measurements;
    expect(l.solidity).toBeCloseTo(7 / 11.5, 6); // hull: the 4x4 square less the triangle (1,0),(4,0),(4,3)
    const square10 = contourPerimeter(traceOuterContour(fromRows(Array(10).fill('#'.repeat(10)))));
    expect(Math.abs(square10 - 40) / 40).toBeLessThan(0.05);
  });
});

describe('RLE and label maps', () => {
  it('RLE starts with zeros and round-trips', () => {
    const m = fromRows(['##..', '.###']);
    const rle = encodeRle(m);
    expect(rle.counts).toEqual([0, 2, 3, 3]);
    expect([...decodeRle(rle)]).toEqual([...m.data]);
    expect(encodeRle(fromRows(['..', '..'])).counts).toEqual([4]);
    expect(() => decodeRle({ width: 2, height: 2, counts: [1, 1] })).toThrow(/cover 2 of 4/);
  });

  it('label maps paint ids, round-trip through bytes and back to masks', () => {
    const a = fromRows(['##', '##'], 1, 1);
    const b = fromRows(['#'], 5, 5);
    const labels = buildLabelMap(8, 8, [a, b]);
    expect(labels[1 * 8 + 1]).toBe(1);
    expect(labels[5 * 8 + 5]).toBe(2);
    const bytes = labelMapToBytes(labels);
    expect(bytes.length).toBe(128);
    expect(bytes.readUInt16LE((5 * 8 + 5) * 2)).toBe(2);
    expect([...labelMapFromBytes(bytes, 8, 8)]).toEqual([...labels]);
    const masks = masksFromLabelMap(labels, 8, 8);
    expect(masks.map(maskArea)).toEqual([4, 1]);
    expect([masks[0].x0, masks[0].y0]).toEqual([1, 1]);
  });
});

describe('COCO RLE (pycocotools layout)', () => {
  it('encodes a placed mask over the whole image, column-major, and round-trips', () => {
    // A 3x2 mask at (1, 1) in a 4x4 image: rows "110" and "011".
    const mask: PlacedMask = { x0: 1, y0: 1, width: 3, height: 2, data: Uint8Array.from([1, 1, 0, 0, 1, 1]) };
    const counts = encodeCocoRle(mask, 4, 4);
    // Column-major indices x*4 + y of the ones: (1,1)=5, (2,1)=9, (2,2)=10, (3,2)=14.
    expect(counts).toEqual([5, 1, 3, 2, 3, 1, 1]);
    const image = decodeCocoRle(counts, 4, 4);
    const expected = new Uint8Array(16);
    for (const [x, y] of [
      [1, 1],
      [2, 1],
      [2, 2],
      [3, 2],
    ])
      expected[y * 4 + x] = 1;
    expect([...image]).toEqual([...expected]);
    expect(cocoCountsFromString(cocoCountsString(counts))).toEqual(counts);
  });

  it("writes pycocotools' compressed counts string (deltas from i-2, 5-bit groups, sign-extended)", () => {
    expect(cocoCountsString([0, 5])).toBe('05');
    expect(cocoCountsString([10, 40, 5, 3])).toBe(':X15kN');
    expect(cocoCountsFromString(':X15kN')).toEqual([10, 40, 5, 3]);
    const big = [123456, 7, 99999, 1, 0];
    expect(cocoCountsFromString(cocoCountsString(big))).toEqual(big);
  });

  it('ends on the last run of ones when the mask reaches the last pixel, and is one run when empty', () => {
    const corner: PlacedMask = { x0: 2, y0: 1, width: 1, height: 1, data: Uint8Array.from([1]) };
    expect(encodeCocoRle(corner, 3, 2)).toEqual([5, 1]);
    expect(encodeCocoRle({ x0: 0, y0: 0, width: 2, height: 2, data: new Uint8Array(4) }, 3, 2)).toEqual([6]);
  });
});
