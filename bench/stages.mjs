// Per-stage latency of a model bundle's graphs in onnxruntime-node (CPU), one S x S tile:
// session load time, then the median of --reps runs, for the prompter, encoder, decoder_image and
// decoder_prompts (at --prompts prompts of one point). Prints the bundle's size.
//
//   node bench/stages.mjs [--bundle models/tiny] [--reps 5] [--prompts 16] [--threads 1]
import { createRequire } from 'node:module';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';

const require = createRequire(import.meta.url);
const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const ort = require(require.resolve('onnxruntime-node', { paths: [path.join(root, 'packages/runtime')] }));
const { values: args } = parseArgs({
  options: {
    bundle: { type: 'string', default: path.join(root, 'models/tiny') },
    reps: { type: 'string', default: '5' },
    prompts: { type: 'string', default: '16' },
    threads: { type: 'string', default: '1' },
  },
});
const dir = args.bundle;
const manifest = JSON.parse(fs.readFileSync(path.join(dir, 'manifest.json'), 'utf8'));
const S = manifest.input_size;
const P = Number(args.prompts);
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
let seed = 1;
const rnd = (n) => Float32Array.from({ length: n }, () => ((seed = (seed * 16807) % 2147483647) / 2147483647) * 2 - 1);
const size = (p) => fs.statSync(p).size;
const bytes = fs
  .readdirSync(dir)
  .filter((f) => f.endsWith('.onnx') || f.endsWith('.pt'))
  .reduce((a, f) => a + size(path.join(dir, f)), 0);
console.log(
  `${manifest.name} ${manifest.version} (config ${manifest.config}), input ${S}x${S}, graphs+weights ${(bytes / 1e6).toFixed(1)} MB, ${args.threads} intra-op thread(s)`,
);

async function time(name, feeds) {
  const t0 = performance.now();
  const session = await ort.InferenceSession.create(path.join(dir, manifest.graphs[name].file), { intraOpNumThreads: Number(args.threads) });
  const load = performance.now() - t0;
  let out = await session.run(feeds);
  const runs = [];
  for (let i = 0; i < Number(args.reps); i++) {
    const t = performance.now();
    out = await session.run(feeds);
    runs.push(performance.now() - t);
  }
  console.log(
    `  ${name.padEnd(16)} ${(size(path.join(dir, manifest.graphs[name].file)) / 1e6).toFixed(1).padStart(7)} MB  load ${load.toFixed(0).padStart(6)} ms  run ${median(runs).toFixed(1).padStart(8)} ms`,
  );
  return out;
}

const image = new ort.Tensor('float32', rnd(3 * S * S), [1, 3, S, S]);
await time('prompter', { image });
const enc = await time('encoder', { image });
const prep = await time('decoder_image', { features: enc.features, image });
const coords = Float32Array.from({ length: P * 2 }, (_, i) => 8 + ((i * 97) % (S - 16)));
const dec = {
  ...prep,
  point_coords: new ort.Tensor('float32', coords, [P, 1, 2]),
  point_labels: new ort.Tensor('float32', new Float32Array(P).fill(1), [P, 1]),
};
await time('decoder_prompts', dec);
if (manifest.graphs.decoder_prompts_full) await time('decoder_prompts_full', dec);
console.log(`  (decoder_prompts at ${P} prompts; _full = BGMR over the whole frame instead of the ${manifest.refinement.window} px window)`);
