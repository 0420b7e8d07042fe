// Detect: tiles -> prompter.onnx in batches -> point prompts with classes. The graph gives every
// anchor a point and K+1 logits; here anchors are filtered by foreground probability, merged by
// point NMS, and their class probabilities renormalised without background. When the bundle has a
// point refiner, point_refiner.onnx then moves each kept point onto its nucleus' centre (one run
// per batch of tiles, for all their kept points) and scores it; points below the score bar go. A
// bundle with a blur gate lowers the bar on tiles whose sharpness (./sharpness.ts) says they are
// blurred, and Detect says which those were.
import { grpcError, type stagesProto, status } from '@cfrsam/rpc';
import { type Float32Tensor, graphOutputFloat32, type Manifest, stackFloat32, readStageTile } from '@cfrsam/contract';
import { type OnnxWorkerPool } from '@cfrsam/runtime';
import { tileSharpness } from './sharpness';

export interface PrompterPipelineOptions {
  /** Tiles per prompter.onnx run (default 8). */
  maxBatch?: number;
  /** Tiles per Detect request (default 64). */
  maxTilesPerRequest?: number;
  /** Run the bundle's point refiner on the kept points (default: when the bundle has one). */
  refinePoints?: boolean;
}

export interface DetectionParams {
  minForeground: number;
  nmsRadius: number;
}

/** One anchor's decoded output. */
export interface Detection {
  x: number;
  y: number;
  classIndex: number;
  foreground: number;
  classProbabilities: number[];
}

/**
 * Turns one tile's raw outputs into detections: softmax over K+1 (index K = background), drop
 * anchors with foreground (1 - p_bg) below `minForeground`, clip points to [0, size], keep the more
 * confident of any two closer than `nmsRadius`, renormalise class probabilities over the K classes.
 * Sorted by foreground, most confident first.
 */
export function decodeAnchors(
  points: Float32Array,
  logits: Float32Array,
  anchors: number,
  classes: number,
  size: number,
  params: DetectionParams,
): Detection[] {
  const stride = classes + 1;
  const candidates: Detection[] = [];
  const probs = new Float64Array(stride);
  for (let a = 0; a < anchors; a++) {
    const row = a * stride;
    let max = -Infinity;
    for (let k = 0; k < stride; k++) max = Math.max(max, logits[row + k]);
    if (!Number.isFinite(max)) continue; // NaN/Inf logits: no usable detection
    let sum = 0;
    for (let k = 0; k < stride; k++) {
      probs[k] = Math.exp(logits[row + k] - max);
      sum += probs[k];
    }
    const foreground = 1 - probs[classes] / sum;
    if (!(foreground >= params.minForeground) || foreground <= 0) continue;
    let classSum = 0;
    for (let k = 0; k < classes; k++) classSum += probs[k];
    const classProbabilities: number[] = [];
    let best = 0;
    for (let k = 0; k < classes; k++) {
      classProbabilities.push(classSum > 0 ? probs[k] / classSum : 1 / classes);
      if (classProbabilities[k] > classProbabilities[best]) best = k;
    }
    const x = Math.min(size, Math.max(0, points[a * 2]));
    const y = Math.min(size, Math.max(0, points[a * 2 + 1]));
    if (!Number.isFinite(x) || !Number.isFinite(y)) continue;
    candidates.push({ x, y, classIndex: best, foreground, classProbabilities });
  }
  candidates.sort((p, q) => q.foreground - p.foreground);
  return pointNms(candidates, params.nmsRadius);
}

