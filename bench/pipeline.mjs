// Benchmark of the serving pipeline (prints numbers; nothing is asserted).
//
//   npm run build && node bench/pipeline.mjs [--bundle models/tiny] [--reps 5] [--data ../shared/data]
//
// 1. Segment through the four services (separate processes, loopback gRPC) on a 256x256 tile and a
//    1000x1000 image: cold (new pixels each time: encoder miss, decoder prepare) and hot (the same
//    image again: encoder cache hit, decoder state reused), with the gateway's stage breakdown.
// 2. The same graphs run in this one process (one worker pool, no gRPC) on the 256 tile with the
//    same prompts: the services' overhead as a ratio.
// 3. Decoder prompts per second at several batch sizes (Decode RPCs to one decoder replica).
import { createRequire } from 'node:module';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';

const require = createRequire(import.meta.url);
const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const common = Object.assign({}, ...['rpc', 'contract', 'runtime', 'nuclei'].map((p) => require(path.join(root, 'packages', p, 'dist/index.js'))));
const { startStack } = require(path.join(root, 'services/gateway/dist/cli/stack.js'));
const sharp = require(require.resolve('sharp', { paths: [path.join(root, 'packages/runtime')] }));

const { values: args } = parseArgs({
  options: {
    bundle: { type: 'string', default: path.join(root, 'models/tiny') },
    reps: { type: 'string', default: '5' },
    data: { type: 'string', default: path.join(root, '../shared/data') },
  },
});
const REPS = Number(args.reps);
const manifest = common.loadManifest(args.bundle);
const S = manifest.inputSize;

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const fmt = (x) => (x >= 100 ? x.toFixed(0) : x.toFixed(1));

function promisify(client, method) {
  return (req, timeoutMs = 600_000) =>
    new Promise((resolve, reject) =>
      method.call(client, req, new (require(require.resolve('@grpc/grpc-js', { paths: [path.join(root, 'packages/runtime')] })).Metadata)(),
        { deadline: new Date(Date.now() + timeoutMs) }, (err, res) => (err ? reject(err) : resolve(res))),
    );
}

/** A real H&E image when the shared data is there, else the committed synthetic sample. */
async function loadRgb(preferred, size) {
  const file = fs.existsSync(preferred) ? preferred : path.join(root, 'samples/synthetic-he-512.png');
  const img = sharp(file).removeAlpha().resize(size, size, { fit: 'cover' });
  const { data } = await img.raw().toBuffer({ resolveWithObject: true });
  return { rgb: new Uint8Array(data), source: path.relative(root, file) };
}

async function png(rgb, size) {
  return sharp(Buffer.from(rgb), { raw: { width: size, height: size, channels: 3 } }).png().toBuffer();
}

function normalise(rgb, size) {
  const { mean, std } = manifest.normalization;
  const out = new Float32Array(3 * size * size);
  for (let i = 0; i < size * size; i++) for (let c = 0; c < 3; c++) out[c * size * size + i] = (rgb[3 * i + c] - mean[c]) / std[c];
  return out;
}

async function segmentBench(segment, rgb, size, label) {
  const cold = [];
  const stages = new Map();
  let nuclei = 0;
  for (let r = 0; r < REPS; r++) {
    const copy = rgb.slice();
    copy[0] = (copy[0] + 1 + r) % 256; // new pixels, new digest: a cold request
    const t = performance.now();
    const res = await segment({ image: await png(copy, size) });
    cold.push(performance.now() - t);
    nuclei = res.nuclei.length;
    for (const s of res.timings) stages.set(s.stage, [...(stages.get(s.stage) ?? []), s.ms]);
  }
  const image = await png(rgb, size);
  await segment({ image });
  const hot = [];
  for (let r = 0; r < REPS; r++) {
    const t = performance.now();
    await segment({ image });
    hot.push(performance.now() - t);
  }
  console.log(`\n${label}: ${nuclei} nuclei`);
  console.log(`  Segment cold  ${fmt(median(cold))} ms   hot (cache hit) ${fmt(median(hot))} ms   hot/cold ${(median(hot) / median(cold)).toFixed(2)}`);
  console.log(`  gateway stage breakdown (cold, median ms): ${[...stages].map(([k, v]) => `${k} ${fmt(median(v))}`).join(', ')}`);
  return { cold: median(cold), hot: median(hot), nuclei };
}

