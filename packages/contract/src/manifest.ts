// Loading and validating a model bundle's manifest.json (docs/architecture.md, "The ONNX
// contract"): every field a service relies on is checked here once, with a message naming the
// field, so that a broken or mismatched bundle fails at startup and not in the middle of a request.
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';

/** The bundle format this code reads. */
export const BUNDLE_FORMAT = 'cfrsam-bundle/1';

/** Graph names of the contract; `decoder_prompts_full` and `point_refiner` are optional. */
export const GRAPH_NAMES = ['prompter', 'encoder', 'decoder_image', 'decoder_prompts', 'decoder_prompts_full', 'point_refiner'] as const;
export type GraphName = (typeof GRAPH_NAMES)[number];
const REQUIRED_GRAPHS: readonly GraphName[] = ['prompter', 'encoder', 'decoder_image', 'decoder_prompts'];

export interface NucleusClass {
  name: string;
  /** "#rrggbb" */
  color: string;
}

export interface GraphEntry {
  file: string;
  sha256: string;
  /** Absolute path of the graph file. */
  path: string;
}

/** A validated manifest, with camelCase names (the JSON uses snake_case). */
export interface Manifest {
  /** Absolute path of the bundle directory. */
  dir: string;
  format: string;
  name: string;
  /** Model version; part of every digest. */
  version: string;
  config: string;
  /** S: the square model input side in pixels. */
  inputSize: number;
  patchSize: number;
  normalization: { mean: [number, number, number]; std: [number, number, number] };
  /** The K nucleus classes (background excluded), in logit order. */
  classes: NucleusClass[];
  /** Micrometres per pixel the model was trained at. */
  mpp: number;
  hmfmLevels: number[];
  /** [L, D, h, w] of one tile's encoder features. */
  featureShape: [number, number, number, number];
  /** Per-prompt refinement: a window of side `window` (window mode) or the whole frame (W = S). */
  refinement: { mode: 'window' | 'full'; window: number };
  /** Mask logits above this are foreground. */
  maskThreshold: number;
  /**
   * The prompter's rules: its threshold and NMS radius, and (bundles with a point refiner) the
   * radius within which refined points are merged, 0 otherwise, and the refiner's score below
   * which a point is on no nucleus and dropped (0: none is; bundles whose refiner has a score head),
   * and the weight w of the refiner's class probabilities in the served ones, p ~ learner^(1-w) x
   * refiner^w (0: the prompt learner's alone; bundles whose refiner has a class head). With a
   * blur gate, a tile whose sharpness (services/prompter/src/sharpness.ts) is below
   * `sharpnessBelow` is held to the gate's `minPointScore` instead: blurred nuclei score low.
   */
  prompter: {
    anchors: number;
    minForeground: number;
    nmsRadius: number;
    refinedNmsRadius: number;
    minPointScore: number;
    refinerClassWeight: number;
    blurGate?: { sharpnessBelow: number; minPointScore: number };
  };
  graphs: Partial<Record<GraphName, GraphEntry>>;
  provenance: Record<string, unknown>;
  metrics: Record<string, unknown>;
}

/** A manifest or bundle that cannot be served, with the offending field or file in the message. */
export class ManifestError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ManifestError';
  }
}

export interface LoadManifestOptions {
  /** Verify each graph file's SHA-256 against the manifest (default true). */
  verifyGraphs?: boolean;
  /** Only these graphs must exist and are verified (default: the four required graphs). */
  graphs?: readonly GraphName[];
  /** These graphs are verified when the manifest lists them (e.g. the prompter's point_refiner). */
  optionalGraphs?: readonly GraphName[];
}

/** The graphs a prompter runs for this bundle: the prompt learner, and its point refiner if it has one. */
export function prompterGraphs(manifest: Pick<Manifest, 'graphs'>): GraphName[] {
  return manifest.graphs.point_refiner ? ['prompter', 'point_refiner'] : ['prompter'];
}

type Json = Record<string, unknown>;

function fail(dir: string, message: string): never {
  throw new ManifestError(`${path.join(dir, 'manifest.json')}: ${message}`);
}

function field(dir: string, obj: Json, key: string, where = key): unknown {
  if (!(key in obj) || obj[key] === undefined) fail(dir, `missing field "${where}"`);
  return obj[key];
}

function str(dir: string, obj: Json, key: string, where = key): string {
  const v = field(dir, obj, key, where);
  if (typeof v !== 'string' || v.length === 0) fail(dir, `"${where}" must be a non-empty string`);
  return v;
}

function num(dir: string, obj: Json, key: string, where = key, opts: { int?: boolean; min?: number } = {}): number {
  const v = field(dir, obj, key, where);
  if (typeof v !== 'number' || !Number.isFinite(v)) fail(dir, `"${where}" must be a number`);
  if (opts.int && !Number.isInteger(v)) fail(dir, `"${where}" must be an integer, got ${v}`);
  if (opts.min !== undefined && v < opts.min) fail(dir, `"${where}" must be >= ${opts.min}, got ${v}`);
  return v;
}

