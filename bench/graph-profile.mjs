// Where one stage graph spends its time, per operator, from onnxruntime's own profiler (CPU, one
// S x S tile): the kernel time summed by operator type and the most expensive nodes, after
// warm-up runs. With --levels it also times the graph at several graph-optimisation levels,
// alternating run by run (the machine drifts), and checks that their outputs agree. Prints
// numbers; nothing is asserted.
//
//   node bench/graph-profile.mjs [--bundle models/tiny] [--graph decoder_prompts] [--prompts 16]
//                                [--tiles 1] [--reps 10] [--threads 1] [--top 20] [--levels all,extended,basic]
//
// Inputs are deterministic pseudo-random tensors of the contract's shapes; decoder_prompts reads
// decoder_image's outputs for such a tile and --prompts one-point prompts spread over it;
// point_refiner refines --prompts points on each of --tiles tiles (the prompter runs it once per
// batch of tiles).
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { ort, root, seededFloats } from './ort.mjs';

const { values: args } = parseArgs({
  options: {
    bundle: { type: 'string', default: path.join(root, 'models/tiny') },
    graph: { type: 'string', default: 'decoder_prompts' },
    prompts: { type: 'string', default: '16' },
    tiles: { type: 'string', default: '1' },
    reps: { type: 'string', default: '10' },
    threads: { type: 'string', default: '1' },
    top: { type: 'string', default: '20' },
    levels: { type: 'string', default: '' },
  },
});
const dir = args.bundle;
const manifest = JSON.parse(fs.readFileSync(path.join(dir, 'manifest.json'), 'utf8'));
const S = manifest.input_size;
const P = Number(args.prompts);
const REPS = Number(args.reps);
const graphFile = (name) => {
  if (!manifest.graphs[name]) throw new Error(`the bundle has no graph "${name}" (have: ${Object.keys(manifest.graphs).join(', ')})`);
  return path.join(dir, manifest.graphs[name].file);
};
const rnd = seededFloats();
const tensor = (dims) => new ort.Tensor('float32', rnd(dims.reduce((a, b) => a * b, 1)), dims);
const options = (extra = {}) => ({ intraOpNumThreads: Number(args.threads), interOpNumThreads: 1, executionMode: 'sequential', ...extra });

async function feedsFor(graph) {
  const image = tensor([1, 3, S, S]);
  if (graph === 'prompter' || graph === 'encoder') return { image };
  if (graph === 'point_refiner') {
    const B = Number(args.tiles);
    const points = Float32Array.from({ length: B * P * 2 }, (_, i) => 24 + ((i * 37 + (i >> 1) * 53) % (S - 48)));
    const index = BigInt64Array.from({ length: B * P }, (_, i) => BigInt(Math.floor(i / P)));
    return {
      image: tensor([B, 3, S, S]),
      points: new ort.Tensor('float32', points, [B * P, 2]),
      image_index: new ort.Tensor('int64', index, [B * P]),
    };
  }
  const decoderImage = { features: tensor([1, ...manifest.feature_shape]), image };
  if (graph === 'decoder_image') return decoderImage;
  if (graph === 'decoder_prompts') {
    const session = await ort.InferenceSession.create(graphFile('decoder_image'), options());
    const prepared = await session.run(decoderImage);
    const coords = Float32Array.from({ length: P * 2 }, (_, i) => 24 + ((i * 37 + (i >> 1) * 53) % (S - 48)));
    return {
      image_embedding: prepared.image_embedding,
      semantic: prepared.semantic,
      boundary_features: prepared.boundary_features,
      point_coords: new ort.Tensor('float32', coords, [P, 1, 2]),
      point_labels: new ort.Tensor('float32', new Float32Array(P).fill(1), [P, 1]),
    };
  }
  throw new Error(`--graph: one of prompter, encoder, decoder_image, decoder_prompts, point_refiner (got "${graph}")`);
}

