// Benchmark of the serving pipeline: what the split into services costs (prints numbers; nothing
// is asserted).
//
//   npm run build && node bench/pipeline.mjs [--bundle models/tiny] [--reps 5] [--rounds 3] [--clients 8]
//                                            [--cases tile,large] [--data ../shared/data] [--decoder-processes 1]
//                                            [--isolated]
//
// The same orchestration (the gateway's SegmentationPipeline) runs over three sets of stage ports:
//   services     the four services as separate processes (1 prompter, 1 encoder, 2 decoder
//                workers in --decoder-processes processes) behind a gateway, over loopback gRPC;
//   standalone   the standalone process (services/standalone): the gateway with the stage
//                pipelines inside it (LocalStages), called over loopback gRPC like the services;
//   one process  the same LocalStages in this process, with the same worker counts (1, 1, 2), no
//                gRPC at all (the floor the split is measured against).
// All three run side by side and take turns, request by request and round by round, so that the
// machine's drift in speed over minutes lands on all of them alike. With --isolated only one of
// them is up at a time (as on a machine that serves one way): blocks of --reps requests and one
// throughput round per mode, the modes taking turns block by block (--rounds blocks), each block
// on a freshly started stack. Interleaving request by request makes every mode run with caches
// and memory just used by the other two, which costs the five-process services the most.
// For a 256 tile and a 1000x1000 image it prints the latency of one request (cold: new pixels),
// the ratio services / one process, the sustained throughput with N concurrent clients for both
// (the median of per-round ratios), the CPU time per image of every process at one request and
// under load with the CPUs busy on average,
// and the tensor bytes that cross the gateway per tile (measured on the gRPC stage adapter) next to
// what the previous message layout sent (float32 pixels to every stage, features through the
// gateway), for this bundle and for the b config.
import { createRequire } from 'node:module';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { coldCopy, cpuSecondsOfPid, freePorts, loadRgb, median, png, root } from './common.mjs';

const require = createRequire(import.meta.url);
const lib = (p) => require(path.join(root, p));
const { loadManifest } = lib('packages/contract/dist/index.js');
const { makeClient, segmentationProto, unary } = lib('packages/rpc/dist/index.js');
const { startStack, SERVICE_NODE_FLAGS } = lib('services/gateway/dist/cli/stack.js');
// The one-process mode runs in this process: give it the node flags every service process gets
// (V8's heap sizing), or the comparison would measure those flags, not the split.
if (!SERVICE_NODE_FLAGS.every((f) => process.execArgv.includes(f))) {
  const { spawnSync } = await import('node:child_process');
  const again = spawnSync(process.execPath, [...SERVICE_NODE_FLAGS, ...process.execArgv, ...process.argv.slice(1)], { stdio: 'inherit' });
  process.exit(again.status ?? 1);
}
const { SegmentationPipeline } = lib('services/gateway/dist/pipeline.js');
const { GrpcStages } = lib('services/gateway/dist/stages/grpcStages.js');
const { DEFAULT_GATEWAY_CONFIG } = lib('services/gateway/dist/config.js');
const { startLocalStages } = lib('services/standalone/dist/compose.js');

const { values: args } = parseArgs({
  options: {
    bundle: { type: 'string', default: path.join(root, 'models/tiny') },
    reps: { type: 'string', default: '5' },
    rounds: { type: 'string', default: '3' },
    cases: { type: 'string', default: 'tile,large' },
    clients: { type: 'string', default: '8' },
    data: { type: 'string', default: path.join(root, '../shared/data') },
    'decoder-processes': { type: 'string', default: '1' },
    isolated: { type: 'boolean', default: false },
  },
});
const REPS = Number(args.reps);
const CLIENTS = Number(args.clients);
const ROUNDS = Number(args.rounds);
const manifest = loadManifest(args.bundle);
const S = manifest.inputSize;
// Decoder workers in total (as in one process); the services spread them over --decoder-processes
// processes (1, the default: one process with both workers sharing prepared tiles, the shape of a
// decoder pod in deploy/k8s (2 CPUs, CFRSAM_WORKERS=2); 2: one worker each, as the runs before
// 2026-12-04 did, where a lone tile's prompts spread over both are prepared twice).
const DECODERS = 2;
const DECODER_PROCESSES = Number(args['decoder-processes']);
if (![1, 2].includes(DECODER_PROCESSES)) throw new Error('--decoder-processes must be 1 or 2');

