// The client side of the admission door (door.ts): headers that announce a Segment request's image
// size, so the gateway prices the request before its body arrives and can refuse it at once.
import { Metadata } from '@grpc/grpc-js';
import { imageSize } from 'image-size';

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
