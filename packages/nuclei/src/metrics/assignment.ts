// Optimal one-to-one assignment (the Hungarian / Kuhn-Munkres problem) for the metrics that pair
// instances: AJI+, PQ below IoU 0.5 and centroid pairing for detection.

/**
 * Minimum-cost assignment of a dense rectangular cost matrix (row-major, `rows` x `cols`): every row
 * is assigned a distinct column when rows <= cols, otherwise every column a distinct row.
 *
 * This is the shortest augmenting path method of Crouse (2016), the algorithm behind scipy's
 * `linear_sum_assignment` that HoVer-Net and PanNuke call; the column scan order and tie-breaking
 * (prefer a free column on equal cost; a constant matrix yields the identity) follow scipy's, so
 * ties resolve the same way.
 *
 * @returns for each row, its column, or -1 when the row is left unassigned (rows > cols).
 */
export function linearSumAssignment(cost: Float64Array | number[], rows: number, cols: number): Int32Array {
  if (cost.length !== rows * cols) {
    throw new RangeError(`cost matrix has ${cost.length} entries, expected ${rows}x${cols}`);
  }
  for (let k = 0; k < cost.length; k++) {
    if (!Number.isFinite(cost[k])) throw new RangeError('cost matrix entries must be finite');
  }
  if (rows === 0 || cols === 0) return new Int32Array(rows).fill(-1);
  if (rows <= cols) return solveWide(cost, rows, cols);
  // More rows than columns: solve the transpose and invert, as scipy does.
  const t = new Float64Array(rows * cols);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) t[c * rows + r] = cost[r * cols + c];
  const rowForCol = solveWide(t, cols, rows);
  const colForRow = new Int32Array(rows).fill(-1);
  for (let c = 0; c < cols; c++) colForRow[rowForCol[c]] = c;
  return colForRow;
}

function solveWide(cost: Float64Array | number[], nr: number, nc: number): Int32Array {
  const u = new Float64Array(nr);
  const v = new Float64Array(nc);
  const shortest = new Float64Array(nc);
  const path = new Int32Array(nc).fill(-1);
  const col4row = new Int32Array(nr).fill(-1);
  const row4col = new Int32Array(nc).fill(-1);
  const seenRow = new Uint8Array(nr);
  const seenCol = new Uint8Array(nc);
  const remaining = new Int32Array(nc);

  for (let curRow = 0; curRow < nr; curRow++) {
    // Dijkstra over reduced costs from curRow until a free column is reached.
    let remainingCount = nc;
    for (let it = 0; it < nc; it++) remaining[it] = nc - it - 1;
    seenRow.fill(0);
    seenCol.fill(0);
    shortest.fill(Infinity);
    let minVal = 0;
    let sink = -1;
    let i = curRow;
    while (sink === -1) {
      let index = -1;
      let lowest = Infinity;
      seenRow[i] = 1;
      const base = i * nc;
      const ui = u[i];
      for (let it = 0; it < remainingCount; it++) {
        const j = remaining[it];
        let s = shortest[j];
        const r = minVal + cost[base + j] - ui - v[j];
        if (r < s) {
          path[j] = i;
          shortest[j] = r;
          s = r;
        }
        if (s < lowest || (s === lowest && row4col[j] === -1)) {
          lowest = s;
          index = it;
        }
      }
      minVal = lowest;
      if (minVal === Infinity) throw new Error('assignment is infeasible');
      const j = remaining[index];
      if (row4col[j] === -1) sink = j;
      else i = row4col[j];
      seenCol[j] = 1;
      remaining[index] = remaining[--remainingCount];
    }
    // Dual update keeps reduced costs non-negative.
    u[curRow] += minVal;
    for (let r = 0; r < nr; r++) {
      if (seenRow[r] && r !== curRow) u[r] += minVal - shortest[col4row[r]];
    }
    for (let c = 0; c < nc; c++) {
      if (seenCol[c]) v[c] -= minVal - shortest[c];
    }
    // Augment along the path back to curRow.
    let j = sink;
    for (;;) {
      const r = path[j];
      row4col[j] = r;
      const prev = col4row[r];
      col4row[r] = j;
      j = prev;
      if (r === curRow) break;
    }
  }
  return col4row;
}

/**
 * A sparse bipartite graph between `nA` and `nB` nodes: edge k joins a[k] and b[k] at `cost[k]`.
 * Missing edges cost `missingCost` and are never returned as matches.
 */
export interface SparseAssignmentProblem {
  nA: number;
  nB: number;
  a: Int32Array;
  b: Int32Array;
  cost: Float64Array;
  missingCost: number;
}

/**
 * Minimum-cost assignment over a sparse graph, solved independently on each connected component
 * (nuclei overlap or lie near only a few others, so the components are small and the dense
 * solver stays cheap). Equivalent to solving the whole dense matrix whenever a missing edge can
 * never improve the optimum: the maximum-IoU problems (cost = -IoU, missing = 0) and the gated
 * distance problems (missing = a cost larger than any within-radius assignment). Among optimal
 * solutions with equal cost, the one chosen may differ from a whole-matrix solve.
 *
 * @returns for each A node its matched B node or -1; only existing edges are returned.
 */
export function sparseAssignment(problem: SparseAssignmentProblem): Int32Array {
  const { nA, nB, a, b, cost, missingCost } = problem;
  const matchA = new Int32Array(nA).fill(-1);
  if (a.length === 0) return matchA;
  // Union-find over A nodes (0..nA-1) and B nodes (nA..nA+nB-1).
  const parent = new Int32Array(nA + nB);
  for (let k = 0; k < parent.length; k++) parent[k] = k;
  const find = (x: number): number => {
    while (parent[x] !== x) {
      parent[x] = parent[parent[x]];
      x = parent[x];
    }
    return x;
  };
  for (let k = 0; k < a.length; k++) {
    const ra = find(a[k]);
    const rb = find(nA + b[k]);
    if (ra !== rb) parent[ra] = rb;
  }
  // Group edges by component root.
  const edgesOf = new Map<number, number[]>();
  for (let k = 0; k < a.length; k++) {
    const root = find(a[k]);
    let list = edgesOf.get(root);
    if (!list) edgesOf.set(root, (list = []));
    list.push(k);
  }
  for (const edges of edgesOf.values()) {
    if (edges.length === 1) {
      const k = edges[0];
      if (cost[k] <= missingCost) matchA[a[k]] = b[k];
      continue;
    }
    // Local indices in increasing global order so that ties resolve as in a whole-matrix solve.
    const rowsG = [...new Set(edges.map((k) => a[k]))].sort((x, y) => x - y);
    const colsG = [...new Set(edges.map((k) => b[k]))].sort((x, y) => x - y);
    const rowOf = new Map(rowsG.map((g, i) => [g, i]));
    const colOf = new Map(colsG.map((g, i) => [g, i]));
    const nr = rowsG.length;
    const nc = colsG.length;
    const local = new Float64Array(nr * nc).fill(missingCost);
    const isEdge = new Uint8Array(nr * nc);
    for (const k of edges) {
      const idx = rowOf.get(a[k])! * nc + colOf.get(b[k])!;
      local[idx] = cost[k];
      isEdge[idx] = 1;
    }
    const colForRow = linearSumAssignment(local, nr, nc);
    for (let r = 0; r < nr; r++) {
      const c = colForRow[r];
      if (c >= 0 && isEdge[r * nc + c]) matchA[rowsG[r]] = colsG[c];
    }
  }
  return matchA;
}
