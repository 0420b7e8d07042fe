// Client side of the stage APIs: channel options that fit tensor payloads and detect dead
// connections, and a promise wrapper for unary calls that propagates deadlines and trace context
// and opens a client span.
import {
  credentials as grpcCredentials,
  InterceptingCall,
  Metadata,
  type Interceptor,
  type CallOptions,
  type ChannelCredentials,
  type Client,
  type ClientUnaryCall,
  type ServiceError,
} from '@grpc/grpc-js';
import { context, SpanKind, SpanStatusCode, trace, type Attributes } from '@opentelemetry/api';
import { lowCopyClient } from './codec';
import { DEFAULT_MAX_MESSAGE_BYTES } from './server';
import { getTracer, injectTraceContext } from './tracing';

export interface MakeClientOptions {
  /** Max send/receive message size (default DEFAULT_MAX_MESSAGE_BYTES). */
  maxMessageBytes?: number;
  /** Keepalive ping interval (default 30 s). */
  keepaliveMs?: number;
  /** Default insecure (inside the cluster). */
  credentials?: ChannelCredentials;
  /** Extra channel options. */
  channelOptions?: Record<string, string | number>;
  /** Sent as `authorization: Bearer <token>` on every call (the internal token between services). */
  bearerToken?: string;
}

/** A client interceptor that adds `authorization: Bearer <token>` to every call's metadata. */
export function bearerTokenInterceptor(token: string): Interceptor {
  const value = `Bearer ${token}`;
  return (options, nextCall) =>
    new InterceptingCall(nextCall(options), {
      start(metadata, listener, next) {
        metadata.set('authorization', value);
        next(metadata, listener);
      },
    });
}

type ClientConstructor<C> = new (address: string, credentials: ChannelCredentials, options?: Record<string, unknown>) => C;

/**
 * `makeClient(stagesProto.EncoderClient, 'localhost:50062')`: a client with keepalive and size
 * limits, serialising requests with the low-copy writer (codec.ts).
 */
export function makeClient<C extends Client>(ctor: ClientConstructor<C>, address: string, options: MakeClientOptions = {}): C {
  const max = options.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
  const LowCopy = lowCopyClient(ctor);
  return new LowCopy(address, options.credentials ?? grpcCredentials.createInsecure(), {
    'grpc.max_receive_message_length': max,
    'grpc.max_send_message_length': max,
    'grpc.keepalive_time_ms': options.keepaliveMs ?? 30_000,
    'grpc.keepalive_timeout_ms': 10_000,
    'grpc.keepalive_permit_without_calls': 1,
    // A large receive window: responses of hundreds of KB (masks, features fetched by a decoder)
    // flow without waiting for WINDOW_UPDATEs from a busy event loop (HTTP/2's default is 64 KB).
    'grpc-node.flow_control_window': 16 * 1024 * 1024,
    ...options.channelOptions,
    ...(options.bearerToken ? { interceptors: [bearerTokenInterceptor(options.bearerToken)] } : {}),
  });
}

/**
 * Call options for a child call: the earlier of `deadline` (e.g. the incoming call's, from
 * CallContext.deadline) and now + `timeoutMs`. Either may be omitted.
 */
export function callOptionsFromDeadline(deadline?: Date | number, timeoutMs?: number): Partial<CallOptions> {
  const candidates: number[] = [];
  if (deadline !== undefined) {
    const t = deadline instanceof Date ? deadline.getTime() : deadline;
    if (Number.isFinite(t)) candidates.push(t);
  }
  if (timeoutMs !== undefined && Number.isFinite(timeoutMs)) candidates.push(Date.now() + timeoutMs);
  return candidates.length ? { deadline: new Date(Math.min(...candidates)) } : {};
}

/** A generated client method (its 4-argument overload). */
export type UnaryMethod<Req, Res> = (
  request: Req,
  metadata: Metadata,
  options: Partial<CallOptions>,
  callback: (error: ServiceError | null, response: Res) => void,
) => ClientUnaryCall;

export interface UnaryOptions {
  /** Absolute deadline (propagate the incoming call's). */
  deadline?: Date | number;
  /** Relative timeout; the earlier of this and `deadline` applies. */
  timeoutMs?: number;
  metadata?: Metadata;
  /** Cancels the call. */
  signal?: AbortSignal;
  /** Attributes of the client span (SpanAttributes). */
  attributes?: Attributes;
}

/**
 * `await unary(client, client.encode, request, { deadline })`: calls a unary method, injecting the
 * active trace context into the metadata inside a client span named after the method path.
 * Rejects with the grpc-js ServiceError (its `code` is the status).
 */
export function unary<Req, Res>(client: Client, method: UnaryMethod<Req, Res>, request: Req, options: UnaryOptions = {}): Promise<Res> {
  const path = (method as unknown as { path?: string }).path ?? method.name;
  const name = path.replace(/^\//, '');
  const slash = name.lastIndexOf('/');
  const span = getTracer().startSpan(name, {
    kind: SpanKind.CLIENT,
    attributes: { 'rpc.system': 'grpc', 'rpc.service': name.slice(0, slash), 'rpc.method': name.slice(slash + 1), ...options.attributes },
  });
  const metadata = options.metadata?.clone() ?? new Metadata();
  injectTraceContext(metadata, trace.setSpan(context.active(), span));
  const callOptions = callOptionsFromDeadline(options.deadline, options.timeoutMs);
  return new Promise<Res>((resolve, reject) => {
    if (options.signal?.aborted) {
      span.end();
      const err = new Error(`${path}: cancelled before the call`);
      err.name = 'AbortError';
      reject(err);
      return;
    }
    const call = method.call(client, request, metadata, callOptions, (err, response) => {
      options.signal?.removeEventListener('abort', onAbort);
      if (err) {
        span.setStatus({ code: SpanStatusCode.ERROR, message: err.details ?? err.message });
        span.setAttribute('rpc.grpc.status_code', err.code);
        span.end();
        reject(err);
      } else {
        span.setAttribute('rpc.grpc.status_code', 0);
        span.end();
        resolve(response);
      }
    });
    const onAbort = () => call.cancel();
    options.signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/** Resolves when the client's channel is connected (or rejects at the deadline). */
export function waitForReady(client: Client, timeoutMs: number): Promise<void> {
  return new Promise((resolve, reject) => {
    client.waitForReady(Date.now() + timeoutMs, (err) => (err ? reject(err) : resolve()));
  });
}
