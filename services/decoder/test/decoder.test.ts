// Decoder over real gRPC on loopback with models/tiny: not-prepared status, Prepare once per
// digest, Decode of prompt batches into compact masks that match the graph's own logits, and
// prompt validation.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isNotPreparedError, makeClient, stagesProto, status, unary } from '@cfrsam/rpc';
import { digestTile, type Manifest, tensorToProto, unpackBits } from '@cfrsam/contract';
import { OnnxWorkerPool } from '@cfrsam/runtime';
import { normalizeTile, syntheticTileRgb, testBundle } from '@cfrsam/testing';
import { DecoderPipeline, encodeMask } from '../src/pipeline';
import { startDecoder, type RunningDecoder } from '../src/server';

describe('encodeMask', () => {
  it('thresholds, places at the window origin, crops and bit-packs', () => {
    const W = 4;
    const logits = new Float32Array([-1, -1, -1, -1, -1, 2, 1, -1, -1, -1, 3, -1, -1, -1, -1, -1]);
    const mask = encodeMask(logits, W, 10, 20, 256, 0, 0.9);
    expect(mask).toMatchObject({ x0: 11, y0: 21, width: 2, height: 2, predictedIou: 0.9 });
    expect([...unpackBits(mask.bits, 2, 2)]).toEqual([1, 1, 0, 1]);
    const sig = (x: number) => 1 / (1 + Math.exp(-x));
    expect(mask.meanProbability).toBeCloseTo((sig(2) + sig(1) + sig(3)) / 3, 6);
    expect(encodeMask(logits, W, 0, 0, 256, 10, 0.5)).toMatchObject({ width: 0, height: 0, meanProbability: 0 });
  });
});

const bundle = testBundle();
if (bundle.skipReason) console.warn(`decoder.test: ${bundle.skipReason}`);

