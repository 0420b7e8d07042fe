#!/usr/bin/env node
// cfrsam-gateway: serves the public cfrsam.v1.Segmentation API in front of the prompter, encoder
// and decoder replicas. Flags fall back to environment variables and defaults that work on one
// machine (stage services on their default loopback ports); `--help` lists them.
import {
  authenticatorFromFlags,
  ConfigError,
  connectionAgeFromFlags,
  defaultBundleDir,
  type FlagSpec,
  initServiceTelemetry,
  listFlag,
  parseFlags,
  processFlags,
  runMain,
  securityFlags,
  tlsFromFlags,
} from '@cfrsam/rpc';
import { DEFAULT_GATEWAY_CONFIG as D } from './config';
import { DEFAULT_GATEWAY_PORT, startGateway, type GatewayOptions, type RunningGateway } from './server';
import { slideJobFlags } from './slideJobs';

export const GATEWAY_FLAGS = {
  port: { type: 'int', env: 'PORT', default: DEFAULT_GATEWAY_PORT, help: 'gRPC port' },
  httpPort: {
    type: 'int',
    env: 'CFRSAM_HTTP_PORT',
    default: -1,
    help: 'HTTP/JSON API port (POST /v1/segment, /v1/refine; GET /v1/model); -1: off, 0: any free port',
  },
  corsOrigins: {
    type: 'string',
    env: 'CFRSAM_CORS_ORIGINS',
    default: '*',
    help: 'CORS origins of the HTTP/JSON API: *, a comma-separated list, or empty for none',
  },
  host: { type: 'string', env: 'HOST', default: '0.0.0.0', help: 'address to listen on' },
  bundle: { type: 'string', env: 'CFRSAM_BUNDLE', default: defaultBundleDir(), help: 'model bundle directory (the manifest is read)' },
  prompter: {
    type: 'string',
    env: 'CFRSAM_PROMPTER',
    default: '127.0.0.1:50052',
    help: 'prompter replicas, comma separated: host:port or dns:///NAME:PORT (round-robin with failover)',
  },
  encoder: {
    type: 'string',
    env: 'CFRSAM_ENCODER',
    default: '127.0.0.1:50053',
    help: 'encoder replicas, comma separated: host:port or dns:///NAME:PORT (rendezvous on the tile digest, with failover)',
  },
  decoders: {
    type: 'string',
    env: 'CFRSAM_DECODERS',
    default: '127.0.0.1:50054',
    help: 'decoder replicas, comma separated: host:port, or dns:///NAME:PORT for every address NAME resolves to (a headless Service)',
  },
  decoderDnsIntervalMs: {
    type: 'int',
    env: 'CFRSAM_DECODER_DNS_INTERVAL_MS',
    default: 5000,
    help: 'how often dns:/// replica names (prompter, encoder, decoders) are resolved again',
  },
  maxImagePixels: { type: 'int', env: 'CFRSAM_MAX_IMAGE_PIXELS', default: D.maxImagePixels, help: 'largest accepted image (width x height)' },
  minImageSide: { type: 'int', env: 'CFRSAM_MIN_IMAGE_SIDE', default: D.minImageSide, help: 'smallest accepted width and height' },
  maxPrompts: { type: 'int', env: 'CFRSAM_MAX_PROMPTS', default: D.maxPrompts, help: 'manual prompts per request' },
  maxPointsPerPrompt: { type: 'int', env: 'CFRSAM_MAX_POINTS', default: D.maxPointsPerPrompt, help: 'points per manual prompt' },
  tileOverlap: { type: 'int', env: 'CFRSAM_TILE_OVERLAP', default: D.tileOverlap, help: 'overlap of neighbouring tiles in pixels' },
  tileBatchSize: { type: 'int', env: 'CFRSAM_TILE_BATCH', default: D.tileBatchSize, help: 'tiles per Detect/Encode call' },
  tileBatchConcurrency: {
    type: 'int',
    env: 'CFRSAM_TILE_BATCH_CONCURRENCY',
    default: D.tileBatchConcurrency,
    help: 'tile batches in flight per request',
  },
  decodeBatchSize: { type: 'int', env: 'CFRSAM_DECODE_BATCH', default: D.decodeBatchSize, help: 'most prompts per Decode call' },
  decodeParallelism: {
    type: 'int',
    env: 'CFRSAM_DECODE_PARALLELISM',
    default: D.decodeParallelism,
    help: "Decode calls of one tile that run at once (the decoder's workers); a tile's prompts are split into equal batches filling them",
  },
  replicasPerTile: {
    type: 'int',
    env: 'CFRSAM_REPLICAS_PER_TILE',
    default: D.replicasPerTile,
    help: 'decoder replicas sharing one tile (rendezvous top-k)',
  },
  maxDecoderCalls: { type: 'int', env: 'CFRSAM_MAX_DECODER_CALLS', default: D.maxDecoderCalls, help: 'decoder calls in flight across all requests' },
  replicaCooldownMs: {
    type: 'int',
    env: 'CFRSAM_REPLICA_COOLDOWN_MS',
    default: D.replicaCooldownMs,
    help: 'how long an unavailable replica is skipped',
  },
  classRadius: {
    type: 'number',
    env: 'CFRSAM_CLASS_RADIUS',
    default: D.classRadius,
    help: 'px: a manual prompt takes the class of a detection this close',
  },
  maxConcurrentRequests: {
    type: 'int',
    env: 'CFRSAM_MAX_REQUESTS',
    default: D.maxConcurrentRequests,
    help: 'most requests run at once (the adaptive limit stays under it); more wait in per-caller queues',
  },
  initialConcurrentRequests: {
    type: 'int',
    env: 'CFRSAM_INITIAL_REQUESTS',
    default: D.initialConcurrentRequests,
    help: 'requests run at once before any latency was measured (the adaptive limit starts here)',
  },
  latencyTolerance: {
    type: 'number',
    env: 'CFRSAM_LATENCY_TOLERANCE',
    default: D.latencyTolerance,
    help: 'latency per pixel this many times the best seen shrinks the concurrency limit',
  },
  glassTileMaxTissue: {
    type: 'number',
    env: 'CFRSAM_GLASS_TILE_MAX_TISSUE',
    default: D.glassTileMaxTissue,
    help: 'automatic mode: tiles with less than this fraction of stained tissue skip the model (0: none skipped)',
  },
  maxQueuedRequests: { type: 'int', env: 'CFRSAM_MAX_QUEUED', default: D.maxQueuedRequests, help: 'requests waiting for admission at most' },
  maxQueueWaitMs: {
    type: 'int',
    env: 'CFRSAM_MAX_QUEUE_WAIT_MS',
    default: D.maxQueueWaitMs,
    help: 'a request waiting this long without starting gets RESOURCE_EXHAUSTED (0: no bound)',
  },
  maxRequestsPerIdentity: {
    type: 'int',
    env: 'CFRSAM_MAX_REQUESTS_PER_CALLER',
    default: D.maxRequestsPerIdentity,
    help: 'requests one caller (token identity, x-client-id or peer) may have running or waiting (0: no limit)',
  },
  pixelsPerSecondPerIdentity: {
    type: 'number',
    env: 'CFRSAM_PIXELS_PER_SECOND_PER_CALLER',
    default: D.pixelsPerSecondPerIdentity,
    help: 'pixels per second (at the model resolution) one caller may send (0: no limit)',
  },
  initialPixelsPerSecond: {
    type: 'number',
    env: 'CFRSAM_INITIAL_PIXELS_PER_SECOND',
    default: D.initialPixelsPerSecond,
    help: 'throughput assumed before any was measured, for early deadline rejection (0: none until measured)',
  },
  defaultTimeoutMs: {
    type: 'int',
    env: 'CFRSAM_STAGE_TIMEOUT_MS',
    default: D.defaultTimeoutMs,
    help: 'stage call timeout when the client sets no deadline',
  },
  refineCacheMb: {
    type: 'int',
    env: 'CFRSAM_REFINE_CACHE_MB',
    default: D.refineCacheBytes / (1024 * 1024),
    help: 'MiB of recent images kept for Refine',
  },
  resultCacheMb: {
    type: 'int',
    env: 'CFRSAM_RESULT_CACHE_MB',
    default: D.resultCacheBytes / (1024 * 1024),
    help: 'MiB of recent Segment responses answered again for identical requests (0: off)',
  },
  maxMessageMb: { type: 'int', env: 'CFRSAM_MAX_MESSAGE_MB', default: 256, help: 'max gRPC message size in MiB' },
  ...processFlags('close client connections after this long so clients reconnect and reach new gateway pods (0: off)'),
  ...slideJobFlags(),
  ...securityFlags(),
} satisfies Record<string, FlagSpec>;

