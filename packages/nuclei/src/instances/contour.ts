// Outer contours of binary masks, traced along pixel edges ("crack following"), so the polygon's
// vertices are pixel corners and the unsimplified polygon encloses exactly the mask's pixels
// (for a mask without holes): rasterising it gives the mask back.
import type { PlacedMask } from './mask';

export interface XY {
  x: number;
  y: number;
}

export interface Contour {
  /** Closed polygon (last vertex not repeated), clockwise on screen (y down), vertices at turns. */
  points: XY[];
  /** Total length of the pixel-edge path (each unit edge counts 1). */
  edgeLength: number;
  /** Number of 90-degree turns along the path (equals points.length). */
  turns: number;
}

// Directions: 0 east, 1 south, 2 west, 3 north (y down). Turning right is +1.
const DX = [1, 0, -1, 0];
const DY = [0, 1, 0, -1];

/**
 * Traces the outer boundary of the 4-connected component that holds the first foreground pixel in
 * raster order, keeping the foreground on the right (clockwise on screen). Coordinates are in the
 * mask's frame (mask.x0/y0 added). Returns an empty contour for an empty mask.
 */
export function traceOuterContour(mask: PlacedMask): Contour {
  const { width: w, height: h, data } = mask;
  let start = -1;
  for (let i = 0; i < w * h; i++)
    if (data[i]) {
      start = i;
      break;
    }
  if (start < 0) return { points: [], edgeLength: 0, turns: 0 };
  const fg = (x: number, y: number) => x >= 0 && y >= 0 && x < w && y < h && data[y * w + x] === 1;
  // The first pixel's top edge is on the boundary (the pixel above is background): start at its
  // top-left corner going east.
  const sx = start % w;
  const sy = (start - sx) / w;
  let cx = sx;
  let cy = sy;
  let d = 0;
  const points: XY[] = [];
  let edgeLength = 0;
  // Upper bound on steps: every unit edge is visited at most once per direction.
  const maxSteps = 4 * (w + 1) * (h + 1) + 4;
  for (let step = 0; step < maxSteps; step++) {
    cx += DX[d];
    cy += DY[d];
    edgeLength++;
    // Pixels ahead of corner (cx, cy) in direction d: ahead-left and ahead-right.
    let aheadLeft: boolean;
    let aheadRight: boolean;
    switch (d) {
      case 0:
        aheadLeft = fg(cx, cy - 1);
        aheadRight = fg(cx, cy);
        break;
      case 1:
        aheadLeft = fg(cx, cy);
        aheadRight = fg(cx - 1, cy);
        break;
      case 2:
        aheadLeft = fg(cx - 1, cy);
        aheadRight = fg(cx - 1, cy - 1);
        break;
      default:
        aheadLeft = fg(cx - 1, cy - 1);
        aheadRight = fg(cx, cy - 1);
        break;
    }
    let nd = d;
    // Right-hand rule with 4-connectivity: pixels touching only at a corner are not connected.
    if (!aheadRight) nd = (d + 1) & 3;
    else if (aheadLeft) nd = (d + 3) & 3;
    if (nd !== d) points.push({ x: cx + mask.x0, y: cy + mask.y0 });
    d = nd;
    if (cx === sx && cy === sy && d === 0) break;
  }
  // The start corner is a turn (north -> east) and was pushed last; rotate it to the front.
  if (points.length > 0) points.unshift(points.pop()!);
  return { points, edgeLength, turns: points.length };
}

/**
 * The polygon through the midpoints of a crack contour's unit edges (each corner cut by a
 * diagonal), without repeated vertices.
 */
export function midpointPolygon(points: readonly XY[]): XY[] {
  const n = points.length;
  const out: XY[] = [];
  for (let i = 0; i < n; i++) {
    const prev = points[(i + n - 1) % n];
    const v = points[i];
    const next = points[(i + 1) % n];
    const a = { x: v.x - Math.sign(v.x - prev.x) / 2, y: v.y - Math.sign(v.y - prev.y) / 2 };
    const b = { x: v.x + Math.sign(next.x - v.x) / 2, y: v.y + Math.sign(next.y - v.y) / 2 };
    const last = out[out.length - 1];
    if (!last || last.x !== a.x || last.y !== a.y) out.push(a);
    out.push(b);
  }
  if (out.length > 1 && out[0].x === out[out.length - 1].x && out[0].y === out[out.length - 1].y) out.pop();
  return out;
}