function obj(dir: string, parent: Json, key: string, where = key): Json {
  const v = field(dir, parent, key, where);
  if (typeof v !== 'object' || v === null || Array.isArray(v)) fail(dir, `"${where}" must be an object`);
  return v as Json;
}

function numArray(dir: string, parent: Json, key: string, length: number | null, where = key): number[] {
  const v = field(dir, parent, key, where);
  if (!Array.isArray(v) || v.some((x) => typeof x !== 'number' || !Number.isFinite(x))) {
    fail(dir, `"${where}" must be an array of numbers`);
  }
  if (length !== null && v.length !== length) fail(dir, `"${where}" must have ${length} entries, got ${v.length}`);
  return v as number[];
}

/** SHA-256 hex of a file, read in chunks (bundles of large models exceed the 2 GiB Buffer limit). */
export function sha256File(file: string): string {
  const hash = createHash('sha256');
  const fd = fs.openSync(file, 'r');
  try {
    const chunk = Buffer.allocUnsafe(4 << 20);
    for (;;) {
      const n = fs.readSync(fd, chunk, 0, chunk.length, null);
      if (n === 0) break;
      hash.update(chunk.subarray(0, n));
    }
  } finally {
    fs.closeSync(fd);
  }
  return hash.digest('hex');
}

/**
 * Reads `<dir>/manifest.json`, validates every field of the contract and checks that the graph
 * files exist and match their sha256. Throws ManifestError naming the field or file at fault.
 */
