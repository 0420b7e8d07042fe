// Prompter over real gRPC on loopback with models/tiny, plus the anchor decoding on hand-made logits.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeClient, stagesProto, status, unary } from '@cfrsam/rpc';
import { digestTile, type Manifest, normalizeRgb, tensorFromProto, tensorToProto } from '@cfrsam/contract';
import { syntheticTileRgb, testBundle, tilePixelsTensor } from '@cfrsam/testing';
import { decodeAnchors, type Detection, mixClassProbabilities, pointNms, refinerInputs, withRefinedPoints } from '../src/pipeline';
import { startPrompter, type RunningPrompter } from '../src/server';
import { tileSharpness } from '../src/sharpness';

describe('tileSharpness', () => {
  // Written by model/tests/test_sharpness.py from the Python reference (cfrsam/prompt_learner/sharpness.py).
  const fixture = JSON.parse(fs.readFileSync(path.join(__dirname, '../../../model/tests/fixtures/sharpness_cases.json'), 'utf8')) as {
    cases: { name: string; width: number; height: number; rgb: number[]; sharpness: number | null }[];
  };
  const normalization = { mean: [123.675, 116.28, 103.53], std: [58.395, 57.12, 57.375] };

  it.each(fixture.cases.map((c) => [c.name, c] as const))('gives the reference value on the "%s" tile', (_, c) => {
    const pixels = normalizeRgb(Uint8Array.from(c.rgb), c.width, c.height, normalization);
    const value = tileSharpness({ type: 'float32', dims: [3, c.height, c.width], data: pixels }, normalization);
    if (c.sharpness === null) expect(value).toBe(Infinity);
    else expect(Math.abs(value - c.sharpness)).toBeLessThanOrEqual(1e-5 * Math.max(1, c.sharpness));
  });

  it('orders the fixture as blur does: the blurred tile below the sharp one', () => {
    const value = (name: string) => fixture.cases.find((c) => c.name === name)!.sharpness!;
    expect(value('blurred')).toBeLessThan(value('sharp'));
  });
});

describe('decodeAnchors', () => {
  // 4 anchors, K = 2 classes (+ background at index 2).
  const points = new Float32Array([10, 10, 50, 50, 12, 11, -5, 300]);
  const logits = new Float32Array([
    4,
    0,
    -2, // anchor 0: class 0, very likely foreground
    0,
    0,
    5, // anchor 1: background
    0,
    3,
    0, // anchor 2: class 1, 2.2 px from anchor 0, less confident -> merged away by NMS
    1,
    1,
    -3, // anchor 3: foreground, point outside the tile -> clipped
  ]);
  const detections = decodeAnchors(points, logits, 4, 2, 256, { minForeground: 0.5, nmsRadius: 4 });

  it('drops background, merges close points keeping the confident one, clips to the tile', () => {
    expect(detections.map((d) => [d.x, d.y])).toEqual([
      [10, 10],
      [0, 256],
    ]);
    expect(detections[0].foreground).toBeGreaterThan(detections[1].foreground); // sorted by confidence
  });

  it('renormalises class probabilities over the K classes', () => {
    const d = detections.find((x) => x.x === 10)!;
    expect(d.classIndex).toBe(0);
    expect(d.classProbabilities[0] + d.classProbabilities[1]).toBeCloseTo(1, 6);
    expect(d.classProbabilities[0]).toBeCloseTo(Math.exp(4) / (Math.exp(4) + 1), 6);
    const softmaxBg = Math.exp(-2) / (Math.exp(4) + Math.exp(0) + Math.exp(-2));
    expect(d.foreground).toBeCloseTo(1 - softmaxBg, 6);
  });

  it('keeps everything with radius 0 and nothing below the threshold', () => {
    expect(decodeAnchors(points, logits, 4, 2, 256, { minForeground: 0.5, nmsRadius: 0 })).toHaveLength(3);
    expect(decodeAnchors(points, logits, 4, 2, 256, { minForeground: 1, nmsRadius: 0 })).toHaveLength(0);
    expect(
      pointNms(
        [
          { x: 0, y: 0 },
          { x: 3, y: 0 },
          { x: 5, y: 0 },
        ],
        4,
      ),
    ).toEqual([
      { x: 0, y: 0 },
      { x: 5, y: 0 },
    ]);
  });
});