const fmt = (x) => (x >= 100 ? x.toFixed(0) : x.toFixed(1));
const mb = (b) => (b / 1e6).toFixed(b < 1e6 ? 3 : 1);

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

const selfCpuSeconds = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
};

const fmtCpu = (byProcess) => {
  const total = Object.values(byProcess).reduce((a, b) => a + b, 0);
  return `${(total * 1000).toFixed(0)} ms (${Object.entries(byProcess)
    .map(([k, v]) => `${k} ${(v * 1000).toFixed(0)}`)
    .join(', ')})`;
};

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

const fmtOrt = (byGraph) =>
  Object.entries(byGraph)
    .map(([g, v]) => `${g} ${v.ms.toFixed(0)} ms in ${v.runs.toFixed(1)} runs`)
    .join(', ');

/**
 * One way of serving, measured in windows that interleave with the other ways': its CPU and
 * onnxruntime time are summed over its own windows only.
 */
function modeMeter(name, segment, cpuSample, ortSample) {
  const cpu = {};
  const ort = {};
  const add = (into, from, to) => {
    for (const k of Object.keys(to)) into[k] = (into[k] ?? 0) + to[k] - (from[k] ?? 0);
  };
  return {
    name,
    segment,
    cpu,
    ort,
    /**
     * Runs fn, adding the CPU seconds (per process) and onnxruntime time (per graph) spent
     * meanwhile. Resolves to fn's result and its wall time (ms), which leaves out the /metrics
     * scrapes around it (tens of ms over five services' endpoints).
     */
    async measure(fn) {
      const o0 = await ortSample();
      const c0 = cpuSample();
      const t = performance.now();
      const out = await fn();
      const ms = performance.now() - t;
      const c1 = cpuSample();
      const o1 = await ortSample();
      add(cpu, c0, c1);
      for (const [g, v] of Object.entries(o1)) {
        ort[g] ??= { seconds: 0, runs: 0 };
        ort[g].seconds += v.seconds - (o0[g]?.seconds ?? 0);
        ort[g].runs += v.runs - (o0[g]?.runs ?? 0);
      }
      return { out, ms };
    },
    /** Empties the sums (before a new window kind: latency, then throughput). */
    clear() {
      for (const k of Object.keys(cpu)) delete cpu[k];
      for (const k of Object.keys(ort)) delete ort[k];
    },
    perImage(n) {
      return {
        cpu: Object.fromEntries(Object.entries(cpu).map(([k, v]) => [k, v / n])),
        ort: Object.fromEntries(Object.entries(ort).map(([g, v]) => [g, { ms: (v.seconds * 1000) / n, runs: v.runs / n }])),
      };
    },
  };
}

/**
 * Latency (one request at a time) and throughput (CLIENTS concurrent callers) of every mode on
 * one case, in interleaved rounds: request i of every mode runs before request i + 1 of any, and
 * throughput round r of every mode before round r + 1 (the order rotating), so a machine whose
 * speed drifts over minutes (this one does, by up to 1.5x) drifts for all of them alike.
 */
