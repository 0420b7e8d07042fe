// Export formats: QuPath GeoJSON, CSV, overlay PNG, 16-bit label PNG, dataset sidecar JSON.
export * from './color';
export * from './geojson';
export * from './csv';
export * from './labelpng';
export * from './overlay';
export * from './dataset';
export * from './cells';