describe('point refinement (pure parts)', () => {
  const det = (x: number, y: number, foreground: number): Detection => ({ x, y, foreground, classIndex: 0, classProbabilities: [1] });
  const perTile = [[det(10, 10, 0.9), det(30, 10, 0.8)], [], [det(5, 250, 0.7)]];

  it("packs every tile's kept points with their tile's index in the batch", () => {
    const { points, imageIndex } = refinerInputs(perTile);
    expect([...points]).toEqual([10, 10, 30, 10, 5, 250]);
    expect([...imageIndex]).toEqual([0n, 0n, 2n]);
  });

  it('moves the points, clips them to the tile, keeps a point whose refinement is not finite, merges converged ones', () => {
    const refined = new Float32Array([20, 11, 21, 11.5, -3, 300]);
    const out = withRefinedPoints(perTile, { refined }, 256, 4);
    // The two points of tile 0 converged (1.1 px apart): the less confident goes.
    expect(out[0].map((d) => [d.x, d.y, d.foreground])).toEqual([[20, 11, 0.9]]);
    expect(out[1]).toEqual([]);
    expect(out[2].map((d) => [d.x, d.y])).toEqual([[0, 256]]);
    const kept = withRefinedPoints(perTile, { refined: new Float32Array([NaN, 1, 40, 10, 5, 250]) }, 256, 4);
    expect(kept[0].map((d) => [d.x, d.y])).toEqual([
      [10, 10],
      [40, 10],
    ]);
  });

  it("drops the points the refiner's score head puts below the bar before merging, keeps a non-finite score", () => {
    const refined = new Float32Array([20, 11, 21, 11.5, 5, 250]);
    // The first point of tile 0 is on no nucleus: its converged neighbour survives the merge.
    const out = withRefinedPoints(perTile, { refined, scores: new Float32Array([0.1, 0.8, NaN]) }, 256, 4, 0.3);
    expect(out[0].map((d) => [d.x, d.y, d.foreground])).toEqual([[21, 11.5, 0.8]]);
    expect(out[2].map((d) => [d.x, d.y])).toEqual([[5, 250]]);
    // Without a bar the scores change nothing.
    const unbarred = withRefinedPoints(perTile, { refined, scores: new Float32Array([0.1, 0.8, 0.2]) }, 256, 4, 0);
    expect(unbarred.map((t) => t.length)).toEqual([1, 0, 1]);
  });

  it('holds each tile to its own bar when given one per tile (the blur gate)', () => {
    const refined = new Float32Array([20, 11, 40, 40, 5, 250]);
    const scores = new Float32Array([0.4, 0.4, 0.4]);
    // Tile 0 at the served bar drops its score-0.4 points; tile 2, called blurred, keeps its own.
    const out = withRefinedPoints(perTile, { refined, scores }, 256, 4, [0.6, 0.6, 0.3]);
    expect(out.map((t) => t.length)).toEqual([0, 0, 1]);
  });

  it("mixes each point's classes with the refiner's at the bundle's weight", () => {
    const two = (x: number, y: number, probabilities: number[]): Detection => ({
      x,
      y,
      foreground: 0.9,
      classIndex: probabilities.indexOf(Math.max(...probabilities)),
      classProbabilities: probabilities,
    });
    const tiles = [[two(10, 10, [0.7, 0.2, 0.1]), two(60, 60, [0.2, 0.2, 0.6])]];
    const refined = new Float32Array([10, 10, 60, 60]);
    const classProbabilities = new Float32Array([0.1, 0.8, 0.1, 0.2, 0.2, 0.6]);
    const [mixed] = withRefinedPoints(tiles, { refined, classProbabilities }, 256, 4, 0, 0.5);
    // sqrt(0.7 x 0.1) < sqrt(0.2 x 0.8): the refiner turns the first point to class 1.
    expect(mixed.map((d) => d.classIndex)).toEqual([1, 2]);
    const g = [Math.sqrt(0.07), Math.sqrt(0.16), Math.sqrt(0.01)];
    const total = g[0] + g[1] + g[2];
    mixed[0].classProbabilities.forEach((p, k) => expect(p).toBeCloseTo(g[k] / total, 6));
    expect(mixed[1].classProbabilities.reduce((a, b) => a + b, 0)).toBeCloseTo(1, 6);
    // Weight 0 (or no class output) serves the learner's classes untouched.
    const [plain] = withRefinedPoints(tiles, { refined, classProbabilities }, 256, 4, 0, 0);
    expect(plain.map((d) => d.classProbabilities)).toEqual(tiles[0].map((d) => d.classProbabilities));
    expect(mixClassProbabilities([0.5, 0.5], new Float32Array([1]), 0.5)).toEqual([0.5, 0.5]);
  });
});

