// What the graph benchmarks (stages, graph-profile, graphs-ab) share: onnxruntime-node as the
// services load it, and deterministic pseudo-random inputs, so that every run feeds the same values.
import { createRequire } from 'node:module';
import * as path from 'node:path';

const require = createRequire(import.meta.url);
export const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
export const ort = require(require.resolve('onnxruntime-node', { paths: [path.join(root, 'packages/runtime')] }));

/** A generator of Float32Arrays of n values in [-1, 1) (Park-Miller), the same sequence for the same seed. */
export function seededFloats(seed = 1) {
  let state = seed;
  return (n) => Float32Array.from({ length: n }, () => ((state = (state * 16807) % 2147483647) / 2147483647) * 2 - 1);
}