async function measureCase(c, modes, images, reps = REPS, rounds = ROUNDS) {
  for (const m of modes) for (let i = 0; i < WARMUP; i++) await m.segment(images.next()); // sessions, JIT, every process
  const lat = Object.fromEntries(modes.map((m) => [m.name, { ms: [], stages: new Map(), nuclei: 0 }]));
  for (const m of modes) m.clear();
  for (let i = 0; i < reps; i++) {
    for (const m of rotate(modes, i)) {
      const image = images.next();
      const { out: res, ms } = await m.measure(() => m.segment(image));
      const l = lat[m.name];
      l.ms.push(ms);
      l.nuclei = res.nuclei.length;
      for (const s of res.timings) l.stages.set(s.stage, [...(l.stages.get(s.stage) ?? []), s.ms]);
    }
  }
  const out = {};
  for (const m of modes) {
    const l = lat[m.name];
    out[m.name] = { lat: { all: l.ms, stageSamples: l.stages, nuclei: l.nuclei, ...m.perImage(reps) }, tput: [] };
    m.clear();
  }
  for (let r = 0; r < rounds; r++) {
    for (const m of rotate(modes, r)) {
      const batch = Array.from({ length: c.tput }, () => images.next());
      let next = 0;
      const { ms } = await m.measure(() =>
        Promise.all(
          Array.from({ length: CLIENTS }, async () => {
            while (next < batch.length) await m.segment(batch[next++]);
          }),
        ),
      );
      out[m.name].tput.push(batch.length / (ms / 1000));
    }
  }
  for (const m of modes) {
    const p = m.perImage(rounds * c.tput);
    const cpuS = Object.values(m.cpu).reduce((a, b) => a + b, 0);
    const wallS = out[m.name].tput.reduce((a, v) => a + c.tput / v, 0);
    out[m.name].load = { ...p, busyCpus: cpuS / wallS };
  }
  return out;
}

const rotate = (xs, i) => xs.map((_, j) => xs[(i + j) % xs.length]);

/** A mode's measurements over several blocks as one: samples pooled, per-image sums averaged. */
function mergeBlocks(blocks) {
  const avg = (pick) => {
    const sum = {};
    for (const b of blocks) for (const [k, v] of Object.entries(pick(b))) sum[k] = (sum[k] ?? 0) + v / blocks.length;
    return sum;
  };
  const avgOrt = (pick) => {
    const sum = {};
    for (const b of blocks) {
      for (const [g, v] of Object.entries(pick(b))) {
        sum[g] ??= { ms: 0, runs: 0 };
        sum[g].ms += v.ms / blocks.length;
        sum[g].runs += v.runs / blocks.length;
      }
    }
    return sum;
  };
  const stageSamples = new Map();
  for (const b of blocks) for (const [k, v] of b.lat.stageSamples) stageSamples.set(k, [...(stageSamples.get(k) ?? []), ...v]);
  return {
    lat: {
      all: blocks.flatMap((b) => b.lat.all),
      stageSamples,
      nuclei: blocks[0].lat.nuclei,
      cpu: avg((b) => b.lat.cpu),
      ort: avgOrt((b) => b.lat.ort),
    },
    tput: blocks.flatMap((b) => b.tput),
    load: {
      cpu: avg((b) => b.load.cpu),
      ort: avgOrt((b) => b.load.ort),
      busyCpus: blocks.reduce((a, b) => a + b.load.busyCpus, 0) / blocks.length,
    },
  };
}

/** Medians of a mode's pooled latency samples. */
function summariseLatency(r) {
  r.lat.ms = median(r.lat.all);
  r.lat.stages = [...r.lat.stageSamples].map(([k, v]) => `${k} ${fmt(median(v))}`).join(', ');
  return r;
}

/** An endless supply of cold copies of an image (PNG), made ahead in chunks. */
function imageSupply(rgb, size) {
  let k = 0;
  const ready = [];
  return {
    async fill(n) {
      for (let i = 0; i < n; i++) ready.push(await png(coldCopy(rgb, size, k++), size));
    },
    next() {
      if (ready.length === 0) throw new Error('image supply ran dry (fill more ahead)');
      return ready.shift();
    },
  };
}

/** Tensor bytes through the gateway per tile, measured on the gRPC stage adapter in this process against the services. */
async function bytesThroughGateway(stack, config, request, big) {
  const grpcStages = new GrpcStages({
    ...config,
    prompter: [stack.prompter],
    encoder: stack.encoders,
    decoders: stack.decoders,
    modelVersion: manifest.version,
  });
  await grpcStages.start();
  const viaGrpc = new SegmentationPipeline(manifest, config, grpcStages);
  const res = await viaGrpc.segment(request(await png(coldCopy(big.rgb, 1000, 1e6), 1000)));
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
}

