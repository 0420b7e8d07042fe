// The gateway's stage ports over the stage pipelines in this process: the same PrompterPipeline,
// EncoderPipeline and DecoderPipeline the services run, called directly instead of over gRPC.
//
// Why it exists: on one machine the split into processes is pure cost. Measured with
// bench/pipeline.mjs on two cores, the four services spend 1.2-1.9x the CPU time of one process
// per request (gRPC, protobuf, copies, five event loops, and model runs slowed by sharing the
// cores with all that), for the same model runs. A workstation or a single VM gets the same API
// from `cfrsam-standalone` at the one-process cost; a cluster scales the services apart.
//
// The decoder reads a tile's features from the encoder's cache in this process (a copy: the
// worker pool takes ownership of its inputs, and the cache keeps its own), so features never
// leave the encoder's memory other than into a decoder run. When the encoder has evicted them
// (FEATURES_MISSING), the tile is encoded again from its bytes and prepared with those features
// (the decoder here accepts a Prepare's features: its only caller is this process); when the decoder
// has evicted a prepared tile between Prepare and Decode (NOT_PREPARED), it is prepared again. The
// same rules the gRPC adapter follows, by the same typed reasons. Detections and masks are rounded
// as the wire rounds them, so the answers equal the services' to the bit.
import type { Manifest } from '@cfrsam/contract';
import { DEFAULT_MAX_FEATURES_WAIT_MS, type DecoderPipeline, type FeatureSource } from '@cfrsam/decoder/dist/pipeline';
import type { EncoderPipeline } from '@cfrsam/encoder/dist/pipeline';
import { Limiter } from '@cfrsam/gateway/dist/limiter';
import type { StageCall, StagePorts, StageTile } from '@cfrsam/gateway/dist/stages/ports';
import { promptBatches, tileParallelism } from '@cfrsam/gateway/dist/stages/promptBatches';
import type { PrompterPipeline } from '@cfrsam/prompter/dist/pipeline';
import { errorReason, ErrorReason, grpcError, logger, stagesProto, status } from '@cfrsam/rpc';

export interface LocalStagePipelines {
  prompter: PrompterPipeline;
  encoder: EncoderPipeline;
  decoder: DecoderPipeline;
}

export interface LocalStagesOptions {
  /** Most prompts per decoder call (the gateway's decodeBatchSize). */
  decodeBatchSize: number;
  /** Decoder calls of one tile at once: the decoder pool's workers (promptBatches). */
  decodeParallelism: number;
  /** Decoder calls (Prepare + Decode) in flight at once across all requests (the gateway's maxDecoderCalls). */
  maxDecoderCalls: number;
  /** Closes the pipelines' worker pools (called once, by close()). */
  close?: () => void;
}

/**
 * The encoder's feature cache as the decoder's feature source. A tile's early Prepare starts
 * together with its Encode, so that fetch waits up to its `waitMs` for the tile to reach the encoder.
 */
export function encoderCacheSource(encoder: EncoderPipeline): FeatureSource {
  return {
    name: 'encoder (this process)',
    fetch: async (digest, _hint, waitMs) => {
      if (waitMs > 0) await encoder.cache.untilPresent(digest, waitMs);
      const values = encoder.cache.get(digest) ?? (await encoder.cache.pending(digest)?.catch(() => undefined));
      // A copy: the decoder hands its features to a worker, which takes ownership of the buffer.
      if (values) return { values: values.slice() };
      return { values: null, error: 'not in the encoder cache' };
    },
  };
}

export class LocalStages implements StagePorts {
  private readonly limiter: Limiter;
  private closed = false;

  constructor(
    private readonly manifest: Manifest,
    private readonly pipelines: LocalStagePipelines,
    private readonly options: LocalStagesOptions,
  ) {
    this.limiter = new Limiter(options.maxDecoderCalls);
  }

  readonly prompter = {
    detect: async (tiles: readonly StageTile[], call: StageCall): Promise<Map<string, stagesProto.TileDetections>> => {
      const response = await call.clock.time('prompter', () =>
        this.pipelines.prompter.detect(
          { tiles: tiles.map(tileInput), minForeground: 0, nmsRadius: 0, modelVersion: this.manifest.version },
          call.signal,
        ),
      );
      return new Map(asOnTheWire(stagesProto.DetectResponse, response).tiles.map((t) => [t.digest, t]));
    },
  };

  readonly encoder = {
    encode: async (tiles: readonly StageTile[], call: StageCall): Promise<{ cacheHits: number }> => {
      const { response } = await call.clock.time('encoder', () =>
        this.pipelines.encoder.encode({ tiles: tiles.map(tileInput), modelVersion: this.manifest.version, returnFeatures: false }),
      );
      return { cacheHits: response.tiles.filter((t) => t.cacheHit).length };
    },
  };

