// Start-up shared by the model-serving stage services (prompter, encoder, decoder): manifest ->
// ONNX worker pool -> pipeline -> gRPC server, with the pool's health and timings wired to the
// server and metrics, and everything closed in order on shutdown or failed start-up.
import type { UntypedServiceImplementation, ServiceDefinition } from '@grpc/grpc-js';
import { loadManifest, type GraphName, type Manifest } from '@cfrsam/contract';
import { CallAuthenticator, serviceMetrics, startServer, type ConnectionAgeOptions, type RunningServer } from '@cfrsam/rpc';
import { OnnxWorkerPool } from './workerPool';

/** Options every stage service takes (its own pipeline options come on top). */
export interface StageServiceOptions {
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
  /**
   * The services' shared secret: when set, only callers presenting it (`authorization: Bearer`)
   * are served (the gateway, its slide workers, decoders fetching features). Health stays open.
   */
  internalToken?: string;
  /** Serve gRPC server reflection (default true). */
  reflection?: boolean;
  /** Test hook passed to the pool (see OnnxWorkerPoolOptions.faultInjection). */
  faultInjection?: boolean;
  /** Extra work on shutdown, after the pool closed (flush tracing, stop metrics). */
  onShutdown?: () => Promise<void> | void;
}

export interface RunningStageService<P> {
  server: RunningServer;
  pipeline: P;
  pool: OnnxWorkerPool;
}

export interface StageServiceSpec<P> {
  /** Process name in logs and metrics, e.g. 'encoder'. */
  name: string;
  /** Fully qualified gRPC service name (health checking), e.g. 'cfrsam.v1.Encoder'. */
  serviceName: string;
  definition: ServiceDefinition;
  /** The bundle graphs this service runs. */
  graphs: GraphName[];
  /** Graphs it runs too when the bundle has them (the prompter's point_refiner). */
  optionalGraphs?: GraphName[];
  createPipeline: (manifest: Manifest, pool: OnnxWorkerPool) => P;
  handlers: (pipeline: P) => UntypedServiceImplementation;
  /** Closed after the pool on shutdown (e.g. the shared feature store, whose writes drain last). */
  closeAfterPool?: () => Promise<void> | void;
}

/** Loads the bundle, starts the worker pool and serves the stage's gRPC service. */
export async function startStageService<P>(spec: StageServiceSpec<P>, options: StageServiceOptions): Promise<RunningStageService<P>> {
  const manifest = loadManifest(options.bundle, { graphs: spec.graphs, optionalGraphs: spec.optionalGraphs });
  const graphs = [...spec.graphs, ...(spec.optionalGraphs ?? []).filter((g) => manifest.graphs[g] !== undefined)];
  const metrics = serviceMetrics();
  let server: RunningServer | undefined;
  const pool = await OnnxWorkerPool.create({
    name: spec.name,
    graphs: Object.fromEntries(graphs.map((g) => [g, manifest.graphs[g]!.path])),
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
  const pipeline = spec.createPipeline(manifest, pool);
  const closeAll = async () => {
    await pool.close();
    await spec.closeAfterPool?.();
  };
  try {
    server = await startServer({
      name: spec.name,
      port: options.port,
      host: options.host,
      services: [{ name: spec.serviceName, definition: spec.definition, implementation: spec.handlers(pipeline) }],
      maxMessageBytes: options.maxMessageBytes,
      shutdownGraceMs: options.shutdownGraceMs,
      connectionAge: options.connectionAge,
      handleSignals: options.handleSignals,
      auth: options.internalToken ? new CallAuthenticator({ internalToken: options.internalToken }) : undefined,
      reflection: options.reflection,
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
