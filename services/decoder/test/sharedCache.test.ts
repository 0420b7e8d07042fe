// Prepare from the shared feature tier, with a real nats-server (JetStream) and models/tiny over
// real gRPC: features written to the tier (as the encoder writes them, computed here with the
// bundle's encoder graph) let a Prepare carry only the digest and pixels; absent features are
// FAILED_PRECONDITION with reason FEATURES_MISSING; a decoder without the tier says what is missing.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeClient, stagesProto, status, unary } from '@cfrsam/rpc';
import { digestTile, type Manifest, tensorToProto } from '@cfrsam/contract';
import { featureKey, float32Bytes, OnnxWorkerPool, SharedFeatureStore } from '@cfrsam/runtime';
import { natsSkipReason, startTestNatsServer, type TestNatsServer } from '@cfrsam/testing';
import { normalizeTile, syntheticTileRgb, testBundle } from '@cfrsam/testing';
import { DecoderPipeline } from '../src/pipeline';
import { startDecoder, type RunningDecoder } from '../src/server';

const bundle = testBundle();
const skipReason = bundle.skipReason ?? natsSkipReason();
if (skipReason) console.warn(`decoder sharedCache.test: ${skipReason}`);

describe.skipIf(skipReason !== null)('Decoder Prepare from the shared feature tier (NATS JetStream)', () => {
  const manifest = bundle.manifest as Manifest;
  const S = manifest.inputSize;
  let nats: TestNatsServer;
  let writer: SharedFeatureStore;
  let running: RunningDecoder;
  let client: stagesProto.DecoderClient;
  let digest: string;
  let pixels: stagesProto.Tensor;
  let features: Float32Array;

  const prepare = (request: Partial<stagesProto.PrepareRequest>) =>
    unary(client, client.prepare, { digest, pixels, modelVersion: manifest.version, ...request } as stagesProto.PrepareRequest, {
      timeoutMs: 30_000,
    });

  beforeAll(async () => {
    nats = await startTestNatsServer();
    const rgb = syntheticTileRgb(S, 21);
    const normalized = normalizeTile(rgb, manifest);
    digest = digestTile(rgb, manifest.version);
    pixels = tensorToProto([3, S, S], normalized);
    const encoder = await OnnxWorkerPool.create({ graphs: { encoder: manifest.graphs.encoder!.path } });
    const out = await encoder.run('encoder', { image: { type: 'float32', dims: [1, 3, S, S], data: normalized.slice() } });
    await encoder.close();
    features = out.features.data as Float32Array;

    // The encoder's side: its features under <model version>.<digest>.
    writer = SharedFeatureStore.open({ url: nats.url, maxBytes: 64 << 20, ttlMs: 600_000, name: 'test-writer', log: () => undefined });
    expect(await writer.ready()).toBe(true);
    expect(await writer.put(featureKey(manifest.version, digest), float32Bytes(features))).toBe(true);

    const sharedStore = SharedFeatureStore.open({ url: nats.url, maxBytes: 64 << 20, ttlMs: 600_000, name: 'decoder', log: () => undefined });
    expect(await sharedStore.ready()).toBe(true);
    running = await startDecoder({ port: 0, host: '127.0.0.1', bundle: manifest.dir, sharedStore, acceptUnverifiedInput: true });
    client = makeClient(stagesProto.DecoderClient, running.server.address);
  });
  afterAll(async () => {
    client?.close();
    await running?.server.shutdown();
    await writer?.close();
    await nats?.dispose();
  });

  it('prepares from the digest and pixels alone, with the features the tier holds', async () => {
    expect(await prepare({})).toEqual({ alreadyPrepared: false });
    expect(running.pipeline.preparations).toBe(1);
    expect(running.pipeline.sharedStore!.stats()).toMatchObject({ hits: 1, misses: 0, errors: 0 });

    // The prepared state is decoder_image's output for exactly those features.
    const reference = await running.pool.run('decoder_image', {
      features: { type: 'float32', dims: [1, ...manifest.featureShape], data: features },
      image: { type: 'float32', dims: [1, 3, S, S], data: normalizeTile(syntheticTileRgb(S, 21), manifest) },
    });
    const prepared = running.pipeline.cache.peek(digest)!;
    expect(Buffer.compare(float32Bytes(prepared.imageEmbedding.data), float32Bytes(reference.image_embedding.data as Float32Array))).toBe(0);

    const decoded = await unary(client, client.decode, { digest, prompts: [{ coords: [128, 128], labels: [1] }], modelVersion: manifest.version });
    expect(decoded.masks).toHaveLength(1);
    // Prepared already: answered without reading the tier again.
    expect(await prepare({ features: undefined })).toEqual({ alreadyPrepared: true });
    expect(running.pipeline.sharedStore!.stats().hits).toBe(1);
  });

  it('answers FAILED_PRECONDITION (FEATURES_MISSING) for features the tier does not hold', async () => {
    await expect(prepare({ digest: 'c'.repeat(64) })).rejects.toMatchObject({
      code: status.FAILED_PRECONDITION,
      details: expect.stringMatching(
        new RegExp(`features of digest ${'c'.repeat(64)} are in no source this decoder can read \\(shared tier: absent\\)`),
      ),
    });
    expect(running.pipeline.preparations).toBe(1);
  });

  it('without the tier, names the missing features as INVALID_ARGUMENT', async () => {
    const withoutTier = new DecoderPipeline(manifest, running.pool, { acceptUnverifiedInput: true });
    await expect(withoutTier.prepare({ digest, pixels, modelVersion: manifest.version })).rejects.toMatchObject({
      code: status.INVALID_ARGUMENT,
      details: expect.stringMatching(/^features: missing .*no feature source/),
    });
  });
});
