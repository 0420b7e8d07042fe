// A least-recently-used cache bounded in bytes, with single-flight computation: concurrent
// requests for a key that is being computed wait for that computation instead of repeating it.
// The encoder keys features by tile digest with it, the decoder its prepared state. A reader that
// may come before the writer (a decoder fetching a tile's features while the tile is still on its
// way to the encoder) can wait for a key to appear (untilPresent).

export interface ByteLruCacheOptions<V> {
  /** Upper bound of the sum of sizeOf over the entries. */
  capacityBytes: number;
  /** Bytes an entry accounts for. */
  sizeOf: (value: V) => number;
  /** Called when an entry is evicted to make room (not on delete or replacement). */
  onEvict?: (key: string, value: V) => void;
}

export interface ByteLruCacheStats {
  hits: number;
  misses: number;
  /** Lookups that joined a computation already in flight. */
  coalesced: number;
  evictions: number;
  entries: number;
  bytes: number;
  capacityBytes: number;
  /** Calls of a compute function (one per getOrCompute miss, one per getOrComputeMany batch). */
  computations: number;
}

/** How a value was obtained. */
export type CacheSource = 'hit' | 'coalesced' | 'computed';

export interface CacheResult<V> {
  value: V;
  source: CacheSource;
}

interface Entry<V> {
  value: V;
  bytes: number;
}

export class ByteLruCache<V> {
  // A Map iterates in insertion order: re-inserting on access makes the first key the LRU one.
  private readonly entries = new Map<string, Entry<V>>();
  private readonly inFlight = new Map<string, Promise<V>>();
  /** Callbacks of untilPresent, by key: called once the key is stored or starts computing. */
  private readonly arrivals = new Map<string, Set<() => void>>();
  private bytes = 0;
  private readonly counters = { hits: 0, misses: 0, coalesced: 0, evictions: 0, computations: 0 };

  constructor(private readonly options: ByteLruCacheOptions<V>) {
    if (!(options.capacityBytes >= 0)) throw new Error(`ByteLruCache: capacityBytes must be >= 0, got ${options.capacityBytes}`);
  }

  get capacityBytes(): number {
    return this.options.capacityBytes;
  }

  /** The value, marking it most recently used; does not count as a hit or miss. */
  peek(key: string): V | undefined {
    return this.entries.get(key)?.value;
  }

  /** The value (a hit, refreshed to most recently used) or undefined (a miss). */
  get(key: string): V | undefined {
    const entry = this.entries.get(key);
    if (!entry) {
      this.counters.misses++;
      return undefined;
    }
    this.counters.hits++;
    this.entries.delete(key);
    this.entries.set(key, entry);
    return entry.value;
  }

  has(key: string): boolean {
    return this.entries.has(key);
  }

  /** The in-flight computation of `key` started by getOrCompute(Many), if any. */
  pending(key: string): Promise<V> | undefined {
    return this.inFlight.get(key);
  }

  /**
   * Stores a value, evicting least recently used entries until it fits. A value larger than the
   * whole capacity is not stored (returns false): it would evict everything and then itself.
   */
  set(key: string, value: V): boolean {
    const bytes = this.options.sizeOf(value);
    this.delete(key);
    if (bytes > this.options.capacityBytes) return false;
    while (this.bytes + bytes > this.options.capacityBytes && this.entries.size > 0) {
      const [oldKey, old] = this.entries.entries().next().value as [string, Entry<V>];
      this.entries.delete(oldKey);
      this.bytes -= old.bytes;
      this.counters.evictions++;
      this.options.onEvict?.(oldKey, old.value);
    }
    this.entries.set(key, { value, bytes });
    this.bytes += bytes;
    this.announce(key);
    return true;
  }