  readonly decoder = {
    decodeTile: async (tile: StageTile, prompts: readonly stagesProto.PromptPoints[], call: StageCall): Promise<stagesProto.DecodedMask[]> => {
      if (prompts.length === 0) return [];
      const parallelism = tileParallelism(this.options.decodeParallelism, call.tilesInFlight?.() ?? 1);
      const batches = promptBatches(prompts, this.options.decodeBatchSize, parallelism);
      // One Prepare for the tile (the pipeline's cache joins concurrent ones); the batches then
      // share the prepared state across the decoder's workers.
      await this.prepare(tile, call);
      const results = await Promise.all(batches.map((batch) => this.decodeBatch(tile, batch, call)));
      return results.flat();
    },
    // Called with the tile's Encode: the fetch may wait for the features it is computing.
    prepareTile: (tile: StageTile, call: StageCall): Promise<void> => this.prepare(tile, call, DEFAULT_MAX_FEATURES_WAIT_MS),
  };

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.options.close?.();
  }

  private async decodeBatch(tile: StageTile, batch: stagesProto.PromptPoints[], call: StageCall): Promise<stagesProto.DecodedMask[]> {
    for (let attempt = 0; ; attempt++) {
      try {
        const response = await this.limiter.run(
          () =>
            call.clock.time('decoder_decode', () =>
              this.pipelines.decoder.decode({ digest: tile.digest, prompts: batch, modelVersion: this.manifest.version }, call.signal),
            ),
          call.signal,
        );
        if (response.masks.length !== batch.length) {
          throw grpcError(status.INTERNAL, `decoder returned ${response.masks.length} masks for ${batch.length} prompts`);
        }
        return asOnTheWire(stagesProto.DecodeResponse, response).masks;
      } catch (err) {
        // Evicted between Prepare and Decode (other requests filled the cache): prepare again.
        if (errorReason(err) !== ErrorReason.NOT_PREPARED || attempt >= 2) throw err;
        logger().warn({
          msg: `standalone: tile ${tile.digest.slice(0, 12)} was evicted from the decoder cache; preparing it again`,
          reason: 'NOT_PREPARED',
        });
        await this.prepare(tile, call);
      }
    }
  }

  /** `featuresWaitMs`: how long the feature fetch may wait for an Encode in flight (0: none is). */
  private async prepare(tile: StageTile, call: StageCall, featuresWaitMs = 0): Promise<void> {
    if (this.pipelines.decoder.cache.has(tile.digest)) return;
    // Without features the decoder reads them from the encoder's cache (encoderCacheSource).
    const prepareWith = (features?: stagesProto.Tensor) =>
      this.limiter.run(
        () =>
          call.clock.time('decoder_prepare', () =>
            this.pipelines.decoder.prepare(
              { ...tileInput(tile), features, featuresFrom: '', featuresWaitMs: features ? 0 : featuresWaitMs, modelVersion: this.manifest.version },
              call.signal,
            ),
          ),
        call.signal,
      );
    try {
      await prepareWith();
    } catch (err) {
      if (errorReason(err) !== ErrorReason.FEATURES_MISSING) throw err;
      logger().warn({
        msg: `standalone: features of tile ${tile.digest.slice(0, 12)} were evicted from the encoder cache; encoding it again`,
        reason: 'FEATURES_MISSING',
      });
      // The encoder evicted the features: encode the tile again (its bytes are here) and hand the
      // features to Prepare directly, so a cache under pressure cannot evict them again in between.
      const { response } = await call.clock.time('encoder', () =>
        this.pipelines.encoder.encode({ tiles: [tileInput(tile)], modelVersion: this.manifest.version, returnFeatures: true }),
      );
      // A copy, as the wire would make: the response's features share the encoder cache's buffer,
      // and the decoder hands what it is given to a worker, which detaches it; the cache entry
      // would be left empty for every later Prepare of this tile.
      const features = response.tiles[0]?.features;
      await prepareWith(features && { ...features, data: Buffer.from(features.data) });
    }
  }
}

/**
 * The message as the services would receive it: scores and probabilities rounded to the proto's
 * float32, so both deployments give the same answers to the bit. These messages are small (points,
 * bit-packed masks); tiles and features never pass through here.
 */
function asOnTheWire<T>(codec: { encode(message: T): { finish(): Uint8Array }; decode(bytes: Uint8Array): T }, message: T): T {
  return codec.decode(codec.encode(message).finish());
}

function tileInput(tile: StageTile): stagesProto.TileInput {
  return { digest: tile.digest, rgb: Buffer.from(tile.rgb.buffer, tile.rgb.byteOffset, tile.rgb.byteLength) };
}
