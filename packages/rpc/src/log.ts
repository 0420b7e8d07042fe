// Structured logs: one JSON object per line (pino) on stderr, each with the service, its version
// and, inside a traced call, the trace and span ids, so a log line leads to its trace. Every
// handled call writes one request line (identity, method, status, duration); request payloads
// (image bytes, tensors) are never logged.
import { trace } from '@opentelemetry/api';
import pino, { type Logger } from 'pino';

export type { Logger } from 'pino';

let root: Logger | null = null;

/** Names the process in every later line (services call it at start; tests may not). */
export function initLogger(options: { service: string; version?: string; level?: string }): Logger {
  root = createLogger(options);
  return root;
}

function createLogger(options: { service: string; version?: string; level?: string }): Logger {
  return pino(
    {
      level: options.level ?? process.env.CFRSAM_LOG_LEVEL ?? 'info',
      base: { service: options.service, ...(options.version ? { version: options.version } : {}) },
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
      // The active span's ids on every line written inside a traced call.
      mixin() {
        const context = trace.getActiveSpan()?.spanContext();
        return context ? { traceId: context.traceId, spanId: context.spanId } : {};
      },
    },
    // Synchronous: lines are not lost when a process exits right after writing them.
    pino.destination({ dest: 2, sync: true }),
  );
}

/** The process's logger (a default one named after the script until initLogger is called). */
export function logger(): Logger {
  root ??= createLogger({ service: process.env.OTEL_SERVICE_NAME ?? 'cfrsam' });
  return root;
}

/** What the request line of one call says. */
export interface RequestLogFields {
  /** "cfrsam.v1.Encoder/Encode". */
  method: string;
  /** callIdentity(call).id. */
  identity: string;
  authenticated: boolean;
  /** gRPC status name ("OK", "INVALID_ARGUMENT"). */
  code: string;
  durationMs: number;
  traceId: string;
  spanId: string;
  /** The error message for a failed call. */
  error?: string;
}

/** Server faults log at error level, caller errors at warn, successes at info. */
export function logRequest(fields: RequestLogFields, serverFault: boolean): void {
  const line = { msg: 'request', ...fields, durationMs: Math.round(fields.durationMs * 10) / 10 };
  if (fields.code === 'OK') logger().info(line);
  else if (serverFault) logger().error(line);
  else logger().warn(line);
}
