// Benchmark of the serving pipeline: what the split into services costs (prints numbers; nothing
// is asserted).
//
//   npm run build && node bench/pipeline.mjs [--bundle models/tiny] [--reps 5] [--clients 8] [--data ../shared/data]
//                                            [--decoder-processes 2]
//
// The same orchestration (the gateway's SegmentationPipeline) runs over three sets of stage ports:
//   services     the four services as separate processes (1 prompter, 1 encoder, 2 decoder
//                workers in --decoder-processes processes) behind a gateway, over loopback gRPC;
//   standalone   the standalone process (services/standalone): the gateway with the stage
//                pipelines inside it (LocalStages), called over loopback gRPC like the services;
//   one process  the same LocalStages in this process, with the same worker counts (1, 1, 2), no
//                gRPC at all (the floor the split is measured against).
// For a 256 tile and a 1000x1000 image it prints the latency of one request (cold: new pixels),
// the ratio services / one process, the sustained throughput with N concurrent clients for both,
// and the tensor bytes that cross the gateway per tile (measured on the gRPC stage adapter) next to
// what the previous message layout sent (float32 pixels to every stage, features through the
// gateway), for this bundle and for the b config.
import { createRequire } from 'node:module';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';

const require = createRequire(import.meta.url);
const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const lib = (p) => require(path.join(root, p));
const { loadManifest } = lib('packages/contract/dist/index.js');
const { makeClient, segmentationProto, unary } = lib('packages/rpc/dist/index.js');
const { startStack } = lib('services/gateway/dist/cli/stack.js');
const { SegmentationPipeline } = lib('services/gateway/dist/pipeline.js');
const { GrpcStages } = lib('services/gateway/dist/stages/grpcStages.js');
const { DEFAULT_GATEWAY_CONFIG } = lib('services/gateway/dist/config.js');
const { startLocalStages } = lib('services/standalone/dist/compose.js');
const sharp = require(require.resolve('sharp', { paths: [path.join(root, 'packages/nuclei')] }));

const { values: args } = parseArgs({
  options: {
    bundle: { type: 'string', default: path.join(root, 'models/tiny') },
    reps: { type: 'string', default: '5' },
    clients: { type: 'string', default: '8' },
    data: { type: 'string', default: path.join(root, '../shared/data') },
    'decoder-processes': { type: 'string', default: '2' },
  },
});
const REPS = Number(args.reps);
const CLIENTS = Number(args.clients);
const manifest = loadManifest(args.bundle);
const S = manifest.inputSize;
// Decoder workers in total (as in one process); the services spread them over --decoder-processes
// processes (2: one worker each, as before; 1: one process with both workers, sharing prepared tiles).
const DECODERS = 2;
const DECODER_PROCESSES = Number(args['decoder-processes']);
if (![1, 2].includes(DECODER_PROCESSES)) throw new Error('--decoder-processes must be 1 or 2');

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const fmt = (x) => (x >= 100 ? x.toFixed(0) : x.toFixed(1));
const mb = (b) => (b / 1e6).toFixed(b < 1e6 ? 3 : 1);

/** A real H&E image when the shared data is there, else the committed synthetic sample. */
async function loadRgb(preferred, size) {
  const file = fs.existsSync(preferred) ? preferred : path.join(root, 'samples/synthetic-he-512.png');
  const { data } = await sharp(file).removeAlpha().resize(size, size, { fit: 'cover' }).raw().toBuffer({ resolveWithObject: true });
  return { rgb: new Uint8Array(data), source: path.relative(root, file) };
}

const png = (rgb, size) =>
  sharp(Buffer.from(rgb), { raw: { width: size, height: size, channels: 3 } })
    .png()
    .toBuffer();

/**
 * PNGs of the image with a few pixels changed per copy, one every 100 px in both directions, so
 * every model tile of every copy is new: each a cold request (encoder and decoder caches miss).
 */
async function coldCopies(rgb, size, n, salt = 0) {
  const out = [];
  for (let r = 0; r < n; r++) {
    const copy = rgb.slice();
    for (let y = salt % 7; y < size; y += 100) {
      for (let x = r % 11; x < size; x += 100) {
        const i = 3 * (y * size + x);
        copy[i] = (copy[i] + 1 + r + salt) % 256;
      }
    }
    out.push(await png(copy, size));
  }
  return out;
}

