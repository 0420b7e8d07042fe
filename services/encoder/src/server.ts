// Encoder transport: gRPC handlers for Encode and GetCacheStats and the assembly of a running
// encoder (manifest -> worker pool -> pipeline with its cache and optional shared tier -> gRPC server).
import {
  loadManifest,
  OnnxWorkerPool,
  serviceMetrics,
  SpanAttributes,
  stagesProto,
  startServer,
  unaryHandler,
  type ConnectionAgeOptions,
  type RunningServer,
} from '@cfrsam/common';
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

export interface EncoderOptions extends EncoderPipelineOptions {
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

export interface RunningEncoder {
  server: RunningServer;
  pipeline: EncoderPipeline;
  pool: OnnxWorkerPool;
}

/** Loads the bundle, starts the worker pool and serves Encode/GetCacheStats. */
export async function startEncoder(options: EncoderOptions): Promise<RunningEncoder> {
  const manifest = loadManifest(options.bundle, { graphs: ['encoder'] });
  const metrics = serviceMetrics();
  let server: RunningServer | undefined;
  const pool = await OnnxWorkerPool.create({
    name: 'encoder',
    graphs: { encoder: manifest.graphs.encoder!.path },
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
  const pipeline = new EncoderPipeline(manifest, pool, options);
  const closeAll = async () => {
    await pool.close();
    // After the drain: writes of features computed by the last calls still go out.
    await options.sharedStore?.close();
  };
  try {
    server = await startServer({
      name: 'encoder',
      port: options.port,
      host: options.host,
      services: [{ name: ENCODER_SERVICE_NAME, definition: stagesProto.EncoderService, implementation: encoderHandlers(pipeline) }],
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
