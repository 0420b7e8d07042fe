// gRPC status errors: one error type that carries a status code, and the mapping from the errors
// the shared runtime throws (bad tensors, a saturated pool, cancellation, a crashed worker) to
// statuses, so that every handler answers with a status and a message instead of crashing.
import { Metadata, status, type ServiceError } from '@grpc/grpc-js';

/** An error that a gRPC handler answers with the given status code and message. */
export class StatusError extends Error implements ServiceError {
  readonly code: status;
  readonly details: string;
  readonly metadata: Metadata;

  constructor(code: status, message: string) {
    super(message);
    this.name = 'StatusError';
    this.code = code;
    this.details = message;
    this.metadata = new Metadata();
  }
}

/** `throw grpcError(status.INVALID_ARGUMENT, 'tiles[0].pixels: expected [3,256,256]')`. */
export function grpcError(code: status, message: string): StatusError {
  return new StatusError(code, message);
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
      return new StatusError(declared as status, (err as Error).message ?? String(err));
    }
    if ((err as Error).name === 'AbortError') {
      return new StatusError(status.CANCELLED, (err as Error).message || 'cancelled');
    }
    if (isServiceError(err)) {
      const details = (err as ServiceError).details ?? (err as Error).message;
      return new StatusError(err.code, details);
    }
  }
  const message = err instanceof Error ? err.message : String(err);
  return new StatusError(status.INTERNAL, `internal error: ${message}`);
}

/**
 * Decoder protocol: Decode answers FAILED_PRECONDITION with this text in the message when the
 * replica does not hold the image's prepared state; the caller sends Prepare again.
 */
export const NOT_PREPARED = 'not prepared';

/** True for the decoder's "prepare again" answer (see NOT_PREPARED). */
export function isNotPreparedError(err: unknown): boolean {
  return isServiceError(err) && err.code === status.FAILED_PRECONDITION && String(err.details ?? err.message).includes(NOT_PREPARED);
}

export { status };