export function loadManifest(dir: string, options: LoadManifestOptions = {}): Manifest {
  const absDir = path.resolve(dir);
  const file = path.join(absDir, 'manifest.json');
  if (!fs.existsSync(file)) throw new ManifestError(`no model bundle at ${absDir}: ${file} does not exist`);
  let raw: unknown;
  try {
    raw = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (err) {
    throw new ManifestError(`${file}: not valid JSON (${(err as Error).message})`);
  }
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) fail(absDir, 'must hold a JSON object');
  const m = raw as Json;

  const format = str(absDir, m, 'format');
  if (format !== BUNDLE_FORMAT) fail(absDir, `"format" is "${format}", this code reads "${BUNDLE_FORMAT}"`);
  const inputSize = num(absDir, m, 'input_size', 'input_size', { int: true, min: 1 });
  const patchSize = num(absDir, m, 'patch_size', 'patch_size', { int: true, min: 1 });
  if (inputSize % patchSize !== 0) fail(absDir, `"input_size" ${inputSize} is not a multiple of "patch_size" ${patchSize}`);
  if (inputSize % 4 !== 0) fail(absDir, `"input_size" ${inputSize} must be a multiple of 4`);

  const norm = obj(absDir, m, 'normalization');
  const mean = numArray(absDir, norm, 'mean', 3, 'normalization.mean') as [number, number, number];
  const std = numArray(absDir, norm, 'std', 3, 'normalization.std') as [number, number, number];
  if (std.some((s) => s <= 0)) fail(absDir, '"normalization.std" entries must be > 0');

  const classesRaw = field(absDir, m, 'classes');
  if (!Array.isArray(classesRaw) || classesRaw.length === 0) fail(absDir, '"classes" must be a non-empty array');
  const classes = classesRaw.map((c, i): NucleusClass => {
    if (typeof c !== 'object' || c === null) fail(absDir, `"classes[${i}]" must be an object`);
    const name = str(absDir, c as Json, 'name', `classes[${i}].name`);
    const color = str(absDir, c as Json, 'color', `classes[${i}].color`);
    if (!/^#[0-9a-fA-F]{6}$/.test(color)) fail(absDir, `"classes[${i}].color" must be "#rrggbb", got "${color}"`);
    return { name, color };
  });

  const featureShape = numArray(absDir, m, 'feature_shape', 4) as [number, number, number, number];
  if (featureShape.some((d) => !Number.isInteger(d) || d < 1)) fail(absDir, '"feature_shape" must hold positive integers');
  const grid = inputSize / patchSize;
  if (featureShape[2] !== grid || featureShape[3] !== grid) {
    fail(absDir, `"feature_shape" [${featureShape}] must end in input_size/patch_size = ${grid}, ${grid}`);
  }
  const hmfmLevels = numArray(absDir, m, 'hmfm_levels', null);
  if (hmfmLevels.length !== featureShape[0]) {
    fail(absDir, `"hmfm_levels" has ${hmfmLevels.length} entries but "feature_shape" has L = ${featureShape[0]}`);
  }

  const refinementRaw = obj(absDir, m, 'refinement');
  const mode = str(absDir, refinementRaw, 'mode', 'refinement.mode');
  if (mode !== 'window' && mode !== 'full') fail(absDir, `"refinement.mode" must be "window" or "full", got "${mode}"`);
  let window = inputSize;
  if (mode === 'window') {
    window = num(absDir, refinementRaw, 'window', 'refinement.window', { int: true, min: 4 });
    if (window % 4 !== 0 || window > inputSize) {
      fail(absDir, `"refinement.window" ${window} must be a multiple of 4 and at most input_size ${inputSize}`);
    }
  }

  const prompterRaw = obj(absDir, m, 'prompter');
  const prompter: Manifest['prompter'] = {
    anchors: num(absDir, prompterRaw, 'anchors', 'prompter.anchors', { int: true, min: 1 }),
    minForeground: num(absDir, prompterRaw, 'min_foreground', 'prompter.min_foreground', { min: 0 }),
    nmsRadius: num(absDir, prompterRaw, 'nms_radius', 'prompter.nms_radius', { min: 0 }),
    refinedNmsRadius:
      prompterRaw.refined_nms_radius === undefined ? 0 : num(absDir, prompterRaw, 'refined_nms_radius', 'prompter.refined_nms_radius', { min: 0 }),
    minPointScore:
      prompterRaw.min_point_score === undefined ? 0 : num(absDir, prompterRaw, 'min_point_score', 'prompter.min_point_score', { min: 0 }),
    refinerClassWeight:
      prompterRaw.refiner_class_weight === undefined
        ? 0
        : num(absDir, prompterRaw, 'refiner_class_weight', 'prompter.refiner_class_weight', { min: 0 }),
  };
  if (prompter.minForeground > 1) fail(absDir, `"prompter.min_foreground" must be in [0, 1], got ${prompter.minForeground}`);
  if (prompter.minPointScore > 1) fail(absDir, `"prompter.min_point_score" must be in [0, 1], got ${prompter.minPointScore}`);
  if (prompter.refinerClassWeight > 1) {
    fail(absDir, `"prompter.refiner_class_weight" must be in [0, 1], got ${prompter.refinerClassWeight}`);
  }
  if (prompterRaw.blur_gate !== undefined) {
    const gate = obj(absDir, prompterRaw, 'blur_gate', 'prompter.blur_gate');
    const blurGate = {
      sharpnessBelow: num(absDir, gate, 'sharpness_below', 'prompter.blur_gate.sharpness_below', { min: 0 }),
      minPointScore: num(absDir, gate, 'min_point_score', 'prompter.blur_gate.min_point_score', { min: 0 }),
    };
    if (blurGate.minPointScore > 1) fail(absDir, `"prompter.blur_gate.min_point_score" must be in [0, 1], got ${blurGate.minPointScore}`);
    if (!(prompter.minPointScore > 0)) fail(absDir, '"prompter.blur_gate" needs a score bar ("prompter.min_point_score" > 0) to lower');
    prompter.blurGate = blurGate;
  }

  const graphsRaw = obj(absDir, m, 'graphs');
  const graphs: Partial<Record<GraphName, GraphEntry>> = {};
  for (const [name, entry] of Object.entries(graphsRaw)) {
    if (!(GRAPH_NAMES as readonly string[]).includes(name)) continue; // extra graphs are tolerated, unused
    if (typeof entry !== 'object' || entry === null) fail(absDir, `"graphs.${name}" must be an object`);
    const fileName = str(absDir, entry as Json, 'file', `graphs.${name}.file`);
    const sha256 = str(absDir, entry as Json, 'sha256', `graphs.${name}.sha256`).toLowerCase();
    if (!/^[0-9a-f]{64}$/.test(sha256)) fail(absDir, `"graphs.${name}.sha256" must be 64 hex digits`);
    graphs[name as GraphName] = { file: fileName, sha256, path: path.resolve(absDir, fileName) };
  }
  const optional = (options.optionalGraphs ?? []).filter((name) => graphs[name] !== undefined);
  const needed = [...(options.graphs ?? REQUIRED_GRAPHS), ...optional];
  for (const name of needed) {
    const entry = graphs[name];
    if (!entry) fail(absDir, `missing graph "graphs.${name}"`);
    if (!fs.existsSync(entry.path)) throw new ManifestError(`graph "${name}": file ${entry.path} does not exist`);
    if (options.verifyGraphs ?? true) {
      const actual = sha256File(entry.path);
      if (actual !== entry.sha256) {
        throw new ManifestError(`graph "${name}": ${entry.path} has sha256 ${actual}, the manifest says ${entry.sha256} (stale or corrupt bundle)`);
      }
    }
  }

  return {
    dir: absDir,
    format,
    name: str(absDir, m, 'name'),
    version: str(absDir, m, 'version'),
    config: typeof m.config === 'string' ? m.config : '',
    inputSize,
    patchSize,
    normalization: { mean, std },
    classes,
    mpp: num(absDir, m, 'mpp', 'mpp', { min: 0 }),
    hmfmLevels,
    featureShape,
    refinement: { mode, window },
    maskThreshold: typeof m.mask_threshold === 'number' ? m.mask_threshold : 0,
    prompter,
    graphs,
    provenance: (typeof m.provenance === 'object' && m.provenance !== null ? m.provenance : {}) as Record<string, unknown>,
    metrics: (typeof m.metrics === 'object' && m.metrics !== null ? m.metrics : {}) as Record<string, unknown>,
  };
}
