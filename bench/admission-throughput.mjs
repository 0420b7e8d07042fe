// What the gateway's adaptive admission limit costs in throughput on small requests (prints
// numbers; nothing is asserted). The one-process pipeline (LocalStages, as bench/pipeline.mjs's
// "one process") behind one SegmentationPipeline per latency tolerance, sharing the stages; N
// closed-loop clients send cold 256 x 256 tiles; the tolerances take turns round by round.
//
//   npm run build && node bench/admission-throughput.mjs [--tolerances 1.25,2,3,100] [--clients 8]
//                                                       [--tiles 32] [--rounds 3] [--max-concurrent 8]
//
// Per round and tolerance: tiles/s, CPUs busy, the limit at the round's end and the median latency
// a client saw (admission wait included). A tolerance of 100 never sees congestion, so its limit
// is --max-concurrent.
import { createRequire } from 'node:module';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';

const require = createRequire(import.meta.url);
const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const lib = (p) => require(path.join(root, p));
const { loadManifest } = lib('packages/contract/dist/index.js');
const { segmentationProto } = lib('packages/rpc/dist/index.js');
const { SegmentationPipeline } = lib('services/gateway/dist/pipeline.js');
const { DEFAULT_GATEWAY_CONFIG } = lib('services/gateway/dist/config.js');
const { startLocalStages } = lib('services/standalone/dist/compose.js');
const sharp = require(require.resolve('sharp', { paths: [path.join(root, 'packages/nuclei')] }));

const { values: args } = parseArgs({
  options: {
    bundle: { type: 'string', default: path.join(root, 'models/tiny') },
    data: { type: 'string', default: path.join(root, '../shared/data') },
    tolerances: { type: 'string', default: '1.25,2,3,100' },
    clients: { type: 'string', default: '8' },
    tiles: { type: 'string', default: '32' },
    rounds: { type: 'string', default: '3' },
    'max-concurrent': { type: 'string', default: '8' },
  },
});
const CLIENTS = Number(args.clients);
const TILES = Number(args.tiles);
const ROUNDS = Number(args.rounds);
const manifest = loadManifest(args.bundle);
const S = manifest.inputSize;
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

const stages = await startLocalStages(manifest, {
  prompterWorkers: 1,
  encoderWorkers: 1,
  decoderWorkers: 2,
  intraOpThreads: 1,
  decodeBatchSize: DEFAULT_GATEWAY_CONFIG.decodeBatchSize,
  maxDecoderCalls: DEFAULT_GATEWAY_CONFIG.maxDecoderCalls,
});
const tolerances = args.tolerances.split(',').map(Number);
const pipelines = tolerances.map(
  (latencyTolerance) =>
    new SegmentationPipeline(
      manifest,
      {
        ...DEFAULT_GATEWAY_CONFIG,
        prompter: ['-'],
        encoder: ['-'],
        decoders: ['-'],
        latencyTolerance,
        maxConcurrentRequests: Number(args['max-concurrent']),
      },
      stages,
    ),
);

const tileFile = path.join(args.data, 'consep-train/train_3_005.png');
const source = fs.existsSync(tileFile) ? tileFile : path.join(root, 'samples/synthetic-he-512.png');
const { data } = await sharp(source).removeAlpha().resize(S, S, { fit: 'cover' }).raw().toBuffer({ resolveWithObject: true });
let copies = 0;
/** A copy of the tile with a few pixels changed: new to every cache. */
async function coldTile() {
  const rgb = Buffer.from(data);
  copies++;
  for (let i = 0; i < 3; i++) rgb[i * 3001] = (rgb[i * 3001] + copies + i) % 256;
  rgb[1] = copies >> 8;
  return sharp(rgb, { raw: { width: S, height: S, channels: 3 } })
    .png()
    .toBuffer();
}

console.log(
  `bundle ${manifest.version}; ${CLIENTS} clients, ${TILES} cold ${S}x${S} tiles per round (${path.relative(root, source)}); one warm-up round`,
);
const results = tolerances.map(() => []);
for (let round = 0; round <= ROUNDS; round++) {
  for (const [i, pipeline] of pipelines.entries()) {
    const batch = [];
    for (let j = 0; j < TILES; j++) batch.push(await coldTile());
    const latencies = [];
    let next = 0;
    const started = performance.now();
    const cpu0 = process.cpuUsage();
    await Promise.all(
      Array.from({ length: CLIENTS }, async () => {
        while (next < batch.length) {
          const image = batch[next++];
          const t = performance.now();
          await pipeline.segment(segmentationProto.SegmentRequest.fromPartial({ image }));
          latencies.push(performance.now() - t);
        }
      }),
    );
    const seconds = (performance.now() - started) / 1000;
    const cpu = process.cpuUsage(cpu0);
    if (round === 0) continue; // warm-up: sessions, JIT, the limit's first samples
    results[i].push({
      tilesPerS: TILES / seconds,
      busy: (cpu.user + cpu.system) / 1e6 / seconds,
      limit: pipeline.admission.stats().limit,
      p50: median(latencies),
    });
  }
}
console.log('\n| latency tolerance | tiles/s (median of rounds) | rounds: tiles/s (CPUs busy, limit at the end, median client latency) |');
console.log('| --- | --- | --- |');
for (const [i, t] of tolerances.entries()) {
  const rounds = results[i].map((r) => `${r.tilesPerS.toFixed(2)} (${r.busy.toFixed(2)}, ${r.limit}, ${r.p50.toFixed(0)} ms)`).join('; ');
  console.log(`| ${t} | ${median(results[i].map((r) => r.tilesPerS)).toFixed(2)} | ${rounds} |`);
}
for (const p of pipelines) p.close();
process.exit(0);
