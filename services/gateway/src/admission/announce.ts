// The headers that announce a Segment request's image size, so the gateway prices the request
// before its body arrives and can refuse it at once (door.ts, and the HTTP routes): written by the
// clients (announceImage), read by the gateway (announcedSize).
import { Metadata, status } from '@grpc/grpc-js';
import { imageSize } from 'image-size';
import { grpcError } from '@cfrsam/rpc';

/** The image's size in pixels, `WIDTHxHEIGHT` (e.g. `1000x1000`). */
export const IMAGE_SIZE_HEADER = 'x-image-size';
/** The image's micrometres per pixel, when the request sets mpp (else the model's is assumed). */
export const IMAGE_MPP_HEADER = 'x-image-mpp';

/**
 * `metadata` (a new one when absent) with the image's size announced, read from the encoded
 * image's header (no pixel decoded); unchanged when the header cannot be read (the gateway then
 * prices the request when it arrives).
 */
export function announceImage(image: Uint8Array, mpp: number, metadata: Metadata = new Metadata()): Metadata {
  try {
    const { width, height } = imageSize(image);
    if (width && height) {
      metadata.set(IMAGE_SIZE_HEADER, `${width}x${height}`);
      if (mpp > 0) metadata.set(IMAGE_MPP_HEADER, String(mpp));
    }
  } catch {
    // Not an image the size can be read from: sent without the headers.
  }
  return metadata;
}

/** An announced image: its size in pixels, and its mpp when the request sets one. */
export interface AnnouncedImage {
  width: number;
  height: number;
  mpp?: number;
}

/**
 * The size a request announces (`header(name)` reads one header, gRPC metadata or HTTP), or
 * undefined when it announces none. Throws INVALID_ARGUMENT on a malformed one.
 */
export function announcedSize(header: (name: string) => unknown): AnnouncedImage | undefined {
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
