// The shared tier of the encoder's feature cache, in NATS JetStream: any encoder replica (or a
// restarted one) finds features another replica computed, and a decoder can take a tile's features
// from it instead of receiving them in Prepare. It is an optimisation only: every failure (server
// down, timeout, corrupt or evicted entry) is logged, counted and answered as "not found", so
// callers compute instead and never fail a request because of this tier.
//
// Layout: one JetStream stream (the "bucket", default `cfrsam-features`) with subjects
// `<bucket>.<key>.<chunk>`, where key = `<modelVersion>.<digest>` with the version escaped to
// subject-safe characters. A value larger than a message (the server's max_payload) is split into
// chunks; every chunk carries the chunk count, total size, SHA-256 and a write id in its headers,
// and chunk 0 is published last, so a reader that finds chunk 0 finds a complete write (or detects
// a partial or mixed one by the write id and the hash, and treats it as a miss).
//
// Why a plain stream and not the JetStream Object Store or KV: both create their stream with
// discard=new, so a full bucket refuses every new write until entries age out, the opposite of a
// cache. This stream uses discard=old (the oldest entries are dropped to make room), max_bytes and
// max_age bound it in size and age, and max_msgs_per_subject=1 keeps one version per chunk. The
// Object Store's reader also waits forever for chunks that were evicted under its metadata.
import { createHash, createHmac, randomUUID } from 'node:crypto';
import {
  connect,
  DiscardPolicy,
  Events,
  headers as natsHeaders,
  nanos,
  RetentionPolicy,
  StorageType,
  type JetStreamClient,
  type JetStreamManager,
  type NatsConnection,
  type StoredMsg,
  type StreamConfig,
} from 'nats';
import { ConfigError, type FlagSpec, listFlag, logger } from '@cfrsam/rpc';

export const DEFAULT_FEATURE_BUCKET = 'cfrsam-features';

/** Headers of every chunk message. */
const H_CHUNKS = 'Cfrsam-Chunks';
const H_SIZE = 'Cfrsam-Size';
const H_SHA256 = 'Cfrsam-Sha256';
const H_WRITE = 'Cfrsam-Write';
/** Room left in a message for the headers above when sizing chunks. */
const HEADER_ROOM_BYTES = 4096;

/** Flags of the services that use the shared tier (encoder, decoder): off unless --nats-url is set. */
export function sharedFeatureCacheFlags() {
  return {
    natsUrl: {
      type: 'string',
      env: 'CFRSAM_NATS_URL',
      default: '',
      help: 'NATS server(s) for the shared feature cache, comma separated (e.g. nats://nats:4222); empty: off',
    },
    sharedCacheMb: {
      type: 'int',
      env: 'CFRSAM_SHARED_CACHE_MB',
      default: 4096,
      help: 'size bound of the shared feature cache bucket in MiB (applied when this service creates it)',
    },
    sharedCacheTtlS: {
      type: 'int',
      env: 'CFRSAM_SHARED_CACHE_TTL_S',
      default: 86_400,
      help: 'age bound of shared feature cache entries in seconds (applied when this service creates it)',
    },
    sharedCacheTimeoutMs: {
      type: 'int',
      env: 'CFRSAM_SHARED_CACHE_TIMEOUT_MS',
      default: 1000,
      help: 'timeout of one shared feature cache read or write; a slower tier counts as a miss',
    },
  } satisfies Record<string, FlagSpec>;
}

