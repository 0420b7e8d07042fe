// The shared feature tier against a real nats-server with JetStream (started here on a free port
// with a temporary store): bucket creation with its limits, round trips of one- and many-chunk
// values, misses for absent, evicted and partial entries, and errors (never exceptions) when the
// server is gone.
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { connect } from 'nats';
import { featureKey, float32Bytes, float32Lookup, SharedFeatureStore, subjectToken } from '../src/featureStore';
import { natsSkipReason, startTestNatsServer, type TestNatsServer } from '@cfrsam/testing';

describe('feature keys', () => {
  it('are subject-safe and keep distinct versions distinct', () => {
    const digest = 'ab'.repeat(32);
    expect(featureKey('tiny-0.1.0', digest)).toBe(`tiny-0_2e1_2e0.${digest}`);
    expect(subjectToken('a.b')).not.toBe(subjectToken('a_b'));
    expect(subjectToken('a b*>')).toMatch(/^[A-Za-z0-9_-]+$/);
    expect(subjectToken('')).toBe('_');
  });
});

const skipReason = natsSkipReason();
if (skipReason) console.warn(`featureStore.test: ${skipReason}`);

describe.skipIf(skipReason !== null)('SharedFeatureStore on nats-server', () => {
  let nats: TestNatsServer;
  let store: SharedFeatureStore;
  const logs: string[] = [];
  const open = (extra: Partial<Parameters<typeof SharedFeatureStore.open>[0]> = {}) =>
    SharedFeatureStore.open({ url: nats.url, maxBytes: 4 << 20, ttlMs: 60_000, timeoutMs: 10_000, log: (m) => logs.push(m), ...extra }); // generous: CI machines are busy
  const values = (n: number, seed: number) => Float32Array.from({ length: n }, (_, i) => Math.sin(i * 0.37 + seed));

  beforeAll(async () => {
    nats = await startTestNatsServer();
    store = open({ maxChunkBytes: 64 * 1024 });
    expect(await store.ready()).toBe(true);
  });
  afterAll(async () => {
    await store?.close();
    await nats?.dispose();
  });

  it('creates the bucket bounded in bytes and age, dropping the oldest entries when full', async () => {
    const nc = await connect({ servers: nats.url });
    try {
      const info = await (await nc.jetstreamManager()).streams.info('cfrsam-features');
      expect(info.config).toMatchObject({
        max_bytes: 4 << 20,
        max_age: 60_000 * 1e6,
        discard: 'old',
        max_msgs_per_subject: 1,
        allow_direct: true,
        storage: 'file',
      });
    } finally {
      await nc.close();
    }
  });

  it('round-trips values of one and of many chunks', async () => {
    const small = values(1000, 1);
    const large = values(100_000, 2); // 400 kB in 64 kB chunks
    expect(await store.put('v.small', float32Bytes(small))).toBe(true);
    expect(await store.put('v.large', float32Bytes(large))).toBe(true);
    const a = float32Lookup(await store.lookup('v.small'), small.length);
    const b = float32Lookup(await store.lookup('v.large'), large.length);
    expect(Buffer.compare(float32Bytes(a.values!), float32Bytes(small))).toBe(0);
    expect(Buffer.compare(float32Bytes(b.values!), float32Bytes(large))).toBe(0);
    // A hit of the wrong size is an error, not a value.
    expect(float32Lookup(await store.lookup('v.small'), 999)).toMatchObject({ values: null, error: expect.stringMatching(/4000 bytes/) });
    expect(await store.lookup('v.absent')).toEqual({ status: 'miss' });
    expect(store.stats()).toMatchObject({ hits: 3, misses: 1, errors: 0, writes: 2 });
  });

  it('with a signing key, takes only entries written with that key (no planting without the secret)', async () => {
    const signed = open({ signingKey: 'the-services-secret' });
    const outsider = open({ signingKey: 'a-guess' });
    try {
      expect(await signed.ready()).toBe(true);
      expect(await outsider.ready()).toBe(true);
      const genuine = values(1000, 7);
      expect(await signed.put('v.signed', float32Bytes(genuine))).toBe(true);
      expect(float32Lookup(await signed.lookup('v.signed'), genuine.length).values).toEqual(genuine);
      // A client with NATS access but another key (or none) overwrites the entry: readers with the
      // key see an error (a miss to the services), never the planted values.
      expect(await outsider.put('v.signed', float32Bytes(values(1000, 8)))).toBe(true);
      expect(await signed.lookup('v.signed')).toMatchObject({ status: 'error', reason: expect.stringMatching(/HMAC/) });
      expect(await store.put('v.unsigned', float32Bytes(genuine))).toBe(true);
      expect(await signed.lookup('v.unsigned')).toMatchObject({ status: 'error' });
    } finally {
      await signed.close();
      await outsider.close();
    }
  });

  it('answers a partially evicted entry as a miss', async () => {
    const value = values(50_000, 3);
    expect(await store.put('v.partial', float32Bytes(value))).toBe(true);
    const nc = await connect({ servers: nats.url });
    try {
      await (await nc.jetstreamManager()).streams.purge('cfrsam-features', { filter: 'cfrsam-features.v.partial.1' });
    } finally {
      await nc.close();
    }
    expect(await store.lookup('v.partial')).toEqual({ status: 'miss' });
  });

  it('drops the oldest entries beyond max bytes', async () => {
    const small = SharedFeatureStore.open({ url: nats.url, bucket: 'evict-test', maxBytes: 1 << 20, ttlMs: 60_000, log: () => undefined });
    try {
      expect(await small.ready()).toBe(true);
      for (let i = 0; i < 5; i++) expect(await small.put(`v.e${i}`, float32Bytes(values(60_000, i)))).toBe(true); // 240 kB each
      expect((await small.lookup('v.e0')).status).toBe('miss');
      expect((await small.lookup('v.e4')).status).toBe('hit');
    } finally {
      await small.close();
    }
  });

  it('answers lookups and writes with errors, not timeouts, when the server is gone', async () => {
    const before = store.stats();
    await nats.stop();
    // A call in flight when the client notices the closed socket is cut then, and later calls fail
    // without going to the network: none of them waits out its (10 s) timeout. The reasons say
    // which happened; the time is printed, not asserted (CI machines are busy).
    const started = performance.now();
    const lookup = await store.lookup('v.small');
    expect(lookup.status).toBe('error');
    expect(lookup.status === 'error' && lookup.reason).toMatch(/not connected|disconnected from the server/);
    expect(await store.put('v.after', float32Bytes(values(10, 4)))).toBe(false);
    console.log(`featureStore.test: a lookup and a write with the server gone took ${(performance.now() - started).toFixed(0)} ms`);
    await vi.waitFor(() => expect(logs.some((m) => /disconnected from/.test(m))).toBe(true), { timeout: 10_000 });
    // Once the disconnect is known, calls fail without going to the network.
    const again = await store.lookup('v.large');
    expect(again).toEqual({ status: 'error', reason: 'not connected' });
    const after = store.stats();
    expect(after.errors - before.errors).toBe(3);
    expect(after.hits).toBe(before.hits);
  });
});
