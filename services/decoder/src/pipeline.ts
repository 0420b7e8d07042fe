// Prepare/Decode. Prepare runs decoder_image.onnx once per digest (HMFM fusion, neck, semantic
// and boundary features) and keeps the result in an LRU bounded in bytes; Decode runs
// decoder_prompts.onnx over a batch of prompts against a prepared image and returns each mask
// compactly: thresholded, cropped to its foreground box in tile pixels and bit-packed.
//
// Features never travel through the gateway: a Prepare carries the tile's digest, its RGB bytes
// (the decoder checks the digest against them) and the encoder that encoded it; the decoder
// fetches the features itself, from the shared tier (NATS JetStream, --nats-url) when it has one,
// then from the encoders (--encoder: the hinted replica first, then the digest's rendezvous order).
// The gateway sends a tile's Prepare together with its Encode, so the tile's RGB reaches the decoder
// while the encoder works and the feature fetch waits at the encoder for the features
// (EncodeRequest.wait_ms), instead of the Prepare leaving the gateway after the Encode's answer.
// A Prepare may carry the features or float pixels (tools, tests) only when the decoder accepts
// caller input it cannot verify (acceptUnverifiedInput, --accept-unverified-input): features and
// normalised pixels cannot be checked against the digest, and the prepared state is cached under
// that digest for every later Decode, so accepting them from any caller would let one plant
// another tile's results.
import { ByteLruCache, ErrorReason, grpcError, type stagesProto, status } from '@cfrsam/rpc';
import {
  type Float32Tensor,
  graphOutput,
  graphOutputFloat32,
  type HostTensor,
  isDigest,
  type Manifest,
  packBits,
  readStageTile,
  tensorFromProto,
  thresholdAndCrop,
} from '@cfrsam/contract';
import { featureKey, float32Lookup, type OnnxWorkerPool, type SharedFeatureStore } from '@cfrsam/runtime';

/**
 * The longest a Prepare may ask its feature fetch to wait for a tile that has not reached its
 * encoder yet (PrepareRequest.features_wait_ms: the gateway asks only for a Prepare sent together
 * with the tile's Encode). A tile normally arrives within milliseconds; the wait only runs out when
 * the Encode went to another replica or failed.
 */
export const DEFAULT_MAX_FEATURES_WAIT_MS = 1_000;

export interface DecoderPipelineOptions {
  /** Prompts per decoder_prompts.onnx run (default 32). */
  maxBatch?: number;
  /** Prompts per Decode request (default 256). */
  maxPromptsPerRequest?: number;
  /** Points per prompt (default 16). */
  maxPointsPerPrompt?: number;
  /** Prepared-state cache capacity in bytes (default 1 GiB). */
  cacheBytes?: number;
  /** The shared feature tier, read by Prepares without features (off when absent). Closed on shutdown. */
  sharedStore?: SharedFeatureStore;
  /** Further feature sources, tried after the shared tier (the encoders). Closed on shutdown. */
  featureSources?: FeatureSource[];
  /**
   * Accept Prepares carrying features or float pixels, which cannot be checked against the digest
   * (default false: INVALID_ARGUMENT; see the file comment). For tools and tests only.
   */
  acceptUnverifiedInput?: boolean;
  /** Cap on a Prepare's features_wait_ms (default DEFAULT_MAX_FEATURES_WAIT_MS). */
  maxFeaturesWaitMs?: number;
}

/** What Prepare did, beyond its response: where it fetched the features from, when it did. */
export type PrepareResult = stagesProto.PrepareResponse & { featuresFrom?: string };

/**
 * Where a decoder fetches a tile's features when Prepare does not carry them (see the file
 * comment): the shared tier and the encoders. `hint` is the encoder that encoded the tile (or that
 * its Encode went to); `waitMs`, how long a source may wait for a tile still on its way to it (0:
 * answer from what it holds now).
 */
export interface FeatureSource {
  readonly name: string;
  fetch(digest: string, hint: string, waitMs: number): Promise<{ values: Float32Array | null; error?: string }>;
  close?(): Promise<void> | void;
}

