// Gateway transport: the gRPC handlers of the public Segmentation service and the assembly of a
// running gateway (manifest -> pipeline -> gRPC server with health, reflection, graceful shutdown).
import {
  type CallAuthenticator,
  type ConnectionAgeOptions,
  logger,
  type RunningServer,
  segmentationProto,
  type ServerTlsOptions,
  serviceMetrics,
  SpanAttributes,
  startServer,
  unaryHandler,
} from '@cfrsam/rpc';
import { loadManifest } from '@cfrsam/contract';
import { DEFAULT_GATEWAY_CONFIG, type GatewayConfig } from './config';
import { startHttpGateway, type RunningHttpGateway } from './http';
import { admissionDoor, RESERVATION_HEADER } from './admission/door';
import { SegmentationPipeline } from './pipeline';
import { GrpcStages } from './stages/grpcStages';
import type { StagePorts } from './stages/ports';
import { DEFAULT_SLIDE_JOB_SETTINGS, type SlideJobSettings } from './slideJobs';
import { slideJobHandlers, startSlideJobs, type SlideJobsRuntime, type SlideMethods } from './slideWorker';

export const SEGMENTATION_SERVICE_NAME = 'cfrsam.v1.Segmentation';
export const DEFAULT_GATEWAY_PORT = 50051;

export function segmentationHandlers(pipeline: SegmentationPipeline): Omit<segmentationProto.SegmentationServer, keyof SlideMethods> {
  return {
    segment: unaryHandler(`${SEGMENTATION_SERVICE_NAME}/Segment`, async (request: segmentationProto.SegmentRequest, ctx) => {
      ctx.span.setAttributes({ 'cfrsam.image_bytes': request.image.length, [SpanAttributes.prompts]: request.prompts.length });
      const reservation = ctx.metadata.get(RESERVATION_HEADER)[0];
      const response = await pipeline.segment(request, {
        deadline: ctx.deadline,
        signal: ctx.signal,
        identity: ctx.identity.id,
        reservation: typeof reservation === 'string' ? reservation : undefined,
      });
      recordTimings(response.timings);
      ctx.span.setAttributes({
        'cfrsam.image_id': response.imageId,
        [SpanAttributes.tiles]: response.tiles,
        'cfrsam.nuclei': response.nuclei.length,
      });
      return response;
    }),
    refine: unaryHandler(`${SEGMENTATION_SERVICE_NAME}/Refine`, async (request: segmentationProto.RefineRequest, ctx) => {
      ctx.span.setAttributes({ 'cfrsam.image_id': request.imageId, [SpanAttributes.prompts]: request.prompts.length });
      const response = await pipeline.refine(request, { deadline: ctx.deadline, signal: ctx.signal, identity: ctx.identity.id });
      recordTimings(response.timings);
      ctx.span.setAttribute('cfrsam.nuclei', response.nuclei.length);
      return response;
    }),
    getModelInfo: unaryHandler(`${SEGMENTATION_SERVICE_NAME}/GetModelInfo`, async () => pipeline.modelInfo()),
  };
}

/** Stage latency histograms (cfrsam_stage_duration_seconds{stage="gateway.<stage>"}). */
function recordTimings(timings: readonly segmentationProto.StageTiming[]): void {
  const metrics = serviceMetrics();
  for (const t of timings) metrics.stage(`gateway.${t.stage}`, t.ms / 1000);
}

export interface GatewayOptions extends Partial<Omit<GatewayConfig, 'prompter' | 'encoder' | 'decoders'>>, Partial<SlideJobSettings> {
  port: number;
  host?: string;
  bundle: string;
  /**
   * The stages themselves, when they are not reached over gRPC (the standalone entry runs them in
   * its own process); then the replica addresses below are not used.
   */
  stages?: StagePorts;
  /** Prompter replicas (one address, or a list used round-robin with failover). */
  prompter: string | string[];
  /** Encoder replicas (one address, or a list; tiles go to replicas by rendezvous on their digest). */
  encoder: string | string[];
  /** Decoder replicas: `host:port` entries and/or `dns:///NAME:PORT` (every address NAME resolves to). */
  decoders: string[];
  /** How often `dns:///` decoder entries are resolved again (default 5000 ms). */
  decoderDnsIntervalMs?: number;
  /** Closing client connections after an age, so clients spread over new gateway pods. */
  connectionAge?: ConnectionAgeOptions;
  /** gRPC message limit for requests, responses and stage calls (label maps of big images are big). */
  maxMessageBytes?: number;
  /** Port of the HTTP/JSON API beside gRPC (http.ts); off when absent or negative, any free port when 0. */
  httpPort?: number;
  /** CORS origins of the HTTP/JSON API ("*", a comma-separated list, or "" for none). */
  corsOrigins?: string;
  /** TLS of the public API (gRPC and HTTP/JSON); plaintext when absent. */
  tls?: ServerTlsOptions;
  /** Client bearer tokens of the public API (gRPC and HTTP/JSON); every caller is served when absent. */
  auth?: CallAuthenticator;
  /** The services' shared secret, sent to the stage services (which refuse other callers). */
  internalToken?: string;
  /** Serve gRPC server reflection (default true). */
  reflection?: boolean;
  shutdownGraceMs?: number;
  handleSignals?: boolean;
  onShutdown?: () => Promise<void> | void;
}