export interface SharedFeatureStoreOptions {
  /** NATS server URL(s), comma separated ("nats://nats:4222"). */
  url: string;
  /** Stream ("bucket") name, letters, digits, - and _ (default DEFAULT_FEATURE_BUCKET). */
  bucket?: string;
  /** Bucket size bound (stream max_bytes); the oldest entries are dropped beyond it. */
  maxBytes: number;
  /** Entry age bound in ms (stream max_age). */
  ttlMs: number;
  /** Timeout of one lookup or write, in ms (default 1000). */
  timeoutMs?: number;
  /** Upper bound of a chunk in bytes (default: the server's max_payload less header room). */
  maxChunkBytes?: number;
  /** Writes in flight beyond which new writes are dropped (default 32). */
  maxPendingWrites?: number;
  /** Connection name shown by the server's monitoring ("encoder"). */
  name?: string;
  /**
   * The services' shared secret: entries then carry an HMAC-SHA256 of their key and bytes instead
   * of a plain SHA-256, and entries without a valid one are misses, so a client that can reach
   * NATS but lacks the secret cannot plant features under a digest.
   */
  signingKey?: string;
  /** Retry interval of the first connection while the server is unreachable (default 2000 ms). */
  retryMs?: number;
  /** Default: the structured logger of @cfrsam/rpc. */
  log?: (message: string) => void;
}

export type SharedLookup = { status: 'hit'; bytes: Uint8Array } | { status: 'miss' } | { status: 'error'; reason: string };

export interface SharedFeatureStoreStats {
  hits: number;
  misses: number;
  /** Lookups and writes that failed (tier unreachable, timeout, corrupt entry, dropped write). */
  errors: number;
  /** Values written. */
  writes: number;
}

class TimeoutError extends Error {}

/**
 * Direct gets (answered by any server holding the stream, payload as raw bytes) exist on nats.js
 * 2.x's JetStreamManager implementation but not on its public type; the KV reads use them too.
 */
type DirectGets = { direct?: { getMessage(stream: string, query: { last_by_subj: string }): Promise<StoredMsg> } };

/**
 * Settles like `promise`, or rejects after `ms`, or as soon as `cut` is called (the connection
 * dropped: a call in flight would otherwise wait out its whole timeout while the client reconnects).
 */
function bounded<T>(promise: Promise<T>, ms: number, what: string, cuts: Set<() => void>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  let cut: (() => void) | undefined;
  const stop = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new TimeoutError(`${what} timed out after ${ms} ms`)), ms);
    cut = () => reject(new Error(`${what}: disconnected from the server`));
    cuts.add(cut);
  });
  return Promise.race([promise, stop]).finally(() => {
    clearTimeout(timer);
    cuts.delete(cut!);
  });
}

/**
 * Escapes a string into one NATS subject token: letters, digits and '-' stay, every other UTF-8
 * byte becomes `_xx` (so '_' itself is escaped and distinct strings stay distinct).
 */
export function subjectToken(value: string): string {
  let out = '';
  for (const ch of value) {
    if (/^[A-Za-z0-9-]$/.test(ch)) out += ch;
    else for (const byte of Buffer.from(ch, 'utf8')) out += '_' + byte.toString(16).padStart(2, '0');
  }
  return out || '_';
}

/** The shared-tier key of a tile's features: `<modelVersion>.<digest>`, subject-safe. */
export function featureKey(modelVersion: string, digest: string): string {
  return `${subjectToken(modelVersion)}.${subjectToken(digest)}`;
}

/** The bytes of a Float32Array (a view, no copy), as stored in the shared tier. */
export function float32Bytes(values: Float32Array): Uint8Array {
  return new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
}

/**
 * A lookup result as float32 values when it holds exactly `count` of them; a hit of another size
 * (a different feature shape under the same model version) is answered as an error.
 */
export function float32Lookup(lookup: SharedLookup, count: number): { values: Float32Array | null; error?: string } {
  if (lookup.status === 'miss') return { values: null };
  if (lookup.status === 'error') return { values: null, error: lookup.reason };
  if (lookup.bytes.byteLength !== count * 4) {
    return { values: null, error: `entry holds ${lookup.bytes.byteLength} bytes, expected ${count * 4}` };
  }
  // lookup.bytes is a fresh buffer at offset 0 (see readChunks), so the view is aligned.
  return { values: new Float32Array(lookup.bytes.buffer, lookup.bytes.byteOffset, count) };
}

