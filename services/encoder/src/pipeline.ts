// Encode: tiles -> HMFM level features [L, D, h, w], cached by digest. Lookup order: the local
// LRU, then the shared tier in NATS JetStream when configured (features another replica computed),
// then encoder.onnx. Misses of one request run as one encoder.onnx batch (up to maxBatch tiles per
// run); concurrent requests for a digest that is being looked up or computed wait for that work
// (single-flight covers the shared lookup too). Computed features are written to the shared tier
// in the background: the response never waits for it, and a failing tier only costs recomputation.
//
// Trust boundary: tiles sent as RGB bytes (the gateway's form) have their digest recomputed and
// checked here (readStageTile), so the caches only hold features under the digest of the pixels
// they came from. Tiles sent as normalised float pixels (the older form) cannot be checked against
// their digest: their features are cached under the SHA-256 of the float pixels themselves
// (UNVERIFIED_PREFIX), never under the digest the caller named, and never written to the shared
// tier, so no caller can plant features that a digest-only read of another tile would get.
//
// Features are returned only when the request asks (return_features): the gateway never does, a
// decoder fetching a tile's features does. The gateway starts a tile's Prepare together with its
// Encode, so the decoder's digest-only request can come before the tile: with wait_ms it waits
// (up to MAX_ARRIVAL_WAIT_MS) for the tile to arrive and then joins its computation.
import { createHash } from 'node:crypto';
import { ByteLruCache, ErrorReason, grpcError, type stagesProto, status } from '@cfrsam/rpc';
import { type Float32Tensor, graphOutputFloat32, type Manifest, stackFloat32, readStageTile, type StageTile, tensorToProto } from '@cfrsam/contract';
import { featureKey, float32Bytes, float32Lookup, type OnnxWorkerPool, type SharedFeatureStore } from '@cfrsam/runtime';

export interface EncoderPipelineOptions {
  /** Tiles per encoder.onnx run (default 4). */
  maxBatch?: number;
  /** Tiles per Encode request (default 64). */
  maxTilesPerRequest?: number;
  /** Feature cache capacity in bytes (default 512 MiB). */
  cacheBytes?: number;
  /** The shared tier (off when absent). The encoder closes it on shutdown. */
  sharedStore?: SharedFeatureStore;
}

/** The longest a digest-only Encode waits for its tile to arrive (its wait_ms is capped to this). */
export const MAX_ARRIVAL_WAIT_MS = 10_000;

/** Cache keys of float-pixel tiles: the pixels' own hash, which no digest-only read can name. */
export const UNVERIFIED_PREFIX = 'unverified-pixels:';

function cacheKeyOf(tile: StageTile): string {
  if (tile.verified || !tile.pixels) return tile.digest;
  const { data } = tile.pixels;
  return (
    UNVERIFIED_PREFIX +
    createHash('sha256')
      .update(new Uint8Array(data.buffer, data.byteOffset, data.byteLength))
      .digest('hex')
  );
}

/** What one Encode call did, for spans and metrics. */
export interface EncodeSummary {
  /** Tiles found in the local LRU. */
  hits: number;
  /** Tiles computed by this call's encoder.onnx runs. */
  misses: number;
  coalesced: number;
  /** Tiles served from the shared tier, and shared lookups that found nothing (or failed). */
  sharedHits: number;
  sharedMisses: number;
  /** encoder.onnx runs this call started. */
  forwardPasses: number;
}

export class EncoderPipeline {
  readonly maxBatch: number;
  readonly maxTilesPerRequest: number;
  readonly cache: ByteLruCache<Float32Array>;
  readonly sharedStore: SharedFeatureStore | undefined;
  /** encoder.onnx runs since start (CacheStats.computations). */
  forwardPasses = 0;
  private readonly featureCount: number;

  constructor(
    readonly manifest: Manifest,
    private readonly pool: OnnxWorkerPool,
    options: EncoderPipelineOptions = {},
  ) {
    this.maxBatch = Math.max(1, options.maxBatch ?? 4);
    this.maxTilesPerRequest = Math.max(1, options.maxTilesPerRequest ?? 64);
    this.cache = new ByteLruCache<Float32Array>({
      capacityBytes: options.cacheBytes ?? 512 * 1024 * 1024,
      sizeOf: (features) => features.byteLength,
    });
    this.sharedStore = options.sharedStore;
    this.featureCount = manifest.featureShape.reduce((a, b) => a * b, 1);
  }

