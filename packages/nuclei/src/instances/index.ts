// Instance masks: paste, overlap resolution, contours, measurements, RLE, label maps, stitching.
export * from './mask';
export * from './contour';
export * from './measurements';
export * from './rle';
export * from './labelmap';
export * from './stitching';
