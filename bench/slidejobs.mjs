// Benchmark of slide jobs (prints numbers; nothing is asserted): jobs per hour and tissue
// megapixels per second with 1, 2 and 3 worker gateways on one machine, the scaling ratio, the time
// from submit to the first region done, and the peak RSS of every process; then the peak RSS of a
// fresh gateway for a job and for a job of four times its area (bounded memory: it should stay flat).
//
//   npm run build && node bench/slidejobs.mjs [--slide ../shared/slides/CMU-1-Small-Region.svs]
//       [--roi 700,1200,512,512] [--region-size 512] [--workers 1,2,3] [--jobs 2] [--decoders 2]
//       [--no-memory] [--json out.json]
//   npm run build && node bench/slidejobs.mjs --fairness 0,32 [--slide ...] [--roi ...]
//
// --fairness WINDOWS measures, instead, what a job waits behind another: per task window
// (--slide-job-window; 0 queues every task at submit), one worker gateway on a fresh stack is given
// the whole slide and, a second later, the ROI; it prints when the ROI job is done, how far the
// slide had got by then, and when the slide was done (the window should cost it nothing).
//   npm run build && node bench/slidejobs.mjs --owner-turns 0,2 [--owner-jobs 4] [--roi ...]
//
// --owner-turns LIMITS measures the turns owners take: per --slide-jobs-per-owner limit, one worker
// gateway with two callers (bearer tokens) on a fresh stack; lab A submits --owner-jobs whole
// slides, then lab B the ROI; it prints when B's job is done, and cancels A's.
//
// A real nats-server (JetStream file storage in a temporary directory), the stage services of
// `cfrsam stack` (1 prompter, 1 encoder, N decoders; started afresh for every configuration so no
// run finds features cached by the one before), and per configuration W fresh gateway processes, each API and worker (one region at a
// time, result cache off), reading the slide from a slide root. Each configuration submits --jobs
// jobs of the ROI at once (distinct request ids) and waits for all of them.
import { spawn, execFileSync } from 'node:child_process';
import { createRequire } from 'node:module';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { peakRssMb } from './common.mjs';

const require = createRequire(import.meta.url);
const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const lib = (p) => require(path.join(root, p));
const { makeClient, segmentationProto, unary } = lib('packages/rpc/dist/index.js');
const { startStack, checkHealth, freePort, SERVICE_NODE_FLAGS } = lib('services/gateway/dist/cli/stack.js');

