// Interleaved A/B timing of the prompter, encoder and decoder_prompts graphs of two bundles in one
// process (decoder_prompts at 16 and 64 prompts, fed by bundle A's encoder and decoder_image): run A,
// run B, 30 times, so that drift of a shared machine lands on both; prints the medians and the
// median of the per-pair ratios (A / B). For exporter changes that keep the weights (the same
// version), e.g. the committed bundle of an earlier commit against the current one:
//
//   mkdir -p /tmp/before && git archive REV models/tiny | tar -x -C /tmp/before
//   node bench/graphs-ab.mjs /tmp/before/models/tiny models/tiny [--threads 1]
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { ort, seededFloats } from './ort.mjs';

const { values: args, positionals } = parseArgs({
  allowPositionals: true,
  options: { threads: { type: 'string', default: '1' }, pairs: { type: 'string', default: '30' } },
});
if (positionals.length !== 2) throw new Error('usage: node bench/graphs-ab.mjs BUNDLE_A BUNDLE_B');
const [a, b] = positionals;
const S = 256;
const rnd = seededFloats();
const median = (xs) => [...xs].sort((x, y) => x - y)[xs.length >> 1];
const options = { intraOpNumThreads: Number(args.threads) };
console.log(`A = ${a}\nB = ${b}\n${args.threads} intra-op thread(s), ${args.pairs} interleaved pairs`);
/** Median times of A and B over interleaved pairs, and the median per-pair ratio. */
async function compare(label, sessionA, sessionB, feeds) {
  await sessionA.run(feeds);
  await sessionB.run(feeds);
  const ta = [];
  const tb = [];
  const ratio = [];
  for (let i = 0; i < Number(args.pairs); i++) {
    let t = performance.now();
    await sessionA.run(feeds);
    const msA = performance.now() - t;
    t = performance.now();
    await sessionB.run(feeds);
    const msB = performance.now() - t;
    ta.push(msA);
    tb.push(msB);
    ratio.push(msA / msB);
  }
  console.log(`  ${label}: A ${median(ta).toFixed(1)} ms, B ${median(tb).toFixed(1)} ms, A / B ${median(ratio).toFixed(2)}x`);
}

const session = (bundle, graph) => ort.InferenceSession.create(path.join(bundle, `${graph}.onnx`), options);
for (const [graph, batch] of [
  ['prompter', 1],
  ['encoder', 1],
  ['prompter', 4],
  ['encoder', 4],
]) {
  const image = new ort.Tensor('float32', rnd(batch * 3 * S * S), [batch, 3, S, S]);
  await compare(`${graph.padEnd(8)} batch ${batch}`, await session(a, graph), await session(b, graph), { image });
}
// decoder_prompts needs one tile's decoder_image outputs: from bundle A (the same weights in both).
const image = new ort.Tensor('float32', rnd(3 * S * S), [1, 3, S, S]);
const { features } = await (await session(a, 'encoder')).run({ image });
const prepared = await (await session(a, 'decoder_image')).run({ features, image });
const [decoderA, decoderB] = [await session(a, 'decoder_prompts'), await session(b, 'decoder_prompts')];
for (const P of [16, 64]) {
  const coords = Float32Array.from({ length: P * 2 }, (_, i) => 8 + ((i * 97) % (S - 16)));
  await compare(`decoder_prompts, ${P} prompts`, decoderA, decoderB, {
    ...prepared,
    point_coords: new ort.Tensor('float32', coords, [P, 1, 2]),
    point_labels: new ort.Tensor('float32', new Float32Array(P).fill(1), [P, 1]),
  });
}