export function polygonPerimeter(points: readonly XY[]): number {
  let p = 0;
  for (let i = 0; i < points.length; i++) {
    const q = points[(i + 1) % points.length];
    p += Math.hypot(q.x - points[i].x, q.y - points[i].y);
  }
  return p;
}

/**
 * Perimeter estimate from a crack contour. The raw pixel-edge length overestimates a circle's
 * perimeter by 4/pi, and cutting the corners (the midpoint polygon) still by about 5% on curves;
 * straightening the midpoint polygon's zigzags (Douglas-Peucker, 0.5 px) brings digital circles
 * to within about 2.5% and straight edges at any angle to within about 4%.
 */
export function contourPerimeter(contour: Contour): number {
  if (contour.edgeLength === 0) return 0;
  const mid = midpointPolygon(contour.points);
  return polygonPerimeter(simplifyClosedPolygon(mid, 0.5));
}

/** Area of a simple polygon (shoelace), positive for either orientation. */
export function polygonArea(points: readonly XY[]): number {
  let s = 0;
  for (let i = 0, j = points.length - 1; i < points.length; j = i++) {
    s += points[j].x * points[i].y - points[i].x * points[j].y;
  }
  return Math.abs(s) / 2;
}

function perpendicularDistance(p: XY, a: XY, b: XY): number {
  const dx = b.x - a.x;
  const dy = b.y - a.y;
  const len = Math.hypot(dx, dy);
  if (len === 0) return Math.hypot(p.x - a.x, p.y - a.y);
  return Math.abs(dy * p.x - dx * p.y + b.x * a.y - b.y * a.x) / len;
}

function douglasPeucker(points: readonly XY[], first: number, last: number, eps: number, keep: Uint8Array): void {
  let maxD = 0;
  let idx = -1;
  for (let i = first + 1; i < last; i++) {
    const d = perpendicularDistance(points[i], points[first], points[last]);
    if (d > maxD) {
      maxD = d;
      idx = i;
    }
  }
  if (idx >= 0 && maxD > eps) {
    keep[idx] = 1;
    douglasPeucker(points, first, idx, eps, keep);
    douglasPeucker(points, idx, last, eps, keep);
  }
}

/**
 * Douglas-Peucker simplification of a closed polygon, keeping a subset of its vertices (so they
 * stay pixel corners). With tolerance 0.5 px the staircases of oblique edges become straight
 * diagonals while the outline stays within half a pixel of the mask. Polygons of 4 or fewer
 * vertices are returned as they are.
 */
export function simplifyClosedPolygon(points: readonly XY[], tolerance: number): XY[] {
  const n = points.length;
  if (n <= 4 || tolerance <= 0) return points.slice();
  // Split the ring at vertex 0 and the vertex farthest from it, simplify both chains.
  let far = 0;
  let farD = -1;
  for (let i = 1; i < n; i++) {
    const d = Math.hypot(points[i].x - points[0].x, points[i].y - points[0].y);
    if (d > farD) {
      farD = d;
      far = i;
    }
  }
  const ring = [...points, points[0]];
  const keep = new Uint8Array(n + 1);
  keep[0] = keep[far] = keep[n] = 1;
  douglasPeucker(ring, 0, far, tolerance, keep);
  douglasPeucker(ring, far, n, tolerance, keep);
  const out: XY[] = [];
  for (let i = 0; i < n; i++) if (keep[i]) out.push(points[i]);
  // Simplification must neither collapse the ring nor make it cross itself (Douglas-Peucker does
  // not guarantee that); fall back to the exact contour when it would.
  return out.length >= 3 && isSimplePolygon(out) ? out : points.slice();
}

function orientation(a: XY, b: XY, c: XY): number {
  const v = (b.x - a.x) * (c.y - a.y) - (b.y - a.y) * (c.x - a.x);
  return v > 0 ? 1 : v < 0 ? -1 : 0;
}

