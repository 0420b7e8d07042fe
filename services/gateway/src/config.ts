import { tileAlignedRegionSize } from '@cfrsam/nuclei';
// Gateway configuration: everything the pipeline can be tuned with, and the defaults.

export interface GatewayConfig {
  /** Prompter replica addresses (host:port). */
  prompter: string[];
  /** Encoder replica addresses. */
  encoder: string[];
  /** Decoder replica addresses. */
  decoders: string[];

  /** Largest accepted image (width x height), checked on the header before decoding. */
  maxImagePixels: number;
  /**
   * In automatic mode, tiles with less than this fraction of stained tissue (in an image that has
   * some) are glass and skip the model stages (0: every tile runs). Tiles with manual prompts run.
   */
  glassTileMaxTissue: number;
  /** Smallest accepted width and height. */
  minImageSide: number;
  /** Manual prompts per request. */
  maxPrompts: number;
  /** Points (positive + negative) per manual prompt. */
  maxPointsPerPrompt: number;

  /**
   * Overlap of neighbouring tiles in pixels. A nucleus is decoded by the tile whose core holds its
   * prompt, at least overlap/2 inside that tile, so nuclei up to that radius are never cut. The
   * default (64) is at least the refinement window of the bundled model (48): a window mask then
   * never reaches past the tile.
   */
  tileOverlap: number;
  /** Tiles per Detect and Encode call. */
  tileBatchSize: number;
  /** Tile batches in flight at once (Detect + Encode + their decoding). */
  tileBatchConcurrency: number;

  /** Most prompts per Decode call. */
  decodeBatchSize: number;
  /**
   * Decode calls of one tile that can run at once (the decoder's workers): a tile's prompts are
   * split into as few rounds of this many equal batches as decodeBatchSize allows (promptBatches).
   */
  decodeParallelism: number;
  /** Decoder replicas (rendezvous top-k) that share the prompt batches of one tile. */
  replicasPerTile: number;
  /** Decoder calls (Prepare + Decode) in flight at once across all requests of this gateway. */
  maxDecoderCalls: number;
  /** How long a decoder replica that answered UNAVAILABLE is skipped (ms). */
  replicaCooldownMs: number;

  /**
   * A manual prompt takes the class of the nearest automatic detection within this radius (px);
   * in AUTO_AND_MANUAL mode, automatic detections within it are replaced by the manual prompt.
   */
  classRadius: number;
  /**
   * Upper bound of the adaptive concurrency limit: Segment/Refine calls run at once at most. The
   * limit itself is learnt from latency per pixel (admission/adaptiveLimit.ts); more calls wait in
   * per-caller queues served round robin.
   */
  maxConcurrentRequests: number;
  /** Calls run at once before any latency was measured (where the adaptive limit starts). */
  initialConcurrentRequests: number;
  /** Latency per pixel this many times the best seen counts as congestion (the limit shrinks). */
  latencyTolerance: number;
  /** Calls waiting for admission at most; more get RESOURCE_EXHAUSTED. */
  maxQueuedRequests: number;
  /** A call waiting this long without starting gets RESOURCE_EXHAUSTED (ms; 0: no bound). */
  maxQueueWaitMs: number;
  /** Calls one caller (callIdentity) may have running or waiting (0: no limit). */
  maxRequestsPerIdentity: number;
  /** Pixels per second at the model's resolution one caller may send (0: no limit). */
  pixelsPerSecondPerIdentity: number;
  /**
   * Throughput assumed before any was measured (pixels/s at the model's resolution), for the
   * deadline check of the first requests; 0: no early rejection until a request was answered.
   */
  initialPixelsPerSecond: number;
  /** Timeout of child calls when the client sent no deadline (ms). */
  defaultTimeoutMs: number;
  /** Bytes of recently segmented images kept for Refine. */
  refineCacheBytes: number;
  /**
   * Bytes of recent Segment responses, keyed by the request (image bytes and every parameter) and
   * the model version: a repeated request (a slide region delivered twice, a client retrying) is
   * answered without running the model. 0 turns it off.
   */
  resultCacheBytes: number;

  /** Overlap resolution: drop an instance left with less than this fraction of its mask. */
  minKeptFraction: number;
  /** Drop instances smaller than this (px). */
  minAreaPx: number;
  /** Douglas-Peucker tolerance of the output polygons (px); 0 keeps every pixel corner. */
  polygonTolerance: number;
}

export const DEFAULT_GATEWAY_CONFIG: Omit<GatewayConfig, 'prompter' | 'encoder' | 'decoders'> = {
  maxImagePixels: 64 * 1024 * 1024,
  glassTileMaxTissue: 0.001,
  minImageSide: 8,
  maxPrompts: 2000,
  maxPointsPerPrompt: 16,
  tileOverlap: 64,
  tileBatchSize: 4,
  tileBatchConcurrency: 2,
  decodeBatchSize: 24,
  decodeParallelism: 2,
  replicasPerTile: 2,
  maxDecoderCalls: 8,
  replicaCooldownMs: 5_000,
  classRadius: 12,
  maxConcurrentRequests: 8,
  initialConcurrentRequests: 1,
  latencyTolerance: 1.25,
  maxQueuedRequests: 1000,
  maxQueueWaitMs: 60_000,
  maxRequestsPerIdentity: 0,
  pixelsPerSecondPerIdentity: 0,
  initialPixelsPerSecond: 0,
  defaultTimeoutMs: 120_000,
  refineCacheBytes: 512 * 1024 * 1024,
  resultCacheBytes: 256 * 1024 * 1024,
  minKeptFraction: 0.5,
  minAreaPx: 4,
  polygonTolerance: 0.5,
};

/**
 * Slide regions, for `cfrsam slide run` and slide jobs alike. The margin read around a region is
 * half the tile overlap, so a nucleus at a region's edge has the context it would have at a seam
 * between two tiles, and the region side makes the read exactly 6 x 6 tiles of a 256 px model at
 * the default overlap (1144 + 2 x 32 = 1208 <= 256 + 5 x 192 = 1216, 8 px to spare for resampling).
 * The previous 1024 px regions read with a 64 px margin took 36 tiles for 1.05 Mpx of slide, these
 * 36 tiles for 1.31 Mpx: 1.25x fewer tiles per megapixel, and no region seam with less context than
 * a seam between two tiles of one image.
 */
export const DEFAULT_SLIDE_MARGIN = DEFAULT_GATEWAY_CONFIG.tileOverlap / 2;
export const DEFAULT_SLIDE_REGION_SIZE = tileAlignedRegionSize(6, 256, DEFAULT_GATEWAY_CONFIG.tileOverlap, DEFAULT_SLIDE_MARGIN);
