// Prompter transport: the gRPC handler for Detect and the assembly of a running prompter
// (manifest -> worker pool -> pipeline -> gRPC server).
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
import { PrompterPipeline, type PrompterPipelineOptions } from './pipeline';

export const PROMPTER_SERVICE_NAME = 'cfrsam.v1.Prompter';
export const DEFAULT_PROMPTER_PORT = 50052;

/** The Prompter service implementation over a pipeline. */
export function prompterHandlers(pipeline: PrompterPipeline): stagesProto.PrompterServer {
  return {
    detect: unaryHandler(`${PROMPTER_SERVICE_NAME}/Detect`, async (request: stagesProto.DetectRequest, ctx) => {
      ctx.span.setAttribute(SpanAttributes.tiles, request.tiles.length);
      if (request.tiles.length === 1) ctx.span.setAttribute(SpanAttributes.digest, request.tiles[0].digest);
      const metrics = serviceMetrics();
      const response = await metrics.timeStage('prompter.detect', () => pipeline.detect(request, ctx.signal));
      ctx.span.setAttribute(
        SpanAttributes.prompts,
        response.tiles.reduce((n, t) => n + t.detections.length, 0),
      );
      return response;
    }),
  };
}

export interface PrompterOptions extends PrompterPipelineOptions {
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
  /** Test hook passed to the pool (see OnnxWorkerPoolOptions.faultInjection). */
  faultInjection?: boolean;
  /** Extra work on shutdown, after the pool closed (flush tracing, stop metrics). */
  onShutdown?: () => Promise<void> | void;
}

export interface RunningPrompter {
  server: RunningServer;
  pipeline: PrompterPipeline;
  pool: OnnxWorkerPool;
}

/** Loads the bundle, starts the worker pool and serves Detect. */
export async function startPrompter(options: PrompterOptions): Promise<RunningPrompter> {
  const manifest = loadManifest(options.bundle, { graphs: ['prompter'] });
  const metrics = serviceMetrics();
  let server: RunningServer | undefined;
  const pool = await OnnxWorkerPool.create({
    name: 'prompter',
    graphs: { prompter: manifest.graphs.prompter!.path },
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
  const pipeline = new PrompterPipeline(manifest, pool, options);
  try {
    server = await startServer({
      name: 'prompter',
      port: options.port,
      host: options.host,
      services: [
        { name: PROMPTER_SERVICE_NAME, definition: stagesProto.PrompterService, implementation: prompterHandlers(pipeline) },
      ],
      maxMessageBytes: options.maxMessageBytes,
      shutdownGraceMs: options.shutdownGraceMs,
      connectionAge: options.connectionAge,
      handleSignals: options.handleSignals,
      onShutdown: async () => {
        await pool.close();
        await options.onShutdown?.();
      },
    });
    return { server, pipeline, pool };
  } catch (err) {
    await pool.close();
    throw err;
  }
}
