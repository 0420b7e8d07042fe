// Rules that turn per-tile decoder masks into one set of non-overlapping instances in image
// coordinates: paste (tile -> image, clipped to the tile's real pixels), ownership (a mask counts
// only for the tile whose core holds its prompt), duplicate prompts across tiles, and overlaps.
import { ownerTile, type Tile, type TileLayout } from '../imaging/tiling';
import {
  clipMask,
  cropToForeground,
  EMPTY_MASK,
  fillHoles,
  keepComponent,
  maskArea,
  removePinches,
  translateMask,
  unpackMask,
  type PackedMask,
  type PlacedMask,
} from './mask';

/** A decoder mask (tile pixels) -> image coordinates, clipped to the tile's valid region. */
export function pasteTileMask(packed: PackedMask, tile: Tile): PlacedMask {
  const mask = unpackMask(packed);
  if (mask.width === 0) return EMPTY_MASK;
  return clipMask(translateMask(mask, tile.x, tile.y), tile.valid);
}

/** Whether `tile` owns the point (x, y) in image coordinates. */
export function tileOwnsPoint(layout: TileLayout, tile: Tile, x: number, y: number): boolean {
  return ownerTile(layout, x, y).index === tile.index;
}

export interface ScoredPoint {
  x: number;
  y: number;
  score: number;
}

/**
 * Greedy non-maximum suppression of points in image coordinates: in decreasing score order, a
 * point closer than `radius` to one already kept is dropped. Used across tiles: two neighbours see
 * the same nucleus in their shared strip and may place its prompt on either side of the seam.
 * Returns the indices kept, in input order. Ties in score are broken by input order, so the result
 * is deterministic.
 */
export function suppressNearbyPoints(points: readonly ScoredPoint[], radius: number): number[] {
  if (radius <= 0) return points.map((_, i) => i);
  const order = points.map((_, i) => i).sort((a, b) => points[b].score - points[a].score || a - b);
  const cell = radius;
  const grid = new Map<string, number[]>();
  const keep = new Uint8Array(points.length);
  const r2 = radius * radius;
  for (const i of order) {
    const p = points[i];
    const gx = Math.floor(p.x / cell);
    const gy = Math.floor(p.y / cell);
    let suppressed = false;
    for (let dy = -1; dy <= 1 && !suppressed; dy++) {
      for (let dx = -1; dx <= 1 && !suppressed; dx++) {
        for (const j of grid.get(`${gx + dx},${gy + dy}`) ?? []) {
          const q = points[j];
          if ((q.x - p.x) ** 2 + (q.y - p.y) ** 2 < r2) {
            suppressed = true;
            break;
          }
        }
      }
    }
    if (suppressed) continue;
    keep[i] = 1;
    const key = `${gx},${gy}`;
    const bucket = grid.get(key);
    if (bucket) bucket.push(i);
    else grid.set(key, [i]);
  }
  const out: number[] = [];
  for (let i = 0; i < points.length; i++) if (keep[i]) out.push(i);
  return out;
}

export interface CandidateInstance {
  /** The mask in image coordinates. */
  mask: PlacedMask;
  /** Higher wins contested pixels. */
  score: number;
  /** The prompt point in image coordinates: the kept component is the one under it. */
  prompt: { x: number; y: number };
}

export interface OverlapOptions {
  /**
   * An instance that keeps less than this fraction of its own area after higher-scoring instances
   * took their pixels is dropped (it was mostly a duplicate of them).
   */
  minKeptFraction: number;
  /** Instances smaller than this many pixels after resolution are dropped. */
  minAreaPx: number;
}

export const DEFAULT_OVERLAP_OPTIONS: OverlapOptions = { minKeptFraction: 0.5, minAreaPx: 4 };

function intersects(a: PlacedMask, b: PlacedMask): boolean {
  return a.x0 < b.x0 + b.width && b.x0 < a.x0 + a.width && a.y0 < b.y0 + b.height && b.y0 < a.y0 + a.height;
}

