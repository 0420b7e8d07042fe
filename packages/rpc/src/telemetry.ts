// Service metrics (operational, not the evaluation metrics in metrics/): stage latency, RPC
// latency, cache hits and misses, batch sizes and in-flight calls, exported for Prometheus on
// --metrics-port. Without a port every instrument is a no-op, so code records unconditionally.
import { createNoopMeter, type Attributes, type Meter } from '@opentelemetry/api';
import { PrometheusExporter } from '@opentelemetry/exporter-prometheus';
import { resourceFromAttributes } from '@opentelemetry/resources';
import { MeterProvider } from '@opentelemetry/sdk-metrics';

const SECONDS_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];
const BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256];

export interface ServiceMetricsOptions {
  serviceName: string;
  /** Serve GET /metrics on this port (0 or undefined: no endpoint, instruments are no-ops). */
  port?: number;
  host?: string;
}

/** The instruments every service records into. Attribute `service` is added to all. */
export class ServiceMetrics {
  private readonly stageDuration;
  private readonly rpcDuration;
  private readonly cacheLookups;
  private readonly batchSizes;
  private readonly inFlightCalls;
  private readonly poolJobs;
  private readonly admissionEvents;
  private readonly admissionGauges;
  private readonly base: Attributes;

  constructor(
    meter: Meter,
    readonly serviceName: string,
    private readonly provider?: MeterProvider,
    private readonly exporter?: PrometheusExporter,
  ) {
    this.base = { service: serviceName };
    this.stageDuration = meter.createHistogram('cfrsam_stage_duration_seconds', {
      description: 'Time of one pipeline stage (model run, cache lookup, encoding) inside a service',
      unit: 's',
      advice: { explicitBucketBoundaries: SECONDS_BUCKETS },
    });
    this.rpcDuration = meter.createHistogram('cfrsam_rpc_duration_seconds', {
      description: 'Server-side duration of a gRPC call, by method and status code',
      unit: 's',
      advice: { explicitBucketBoundaries: SECONDS_BUCKETS },
    });
    this.cacheLookups = meter.createCounter('cfrsam_cache_lookups_total', {
      description: 'Cache lookups by cache and result (hit, miss, coalesced)',
    });
    this.batchSizes = meter.createHistogram('cfrsam_batch_size', {
      description: 'Items per model run (tiles for prompter/encoder, prompts for the decoder)',
      advice: { explicitBucketBoundaries: BATCH_BUCKETS },
    });
    this.inFlightCalls = meter.createUpDownCounter('cfrsam_in_flight_calls', {
      description: 'gRPC calls being handled',
    });
    this.poolJobs = meter.createHistogram('cfrsam_pool_queue_seconds', {
      description: 'Time an inference job waited for a worker',
      unit: 's',
      advice: { explicitBucketBoundaries: SECONDS_BUCKETS },
    });
    this.admissionEvents = meter.createCounter('cfrsam_admission_total', {
      description:
        'Admission of public requests by event: admitted (started at once), queued, rejected_early (deadline unreachable), ' +
        'rejected_identity (per-caller limit), rejected_queue (queue full or waited too long), expired, cancelled, answered, ' +
        'goodput (answered within its deadline)',
    });
    this.admissionGauges = {
      limit: meter.createGauge('cfrsam_admission_limit', { description: 'Current adaptive concurrency limit (requests run at once)' }),
      running: meter.createGauge('cfrsam_admission_running', { description: 'Requests running' }),
      queued: meter.createGauge('cfrsam_admission_queue_depth', { description: 'Requests waiting for admission (the HPA scales on it)' }),
      reserved: meter.createGauge('cfrsam_admission_reserved', {
        description: 'Requests priced from their headers (x-image-size) whose body has not arrived yet',
      }),
      throughput: meter.createGauge('cfrsam_admission_throughput_pixels_per_second', {
        description: 'Measured throughput: pixels at the model resolution answered per second of busy time',
      }),
    };
  }

