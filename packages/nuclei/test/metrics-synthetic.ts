// Deterministic synthetic nuclei (ground truth plus a perturbed prediction) for the metric tests.
import type { LabelImage } from '../src/metrics';

export interface SyntheticPair {
  gt: LabelImage;
  pred: LabelImage;
  gtClasses: Map<number, number>;
  predClasses: Map<number, number>;
}

/**
 * Ellipses on a jittered grid; the prediction misses some, shifts some by up to 3 px, splits
 * some in two, grows some by a pixel, merges some touching pairs, adds square false positives,
 * and numbers its instances non-contiguously. Classes: 85% right.
 */
export function syntheticPair(size: number, spacing: number, numClasses: number, seed: number): SyntheticPair {
  const rand = () => (seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648;
  const g = new Uint16Array(size * size);
  const gtClasses = new Map<number, number>();
  let count = 0;
  for (let gy = spacing / 2; gy < size; gy += spacing) {
    for (let gx = spacing / 2; gx < size; gx += spacing) {
      const id = ++count;
      gtClasses.set(id, Math.floor(rand() * numClasses));
      const cx = gx + (rand() - 0.5) * spacing * 0.4;
      const cy = gy + (rand() - 0.5) * spacing * 0.4;
      const a = spacing * (0.3 + rand() * 0.25);
      const b = spacing * (0.2 + rand() * 0.15);
      const t = rand() * Math.PI;
      const r = Math.ceil(a);
      for (let y = Math.max(0, Math.floor(cy - r)); y <= Math.min(size - 1, Math.ceil(cy + r)); y++) {
        for (let x = Math.max(0, Math.floor(cx - r)); x <= Math.min(size - 1, Math.ceil(cx + r)); x++) {
          const u = ((x - cx) * Math.cos(t) + (y - cy) * Math.sin(t)) / a;
          const v = (-(x - cx) * Math.sin(t) + (y - cy) * Math.cos(t)) / b;
          if (u * u + v * v <= 1) g[y * size + x] = id;
        }
      }
    }
  }
  const p = new Uint32Array(size * size);
  const predClasses = new Map<number, number>();
  let next = 1;
  const newId = (c: number) => {
    const id = next++ * 7 + 3;
    predClasses.set(id, c);
    return id;
  };
  const pix: number[][] = Array.from({ length: count + 1 }, () => []);
  for (let i = 0; i < g.length; i++) if (g[i]) pix[g[i]].push(i);
  for (let id = 1; id <= count; id++) {
    const px = pix[id];
    if (px.length === 0) continue;
    const c = rand() < 0.85 ? gtClasses.get(id)! : Math.floor(rand() * numClasses);
    const r = rand();
    if (r < 0.08) continue;
    if (r < 0.2) {
      const sx = Math.round((rand() - 0.5) * 6);
      const sy = Math.round((rand() - 0.5) * 6);
      const nid = newId(c);
      for (const i of px) {
        const x = (i % size) + sx;
        const y = Math.floor(i / size) + sy;
        if (x >= 0 && y >= 0 && x < size && y < size) p[y * size + x] = nid;
      }
      continue;
    }
    if (r < 0.28) {
      const cx = px.reduce((s, i) => s + (i % size), 0) / px.length;
      const left = newId(c);
      const right = newId(c);
      for (const i of px) p[i] = i % size < cx ? left : right;
      continue;
    }
    const nid = newId(c);
    for (const i of px) p[i] = nid;
    if (r < 0.38) {
      for (const i of px) {
        for (const d of [1, -1, size, -size]) {
          const j = i + d;
          if (j >= 0 && j < p.length && p[j] === 0 && g[j] === 0) p[j] = nid;
        }
      }
    }
  }
  for (let i = 1; i < p.length; i++) {
    if (p[i] && p[i - 1] && p[i] !== p[i - 1] && rand() < 0.05) {
      const from = p[i];
      const to = p[i - 1];
      for (let k = 0; k < p.length; k++) if (p[k] === from) p[k] = to;
    }
  }
  const fps = Math.floor(count * 0.06) + 1;
  for (let f = 0; f < fps; f++) {
    const x0 = Math.floor(rand() * (size - 8));
    const y0 = Math.floor(rand() * (size - 8));
    const nid = newId(Math.floor(rand() * numClasses));
    for (let y = y0; y < y0 + 6; y++) for (let x = x0; x < x0 + 6; x++) if (!p[y * size + x]) p[y * size + x] = nid;
  }
  return { gt: { width: size, height: size, data: g }, pred: { width: size, height: size, data: p }, gtClasses, predClasses };
}