  /** The shared tier's features of a digest, or null (a miss, or a failure already counted). */
  private async sharedFeatures(digest: string): Promise<Float32Array | null> {
    if (!this.sharedStore) return null;
    return float32Lookup(await this.sharedStore.lookup(featureKey(this.manifest.version, digest)), this.featureCount).values;
  }

  private validate(request: stagesProto.EncodeRequest): StageTile[] {
    if (request.modelVersion && request.modelVersion !== this.manifest.version) {
      throw grpcError(status.INVALID_ARGUMENT, `model_version "${request.modelVersion}" does not match the served model "${this.manifest.version}"`);
    }
    if (request.tiles.length === 0) throw grpcError(status.INVALID_ARGUMENT, 'tiles: at least one tile is required');
    if (request.tiles.length > this.maxTilesPerRequest) {
      throw grpcError(status.INVALID_ARGUMENT, `tiles: ${request.tiles.length} tiles exceed the limit of ${this.maxTilesPerRequest} per request`);
    }
    return request.tiles.map((tile, i) => readStageTile(`tiles[${i}]`, tile, this.manifest));
  }

  /** Encodes a request; see the file comment for caching and the trust boundary. */
  async encode(request: stagesProto.EncodeRequest): Promise<{ response: stagesProto.EncodeResponse; summary: EncodeSummary }> {
    const validated = this.validate(request);
    // `key` is what the caches know a tile by (see the file comment); `digest` is what the caller sent.
    const tiles = validated.map((t) => ({ ...t, key: cacheKeyOf(t) }));
    const pixelsByDigest = new Map<string, Float32Tensor>();
    for (const t of tiles) if (t.pixels && !pixelsByDigest.has(t.key)) pixelsByDigest.set(t.key, t.pixels);
    const shareable = (key: string) => !key.startsWith(UNVERIFIED_PREFIX);

    const summary: EncodeSummary = { hits: 0, misses: 0, coalesced: 0, sharedHits: 0, sharedMisses: 0, forwardPasses: 0 };
    // Digests this call took from the shared tier.
    const fromShared = new Map<string, Float32Array>();
    // Digest-only tiles can only be served from a cache or a computation in flight. Look the absent
    // ones up in the shared tier now, before joining the LRU's single-flight, so that a compute
    // batch never holds a key without pixels (other callers with pixels may join it). Concurrent
    // lookups of a digest share one read (SharedFeatureStore.lookup).
    const unavailable = (d: string) => !pixelsByDigest.has(d) && !this.cache.has(d) && !this.cache.pending(d);
    let absent = [...new Set(tiles.filter((t) => unavailable(t.key)).map((t) => t.key))];
    if (absent.length > 0 && this.sharedStore) {
      const found = await Promise.all(absent.map((d) => this.sharedFeatures(d)));
      absent.forEach((d, i) => {
        if (found[i]) fromShared.set(d, found[i]!);
        else summary.sharedMisses++;
      });
      absent = absent.filter((d) => !fromShared.has(d) && unavailable(d));
    }
    if (absent.length > 0 && request.waitMs) {
      const waitMs = Math.min(request.waitMs, MAX_ARRIVAL_WAIT_MS);
      await Promise.all(absent.map((d) => this.cache.untilPresent(d, waitMs)));
      absent = absent.filter(unavailable);
    }
    if (absent.length > 0) {
      throw grpcError(
        status.NOT_FOUND,
        `features of ${absent.length} tile(s) are not cached${this.sharedStore ? ' here or in the shared feature cache' : ''} ` +
          `(first: ${absent[0]}); send the pixels`,
        { reason: ErrorReason.NOT_CACHED },
      );
    }

    // Not cancelled with the call: other callers may be waiting on the computation, and its result
    // fills the cache that a retry will hit.
    const results = await this.cache.getOrComputeMany(
      tiles.map((t) => t.key),
      async (missing) => {
        const values = new Map<string, Float32Array>();
        const toCompute: string[] = [];
        const lookups = missing.map(
          (d) => fromShared.get(d) ?? (this.sharedStore && pixelsByDigest.has(d) && shareable(d) ? this.sharedFeatures(d) : null),
        );
        const found = await Promise.all(lookups);
        missing.forEach((d, i) => {
          const value = found[i];
          if (value) {
            values.set(d, value);
            fromShared.set(d, value);
          } else {
            if (this.sharedStore && lookups[i] !== null) summary.sharedMisses++;
            toCompute.push(d);
          }
        });
        // A digest-only key whose earlier computation failed between the check above and now.
        const withoutPixels = toCompute.find((d) => !pixelsByDigest.has(d));
        if (withoutPixels)
          throw grpcError(status.NOT_FOUND, `features of tile ${withoutPixels} are not cached; send the pixels`, { reason: ErrorReason.NOT_CACHED });
        const batches: string[][] = [];
        for (let i = 0; i < toCompute.length; i += this.maxBatch) batches.push(toCompute.slice(i, i + this.maxBatch));
        summary.forwardPasses += batches.length;
        this.forwardPasses += batches.length;
        const computed = new Map<string, Float32Array>();
        await Promise.all(batches.map((digests) => this.runBatch(digests, pixelsByDigest, computed)));
        for (const [d, v] of computed) values.set(d, v);
        if (this.sharedStore && computed.size > 0) {
          const store = this.sharedStore;
          const version = this.manifest.version;
          // After the response is on its way: hashing and publishing are not the caller's wait.
          setImmediate(() => {
            for (const [d, v] of computed) if (shareable(d)) store.write(featureKey(version, d), float32Bytes(v));
          });
        }
        return values;
      },
    );

    const [L, D, h, w] = this.manifest.featureShape;
    const response: stagesProto.EncodeResponse = {
      tiles: results.map((r, i) => {
        const digest = tiles[i].digest;
        // Served from the shared tier: a cache hit for the caller, although the LRU missed it.
        const shared = r.source === 'computed' && fromShared.has(tiles[i].key);
        if (r.source === 'hit') summary.hits++;
        else if (r.source === 'coalesced') summary.coalesced++;
        else if (shared) summary.sharedHits++;
        else summary.misses++;
        const features = request.returnFeatures ? tensorToProto([L, D, h, w], r.value) : undefined;
        return { digest, features, cacheHit: r.source === 'hit' || shared };
      }),
    };
    return { response, summary };
  }