export interface RunningGateway {
  server: RunningServer;
  pipeline: SegmentationPipeline;
  stages: StagePorts;
  http?: RunningHttpGateway;
}

/** Loads the manifest (the gateway runs no graph, so graph files are not needed) and serves. */
export async function startGateway(options: GatewayOptions): Promise<RunningGateway> {
  const manifest = loadManifest(options.bundle, { graphs: [], verifyGraphs: false });
  const prompter = [options.prompter].flat().filter(Boolean);
  const encoder = [options.encoder].flat().filter(Boolean);
  if (!options.stages && (prompter.length === 0 || encoder.length === 0)) {
    throw new Error('at least one prompter and one encoder address are needed');
  }
  const config: GatewayConfig = {
    ...DEFAULT_GATEWAY_CONFIG,
    ...stripUndefined(options),
    decoders: options.decoders,
    prompter,
    encoder,
  } as GatewayConfig;
  const stages = options.stages ?? (await grpcStages(options, config, manifest.version));
  const pipeline = new SegmentationPipeline(manifest, config, stages);
  // Slide jobs (slideJobs.ts) when a NATS server is configured.
  let slideJobs: SlideJobsRuntime | null = null;
  let httpGateway: RunningHttpGateway | undefined;
  try {
    if (options.natsUrl) {
      slideJobs = await startSlideJobs(
        {
          ...DEFAULT_SLIDE_JOB_SETTINGS,
          ...stripUndefined(options),
          natsUrl: options.natsUrl,
        },
        pipeline,
      );
    }
    const server = await startServer({
      name: 'gateway',
      port: options.port,
      host: options.host,
      services: [
        {
          name: SEGMENTATION_SERVICE_NAME,
          definition: segmentationProto.SegmentationService,
          implementation: { ...segmentationHandlers(pipeline), ...slideJobHandlers(slideJobs) },
        },
      ],
      maxMessageBytes: options.maxMessageBytes,
      shutdownGraceMs: options.shutdownGraceMs,
      connectionAge: options.connectionAge,
      handleSignals: options.handleSignals,
      tls: options.tls,
      auth: options.auth,
      // Segment calls that announce their image size are priced before their body arrives.
      interceptors: [
        admissionDoor({
          methods: [`/${SEGMENTATION_SERVICE_NAME}/Segment`],
          reserve: (announced, identity, deadline) => pipeline.reserveAnnounced(announced, identity, deadline),
          auth: options.auth,
        }),
      ],
      reflection: options.reflection,
      onShutdown: async () => {
        await httpGateway?.close();
        await slideJobs?.close();
        pipeline.close();
        await options.onShutdown?.();
      },
    });
    if (options.httpPort !== undefined && options.httpPort >= 0) {
      httpGateway = await startHttpGateway(pipeline, {
        port: options.httpPort,
        host: options.host,
        maxBodyBytes: options.maxMessageBytes ?? 256 * 1024 * 1024,
        corsOrigins: options.corsOrigins ?? '*',
        auth: options.auth,
        tls: options.tls,
        serving: () => server.serving(),
      });
      // Read by the stack (cli/stack.ts) for the port an --http-port 0 was given.
      logger().info(`gateway: HTTP/JSON API listening on ${options.host ?? '0.0.0.0'}:${httpGateway.port}`);
    }
    return { server, pipeline, stages, http: httpGateway };
  } catch (err) {
    await httpGateway?.close();
    await slideJobs?.close();
    pipeline.close();
    throw err;
  }
}

/**
 * The stages over gRPC; `dns:///NAME:PORT` entries (headless Services) become one replica per
 * address, kept current while the gateway runs.
 */
async function grpcStages(options: GatewayOptions, config: GatewayConfig, modelVersion: string): Promise<GrpcStages> {
  const stages = new GrpcStages({
    ...config,
    modelVersion,
    dnsIntervalMs: options.decoderDnsIntervalMs ?? 5000,
    client: { maxMessageBytes: options.maxMessageBytes, bearerToken: options.internalToken },
    onFailover: (stage, replica, err) =>
      logger().warn({ msg: `gateway: ${stage} ${replica} failed (${err.details ?? err.message}); trying the next replica`, stage, replica }),
  });
  try {
    await stages.start();
  } catch (err) {
    stages.close();
    throw err;
  }
  return stages;
}

function stripUndefined<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}