  /** One admission event (see cfrsam_admission_total). */
  admission(event: string): void {
    this.admissionEvents.add(1, { ...this.base, event });
  }

  /** The admission controller's state after a change. */
  admissionState(state: { limit: number; running: number; queued: number; pixelsPerSecond: number; reserved?: number }): void {
    this.admissionGauges.limit.record(state.limit, this.base);
    this.admissionGauges.reserved.record(state.reserved ?? 0, this.base);
    this.admissionGauges.running.record(state.running, this.base);
    this.admissionGauges.queued.record(state.queued, this.base);
    this.admissionGauges.throughput.record(state.pixelsPerSecond, this.base);
  }

  /** Records one stage's duration (e.g. stage "encoder.run"). */
  stage(stage: string, seconds: number, attributes: Attributes = {}): void {
    this.stageDuration.record(seconds, { ...this.base, stage, ...attributes });
  }

  /** Times `fn` as stage `stage`. */
  async timeStage<T>(stage: string, fn: () => Promise<T>, attributes: Attributes = {}): Promise<T> {
    const started = performance.now();
    try {
      return await fn();
    } finally {
      this.stage(stage, (performance.now() - started) / 1000, attributes);
    }
  }

  rpc(method: string, code: string, seconds: number): void {
    this.rpcDuration.record(seconds, { ...this.base, method, code });
  }

  /** Cache lookups of one request: `hits`, `misses` and `coalesced` (joined an in-flight computation). */
  cache(cache: string, counts: { hits?: number; misses?: number; coalesced?: number }): void {
    if (counts.hits) this.cacheLookups.add(counts.hits, { ...this.base, cache, result: 'hit' });
    if (counts.misses) this.cacheLookups.add(counts.misses, { ...this.base, cache, result: 'miss' });
    if (counts.coalesced) this.cacheLookups.add(counts.coalesced, { ...this.base, cache, result: 'coalesced' });
  }

  batch(stage: string, size: number): void {
    this.batchSizes.record(size, { ...this.base, stage });
  }

  inFlight(method: string, delta: number): void {
    this.inFlightCalls.add(delta, { ...this.base, method });
  }

  poolWait(graph: string, seconds: number): void {
    this.poolJobs.record(seconds, { ...this.base, graph });
  }

  /** Stops the /metrics endpoint. */
  async close(): Promise<void> {
    await this.provider?.shutdown();
    await this.exporter?.stopServer().catch(() => undefined);
  }
}

let current: ServiceMetrics | null = null;
let fallback: ServiceMetrics | null = null;

/**
 * Creates the process's service metrics, serving Prometheus text on http://host:port/metrics when
 * `port` is set. Later calls return the first instance (services in one test process share it).
 */
export async function initServiceMetrics(options: ServiceMetricsOptions): Promise<ServiceMetrics> {
  if (current) return current;
  if (!options.port) {
    current = new ServiceMetrics(createNoopMeter(), options.serviceName);
    return current;
  }
  let startError: Error | undefined;
  const exporter = new PrometheusExporter({ port: options.port, host: options.host ?? '0.0.0.0', preventServerStart: true });
  await exporter.startServer().catch((err: Error) => {
    startError = err;
  });
  if (startError) throw new Error(`cannot serve metrics on port ${options.port}: ${startError.message}`);
  const provider = new MeterProvider({
    resource: resourceFromAttributes({ 'service.name': options.serviceName }),
    readers: [exporter],
  });
  current = new ServiceMetrics(provider.getMeter('cfrsam'), options.serviceName, provider, exporter);
  return current;
}

/** The process's service metrics (no-op instruments before initServiceMetrics). */
export function serviceMetrics(): ServiceMetrics {
  if (current) return current;
  fallback ??= new ServiceMetrics(createNoopMeter(), 'unknown');
  return fallback;
}
