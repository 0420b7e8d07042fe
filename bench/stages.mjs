// Per-stage latency of a model bundle's graphs in onnxruntime-node (CPU), one S x S tile:
// session load time, then the median of --reps runs, for the prompter, encoder, decoder_image and
// decoder_prompts (at --prompts prompts of one point), and the point refiner (at as many points)
// when the bundle has one. Prints the bundle's size.
//
//   node bench/stages.mjs [--bundle models/tiny] [--reps 5] [--prompts 16] [--threads 1] [--flops FILE]
//                         [--providers cpu]
//
// --providers picks onnxruntime-node's execution providers in order, e.g. webgpu,cpu (bundled on
// Linux, needs a GPU with Vulkan) or cuda,cpu (needs the CUDA build's libraries, which the GPU images
// in deploy/ install); the default is the CPU.
// With --flops (the JSON of `python -m cfrsam.flops --bundle DIR --prompts P --out FILE`, P equal
// to --prompts) it also prints each graph's GFLOP, the achieved GFLOP/s and the fraction of the
// peak: an n^3 float32 MatMul timed in the same runtime, run and thread count.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { ort, root, seededFloats } from './ort.mjs';

const { values: args } = parseArgs({
  options: {
    bundle: { type: 'string', default: path.join(root, 'models/tiny') },
    reps: { type: 'string', default: '5' },
    prompts: { type: 'string', default: '16' },
    threads: { type: 'string', default: '1' },
    flops: { type: 'string' },
    providers: { type: 'string', default: 'cpu' },
  },
});
const dir = args.bundle;
const manifest = JSON.parse(fs.readFileSync(path.join(dir, 'manifest.json'), 'utf8'));
const S = manifest.input_size;
const P = Number(args.prompts);
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const rnd = seededFloats();
const size = (p) => fs.statSync(p).size;
const flops = args.flops ? JSON.parse(fs.readFileSync(args.flops, 'utf8')) : null;
if (flops && flops.prompts !== Number(args.prompts))
  throw new Error(`${args.flops} counts ${flops.prompts} prompts; pass --prompts ${flops.prompts}`);
const sessionOptions = { intraOpNumThreads: Number(args.threads), executionProviders: args.providers.split(',') };

/** GFLOP/s of a float32 n^3 MatMul in this runtime: the attainable peak the graphs are compared with. */
async function matmulPeak() {
  const session = await ort.InferenceSession.create(flops.matmul.file, sessionOptions);
  const n = Math.round(Math.cbrt(flops.matmul.flops / 2));
  const a = new ort.Tensor('float32', rnd(n * n), [n, n]);
  await session.run({ a });
  const runs = [];
  for (let i = 0; i < Math.max(5, Number(args.reps)); i++) {
    const t = performance.now();
    await session.run({ a });
    runs.push(performance.now() - t);
  }
  return flops.matmul.flops / (median(runs) / 1e3) / 1e9;
}
const peak = flops ? await matmulPeak() : null;
const rooflineRows = [];
const bytes = fs
  .readdirSync(dir)
  .filter((f) => f.endsWith('.onnx') || f.endsWith('.pt'))
  .reduce((a, f) => a + size(path.join(dir, f)), 0);
console.log(
  `${manifest.name} ${manifest.version} (config ${manifest.config}), input ${S}x${S}, graphs+weights ${(bytes / 1e6).toFixed(1)} MB, ${args.threads} intra-op thread(s)`,
);

async function time(name, feeds) {
  const t0 = performance.now();
  const session = await ort.InferenceSession.create(path.join(dir, manifest.graphs[name].file), sessionOptions);
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
  if (flops?.flops[name]) rooflineRows.push({ name, gflop: flops.flops[name] / 1e9, ms: median(runs) });
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
if (manifest.graphs.point_refiner) {
  // The prompter's second graph: the kept points (one per nucleus) moved onto their centres.
  await time('point_refiner', {
    image,
    points: new ort.Tensor('float32', coords.slice(), [P, 2]),
    image_index: new ort.Tensor('int64', new BigInt64Array(P), [P]),
  });
}
console.log(
  `  (decoder_prompts${manifest.graphs.point_refiner ? ' and point_refiner' : ''} at ${P} prompts; _full = BGMR over the whole frame instead of the ${manifest.refinement.window} px window)`,
);
if (flops) {
  console.log(
    `\nroofline: MatMul ${Math.round(Math.cbrt(flops.matmul.flops / 2))}^3 float32 peak ${peak.toFixed(1)} GFLOP/s (${args.threads} thread(s))`,
  );
  console.log('  | graph | GFLOP | ms | GFLOP/s | of peak |');
  console.log('  | --- | --- | --- | --- | --- |');
  for (const r of rooflineRows) {
    const rate = r.gflop / (r.ms / 1e3);
    console.log(
      `  | ${r.name}${r.name === 'decoder_prompts' ? ` (${P} prompts)` : ''} | ${r.gflop.toFixed(3)} | ${r.ms.toFixed(1)} | ${rate.toFixed(1)} | ${((100 * rate) / peak).toFixed(0)} % |`,
    );
  }
}
