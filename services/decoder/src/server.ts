// Decoder transport: gRPC handlers for Prepare and Decode and the assembly of a running decoder
// (manifest -> worker pool -> pipeline with its prepared-state cache -> gRPC server).
import { ErrorReason, errorReason, serviceMetrics, SpanAttributes, stagesProto, unaryHandler } from '@cfrsam/rpc';
import { type RunningStageService, type StageServiceOptions, startStageService } from '@cfrsam/runtime';
import { EncoderFeatureSource } from './encoderFeatures';
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
        result = await metrics.timeStage('decoder.prepare', () => pipeline.prepare(request, ctx.signal));
      } catch (err) {
        if (errorReason(err) === ErrorReason.FEATURES_MISSING) metrics.cache('decoder.fetched_features', { misses: 1 });
        throw err;
      }
      if (result.featuresFrom) {
        metrics.cache('decoder.fetched_features', { hits: 1 });
        ctx.span.setAttribute('cfrsam.features_from', result.featuresFrom);
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

export interface DecoderOptions extends DecoderPipelineOptions, StageServiceOptions {
  /** Encoder replicas Prepare fetches features from (host:port, dns:///NAME:PORT); none when empty. */
  encoders?: string[];
}

export type RunningDecoder = RunningStageService<DecoderPipeline>;

/** Loads the bundle, starts the worker pool and serves Prepare/Decode. */
export async function startDecoder(options: DecoderOptions): Promise<RunningDecoder> {
  let encoderSource: EncoderFeatureSource | undefined;
  const running = await startStageService(
    {
      name: 'decoder',
      serviceName: DECODER_SERVICE_NAME,
      definition: stagesProto.DecoderService,
      graphs: ['decoder_image', 'decoder_prompts'],
      createPipeline: (manifest, pool) => {
        if (options.encoders?.length) {
          encoderSource = new EncoderFeatureSource({
            targets: options.encoders,
            modelVersion: manifest.version,
            featureCount: manifest.featureShape.reduce((a, b) => a * b, 1),
            // The encoders serve only holders of the internal token (when the services run with one).
            client: { maxMessageBytes: options.maxMessageBytes, bearerToken: options.internalToken },
          });
        }
        return new DecoderPipeline(manifest, pool, { ...options, featureSources: encoderSource ? [encoderSource] : [] });
      },
      handlers: decoderHandlers,
      closeAfterPool: async () => {
        encoderSource?.close();
        await options.sharedStore?.close();
      },
    },
    options,
  );
  await encoderSource?.start();
  return running;
}