/** Stage addresses from a comma-separated flag; at least one. */
function addresses(flag: string, value: string, what: string): string[] {
  const list = listFlag(value);
  if (list.length === 0) throw new ConfigError(`--${flag}: at least one ${what} address is needed`);
  return list;
}

export type GatewayFlagValues = ReturnType<typeof parseFlags<typeof GATEWAY_FLAGS>>;
/** Flags of the gRPC path to the stages, which in-process stages do without. */
type StageTransportFlag = 'decoderDnsIntervalMs' | 'internalToken' | 'decodeParallelism';

/**
 * Telemetry, TLS, auth and the gateway from parsed gateway flags; `stages` (and the addresses)
 * come from the caller: this entry's gRPC replicas, or the standalone entry's in-process stages.
 */
export async function startGatewayFromFlags(
  config: Omit<GatewayFlagValues, 'prompter' | 'encoder' | 'decoders' | StageTransportFlag> & Partial<Pick<GatewayFlagValues, StageTransportFlag>>,
  stages: Pick<GatewayOptions, 'stages' | 'prompter' | 'encoder' | 'decoders'>,
  onShutdown?: () => Promise<void> | void,
): Promise<RunningGateway> {
  const telemetry = await initServiceTelemetry({ serviceName: 'gateway', ...config });
  const {
    refineCacheMb,
    resultCacheMb,
    maxMessageMb,
    metricsPort: _m,
    tracing: _t,
    otlpEndpoint: _o,
    maxConnectionAgeMs,
    maxConnectionAgeGraceMs,
    tlsCert: _tc,
    tlsKey: _tk,
    tlsClientCa: _tca,
    authTokens: _at,
    internalToken,
    ...rest
  } = config;
  const security = { ...config, internalToken: internalToken ?? '' };
  const tls = tlsFromFlags(security);
  const auth = authenticatorFromFlags(security, true);
  return startGateway({
    ...rest,
    ...stages,
    connectionAge: connectionAgeFromFlags({ maxConnectionAgeMs, maxConnectionAgeGraceMs }),
    refineCacheBytes: refineCacheMb * 1024 * 1024,
    resultCacheBytes: resultCacheMb * 1024 * 1024,
    maxMessageBytes: maxMessageMb * 1024 * 1024,
    tls,
    auth,
    internalToken: internalToken || undefined,
    handleSignals: true,
    onShutdown: async () => {
      await onShutdown?.();
      await telemetry.tracing.shutdown();
      await telemetry.metrics.close();
    },
  });
}

async function main(): Promise<void> {
  const { prompter, encoder, decoders, ...config } = parseFlags(GATEWAY_FLAGS);
  await startGatewayFromFlags(config, {
    decoders: addresses('decoders', decoders, 'decoder'),
    prompter: addresses('prompter', prompter, 'prompter'),
    encoder: addresses('encoder', encoder, 'encoder'),
  });
}

if (require.main === module) runMain('gateway', main);