/** The stage pipelines in this process behind LocalStages (what the standalone process runs), no gRPC. */
const inProcessStages = (ortRuns) =>
  startLocalStages(manifest, {
    prompterWorkers: 1,
    encoderWorkers: 1,
    decoderWorkers: DECODERS,
    intraOpThreads: 1,
    decodeBatchSize: DEFAULT_GATEWAY_CONFIG.decodeBatchSize,
    maxDecoderCalls: DEFAULT_GATEWAY_CONFIG.maxDecoderCalls,
    onJobDone: ({ graph, runMs }) => ortRuns.add(graph, runMs / 1000),
  });

const WARMUP = 2;

// CPU seconds (user + system, all threads) of a process, from /proc (Linux): the split's extra
// work shows here, its waiting does not.
const TICKS_PER_S = 100;
function cpuSecondsOfPid(pid) {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' '); // fields from 3 (state) on
  return (Number(fields[11]) + Number(fields[12])) / TICKS_PER_S; // utime, stime (fields 14, 15)
}
const selfCpuSeconds = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
};

/** CPU seconds per process name, sampled by `sample()`; `perRequest` divides a window's deltas. */
function cpuMeter(sample) {
  let start = sample();
  return {
    reset: () => (start = sample()),
    perRequest(n) {
      const end = sample();
      return Object.fromEntries(Object.keys(end).map((k) => [k, (end[k] - start[k]) / n]));
    },
  };
}
const fmtCpu = (byProcess) => {
  const total = Object.values(byProcess).reduce((a, b) => a + b, 0);
  return `${(total * 1000).toFixed(0)} ms (${Object.entries(byProcess)
    .map(([k, v]) => `${k} ${(v * 1000).toFixed(0)}`)
    .join(', ')})`;
};

/** Ports free right now (listen on 0, then close). */
async function freePorts(n) {
  const servers = await Promise.all(
    Array.from(
      { length: n },
      () =>
        new Promise((resolve) => {
          const s = net.createServer().listen(0, '127.0.0.1', () => resolve(s));
        }),
    ),
  );
  const ports = servers.map((s) => s.address().port);
  await Promise.all(servers.map((s) => new Promise((resolve) => s.close(resolve))));
  return ports;
}

/** onnxruntime run time (s) and runs per graph, summed over the pool's workers. */
function ortTotals() {
  const totals = {};
  return {
    add(graph, seconds) {
      totals[graph] ??= { seconds: 0, runs: 0 };
      totals[graph].seconds += seconds;
      totals[graph].runs += 1;
    },
    snapshot: () => structuredClone(totals),
  };
}

/** The same totals from every stage service's /metrics (a graph served by several replicas summed). */
async function scrapeOrtRuns(ports) {
  const totals = {};
  for (const port of ports.values()) {
    const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    for (const line of text.split('\n')) {
      const m = line.match(/^cfrsam_stage_duration_seconds_(sum|count)\{.*stage="([^"]+)\.run".*\} ([\d.e+-]+)$/);
      if (!m) continue;
      totals[m[2]] ??= { seconds: 0, runs: 0 };
      totals[m[2]][m[1] === 'sum' ? 'seconds' : 'runs'] += Number(m[3]);
    }
  }
  return totals;
}

/** Deltas of ORT totals over a window, per request. */
function ortMeter(sample) {
  let start = {};
  return {
    reset: async () => (start = await sample()),
    async perRequest(n) {
      const end = await sample();
      return Object.fromEntries(
        Object.entries(end).map(([g, v]) => [
          g,
          { ms: ((v.seconds - (start[g]?.seconds ?? 0)) * 1000) / n, runs: (v.runs - (start[g]?.runs ?? 0)) / n },
        ]),
      );
    },
  };
}
const fmtOrt = (byGraph) =>
  Object.entries(byGraph)
    .map(([g, v]) => `${g} ${v.ms.toFixed(0)} ms in ${v.runs.toFixed(1)} runs`)
    .join(', ');

async function latency(segment, images, cpu, ort) {
  // Warm-up requests (sessions, JIT in every process); their digests are then cached, so skip them.
  for (const image of images.slice(0, WARMUP)) await segment(image);
  cpu?.reset();
  await ort?.reset();
  const ms = [];
  const stages = new Map();
  let nuclei = 0;
  for (const image of images.slice(WARMUP)) {
    const t = performance.now();
    const res = await segment(image);
    ms.push(performance.now() - t);
    nuclei = res.nuclei.length;
    for (const s of res.timings) stages.set(s.stage, [...(stages.get(s.stage) ?? []), s.ms]);
  }
  return {
    ms: median(ms),
    nuclei,
    stages: [...stages].map(([k, v]) => `${k} ${fmt(median(v))}`).join(', '),
    cpu: cpu?.perRequest(images.length - WARMUP),
    ort: await ort?.perRequest(images.length - WARMUP),
  };
}