/** The four services or the standalone process, over gRPC, with every process's CPU and /metrics. */
async function startGrpcMode(mode, request) {
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
  const client = makeClient(segmentationProto.SegmentationClient, stack.gateway, { maxMessageBytes: 256 * 1024 * 1024 });
  const segment = (image) => unary(client, client.segment, request(image), { timeoutMs: 600_000 });
  const meter = modeMeter(
    mode,
    segment,
    () => ({ client: selfCpuSeconds(), ...Object.fromEntries(stack.processes.map((p) => [p.name, cpuSecondsOfPid(p.child.pid)])) }),
    () => scrapeOrtRuns(metricsPorts),
  );
  return {
    meter,
    stack,
    stop: async () => {
      client.close();
      await stack.stop();
    },
  };
}

async function main() {
  console.log(
    `bundle ${manifest.name} ${manifest.version}, input ${S}, ${os.cpus().length} CPUs, ${REPS} requests per latency, ` +
      `${ROUNDS} throughput rounds of ${CLIENTS} clients, ${DECODERS} decoder workers in ${DECODER_PROCESSES} decoder process(es); ` +
      (args.isolated
        ? `one mode up at a time, in ${ROUNDS} blocks of ${REPS} requests and one throughput round each, the modes taking turns`
        : 'the modes interleave request by request and round by round'),
  );
  const tile = await loadRgb(path.join(args.data, 'consep-train/train_3_005.png'), S);
  const monuseg = path.join(args.data, 'monuseg-train');
  const bigFile = fs.existsSync(monuseg) ? fs.readdirSync(monuseg).find((f) => f.endsWith('.png') && !f.includes('labels')) : undefined;
  const big = await loadRgb(bigFile ? path.join(monuseg, bigFile) : 'x', 1000);
  console.log(`tile: ${tile.source}; large image: ${big.source} (1000x1000)`);
  const wanted = new Set(args.cases.split(','));
  const cases = [
    { name: 'tile', label: `${S}x${S} tile`, rgb: tile.rgb, size: S, tput: 4 * CLIENTS },
    { name: 'large', label: '1000x1000 image', rgb: big.rgb, size: 1000, tput: 2 * CLIENTS },
  ].filter((c) => wanted.has(c.name));
  const config = { ...DEFAULT_GATEWAY_CONFIG, prompter: ['-'], encoder: ['-'], decoders: ['-'], maxConcurrentRequests: 1000 };
  const request = (image) => segmentationProto.SegmentRequest.fromPartial({ image });

  // The three ways of serving, each started on demand: { meter, stop }.
  const startMode = {
    services: () => startGrpcMode('services', request),
    standalone: () => startGrpcMode('standalone', request),
    'one process': async () => {
      const localOrt = ortTotals();
      const pipeline = new SegmentationPipeline(manifest, config, await inProcessStages(localOrt));
      const meter = modeMeter(
        'one process',
        (image) => pipeline.segment(request(image)),
        () => ({ 'one process': selfCpuSeconds() }),
        async () => localOrt.snapshot(),
      );
      return { meter, stop: async () => pipeline.close() };
    },
  };
  const names = Object.keys(startMode);

  /** A repeated request (slide-job redelivery, a client retrying): the gateway's result cache. */
  async function repeatedRequest(c, m, k) {
    const again = await png(coldCopy(c.rgb, c.size, 60_000 + k), c.size);
    await m.segment(again); // cold, then from the cache
    const repeat = [];
    for (let i = 0; i < 3; i++) {
      const t = performance.now();
      await m.segment(again);
      repeat.push(performance.now() - t);
    }
    return median(repeat);
  }

  const results = {};
  if (!args.isolated) {
    // All three ways of serving stay up side by side (idle ones cost memory, not CPU).
    const running = [];
    try {
      for (const n of names) running.push(await startMode[n]());
      const modes = running.map((r) => r.meter);
      for (const c of cases) {
        const images = imageSupply(c.rgb, c.size);
        await images.fill(modes.length * (WARMUP + REPS + ROUNDS * c.tput));
        results[c.label] = await measureCase(c, modes, images);
        for (const n of names) summariseLatency(results[c.label][n]);
        for (const [i, m] of modes.slice(0, 2).entries()) results[c.label][m.name].repeat = await repeatedRequest(c, m, i);
      }
      await bytesThroughGateway(running[0].stack, config, request, big);
    } finally {
      for (const r of running) await r.stop();
    }
  } else {
    // One way of serving up at a time: blocks of REPS requests and one throughput round per mode,
    // the modes taking turns block by block, each block on a fresh stack.
    for (const c of cases) {
      const images = imageSupply(c.rgb, c.size);
      const blocks = Object.fromEntries(names.map((n) => [n, []]));
      const repeats = {};
      for (let b = 0; b < ROUNDS; b++) {
        for (const n of rotate(names, b)) {
          const mode = await startMode[n]();
          try {
            await images.fill(WARMUP + REPS + c.tput);
            const out = await measureCase(c, [mode.meter], images, REPS, 1);
            blocks[n].push(out[n]);
            if (b === 0 && n !== 'one process') repeats[n] = await repeatedRequest(c, mode.meter, names.indexOf(n));
          } finally {
            await mode.stop();
          }
        }
      }
      results[c.label] = Object.fromEntries(names.map((n) => [n, summariseLatency({ ...mergeBlocks(blocks[n]), repeat: repeats[n] })]));
    }
    const services = await startMode.services();
    try {
      await bytesThroughGateway(services.stack, config, request, big);
    } finally {
      await services.stop();
    }
  }
  for (const c of cases) {
    for (const n of names) {
      const r = results[c.label][n];
      const rep = r.repeat ? `; repeated request ${fmt(r.repeat)} ms (${(r.lat.ms / r.repeat).toFixed(0)}x faster)` : '';
      console.log(
        `${n} ${c.label}: ${fmt(r.lat.ms)} ms, ${median(r.tput).toFixed(2)} images/s (rounds ${r.tput.map((v) => v.toFixed(2)).join(', ')})${rep}`,
      );
    }
  }

  console.log(
    '\n| case | latency one request (ms): services, standalone, one process | services / one process | standalone / one process | ' +
      `throughput, ${CLIENTS} clients (images/s, median of ${ROUNDS} rounds): services, standalone, one process | services / one process | standalone / one process |`,
  );
  console.log('| --- | --- | --- | --- | --- | --- | --- |');
  const x = (v) => `**${v.toFixed(2)}x**`;
  // Throughput ratio: the median of the per-round ratios (each round's modes ran minutes apart at most).
  const roundRatio = (a, b) => median(a.tput.map((v, i) => v / b.tput[i]));
  for (const c of cases) {
    const [s, a, l] = names.map((n) => results[c.label][n]);
    console.log(
      `| ${c.label} | ${fmt(s.lat.ms)}, ${fmt(a.lat.ms)}, ${fmt(l.lat.ms)} | ${x(s.lat.ms / l.lat.ms)} | ${x(a.lat.ms / l.lat.ms)} | ` +
        `${median(s.tput).toFixed(2)}, ${median(a.tput).toFixed(2)}, ${median(l.tput).toFixed(2)} | ${x(roundRatio(s, l))} | ${x(roundRatio(a, l))} |`,
    );
  }
  const each = (fn) => {
    for (const c of cases) for (const n of names) console.log(`  ${n} ${c.label}: ${fn(results[c.label][n])}`);
  };
  each((r) => `${r.lat.nuclei} nuclei; stages (median ms): ${r.lat.stages}`);
  console.log('\nCPU time per cold request, one at a time (all threads; services and standalone: every process, the client included):');
  each((r) => fmtCpu(r.lat.cpu));
  console.log(`CPU time per image under load (${CLIENTS} clients), and the CPUs busy on average (of ${os.cpus().length}):`);
  each((r) => `${fmtCpu(r.load.cpu)}; ${r.load.busyCpus.toFixed(2)} CPUs busy`);
  console.log('onnxruntime time per cold request, one at a time (wall time of the runs, summed over workers):');
  each((r) => fmtOrt(r.lat.ort));
  console.log(`onnxruntime time per image under load (${CLIENTS} clients):`);
  each((r) => fmtOrt(r.load.ort));
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
