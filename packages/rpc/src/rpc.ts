// Server-side call handling shared by every service: a wrapper that turns an async function into a
// grpc-js unary handler which never throws (every error becomes a status with a message), keeps
// the in-flight count, opens a server span in the caller's trace, records the call's duration and
// aborts a signal when the caller cancels or the deadline passes (so queued inference is dropped).
import { status, type handleUnaryCall, type Metadata, type ServerUnaryCall } from '@grpc/grpc-js';
import { context, SpanKind, SpanStatusCode, trace, type Span } from '@opentelemetry/api';
import { callIdentity, type CallIdentity } from './identity';
import { logger, logRequest } from './log';
import { StatusError, toServiceError } from './status';
import { serviceMetrics } from './telemetry';
import { extractTraceContext, getTracer } from './tracing';

/** What a wrapped handler gets besides the request. */
export interface CallContext {
  /** The server span of this call; add attributes (SpanAttributes) to it. */
  span: Span;
  /** Aborted when the client cancels or the call's deadline passes. */
  signal: AbortSignal;
  /** The caller's deadline, if any: pass it on to child calls (unary(..., { deadline })). */
  deadline: Date | undefined;
  metadata: Metadata;
  /** Full method path, e.g. "/cfrsam.v1.Encoder/Encode". */
  method: string;
  /** Who is calling (identity.ts); authentication, which wraps the handler, has attached it by now. */
  readonly identity: CallIdentity;
}

/**
 * Statuses that are the server's fault: a server span is ERROR only for these (the OpenTelemetry
 * gRPC conventions), and they log at error level. Client errors (INVALID_ARGUMENT, NOT_FOUND,
 * UNAUTHENTICATED, RESOURCE_EXHAUSTED, CANCELLED, ...) leave the span unset.
 */
const SERVER_FAULTS = new Set<number>([
  status.UNKNOWN,
  status.DEADLINE_EXCEEDED,
  status.UNIMPLEMENTED,
  status.INTERNAL,
  status.UNAVAILABLE,
  status.DATA_LOSS,
]);

export function isServerFault(code: number): boolean {
  return SERVER_FAULTS.has(code);
}

let inFlight = 0;

/** gRPC calls being handled by this process right now. */
export function inFlightCalls(): number {
  return inFlight;
}

function deadlineOf(call: ServerUnaryCall<unknown, unknown>): Date | undefined {
  const d = call.getDeadline();
  if (d instanceof Date) return d;
  if (typeof d === 'number' && Number.isFinite(d)) return new Date(d);
  return undefined;
}

/**
 * Wraps `fn` as a unary handler. `method` is the span and metric name (e.g. "cfrsam.v1.Encoder/Encode").
 * Whatever `fn` throws is answered with its status (see toServiceError); unknown errors become
 * INTERNAL and are logged, since they are bugs.
 */
export function unaryHandler<Req, Res>(method: string, fn: (request: Req, ctx: CallContext) => Promise<Res>): handleUnaryCall<Req, Res> {
  return (call, callback) => {
    inFlight++;
    const metrics = serviceMetrics();
    metrics.inFlight(method, 1);
    const started = performance.now();
    const parent = extractTraceContext(call.metadata);
    const slash = method.lastIndexOf('/');
    const identity = callIdentity(call);
    const span = getTracer().startSpan(
      method,
      {
        kind: SpanKind.SERVER,
        attributes: {
          'rpc.system': 'grpc',
          'rpc.service': method.slice(0, slash),
          'rpc.method': method.slice(slash + 1),
          'enduser.id': identity.id,
        },
      },
      parent,
    );
    const controller = new AbortController();
    const deadline = deadlineOf(call as ServerUnaryCall<unknown, unknown>);
    let timer: NodeJS.Timeout | undefined;
    let deadlinePassed = false;
    if (deadline) {
      const ms = deadline.getTime() - Date.now();
      timer = setTimeout(
        () => {
          deadlinePassed = true;
          controller.abort(new Error('deadline exceeded'));
        },
        Math.max(0, ms),
      );
      timer.unref();
    }
    const onCancel = () => {
      // grpc-js also reports its own expiry of the deadline as 'cancelled'.
      if (deadline && Date.now() >= deadline.getTime() - 1) {
        deadlinePassed = true;
        controller.abort(new Error('deadline exceeded'));
      } else controller.abort(new Error('cancelled by the client'));
    };
    call.once('cancelled', onCancel);
    let done = false;
    const log = (code: string, seconds: number, fault: boolean, error?: string) => {
      const { traceId, spanId } = span.spanContext();
      // Read again: authentication attached the identity before the handler ran.
      const caller = callIdentity(call);
      logRequest(
        {
          method,
          identity: caller.id,
          authenticated: caller.authenticated,
          code,
          durationMs: seconds * 1000,
          traceId,
          spanId,
          ...(error ? { error } : {}),
        },
        fault,
      );
    };
    const finish = (err: unknown, response?: Res) => {
      if (done) return;
      done = true;
      if (timer) clearTimeout(timer);
      call.removeListener('cancelled', onCancel);
      inFlight--;
      metrics.inFlight(method, -1);
      if (err) {
        // After a cancel or an expired deadline the caller is gone; whatever the handler failed
        // with (often the abort itself) is reported as that, not as a server bug.
        // A child call cancelled by that abort fails with CANCELLED (a StatusError once a stage
        // adapter has named it), so the abort's cause decides: DEADLINE_EXCEEDED when the deadline
        // passed, CANCELLED only when the client cancelled (gRPC's meaning of the two codes).
        const mapped = toServiceError(err);
        const serviceError =
          controller.signal.aborted && (!(err instanceof StatusError) || mapped.code === status.CANCELLED || mapped.code === status.DEADLINE_EXCEEDED)
            ? new StatusError(
                deadlinePassed || (deadline && Date.now() >= deadline.getTime()) ? status.DEADLINE_EXCEEDED : status.CANCELLED,
                `${method}: ${(controller.signal.reason as Error)?.message ?? 'cancelled'}`,
              )
            : mapped;
        if (serviceError.code === status.INTERNAL || serviceError.code === status.UNKNOWN) {
          // A bug: the stack goes to the log (never to the caller).
          logger().error({ msg: 'handler failed', method, error: serviceError.details, stack: err instanceof Error ? err.stack : undefined });
        }
        const fault = isServerFault(serviceError.code);
        if (fault) span.setStatus({ code: SpanStatusCode.ERROR, message: serviceError.details });
        span.setAttribute('rpc.grpc.status_code', serviceError.code);
        span.end();
        const seconds = (performance.now() - started) / 1000;
        metrics.rpc(method, status[serviceError.code], seconds);
        log(status[serviceError.code], seconds, fault, serviceError.details);
        callback(serviceError);
      } else {
        span.setAttribute('rpc.grpc.status_code', status.OK);
        span.end();
        const seconds = (performance.now() - started) / 1000;
        metrics.rpc(method, 'OK', seconds);
        log('OK', seconds, false);
        callback(null, response);
      }
    };
    const ctx: CallContext = {
      span,
      signal: controller.signal,
      deadline,
      metadata: call.metadata,
      method: `/${method}`,
      identity,
    };
    try {
      context
        .with(trace.setSpan(parent, span), () => fn(call.request, ctx))
        .then(
          (response) => finish(null, response),
          (err: unknown) => finish(err),
        );
    } catch (err) {
      finish(err);
    }
  };
}
