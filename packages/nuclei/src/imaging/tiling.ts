// Tiling of an image into model-input tiles, and the ownership rule that makes stitching exact.
//
// An image of at most S x S is one tile, padded to S x S (the valid region is recorded so that
// nothing is reported from the padding). A larger image is cut into S x S tiles that overlap by at
// least `overlap` pixels; the tiles are spread evenly, so the last one ends exactly at the image
// edge and no tile needs padding. Each tile has a core region: the cores partition the image (the
// boundary between two neighbours is the middle of their shared strip; the image edges belong to
// the edge tiles). A nucleus belongs to the tile whose core holds its prompt point, so each nucleus
// is decoded by one tile only, and, since that point lies at least overlap/2 pixels inside the
// tile, a nucleus up to that radius is never cut at a seam.
import type { RgbImage } from './decode';

/** Half-open rectangle [x0, x1) x [y0, y1) in image pixels. */
export interface Rect {
  x0: number;
  y0: number;
  x1: number;
  y1: number;
}

export interface Tile {
  /** Position in the layout, row-major. */
  index: number;
  col: number;
  row: number;
  /** Top-left corner of the tile in image pixels. */
  x: number;
  y: number;
  /** The image pixels the tile holds (the rest of the S x S tile is padding). */
  valid: Rect;
  /** The region whose nuclei this tile reports. */
  core: Rect;
}

export interface TileLayout {
  imageWidth: number;
  imageHeight: number;
  tileSize: number;
  overlap: number;
  cols: number;
  rows: number;
  tiles: Tile[];
  /** Core boundaries along x: col c owns [colBounds[c], colBounds[c+1]). */
  colBounds: number[];
  rowBounds: number[];
}

/** Tile origins and core boundaries along one axis. */
export function planAxis(length: number, tileSize: number, overlap: number): { starts: number[]; bounds: number[] } {
  if (!(length > 0) || !(tileSize > 0)) throw new RangeError(`bad axis: length ${length}, tile ${tileSize}`);
  if (overlap < 0 || overlap >= tileSize) throw new RangeError(`overlap ${overlap} must be in [0, ${tileSize})`);
  if (length <= tileSize) return { starts: [0], bounds: [0, length] };
  const stride = tileSize - overlap;
  const n = Math.ceil((length - overlap) / stride);
  const step = (length - tileSize) / (n - 1);
  const starts = Array.from({ length: n }, (_, i) => Math.round(i * step));
  const bounds = [0];
  for (let i = 0; i + 1 < n; i++) {
    // The middle of the strip shared by tiles i and i+1: [starts[i+1], starts[i] + S).
    bounds.push(Math.floor((starts[i + 1] + starts[i] + tileSize) / 2));
  }
  bounds.push(length);
  return { starts, bounds };
}

export function planTiles(width: number, height: number, tileSize: number, overlap: number): TileLayout {
  const xs = planAxis(width, tileSize, overlap);
  const ys = planAxis(height, tileSize, overlap);
  const tiles: Tile[] = [];
  for (let r = 0; r < ys.starts.length; r++) {
    for (let c = 0; c < xs.starts.length; c++) {
      const x = xs.starts[c];
      const y = ys.starts[r];
      tiles.push({
        index: tiles.length,
        col: c,
        row: r,
        x,
        y,
        valid: { x0: x, y0: y, x1: Math.min(width, x + tileSize), y1: Math.min(height, y + tileSize) },
        core: { x0: xs.bounds[c], y0: ys.bounds[r], x1: xs.bounds[c + 1], y1: ys.bounds[r + 1] },
      });
    }
  }
  return {
    imageWidth: width,
    imageHeight: height,
    tileSize,
    overlap,
    cols: xs.starts.length,
    rows: ys.starts.length,
    tiles,
    colBounds: xs.bounds,
    rowBounds: ys.bounds,
  };
}

function boundIndex(bounds: number[], v: number): number {
  // bounds is sorted, bounds[0] = 0, bounds[n] = length; v is clamped into the image.
  const n = bounds.length - 1;
  if (v < bounds[0]) return 0;
  for (let i = 0; i < n; i++) if (v < bounds[i + 1]) return i;
  return n - 1;
}

/**
 * Side of a slide region (at the model's resolution) whose read area, the region plus `margin` on
 * every side, is exactly `tilesPerSide` tiles of planTiles' layout, with `slack` pixels to spare
 * for the rounding of a read resampled from another resolution (a pixel or two of the slide's
 * level, doubled at 20x). With the margin at half the tile overlap, regions read this way abut as
 * the tiles of one image do: a region 8 px past a multiple of the tile stride would cost a whole
 * row and column of tiles more (7 x 7 instead of 6 x 6 at the defaults).
 */
export function tileAlignedRegionSize(tilesPerSide: number, tileSize: number, overlap: number, margin: number, slack = 8): number {
  if (!Number.isInteger(tilesPerSide) || tilesPerSide < 1) throw new RangeError(`tiles per side must be a positive integer, got ${tilesPerSide}`);
  const side = tileSize + (tilesPerSide - 1) * (tileSize - overlap) - 2 * margin - slack;
  if (side < 1) throw new RangeError(`${tilesPerSide} tile(s) of ${tileSize} px leave no region inside a ${margin} px margin`);
  return side;
}

/**
 * The tile whose core holds the point (x, y) in image pixel coordinates (continuous: the pixel
 * (i, j) covers [i, i+1) x [j, j+1)). Points outside the image go to the nearest edge tile.
 */
export function ownerTile(layout: TileLayout, x: number, y: number): Tile {
  const c = boundIndex(layout.colBounds, x);
  const r = boundIndex(layout.rowBounds, y);
  return layout.tiles[r * layout.cols + c];
}

export function rectContains(rect: Rect, x: number, y: number): boolean {
  return x >= rect.x0 && x < rect.x1 && y >= rect.y0 && y < rect.y1;
}

/** RGB used for the padding of tiles smaller than the model input: white, like empty glass. */
export const PAD_RGB: readonly [number, number, number] = [255, 255, 255];

/** Copies one tile's S x S RGB pixels out of the image (padding outside the valid region). */
export function extractTileRgb(image: RgbImage, tile: Tile, tileSize: number): Uint8Array {
  const out = new Uint8Array(tileSize * tileSize * 3);
  const { x0, y0, x1, y1 } = tile.valid;
  const validW = x1 - x0;
  if (validW < tileSize || y1 - y0 < tileSize) {
    for (let i = 0; i < out.length; i += 3) {
      out[i] = PAD_RGB[0];
      out[i + 1] = PAD_RGB[1];
      out[i + 2] = PAD_RGB[2];
    }
  }
  for (let y = y0; y < y1; y++) {
    const src = (y * image.width + x0) * 3;
    const dst = ((y - tile.y) * tileSize + (x0 - tile.x)) * 3;
    out.set(image.data.subarray(src, src + validW * 3), dst);
  }
  return out;
}