async function throughput(segment, images, clients) {
  let next = 0;
  const t = performance.now();
  await Promise.all(
    Array.from({ length: clients }, async () => {
      while (next < images.length) await segment(images[next++]);
    }),
  );
  return images.length / ((performance.now() - t) / 1000);
}

/** Latency, throughput, CPU and onnxruntime time of a stack over gRPC: the four services or the standalone process. */
async function measureStack(mode, cases, request, results, config, big) {
  const metricsPorts = new Map();
  const spare = await freePorts(3 + DECODER_PROCESSES);
  const stack = await startStack({
    bundle: args.bundle,
    decoders: mode === 'standalone' ? DECODERS : DECODER_PROCESSES,
    standalone: mode === 'standalone',
    port: 0,
    log: () => {},
    // Each service's /metrics, for the onnxruntime time per graph (cfrsam_stage_duration_seconds{stage="GRAPH.run"}).
    env: (name) => {
      metricsPorts.set(name, spare[metricsPorts.size]);
      return { METRICS_PORT: String(metricsPorts.get(name)) };
    },
    args: { gateway: ['--max-concurrent-requests', '1000'], decoder: ['--workers', String(DECODERS / DECODER_PROCESSES)] },
  });
  try {
    const client = makeClient(segmentationProto.SegmentationClient, stack.gateway, { maxMessageBytes: 256 * 1024 * 1024 });
    const segment = (image) => unary(client, client.segment, request(image), { timeoutMs: 600_000 });
    const servicesCpu = cpuMeter(() => ({
      client: selfCpuSeconds(),
      ...Object.fromEntries(stack.processes.map((p) => [p.name, cpuSecondsOfPid(p.child.pid)])),
    }));
    for (const c of cases) {
      const servicesOrt = ortMeter(() => scrapeOrtRuns(metricsPorts));
      const r = (results[`${mode} ${c.label}`] = {
        lat: await latency(segment, c.images, servicesCpu, servicesOrt),
        tput: await throughput(segment, c.tputImages, CLIENTS),
      });
      // A repeated request (slide-job redelivery, a client retrying): the gateway's result cache.
      const repeat = [];
      for (const image of c.images.slice(-3)) {
        const t = performance.now();
        await segment(image);
        repeat.push(performance.now() - t);
      }
      r.repeat = median(repeat);
      console.log(
        `${mode} ${c.label}: ${fmt(r.lat.ms)} ms, ${r.tput.toFixed(2)} images/s; repeated request ${fmt(r.repeat)} ms (${(r.lat.ms / r.repeat).toFixed(0)}x faster)`,
      );
    }
    client.close();
    if (mode === 'standalone') return;

    // Bytes through the gateway: the gRPC stage adapter in this process against the same stack.
    const grpcStages = new GrpcStages({
      ...config,
      prompter: [stack.prompter],
      encoder: stack.encoders,
      decoders: stack.decoders,
      modelVersion: manifest.version,
    });
    await grpcStages.start();
    const viaGrpc = new SegmentationPipeline(manifest, config, grpcStages);
    const res = await viaGrpc.segment(request((await coldCopies(big.rgb, 1000, 1, 4))[0]));
    const st = grpcStages.stats();
    const tiles = res.tiles;
    const after = (st.bytes.tilesOut + st.bytes.featuresIn) / tiles;
    const prepares = st.prepares / tiles;
    const F = manifest.featureShape.reduce((a, b) => a * b, 4);
    // The previous layout: float32 pixels to prompter and encoder, the features back, then
    // features + float32 pixels in every Prepare.
    const before = (f, s) => 2 * 4 * 3 * s * s + f + prepares * (f + 4 * 3 * s * s);
    const afterFor = (s) => 2 * 3 * s * s + prepares * 3 * s * s;
    const fB = 4 * 768 * 64 * 64 * 4; // b: 1024 input, 4 HMFM levels of 768 x 64 x 64
    console.log(`\nbytes of tensors through the gateway per tile (1000x1000 image, ${tiles} tiles, ${prepares.toFixed(2)} Prepares per tile):`);
    console.log(
      `  ${manifest.config} (features ${mb(F)} MB): before ${mb(before(F, S))} MB, after ${mb(after)} MB measured (${mb(afterFor(S))} MB computed), features through the gateway: ${st.bytes.featuresIn}`,
    );
    console.log(
      `  b at 1024 (features ${mb(fB)} MB): before ${mb(before(fB, 1024))} MB, after ${mb(afterFor(1024))} MB (computed with the same Prepares per tile)`,
    );
    viaGrpc.close();
  } finally {
    await stack.stop();
  }
}