describe.skipIf(!bundle.manifest)('Decoder service', () => {
  const manifest = bundle.manifest as Manifest;
  const S = manifest.inputSize;
  const W = manifest.refinement.window;
  let running: RunningDecoder;
  let client: stagesProto.DecoderClient;
  let features: stagesProto.Tensor;
  let pixels: stagesProto.Tensor;
  let digest: string;

  const prepare = (d = digest) => unary(client, client.prepare, { digest: d, features, pixels, modelVersion: manifest.version });
  const decode = (prompts: stagesProto.PromptPoints[], d = digest) =>
    unary(client, client.decode, { digest: d, prompts, modelVersion: manifest.version }, { timeoutMs: 30_000 });

  beforeAll(async () => {
    // Real encoder features of a synthetic tile, computed with the bundle's encoder graph.
    const rgb = syntheticTileRgb(S, 7);
    const normalized = normalizeTile(rgb, manifest);
    digest = digestTile(rgb, manifest.version);
    pixels = tensorToProto([3, S, S], normalized);
    const encoder = await OnnxWorkerPool.create({ graphs: { encoder: manifest.graphs.encoder!.path } });
    const out = await encoder.run('encoder', { image: { type: 'float32', dims: [1, 3, S, S], data: normalized.slice() } });
    await encoder.close();
    features = tensorToProto(manifest.featureShape, out.features.data as Float32Array);

    running = await startDecoder({
      port: 0,
      host: '127.0.0.1',
      bundle: manifest.dir,
      maxBatch: 4,
      maxPromptsPerRequest: 8,
      maxPointsPerPrompt: 4,
      acceptUnverifiedInput: true,
    });
    client = makeClient(stagesProto.DecoderClient, running.server.address);
  });
  afterAll(async () => {
    client?.close();
    await running?.server.shutdown();
  });

  it('answers FAILED_PRECONDITION "not prepared" for an unknown digest', async () => {
    const err = await decode([{ coords: [10, 10], labels: [1] }]).catch((e) => e);
    expect(err).toMatchObject({ code: status.FAILED_PRECONDITION, details: expect.stringContaining('not prepared') });
    expect(isNotPreparedError(err)).toBe(true);
  });

  it('prepares once per digest, also under concurrent Prepares', async () => {
    const [a, b] = await Promise.all([prepare(), prepare()]);
    expect([a.alreadyPrepared, b.alreadyPrepared].sort()).toEqual([false, true]);
    expect(running.pipeline.preparations).toBe(1);
    expect((await prepare()).alreadyPrepared).toBe(true);
    expect(running.pipeline.preparations).toBe(1);
  });

  const prompts: stagesProto.PromptPoints[] = [
    { coords: [128.5, 100.5], labels: [1] },
    { coords: [30, 40, 34, 44], labels: [1, 0] }, // positive + negative
    { coords: [200, 200, 230, 236], labels: [2, 3] }, // box
    { coords: [0, 0], labels: [1] }, // corner of the tile
    { coords: [256, 256, 250, 250, 240, 245], labels: [1, 1, 0] },
    { coords: [64, 190], labels: [1] },
  ];

  it('decodes a prompt batch into masks that match the graph output', async () => {
    const response = await decode(prompts);
    expect(response.masks).toHaveLength(prompts.length);
    for (const m of response.masks) {
      expect(m.bits.length).toBe(Math.ceil((m.width * m.height) / 8));
      expect(m.x0).toBeGreaterThanOrEqual(0);
      expect(m.y0).toBeGreaterThanOrEqual(0);
      expect(m.x0 + m.width).toBeLessThanOrEqual(S);
      expect(m.y0 + m.height).toBeLessThanOrEqual(S);
      expect(Number.isFinite(m.predictedIou)).toBe(true);
      expect(m.meanProbability).toBeGreaterThanOrEqual(0);
      expect(m.meanProbability).toBeLessThanOrEqual(1);
    }

    // Reference: run decoder_prompts directly on the prepared state, one prompt at a time (no
    // padding, no batching), and rebuild the full-frame mask from its logits.
    const prepared = running.pipeline.cache.peek(digest)!;
    for (const [i, p] of prompts.entries()) {
      const n = p.labels.length;
      const out = await running.pool.run('decoder_prompts', {
        image_embedding: prepared.imageEmbedding,
        semantic: prepared.semantic,
        boundary_features: prepared.boundaryFeatures,
        point_coords: { type: 'float32', dims: [1, n, 2], data: Float32Array.from(p.coords) },
        point_labels: { type: 'float32', dims: [1, n], data: Float32Array.from(p.labels) },
      });
      const logits = out.mask_logits.data as Float32Array;
      const [ox, oy] = [Number(out.window_origin.data[0]), Number(out.window_origin.data[1])];
      const expected = new Uint8Array(S * S);
      for (let r = 0; r < W; r++) {
        for (let c = 0; c < W; c++) {
          if (logits[r * W + c] > manifest.maskThreshold && oy + r < S && ox + c < S) expected[(oy + r) * S + ox + c] = 1;
        }
      }
      const m = response.masks[i];
      const actual = new Uint8Array(S * S);
      const bits = unpackBits(m.bits, m.width, m.height);
      for (let r = 0; r < m.height; r++) for (let c = 0; c < m.width; c++) actual[(m.y0 + r) * S + m.x0 + c] = bits[r * m.width + c];
      let differing = 0;
      for (let k = 0; k < S * S; k++) if (actual[k] !== expected[k]) differing++;
      // Padding with label -1 and batching may move logits that sit right at the threshold.
      expect(differing, `prompt ${i}: pixels differing from the unbatched graph output`).toBeLessThanOrEqual(2);
      expect(m.predictedIou).toBeCloseTo((out.iou_predictions.data as Float32Array)[0], 3);
    }
  });

  it('batches prompts by point count, up to maxBatch, independently of their neighbours', async () => {
    const single = Array.from({ length: 6 }, (_, i) => ({ coords: [20 + 30 * i, 40], labels: [1] }));
    const { runs } = await running.pipeline.decode({ digest, prompts: [...single, prompts[1]], modelVersion: '' });
    expect(runs.sort()).toEqual([1, 2, 4]); // six 1-point prompts in runs of 4 and 2, one 2-point prompt
    const alone = await decode([prompts[1]]);
    const mixed = await decode([prompts[0], prompts[1], prompts[4]]);
    expect(mixed.masks[1]).toMatchObject({ x0: alone.masks[0].x0, y0: alone.masks[0].y0, width: alone.masks[0].width });
    expect(mixed.masks[1].predictedIou).toBeCloseTo(alone.masks[0].predictedIou, 4);
  });

  it('answers bad prompts with INVALID_ARGUMENT naming the limit or the problem', async () => {
    const bad = async (p: stagesProto.PromptPoints[], pattern: RegExp) =>
      expect(decode(p)).rejects.toMatchObject({ code: status.INVALID_ARGUMENT, details: expect.stringMatching(pattern) });
    await bad([{ coords: [300, 10], labels: [1] }], /prompts\[0\] point 0 \(300, 10\) is outside the 256x256 tile/);
    await bad([{ coords: [10, 10], labels: [5] }], /prompts\[0\]\.labels\[0\] is 5/);
    await bad([{ coords: [10, 10, 20], labels: [1, 1] }], /3 coords for 2 labels/);
    await bad([{ coords: [10, 10], labels: [0] }], /needs a positive point or a box/);
    await bad([{ coords: [1, 1, 2, 2], labels: [2, 2] }], /a box is one top-left/);
    await bad(
      Array.from({ length: 9 }, () => ({ coords: [10, 10], labels: [1] })),
      /9 prompts exceed the limit of 8 per request/,
    );
    await bad([{ coords: Array(10).fill(5), labels: [1, 1, 1, 1, 1] }], /5 points exceed the limit of 4 per prompt/);
    await bad([], /at least one prompt/);
    await expect(decode([{ coords: [1, 1], labels: [1] }], 'nothex')).rejects.toMatchObject({ code: status.INVALID_ARGUMENT });
    await expect(unary(client, client.prepare, { digest, features: pixels, pixels, modelVersion: '' })).rejects.toMatchObject({
      code: status.INVALID_ARGUMENT,
      details: expect.stringMatching(/^features: expected dims/),
    });
  });
  it('by default refuses features and float pixels it cannot check against the digest (no poisoning)', async () => {
    const strict = new DecoderPipeline(manifest, running.pool);
    const rgb = syntheticTileRgb(S, 7);
    const victim = digestTile(syntheticTileRgb(S, 8), manifest.version);
    // Genuine RGB with made-up features: the features cannot be verified, so nothing is prepared.
    await expect(strict.prepare({ digest, rgb, features, modelVersion: manifest.version })).rejects.toMatchObject({
      code: status.INVALID_ARGUMENT,
      details: expect.stringMatching(/^prepare: features sent by the caller cannot be checked/),
    });
    // Float pixels under another tile's digest.
    await expect(strict.prepare({ digest: victim, pixels, modelVersion: manifest.version })).rejects.toMatchObject({
      code: status.INVALID_ARGUMENT,
      details: expect.stringMatching(/^prepare: pixels sent by the caller cannot be checked/),
    });
    expect(strict.cache.has(digest) || strict.cache.has(victim)).toBe(false);
  });
});