/** The shared tier (NATS JetStream) as a feature source. */
export function sharedTierSource(store: SharedFeatureStore, manifest: Manifest): FeatureSource {
  const count = manifest.featureShape.reduce((a, b) => a * b, 1);
  return {
    name: 'shared tier',
    fetch: async (digest) => float32Lookup(await store.lookup(featureKey(manifest.version, digest)), count),
  };
}

/**
 * The per-image decoder state. The arrays live in SharedArrayBuffers, so each Decode hands them
 * to a worker without copying them on the event loop.
 */
export interface PreparedImage {
  imageEmbedding: Float32Tensor;
  semantic: Float32Tensor;
  boundaryFeatures: Float32Tensor;
  bytes: number;
}

function shared(t: HostTensor): Float32Tensor {
  const data = t.data as Float32Array;
  const copy = new Float32Array(new SharedArrayBuffer(data.byteLength));
  copy.set(data);
  return { type: 'float32', dims: [...t.dims], data: copy };
}

function sigmoid(x: number): number {
  return 1 / (1 + Math.exp(-x));
}

/**
 * One prompt's DecodedMask: the W x W window of logits placed at (originX, originY) in the S x S
 * tile, thresholded at `logit > threshold`, cropped to the foreground's box (clipped to the tile)
 * and bit-packed; mean_probability is the mean sigmoid over the mask's pixels (0 when empty).
 */
export function encodeMask(
  logits: Float32Array,
  W: number,
  originX: number,
  originY: number,
  S: number,
  threshold: number,
  predictedIou: number,
): stagesProto.DecodedMask {
  const box = thresholdAndCrop(logits, W, W, originX, originY, S, S, threshold);
  let probabilitySum = 0;
  let area = 0;
  for (let r = 0; r < box.height; r++) {
    const src = (box.y0 - originY + r) * W + (box.x0 - originX);
    for (let c = 0; c < box.width; c++) {
      if (box.mask[r * box.width + c]) {
        probabilitySum += sigmoid(logits[src + c]);
        area++;
      }
    }
  }
  return {
    x0: box.x0,
    y0: box.y0,
    width: box.width,
    height: box.height,
    bits: Buffer.from(packBits(box.mask, box.width, box.height)),
    predictedIou,
    meanProbability: area > 0 ? probabilitySum / area : 0,
  };
}

/**
 * Throws when the caller went away (cancelled, or its deadline passed) before work it alone asked
 * for started; the transport answers CANCELLED or DEADLINE_EXCEEDED by the cause.
 */
function abandonedBeforeWork(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw grpcError(status.CANCELLED, 'prepare: the caller went away before decoder_image ran');
}

/** A prompt after validation. */
interface Prompt {
  coords: number[];
  labels: number[];
}

export class DecoderPipeline {
  readonly maxBatch: number;
  readonly maxPromptsPerRequest: number;
  readonly maxPointsPerPrompt: number;
  readonly cache: ByteLruCache<PreparedImage>;
  readonly sharedStore: SharedFeatureStore | undefined;
  readonly featureSources: FeatureSource[];
  /** decoder_image.onnx runs since start. */
  preparations = 0;
  private readonly window: number;
  private readonly acceptUnverifiedInput: boolean;
  private readonly maxFeaturesWaitMs: number;

  constructor(
    readonly manifest: Manifest,
    private readonly pool: OnnxWorkerPool,
    options: DecoderPipelineOptions = {},
  ) {
    this.maxBatch = Math.max(1, options.maxBatch ?? 32);
    this.maxPromptsPerRequest = Math.max(1, options.maxPromptsPerRequest ?? 256);
    this.maxPointsPerPrompt = Math.max(1, options.maxPointsPerPrompt ?? 16);
    this.cache = new ByteLruCache<PreparedImage>({ capacityBytes: options.cacheBytes ?? 1024 ** 3, sizeOf: (p) => p.bytes });
    this.window = manifest.refinement.mode === 'window' ? manifest.refinement.window : manifest.inputSize;
    this.sharedStore = options.sharedStore;
    this.acceptUnverifiedInput = options.acceptUnverifiedInput ?? false;
    this.maxFeaturesWaitMs = Math.max(0, options.maxFeaturesWaitMs ?? DEFAULT_MAX_FEATURES_WAIT_MS);
    this.featureSources = [...(options.sharedStore ? [sharedTierSource(options.sharedStore, manifest)] : []), ...(options.featureSources ?? [])];
  }