/** The shared feature tier; see the file comment. Construct with SharedFeatureStore.open(). */
export class SharedFeatureStore {
  readonly bucket: string;
  readonly timeoutMs: number;
  private readonly log: (message: string) => void;
  private nc: NatsConnection | null = null;
  private js: JetStreamClient | null = null;
  private jsm: JetStreamManager | null = null;
  /** Connected to a server (false while the client reconnects). */
  private connected = false;
  /** The stream exists, as far as we know. */
  private streamReady = false;
  private lastEnsure = 0;
  private closed = false;
  private ensuring: Promise<void> | null = null;
  private retryTimer: NodeJS.Timeout | null = null;
  private readonly lookups = new Map<string, Promise<SharedLookup>>();
  private readonly writes = new Map<string, Promise<boolean>>();
  private readonly counters: SharedFeatureStoreStats = { hits: 0, misses: 0, errors: 0, writes: 0 };
  private lastErrorLog = 0;
  private suppressedErrors = 0;
  private readyWaiters: Array<() => void> = [];
  /** Rejects each call in flight: run when the client reports a disconnect. */
  private readonly inFlightCuts = new Set<() => void>();

  private constructor(private readonly options: SharedFeatureStoreOptions) {
    this.bucket = options.bucket ?? DEFAULT_FEATURE_BUCKET;
    if (!/^[A-Za-z0-9_-]+$/.test(this.bucket)) {
      throw new Error(`shared feature cache: bucket "${this.bucket}" may only hold letters, digits, - and _`);
    }
    if (!(options.maxBytes > 0)) throw new Error(`shared feature cache: max bytes must be > 0, got ${options.maxBytes}`);
    if (!(options.ttlMs > 0)) throw new Error(`shared feature cache: ttl must be > 0 ms, got ${options.ttlMs}`);
    this.timeoutMs = Math.max(1, options.timeoutMs ?? 1000);
    this.log = options.log ?? ((m) => logger().warn(m));
  }

  /**
   * Starts connecting in the background and returns at once: the service starts and serves
   * whether or not NATS is reachable; lookups are errors (misses to the caller) until it is.
   */
  static open(options: SharedFeatureStoreOptions): SharedFeatureStore {
    const store = new SharedFeatureStore(options);
    void store.connectLoop();
    return store;
  }

  private get servers(): string[] {
    return listFlag(this.options.url);
  }

  private async connectLoop(): Promise<void> {
    while (!this.closed) {
      try {
        const nc = await connect({
          servers: this.servers,
          name: this.options.name ? `cfrsam-${this.options.name}` : 'cfrsam',
          // After the first connection the client reconnects on its own, forever.
          maxReconnectAttempts: -1,
          reconnectTimeWait: 1000,
          timeout: Math.max(2000, this.timeoutMs),
          pingInterval: 30_000,
        });
        if (this.closed) {
          await nc.close();
          return;
        }
        this.nc = nc;
        this.js = nc.jetstream({ timeout: this.timeoutMs });
        this.jsm = await nc.jetstreamManager({ timeout: this.timeoutMs, checkAPI: false });
        this.connected = true;
        this.log(`shared feature cache: connected to ${nc.getServer()} (bucket ${this.bucket})`);
        void this.watchStatus(nc);
        await this.ensureStream().catch(() => undefined);
        return;
      } catch (err) {
        this.countError(`cannot connect to ${this.servers.join(',')}: ${(err as Error).message}; retrying`);
        await new Promise<void>((resolve) => {
          this.retryTimer = setTimeout(resolve, this.options.retryMs ?? 2000);
          this.retryTimer.unref();
        });
      }
    }
  }

  private async watchStatus(nc: NatsConnection): Promise<void> {
    for await (const s of nc.status()) {
      if (s.type === Events.Disconnect) {
        // Fail fast while reconnecting instead of waiting for each call's timeout.
        this.connected = false;
        for (const cut of [...this.inFlightCuts]) cut();
        this.log(`shared feature cache: disconnected from ${String(s.data)}; lookups are misses until it is back`);
      } else if (s.type === Events.Reconnect) {
        this.connected = true;
        this.log(`shared feature cache: reconnected to ${String(s.data)}`);
        // A restarted server may have lost the stream: check (and create) it again.
        void this.ensureStream().catch(() => undefined);
      }
    }
  }

