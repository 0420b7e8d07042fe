// The encoder's shared feature tier with a real nats-server (JetStream) and two encoder replicas,
// each with its own LRU and its own NATS connection, over real gRPC with models/tiny: features one
// replica computed are served by the other without recomputation (also to digest-only Encodes),
// and with the tier gone Encode still succeeds by computing.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeClient, stagesProto, status, unary } from '@cfrsam/rpc';
import { digestTile, type Manifest } from '@cfrsam/contract';
import { SharedFeatureStore } from '@cfrsam/runtime';
import { natsSkipReason, startTestNatsServer, type TestNatsServer } from '@cfrsam/testing';
import { syntheticTileRgb, testBundle } from '@cfrsam/testing';
import { startEncoder, type RunningEncoder } from '../src/server';

const bundle = testBundle();
const skipReason = bundle.skipReason ?? natsSkipReason();
if (skipReason) console.warn(`encoder sharedCache.test: ${skipReason}`);

describe.skipIf(skipReason !== null)('Encoder shared feature tier (NATS JetStream)', () => {
  const manifest = bundle.manifest as Manifest;
  const S = manifest.inputSize;
  let nats: TestNatsServer;
  const replicas: Array<{ running: RunningEncoder; client: stagesProto.EncoderClient }> = [];
  const tile = (seed: number) => {
    const rgb = syntheticTileRgb(S, seed);
    return { digest: digestTile(rgb, manifest.version), rgb };
  };
  const encode = (replica: number, tiles: stagesProto.TileInput[]) =>
    unary(
      replicas[replica].client,
      replicas[replica].client.encode,
      { tiles, modelVersion: manifest.version, returnFeatures: true },
      { timeoutMs: 30_000 },
    );
  const stats = (replica: number) => unary(replicas[replica].client, replicas[replica].client.getCacheStats, {});
  /** Waits until replica's background writes reached `count`. */
  const writesReach = async (replica: number, count: number) => {
    const deadline = Date.now() + 10_000;
    while ((await stats(replica)).sharedWrites < count) {
      if (Date.now() > deadline) throw new Error(`replica ${replica}: shared writes did not reach ${count}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  };

  beforeAll(async () => {
    nats = await startTestNatsServer();
    for (const name of ['encoder-a', 'encoder-b']) {
      const sharedStore = SharedFeatureStore.open({
        url: nats.url,
        maxBytes: 64 << 20,
        ttlMs: 600_000,
        timeoutMs: 2_000,
        name,
        log: () => undefined,
      });
      expect(await sharedStore.ready()).toBe(true);
      const running = await startEncoder({ port: 0, host: '127.0.0.1', bundle: manifest.dir, cacheBytes: 16 << 20, sharedStore });
      replicas.push({ running, client: makeClient(stagesProto.EncoderClient, running.server.address) });
    }
  });
  afterAll(async () => {
    for (const r of replicas) {
      r.client.close();
      await r.running.server.shutdown();
    }
    await nats?.dispose();
  });

  it('serves features computed by one replica from another without recomputing them', async () => {
    const t = tile(11);
    const computed = await encode(0, [t]);
    expect(computed.tiles[0].cacheHit).toBe(false);
    await writesReach(0, 1);
    expect(await stats(0)).toMatchObject({ computations: 1, sharedMisses: 1, sharedWrites: 1 });

    const served = await encode(1, [t]);
    expect(served.tiles[0]).toMatchObject({ digest: t.digest, cacheHit: true });
    expect(Buffer.compare(served.tiles[0].features!.data, computed.tiles[0].features!.data)).toBe(0);
    expect(await stats(1)).toMatchObject({ computations: 0, sharedHits: 1, sharedMisses: 0, sharedErrors: 0, entries: 1 });
    // Now in replica B's LRU: the next Encode is a local hit, with no shared lookup.
    expect((await encode(1, [{ digest: t.digest }])).tiles[0].cacheHit).toBe(true);
    expect(await stats(1)).toMatchObject({ hits: 1, sharedHits: 1 });
  });

  it('serves a digest-only Encode from the shared tier, and NOT_FOUND when no tier has it', async () => {
    const t = tile(12);
    const computed = await encode(0, [t]);
    await writesReach(0, 2);
    const byDigest = await encode(1, [{ digest: t.digest }]);
    expect(byDigest.tiles[0].cacheHit).toBe(true);
    expect(Buffer.compare(byDigest.tiles[0].features!.data, computed.tiles[0].features!.data)).toBe(0);
    expect(await stats(1)).toMatchObject({ computations: 0, sharedHits: 2 });
    await expect(encode(1, [{ digest: 'e'.repeat(64) }])).rejects.toMatchObject({
      code: status.NOT_FOUND,
      details: expect.stringMatching(/not cached here or in the shared feature cache .*send the pixels/),
    });
  });

  it('computes when the shared tier is down', async () => {
    await nats.stop();
    const t = tile(13);
    const response = await encode(1, [t]);
    expect(response.tiles[0]).toMatchObject({ digest: t.digest, cacheHit: false });
    expect(response.tiles[0].features!.dims).toEqual(manifest.featureShape);
    const after = await stats(1);
    expect(after.computations).toBe(1);
    expect(after.sharedErrors).toBeGreaterThanOrEqual(1);
  });
});