/** Greedy NMS on points (input sorted by confidence): drop a point closer than `radius` to a kept one. */
export function pointNms<T extends { x: number; y: number }>(sorted: readonly T[], radius: number): T[] {
  if (!(radius > 0)) return [...sorted];
  // A grid with cells of side `radius`: a conflicting point lies in the 3x3 cells around a point.
  const cells = new Map<string, T[]>();
  const kept: T[] = [];
  const r2 = radius * radius;
  for (const p of sorted) {
    const cx = Math.floor(p.x / radius);
    const cy = Math.floor(p.y / radius);
    let conflict = false;
    for (let dy = -1; dy <= 1 && !conflict; dy++) {
      for (let dx = -1; dx <= 1 && !conflict; dx++) {
        for (const q of cells.get(`${cx + dx},${cy + dy}`) ?? []) {
          if ((q.x - p.x) ** 2 + (q.y - p.y) ** 2 < r2) {
            conflict = true;
            break;
          }
        }
      }
    }
    if (conflict) continue;
    kept.push(p);
    const key = `${cx},${cy}`;
    const cell = cells.get(key);
    if (cell) cell.push(p);
    else cells.set(key, [p]);
  }
  return kept;
}

/**
 * The kept detections of a batch's tiles as point_refiner.onnx's inputs: points [P, 2] and the
 * index [P] of each one's tile in the batch.
 */
export function refinerInputs(perTile: readonly (readonly Detection[])[]): { points: Float32Array; imageIndex: BigInt64Array } {
  const count = perTile.reduce((n, d) => n + d.length, 0);
  const points = new Float32Array(count * 2);
  const imageIndex = new BigInt64Array(count);
  let i = 0;
  perTile.forEach((detections, b) => {
    for (const d of detections) {
      points[i * 2] = d.x;
      points[i * 2 + 1] = d.y;
      imageIndex[i] = BigInt(b);
      i++;
    }
  });
  return { points, imageIndex };
}

/**
 * Class probabilities served for a refined point: the prompt learner's and the point refiner's
 * mixed geometrically, p ~ learner^(1 - weight) x refiner^weight, renormalised (model/cfrsam/
 * prompt_learner/point_refiner.py `mix_class_probabilities`). The learner's stand when the weight is
 * 0, the refiner's row does not have K finite values, or the mix is degenerate.
 */
export function mixClassProbabilities(learner: readonly number[], refiner: ArrayLike<number>, weight: number): number[] {
  if (!(weight > 0) || refiner.length !== learner.length) return [...learner];
  const eps = 1e-12;
  const mixed = learner.map((p, k) => Math.exp((1 - weight) * Math.log(Math.max(p, eps)) + weight * Math.log(Math.max(refiner[k], eps))));
  const sum = mixed.reduce((a, b) => a + b, 0);
  if (!(sum > 0) || !Number.isFinite(sum)) return [...learner];
  return mixed.map((p) => p / sum);
}

/** What point_refiner.onnx says about the kept points, in the order of refinerInputs. */
export interface RefinerOutputs {
  /** refined_points [P, 2]. */
  refined: Float32Array;
  /** point_scores [P], read when the bundle sets a score bar. */
  scores?: Float32Array;
  /** point_class_probs [P, K], read when the bundle mixes classes. */
  classProbabilities?: Float32Array;
}

/**
 * The detections with the refined points (in the order of refinerInputs), clipped to [0, size];
 * points scoring below `minScore` (one bar, or one per tile) are on no nucleus and dropped; with
 * class probabilities, each detection's classes are mixed with the refiner's at `classWeight`;
 * refined points closer than `nmsRadius` converged on one nucleus, and the less confident goes.
 */
