// Decoder transport: gRPC handlers for Prepare and Decode and the assembly of a running decoder
// (manifest -> worker pool -> pipeline with its prepared-state cache -> gRPC server).
import { serviceMetrics, SpanAttributes, stagesProto, status, unaryHandler } from '@cfrsam/rpc';
import { type RunningStageService, type StageServiceOptions, startStageService } from '@cfrsam/runtime';
import { DecoderPipeline, type DecoderPipelineOptions } from './pipeline';

export const DECODER_SERVICE_NAME = 'cfrsam.v1.Decoder';
export const DEFAULT_DECODER_PORT = 50054;

export function decoderHandlers(pipeline: DecoderPipeline): stagesProto.DecoderServer {
  return {
    prepare: unaryHandler(`${DECODER_SERVICE_NAME}/Prepare`, async (request: stagesProto.PrepareRequest, ctx) => {
      ctx.span.setAttribute(SpanAttributes.digest, request.digest);
      const metrics = serviceMetrics();
      let result;
      try {
        result = await metrics.timeStage('decoder.prepare', () => pipeline.prepare(request));
      } catch (err) {
        // NOT_FOUND is Prepare's answer to features absent from the shared tier.
        if (pipeline.sharedStore && (err as { code?: unknown }).code === status.NOT_FOUND) metrics.cache('decoder.shared_features', { misses: 1 });
        throw err;
      }
      if (result.sharedFeatures) {
        metrics.cache('decoder.shared_features', { hits: 1 });
        ctx.span.setAttribute('cfrsam.shared_cache_hit', true);
      }
      ctx.span.setAttribute(SpanAttributes.cacheHit, result.alreadyPrepared);
      metrics.cache('decoder.prepared', result.alreadyPrepared ? { hits: 1 } : { misses: 1 });
      return { alreadyPrepared: result.alreadyPrepared };
    }),
    decode: unaryHandler(`${DECODER_SERVICE_NAME}/Decode`, async (request: stagesProto.DecodeRequest, ctx) => {
      ctx.span.setAttribute(SpanAttributes.digest, request.digest);
      ctx.span.setAttribute(SpanAttributes.prompts, request.prompts.length);
      const metrics = serviceMetrics();
      const { masks, runs } = await metrics.timeStage('decoder.decode', () => pipeline.decode(request, ctx.signal));
      ctx.span.setAttribute(SpanAttributes.batchSize, Math.max(...runs));
      for (const size of runs) metrics.batch('decoder', size);
      return { masks };
    }),
  };
}

export interface DecoderOptions extends DecoderPipelineOptions, StageServiceOptions {}

export type RunningDecoder = RunningStageService<DecoderPipeline>;

/** Loads the bundle, starts the worker pool and serves Prepare/Decode. */
export function startDecoder(options: DecoderOptions): Promise<RunningDecoder> {
  return startStageService(
    {
      name: 'decoder',
      serviceName: DECODER_SERVICE_NAME,
      definition: stagesProto.DecoderService,
      graphs: ['decoder_image', 'decoder_prompts'],
      createPipeline: (manifest, pool) => new DecoderPipeline(manifest, pool, options),
      handlers: decoderHandlers,
      closeAfterPool: () => options.sharedStore?.close(),
    },
    options,
  );
}
