// Regions of a slide and their nuclei in level-0 pixels, shared by `cfrsam slide run` and the slide
// job workers: moving a region's nuclei to level 0, and keeping each nucleus once across region
// seams (SeamLedger), and the text files they are written to (TextSink).
import { once } from 'node:events';
import { createWriteStream, type WriteStream } from 'node:fs';
import { finished } from 'node:stream/promises';
import * as zlib from 'node:zlib';
import { segmentationProto } from '@cfrsam/rpc';

type Nucleus = segmentationProto.Nucleus;

// ---------------------------------------------------------------------------------------------
// Nuclei to level 0

const r2 = (v: number) => Math.round(v * 100) / 100;

/** A nucleus of a region image moved to level-0 pixels (coordinates and px measurements). */
export function nucleusToLevel0(
  n: Nucleus,
  origin: { x: number; y: number },
  scale: { x: number; y: number },
  level0: { width: number; height: number },
  id: number,
): Nucleus {
  const clampX = (v: number) => Math.min(level0.width, Math.max(0, v));
  const clampY = (v: number) => Math.min(level0.height, Math.max(0, v));
  const X = (x: number) => origin.x + x * scale.x;
  const Y = (y: number) => origin.y + y * scale.y;
  const lin = Math.sqrt(scale.x * scale.y);
  const m = n.measurements;
  return {
    ...n,
    id,
    centroid: n.centroid ? { x: r2(X(n.centroid.x)), y: r2(Y(n.centroid.y)) } : undefined,
    bbox: n.bbox
      ? {
          x0: Math.floor(clampX(X(n.bbox.x0))),
          y0: Math.floor(clampY(Y(n.bbox.y0))),
          x1: Math.ceil(clampX(X(n.bbox.x1))),
          y1: Math.ceil(clampY(Y(n.bbox.y1))),
        }
      : undefined,
    polygon: n.polygon.map((p) => ({ x: r2(clampX(X(p.x))), y: r2(clampY(Y(p.y))) })),
    measurements: m
      ? {
          ...m,
          areaPx: m.areaPx * scale.x * scale.y,
          perimeterPx: m.perimeterPx * lin,
          majorAxisPx: m.majorAxisPx * lin,
          minorAxisPx: m.minorAxisPx * lin,
        }
      : undefined,
    mask: undefined,
  };
}

// ---------------------------------------------------------------------------------------------
// Seams

interface SeamEntry {
  cx: number;
  cy: number;
  /** polygon, flat [x0, y0, x1, y1, ...] in level-0 pixels */
  poly: number[];
}

function insidePolygon(poly: readonly number[], x: number, y: number): boolean {
  let inside = false;
  const n = poly.length / 2;
  for (let i = 0, j = n - 1; i < n; j = i++) {
    const xi = poly[2 * i],
      yi = poly[2 * i + 1],
      xj = poly[2 * j],
      yj = poly[2 * j + 1];
    if (yi > y !== yj > y && x < ((xj - xi) * (y - yi)) / (yj - yi) + xi) inside = !inside;
  }
  return inside;
}

/**
 * The blur check over a slide's regions (`cfrsam slide run` and slide jobs): the model tiles run,
 * those the model's blur gate called blurred, and the regions (level-0 rectangles) where they
 * were more than half.
 */
export class BlurTally {
  readonly tiles = { model: 0, blurred: 0 };
  readonly blurredRegions: { x: number; y: number; width: number; height: number }[] = [];

  add(region: { x: number; y: number; width: number; height: number }, response: { tiles: number; blurredTiles: number }): void {
    this.tiles.model += response.tiles;
    this.tiles.blurred += response.blurredTiles;
    if (response.blurredTiles * 2 > response.tiles) {
      this.blurredRegions.push({ x: region.x, y: region.y, width: region.width, height: region.height });
    }
  }
}

/**
 * Each nucleus once across region seams. A region keeps the nuclei whose level-0 centroid lies in
 * its cell grown by `band` (a few pixels); the owner rule alone (centroid in the cell) fails for a
 * nucleus on a seam, whose centroid two regions estimate pixels apart on either side of the line
 * (found twice, or by neither). So nuclei deeper than 2 x `band` inside the cell are written at
 * once; those nearer its border are checked against the seam nuclei already written by the
 * neighbouring regions (8-neighbourhood) and dropped when one of the two centroids lies inside the
 * other's outline. Regions must be admitted one at a time (in write order). Seam nuclei are kept
 * only until every neighbour of their region is written, so memory follows the regions in flight
 * (about one row of the grid), not the slide.
 */
export class SeamLedger {
  private readonly neighbours: number[][];
  private readonly written = new Set<number>();
  private readonly seams = new Map<number, SeamEntry[]>();