  private async runBatch(digests: string[], pixelsByDigest: Map<string, Float32Tensor>, into: Map<string, Float32Array>): Promise<void> {
    const missingPixels = digests.find((d) => !pixelsByDigest.has(d));
    if (missingPixels)
      throw grpcError(status.NOT_FOUND, `features of tile ${missingPixels} are not cached; send the pixels`, { reason: ErrorReason.NOT_CACHED });
    const image = stackFloat32(digests.map((d) => pixelsByDigest.get(d)!));
    const [L, D, h, w] = this.manifest.featureShape;
    const B = digests.length;
    const out = await this.pool.run('encoder', { image });
    const features = graphOutputFloat32('encoder', out, 'features', [B, L, D, h, w]);
    const itemSize = L * D * h * w;
    // Each cache entry gets its own copy: a view would keep the whole batch alive and make the
    // cache's byte accounting wrong.
    digests.forEach((d, b) => into.set(d, features.slice(b * itemSize, (b + 1) * itemSize)));
  }

  cacheStats(): stagesProto.CacheStats {
    const s = this.cache.stats();
    return {
      hits: s.hits,
      misses: s.misses,
      entries: s.entries,
      bytes: s.bytes,
      capacityBytes: s.capacityBytes,
      coalesced: s.coalesced,
      computations: this.forwardPasses,
      ...this.sharedStats(),
    };
  }

  private sharedStats(): Pick<stagesProto.CacheStats, 'sharedHits' | 'sharedMisses' | 'sharedErrors' | 'sharedWrites'> {
    const s = this.sharedStore?.stats() ?? { hits: 0, misses: 0, errors: 0, writes: 0 };
    return { sharedHits: s.hits, sharedMisses: s.misses, sharedErrors: s.errors, sharedWrites: s.writes };
  }
}
