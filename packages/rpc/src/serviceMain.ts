// What every stage service's main() shares: the common flags (with environment fallbacks and
// defaults that start a working service from a fresh clone), process-level telemetry setup, and
// exit codes for bad configuration or a failed start.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { securityFlags } from './auth';
import { initLogger } from './log';
import { ConfigError, defaultBundleDir, HelpRequested, type FlagSpec, type FlagValues } from './config';
import { DEFAULT_MAX_CONNECTION_AGE_GRACE_MS, type ConnectionAgeOptions } from './server';
import { initServiceMetrics, type ServiceMetrics } from './telemetry';
import { initTracing, type TraceExporterKind, type Tracing } from './tracing';

/**
 * Flags every server process has, the gateway too: metrics, tracing, drain on shutdown and the
 * connection age limit (`ageHelp` says what reconnecting reaches for that process).
 */
export function processFlags(ageHelp: string) {
  return {
    metricsPort: { type: 'int', env: 'METRICS_PORT', default: 0, help: 'Prometheus /metrics port (0: off)' },
    tracing: { type: 'string', env: 'CFRSAM_TRACING', default: 'none', help: 'trace exporter: otlp, memory or none' },
    otlpEndpoint: { type: 'string', env: 'OTEL_EXPORTER_OTLP_ENDPOINT', default: 'http://localhost:4317', help: 'OTLP/gRPC collector' },
    shutdownGraceMs: { type: 'int', env: 'CFRSAM_SHUTDOWN_GRACE_MS', default: 15000, help: 'drain time for in-flight calls on SIGTERM' },
    maxConnectionAgeMs: { type: 'int', env: 'CFRSAM_MAX_CONNECTION_AGE_MS', default: 0, help: ageHelp },
    maxConnectionAgeGraceMs: {
      type: 'int',
      env: 'CFRSAM_MAX_CONNECTION_AGE_GRACE_MS',
      default: DEFAULT_MAX_CONNECTION_AGE_GRACE_MS,
      help: 'time calls on an aged connection get to finish before it closes',
    },
  } satisfies Record<string, FlagSpec>;
}

/** Flags of every stage service; `defaultPort` differs per service. */
export function stageServiceFlags(defaultPort: number) {
  return {
    port: { type: 'int', env: 'PORT', default: defaultPort, help: 'gRPC port' },
    host: { type: 'string', env: 'HOST', default: '0.0.0.0', help: 'address to listen on' },
    bundle: { type: 'string', env: 'CFRSAM_BUNDLE', default: defaultBundleDir(), help: 'model bundle directory' },
    workers: { type: 'int', env: 'CFRSAM_WORKERS', default: 1, help: 'inference worker threads' },
    intraOpThreads: { type: 'int', env: 'CFRSAM_INTRA_OP_THREADS', default: 1, help: 'onnxruntime threads per worker' },
    maxQueue: { type: 'int', env: 'CFRSAM_MAX_QUEUE', default: 64, help: 'inference jobs that may wait; more get RESOURCE_EXHAUSTED' },
    executionProviders: {
      type: 'string',
      env: 'CFRSAM_EXECUTION_PROVIDERS',
      default: 'cpu',
      help: 'onnxruntime providers, comma separated (e.g. cuda,cpu)',
    },
    maxMessageMb: { type: 'int', env: 'CFRSAM_MAX_MESSAGE_MB', default: 64, help: 'max gRPC message size in MiB' },
    ...processFlags('close client connections after this long so clients reconnect and reach new replicas (0: off)'),
    internalToken: securityFlags().internalToken,
    reflection: securityFlags().reflection,
  } satisfies Record<string, FlagSpec>;
}

/** startServer's connection age options from the stage flags. */
export function connectionAgeFromFlags(config: { maxConnectionAgeMs: number; maxConnectionAgeGraceMs: number }): ConnectionAgeOptions {
  if (config.maxConnectionAgeMs < 0) throw new ConfigError(`--max-connection-age-ms must be >= 0, got ${config.maxConnectionAgeMs}`);
  if (config.maxConnectionAgeGraceMs < 0) {
    throw new ConfigError(`--max-connection-age-grace-ms must be >= 0, got ${config.maxConnectionAgeGraceMs}`);
  }
  return { maxConnectionAgeMs: config.maxConnectionAgeMs, maxConnectionAgeGraceMs: config.maxConnectionAgeGraceMs };
}

/** A comma-separated flag as its non-empty, trimmed items. */
export function listFlag(value: string): string[] {
  return value
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
}

/**
 * What every stage service's main() passes to its start function, from the common stage flags:
 * telemetry started for `serviceName` and flushed on shutdown, signals handled. Each service adds
 * its own options (batch sizes, caches) to this object.
 */
export async function stageServiceMainOptions(serviceName: string, config: FlagValues<ReturnType<typeof stageServiceFlags>>) {
  const connectionAge = connectionAgeFromFlags(config);
  const telemetry = await initServiceTelemetry({ serviceName, ...config });
  return {
    port: config.port,
    host: config.host,
    bundle: config.bundle,
    workers: config.workers,
    intraOpThreads: config.intraOpThreads,
    maxQueue: config.maxQueue,
    executionProviders: listFlag(config.executionProviders),
    maxMessageBytes: config.maxMessageMb * 1024 * 1024,
    shutdownGraceMs: config.shutdownGraceMs,
    connectionAge,
    internalToken: config.internalToken || undefined,
    reflection: config.reflection,
    handleSignals: true,
    onShutdown: async () => {
      await telemetry.tracing.shutdown();
      await telemetry.metrics.close();
    },
  };
}

/** Starts tracing and service metrics for a service process. */
export async function initServiceTelemetry(options: {
  serviceName: string;
  tracing: string;
  otlpEndpoint: string;
  metricsPort: number;
  /** The model bundle: its version becomes service.version of spans and logs. */
  bundle?: string;
}): Promise<{ tracing: Tracing; metrics: ServiceMetrics }> {
  if (!['otlp', 'memory', 'none'].includes(options.tracing)) {
    throw new ConfigError(`--tracing must be otlp, memory or none, got "${options.tracing}"`);
  }
  const serviceVersion = options.bundle ? bundleVersion(options.bundle) : undefined;
  initLogger({ service: options.serviceName, version: serviceVersion });
  const tracing = initTracing({
    serviceName: options.serviceName,
    serviceVersion,
    exporter: options.tracing as TraceExporterKind,
    endpoint: options.otlpEndpoint,
  });
  const metrics = await initServiceMetrics({ serviceName: options.serviceName, port: options.metricsPort });
  return { tracing, metrics };
}

/** The model version in a bundle's manifest.json (undefined when unreadable: the service reports that itself). */
function bundleVersion(bundle: string): string | undefined {
  try {
    const version = (JSON.parse(fs.readFileSync(path.join(bundle, 'manifest.json'), 'utf8')) as { version?: unknown }).version;
    return typeof version === 'string' ? version : undefined;
  } catch {
    return undefined;
  }
}

/** Runs a service's main(): configuration errors exit 2 with the message, other failures exit 1. */
export function runMain(name: string, main: () => Promise<unknown>): void {
  main().catch((err: unknown) => {
    if (err instanceof HelpRequested) {
      console.log(err.message);
      process.exit(0);
    }
    if (err instanceof ConfigError) {
      console.error(`${name}: ${err.message}`);
      process.exit(2);
    }
    console.error(`${name}: failed to start: ${err instanceof Error ? err.message : String(err)}`);
    process.exit(1);
  });
}
