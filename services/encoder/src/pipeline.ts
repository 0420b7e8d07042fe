// Encode: tiles -> HMFM level features [L, D, h, w], cached by digest. Misses of one request run
// as one encoder.onnx batch (up to maxBatch tiles per run); concurrent requests for a digest that
// is being computed wait for that computation (single-flight).
//
// Trust boundary: the digest is computed by the gateway over the tile's RGB bytes, which this
// service never sees (it receives normalised float pixels). The encoder therefore cannot verify
// that a digest matches its pixels and trusts the caller: Encode is an internal API, reachable
// only from the gateway inside the cluster. A caller that sent wrong digests could only poison
// its own results.
import {
  ByteLruCache,
  graphOutputFloat32,
  grpcError,
  isDigest,
  stackFloat32,
  status,
  tensorFromProto,
  tensorToProto,
  type Float32Tensor,
  type Manifest,
  type OnnxWorkerPool,
  type stagesProto,
} from '@cfrsam/common';

export interface EncoderPipelineOptions {
  /** Tiles per encoder.onnx run (default 4). */
  maxBatch?: number;
  /** Tiles per Encode request (default 64). */
  maxTilesPerRequest?: number;
  /** Feature cache capacity in bytes (default 512 MiB). */
  cacheBytes?: number;
}

/** What one Encode call did, for spans and metrics. */
export interface EncodeSummary {
  hits: number;
  misses: number;
  coalesced: number;
  /** encoder.onnx runs this call started. */
  forwardPasses: number;
}

export class EncoderPipeline {
  readonly maxBatch: number;
  readonly maxTilesPerRequest: number;
  readonly cache: ByteLruCache<Float32Array>;
  /** encoder.onnx runs since start (CacheStats.computations). */
  forwardPasses = 0;

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
  }

  private validate(request: stagesProto.EncodeRequest): Array<{ digest: string; pixels: Float32Tensor | null }> {
    const S = this.manifest.inputSize;
    if (request.modelVersion && request.modelVersion !== this.manifest.version) {
      throw grpcError(
        status.INVALID_ARGUMENT,
        `model_version "${request.modelVersion}" does not match the served model "${this.manifest.version}"`,
      );
    }
    if (request.tiles.length === 0) throw grpcError(status.INVALID_ARGUMENT, 'tiles: at least one tile is required');
    if (request.tiles.length > this.maxTilesPerRequest) {
      throw grpcError(
        status.INVALID_ARGUMENT,
        `tiles: ${request.tiles.length} tiles exceed the limit of ${this.maxTilesPerRequest} per request`,
      );
    }
    return request.tiles.map((tile, i) => {
      if (!isDigest(tile.digest)) {
        throw grpcError(status.INVALID_ARGUMENT, `tiles[${i}].digest must be a SHA-256 in 64 lowercase hex digits, got "${tile.digest}"`);
      }
      const pixels = tile.pixels ? tensorFromProto(`tiles[${i}].pixels`, tile.pixels, [3, S, S]) : null;
      return { digest: tile.digest, pixels };
    });
  }

  /** Encodes a request; see the file comment for caching and the trust boundary. */
  async encode(request: stagesProto.EncodeRequest): Promise<{ response: stagesProto.EncodeResponse; summary: EncodeSummary }> {
    const tiles = this.validate(request);
    // Digest-only tiles can only be served from the cache or a computation in flight; check that
    // now, so a compute batch never contains a key without pixels (other callers may join it).
    const absent = tiles.filter((t) => !t.pixels && !this.cache.has(t.digest) && !this.cache.pending(t.digest));
    if (absent.length > 0) {
      throw grpcError(
        status.NOT_FOUND,
        `features of ${absent.length} tile(s) are not cached (first: ${absent[0].digest}); send the pixels`,
      );
    }
    const pixelsByDigest = new Map<string, Float32Tensor>();
    for (const t of tiles) if (t.pixels && !pixelsByDigest.has(t.digest)) pixelsByDigest.set(t.digest, t.pixels);

    let forwardPasses = 0;
    // Not cancelled with the call: other callers may be waiting on the computation, and its result
    // fills the cache that a retry will hit.
    const results = await this.cache.getOrComputeMany(
      tiles.map((t) => t.digest),
      async (missing) => {
        const batches: string[][] = [];
        for (let i = 0; i < missing.length; i += this.maxBatch) batches.push(missing.slice(i, i + this.maxBatch));
        forwardPasses += batches.length;
        this.forwardPasses += batches.length;
        const computed = new Map<string, Float32Array>();
        await Promise.all(batches.map((digests) => this.runBatch(digests, pixelsByDigest, computed)));
        return computed;
      },
    );

    const [L, D, h, w] = this.manifest.featureShape;
    const summary: EncodeSummary = { hits: 0, misses: 0, coalesced: 0, forwardPasses };
    const response: stagesProto.EncodeResponse = {
      tiles: results.map((r, i) => {
        if (r.source === 'hit') summary.hits++;
        else if (r.source === 'coalesced') summary.coalesced++;
        else summary.misses++;
        return { digest: tiles[i].digest, features: tensorToProto([L, D, h, w], r.value), cacheHit: r.source === 'hit' };
      }),
    };
    return { response, summary };
  }

  private async runBatch(digests: string[], pixelsByDigest: Map<string, Float32Tensor>, into: Map<string, Float32Array>): Promise<void> {
    const missingPixels = digests.find((d) => !pixelsByDigest.has(d));
    if (missingPixels) throw grpcError(status.NOT_FOUND, `features of tile ${missingPixels} are not cached; send the pixels`);
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
    };
  }
}