function onSegment(a: XY, b: XY, p: XY): boolean {
  return Math.min(a.x, b.x) <= p.x && p.x <= Math.max(a.x, b.x) && Math.min(a.y, b.y) <= p.y && p.y <= Math.max(a.y, b.y);
}

/** Whether segments ab and cd share any point (crossing, touching or overlapping). */
export function segmentsIntersect(a: XY, b: XY, c: XY, d: XY): boolean {
  const o1 = orientation(a, b, c);
  const o2 = orientation(a, b, d);
  const o3 = orientation(c, d, a);
  const o4 = orientation(c, d, b);
  if (o1 !== o2 && o3 !== o4) return true;
  return (o1 === 0 && onSegment(a, b, c)) || (o2 === 0 && onSegment(a, b, d)) || (o3 === 0 && onSegment(c, d, a)) || (o4 === 0 && onSegment(c, d, b));
}

/**
 * True when no two edges of the closed polygon meet except consecutive edges at their shared
 * vertex (O(n^2): nucleus outlines have tens of vertices).
 */
export function isSimplePolygon(points: readonly XY[]): boolean {
  const n = points.length;
  if (n < 3) return false;
  for (let i = 0; i < n; i++) {
    const a = points[i];
    const b = points[(i + 1) % n];
    if (a.x === b.x && a.y === b.y) return false;
    for (let j = i + 1; j < n; j++) {
      // Skip the edge itself and its neighbours (they share a vertex by construction).
      if (j === i + 1 || (i === 0 && j === n - 1)) {
        // Neighbouring edges may only share their common vertex: folding back onto each other is not simple.
        const c = points[j];
        const d = points[(j + 1) % n];
        const shared = j === i + 1 ? b : a;
        const other1 = j === i + 1 ? a : b;
        const other2 = j === i + 1 ? d : c;
        if (orientation(other1, shared, other2) === 0 && (onSegment(shared, other1, other2) || onSegment(shared, other2, other1))) return false;
        continue;
      }
      if (segmentsIntersect(a, b, points[j], points[(j + 1) % n])) return false;
    }
  }
  return true;
}

/** Convex hull (Andrew's monotone chain), counter-clockwise in math orientation, no repeats. */
export function convexHull(points: readonly XY[]): XY[] {
  const pts = [...points].sort((a, b) => a.x - b.x || a.y - b.y);
  if (pts.length <= 2) return pts;
  const cross = (o: XY, a: XY, b: XY) => (a.x - o.x) * (b.y - o.y) - (a.y - o.y) * (b.x - o.x);
  const lower: XY[] = [];
  for (const p of pts) {
    while (lower.length >= 2 && cross(lower[lower.length - 2], lower[lower.length - 1], p) <= 0) lower.pop();
    lower.push(p);
  }
  const upper: XY[] = [];
  for (let i = pts.length - 1; i >= 0; i--) {
    const p = pts[i];
    while (upper.length >= 2 && cross(upper[upper.length - 2], upper[upper.length - 1], p) <= 0) upper.pop();
    upper.push(p);
  }
  lower.pop();
  upper.pop();
  return lower.concat(upper);
}

/** Even-odd rasterisation of a polygon into a width x height frame (pixel centres tested). */
export function rasterizePolygon(points: readonly XY[], width: number, height: number): Uint8Array {
  const out = new Uint8Array(width * height);
  const n = points.length;
  const xs: number[] = [];
  for (let y = 0; y < height; y++) {
    const cy = y + 0.5;
    xs.length = 0;
    for (let i = 0, j = n - 1; i < n; j = i++) {
      const a = points[j];
      const b = points[i];
      if ((a.y <= cy && b.y > cy) || (b.y <= cy && a.y > cy)) {
        xs.push(a.x + ((cy - a.y) / (b.y - a.y)) * (b.x - a.x));
      }
    }
    xs.sort((p, q) => p - q);
    for (let k = 0; k + 1 < xs.length; k += 2) {
      const from = Math.max(0, Math.ceil(xs[k] - 0.5));
      const to = Math.min(width - 1, Math.floor(xs[k + 1] - 0.5));
      for (let x = from; x <= to; x++) out[y * width + x] = 1;
    }
  }
  return out;
}
