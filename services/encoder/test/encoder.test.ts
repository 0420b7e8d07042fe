// Encoder over real gRPC on loopback with models/tiny: caching, single-flight, batching, NOT_FOUND
// for digest-only tiles, bad input, and a graceful shutdown that drains an in-flight call.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { inFlightCalls, makeClient, stagesProto, status, unary } from '@cfrsam/rpc';
import { digestTile, type Manifest, tensorToProto } from '@cfrsam/contract';
import { syntheticTileRgb, testBundle, tilePixelsTensor } from '@cfrsam/testing';
import { startEncoder, type RunningEncoder } from '../src/server';

const bundle = testBundle();
if (bundle.skipReason) console.warn(`encoder.test: ${bundle.skipReason}`);

describe.skipIf(!bundle.manifest)('Encoder service', () => {
  const manifest = bundle.manifest as Manifest;
  const S = manifest.inputSize;
  let running: RunningEncoder;
  let client: stagesProto.EncoderClient;
  const tile = (seed: number) => {
    const rgb = syntheticTileRgb(S, seed);
    return { digest: digestTile(rgb, manifest.version), rgb };
  };
  const encode = (tiles: stagesProto.TileInput[], modelVersion = manifest.version) =>
    unary(client, client.encode, { tiles, modelVersion, returnFeatures: true }, { timeoutMs: 30_000 });
  const stats = () => unary(client, client.getCacheStats, {});

  beforeAll(async () => {
    running = await startEncoder({ port: 0, host: '127.0.0.1', bundle: manifest.dir, maxBatch: 2, cacheBytes: 64 << 20 });
    client = makeClient(stagesProto.EncoderClient, running.server.address);
  });
  afterAll(async () => {
    client?.close();
    await running?.server.shutdown();
  });

  it('computes features on a miss and serves the second Encode from the cache', async () => {
    const t = tile(1);
    const first = await encode([t]);
    expect(first.tiles[0]).toMatchObject({ digest: t.digest, cacheHit: false });
    expect(first.tiles[0].features!.dims).toEqual(manifest.featureShape);
    expect(first.tiles[0].features!.data.byteLength).toBe(manifest.featureShape.reduce((a, b) => a * b, 4));
    const second = await encode([t]);
    expect(second.tiles[0].cacheHit).toBe(true);
    expect(Buffer.compare(second.tiles[0].features!.data, first.tiles[0].features!.data)).toBe(0);
    // Digest alone is enough once cached.
    const byDigest = await encode([{ digest: t.digest }]);
    expect(byDigest.tiles[0].cacheHit).toBe(true);
    expect(await stats()).toMatchObject({ hits: 2, misses: 1, entries: 1, computations: 1, capacityBytes: 64 << 20 });
  });

  it('computes a digest once for concurrent Encodes (single-flight)', async () => {
    const t = tile(2);
    const before = await stats();
    const [a, b] = await Promise.all([encode([t]), encode([t])]);
    const after = await stats();
    expect(after.computations - before.computations).toBe(1);
    expect(after.coalesced - before.coalesced).toBe(1);
    expect(Buffer.compare(a.tiles[0].features!.data, b.tiles[0].features!.data)).toBe(0);
  });

  it('runs the misses of one request in batches of at most maxBatch', async () => {
    const before = await stats();
    const response = await encode([tile(3), tile(4), tile(5), tile(1)]);
    const after = await stats();
    expect(response.tiles.map((t) => t.cacheHit)).toEqual([false, false, false, true]);
    expect(after.computations - before.computations).toBe(2); // 3 misses, max batch 2
    // Each tile of a batch is cached under its own digest, with its own features.
    const cached = await unary(client, client.encode, { tiles: [{ digest: tile(4).digest }], modelVersion: '', returnFeatures: true });
    expect(Buffer.compare(cached.tiles[0].features!.data, response.tiles[1].features!.data)).toBe(0);
    expect(Buffer.compare(response.tiles[0].features!.data, response.tiles[1].features!.data)).not.toBe(0);
  });

  it("keeps float pixels sent under another tile's digest out of that digest's cache entry (no poisoning)", async () => {
    const victim = tile(21);
    const planted = tilePixelsTensor(syntheticTileRgb(S, 22), manifest);
    // The attacker's pixels under the victim's digest: computed for the caller, cached by the
    // pixels' own hash only.
    const attack = await encode([{ digest: victim.digest, pixels: planted }]);
    expect(attack.tiles[0].digest).toBe(victim.digest);
    await expect(encode([{ digest: victim.digest }])).rejects.toMatchObject({ code: status.NOT_FOUND });
    // The victim's own tile gets its own features, not the planted ones.
    const honest = await encode([victim]);
    expect(honest.tiles[0].cacheHit).toBe(false);
    expect(Buffer.compare(honest.tiles[0].features!.data, attack.tiles[0].features!.data)).not.toBe(0);
    const own = await encode([{ digest: victim.digest, pixels: tilePixelsTensor(syntheticTileRgb(S, 21), manifest) }]);
    expect(Buffer.compare(honest.tiles[0].features!.data, own.tiles[0].features!.data)).toBe(0);
    // RGB that is not the digest's is refused outright.
    await expect(encode([{ digest: victim.digest, rgb: tile(22).rgb }])).rejects.toMatchObject({
      code: status.INVALID_ARGUMENT,
      details: expect.stringMatching(/is not the digest of its RGB bytes/),
    });
  });

  it('answers NOT_FOUND for an uncached digest without pixels', async () => {
    await expect(encode([{ digest: 'f'.repeat(64) }])).rejects.toMatchObject({
      code: status.NOT_FOUND,
      details: expect.stringMatching(/not cached .*send the pixels/),
    });
  });

  it('holds a digest-only Encode with wait_ms until its tile arrives, then answers with its features', async () => {
    const t = tile(31);
    const before = await stats();
    // The decoder's fetch comes first; the tile's own Encode (the gateway's) 100 ms later.
    const early = unary(client, client.encode, { tiles: [{ digest: t.digest }], modelVersion: '', returnFeatures: true, waitMs: 5_000 });
    await new Promise((r) => setTimeout(r, 100));
    const own = await encode([t]);
    const fetched = await early;
    expect(Buffer.compare(fetched.tiles[0].features!.data, own.tiles[0].features!.data)).toBe(0);
    expect((await stats()).computations - before.computations).toBe(1);
    // A tile that never comes: NOT_FOUND once the wait is over.
    const started = performance.now();
    await expect(
      unary(client, client.encode, { tiles: [{ digest: 'e'.repeat(64) }], modelVersion: '', returnFeatures: true, waitMs: 150 }),
    ).rejects.toMatchObject({ code: status.NOT_FOUND });
    expect(performance.now() - started).toBeGreaterThanOrEqual(140);
  });

  it('answers bad input with INVALID_ARGUMENT naming the problem', async () => {
    const t = tile(1);
    await expect(encode([{ digest: 'abc', rgb: t.rgb }])).rejects.toMatchObject({
      code: status.INVALID_ARGUMENT,
      details: expect.stringMatching(/tiles\[0\]\.digest must be a SHA-256/),
    });
    await expect(encode([{ digest: tile(9).digest, pixels: tensorToProto([3, S], new Float32Array(3 * S)) }])).rejects.toMatchObject({
      code: status.INVALID_ARGUMENT,
      details: `tiles[0].pixels: expected dims [3,${S},${S}], got [3,${S}]`,
    });
    await expect(encode([t], 'some-other-model')).rejects.toMatchObject({
      code: status.INVALID_ARGUMENT,
      details: expect.stringMatching(/model_version/),
    });
    await expect(encode([])).rejects.toMatchObject({ code: status.INVALID_ARGUMENT });
  });

  it('drains an in-flight Encode on shutdown', async () => {
    const t = tile(6);
    const inFlight = encode([t]);
    while (inFlightCalls() === 0) await new Promise((r) => setTimeout(r, 2));
    const stopped = running.server.shutdown('test');
    const response = await inFlight;
    expect(response.tiles[0]).toMatchObject({ digest: t.digest, cacheHit: false });
    await stopped;
    const err = await encode([t]).catch((e) => e);
    expect([status.UNAVAILABLE, status.DEADLINE_EXCEEDED]).toContain(err.code);
  });
});