/** The pipeline without services: the same graphs in one worker pool, one process. */
async function inProcess(rgb, points) {
  const graphs = Object.fromEntries(['prompter', 'encoder', 'decoder_image', 'decoder_prompts'].map((g) => [g, manifest.graphs[g].path]));
  const pool = new common.OnnxWorkerPool({ graphs, workers: 1 });
  const image = normalise(rgb, S);
  const run = async () => {
    const t0 = performance.now();
    const img = { image: { type: 'float32', dims: [1, 3, S, S], data: image.slice() } };
    const det = await pool.run('prompter', { image: { type: 'float32', dims: [1, 3, S, S], data: image.slice() } });
    const t1 = performance.now();
    const enc = await pool.run('encoder', img);
    const t2 = performance.now();
    const prep = await pool.run('decoder_image', { features: enc.features, image: { type: 'float32', dims: [1, 3, S, S], data: image.slice() } });
    const t3 = performance.now();
    for (let i = 0; i < points.length; i += 16) {
      const batch = points.slice(i, i + 16);
      await pool.run('decoder_prompts', {
        image_embedding: { ...prep.image_embedding, data: prep.image_embedding.data.slice() },
        semantic: { ...prep.semantic, data: prep.semantic.data.slice() },
        boundary_features: { ...prep.boundary_features, data: prep.boundary_features.data.slice() },
        point_coords: { type: 'float32', dims: [batch.length, 1, 2], data: Float32Array.from(batch.flat()) },
        point_labels: { type: 'float32', dims: [batch.length, 1], data: new Float32Array(batch.length).fill(1) },
      });
    }
    const t4 = performance.now();
    void det;
    return { total: t4 - t0, prompter: t1 - t0, encoder: t2 - t1, prepare: t3 - t2, decode: t4 - t3 };
  };
  await run();
  const runs = [];
  for (let r = 0; r < REPS; r++) runs.push(await run());
  await pool.close();
  return Object.fromEntries(Object.keys(runs[0]).map((k) => [k, median(runs.map((x) => x[k]))]));
}

async function decoderThroughput(stack, rgb) {
  const grpc = require(require.resolve('@grpc/grpc-js', { paths: [path.join(root, 'packages/runtime')] }));
  const enc = common.makeClient(common.stagesProto.EncoderClient, stack.encoder);
  const dec = common.makeClient(common.stagesProto.DecoderClient, stack.decoders[0]);
  const pixels = normalise(rgb, S);
  const digest = common.digestTile(rgb, manifest.version);
  const tensor = { dims: [3, S, S], dtype: common.stagesProto.DType.DTYPE_FLOAT32, data: Buffer.from(pixels.buffer) };
  const encoded = await promisify(enc, enc.encode)(common.stagesProto.EncodeRequest.fromPartial({ tiles: [{ digest, pixels: tensor }], modelVersion: manifest.version }));
  await promisify(dec, dec.prepare)(common.stagesProto.PrepareRequest.fromPartial({ digest, features: encoded.tiles[0].features, pixels: tensor, modelVersion: manifest.version }));
  const decodeRaw = promisify(dec, dec.decode);
  const decode = (req) => decodeRaw(common.stagesProto.DecodeRequest.fromPartial(req));
  console.log('\ndecoder throughput (one replica, Decode RPCs, 1 worker):');
  for (const batch of [1, 4, 16, 32, 64]) {
    const prompts = Array.from({ length: batch }, (_, i) => ({ coords: [16 + ((i * 37) % (S - 32)), 16 + ((i * 53) % (S - 32))], labels: [1] }));
    await decode({ digest, prompts, modelVersion: manifest.version });
    const t = performance.now();
    const rounds = Math.max(1, Math.ceil(64 / batch));
    for (let r = 0; r < rounds; r++) await decode({ digest, prompts, modelVersion: manifest.version });
    const ms = performance.now() - t;
    console.log(`  batch ${String(batch).padStart(2)}: ${(rounds * batch / (ms / 1000)).toFixed(1)} prompts/s (${fmt(ms / rounds)} ms per batch)`);
  }
  enc.close();
  dec.close();
  void grpc;
}

async function main() {
  console.log(`bundle ${manifest.name} ${manifest.version}, input ${S}, refinement ${manifest.refinement.mode} ${manifest.refinement.window}`);
  const stack = await startStack({ bundle: args.bundle, decoders: 2, port: 0, log: () => {} });
  try {
    const client = common.makeClient(common.segmentationProto.SegmentationClient, stack.gateway, { maxMessageBytes: 256 * 1024 * 1024 });
    const segmentRaw = promisify(client, client.segment);
    const segment = (req) => segmentRaw(common.segmentationProto.SegmentRequest.fromPartial(req));
    const tile = await loadRgb(path.join(args.data, 'consep-train/train_3_005.png'), S);
    const big = await loadRgb(path.join(args.data, 'monuseg-train', fs.existsSync(path.join(args.data, 'monuseg-train')) ? fs.readdirSync(path.join(args.data, 'monuseg-train')).find((f) => f.endsWith('.png') && !f.includes('labels')) ?? 'x' : 'x'), 1000);
    console.log(`tile: ${tile.source}; large image: ${big.source} (1000x1000)`);
    const small = await segmentBench(segment, tile.rgb, S, `${S}x${S} tile`);
    await segmentBench(segment, big.rgb, 1000, '1000x1000 image');

    // Same prompts in both runs: those the services found on the tile.
    const res = await segment({ image: await png(tile.rgb, S) });
    const points = res.nuclei.map((n) => [n.prompt.x, n.prompt.y]);
    const local = await inProcess(tile.rgb, points);
    console.log(`\nsame graphs in one process (${points.length} prompts, batches of 16): total ${fmt(local.total)} ms ` +
      `(prompter ${fmt(local.prompter)}, encoder ${fmt(local.encoder)}, prepare ${fmt(local.prepare)}, decode ${fmt(local.decode)})`);
    console.log(`four services / one process (cold ${S} tile): ${(small.cold / local.total).toFixed(2)}x`);
    await decoderThroughput(stack, tile.rgb);
    client.close();
  } finally {
    await stack.stop();
  }
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
