// gRPC status errors: one error type that carries a status code, a message for people and
// machine-readable google.rpc details (ErrorInfo reason, RetryInfo delay, BadRequest field
// violations) in the `grpc-status-details-bin` trailer; and the mapping from the errors the shared
// runtime throws (bad tensors, a saturated pool, cancellation, a crashed worker) to statuses, so
// that every handler answers with a status and a message instead of crashing. Callers decide what
// to do from the code and the reason, never from the message text.
import { Metadata, status, type ServiceError } from '@grpc/grpc-js';
import { Any } from './gen/google/protobuf/any';
import { BadRequest, ErrorInfo, RetryInfo } from './gen/google/rpc/error_details';
import { Status } from './gen/google/rpc/status';

/** ErrorInfo.domain of every error the CFR-SAM services raise. */
export const ERROR_DOMAIN = 'cfrsam.v1';

/** ErrorInfo reasons the services raise and their callers act on. */
export const ErrorReason = {
  /** Decoder: this replica does not hold the tile's prepared state; send Prepare again. */
  NOT_PREPARED: 'NOT_PREPARED',
  /** Decoder: the tile's features are neither in the shared tier nor on any encoder; encode the tile again. */
  FEATURES_MISSING: 'FEATURES_MISSING',
  /** Encoder: a digest-only read of features this replica (and the shared tier) does not hold. */
  NOT_CACHED: 'NOT_CACHED',
  /** A worker queue or admission limit is full; retry after RetryInfo's delay, maybe elsewhere. */
  QUEUE_FULL: 'QUEUE_FULL',
  /** The request names a model version this service does not serve. */
  MODEL_MISMATCH: 'MODEL_MISMATCH',
  /** The request is malformed (see BadRequest for the field). */
  BAD_REQUEST: 'BAD_REQUEST',
} as const;
export type ErrorReason = (typeof ErrorReason)[keyof typeof ErrorReason];

/** The machine-readable part of an error (all optional). */
export interface ErrorDetails {
  reason?: string;
  /** ErrorInfo.domain; ERROR_DOMAIN for ours. */
  domain?: string;
  metadata?: Record<string, string>;
  retryDelayMs?: number;
  fieldViolations?: { field: string; description: string }[];
}

const STATUS_DETAILS_KEY = 'grpc-status-details-bin';
const TYPE_PREFIX = 'type.googleapis.com/';

function packAny(typeName: string, value: Uint8Array): Any {
  return { typeUrl: TYPE_PREFIX + typeName, value: Buffer.from(value) };
}

/** google.rpc.Status bytes for the `grpc-status-details-bin` trailer. */
export function encodeStatusDetails(code: status, message: string, details: ErrorDetails): Buffer {
  const anys: Any[] = [];
  if (details.reason) {
    anys.push(
      packAny(
        'google.rpc.ErrorInfo',
        ErrorInfo.encode({ reason: details.reason, domain: details.domain ?? ERROR_DOMAIN, metadata: details.metadata ?? {} }).finish(),
      ),
    );
  }
  if (details.retryDelayMs !== undefined) {
    const ms = Math.max(0, Math.round(details.retryDelayMs));
    anys.push(
      packAny('google.rpc.RetryInfo', RetryInfo.encode({ retryDelay: { seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1e6 } }).finish()),
    );
  }
  if (details.fieldViolations?.length) {
    anys.push(packAny('google.rpc.BadRequest', BadRequest.encode({ fieldViolations: details.fieldViolations }).finish()));
  }
  return Buffer.from(Status.encode({ code, message, details: anys }).finish());
}

/** The details of an error received from (or raised by) a service; {} when it carries none. */
export function errorDetailsOf(err: unknown): ErrorDetails {
  if (err instanceof StatusError) return err.errorDetails;
  const md = (err as { metadata?: unknown })?.metadata;
  if (!(md instanceof Metadata)) return {};
  const raw = md.get(STATUS_DETAILS_KEY)[0];
  if (!raw || typeof raw === 'string') return {};
  const out: ErrorDetails = {};
  try {
    for (const any of Status.decode(raw).details) {
      const type = any.typeUrl.slice(any.typeUrl.lastIndexOf('/') + 1);
      if (type === 'google.rpc.ErrorInfo') {
        const info = ErrorInfo.decode(any.value);
        out.reason = info.reason;
        out.domain = info.domain;
        out.metadata = info.metadata;
      } else if (type === 'google.rpc.RetryInfo') {
        const d = RetryInfo.decode(any.value).retryDelay;
        if (d) out.retryDelayMs = d.seconds * 1000 + d.nanos / 1e6;
      } else if (type === 'google.rpc.BadRequest') {
        out.fieldViolations = BadRequest.decode(any.value).fieldViolations;
      }
    }
  } catch {
    return {};
  }
  return out;
}