  private streamConfig(): Partial<StreamConfig> {
    const maxAge = nanos(this.options.ttlMs);
    return {
      name: this.bucket,
      description: 'CFR-SAM encoder features by <model version>.<tile digest> (shared cache tier)',
      subjects: [`${this.bucket}.>`],
      retention: RetentionPolicy.Limits,
      storage: StorageType.File,
      // A cache: drop the oldest entries to make room rather than refuse new ones.
      discard: DiscardPolicy.Old,
      max_bytes: Math.floor(this.options.maxBytes),
      max_age: maxAge,
      // Writes carry no message ids; the window only has to fit in max_age.
      duplicate_window: Math.min(maxAge, nanos(120_000)),
      max_msgs_per_subject: 1,
      allow_direct: true,
      num_replicas: 1,
    };
  }

  /** Connected with the bucket in place. */
  private get usable(): boolean {
    return this.connected && this.streamReady && !this.closed;
  }

  /** Creates the stream if absent (an existing one keeps its limits: replicas must not fight). */
  private ensureStream(): Promise<void> {
    this.ensuring ??= (async () => {
      this.lastEnsure = Date.now();
      const jsm = this.jsm!;
      try {
        let info;
        try {
          info = await bounded(jsm.streams.info(this.bucket), this.timeoutMs, 'stream info', this.inFlightCuts);
        } catch (err) {
          if (!/stream not found/i.test((err as Error).message)) throw err;
          info = await bounded(jsm.streams.add(this.streamConfig()), this.timeoutMs, 'stream create', this.inFlightCuts);
          this.log(
            `shared feature cache: created bucket ${this.bucket} (max ${info.config.max_bytes} bytes, ` +
              `max age ${Math.round(info.config.max_age / 1e9)} s)`,
          );
        }
        const wanted = this.streamConfig();
        if (info.config.max_bytes !== wanted.max_bytes || info.config.max_age !== wanted.max_age) {
          this.log(
            `shared feature cache: bucket ${this.bucket} exists with max ${info.config.max_bytes} bytes and max age ` +
              `${Math.round(info.config.max_age / 1e9)} s; keeping those (edit or delete the stream to change them)`,
          );
        }
        if (!info.config.allow_direct) throw new Error(`stream ${this.bucket} exists without allow_direct; it cannot be read`);
        this.streamReady = true;
        for (const wake of this.readyWaiters.splice(0)) wake();
      } catch (err) {
        this.streamReady = false;
        this.countError(`bucket ${this.bucket} is not usable: ${(err as Error).message}`);
        throw err;
      } finally {
        this.ensuring = null;
      }
    })();
    return this.ensuring;
  }

