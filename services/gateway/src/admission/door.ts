// The admission door (transport): a gRPC server interceptor that prices a Segment call from its
// headers, before its body (the image, megabytes) has arrived. A client that announces its image
// with `x-image-size: WIDTHxHEIGHT` (and `x-image-mpp` when it sets the request's mpp) is refused
// at once, while its upload is still starting, when admission would refuse it anyway; otherwise it
// holds a reservation (Admission.reserve) that the handler takes up when the message arrives. Under
// a burst, grpc-js receives every upload interleaved, so without the header a request is priced
// only when all of them have arrived: seconds later, on a busy machine, for every one of them.
// Calls without the header pass through and are priced from the image header as before.
import { type Metadata, ServerInterceptingCall, type ServerInterceptingCallInterface, type ServerInterceptor } from '@grpc/grpc-js';
import { authorizationOf, type CallAuthenticator, callIdentity, toServiceError } from '@cfrsam/rpc';
import type { AdmissionReservation } from './admission';
import { announcedSize, type AnnouncedImage } from './announce';

/** Set by the door (a client's own value is removed): the reservation the handler takes up. */
export const RESERVATION_HEADER = 'x-cfrsam-admission-reservation';

export interface AdmissionDoorOptions {
  /** Full method paths the door prices (e.g. "/cfrsam.v1.Segmentation/Segment"). */
  methods: readonly string[];
  /**
   * Holds a place for an announced request (SegmentationPipeline.reserveAnnounced); throws the
   * refusal as a gRPC status error.
   */
  reserve(announced: AnnouncedImage, identity: string, deadline: number | undefined): AdmissionReservation;
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
            try {
              reservation = reserve(options, descriptor.path, call, metadata);
            } catch (err) {
              const refusal = toServiceError(err);
              intercepting.sendStatus({ code: refusal.code, details: refusal.details, metadata: refusal.metadata });
              return;
            }
            if (reservation) metadata.set(RESERVATION_HEADER, reservation.id);
            pass(metadata);
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
  return options.reserve(announced, identity, deadline);
}
