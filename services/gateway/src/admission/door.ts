// The admission door (transport): a gRPC server interceptor that prices a Segment call from its
// headers, before its body (the image, megabytes) has arrived. A client that announces its image
// with `x-image-size: WIDTHxHEIGHT` (and `x-image-mpp` when it sets the request's mpp) is refused
// at once, while its upload is still starting, when admission would refuse it anyway; otherwise it
// holds a reservation (Admission.reserve) that the handler takes up when the message arrives. Under
// a burst, grpc-js receives every upload interleaved, so without the header a request is priced
// only when all of them have arrived: seconds later, on a busy machine, for every one of them.
// Calls without the header pass through and are priced from the image header as before.
import { type Metadata, ServerInterceptingCall, type ServerInterceptingCallInterface, type ServerInterceptor, status } from '@grpc/grpc-js';
import { authorizationOf, type CallAuthenticator, callIdentity, grpcError } from '@cfrsam/rpc';
import { AdmissionRejected, type Admission, type AdmissionReservation } from './admission';
import { IMAGE_MPP_HEADER, IMAGE_SIZE_HEADER } from './announce';

/** Set by the door (a client's own value is removed): the reservation the handler takes up. */
export const RESERVATION_HEADER = 'x-cfrsam-admission-reservation';

/**
 * The size a request announces (`header(name)` reads one header, gRPC metadata or HTTP), or
 * undefined when it announces none. Throws INVALID_ARGUMENT on a malformed one.
 */
export function announcedSize(header: (name: string) => unknown): { width: number; height: number; mpp?: number } | undefined {
  const size = header(IMAGE_SIZE_HEADER);
  if (size === undefined) return undefined;
  const m = typeof size === 'string' ? /^\s*(\d{1,7})\s*[xX]\s*(\d{1,7})\s*$/.exec(size) : null;
  if (!m || Number(m[1]) < 1 || Number(m[2]) < 1) {
    throw grpcError(status.INVALID_ARGUMENT, `${IMAGE_SIZE_HEADER} must be WIDTHxHEIGHT in pixels (e.g. 1000x1000), got "${String(size)}"`);
  }
  const mppValue = header(IMAGE_MPP_HEADER);
  let mpp: number | undefined;
  if (mppValue !== undefined) {
    mpp = Number(mppValue);
    if (typeof mppValue !== 'string' || !(mpp > 0) || !Number.isFinite(mpp)) {
      throw grpcError(status.INVALID_ARGUMENT, `${IMAGE_MPP_HEADER} must be a positive number of micrometres per pixel, got "${String(mppValue)}"`);
    }
  }
  return { width: Number(m[1]), height: Number(m[2]), mpp };
}

export interface AdmissionDoorOptions {
  admission: Admission;
  /** Full method paths the door prices (e.g. "/cfrsam.v1.Segmentation/Segment"). */
  methods: readonly string[];
  /** Work of an announced image: pixels at the model's resolution (the pipeline's own rule). */
  price(width: number, height: number, mpp: number | undefined): number;
  /** Maps a refusal to the status the caller gets (the pipeline's own mapping). */
  toStatus(err: AdmissionRejected): Error & { code?: number; details?: string; metadata?: Metadata };
  /** The public API's authenticator: with tokens on, the verified identity is the caller. */
  auth?: CallAuthenticator;
}

/** The interceptor; see the file comment. */
export function admissionDoor(options: AdmissionDoorOptions): ServerInterceptor {
  const methods = new Set(options.methods);
  return (descriptor, call) => {
    if (!methods.has(descriptor.path)) return new ServerInterceptingCall(call);
    let reservation: AdmissionReservation | undefined;
    const end = () => {
      reservation?.release();
      reservation = undefined;
    };
    const intercepting: ServerInterceptingCall = new ServerInterceptingCall(call, {
      start: (next) =>
        next({
          onReceiveMetadata: (metadata, pass) => {
            metadata.remove(RESERVATION_HEADER);
            let refusal: Error | undefined;
            try {
              reservation = reserve(options, descriptor.path, call, metadata);
              if (reservation) metadata.set(RESERVATION_HEADER, reservation.id);
            } catch (err) {
              refusal = err instanceof AdmissionRejected ? options.toStatus(err) : (err as Error);
            }
            if (!refusal) return pass(metadata);
            const e = refusal as { code?: number; details?: string; metadata?: Metadata };
            intercepting.sendStatus({ code: e.code ?? status.INTERNAL, details: e.details ?? refusal.message, metadata: e.metadata });
          },
          onCancel: end,
        }),
      // Whatever status ends the call, a reservation still held is given up (the handler takes
      // it up first when the request runs, which makes this a no-op).
      sendStatus: (s, next) => {
        end();
        next(s);
      },
    });
    return intercepting;
  };
}

function reserve(
  options: AdmissionDoorOptions,
  path: string,
  call: ServerInterceptingCallInterface,
  metadata: Metadata,
): AdmissionReservation | undefined {
  const announced = announcedSize((name) => metadata.get(name)[0]);
  if (!announced) return undefined;
  let identity: string;
  if (options.auth?.enabled) {
    const verified = options.auth.authenticate(authorizationOf(metadata), path.replace(/^\//, ''));
    // Refused callers are answered by the authentication layer, with its status; no place is held.
    if (verified instanceof Error) return undefined;
    identity = verified.id;
  } else {
    identity = callIdentity({ metadata, getPeer: () => call.getPeer() }).id;
  }
  const d = call.getDeadline();
  const deadline = d instanceof Date ? d.getTime() : typeof d === 'number' && Number.isFinite(d) ? d : undefined;
  return options.admission.reserve({
    identity,
    pixels: options.price(announced.width, announced.height, announced.mpp),
    deadline,
  });
}