async function main() {
  console.log(
    `bundle ${manifest.name} ${manifest.version}, input ${S}, ${os.cpus().length} CPUs, ${REPS} requests per latency, ${CLIENTS} clients, ` +
      `${DECODERS} decoder workers in ${DECODER_PROCESSES} decoder process(es)`,
  );
  const tile = await loadRgb(path.join(args.data, 'consep-train/train_3_005.png'), S);
  const monuseg = path.join(args.data, 'monuseg-train');
  const bigFile = fs.existsSync(monuseg) ? fs.readdirSync(monuseg).find((f) => f.endsWith('.png') && !f.includes('labels')) : undefined;
  const big = await loadRgb(bigFile ? path.join(monuseg, bigFile) : 'x', 1000);
  console.log(`tile: ${tile.source}; large image: ${big.source} (1000x1000)`);
  const cases = [
    { label: `${S}x${S} tile`, rgb: tile.rgb, size: S, n: REPS + WARMUP, tput: 4 * CLIENTS },
    { label: '1000x1000 image', rgb: big.rgb, size: 1000, n: REPS + WARMUP, tput: CLIENTS },
  ];
  for (const c of cases) {
    c.images = await coldCopies(c.rgb, c.size, c.n);
    c.tputImages = await coldCopies(c.rgb, c.size, c.tput, 1); // other digests than the latency runs
  }
  const config = { ...DEFAULT_GATEWAY_CONFIG, prompter: ['-'], encoder: ['-'], decoders: ['-'], maxConcurrentRequests: 1000 };
  const request = (image) => segmentationProto.SegmentRequest.fromPartial({ image });
  const results = {};

  // --- four services, then the standalone process, both over gRPC
  for (const mode of ['services', 'standalone']) await measureStack(mode, cases, request, results, config, big);

  // --- one process
  const localOrt = ortTotals();
  const local = await inProcessStages(localOrt);
  const pipeline = new SegmentationPipeline(manifest, config, local);
  const segmentLocal = (image) => pipeline.segment(request(image));
  for (const c of cases) {
    c.localImages = await coldCopies(c.rgb, c.size, c.n, 2);
    c.localTput = await coldCopies(c.rgb, c.size, c.tput, 3);
    const r = (results[`one process ${c.label}`] = {
      lat: await latency(
        segmentLocal,
        c.localImages,
        cpuMeter(() => ({ 'one process': selfCpuSeconds() })),
        ortMeter(async () => localOrt.snapshot()),
      ),
      tput: await throughput(segmentLocal, c.localTput, CLIENTS),
    });
    console.log(`one process ${c.label}: ${fmt(r.lat.ms)} ms, ${r.tput.toFixed(2)} images/s`);
  }
  pipeline.close();

  console.log(
    '\n| case | latency one request (ms): services, standalone, one process | services / one process | standalone / one process | ' +
      `throughput, ${CLIENTS} clients (images/s): services, standalone, one process | services / one process | standalone / one process |`,
  );
  console.log('| --- | --- | --- | --- | --- | --- | --- |');
  for (const c of cases) {
    const s = results[`services ${c.label}`];
    const a = results[`standalone ${c.label}`];
    const l = results[`one process ${c.label}`];
    const x = (v) => `**${v.toFixed(2)}x**`;
    console.log(
      `| ${c.label} | ${fmt(s.lat.ms)}, ${fmt(a.lat.ms)}, ${fmt(l.lat.ms)} | ${x(s.lat.ms / l.lat.ms)} | ${x(a.lat.ms / l.lat.ms)} | ` +
        `${s.tput.toFixed(2)}, ${a.tput.toFixed(2)}, ${l.tput.toFixed(2)} | ${x(s.tput / l.tput)} | ${x(a.tput / l.tput)} |`,
    );
  }
  for (const [k, v] of Object.entries(results)) console.log(`  ${k}: ${v.lat.nuclei} nuclei; stages (median ms): ${v.lat.stages}`);
  console.log('\nCPU time per cold request (all threads; services and standalone: every process, the client included):');
  for (const [k, v] of Object.entries(results)) console.log(`  ${k}: ${fmtCpu(v.lat.cpu)}`);
  console.log('onnxruntime time per cold request (wall time of the runs, summed over workers):');
  for (const [k, v] of Object.entries(results)) console.log(`  ${k}: ${fmtOrt(v.lat.ort)}`);
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