  /**
   * A Prepare's features fetched by this decoder: from each source in turn (the shared tier, then
   * the encoders), `hint` being the encoder that encoded the tile, `waitMs` how long a source may
   * wait for the tile still on its way. FAILED_PRECONDITION with reason FEATURES_MISSING when no
   * source holds them (the caller encodes the tile again).
   */
  private async fetchFeatures(digest: string, hint: string, waitMs: number): Promise<{ features: Float32Tensor; source: string }> {
    const dims = this.manifest.featureShape;
    if (this.featureSources.length === 0) {
      throw grpcError(
        status.INVALID_ARGUMENT,
        `features: missing (expected dims [${dims.join(',')}]); this decoder has no feature source to fetch them from ` +
          '(--nats-url for the shared tier, --encoder for the encoders)',
      );
    }
    const problems: string[] = [];
    for (const source of this.featureSources) {
      const { values, error } = await source.fetch(digest, hint, waitMs);
      if (values) return { features: { type: 'float32', dims: [...dims], data: values }, source: source.name };
      problems.push(`${source.name}: ${error ?? 'absent'}`);
    }
    throw grpcError(
      status.FAILED_PRECONDITION,
      `features of digest ${digest} are in no source this decoder can read (${problems.join('; ')}); encode the tile again`,
      { reason: ErrorReason.FEATURES_MISSING },
    );
  }

  private checkVersionAndDigest(modelVersion: string, digest: string): void {
    if (modelVersion && modelVersion !== this.manifest.version) {
      throw grpcError(status.INVALID_ARGUMENT, `model_version "${modelVersion}" does not match the served model "${this.manifest.version}"`);
    }
    if (!isDigest(digest)) {
      throw grpcError(status.INVALID_ARGUMENT, `digest must be a SHA-256 in 64 lowercase hex digits, got "${digest}"`);
    }
  }

  /**
   * Prepares an image (once per digest; concurrent Prepares of one digest run decoder_image once).
   * already_prepared is true unless this call ran decoder_image itself. Not cancelled with the
   * call: concurrent Prepares and Decodes of the digest may be waiting on the computation.
   * Without features (unset or empty), takes them from the shared tier unless the image is
   * prepared here already (see the file comment).
   */
  async prepare(request: stagesProto.PrepareRequest, signal?: AbortSignal): Promise<PrepareResult> {
    this.checkVersionAndDigest(request.modelVersion, request.digest);
    const S = this.manifest.inputSize;
    const tile = readStageTile('prepare', request, this.manifest);
    const pixels = tile.pixels;
    const callerFeatures = request.features !== undefined && request.features.data.byteLength > 0;
    if (!this.acceptUnverifiedInput && ((pixels && !tile.verified) || callerFeatures)) {
      const field = callerFeatures ? 'features' : 'pixels';
      throw grpcError(
        status.INVALID_ARGUMENT,
        `prepare: ${field} sent by the caller cannot be checked against digest ${request.digest.slice(0, 16)}...; ` +
          'send the tile as rgb bytes and let the decoder fetch its features',
        { reason: ErrorReason.BAD_REQUEST, fieldViolations: [{ field, description: 'not accepted: cannot be verified against the digest' }] },
      );
    }
    if (!pixels && !this.cache.has(request.digest) && !this.cache.pending(request.digest)) {
      throw grpcError(status.INVALID_ARGUMENT, `prepare: no pixels for digest ${request.digest.slice(0, 16)}... (send rgb bytes)`, {
        fieldViolations: [{ field: 'rgb', description: 'required' }],
      });
    }
    let features: Float32Tensor | null = null;
    let featuresFrom: PrepareResult['featuresFrom'];
    if (request.features && request.features.data.byteLength > 0) {
      features = tensorFromProto('features', request.features, this.manifest.featureShape);
    } else if (!this.cache.has(request.digest) && !this.cache.pending(request.digest)) {
      abandonedBeforeWork(signal);
      // Fetched before joining the single-flight below, so that a miss here fails only this call
      // and never a concurrent Prepare that brought its features.
      const waitMs = Math.min(request.featuresWaitMs ?? 0, this.maxFeaturesWaitMs);
      const fetched = await this.fetchFeatures(request.digest, request.featuresFrom ?? '', waitMs);
      features = fetched.features;
      featuresFrom = fetched.source;
    }
    // (features is null only when the digest is prepared or being prepared here, with no await
    // since that check: getOrCompute then answers without calling compute.) A caller that went
    // away while the features were fetched starts no decoder_image run that nobody waits for.
    if (!this.cache.has(request.digest) && !this.cache.pending(request.digest)) abandonedBeforeWork(signal);
    const result = await this.cache.getOrCompute(request.digest, async () => {
      if (!features || !pixels) throw grpcError(status.INTERNAL, `digest ${request.digest}: no features or pixels to prepare with`);
      this.preparations++;
      const out = await this.pool.run(
        'decoder_image',
        {
          features: { type: 'float32', dims: [1, ...features.dims], data: features.data },
          image: { type: 'float32', dims: [1, ...pixels.dims], data: pixels.data },
        },
        // Not cancelled with the call: concurrent Prepares of this digest may be waiting on it.
      );
      const grid = [S / this.manifest.patchSize, S / this.manifest.patchSize];
      const imageEmbedding = shared(graphOutput('decoder_image', out, 'image_embedding', [1, null, grid[0], grid[1]]));
      const semantic = shared(graphOutput('decoder_image', out, 'semantic', [1, null, S / 4, S / 4]));
      const boundaryFeatures = shared(graphOutput('decoder_image', out, 'boundary_features', [1, null, S, S]));
      return {
        imageEmbedding,
        semantic,
        boundaryFeatures,
        bytes: imageEmbedding.data.byteLength + semantic.data.byteLength + boundaryFeatures.data.byteLength,
      };
    });
    return { alreadyPrepared: result.source !== 'computed', featuresFrom };
  }