  /**
   * Resolves true as soon as `key` is cached or being computed here (at once if it already is),
   * false when `timeoutMs` passes without it. What a reader that may arrive before the writer
   * waits on; it then reads the key as usual (get, pending, getOrCompute).
   */
  untilPresent(key: string, timeoutMs: number): Promise<boolean> {
    if (this.entries.has(key) || this.inFlight.has(key)) return Promise.resolve(true);
    if (!(timeoutMs > 0)) return Promise.resolve(false);
    return new Promise<boolean>((resolve) => {
      let waiters = this.arrivals.get(key);
      if (!waiters) {
        waiters = new Set();
        this.arrivals.set(key, waiters);
      }
      const group = waiters;
      const arrived = () => {
        clearTimeout(timer);
        resolve(true);
      };
      const timer = setTimeout(() => {
        group.delete(arrived);
        if (group.size === 0 && this.arrivals.get(key) === group) this.arrivals.delete(key);
        resolve(false);
      }, timeoutMs);
      group.add(arrived);
    });
  }

  /** Wakes untilPresent's waiters for `key`. */
  private announce(key: string): void {
    const waiters = this.arrivals.get(key);
    if (!waiters) return;
    this.arrivals.delete(key);
    for (const arrived of waiters) arrived();
  }

  delete(key: string): boolean {
    const entry = this.entries.get(key);
    if (!entry) return false;
    this.entries.delete(key);
    this.bytes -= entry.bytes;
    return true;
  }

  clear(): void {
    this.entries.clear();
    this.bytes = 0;
  }

  /**
   * The cached value, or the result of an in-flight computation for the key, or `compute()`
   * (stored on success; a failure is passed to every waiter and not cached).
   */
  async getOrCompute(key: string, compute: () => Promise<V>): Promise<CacheResult<V>> {
    const [result] = await this.getOrComputeMany([key], async () => new Map([[key, await compute()]]));
    return result;
  }

  /**
   * Batched single-flight: for each key, a hit, a join of an in-flight computation, or a miss.
   * All misses go to ONE `computeMany(missingKeys)` call (so a caller can run them as one model
   * batch), which must return a value for every key it was given. Results are in `keys` order.
   * Duplicate keys are computed once. Rejects if any key's computation fails.
   */
  async getOrComputeMany(keys: readonly string[], computeMany: (missing: string[]) => Promise<Map<string, V>>): Promise<CacheResult<V>[]> {
    const plan: Array<{ source: CacheSource; value?: V; promise?: Promise<V> }> = [];
    const missing: string[] = [];
    const settlers = new Map<string, { resolve: (v: V) => void; reject: (e: unknown) => void }>();
    for (const key of keys) {
      const entry = this.entries.get(key);
      if (entry) {
        this.counters.hits++;
        this.entries.delete(key);
        this.entries.set(key, entry);
        plan.push({ source: 'hit', value: entry.value });
        continue;
      }
      const pending = this.inFlight.get(key);
      if (pending) {
        // Joining our own computation started earlier in this call is a duplicate, not a coalesce.
        if (settlers.has(key)) plan.push({ source: 'computed', promise: pending });
        else {
          this.counters.coalesced++;
          plan.push({ source: 'coalesced', promise: pending });
        }
        continue;
      }
      this.counters.misses++;
      missing.push(key);
      const promise = new Promise<V>((resolve, reject) => settlers.set(key, { resolve, reject }));
      // Waiters attach their own handlers; this one keeps an unjoined failure from being "unhandled".
      promise.catch(() => undefined);
      this.inFlight.set(key, promise);
      this.announce(key);
      plan.push({ source: 'computed', promise });
    }
    if (missing.length > 0) {
      this.counters.computations++;
      let computed: Map<string, V> | undefined;
      let failure: unknown;
      try {
        computed = await computeMany(missing);
      } catch (err) {
        failure = err;
      }
      for (const key of missing) {
        const settle = settlers.get(key)!;
        this.inFlight.delete(key);
        if (failure !== undefined || !computed) {
          settle.reject(failure ?? new Error('computation failed'));
          continue;
        }
        if (!computed.has(key)) {
          settle.reject(new Error(`computation returned no value for key ${key}`));
          continue;
        }
        const value = computed.get(key)!;
        this.set(key, value);
        settle.resolve(value);
      }
    }
    const out: CacheResult<V>[] = [];
    for (const p of plan) {
      out.push({ source: p.source, value: p.promise ? await p.promise : p.value! });
    }
    return out;
  }

  stats(): ByteLruCacheStats {
    return {
      ...this.counters,
      entries: this.entries.size,
      bytes: this.bytes,
      capacityBytes: this.options.capacityBytes,
    };
  }
}
