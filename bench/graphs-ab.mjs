// Interleaved A/B timing of the prompter and encoder graphs of two bundles in one process: run A,
// run B, 30 times, so that drift of a shared machine lands on both; prints the medians and the
// median of the per-pair ratios (A / B). For exporter changes that keep the weights (the same
// version), e.g. the committed bundle of an earlier commit against the current one:
//
//   mkdir -p /tmp/before && git archive REV models/tiny | tar -x -C /tmp/before
//   node bench/graphs-ab.mjs /tmp/before/models/tiny models/tiny [--threads 1]
import { createRequire } from 'node:module';
import * as path from 'node:path';
import { parseArgs } from 'node:util';

const require = createRequire(import.meta.url);
const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const ort = require(require.resolve('onnxruntime-node', { paths: [path.join(root, 'packages/runtime')] }));
const { values: args, positionals } = parseArgs({
  allowPositionals: true,
  options: { threads: { type: 'string', default: '1' }, pairs: { type: 'string', default: '30' } },
});
if (positionals.length !== 2) throw new Error('usage: node bench/graphs-ab.mjs BUNDLE_A BUNDLE_B');
const [a, b] = positionals;
const S = 256;
let seed = 1;
const rnd = (n) => Float32Array.from({ length: n }, () => ((seed = (seed * 16807) % 2147483647) / 2147483647) * 2 - 1);
const median = (xs) => [...xs].sort((x, y) => x - y)[xs.length >> 1];
const options = { intraOpNumThreads: Number(args.threads) };
console.log(`A = ${a}\nB = ${b}\n${args.threads} intra-op thread(s), ${args.pairs} interleaved pairs`);
for (const [graph, batch] of [
  ['prompter', 1],
  ['encoder', 1],
  ['prompter', 4],
  ['encoder', 4],
]) {
  const image = new ort.Tensor('float32', rnd(batch * 3 * S * S), [batch, 3, S, S]);
  const sessionA = await ort.InferenceSession.create(path.join(a, `${graph}.onnx`), options);
  const sessionB = await ort.InferenceSession.create(path.join(b, `${graph}.onnx`), options);
  await sessionA.run({ image });
  await sessionB.run({ image });
  const ta = [];
  const tb = [];
  const ratio = [];
  for (let i = 0; i < Number(args.pairs); i++) {
    let t = performance.now();
    await sessionA.run({ image });
    const msA = performance.now() - t;
    t = performance.now();
    await sessionB.run({ image });
    const msB = performance.now() - t;
    ta.push(msA);
    tb.push(msB);
    ratio.push(msA / msB);
  }
  console.log(
    `  ${graph.padEnd(8)} batch ${batch}: A ${median(ta).toFixed(1)} ms, B ${median(tb).toFixed(1)} ms, A / B ${median(ratio).toFixed(2)}x`,
  );
}
