// OpenTelemetry tracing for the services: a tracer provider per process, W3C trace context carried
// in gRPC metadata (explicit inject/extract, which works across grpc-js versions without
// monkey-patching), and a span file for tests (CFRSAM_TRACE_FILE) so an integration test can put
// together the span tree of one Segment call across processes.
import * as fs from 'node:fs';
import type { Metadata } from '@grpc/grpc-js';
import { context, propagation, SpanKind, trace, type Context, type TextMapGetter, type TextMapSetter, type Tracer } from '@opentelemetry/api';
import { AsyncLocalStorageContextManager } from '@opentelemetry/context-async-hooks';
import { W3CTraceContextPropagator } from '@opentelemetry/core';
import { OTLPTraceExporter } from '@opentelemetry/exporter-trace-otlp-grpc';
import { resourceFromAttributes } from '@opentelemetry/resources';
import { BatchSpanProcessor, InMemorySpanExporter, SimpleSpanProcessor, type ReadableSpan, type SpanProcessor } from '@opentelemetry/sdk-trace-base';
import { NodeTracerProvider } from '@opentelemetry/sdk-trace-node';
import { logger } from './log';

/** Span attribute names used across services. */
export const SpanAttributes = {
  digest: 'cfrsam.digest',
  prompts: 'cfrsam.prompts',
  batchSize: 'cfrsam.batch_size',
  cacheHit: 'cfrsam.cache_hit',
  tiles: 'cfrsam.tiles',
  service: 'cfrsam.service',
} as const;

export type TraceExporterKind = 'otlp' | 'memory' | 'none';

export interface TracingOptions {
  serviceName: string;
  /** service.version of the spans: the model version the service serves. */
  serviceVersion?: string;
  /** 'otlp' sends to `endpoint` (OTLP/gRPC, default http://localhost:4317); 'memory' keeps spans for tests. */
  exporter?: TraceExporterKind;
  endpoint?: string;
  /** Append finished spans as JSON lines here (default: env CFRSAM_TRACE_FILE). */
  traceFile?: string;
}

export interface Tracing {
  serviceName: string;
  tracer: Tracer;
  /** Set with exporter 'memory'. */
  memoryExporter?: InMemorySpanExporter;
  /** Exports buffered spans now. */
  flush(): Promise<void>;
  shutdown(): Promise<void>;
}

/** One finished span as written to the trace file (one JSON object per line). */
export interface SpanRecord {
  service: string;
  /** The resource's service.version (the model version), when set. */
  serviceVersion?: string;
  traceId: string;
  spanId: string;
  parentSpanId: string | null;
  name: string;
  kind: string;
  startMs: number;
  durationMs: number;
  attributes: Record<string, unknown>;
  status: { code: number; message?: string };
}

function hrToMs(t: [number, number]): number {
  return t[0] * 1e3 + t[1] / 1e6;
}

/** Converts a finished span to the trace-file record. */
export function spanRecord(span: ReadableSpan, serviceName: string): SpanRecord {
  return {
    service: serviceName,
    ...(typeof span.resource.attributes['service.version'] === 'string' ? { serviceVersion: span.resource.attributes['service.version'] } : {}),
    traceId: span.spanContext().traceId,
    spanId: span.spanContext().spanId,
    parentSpanId: span.parentSpanContext?.spanId ?? null,
    name: span.name,
    kind: SpanKind[span.kind],
    startMs: hrToMs(span.startTime),
    durationMs: hrToMs(span.duration),
    attributes: { ...span.attributes },
    status: { code: span.status.code, ...(span.status.message ? { message: span.status.message } : {}) },
  };
}

/** Appends each finished span to a file as a JSON line, synchronously so no span is lost at exit. */
class JsonLinesSpanProcessor implements SpanProcessor {
  constructor(
    private readonly file: string,
    private readonly serviceName: string,
  ) {}
  onStart(): void {}
  onEnd(span: ReadableSpan): void {
    try {
      fs.appendFileSync(this.file, JSON.stringify(spanRecord(span, this.serviceName)) + '\n');
    } catch (err) {
      logger().error(`cannot write span to ${this.file}: ${(err as Error).message}`);
    }
  }
  async forceFlush(): Promise<void> {}
  async shutdown(): Promise<void> {}
}

let current: Tracing | null = null;
let contextReady = false;

/** The W3C propagator and async context are needed even without export, to pass context through. */
function ensureContextAndPropagation(): void {
  if (contextReady) return;
  contextReady = true;
  context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable());
  propagation.setGlobalPropagator(new W3CTraceContextPropagator());
}

/**
 * Sets up tracing for this process once; later calls return the first setup (several services
 * started in one test process share it). With exporter 'none' and no trace file, spans are made
 * (for their ids in logs and propagation) but not exported.
 */
export function initTracing(options: TracingOptions): Tracing {
  if (current) return current;
  ensureContextAndPropagation();
  const exporter = options.exporter ?? 'none';
  const traceFile = options.traceFile ?? process.env.CFRSAM_TRACE_FILE;
  const processors: SpanProcessor[] = [];
  let memoryExporter: InMemorySpanExporter | undefined;
  if (exporter === 'otlp') {
    processors.push(new BatchSpanProcessor(new OTLPTraceExporter({ url: options.endpoint ?? 'http://localhost:4317' })));
  } else if (exporter === 'memory') {
    memoryExporter = new InMemorySpanExporter();
    processors.push(new SimpleSpanProcessor(memoryExporter));
  }
  if (traceFile) processors.push(new JsonLinesSpanProcessor(traceFile, options.serviceName));

  // Without an exporter the provider still gives every call real trace and span ids (exported
  // nowhere), so log lines carry ids that the next hop's lines share.
  const provider = new NodeTracerProvider({
    resource: resourceFromAttributes({
      'service.name': options.serviceName,
      ...(options.serviceVersion ? { 'service.version': options.serviceVersion } : {}),
    }),
    spanProcessors: processors,
  });
  trace.setGlobalTracerProvider(provider);
  current = {
    serviceName: options.serviceName,
    tracer: provider.getTracer('cfrsam'),
    memoryExporter,
    flush: () => provider.forceFlush(),
    shutdown: () => provider.shutdown(),
  };
  return current;
}

/** The process's tracer (a no-op tracer before initTracing). */
export function getTracer(): Tracer {
  return current?.tracer ?? trace.getTracer('cfrsam');
}

/** The service name given to initTracing ('' before). */
export function tracedServiceName(): string {
  return current?.serviceName ?? '';
}

const metadataSetter: TextMapSetter<Metadata> = {
  set(carrier, key, value) {
    carrier.set(key, value);
  },
};

const metadataGetter: TextMapGetter<Metadata> = {
  keys(carrier) {
    return Object.keys(carrier.getMap());
  },
  get(carrier, key) {
    const values = carrier.get(key);
    if (values.length === 0) return undefined;
    return values.map((v) => (typeof v === 'string' ? v : v.toString('utf8')));
  },
};

/** Writes the trace context of `ctx` (default: the active one) into gRPC metadata (traceparent). */
export function injectTraceContext(metadata: Metadata, ctx: Context = context.active()): Metadata {
  ensureContextAndPropagation();
  propagation.inject(ctx, metadata, metadataSetter);
  return metadata;
}

/** Reads the caller's trace context from incoming gRPC metadata. */
export function extractTraceContext(metadata: Metadata, ctx: Context = context.active()): Context {
  ensureContextAndPropagation();
  return propagation.extract(ctx, metadata, metadataGetter);
}