const { values: args } = parseArgs({
  options: {
    slide: { type: 'string', default: path.join(root, '../shared/slides/CMU-1-Small-Region.svs') },
    roi: { type: 'string', default: '700,1200,512,512' },
    'region-size': { type: 'string', default: '512' },
    workers: { type: 'string', default: '1,2,3' },
    jobs: { type: 'string', default: '2' },
    decoders: { type: 'string', default: '2' },
    memory: { type: 'boolean', default: true },
    'no-memory': { type: 'boolean', default: false },
    json: { type: 'string', default: '' },
    fairness: { type: 'string', default: '' },
    'owner-turns': { type: 'string', default: '' },
    'owner-jobs': { type: 'string', default: '4' },
  },
});
const WORKERS = args.workers.split(',').map(Number);
const JOBS = Number(args.jobs);
const REGION = Number(args['region-size']);
const [RX, RY, RW, RH] = args.roi.split(',').map(Number);
const { SlideJobState } = segmentationProto;
if (!fs.existsSync(args.slide)) {
  console.error(`no slide at ${args.slide}: nothing to measure`);
  process.exit(0);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function natsBinary() {
  for (const c of [process.env.CFRSAM_NATS_SERVER, '/usr/sbin/nats-server', '/usr/bin/nats-server']) if (c && fs.existsSync(c)) return c;
  try {
    return execFileSync('sh', ['-c', 'command -v nats-server']).toString().trim();
  } catch {
    return null;
  }
}

async function startNats(storeDir) {
  const bin = natsBinary();
  if (!bin) throw new Error('nats-server not found (install the nats-server package)');
  const port = await freePort();
  const child = spawn(bin, ['-js', '-a', '127.0.0.1', '-p', String(port), '-sd', storeDir], { stdio: ['ignore', 'ignore', 'pipe'] });
  await new Promise((resolve, reject) => {
    let out = '';
    child.stderr.on('data', (b) => {
      out += b;
      if (out.includes('Server is ready')) resolve();
    });
    child.once('exit', (code) => reject(new Error(`nats-server exited with ${code}: ${out}`)));
  });
  child.stderr.resume();
  return { url: `nats://127.0.0.1:${port}`, child };
}

async function startGateway(stack, natsUrl, slideRoot, name, extra = []) {
  const port = await freePort();
  const child = spawn(
    process.execPath,
    [
      ...SERVICE_NODE_FLAGS, // as every service process `cfrsam stack` starts
      path.join(root, 'services/gateway/dist/main.js'),
      ...['--port', String(port), '--host', '127.0.0.1', '--bundle', path.join(root, 'models/tiny')],
      ...['--prompter', stack.prompter, '--encoder', stack.encoder, '--decoders', stack.decoders.join(',')],
      ...['--nats-url', natsUrl, '--slide-root', slideRoot, '--result-cache-mb', '0', '--slide-workers', '1'],
      ...extra,
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  child.stderr.on('data', (b) => process.env.CFRSAM_BENCH_VERBOSE && process.stderr.write(`[${name}] ${b}`));
  for (let i = 0; ; i++) {
    if ((await checkHealth(`127.0.0.1:${port}`).catch(() => '')) === 'SERVING') break;
    if (i > 300 || child.exitCode !== null) throw new Error(`gateway ${name} did not start`);
    await sleep(100);
  }
  const client = makeClient(segmentationProto.SegmentationClient, `127.0.0.1:${port}`);
  for (let i = 0; i < 200; i++) {
    const code = await unary(client, client.getSlideJob, { jobId: '0'.repeat(32) }).then(
      () => 0,
      (e) => e.code,
    );
    if (code !== 14) break;
    await sleep(100);
  }
  return { name, child, client };
}

async function stopGateway(g) {
  g.client.close();
  g.child.kill('SIGTERM');
  await new Promise((r) => (g.child.exitCode !== null ? r() : g.child.once('exit', r)));
}

const finished = (s) =>
  s === SlideJobState.SLIDE_JOB_STATE_DONE || s === SlideJobState.SLIDE_JOB_STATE_FAILED || s === SlideJobState.SLIDE_JOB_STATE_CANCELLED;

/** Submits `n` jobs of the ROI at once and waits for them; returns timings and totals. */
async function runJobs(client, roi, n, tag) {
  const t0 = performance.now();
  const ids = [];
  for (let i = 0; i < n; i++) {
    const res = await unary(
      client,
      client.submitSlideJob,
      segmentationProto.SubmitSlideJobRequest.fromPartial({
        slide: { source: { $case: 'path', value: 'slide' + path.extname(args.slide) } },
        roi: { ...roi, polygon: [] },
        regionSize: REGION,
        requestId: `${tag}-${i}`,
      }),
      { timeoutMs: 600_000 },
    );
    ids.push(res.jobId);
  }
  const submitS = (performance.now() - t0) / 1000;
  let firstProgressS = null;
  const last = new Map();
  for (;;) {
    for (const id of ids) last.set(id, await unary(client, client.getSlideJob, { jobId: id }));
    if (firstProgressS === null && [...last.values()].some((j) => j.tilesDone > 0)) firstProgressS = (performance.now() - t0) / 1000;
    if ([...last.values()].every((j) => finished(j.state))) break;
    await sleep(200);
  }
  const wallS = (performance.now() - t0) / 1000;
  const jobs = [...last.values()];
  const failed = jobs.filter((j) => j.state !== SlideJobState.SLIDE_JOB_STATE_DONE);
  if (failed.length) throw new Error(`jobs failed: ${failed.map((j) => `${j.jobId}: ${j.error}`).join('; ')}`);
  return {
    jobs: n,
    regions: jobs.reduce((s, j) => s + j.tilesTotal, 0),
    nuclei: jobs.reduce((s, j) => s + Number(j.nuclei), 0),
    tissueMpx: jobs.reduce((s, j) => s + j.tissueMpxTotal, 0),
    submitS,
    firstProgressS,
    wallS,
  };
}

/** Submits a job on the slide (`fields` add the ROI, request id...); `options`: call options (a caller's token). */
const submitJob = (client, fields, options = { timeoutMs: 600_000 }) =>
  unary(
    client,
    client.submitSlideJob,
    segmentationProto.SubmitSlideJobRequest.fromPartial({
      slide: { source: { $case: 'path', value: 'slide' + path.extname(args.slide) } },
      regionSize: REGION,
      ...fields,
    }),
    options,
  );

/** The job once it is finished (polled). */
async function untilFinished(client, jobId, options = {}) {
  for (;;) {
    const job = await unary(client, client.getSlideJob, { jobId }, options);
    if (finished(job.state)) return job;
    await sleep(200);
  }
}

/** The whole slide, then the ROI a second later, on one worker with the given task window. */
async function fairness(client, roi, window, run) {
  const slide = await submitJob(client, { requestId: `slide-${run}-w${window}` });
  await sleep(1000);
  const t0 = performance.now();
  const small = await submitJob(client, { roi: { ...roi, polygon: [] }, requestId: `roi-${run}-w${window}` });
  const job = await untilFinished(client, small.jobId);
  const waitedS = (performance.now() - t0) / 1000;
  const behind = await unary(client, client.getSlideJob, { jobId: slide.jobId });
  if (job.state !== SlideJobState.SLIDE_JOB_STATE_DONE) throw new Error(`the ROI job ended ${job.state}: ${job.error}`);
  const whole = await untilFinished(client, slide.jobId);
  if (whole.state !== SlideJobState.SLIDE_JOB_STATE_DONE) throw new Error(`the slide job ended ${whole.state}: ${whole.error}`);
  return {
    window,
    slideRegions: slide.regions,
    roiRegions: small.regions,
    roiDoneS: waitedS,
    slideRegionsDoneThen: behind.tilesDone,
    slideDoneS: (performance.now() - t0) / 1000 + 1,
    slideNuclei: Number(whole.nuclei),
  };
}

/** Lab A's whole slides, then lab B's ROI, on a gateway that knows both labs' tokens. */
async function ownerTurns(client, roi, limit, run) {
  const { Metadata } = require(path.join(root, 'node_modules/@grpc/grpc-js'));
  const as = (lab) => {
    const metadata = new Metadata();
    metadata.set('authorization', `Bearer ${lab}-token-0123456789`);
    return { metadata, timeoutMs: 600_000 };
  };
  const submitAs = (lab, fields) => submitJob(client, fields, as(lab));
  // Slide jobs are UNAVAILABLE until the gateway has set up its streams (startGateway's own probe
  // carries no token, so it learnt nothing): an unknown job is NOT_FOUND once they are.
  for (let i = 0; i < 300; i++) {
    const code = await unary(client, client.getSlideJob, { jobId: '0'.repeat(32) }, as('lab-a')).then(
      () => 0,
      (e) => e.code,
    );
    if (code !== 14) break;
    await sleep(100);
  }
  const labA = [];
  for (let i = 0; i < Number(args['owner-jobs']); i++) labA.push(await submitAs('lab-a', { requestId: `a-${run}-${i}` }));
  const t0 = performance.now();
  const b = await submitAs('lab-b', { roi: { ...roi, polygon: [] }, requestId: `b-${run}` });
  const job = await untilFinished(client, b.jobId, as('lab-b'));
  const waitedS = (performance.now() - t0) / 1000;
  const done = [];
  for (const a of labA) {
    done.push((await unary(client, client.getSlideJob, { jobId: a.jobId }, as('lab-a'))).tilesDone);
    await unary(client, client.cancelSlideJob, { jobId: a.jobId }, as('lab-a')).catch(() => undefined);
  }
  if (job.state !== SlideJobState.SLIDE_JOB_STATE_DONE) throw new Error(`lab B's job ended ${job.state}: ${job.error}`);
  return { limit, labAJobs: labA.length, labARegions: labA.map((a) => a.regions), bDoneS: waitedS, labADoneThen: done };
}

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'cfrsam-bench-slidejobs-'));
const slideRoot = path.join(tmp, 'slides');
fs.mkdirSync(slideRoot);
fs.copyFileSync(args.slide, path.join(slideRoot, 'slide' + path.extname(args.slide)));
fs.mkdirSync(path.join(tmp, 'nats'));
const nats = await startNats(path.join(tmp, 'nats'));
// Fresh stage services per configuration, so no run finds features cached by the one before.
const newStack = () =>
  startStack({
    decoders: Number(args.decoders),
    port: 0,
    log: (name, line) => process.env.CFRSAM_BENCH_VERBOSE && process.stderr.write(`[${name}] ${line}\n`),
  });
let stack = await newStack();
const stageRss = () => Object.fromEntries(stack.processes.filter((p) => p.name !== 'gateway').map((p) => [p.name, peakRssMb(p.child.pid)]));
const results = {
  machine: { cpus: os.cpus().length, model: os.cpus()[0]?.model },
  roi: { x: RX, y: RY, width: RW, height: RH },
  regionSize: REGION,
  scaling: [],
  memory: [],
};
console.log(
  `slide ${path.basename(args.slide)}, ROI ${RW}x${RH} at (${RX},${RY}), regions of ${REGION} px at the model's resolution, ${JOBS} job(s) per run, ${os.cpus().length} CPUs`,
);
try {
  if (args.fairness) {
    results.fairness = [];
    for (const [k, window] of args.fairness.split(',').map(Number).entries()) {
      if (k > 0) {
        await stack.stop();
        stack = await newStack();
      }
      const g = await startGateway(stack, nats.url, slideRoot, `gateway-window-${window}`, ['--slide-job-window', String(window)]);
      const r = await fairness(g.client, { x: RX, y: RY, width: RW, height: RH }, window, k);
      await stopGateway(g);
      results.fairness.push(r);
      console.log(
        `task window ${window || 'off (every task queued at submit)'}: the ROI (${r.roiRegions} regions) submitted 1 s after the whole slide ` +
          `(${r.slideRegions} regions) was done after ${r.roiDoneS.toFixed(1)} s, the slide then at ${r.slideRegionsDoneThen} regions; ` +
          `the slide done after ${r.slideDoneS.toFixed(1)} s (${r.slideNuclei} nuclei)`,
      );
    }
  }
  if (args['owner-turns']) {
    results.ownerTurns = [];
    const tokenFile = path.join(tmp, 'tokens.json');
    const { createHash } = await import('node:crypto');
    const grant = (lab) => ({
      sha256: createHash('sha256').update(`${lab}-token-0123456789`).digest('hex'),
      identity: lab,
      rights: ['cfrsam.v1.Segmentation/*', 'grpc.health.v1.Health/*'],
    });
    fs.writeFileSync(tokenFile, JSON.stringify({ tokens: [grant('lab-a'), grant('lab-b')] }));
    for (const [k, limit] of args['owner-turns'].split(',').map(Number).entries()) {
      await stack.stop();
      stack = await newStack();
      const g = await startGateway(stack, nats.url, slideRoot, `gateway-owners-${limit}`, [
        ...['--slide-jobs-per-owner', String(limit), '--auth-tokens', tokenFile],
      ]);
      const r = await ownerTurns(g.client, { x: RX, y: RY, width: RW, height: RH }, limit, k);
      await stopGateway(g);
      results.ownerTurns.push(r);
      console.log(
        `jobs per owner ${limit || 'unlimited'}: lab B's ROI (1 job) submitted after lab A's ${r.labAJobs} whole slides ` +
          `(${r.labARegions.join(' + ')} regions) was done after ${r.bDoneS.toFixed(1)} s, lab A's jobs then at ${r.labADoneThen.join(', ')} regions`,
      );
    }
  }
  for (const [k, w] of (args.fairness || args['owner-turns'] ? [] : WORKERS).entries()) {
    if (k > 0) {
      await stack.stop();
      stack = await newStack();
    }
    const gws = [];
    for (let i = 0; i < w; i++) gws.push(await startGateway(stack, nats.url, slideRoot, `gateway-${w}-${i}`));
    const r = await runJobs(gws[0].client, { x: RX, y: RY, width: RW, height: RH }, JOBS, `w${w}`);
    const rss = Object.fromEntries(gws.map((g) => [g.name, peakRssMb(g.child.pid)]));
    for (const g of gws) await stopGateway(g);
    const row = {
      workers: w,
      ...r,
      jobsPerHour: (r.jobs / r.wallS) * 3600,
      tissueMpxPerS: r.tissueMpx / r.wallS,
      peakRssMb: { ...rss, ...stageRss(), 'nats-server': peakRssMb(nats.child.pid) },
    };
    results.scaling.push(row);
    const base = results.scaling[0];
    console.log(
      `${w} worker(s): ${r.jobs} jobs, ${r.regions} regions, ${r.nuclei} nuclei, ${r.tissueMpx.toFixed(2)} tissue Mpx in ${r.wallS.toFixed(1)} s: ` +
        `${row.jobsPerHour.toFixed(1)} jobs/h, ${row.tissueMpxPerS.toFixed(4)} tissue Mpx/s (x${(row.tissueMpxPerS / base.tissueMpxPerS).toFixed(2)} of 1 worker), ` +
        `first progress ${r.firstProgressS?.toFixed(1)} s after submit; peak RSS MB ${JSON.stringify(row.peakRssMb)}`,
    );
  }
  if (args.memory && !args['no-memory'] && !args.fairness && !args['owner-turns']) {
    for (const [label, roi] of [
      ['1x', { x: RX, y: RY, width: RW, height: RH }],
      ['4x', { x: RX, y: RY, width: 2 * RW, height: 2 * RH }],
    ]) {
      await stack.stop();
      stack = await newStack();
      const g = await startGateway(stack, nats.url, slideRoot, `gateway-mem-${label}`);
      const r = await runJobs(g.client, roi, 1, `mem-${label}`);
      const rss = peakRssMb(g.child.pid);
      await stopGateway(g);
      results.memory.push({ area: label, regions: r.regions, nuclei: r.nuclei, wallS: r.wallS, gatewayPeakRssMb: rss });
      console.log(
        `memory, ${label} area: ${r.regions} regions, ${r.nuclei} nuclei in ${r.wallS.toFixed(1)} s; fresh gateway (API + worker + finalize) peak RSS ${rss} MB`,
      );
    }
    console.log(`stage processes of the 4x run, peak RSS (MB): ${JSON.stringify({ ...stageRss(), 'nats-server': peakRssMb(nats.child.pid) })}`);
  }
} finally {
  await stack.stop();
  nats.child.kill('SIGTERM');
  await new Promise((r) => (nats.child.exitCode !== null ? r() : nats.child.once('exit', r)));
  fs.rmSync(tmp, { recursive: true, force: true });
}
if (args.json) fs.writeFileSync(args.json, JSON.stringify(results, null, 1) + '\n');