  private validatePrompts(prompts: readonly stagesProto.PromptPoints[]): Prompt[] {
    const S = this.manifest.inputSize;
    if (prompts.length === 0) throw grpcError(status.INVALID_ARGUMENT, 'prompts: at least one prompt is required');
    if (prompts.length > this.maxPromptsPerRequest) {
      throw grpcError(
        status.INVALID_ARGUMENT,
        `prompts: ${prompts.length} prompts exceed the limit of ${this.maxPromptsPerRequest} per request; split them into batches`,
      );
    }
    return prompts.map((p, i) => {
      const n = p.labels.length;
      if (p.coords.length !== 2 * n) {
        throw grpcError(status.INVALID_ARGUMENT, `prompts[${i}]: ${p.coords.length} coords for ${n} labels (need 2 per label: x, y)`);
      }
      if (n === 0) throw grpcError(status.INVALID_ARGUMENT, `prompts[${i}]: no points`);
      if (n > this.maxPointsPerPrompt) {
        throw grpcError(status.INVALID_ARGUMENT, `prompts[${i}]: ${n} points exceed the limit of ${this.maxPointsPerPrompt} per prompt`);
      }
      let anchoring = 0;
      let corners2 = 0;
      let corners3 = 0;
      for (let j = 0; j < n; j++) {
        const label = p.labels[j];
        if (label !== 0 && label !== 1 && label !== 2 && label !== 3) {
          throw grpcError(
            status.INVALID_ARGUMENT,
            `prompts[${i}].labels[${j}] is ${label}; labels are 1 positive, 0 negative, 2 box top-left, 3 box bottom-right`,
          );
        }
        if (label >= 1) anchoring++;
        if (label === 2) corners2++;
        if (label === 3) corners3++;
        const x = p.coords[2 * j];
        const y = p.coords[2 * j + 1];
        if (!(x >= 0 && x <= S && y >= 0 && y <= S)) {
          throw grpcError(status.INVALID_ARGUMENT, `prompts[${i}] point ${j} (${x}, ${y}) is outside the ${S}x${S} tile`);
        }
      }
      if (anchoring === 0) {
        throw grpcError(status.INVALID_ARGUMENT, `prompts[${i}]: needs a positive point or a box (labels 1, 2, 3), not only negative points`);
      }
      if (corners2 > 1 || corners3 > 1 || corners2 !== corners3) {
        throw grpcError(status.INVALID_ARGUMENT, `prompts[${i}]: a box is one top-left (label 2) and one bottom-right (label 3) corner`);
      }
      return { coords: p.coords, labels: p.labels };
    });
  }

