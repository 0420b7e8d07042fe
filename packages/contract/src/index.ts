// @cfrsam/contract: what the PyTorch export and the services agree on. The bundle manifest, tensor
// codecs between protos and host arrays, tile digests and the bit-packed mask wire format.
export * from './manifest';
export * from './tensor';
export * from './digest';
export * from './masks';
export * from './normalize';
export * from './tileInput';