export function withRefinedPoints(
  perTile: readonly (readonly Detection[])[],
  outputs: RefinerOutputs,
  size: number,
  nmsRadius: number,
  minScore: number | readonly number[] = 0,
  classWeight = 0,
): Detection[][] {
  const { refined, scores, classProbabilities } = outputs;
  let i = 0;
  return perTile.map((detections, tile) => {
    const bar = typeof minScore === 'number' ? minScore : minScore[tile];
    const moved: Detection[] = [];
    for (const d of detections) {
      const k = i++;
      // A score below the bar drops the point; a non-finite one keeps it, as a non-finite
      // refinement keeps the prompt learner's point: the refiner never loses a nucleus by failing.
      if (scores && scores[k] < bar) continue;
      let classes: Pick<Detection, 'classIndex' | 'classProbabilities'> = d;
      if (classProbabilities && classWeight > 0) {
        const K = d.classProbabilities.length;
        const probabilities = mixClassProbabilities(d.classProbabilities, classProbabilities.subarray(k * K, (k + 1) * K), classWeight);
        // The first of equal maxima, as argmax in the Python reference.
        const classIndex = probabilities.reduce((best, p, c) => (p > probabilities[best] ? c : best), 0);
        classes = { classIndex, classProbabilities: probabilities };
      }
      const x = refined[k * 2];
      const y = refined[k * 2 + 1];
      if (!Number.isFinite(x) || !Number.isFinite(y)) moved.push({ ...d, ...classes });
      else moved.push({ ...d, ...classes, x: Math.min(size, Math.max(0, x)), y: Math.min(size, Math.max(0, y)) });
    }
    return pointNms(moved, nmsRadius); // still in foreground order
  });
}

export class PrompterPipeline {
  readonly maxBatch: number;
  readonly maxTilesPerRequest: number;
  /** Whether kept points go through point_refiner.onnx (the bundle has one). */
  readonly refinesPoints: boolean;

  constructor(
    readonly manifest: Manifest,
    private readonly pool: OnnxWorkerPool,
    options: PrompterPipelineOptions = {},
  ) {
    this.maxBatch = Math.max(1, options.maxBatch ?? 8);
    this.maxTilesPerRequest = Math.max(1, options.maxTilesPerRequest ?? 64);
    this.refinesPoints = (options.refinePoints ?? true) && manifest.graphs.point_refiner !== undefined;
  }

  /** Checks the request and resolves its detection parameters (request values, else the manifest's). */
  validate(request: stagesProto.DetectRequest): { tiles: Float32Tensor[]; params: DetectionParams } {
    const S = this.manifest.inputSize;
    if (request.modelVersion && request.modelVersion !== this.manifest.version) {
      throw grpcError(status.INVALID_ARGUMENT, `model_version "${request.modelVersion}" does not match the served model "${this.manifest.version}"`);
    }
    if (request.tiles.length === 0) throw grpcError(status.INVALID_ARGUMENT, 'tiles: at least one tile is required');
    if (request.tiles.length > this.maxTilesPerRequest) {
      throw grpcError(status.INVALID_ARGUMENT, `tiles: ${request.tiles.length} tiles exceed the limit of ${this.maxTilesPerRequest} per request`);
    }
    const minForeground = request.minForeground || this.manifest.prompter.minForeground;
    if (!(minForeground >= 0 && minForeground <= 1)) {
      throw grpcError(status.INVALID_ARGUMENT, `min_foreground must be in [0, 1], got ${request.minForeground}`);
    }
    const nmsRadius = request.nmsRadius || this.manifest.prompter.nmsRadius;
    if (!(nmsRadius >= 0 && nmsRadius <= S)) {
      throw grpcError(status.INVALID_ARGUMENT, `nms_radius must be in [0, ${S}] pixels, got ${request.nmsRadius}`);
    }
    const tiles = request.tiles.map((t, i) => {
      const tile = readStageTile(`tiles[${i}]`, t, this.manifest);
      if (!tile.pixels) throw grpcError(status.INVALID_ARGUMENT, `tiles[${i}]: no pixels (send rgb bytes or normalised pixels)`);
      return tile.pixels;
    });
    return { tiles, params: { minForeground, nmsRadius } };
  }

