/** Machine-readable reason of a {@link SlideError}. */
export type SlideErrorCode =
  | 'NOT_FOUND' // the file does not exist or cannot be read
  | 'UNKNOWN_FORMAT' // not a format this package reads
  | 'CORRUPT' // structure is invalid (bad offsets, bad tags, undecodable tile)
  | 'TRUNCATED' // the file ends before data it references
  | 'UNSUPPORTED' // a recognised format with a feature we do not read (JPEG 2000, planar, ...)
  | 'OPENSLIDE_MISSING' // an OpenSlide-only format, but libopenslide or koffi is not available
  | 'REGION_OUTSIDE' // the requested region does not intersect the level
  | 'REGION_TOO_LARGE' // the requested region exceeds the configured pixel budget
  | 'BAD_ARGUMENT' // invalid level, size, mpp, ...
  | 'NO_RESOLUTION' // the slide has no mpp and none was given
  | 'ROI_OUTSIDE' // a region of interest does not intersect the slide
  | 'CLOSED'; // the slide was closed

/** Every error this package throws on bad input; `message` names the problem and the file. */
export class SlideError extends Error {
  override readonly name = 'SlideError';
  constructor(
    readonly code: SlideErrorCode,
    message: string,
    readonly file?: string,
    options?: { cause?: unknown },
  ) {
    super(file ? `${message} (${file})` : message, options);
  }
}
