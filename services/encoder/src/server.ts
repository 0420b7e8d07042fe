// Encoder transport: gRPC handlers for Encode and GetCacheStats and the assembly of a running
// encoder (manifest -> worker pool -> pipeline with its cache and optional shared tier -> gRPC server).
import { serviceMetrics, SpanAttributes, stagesProto, unaryHandler } from '@cfrsam/rpc';
import { type RunningStageService, type StageServiceOptions, startStageService } from '@cfrsam/runtime';
import { EncoderPipeline, type EncoderPipelineOptions } from './pipeline';

export const ENCODER_SERVICE_NAME = 'cfrsam.v1.Encoder';
export const DEFAULT_ENCODER_PORT = 50053;

export function encoderHandlers(pipeline: EncoderPipeline): stagesProto.EncoderServer {
  return {
    encode: unaryHandler(`${ENCODER_SERVICE_NAME}/Encode`, async (request: stagesProto.EncodeRequest, ctx) => {
      ctx.span.setAttribute(SpanAttributes.tiles, request.tiles.length);
      if (request.tiles.length === 1) ctx.span.setAttribute(SpanAttributes.digest, request.tiles[0].digest);
      const metrics = serviceMetrics();
      const { response, summary } = await metrics.timeStage('encoder.encode', () => pipeline.encode(request));
      // The local LRU missed what the shared tier served.
      metrics.cache('encoder.features', { hits: summary.hits, misses: summary.misses + summary.sharedHits, coalesced: summary.coalesced });
      if (pipeline.sharedStore) metrics.cache('encoder.shared_features', { hits: summary.sharedHits, misses: summary.sharedMisses });
      ctx.span.setAttribute(SpanAttributes.cacheHit, summary.misses === 0 && summary.coalesced === 0);
      ctx.span.setAttribute('cfrsam.cache_hits', summary.hits);
      ctx.span.setAttribute('cfrsam.shared_cache_hits', summary.sharedHits);
      ctx.span.setAttribute('cfrsam.cache_coalesced', summary.coalesced);
      ctx.span.setAttribute(SpanAttributes.batchSize, summary.misses);
      if (summary.misses > 0) metrics.batch('encoder', summary.misses);
      return response;
    }),
    getCacheStats: unaryHandler(`${ENCODER_SERVICE_NAME}/GetCacheStats`, async () => pipeline.cacheStats()),
  };
}

export interface EncoderOptions extends EncoderPipelineOptions, StageServiceOptions {}

export type RunningEncoder = RunningStageService<EncoderPipeline>;

/** Loads the bundle, starts the worker pool and serves Encode/GetCacheStats. */
export function startEncoder(options: EncoderOptions): Promise<RunningEncoder> {
  return startStageService(
    {
      name: 'encoder',
      serviceName: ENCODER_SERVICE_NAME,
      definition: stagesProto.EncoderService,
      graphs: ['encoder'],
      createPipeline: (manifest, pool) => new EncoderPipeline(manifest, pool, options),
      handlers: encoderHandlers,
      // After the drain: writes of features computed by the last calls still go out.
      closeAfterPool: () => options.sharedStore?.close(),
    },
    options,
  );
}
