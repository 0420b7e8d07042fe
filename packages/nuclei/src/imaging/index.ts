// Image decoding, validation, tiling and normalisation (pure, no service state).
export * from './decode';
export * from './tiling';
export * from './normalize';