  /**
   * Decodes prompts against a prepared image. FAILED_PRECONDITION with "not prepared" when this
   * replica does not hold the digest (the caller prepares again); waits when a Prepare of the
   * digest is in flight.
   */
  async decode(request: stagesProto.DecodeRequest, signal?: AbortSignal): Promise<stagesProto.DecodeResponse & { runs: number[] }> {
    this.checkVersionAndDigest(request.modelVersion, request.digest);
    const prompts = this.validatePrompts(request.prompts);
    let prepared = this.cache.get(request.digest);
    if (!prepared) {
      const pending = this.cache.pending(request.digest);
      if (!pending) {
        throw grpcError(status.FAILED_PRECONDITION, `digest ${request.digest}: not prepared on this replica; call Prepare first`, {
          reason: ErrorReason.NOT_PREPARED,
        });
      }
      prepared = await pending;
    }
    // Batches hold prompts with the same number of points. Padding a shorter prompt with label -1
    // points is what the graph supports, but SAM's prompt encoder gives padding points a learned
    // embedding that the mask decoder attends to, so padding changes a prompt's mask and IoU
    // slightly (about 1e-3 on models/tiny); grouping keeps a prompt's result independent of the
    // other prompts in its request. Auto prompts all have one point, so this rarely adds a run.
    const groups = new Map<number, number[]>();
    prompts.forEach((p, i) => {
      const group = groups.get(p.labels.length);
      if (group) group.push(i);
      else groups.set(p.labels.length, [i]);
    });
    const batches: number[][] = [];
    for (const indices of groups.values()) {
      for (let i = 0; i < indices.length; i += this.maxBatch) batches.push(indices.slice(i, i + this.maxBatch));
    }
    const masks: stagesProto.DecodedMask[] = new Array(prompts.length);
    await Promise.all(
      batches.map(async (indices) => {
        const decoded = await this.decodeBatch(
          prepared!,
          indices.map((i) => prompts[i]),
          signal,
        );
        indices.forEach((promptIndex, k) => (masks[promptIndex] = decoded[k]));
      }),
    );
    return { masks, runs: batches.map((b) => b.length) };
  }

  private async decodeBatch(prepared: PreparedImage, prompts: Prompt[], signal?: AbortSignal): Promise<stagesProto.DecodedMask[]> {
    const S = this.manifest.inputSize;
    const W = this.window;
    const P = prompts.length;
    const N = Math.max(...prompts.map((p) => p.labels.length));
    // Prompts with fewer than N points are padded with label -1 points (see decode on grouping).
    const coords = new Float32Array(P * N * 2);
    const labels = new Float32Array(P * N).fill(-1);
    prompts.forEach((p, i) => {
      coords.set(p.coords, i * N * 2);
      for (let j = 0; j < p.labels.length; j++) labels[i * N + j] = p.labels[j];
    });
    const out = await this.pool.run(
      'decoder_prompts',
      {
        image_embedding: prepared.imageEmbedding,
        semantic: prepared.semantic,
        boundary_features: prepared.boundaryFeatures,
        point_coords: { type: 'float32', dims: [P, N, 2], data: coords },
        point_labels: { type: 'float32', dims: [P, N], data: labels },
      },
      { signal },
    );
    const logits = graphOutputFloat32('decoder_prompts', out, 'mask_logits', [P, W, W]);
    const origins = graphOutput('decoder_prompts', out, 'window_origin', [P, 2]).data;
    const iou = graphOutputFloat32('decoder_prompts', out, 'iou_predictions', [P]);
    const masks: stagesProto.DecodedMask[] = [];
    for (let i = 0; i < P; i++) {
      masks.push(
        encodeMask(
          logits.subarray(i * W * W, (i + 1) * W * W),
          W,
          Number(origins[i * 2]),
          Number(origins[i * 2 + 1]),
          S,
          this.manifest.maskThreshold,
          iou[i],
        ),
      );
    }
    return masks;
  }
}