/**
 * Resolves overlaps between candidate instances. Candidates are taken in decreasing score order
 * (ties: input order); each first loses holes and stray fragments (only the connected component
 * under its prompt, or the largest, is kept), then loses the pixels already taken by higher-scoring
 * instances, is dropped if that leaves less than minKeptFraction of it (or nothing), and otherwise
 * is reduced again to one connected component. Returns the survivors in input order, each with its
 * final mask; empty masks are dropped.
 */
export function resolveOverlaps<T extends CandidateInstance>(candidates: readonly T[], options: OverlapOptions = DEFAULT_OVERLAP_OPTIONS): T[] {
  const order = candidates.map((_, i) => i).sort((a, b) => candidates[b].score - candidates[a].score || a - b);
  const accepted: PlacedMask[] = [];
  const finalMasks = new Map<number, PlacedMask>();
  // Accepted masks indexed by a coarse grid of their boxes, so each candidate only checks neighbours.
  const CELL = 64;
  const grid = new Map<string, number[]>();
  const cellsOf = (m: PlacedMask): string[] => {
    const keys: string[] = [];
    for (let gy = Math.floor(m.y0 / CELL); gy <= Math.floor((m.y0 + m.height - 1) / CELL); gy++) {
      for (let gx = Math.floor(m.x0 / CELL); gx <= Math.floor((m.x0 + m.width - 1) / CELL); gx++) keys.push(`${gx},${gy}`);
    }
    return keys;
  };
  for (const i of order) {
    const cand = candidates[i];
    if (cand.mask.width === 0) continue;
    let mask = keepComponent(fillHoles(cropToForeground(cand.mask)), cand.prompt);
    const ownArea = maskArea(mask);
    if (ownArea === 0) continue;
    const seen = new Set<number>();
    let data: Uint8Array | undefined;
    for (const key of cellsOf(mask)) {
      for (const j of grid.get(key) ?? []) {
        if (seen.has(j)) continue;
        seen.add(j);
        const other = accepted[j];
        if (!intersects(mask, other)) continue;
        data ??= mask.data.slice();
        const x0 = Math.max(mask.x0, other.x0);
        const x1 = Math.min(mask.x0 + mask.width, other.x0 + other.width);
        const y0 = Math.max(mask.y0, other.y0);
        const y1 = Math.min(mask.y0 + mask.height, other.y0 + other.height);
        for (let y = y0; y < y1; y++) {
          for (let x = x0; x < x1; x++) {
            if (other.data[(y - other.y0) * other.width + (x - other.x0)]) data[(y - mask.y0) * mask.width + (x - mask.x0)] = 0;
          }
        }
      }
    }
    if (data) {
      mask = { ...mask, data };
      const kept = maskArea(mask);
      if (kept === 0 || kept < options.minKeptFraction * ownArea) continue;
      // The cut leaves holes only where other nuclei's pixels are, and they stay out (refilling them
      // would overlap those nuclei; the outline is the outer contour around them). A cut can also
      // leave pixels meeting only at a corner, whose outline touches itself: those pinches go.
      mask = keepComponent(removePinches(keepComponent(cropToForeground(mask), cand.prompt)), cand.prompt);
    }
    // The decoder's own outline can pinch too (a one-pixel diagonal notch).
    mask = keepComponent(removePinches(mask), cand.prompt);
    if (mask.width === 0 || maskArea(mask) < options.minAreaPx) continue;
    const idx = accepted.length;
    accepted.push(mask);
    for (const key of cellsOf(mask)) {
      const bucket = grid.get(key);
      if (bucket) bucket.push(idx);
      else grid.set(key, [idx]);
    }
    finalMasks.set(i, mask);
  }
  const out: T[] = [];
  candidates.forEach((c, i) => {
    const m = finalMasks.get(i);
    if (m) out.push({ ...c, mask: m });
  });
  return out;
}

/**
 * The order in which instances get their ids: by centroid row, then column (rounded to pixels),
 * then by decreasing score, so ids are stable for a given result and read like text.
 */
export function instanceOrder(items: readonly { cx: number; cy: number; score: number }[]): number[] {
  return items
    .map((_, i) => i)
    .sort((a, b) => {
      const p = items[a];
      const q = items[b];
      return Math.floor(p.cy) - Math.floor(q.cy) || Math.floor(p.cx) - Math.floor(q.cx) || q.score - p.score || a - b;
    });
}
