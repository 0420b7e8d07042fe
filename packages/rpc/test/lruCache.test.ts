import { describe, expect, it } from 'vitest';
import { ByteLruCache } from '@cfrsam/rpc';

const bytesCache = (capacity: number) => new ByteLruCache<Uint8Array>({ capacityBytes: capacity, sizeOf: (v) => v.byteLength });

describe('ByteLruCache', () => {
  it('evicts least recently used entries to stay within its byte capacity', () => {
    const evicted: string[] = [];
    const cache = new ByteLruCache<Uint8Array>({ capacityBytes: 100, sizeOf: (v) => v.byteLength, onEvict: (k) => evicted.push(k) });
    cache.set('a', new Uint8Array(40));
    cache.set('b', new Uint8Array(40));
    expect(cache.get('a')).toBeDefined(); // a is now more recent than b
    cache.set('c', new Uint8Array(40));
    expect(evicted).toEqual(['b']);
    expect(cache.has('a') && cache.has('c')).toBe(true);
    expect(cache.stats()).toMatchObject({ entries: 2, bytes: 80, evictions: 1, hits: 1 });
    expect(cache.set('huge', new Uint8Array(101))).toBe(false); // larger than the cache: not stored
    expect(cache.stats().entries).toBe(2);
    cache.set('a', new Uint8Array(10)); // replacement re-accounts bytes
    expect(cache.stats().bytes).toBe(50);
  });

  it('wakes a reader waiting for a key once it is stored or starts computing, and times out otherwise', async () => {
    const cache = bytesCache(1000);
    cache.set('here', new Uint8Array(1));
    expect(await cache.untilPresent('here', 0)).toBe(true);
    expect(await cache.untilPresent('absent', 0)).toBe(false);

    // A computation that starts while a reader waits: the reader wakes before it ends and joins it.
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const waiting = cache.untilPresent('tile', 5_000);
    const computing = cache.getOrCompute('tile', async () => {
      await gate;
      return new Uint8Array(7);
    });
    expect(await waiting).toBe(true);
    const joined = cache.getOrCompute('tile', async () => new Uint8Array(99));
    release();
    expect((await computing).value.byteLength).toBe(7);
    expect(await joined).toMatchObject({ source: 'coalesced' });

    // Two readers of a key that is set later; a third of a key that never comes times out.
    const both = Promise.all([cache.untilPresent('later', 5_000), cache.untilPresent('later', 5_000)]);
    const never = cache.untilPresent('never', 20);
    cache.set('later', new Uint8Array(2));
    expect(await both).toEqual([true, true]);
    const started = performance.now();
    expect(await never).toBe(false);
    expect(performance.now() - started).toBeLessThan(2_000);
  });

  it('computes a key once for concurrent requests (single-flight)', async () => {
    const cache = bytesCache(1000);
    let computations = 0;
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const compute = async () => {
      computations++;
      await gate;
      return new Uint8Array(10);
    };
    const first = cache.getOrCompute('k', compute);
    const second = cache.getOrCompute('k', compute);
    release();
    const [a, b] = await Promise.all([first, second]);
    expect(computations).toBe(1);
    expect(a.source).toBe('computed');
    expect(b.source).toBe('coalesced');
    expect(a.value).toBe(b.value);
    expect((await cache.getOrCompute('k', compute)).source).toBe('hit');
    expect(cache.stats()).toMatchObject({ hits: 1, misses: 1, coalesced: 1, computations: 1, entries: 1 });
  });

  it('does not cache failures and passes them to every waiter', async () => {
    const cache = bytesCache(1000);
    const failing = async (): Promise<Uint8Array> => {
      await new Promise((r) => setTimeout(r, 5));
      throw new Error('boom');
    };
    const results = await Promise.allSettled([cache.getOrCompute('k', failing), cache.getOrCompute('k', failing)]);
    expect(results.map((r) => r.status)).toEqual(['rejected', 'rejected']);
    expect(cache.has('k')).toBe(false);
    const ok = await cache.getOrCompute('k', async () => new Uint8Array(1));
    expect(ok.source).toBe('computed');
  });

  it('batches all misses of a request into one computation', async () => {
    const cache = bytesCache(1000);
    cache.set('hit', new Uint8Array(1));
    const calls: string[][] = [];
    const results = await cache.getOrComputeMany(['hit', 'x', 'y', 'x'], async (missing) => {
      calls.push(missing);
      return new Map(missing.map((k) => [k, new Uint8Array(2)]));
    });
    expect(calls).toEqual([['x', 'y']]);
    expect(results.map((r) => r.source)).toEqual(['hit', 'computed', 'computed', 'computed']);
    expect(results[1].value).toBe(results[3].value);
  });
});
