export { SlideError, type SlideErrorCode } from './errors.js';
export { FileSource, BufferSource, type ByteSource } from './source.js';
export { HttpRangeSource, type HttpSourceOptions } from './httpSource.js';
export {
  type Slide,
  type SlideFormat,
  type SlideLevel,
  type Mpp,
  type RegionRequest,
  type SlideOptions,
  type SlideStats,
  type RgbImage,
} from './slide.js';
export { openSlide } from './open.js';
export { readRegionAtMpp, levelForMpp, resolveMpp, type Rect, type ResampledRegion, type ResampleOptions } from './resample.js';
export {
  detectTissue,
  tissueRegions,
  pointInRoi,
  otsu,
  type TissueMask,
  type TissueOptions,
  type Roi,
  type TissueRegion,
  type TissueRegionOptions,
} from './tissue.js';
export { openslideUnavailableReason } from './openslide.js';
