// Image decoding, validation and tiling (normalisation is in @cfrsam/contract) (pure, no service state).
export * from './decode';
export * from './tiling';
export * from './resample';
export * from './glass';
