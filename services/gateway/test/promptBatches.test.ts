import { describe, expect, it } from 'vitest';
import { promptBatches, tileParallelism } from '../src/stages/promptBatches';

const range = (n: number) => Array.from({ length: n }, (_, i) => i);
const sizes = (n: number, maxBatch: number, parallelism: number) => promptBatches(range(n), maxBatch, parallelism).map((b) => b.length);

describe('promptBatches', () => {
  it('fills the parallel decoder calls in as few rounds as the batch limit allows, in equal batches', () => {
    expect(sizes(44, 24, 2)).toEqual([22, 22]); // one round, where 16 + 16 + 12 took two
    expect(sizes(20, 24, 2)).toEqual([10, 10]);
    expect(sizes(49, 24, 2)).toEqual([13, 12, 12, 12]); // 48 fit one round of 24 + 24
    expect(sizes(100, 24, 2)).toEqual([17, 17, 17, 17, 16, 16]);
    expect(sizes(3, 24, 4)).toEqual([1, 1, 1]); // never an empty batch
    expect(sizes(1, 24, 2)).toEqual([1]);
    expect(sizes(0, 24, 2)).toEqual([]);
  });

  it('with one call at a time, as few batches of at most the limit (a GPU decoder: one call per tile)', () => {
    expect(sizes(44, 16, 1)).toEqual([15, 15, 14]);
    expect(sizes(60, 64, 1)).toEqual([60]);
  });

  it('keeps every prompt once, in order, and treats nonsense settings as 1', () => {
    const prompts = range(37);
    expect(promptBatches(prompts, 24, 2).flat()).toEqual(prompts);
    expect(promptBatches(prompts, 0, 0).flat()).toEqual(prompts);
    expect(promptBatches(prompts, 0, 0)).toHaveLength(37);
  });

  it('splits a tile over the decoder calls only while fewer tiles than calls are in flight', () => {
    expect(tileParallelism(2, 1)).toBe(2);
    expect(tileParallelism(2, 2)).toBe(1);
    expect(tileParallelism(2, 8)).toBe(1);
    expect(tileParallelism(4, 2)).toBe(2);
    expect(tileParallelism(0, 0)).toBe(1);
  });
});