/** The ErrorInfo reason of one of our services' errors, or undefined. */
export function errorReason(err: unknown): string | undefined {
  const d = errorDetailsOf(err);
  return d.domain === ERROR_DOMAIN ? d.reason : undefined;
}

/**
 * True when the error came from one of our services' handlers (it carries our ErrorInfo), as
 * opposed to the transport: a dropped connection or a killed process mid-call surfaces as
 * UNAVAILABLE, INTERNAL, UNKNOWN or CANCELLED with no details.
 */
export function isFromService(err: unknown): boolean {
  return errorDetailsOf(err).domain === ERROR_DOMAIN;
}

/** The reason a status code gets when the thrower named none. */
function defaultReason(code: status): string {
  switch (code) {
    case status.INVALID_ARGUMENT:
      return ErrorReason.BAD_REQUEST;
    case status.RESOURCE_EXHAUSTED:
      return ErrorReason.QUEUE_FULL;
    default:
      return status[code] ?? 'UNKNOWN';
  }
}

/** An error that a gRPC handler answers with the given status code, message and details. */
export class StatusError extends Error implements ServiceError {
  readonly code: status;
  readonly details: string;
  readonly metadata: Metadata;
  readonly errorDetails: ErrorDetails;

  constructor(code: status, message: string, details: ErrorDetails = {}) {
    super(message);
    this.name = 'StatusError';
    this.code = code;
    this.details = message;
    this.errorDetails = { ...details, reason: details.reason ?? defaultReason(code), domain: details.domain ?? ERROR_DOMAIN };
    this.metadata = new Metadata();
    this.metadata.set(STATUS_DETAILS_KEY, encodeStatusDetails(code, message, this.errorDetails));
  }
}

/** `throw grpcError(status.INVALID_ARGUMENT, 'tiles[0].pixels: expected [3,256,256]')`. */
export function grpcError(code: status, message: string, details?: ErrorDetails): StatusError {
  return new StatusError(code, message, details);
}

/** True for objects that already carry a numeric gRPC status code (ours or grpc-js's). */
export function isServiceError(err: unknown): err is ServiceError {
  return (
    typeof err === 'object' &&
    err !== null &&
    typeof (err as { code?: unknown }).code === 'number' &&
    (err as { code: number }).code >= 0 &&
    (err as { code: number }).code <= 16
  );
}

/**
 * Maps any thrown value to a ServiceError. Errors that declare a status (`grpcStatus` property, as
 * the runtime's own errors do, or a grpc-js `code`) keep it; anything else is INTERNAL with the
 * error's message, so a bug answers with a status rather than killing the process.
 */
export function toServiceError(err: unknown): ServiceError {
  if (err instanceof StatusError) return err;
  if (typeof err === 'object' && err !== null) {
    const declared = (err as { grpcStatus?: unknown }).grpcStatus;
    if (typeof declared === 'number') {
      const reason = (err as { grpcReason?: string }).grpcReason;
      const retryDelayMs = (err as { retryDelayMs?: number }).retryDelayMs;
      return new StatusError(declared as status, (err as Error).message ?? String(err), { reason, retryDelayMs });
    }
    if ((err as Error).name === 'AbortError') {
      return new StatusError(status.CANCELLED, (err as Error).message || 'cancelled');
    }
    if (isServiceError(err)) {
      // A child call's error passed on: keep its reason and retry delay.
      const details = (err as ServiceError).details ?? (err as Error).message;
      return new StatusError(err.code, details, errorDetailsOf(err));
    }
  }
  const message = err instanceof Error ? err.message : String(err);
  return new StatusError(status.INTERNAL, `internal error: ${message}`);
}

/** True for the decoder's "prepare again" answer. */
export function isNotPreparedError(err: unknown): boolean {
  return isServiceError(err) && err.code === status.FAILED_PRECONDITION && errorReason(err) === ErrorReason.NOT_PREPARED;
}

export { status };