const bundle = testBundle();
if (bundle.skipReason) console.warn(`prompter.test: ${bundle.skipReason}`);

describe.skipIf(!bundle.manifest)('Prompter service', () => {
  const manifest = bundle.manifest as Manifest;
  const S = manifest.inputSize;
  const K = manifest.classes.length;
  let running: RunningPrompter;
  let client: stagesProto.PrompterClient;
  const tiles = [1, 2, 3].map((seed) => {
    const rgb = syntheticTileRgb(S, seed);
    return { digest: digestTile(rgb, manifest.version), pixels: tilePixelsTensor(rgb, manifest) };
  });
  const detect = (request: Partial<stagesProto.DetectRequest>) =>
    unary(client, client.detect, { tiles: [], minForeground: 0, nmsRadius: 0, modelVersion: manifest.version, ...request }, { timeoutMs: 30_000 });

  beforeAll(async () => {
    running = await startPrompter({ port: 0, host: '127.0.0.1', bundle: manifest.dir, maxBatch: 2, faultInjection: true });
    client = makeClient(stagesProto.PrompterClient, running.server.address);
  });
  afterAll(async () => {
    client?.close();
    await running?.server.shutdown();
  });

  it('detects well-formed point prompts for every tile, batching as configured', async () => {
    const response = await detect({ tiles });
    expect(response.tiles.map((t) => t.digest)).toEqual(tiles.map((t) => t.digest));
    const { minForeground } = manifest.prompter;
    // With a point refiner the returned points are refined ones, merged at its own radius.
    const nmsRadius = manifest.graphs.point_refiner ? manifest.prompter.refinedNmsRadius : manifest.prompter.nmsRadius;
    // Collect violations instead of asserting per detection: an untrained bundle yields ~1000 each.
    const problems: string[] = [];
    for (const tile of response.tiles) {
      const ds = tile.detections;
      ds.forEach((d, i) => {
        const sum = d.classProbabilities.reduce((a, b) => a + b, 0);
        if (!(d.x >= 0 && d.x <= S && d.y >= 0 && d.y <= S)) problems.push(`point ${i} (${d.x}, ${d.y}) outside the tile`);
        if (!(d.classIndex >= 0 && d.classIndex < K)) problems.push(`class ${d.classIndex} out of range`);
        if (d.classProbabilities.length !== K || Math.abs(sum - 1) > 1e-4) problems.push(`probabilities ${d.classProbabilities}`);
        if (d.classProbabilities[d.classIndex] !== Math.max(...d.classProbabilities)) problems.push(`class ${d.classIndex} not the argmax`);
        if (d.foreground < minForeground - 1e-6) problems.push(`foreground ${d.foreground} below ${minForeground}`);
        if (i > 0 && d.foreground > ds[i - 1].foreground) problems.push(`not sorted at ${i}`);
      });
      for (let i = 0; i < ds.length; i++) {
        for (let j = i + 1; j < ds.length; j++) {
          if (Math.hypot(ds[i].x - ds[j].x, ds[i].y - ds[j].y) < nmsRadius - 1e-4) problems.push(`points ${i} and ${j} closer than ${nmsRadius}`);
        }
      }
    }
    expect(problems.slice(0, 10)).toEqual([]);
    // The same tile alone (batch of 1) gives the same detections as inside a batch of 2.
    const alone = await detect({ tiles: [tiles[1]] });
    expect(alone.tiles[0].detections.length).toBe(response.tiles[1].detections.length);
    alone.tiles[0].detections.slice(0, 5).forEach((d, i) => {
      expect(d.x).toBeCloseTo(response.tiles[1].detections[i].x, 2);
      expect(d.y).toBeCloseTo(response.tiles[1].detections[i].y, 2);
    });
  });

  it.skipIf(!manifest.graphs.point_refiner)('moves the kept points with the point refiner, within its crop', async () => {
    const unrefined = await startPrompter({ port: 0, host: '127.0.0.1', bundle: manifest.dir, refinePoints: false, maxBatch: 2, workers: 1 });
    const plainClient = makeClient(stagesProto.PrompterClient, unrefined.server.address);
    try {
      const request = { tiles, minForeground: 0, nmsRadius: 0, modelVersion: manifest.version };
      const [refined, plain] = await Promise.all([detect(request), unary(plainClient, plainClient.detect, request, { timeoutMs: 30_000 })]);
      const half = 24; // the refiner's crop is at least 48 px: a point moves at most half of it
      let moved = 0;
      let kept = 0;
      let reclassified = 0;
      refined.tiles.forEach((tile, t) => {
        const before = plain.tiles[t].detections;
        // Merging refined points only removes detections; each kept one comes from the unrefined list in order.
        expect(tile.detections.length).toBeLessThanOrEqual(before.length);
        let j = 0;
        for (const d of tile.detections) {
          while (j < before.length && Math.abs(before[j].foreground - d.foreground) > 1e-5) j++;
          expect(j).toBeLessThan(before.length);
          const shift = Math.hypot(d.x - before[j].x, d.y - before[j].y);
          expect(shift).toBeLessThanOrEqual(half * Math.SQRT2 + 1);
          if (shift > 0.1) moved++;
          kept++;
          // Without a class weight the learner's class stands; with one, the refiner's vote may
          // change it where the learner was unsure (mixClassProbabilities, tested on its own).
          if (manifest.prompter.refinerClassWeight > 0) {
            if (d.classIndex !== before[j].classIndex) reclassified++;
          } else {
            expect(d.classIndex).toBe(before[j].classIndex);
          }
          j++;
        }
      });
      expect(moved).toBeGreaterThan(0);
      expect(reclassified).toBeLessThanOrEqual(Math.ceil(0.2 * kept));
    } finally {
      plainClient.close();
      await unrefined.server.shutdown();
    }
  });

  it.skipIf(!manifest.prompter.minPointScore)("applies the bundle's blur gate: the gate's bar on tiles below its cut only", async () => {
    // The same bundle with a gate in its manifest (the graphs linked, not copied): a cut above every
    // tile's sharpness holds all of them to the gate's bar (0.99 here, to be seen to bite: the
    // synthetic tiles' points score above the served bar), a cut near 0 holds none.
    const gatedBundle = (cut: number) => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cfrsam-gate-'));
      const raw = JSON.parse(fs.readFileSync(path.join(manifest.dir, 'manifest.json'), 'utf8'));
      raw.prompter.blur_gate = { sharpness_below: cut, min_point_score: 0.99 };
      fs.writeFileSync(path.join(dir, 'manifest.json'), JSON.stringify(raw));
      for (const graph of Object.values(manifest.graphs)) fs.symlinkSync(graph.path, path.join(dir, path.basename(graph.path)));
      return dir;
    };
    const request = { tiles, minForeground: 0, nmsRadius: 0, modelVersion: manifest.version };
    const served = await detect(request);
    if (!manifest.prompter.blurGate) expect(served.tiles.every((t) => !t.blurred)).toBe(true);
    for (const [cut, compare] of [
      [1e9, 'fewer'],
      [1e-9, 'same'],
    ] as const) {
      const dir = gatedBundle(cut);
      const gated = await startPrompter({ port: 0, host: '127.0.0.1', bundle: dir, maxBatch: 2, workers: 1 });
      const gatedClient = makeClient(stagesProto.PrompterClient, gated.server.address);
      try {
        const response = await unary(gatedClient, gatedClient.detect, request, { timeoutMs: 30_000 });
        const counts = response.tiles.map((t) => t.detections.length);
        const servedCounts = served.tiles.map((t) => t.detections.length);
        expect(response.tiles.map((t) => t.blurred)).toEqual(tiles.map(() => compare === 'fewer'));
        if (compare === 'same') expect(counts).toEqual(servedCounts);
        else {
          counts.forEach((n, i) => expect(n).toBeLessThanOrEqual(servedCounts[i]));
          expect(counts.reduce((a, b) => a + b, 0)).toBeLessThan(servedCounts.reduce((a, b) => a + b, 0));
        }
      } finally {
        gatedClient.close();
        await gated.server.shutdown();
        fs.rmSync(dir, { recursive: true, force: true });
      }
    }
  });

  it('honours min_foreground and accepts float16 pixels', async () => {
    const base = await detect({ tiles: [tiles[0]], minForeground: 0.01 });
    const strict = await detect({ tiles: [tiles[0]], minForeground: 0.99 });
    expect(strict.tiles[0].detections.length).toBeLessThanOrEqual(base.tiles[0].detections.length);
    expect(strict.tiles[0].detections.every((d) => d.foreground >= 0.99)).toBe(true);
    const f32 = tensorFromProto('p', tiles[0].pixels);
    const half = tensorToProto(f32.dims, f32.data, stagesProto.DType.DTYPE_FLOAT16);
    const response = await detect({ tiles: [{ digest: tiles[0].digest, pixels: half }] });
    expect(response.tiles[0].detections.length).toBeGreaterThanOrEqual(0);
  });

  it('answers bad input with INVALID_ARGUMENT naming the problem', async () => {
    const small = tensorToProto([3, 64, 64], new Float32Array(3 * 64 * 64));
    await expect(detect({ tiles: [{ digest: 'a'.repeat(64), pixels: small }] })).rejects.toMatchObject({
      code: status.INVALID_ARGUMENT,
      details: `tiles[0].pixels: expected dims [3,${S},${S}], got [3,64,64]`,
    });
    await expect(detect({ tiles: [{ digest: 'x', pixels: small }] })).rejects.toMatchObject({
      code: status.INVALID_ARGUMENT,
      details: expect.stringMatching(/tiles\[0\]\.digest must be a SHA-256/),
    });
    await expect(detect({ tiles: [{ digest: 'a'.repeat(64), rgb: Buffer.alloc(S * S * 3) }] })).rejects.toMatchObject({
      code: status.INVALID_ARGUMENT,
      details: expect.stringMatching(/tiles\[0\]\.digest a{16}\.\.\. is not the digest of its RGB bytes/),
    });
    await expect(detect({ tiles: [] })).rejects.toMatchObject({ code: status.INVALID_ARGUMENT, details: expect.stringMatching(/at least one tile/) });
    await expect(detect({ tiles: [tiles[0]], minForeground: 1.5 })).rejects.toMatchObject({
      code: status.INVALID_ARGUMENT,
      details: expect.stringMatching(/min_foreground must be in \[0, 1\]/),
    });
    await expect(detect({ tiles: [tiles[0]], modelVersion: 'other' })).rejects.toMatchObject({
      code: status.INVALID_ARGUMENT,
      details: expect.stringMatching(/does not match the served model/),
    });
    await expect(detect({ tiles: [{ digest: 'x' }] })).rejects.toMatchObject({ code: status.INVALID_ARGUMENT });
  });

  it('keeps serving after a worker crashes', async () => {
    await expect(running.pool.run('__exit__', {})).rejects.toThrow(/died/);
    const response = await detect({ tiles: [tiles[2]] });
    expect(response.tiles).toHaveLength(1);
  });
});