const feeds = await feedsFor(args.graph);
const what =
  args.graph === 'decoder_prompts'
    ? `${args.graph}, ${P} prompts`
    : args.graph === 'point_refiner'
      ? `${args.graph}, ${P} points on each of ${args.tiles} tile(s)`
      : args.graph;
console.log(`${manifest.name} ${manifest.version}: ${what}, ${args.threads} intra-op thread(s), ${REPS} profiled runs after 3 warm-up runs`);

// The profile.
const prefix = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'cfrsam-ort-profile-')), 'run');
const session = await ort.InferenceSession.create(graphFile(args.graph), options({ enableProfiling: true, profileFilePrefix: prefix }));
for (let i = 0; i < 3; i++) await session.run(feeds);
const t0 = performance.now();
for (let i = 0; i < REPS; i++) await session.run(feeds);
const wallMs = (performance.now() - t0) / REPS;
await session.endProfiling();
const profileDir = path.dirname(prefix);
const file = fs.readdirSync(profileDir).map((f) => path.join(profileDir, f))[0];
const events = JSON.parse(fs.readFileSync(file, 'utf8'));
fs.rmSync(profileDir, { recursive: true, force: true });
const byType = new Map();
const byNode = new Map();
let total = 0;
for (const e of events) {
  if (e.cat !== 'Node' || !e.name.endsWith('_kernel_time')) continue;
  const node = e.name.slice(0, -'_kernel_time'.length);
  byType.set(e.args.op_name, (byType.get(e.args.op_name) ?? 0) + e.dur);
  byNode.set(node, { op: e.args.op_name, us: (byNode.get(node)?.us ?? 0) + e.dur });
  total += e.dur;
}
const runs = REPS + 3; // the profiler records the warm-up runs too
const ms = (us) => (us / runs / 1000).toFixed(2);
console.log(`wall ${wallMs.toFixed(1)} ms per run (profiling on); kernels ${ms(total)} ms per run`);
console.log('\nby operator type         ms/run   share');
for (const [op, us] of [...byType].sort((a, b) => b[1] - a[1]).slice(0, Number(args.top))) {
  console.log(`${op.padEnd(24)} ${ms(us).padStart(7)}  ${((100 * us) / total).toFixed(1).padStart(5)} %`);
}
console.log('\nnodes (ReorderInput/ReorderOutput: onnxruntime converting to and from its blocked NCHWc layout)');
for (const [node, { op, us }] of [...byNode].sort((a, b) => b[1].us - a[1].us).slice(0, Number(args.top))) {
  console.log(`${ms(us).padStart(7)} ms  ${op.padEnd(20)} ${node.slice(0, 90)}`);
}

// Optimisation levels, alternating.
const levels = args.levels.split(',').filter(Boolean);
if (levels.length > 0) {
  const sessions = [];
  for (const level of levels)
    sessions.push([level, await ort.InferenceSession.create(graphFile(args.graph), options({ graphOptimizationLevel: level }))]);
  const times = new Map(levels.map((l) => [l, []]));
  const firstOutput = new Map();
  for (let round = 0; round < REPS; round++) {
    for (const [level, s] of sessions) {
      const t = performance.now();
      const out = await s.run(feeds);
      if (round > 0) times.get(level).push(performance.now() - t);
      if (round === 0) firstOutput.set(level, Object.values(out)[0].data);
    }
  }
  const reference = firstOutput.get(levels[0]);
  console.log(`\ngraph optimisation level   median ms (${REPS - 1} runs each, alternating)   max |difference| from "${levels[0]}"`);
  for (const level of levels) {
    const xs = times.get(level).sort((a, b) => a - b);
    const out = firstOutput.get(level);
    let diff = 0;
    for (let i = 0; i < out.length; i++) diff = Math.max(diff, Math.abs(Number(out[i]) - Number(reference[i])));
    console.log(`${level.padEnd(26)} ${xs[Math.floor(xs.length / 2)].toFixed(1).padStart(8)}   ${diff.toExponential(1)}`);
  }
}