  /** Resolves true once connected with the bucket in place, false after `timeoutMs`. */
  async ready(timeoutMs = 10_000): Promise<boolean> {
    if (this.usable) return true;
    return new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => resolve(false), timeoutMs);
      this.readyWaiters.push(() => {
        clearTimeout(timer);
        resolve(true);
      });
    });
  }

  /**
   * Why a call cannot go to the server now, or null. While connected without a usable stream, asks
   * for it again (at most every 5 s): creating it may have failed, or a restarted server lost it.
   */
  private unusableReason(): string | null {
    if (this.closed) return 'closed';
    if (!this.connected || !this.jsm) return 'not connected';
    if (!this.streamReady) {
      if (!this.ensuring && Date.now() - this.lastEnsure >= 5_000) void this.ensureStream().catch(() => undefined);
      return `bucket ${this.bucket} not available`;
    }
    return null;
  }

  /** A failed call: the stream may be gone (server restarted with an empty store). */
  private afterFailure(reason: string): void {
    if (/no responders|stream not found|503/i.test(reason)) this.streamReady = false;
  }

  private subject(key: string, chunk: number): string {
    return `${this.bucket}.${key}.${chunk}`;
  }

  private countError(message: string): void {
    this.counters.errors++;
    // At most one line per 30 s: a down tier must not flood the logs at request rate.
    const now = Date.now();
    if (now - this.lastErrorLog >= 30_000) {
      const extra = this.suppressedErrors > 0 ? ` (${this.suppressedErrors} more errors since the last report)` : '';
      this.log(`shared feature cache: ${message}${extra}`);
      this.lastErrorLog = now;
      this.suppressedErrors = 0;
    } else {
      this.suppressedErrors++;
    }
  }

  /**
   * Looks a key up. Never rejects: a miss, or an error (counted and logged) that callers treat as
   * a miss. Concurrent lookups of one key share one read.
   */
  lookup(key: string): Promise<SharedLookup> {
    const pending = this.lookups.get(key);
    if (pending) return pending;
    const promise = this.read(key).finally(() => this.lookups.delete(key));
    this.lookups.set(key, promise);
    return promise;
  }

  private async read(key: string): Promise<SharedLookup> {
    const unusable = this.unusableReason();
    if (unusable) {
      this.countError(`lookup of ${key}: ${unusable}`);
      return { status: 'error', reason: unusable };
    }
    try {
      const bytes = await bounded(this.readChunks(key), this.timeoutMs, `lookup of ${key}`, this.inFlightCuts);
      if (bytes) this.counters.hits++;
      else this.counters.misses++;
      return bytes ? { status: 'hit', bytes } : { status: 'miss' };
    } catch (err) {
      const reason = (err as Error).message;
      this.countError(`lookup of ${key}: ${reason}`);
      this.afterFailure(reason);
      return { status: 'error', reason };
    }
  }

  /** The entry's integrity check: SHA-256 of the bytes, or with a signing key an HMAC binding key and bytes. */
  private checksum(key: string, bytes: Uint8Array): string {
    if (!this.options.signingKey) return createHash('sha256').update(bytes).digest('hex');
    return createHmac('sha256', `cfrsam-feature-tier:${this.options.signingKey}`).update(key).update('\0').update(bytes).digest('hex');
  }

  /** The value, or null when absent or incomplete (evicted in part, or two writes interleaved). */
  private async readChunks(key: string): Promise<Uint8Array | null> {
    const jsm = this.jsm!;
    const direct = (jsm as JetStreamManager & DirectGets).direct;
    const get = async (chunk: number): Promise<StoredMsg | null> => {
      const query = { last_by_subj: this.subject(key, chunk) };
      try {
        return await (direct ? direct.getMessage(this.bucket, query) : jsm.streams.getMessage(this.bucket, query));
      } catch (err) {
        if ((err as { code?: string }).code === '404') return null;
        throw err;
      }
    };
    const first = await get(0);
    if (!first) return null;
    const chunks = Number(first.header.get(H_CHUNKS));
    const size = Number(first.header.get(H_SIZE));
    const sha = first.header.get(H_SHA256);
    const writeId = first.header.get(H_WRITE);
    if (!Number.isSafeInteger(chunks) || chunks < 1 || !Number.isSafeInteger(size) || size < 0 || !sha || !writeId) {
      throw new Error('entry has malformed headers');
    }
    const rest = await Promise.all(Array.from({ length: chunks - 1 }, (_, i) => get(i + 1)));
    const parts = [first, ...rest];
    // A chunk evicted (oldest first) or overwritten by a concurrent write of the same key.
    if (parts.some((m) => !m || m.header.get(H_WRITE) !== writeId)) return null;
    // A fresh buffer: received payloads are views into the connection's read buffer.
    const out = new Uint8Array(size);
    let offset = 0;
    for (const m of parts) {
      if (offset + m!.data.byteLength > size) throw new Error('entry chunks exceed the recorded size');
      out.set(m!.data, offset);
      offset += m!.data.byteLength;
    }
    if (offset !== size) throw new Error(`entry has ${offset} of ${size} bytes`);
    if (this.checksum(key, out) !== sha) {
      throw new Error(`entry does not match its ${this.options.signingKey ? 'HMAC (not written with this service key)' : 'SHA-256'}`);
    }
    return out;
  }

  /**
   * Writes a value in the background (the caller does not wait). Skipped when a write of the key
   * is already in flight; dropped (and counted) when too many writes are pending.
   */
  write(key: string, bytes: Uint8Array): void {
    if (this.writes.has(key)) return;
    if (this.writes.size >= (this.options.maxPendingWrites ?? 32)) {
      this.countError(`write of ${key} dropped: ${this.writes.size} writes pending`);
      return;
    }
    const promise = this.put(key, bytes).finally(() => this.writes.delete(key));
    this.writes.set(key, promise);
  }

  /** Writes a value and resolves true once stored (false on failure, counted and logged). */
  async put(key: string, bytes: Uint8Array): Promise<boolean> {
    const unusable = this.unusableReason();
    if (unusable || !this.js || !this.nc) {
      this.countError(`write of ${key}: ${unusable ?? 'not connected'}`);
      return false;
    }
    try {
      const js = this.js;
      const maxPayload = this.nc.info?.max_payload ?? 1024 * 1024;
      const chunkBytes = Math.max(1024, Math.min(this.options.maxChunkBytes ?? Infinity, maxPayload - HEADER_ROOM_BYTES));
      const chunks = Math.max(1, Math.ceil(bytes.byteLength / chunkBytes));
      const sha = this.checksum(key, bytes);
      const writeId = randomUUID();
      const publish = (chunk: number) => {
        const h = natsHeaders();
        h.set(H_CHUNKS, String(chunks));
        h.set(H_SIZE, String(bytes.byteLength));
        h.set(H_SHA256, sha);
        h.set(H_WRITE, writeId);
        const data = bytes.subarray(chunk * chunkBytes, Math.min(bytes.byteLength, (chunk + 1) * chunkBytes));
        return js.publish(this.subject(key, chunk), data, { headers: h, timeout: this.timeoutMs });
      };
      await bounded(
        (async () => {
          // Chunk 0 last: once readers can see it, the rest of this write is stored.
          await Promise.all(Array.from({ length: chunks - 1 }, (_, i) => publish(i + 1)));
          await publish(0);
        })(),
        this.timeoutMs,
        `write of ${key}`,
        this.inFlightCuts,
      );
      this.counters.writes++;
      return true;
    } catch (err) {
      const reason = (err as Error).message;
      this.countError(`write of ${key}: ${reason}`);
      this.afterFailure(reason);
      return false;
    }
  }

  stats(): SharedFeatureStoreStats {
    return { ...this.counters };
  }

  /** Waits for pending writes (bounded by the timeout), then closes the connection. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    await Promise.allSettled([...this.writes.values()]);
    this.connected = false;
    await this.nc?.close().catch(() => undefined);
  }
}

/** Opens the shared tier from parsed flags, or returns undefined when --nats-url is empty. */
export function openSharedFeatureStore(
  config: { natsUrl: string; sharedCacheMb: number; sharedCacheTtlS: number; sharedCacheTimeoutMs: number; internalToken?: string },
  name: string,
): SharedFeatureStore | undefined {
  if (!config.natsUrl) return undefined;
  if (config.sharedCacheMb <= 0) throw new ConfigError(`--shared-cache-mb must be > 0, got ${config.sharedCacheMb}`);
  if (config.sharedCacheTtlS <= 0) throw new ConfigError(`--shared-cache-ttl-s must be > 0, got ${config.sharedCacheTtlS}`);
  if (config.sharedCacheTimeoutMs <= 0) throw new ConfigError(`--shared-cache-timeout-ms must be > 0, got ${config.sharedCacheTimeoutMs}`);
  return SharedFeatureStore.open({
    url: config.natsUrl,
    maxBytes: config.sharedCacheMb * 1024 * 1024,
    ttlMs: config.sharedCacheTtlS * 1000,
    timeoutMs: config.sharedCacheTimeoutMs,
    name,
    // Entries are signed with the services' shared secret when they have one (see signingKey).
    signingKey: config.internalToken || undefined,
  });
}