  constructor(
    private readonly cells: readonly { x: number; y: number; width: number; height: number }[],
    private readonly band: { x: number; y: number },
  ) {
    const pitchX = Math.max(1, ...cells.map((c) => c.width)),
      pitchY = Math.max(1, ...cells.map((c) => c.height));
    const x0 = Math.min(...cells.map((c) => c.x)),
      y0 = Math.min(...cells.map((c) => c.y));
    const key = (gx: number, gy: number) => `${gx},${gy}`;
    const grid = cells.map((c) => [Math.round((c.x - x0) / pitchX), Math.round((c.y - y0) / pitchY)]);
    const byKey = new Map<string, number>();
    grid.forEach(([gx, gy], i) => byKey.set(key(gx, gy), i));
    this.neighbours = grid.map(([gx, gy]) => {
      const out: number[] = [];
      for (let dy = -1; dy <= 1; dy++) {
        for (let dx = -1; dx <= 1; dx++) {
          const j = dx || dy ? byKey.get(key(gx + dx, gy + dy)) : undefined;
          if (j !== undefined) out.push(j);
        }
      }
      return out;
    });
  }

  /** Whether a level-0 centroid is a candidate of region `i` (in its cell grown by the band). */
  candidate(i: number, x: number, y: number): boolean {
    const c = this.cells[i],
      b = this.band;
    return x >= c.x - b.x && x < c.x + c.width + b.x && y >= c.y - b.y && y < c.y + c.height + b.y;
  }

  /** The nuclei of region `i` to write (level-0 coordinates); remembers its seam nuclei. */
  admit(i: number, nuclei: readonly Nucleus[]): Nucleus[] {
    const c = this.cells[i],
      b = this.band;
    const written = this.neighbours[i].filter((j) => this.written.has(j)).flatMap((j) => this.seams.get(j) ?? []);
    const mine: SeamEntry[] = [];
    const out: Nucleus[] = [];
    for (const n of nuclei) {
      const cx = n.centroid?.x ?? NaN,
        cy = n.centroid?.y ?? NaN;
      if (!this.candidate(i, cx, cy)) continue;
      // Twins of a neighbour's candidate (up to `band` past the seam, a pixel or more from its
      // estimate of the centroid) lie within 2 x band of the seam on this side.
      const deep = cx >= c.x + 2 * b.x && cx < c.x + c.width - 2 * b.x && cy >= c.y + 2 * b.y && cy < c.y + c.height - 2 * b.y;
      if (!deep) {
        const poly = n.polygon.flatMap((p) => [p.x, p.y]);
        const twin = written.some(
          (e) => (poly.length >= 6 && insidePolygon(poly, e.cx, e.cy)) || (e.poly.length >= 6 && insidePolygon(e.poly, cx, cy)),
        );
        if (twin) continue;
        mine.push({ cx, cy, poly });
      }
      out.push(n);
    }
    this.written.add(i);
    this.seams.set(i, mine);
    for (const j of [i, ...this.neighbours[i]]) {
      if (this.written.has(j) && this.neighbours[j].every((k) => this.written.has(k))) this.seams.delete(j);
    }
    return out;
  }

  /** Seam nuclei currently remembered. */
  get remembered(): number {
    let n = 0;
    for (const v of this.seams.values()) n += v.length;
    return n;
  }
}

/**
 * Writes regions in index order, whatever order they finish in. Which of two regions keeps a
 * nucleus both of them found (SeamLedger) must not depend on timing, or two runs of one slide
 * differ in the class and id of seam nuclei. A finished region waits here for the ones before it;
 * a failed one (null) is skipped without holding back the rest.
 */
export class InOrderWriter<T> {
  private readonly finished = new Map<number, T | null>();
  private next = 0;
  private chain: Promise<void> = Promise.resolve();

  constructor(private readonly write: (index: number, item: T) => Promise<void>) {}

  /** Queues region `index` and starts every write now in order; resolves when they are done. */
  done(index: number, item: T | null): Promise<void> {
    this.finished.set(index, item);
    while (this.finished.has(this.next)) {
      const i = this.next++;
      const ready = this.finished.get(i)!;
      this.finished.delete(i);
      if (ready !== null) this.chain = this.chain.then(() => this.write(i, ready));
    }
    return this.chain;
  }

  /** Every write started so far (rejects with the first write error). */
  flush(): Promise<void> {
    return this.chain;
  }

  /** Finished regions waiting for an earlier one. */
  get waiting(): number {
    return this.finished.size;
  }
}

/** A text stream to a file (optionally gzip), with backpressure. */
export class TextSink {
  private readonly file: WriteStream;
  private readonly target: NodeJS.WritableStream;
  private error: Error | undefined;

  constructor(
    readonly filePath: string,
    gzip: boolean,
  ) {
    this.file = createWriteStream(filePath);
    this.file.on('error', (e) => (this.error ??= e));
    if (gzip) {
      const gz = zlib.createGzip({ level: 6 });
      gz.on('error', (e) => (this.error ??= e));
      gz.pipe(this.file);
      this.target = gz;
    } else {
      this.target = this.file;
    }
  }

  async write(text: string): Promise<void> {
    if (this.error) throw this.error;
    if (!this.target.write(text)) await once(this.target as NodeJS.EventEmitter, 'drain');
  }

  async end(): Promise<void> {
    this.target.end();
    await finished(this.file);
    if (this.error) throw this.error;
  }

  destroy(): void {
    (this.target as unknown as { destroy?: () => void }).destroy?.();
    this.file.destroy();
  }
}
