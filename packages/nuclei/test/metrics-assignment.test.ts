import { describe, expect, it } from 'vitest';
import { linearSumAssignment, sparseAssignment } from '../src/metrics';

function permutations(n: number, k: number): number[][] {
  // All injective maps of k rows into n columns.
  const out: number[][] = [];
  const rec = (prefix: number[]) => {
    if (prefix.length === k) return void out.push(prefix.slice());
    for (let c = 0; c < n; c++) if (!prefix.includes(c)) rec([...prefix, c]);
  };
  rec([]);
  return out;
}

function bruteForceMin(cost: number[], rows: number, cols: number): number {
  if (rows <= cols) {
    return Math.min(...permutations(cols, rows).map((p) => p.reduce((s, c, r) => s + cost[r * cols + c], 0)));
  }
  return Math.min(...permutations(rows, cols).map((p) => p.reduce((s, r, c) => s + cost[r * cols + c], 0)));
}

function assignedCost(cost: number[], cols: number, colForRow: Int32Array): number {
  let s = 0;
  colForRow.forEach((c, r) => {
    if (c >= 0) s += cost[r * cols + c];
  });
  return s;
}

describe('linearSumAssignment (Munkres, scipy semantics)', () => {
  it('finds the optimum of random square and rectangular matrices', () => {
    let seed = 3;
    const rand = () => (seed = (seed * 16807) % 2147483647) / 2147483647;
    for (const [rows, cols] of [
      [1, 1],
      [3, 3],
      [4, 4],
      [5, 5],
      [2, 5],
      [5, 2],
      [3, 6],
      [6, 4],
    ]) {
      for (let trial = 0; trial < 10; trial++) {
        const cost = Array.from({ length: rows * cols }, () => Math.round(rand() * 20) - 5);
        const a = linearSumAssignment(cost, rows, cols);
        const used = new Set(Array.from(a).filter((c) => c >= 0));
        expect(used.size).toBe(Math.min(rows, cols));
        expect(assignedCost(cost, cols, a)).toBeCloseTo(bruteForceMin(cost, rows, cols), 9);
      }
    }
  });

  it('returns the identity for a constant matrix, as scipy does', () => {
    expect(Array.from(linearSumAssignment(new Array(9).fill(1), 3, 3))).toEqual([0, 1, 2]);
  });

  it('handles empty and rejects non-finite costs', () => {
    expect(Array.from(linearSumAssignment([], 0, 3))).toEqual([]);
    expect(Array.from(linearSumAssignment([], 2, 0))).toEqual([-1, -1]);
    expect(() => linearSumAssignment([NaN], 1, 1)).toThrow(/finite/);
  });
});

describe('sparseAssignment', () => {
  it('solves each connected component and returns only real edges', () => {
    // Component 1: A0-B0 (-0.9), A0-B1 (-0.8), A1-B0 (-0.85): best is A0-B1 + A1-B0.
    // Component 2: A2-B2 only. A3 has no edge.
    const m = sparseAssignment({
      nA: 4,
      nB: 3,
      a: Int32Array.from([0, 0, 1, 2]),
      b: Int32Array.from([0, 1, 0, 2]),
      cost: Float64Array.from([-0.9, -0.8, -0.85, -0.1]),
      missingCost: 0,
    });
    expect(Array.from(m)).toEqual([1, 0, 2, -1]);
  });
});
