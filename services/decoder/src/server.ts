// Decoder transport: gRPC handlers for Prepare and Decode and the assembly of a running decoder
// (manifest -> worker pool -> pipeline with its prepared-state cache -> gRPC server).
import {
  loadManifest,
  OnnxWorkerPool,
  serviceMetrics,
  SpanAttributes,
  stagesProto,
  startServer,
  status,
  unaryHandler,
  type ConnectionAgeOptions,
  type RunningServer,
} from '@cfrsam/common';
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

export interface DecoderOptions extends DecoderPipelineOptions {
  port: number;
  host?: string;
  bundle: string;
  workers?: number;
  intraOpThreads?: number;
  maxQueue?: number;
  executionProviders?: string[];
  maxMessageBytes?: number;
  shutdownGraceMs?: number;
  connectionAge?: ConnectionAgeOptions;
  handleSignals?: boolean;
  faultInjection?: boolean;
  onShutdown?: () => Promise<void> | void;
}

export interface RunningDecoder {
  server: RunningServer;
  pipeline: DecoderPipeline;
  pool: OnnxWorkerPool;
}

/** Loads the bundle, starts the worker pool and serves Prepare/Decode. */
export async function startDecoder(options: DecoderOptions): Promise<RunningDecoder> {
  const manifest = loadManifest(options.bundle, { graphs: ['decoder_image', 'decoder_prompts'] });
  const metrics = serviceMetrics();
  let server: RunningServer | undefined;
  const pool = await OnnxWorkerPool.create({
    name: 'decoder',
    graphs: {
      decoder_image: manifest.graphs.decoder_image!.path,
      decoder_prompts: manifest.graphs.decoder_prompts!.path,
    },
    workers: options.workers,
    intraOpThreads: options.intraOpThreads,
    maxQueue: options.maxQueue,
    executionProviders: options.executionProviders,
    faultInjection: options.faultInjection,
    // Workers that can no longer load the graphs make the service useless: report NOT_SERVING.
    onBroken: () => server?.setServing(false),
    onJobDone: ({ graph, queuedMs, runMs }) => {
      metrics.poolWait(graph, queuedMs / 1000);
      metrics.stage(`${graph}.run`, runMs / 1000);
    },
  });
  const pipeline = new DecoderPipeline(manifest, pool, options);
  const closeAll = async () => {
    await pool.close();
    await options.sharedStore?.close();
  };
  try {
    server = await startServer({
      name: 'decoder',
      port: options.port,
      host: options.host,
      services: [{ name: DECODER_SERVICE_NAME, definition: stagesProto.DecoderService, implementation: decoderHandlers(pipeline) }],
      maxMessageBytes: options.maxMessageBytes,
      shutdownGraceMs: options.shutdownGraceMs,
      connectionAge: options.connectionAge,
      handleSignals: options.handleSignals,
      onShutdown: async () => {
        await closeAll();
        await options.onShutdown?.();
      },
    });
    return { server, pipeline, pool };
  } catch (err) {
    await closeAll();
    throw err;
  }
}