  /** Detect for a validated request: runs batches of up to maxBatch tiles in parallel on the pool. */
  async detect(request: stagesProto.DetectRequest, signal?: AbortSignal): Promise<stagesProto.DetectResponse> {
    const { tiles, params } = this.validate(request);
    const S = this.manifest.inputSize;
    const K = this.manifest.classes.length;
    const A = this.manifest.prompter.anchors;
    const batches: number[][] = [];
    for (let i = 0; i < tiles.length; i += this.maxBatch) {
      batches.push(Array.from({ length: Math.min(this.maxBatch, tiles.length - i) }, (_, j) => i + j));
    }
    const perTile: Detection[][] = new Array(tiles.length);
    const blurred: boolean[] = new Array(tiles.length);
    await Promise.all(
      batches.map(async (indices) => {
        const stack = () => stackFloat32(indices.map((i) => tiles[i]));
        // The pool takes the feed's buffer over (transferred to the worker): the refiner gets its own stack.
        const running = this.pool.run('prompter', { image: stack() }, { signal });
        // The tiles' focus is judged here, on this thread, while the worker runs the graph.
        const focus = this.focus(indices.map((i) => tiles[i]));
        indices.forEach((tileIndex, b) => (blurred[tileIndex] = focus.blurred[b]));
        const out = await running;
        const B = indices.length;
        const points = graphOutputFloat32('prompter', out, 'points', [B, A, 2]);
        const logits = graphOutputFloat32('prompter', out, 'logits', [B, A, K + 1]);
        let detections = indices.map((_, b) =>
          decodeAnchors(points.subarray(b * A * 2, (b + 1) * A * 2), logits.subarray(b * A * (K + 1), (b + 1) * A * (K + 1)), A, K, S, params),
        );
        if (this.refinesPoints) detections = await this.refine(stack(), detections, focus.bars, signal);
        indices.forEach((tileIndex, b) => {
          perTile[tileIndex] = detections[b];
        });
      }),
    );
    return {
      tiles: request.tiles.map((t, i) => ({ digest: t.digest, detections: perTile[i], blurred: blurred[i] })),
    };
  }

  /**
   * Which tiles the bundle's blur gate calls blurred (their sharpness below its cut; none
   * without a gate or a point refiner), and the refiner's score bar for each: the manifest's, or the
   * gate's lower one on those tiles.
   */
  focus(tiles: readonly Float32Tensor[]): { blurred: boolean[]; bars: number[] } {
    const { minPointScore, blurGate } = this.manifest.prompter;
    const blurred = tiles.map(
      (tile) => this.refinesPoints && blurGate !== undefined && tileSharpness(tile, this.manifest.normalization) < blurGate.sharpnessBelow,
    );
    return { blurred, bars: blurred.map((blurred) => (blurred ? blurGate!.minPointScore : minPointScore)) };
  }

  /** One point_refiner.onnx run for the kept points of a batch of tiles (image [B, 3, S, S]). */
  private async refine(image: Float32Tensor, perTile: Detection[][], bars: readonly number[], signal?: AbortSignal): Promise<Detection[][]> {
    const { points, imageIndex } = refinerInputs(perTile);
    const P = imageIndex.length;
    if (P === 0) return perTile;
    const out = await this.pool.run(
      'point_refiner',
      { image, points: { type: 'float32', dims: [P, 2], data: points }, image_index: { type: 'int64', dims: [P], data: imageIndex } },
      { signal },
    );
    const K = this.manifest.classes.length;
    const { refinedNmsRadius, refinerClassWeight } = this.manifest.prompter;
    // Bundles that set a score bar or a class weight have those heads (older refiners have only
    // refined_points), so the other outputs are read only then.
    const outputs: RefinerOutputs = {
      refined: graphOutputFloat32('point_refiner', out, 'refined_points', [P, 2]),
      scores: bars.some((bar) => bar > 0) ? graphOutputFloat32('point_refiner', out, 'point_scores', [P]) : undefined,
      classProbabilities: refinerClassWeight > 0 ? graphOutputFloat32('point_refiner', out, 'point_class_probs', [P, K]) : undefined,
    };
    return withRefinedPoints(perTile, outputs, this.manifest.inputSize, refinedNmsRadius, bars, refinerClassWeight);
  }
}
