// Prompts: validation of the client's manual prompts, which prompts run for a PromptMode, and the
// translation of a prompt into the decoder's point form in the coordinates of the tile that owns
// it.
import { status } from '@grpc/grpc-js';
import { grpcError, segmentationProto, stagesProto } from '@cfrsam/rpc';
import { ownerTile, type Tile, type TileLayout } from '@cfrsam/nuclei';

const { PromptMode } = segmentationProto;

/** SAM point labels. */
export const LABEL_NEGATIVE = 0;
export const LABEL_POSITIVE = 1;
export const LABEL_BOX_TOP_LEFT = 2;
export const LABEL_BOX_BOTTOM_RIGHT = 3;

export interface PromptLimits {
  maxPrompts: number;
  maxPointsPerPrompt: number;
}

function finite(...v: number[]): boolean {
  return v.every((x) => Number.isFinite(x));
}

/**
 * Checks manual prompts against the image; throws INVALID_ARGUMENT naming the prompt and the
 * problem. Points must lie in [0, width) x [0, height); boxes need x0 < x1, y0 < y1 within
 * [0, width] x [0, height].
 */
export function validatePrompts(prompts: readonly segmentationProto.Prompt[], width: number, height: number, limits: PromptLimits): void {
  const bad = (m: string) => grpcError(status.INVALID_ARGUMENT, m);
  if (prompts.length > limits.maxPrompts) {
    throw bad(`too many prompts: ${prompts.length}, at most ${limits.maxPrompts} per request`);
  }
  prompts.forEach((p, i) => {
    const where = `prompts[${i}]`;
    if (p.positive.length === 0 && !p.box) {
      throw bad(`${where} has no positive point and no box; a prompt needs at least one of them`);
    }
    const points = p.positive.length + p.negative.length;
    if (points > limits.maxPointsPerPrompt) {
      throw bad(`${where} has ${points} points, at most ${limits.maxPointsPerPrompt} per prompt`);
    }
    for (const [kind, list] of [
      ['positive', p.positive],
      ['negative', p.negative],
    ] as const) {
      list.forEach((pt, j) => {
        if (!finite(pt.x, pt.y)) throw bad(`${where}.${kind}[${j}] is not a finite point`);
        if (pt.x < 0 || pt.y < 0 || pt.x >= width || pt.y >= height) {
          throw bad(`${where}.${kind}[${j}] (x=${pt.x}, y=${pt.y}) is outside the ${width}x${height} image`);
        }
      });
    }
    if (p.box) {
      const b = p.box;
      if (!finite(b.x0, b.y0, b.x1, b.y1)) throw bad(`${where}.box has non-finite coordinates`);
      if (!(b.x0 < b.x1 && b.y0 < b.y1)) {
        throw bad(`${where}.box (${b.x0}, ${b.y0}, ${b.x1}, ${b.y1}) is malformed: it needs x0 < x1 and y0 < y1`);
      }
      if (b.x0 < 0 || b.y0 < 0 || b.x1 > width || b.y1 > height) {
        throw bad(`${where}.box (${b.x0}, ${b.y0}, ${b.x1}, ${b.y1}) is outside the ${width}x${height} image`);
      }
    }
  });
}

/** Which prompts run: automatic detections and/or the manual prompts. */
export function resolvePromptMode(mode: segmentationProto.PromptMode, manualCount: number): { auto: boolean; manual: boolean } {
  switch (mode) {
    case PromptMode.PROMPT_MODE_UNSPECIFIED:
      return manualCount > 0 ? { auto: false, manual: true } : { auto: true, manual: false };
    case PromptMode.PROMPT_MODE_AUTO:
      if (manualCount > 0) {
        throw grpcError(
          status.INVALID_ARGUMENT,
          `prompt_mode AUTO takes no prompts, got ${manualCount}; use AUTO_AND_MANUAL to add manual prompts to the automatic ones`,
        );
      }
      return { auto: true, manual: false };
    case PromptMode.PROMPT_MODE_MANUAL:
      if (manualCount === 0) throw grpcError(status.INVALID_ARGUMENT, 'prompt_mode MANUAL needs at least one prompt');
      return { auto: false, manual: true };
    case PromptMode.PROMPT_MODE_AUTO_AND_MANUAL:
      return { auto: true, manual: true };
    default:
      throw grpcError(status.INVALID_ARGUMENT, `unknown prompt_mode ${mode as number}`);
  }
}

/** The point a prompt is anchored at (owner tile, class lookup, kept component): first positive point, else the box centre. */
export function promptAnchor(p: segmentationProto.Prompt): { x: number; y: number } {
  if (p.positive.length > 0) return { x: p.positive[0].x, y: p.positive[0].y };
  const b = p.box!;
  return { x: (b.x0 + b.x1) / 2, y: (b.y0 + b.y1) / 2 };
}

export function ownerOfPrompt(layout: TileLayout, p: segmentationProto.Prompt): Tile {
  const a = promptAnchor(p);
  return ownerTile(layout, a.x, a.y);
}

/**
 * The decoder form of a manual prompt in the coordinates of `tile`. Points of the prompt that lie
 * outside the tile (a prompt spread wider than the tile's overlap) are clamped to its edge: the
 * decoder only sees the tile.
 */
export function toTilePoints(p: segmentationProto.Prompt, tile: Tile, tileSize: number): stagesProto.PromptPoints {
  const clamp = (v: number) => Math.min(tileSize, Math.max(0, v));
  const coords: number[] = [];
  const labels: number[] = [];
  const push = (x: number, y: number, label: number) => {
    coords.push(clamp(x - tile.x), clamp(y - tile.y));
    labels.push(label);
  };
  for (const pt of p.positive) push(pt.x, pt.y, LABEL_POSITIVE);
  for (const pt of p.negative) push(pt.x, pt.y, LABEL_NEGATIVE);
  if (p.box) {
    push(p.box.x0, p.box.y0, LABEL_BOX_TOP_LEFT);
    push(p.box.x1, p.box.y1, LABEL_BOX_BOTTOM_RIGHT);
  }
  return { coords, labels };
}

/** A single positive point (an automatic detection) in tile coordinates. */
export function pointPrompt(xTile: number, yTile: number): stagesProto.PromptPoints {
  return { coords: [xTile, yTile], labels: [LABEL_POSITIVE] };
}
