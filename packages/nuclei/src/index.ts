// @cfrsam/nuclei: images in, nuclei out. Decoding and tiling with sharp, instance masks, contours
// and measurements, output formats (GeoJSON, CSV, label maps, overlays) and evaluation metrics.
export * from './imaging';
export * from './instances';
export * from './formats';
export * as metrics from './metrics';
