// Slide jobs by reference over NATS JetStream, with real processes: a real nats-server, the stack's
// prompter, encoder and decoders, and gateway processes started here with --nats-url (each one
// both API and worker), reading the real slides in ../shared/slides from a slide root or a URL.
// A reference job on an ROI of the SVS is compared with the same job when a worker is SIGKILLed
// mid-job, and when nats-server and every gateway restart mid-job: the same nuclei, each once.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as os from 'node:os';
import * as path from 'node:path';
import * as readline from 'node:readline';
import { gunzipSync } from 'node:zlib';
import { Metadata } from '@grpc/grpc-js';
import { connect, type NatsConnection } from 'nats';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeClient, repoRoot, segmentationProto, unary } from '@cfrsam/rpc';
import { natsSkipReason, startTestNatsServer, type TestNatsServer } from '@cfrsam/testing';
import { checkHealth, freePort, listeningPort } from '../services/gateway/dist/cli/stack';
import { startTestStack, type TestStack } from './stack';

const { SlideJobState } = segmentationProto;
const SLIDES = path.resolve(repoRoot(), '../shared/slides');
const SVS = path.join(SLIDES, 'CMU-1-Small-Region.svs');
const OME = path.join(SLIDES, 'derived/CMU-1-Small-Region.crop.ome.tif');
const skip = natsSkipReason() ?? (fs.existsSync(SVS) && fs.existsSync(OME) ? null : `${SLIDES} not found: skipping the slide job tests`);
if (skip) console.warn(skip);

const ACK_WAIT_MS = 3000;
const TASK_WINDOW = 2;
const REGION = 512; // model pixels (0.25 um/px): 256 level-0 pixels of the 0.499 um/px SVS
const ROI = { x: 700, y: 1200, width: 512, height: 512, polygon: [] }; // 2 x 2 regions of tissue
const Job = segmentationProto.SlideJob;
type Client = segmentationProto.SegmentationClient;

interface Gateway {
  name: string;
  port: number;
  client: Client;
  child: ChildProcess;
  exited: Promise<unknown>;
  log: string[];
}

let nats: TestNatsServer;
let stack: TestStack;
let slideRoot: string;
const gateways: Gateway[] = [];

/** A gateway process that is both slide job API and worker. */
/** `probe`: call options (an admin's token) for the readiness probe of a gateway that authenticates. */
async function startGateway(name: string, extra: string[] = [], probe: { metadata?: Metadata } = {}): Promise<Gateway> {
  const child = spawn(
    process.execPath,
    [
      path.join(repoRoot(), 'services/gateway/dist/main.js'),
      // Port 0: the gateway binds a free port and logs it (a port picked here could be taken first).
      ...['--port', '0', '--host', '127.0.0.1', '--bundle', path.join(repoRoot(), 'models/tiny')],
      ...['--prompter', stack.prompter, '--encoder', stack.encoder, '--decoders', stack.decoders.join(',')],
      ...['--nats-url', nats.url, '--slide-root', slideRoot, '--slide-ack-wait-ms', String(ACK_WAIT_MS), '--result-cache-mb', '0'],
      // Two region tasks of a job queued at a time, so the 4-region jobs below run as chains (each
      // region's completion queues the next), through the kills and restarts too.
      ...['--slide-job-window', String(TASK_WINDOW)],
      ...extra,
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  const log: string[] = [];
  let port = 0;
  readline.createInterface({ input: child.stderr!, crlfDelay: Infinity }).on('line', (line) => {
    if (!line) return;
    log.push(line);
    port ||= listeningPort(line) ?? 0;
    if (process.env.CFRSAM_TEST_VERBOSE) process.stderr.write(`[${name}] ${line}\n`);
  });
  const exited = new Promise((resolve) => child.once('exit', resolve));
  const deadline = Date.now() + 30_000;
  for (;;) {
    const state = port ? await checkHealth(`127.0.0.1:${port}`).catch(() => '') : '';
    if (state === 'SERVING') break;
    if (Date.now() > deadline || child.exitCode !== null) {
      child.kill('SIGKILL');
      throw new Error(`gateway ${name} did not start:\n${log.join('\n')}`);
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  const client = makeClient(segmentationProto.SegmentationClient, `127.0.0.1:${port}`);
  // Slide jobs answer UNAVAILABLE until the gateway has set up its NATS streams; then an unknown
  // job is NOT_FOUND. Any other answer (UNAUTHENTICATED without `probe`) would hide that wait.
  for (let i = 0; ; i++) {
    const code = await unary(client, client.getSlideJob, { jobId: '0'.repeat(32) }, probe).then(
      () => 0,
      (err: { code: number }) => err.code,
    );
    if (code === 5) break;
    if (code !== 14 || i > 300) {
      child.kill('SIGKILL');
      throw new Error(`gateway ${name}: slide jobs not ready (gRPC code ${code} for an unknown job):\n${log.join('\n')}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  const gw = { name, port, client, child, exited, log };
  gateways.push(gw);
  return gw;
}

const gatewayAddress = (gw: Gateway) => `127.0.0.1:${gw.port}`;

/** The cfrsam CLI as a separate process. */
function runCli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [path.join(repoRoot(), 'services/gateway/dist/cli/main.js'), ...args], { timeout: 200_000 }, (err, stdout, stderr) =>
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
  });
}

async function kill(gw: Gateway): Promise<void> {
  gw.child.kill('SIGKILL');
  await gw.exited;
  gw.client.close();
  gateways.splice(gateways.indexOf(gw), 1);
}

const submitRequest = (fields: Partial<segmentationProto.SubmitSlideJobRequest>) =>
  segmentationProto.SubmitSlideJobRequest.fromPartial({ regionSize: REGION, ...fields });
const bySlidePath = (p: string) => ({ source: { $case: 'path' as const, value: p } });

async function waitFinished(
  client: () => Client,
  jobId: string,
  onProgress?: (p: segmentationProto.SlideJob) => Promise<void> | void,
  timeoutMs = 150_000,
): Promise<segmentationProto.SlideJob> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const p = await unary(client(), client().getSlideJob, { jobId }, { timeoutMs: 5000 }).catch(() => null);
    if (p && p.state !== SlideJobState.SLIDE_JOB_STATE_QUEUED && p.state !== SlideJobState.SLIDE_JOB_STATE_RUNNING) return p;
    if (p) await onProgress?.(p);
    if (Date.now() > deadline) throw new Error(`job ${jobId} not finished: ${JSON.stringify(p && Job.toJSON(p))}`);
    await new Promise((r) => setTimeout(r, 150));
  }
}

/** Every nucleus of a done job through StreamSlideJobNuclei, resuming from page tokens. */
async function streamNuclei(client: Client, jobId: string, pageSize = 40): Promise<{ nuclei: segmentationProto.Nucleus[]; pages: number }> {
  const nuclei: segmentationProto.Nucleus[] = [];
  let pages = 0;
  let token = '';
  // Two pages per call, then resume: the token of the last page continues where it left off.
  for (;;) {
    const call = client.streamSlideJobNuclei({ jobId, pageSize, pageToken: token });
    let taken = 0;
    let last = '';
    for await (const page of call as AsyncIterable<segmentationProto.SlideJobNucleiPage>) {
      nuclei.push(...page.nuclei);
      pages++;
      last = page.nextPageToken;
      if (++taken === 2 && last) {
        call.cancel();
        break;
      }
    }
    if (!last) return { nuclei, pages };
    token = last;
  }
}

async function download(client: Client, jobId: string, name: string): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of client.downloadSlideJobArtefact({ jobId, name }) as AsyncIterable<segmentationProto.FileChunk>)
    chunks.push(Buffer.from(c.data));
  return Buffer.concat(chunks);
}

const key = (n: segmentationProto.Nucleus) => `${n.centroid!.x.toFixed(1)},${n.centroid!.y.toFixed(1)}`;

function bboxIou(a: segmentationProto.BoundingBox, b: segmentationProto.BoundingBox): number {
  const iw = Math.max(0, Math.min(a.x1, b.x1) - Math.max(a.x0, b.x0));
  const ih = Math.max(0, Math.min(a.y1, b.y1) - Math.max(a.y0, b.y0));
  const inter = iw * ih;
  const area = (r: segmentationProto.BoundingBox) => (r.x1 - r.x0) * (r.y1 - r.y0);
  return inter / (area(a) + area(b) - inter);
}

function expectEachOnce(nuclei: segmentationProto.Nucleus[]): void {
  expect(nuclei.map((n) => n.id)).toEqual(nuclei.map((_, i) => i + 1));
  for (let i = 0; i < nuclei.length; i++) {
    for (let j = i + 1; j < nuclei.length; j++) {
      expect(bboxIou(nuclei[i].bbox!, nuclei[j].bbox!), `nuclei ${nuclei[i].id} and ${nuclei[j].id}`).toBeLessThanOrEqual(0.5);
    }
  }
}

async function consumerInfo(nc: NatsConnection) {
  const jsm = await nc.jetstreamManager();
  return jsm.consumers.info('cfrsam-slide-tasks', 'cfrsam-slide-workers');
}

describe.skipIf(!!skip)('slide jobs by reference (NATS JetStream, real slides)', () => {
  let reference: { jobId: string; nuclei: segmentationProto.Nucleus[]; ms: number };

  beforeAll(async () => {
    slideRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'cfrsam-slide-root-'));
    fs.copyFileSync(SVS, path.join(slideRoot, 'CMU-1.svs'));
    fs.mkdirSync(path.join(slideRoot, 'bad'));
    // A truncated SVS (its directory points past the end) and a file that is no slide.
    fs.writeFileSync(path.join(slideRoot, 'bad/truncated.svs'), fs.readFileSync(SVS).subarray(0, 300_000));
    fs.writeFileSync(path.join(slideRoot, 'bad/notes.svs'), 'not a slide\n'.repeat(100));
    fs.writeFileSync(path.join(os.tmpdir(), 'cfrsam-outside.svs'), 'x');
    nats = await startTestNatsServer();
    stack = await startTestStack({ decoders: 1 });
    await startGateway('g1');
  }, 180_000);

  afterAll(async () => {
    for (const gw of [...gateways]) await kill(gw);
    await stack?.close();
    await nats?.dispose();
    if (slideRoot) fs.rmSync(slideRoot, { recursive: true, force: true });
  });

  it('answers bad input with a status naming the problem', async () => {
    const { client } = gateways[0];
    const submit = (fields: Partial<segmentationProto.SubmitSlideJobRequest>) => unary(client, client.submitSlideJob, submitRequest(fields));
    await expect(submit({ slide: bySlidePath('../cfrsam-outside.svs') })).rejects.toMatchObject({
      code: 3,
      details: expect.stringMatching(/leaves the slide root/),
    });
    await expect(submit({ slide: bySlidePath('/etc/passwd') })).rejects.toMatchObject({
      code: 3,
      details: expect.stringMatching(/relative to the slide root/),
    });
    await expect(submit({ slide: bySlidePath('missing.svs') })).rejects.toMatchObject({ code: 5, details: expect.stringMatching(/does not exist/) });
    const closed = await freePort();
    await expect(submit({ slide: { source: { $case: 'url', value: `http://127.0.0.1:${closed}/a.svs` } } })).rejects.toMatchObject({
      code: 5,
      details: expect.stringMatching(/cannot reach the URL/),
    });
    await expect(submit({ slide: { source: { $case: 'url', value: 'ftp://example.org/a.svs' } } })).rejects.toMatchObject({ code: 3 });
    await expect(submit({ slide: bySlidePath('CMU-1.svs'), roi: { x: 5000, y: 5000, width: 100, height: 100, polygon: [] } })).rejects.toMatchObject({
      code: 3,
      details: expect.stringMatching(/outside the slide/),
    });
    await expect(submit({ slide: bySlidePath('bad/truncated.svs') })).rejects.toMatchObject({
      code: 3,
      details: expect.stringMatching(/truncated|corrupt/),
    });
    await expect(submit({ slide: bySlidePath('bad/notes.svs') })).rejects.toMatchObject({
      code: 3,
      details: expect.stringMatching(/unknown slide format/),
    });
    await expect(submit({})).rejects.toMatchObject({ code: 3, details: expect.stringMatching(/no slide given/) });
    await expect(submit({ slide: bySlidePath('CMU-1.svs'), regionSize: 100 })).rejects.toMatchObject({ code: 3 });
    const unknown = '0123456789abcdef0123456789abcdef';
    await expect(unary(client, client.getSlideJob, { jobId: unknown })).rejects.toMatchObject({ code: 5 });
    await expect(unary(client, client.cancelSlideJob, { jobId: 'nope' })).rejects.toMatchObject({ code: 5 });
    await expect(streamNuclei(client, unknown)).rejects.toMatchObject({ code: 5 });
    // The gateway is still serving.
    expect((await unary(client, client.listSlideJobs, { pageSize: 0, pageToken: '' })).jobs).toEqual([]);
  });

  it('runs a job on an ROI of the SVS: progress, each nucleus once, paged nuclei and artefacts; the same request id is one job', async () => {
    const { client } = gateways[0];
    const t0 = Date.now();
    const first = await unary(client, client.submitSlideJob, submitRequest({ slide: bySlidePath('CMU-1.svs'), roi: ROI, requestId: 'reference-1' }));
    const again = await unary(client, client.submitSlideJob, submitRequest({ slide: bySlidePath('CMU-1.svs'), roi: ROI, requestId: 'reference-1' }));
    expect(first).toMatchObject({ regions: 4, created: true });
    expect(again).toEqual({ ...first, created: false });
    const seen: segmentationProto.SlideJob[] = [];
    const done = await waitFinished(
      () => client,
      first.jobId,
      (p) => void seen.push(p),
    );
    const ms = Date.now() - t0;
    expect(done).toMatchObject({
      state: SlideJobState.SLIDE_JOB_STATE_DONE,
      tilesTotal: 4,
      tilesDone: 4,
      requestId: 'reference-1',
      source: 'CMU-1.svs',
    });
    expect(done.tissueMpxTotal).toBeGreaterThan(0.5);
    expect(done.tissueMpxPerS).toBeGreaterThan(0);
    const running = seen.filter((p) => p.tilesDone > 0 && p.tilesDone < 4);
    expect(running.length).toBeGreaterThan(0);
    expect(running.every((p) => p.tissueMpxPerS > 0 && p.etaS >= 0 && p.nuclei > 0)).toBe(true);

    const { nuclei, pages } = await streamNuclei(client, first.jobId);
    expect(nuclei.length).toBe(done.nuclei);
    expect(nuclei.length).toBeGreaterThan(50);
    expect(pages).toBeGreaterThan(2);
    expectEachOnce(nuclei);
    for (const n of nuclei) {
      expect(n.centroid!.x).toBeGreaterThanOrEqual(ROI.x);
      expect(n.centroid!.x).toBeLessThan(ROI.x + ROI.width);
      expect(n.centroid!.y).toBeGreaterThanOrEqual(ROI.y);
      expect(n.centroid!.y).toBeLessThan(ROI.y + ROI.height);
    }
    const whole = await unary(client, client.getSlideJobResult, { jobId: first.jobId });
    expect(whole.nuclei.map(key)).toEqual(nuclei.map(key));

    const geojson = JSON.parse(gunzipSync(await download(client, first.jobId, 'nuclei.geojson.gz')).toString()) as { features: unknown[] };
    expect(geojson.features.length).toBe(nuclei.length);
    const csv = (await download(client, first.jobId, 'nuclei.csv')).toString().trim().split('\n');
    expect(csv.length - 1).toBe(nuclei.length);
    const summary = JSON.parse((await download(client, first.jobId, 'summary.json')).toString()) as {
      nuclei: number;
      tiles: { model: number; blurred: number };
      blurredRegions: unknown[];
    };
    expect(summary.nuclei).toBe(nuclei.length);
    // The focus check, summed over the regions: in the job and its summary alike.
    expect(done.modelTiles).toBeGreaterThanOrEqual(4);
    expect(summary.tiles).toEqual({ model: done.modelTiles, blurred: done.blurredTiles });
    expect(done.blurredTiles).toBeLessThanOrEqual(done.modelTiles);
    expect(summary.blurredRegions.length).toBeLessThanOrEqual(4);
    const list = await unary(client, client.listSlideJobs, { pageSize: 10, pageToken: '' });
    expect(list.jobs.map((j) => j.jobId)).toEqual([first.jobId]);
    await expect(unary(client, client.cancelSlideJob, { jobId: first.jobId })).rejects.toMatchObject({
      code: 9,
      details: expect.stringMatching(/DONE already/),
    });
    reference = { jobId: first.jobId, nuclei, ms };
    console.log(`slide job, SVS ROI ${ROI.width}x${ROI.height} in 4 regions: ${ms} ms, ${nuclei.length} nuclei in ${pages} pages`);
  }, 240_000);

  it('finishes a job whose worker is SIGKILLed mid-job with the same nuclei as the clean run', async () => {
    const g2 = await startGateway('g2');
    const nc = await connect({ servers: nats.url });
    const { client } = gateways[0];
    const job = await unary(client, client.submitSlideJob, submitRequest({ slide: bySlidePath('CMU-1.svs'), roi: ROI }));
    let killed = false;
    const t0 = Date.now();
    const done = await waitFinished(
      () => client,
      job.jobId,
      async () => {
        // Kill g2 while both gateways hold a region, so a region certainly dies with it.
        if (killed || (await consumerInfo(nc)).num_ack_pending < 2) return;
        killed = true;
        await kill(g2);
      },
    );
    await nc.close();
    if (!killed) await kill(g2);
    expect(killed).toBe(true);
    expect(done.state).toBe(SlideJobState.SLIDE_JOB_STATE_DONE);
    const { nuclei } = await streamNuclei(client, job.jobId);
    expect(nuclei.map(key).sort()).toEqual(reference.nuclei.map(key).sort());
    expectEachOnce(nuclei);
    console.log(`slide job with a worker killed: ${Date.now() - t0} ms (reference ${reference.ms} ms)`);
  }, 240_000);

  it('finishes a job when nats-server and every gateway restart mid-job', async () => {
    const nc = await connect({ servers: nats.url, maxReconnectAttempts: -1, reconnectTimeWait: 200 });
    const g1 = gateways[0];
    const job = await unary(g1.client, g1.client.submitSlideJob, submitRequest({ slide: bySlidePath('CMU-1.svs'), roi: ROI }));
    let p = await waitFinished(
      () => g1.client,
      job.jobId,
      async (q) => {
        if (q.tilesDone >= 2) throw Object.assign(new Error('restart now'), { progress: q });
      },
    ).catch((err: { progress?: segmentationProto.SlideJob }) => {
      if (!err.progress) throw err;
      return err.progress;
    });
    expect(p.state).toBe(SlideJobState.SLIDE_JOB_STATE_RUNNING);
    await nc.close();
    await kill(g1);
    await nats.stop();
    nats = await startTestNatsServer({ port: nats.port, storeDir: nats.storeDir });
    const g3 = await startGateway('g3');
    p = await waitFinished(() => g3.client, job.jobId);
    expect(p.state).toBe(SlideJobState.SLIDE_JOB_STATE_DONE);
    const { nuclei } = await streamNuclei(g3.client, job.jobId);
    expect(nuclei.map(key).sort()).toEqual(reference.nuclei.map(key).sort());
    expectEachOnce(nuclei);
    // The jobs from before the restart are still listed (newest first), 2 per page.
    const page1 = await unary(g3.client, g3.client.listSlideJobs, { pageSize: 2, pageToken: '' });
    const page2 = await unary(g3.client, g3.client.listSlideJobs, { pageSize: 2, pageToken: page1.nextPageToken });
    expect([...page1.jobs, ...page2.jobs].map((j) => j.jobId)).toContain(reference.jobId);
    expect(page1.jobs[0].jobId).toBe(job.jobId);
    expect(page2.nextPageToken).toBe('');
  }, 240_000);

  it('a gateway that stays up while nats-server restarts reconnects and finishes its job', async () => {
    const gw = gateways[0];
    const small = { x: 700, y: 1200, width: 256, height: 256, polygon: [] };
    const job = await unary(gw.client, gw.client.submitSlideJob, submitRequest({ slide: bySlidePath('CMU-1.svs'), roi: small }));
    await nats.stop();
    // While NATS is away the job API answers UNAVAILABLE-like errors, never crashes the gateway.
    await expect(unary(gw.client, gw.client.getSlideJob, { jobId: job.jobId }, { timeoutMs: 3000 })).rejects.toBeDefined();
    nats = await startTestNatsServer({ port: nats.port, storeDir: nats.storeDir });
    const done = await waitFinished(() => gw.client, job.jobId);
    expect(done.state, done.error).toBe(SlideJobState.SLIDE_JOB_STATE_DONE);
    expect(done.nuclei).toBeGreaterThan(0);
    expect(gw.child.exitCode).toBeNull();
  }, 120_000);

  it('cancels a running job: its work stops within seconds and its results are deleted', async () => {
    const gw = gateways[0];
    const nc = await connect({ servers: nats.url });
    const big = { x: 300, y: 800, width: 1536, height: 1024, polygon: [] }; // 24 regions
    const job = await unary(gw.client, gw.client.submitSlideJob, submitRequest({ slide: bySlidePath('CMU-1.svs'), roi: big }));
    expect(job.regions).toBeGreaterThan(12);
    await waitFinished(
      () => gw.client,
      job.jobId,
      (q) => {
        if (q.tilesDone >= 1) throw Object.assign(new Error('cancel now'), { progress: q });
      },
    ).catch((err: { progress?: unknown }) => {
      if (!err.progress) throw err;
    });
    const cancelled = await unary(gw.client, gw.client.cancelSlideJob, { jobId: job.jobId });
    expect(cancelled.state).toBe(SlideJobState.SLIDE_JOB_STATE_CANCELLED);
    // The queue holds no task of the job any more, and the worker abandons the region it holds.
    const t0 = Date.now();
    const info = await consumerInfo(nc);
    expect(info.num_pending).toBe(0);
    const abandoned = new RegExp(`job ${job.jobId} region \\d+ abandoned`);
    // Any gateway may hold the region in flight: every one of them is a worker, and it abandons
    // the region when it sees the cancel. A region that finished just before the cancel leaves
    // nothing to abandon; either way no region of the job completes afterwards (checked below).
    const abandonment = () => gateways.flatMap((g) => g.log).find((l) => abandoned.test(l));
    while (!abandonment() && Date.now() - t0 < 15_000) await new Promise((r) => setTimeout(r, 100));
    const stoppedMs = Date.now() - t0;
    const doneAtCancel = (await unary(gw.client, gw.client.getSlideJob, { jobId: job.jobId })).tilesDone;
    await new Promise((r) => setTimeout(r, 1500));
    const later = await unary(gw.client, gw.client.getSlideJob, { jobId: job.jobId });
    expect(later).toMatchObject({ state: SlideJobState.SLIDE_JOB_STATE_CANCELLED, tilesDone: doneAtCancel });
    const os = await nc.jetstream().views.os('cfrsam-slide-results');
    const left = (await os.list()).filter((o) => o.name.includes(job.jobId));
    expect(left).toEqual([]);
    // Cancelling again answers the cancelled job.
    expect((await unary(gw.client, gw.client.cancelSlideJob, { jobId: job.jobId })).state).toBe(SlideJobState.SLIDE_JOB_STATE_CANCELLED);
    await nc.close();
    console.log(
      `cancel: ${abandonment() ? `the region in flight abandoned ${stoppedMs} ms after CancelSlideJob returned: ${abandonment()}` : 'no region was in flight'}`,
    );
  }, 240_000);

  it('lets a small job submitted behind a whole slide run before the slide is done (the task window)', async () => {
    const gw = gateways[0];
    const t0 = Date.now();
    const slide = await unary(gw.client, gw.client.submitSlideJob, submitRequest({ slide: bySlidePath('CMU-1.svs') }));
    expect(slide.regions).toBeGreaterThan(6 * TASK_WINDOW);
    const small = { x: 700, y: 1200, width: 256, height: 256, polygon: [] }; // one region
    const t1 = Date.now();
    const job = await unary(gw.client, gw.client.submitSlideJob, submitRequest({ slide: bySlidePath('CMU-1.svs'), roi: small }));
    const done = await waitFinished(() => gw.client, job.jobId);
    const smallMs = Date.now() - t1;
    expect(done.state, done.error).toBe(SlideJobState.SLIDE_JOB_STATE_DONE);
    const behind = await unary(gw.client, gw.client.getSlideJob, { jobId: slide.jobId });
    // Queued first in, first out, every task of the slide would have run first. With the window the
    // small job's task is queued behind the slide's first TASK_WINDOW tasks and the successors of
    // those that finish while it waits: a few regions, whichever gateway works.
    expect(behind.tilesDone).toBeLessThanOrEqual(3 * TASK_WINDOW);
    expect(behind.state).toBe(SlideJobState.SLIDE_JOB_STATE_RUNNING);
    await unary(gw.client, gw.client.cancelSlideJob, { jobId: slide.jobId });
    console.log(
      `task window ${TASK_WINDOW}: a 1-region job submitted behind a ${slide.regions}-region slide done after ${smallMs} ms, ` +
        `the slide at ${behind.tilesDone} regions (${Date.now() - t0} ms since its submit)`,
    );
  }, 240_000);

  it("parks an owner's third job until one of its two running jobs finishes", async () => {
    const gw = gateways[0];
    const nc = await connect({ servers: nats.url });
    const kv = await nc.jetstream().views.kv('cfrsam-slide-jobs');
    const record = async (id: string) => JSON.parse((await kv.get(`job.${id}`))!.string()) as { parked?: boolean };
    const small = (x: number) => submitRequest({ slide: bySlidePath('CMU-1.svs'), roi: { x, y: 1200, width: 256, height: 256, polygon: [] } });
    // One owner (every anonymous caller here): the whole slide, then two one-region jobs.
    const slide = await unary(gw.client, gw.client.submitSlideJob, submitRequest({ slide: bySlidePath('CMU-1.svs') }));
    const second = await unary(gw.client, gw.client.submitSlideJob, small(700));
    const third = await unary(gw.client, gw.client.submitSlideJob, small(956));
    expect((await record(second.jobId)).parked).toBeFalsy();
    expect((await record(third.jobId)).parked).toBe(true);
    // ... and says so to its owner.
    const waiting = await unary(gw.client, gw.client.getSlideJob, { jobId: third.jobId });
    expect(waiting).toMatchObject({ state: SlideJobState.SLIDE_JOB_STATE_QUEUED, waitingForOwner: true, tilesDone: 0 });
    expect((await unary(gw.client, gw.client.getSlideJob, { jobId: second.jobId })).waitingForOwner).toBe(false);
    // The second runs beside the slide; the third waits for it, then runs beside the slide too.
    const secondDone = await waitFinished(() => gw.client, second.jobId);
    expect(secondDone.state, secondDone.error).toBe(SlideJobState.SLIDE_JOB_STATE_DONE);
    const thirdDone = await waitFinished(() => gw.client, third.jobId);
    expect(thirdDone.state, thirdDone.error).toBe(SlideJobState.SLIDE_JOB_STATE_DONE);
    expect((await record(third.jobId)).parked).toBe(false);
    expect(thirdDone.waitingForOwner).toBe(false);
    const behind = await unary(gw.client, gw.client.getSlideJob, { jobId: slide.jobId });
    expect(behind.state).toBe(SlideJobState.SLIDE_JOB_STATE_RUNNING);
    await unary(gw.client, gw.client.cancelSlideJob, { jobId: slide.jobId });
    await nc.close();
    console.log(`owner's turns: the parked third job done with the slide at ${behind.tilesDone} of ${slide.regions} regions`);
  }, 240_000);

  it('streams an upload into the slide root: an interrupted upload is continued by the retry (the CLI), a bad checksum or size leaves nothing', async () => {
    const { client } = gateways[0];
    const bytes = fs.readFileSync(SVS);
    const sha256 = createHash('sha256').update(bytes).digest('hex');
    const uploads = path.join(slideRoot, 'uploads');
    // Interrupted: the first 256 KiB, then (once they are on disk) the client goes away.
    const partial = `.partial-${sha256}-${bytes.length}`;
    await new Promise<void>((resolve) => {
      const call = client.uploadSlide(() => resolve());
      call.write({ name: 'CMU-1.svs', size: bytes.length, sha256, offset: 0, data: bytes.subarray(0, 1 << 17) });
      call.write({ name: '', size: 0, sha256: '', offset: 0, data: bytes.subarray(1 << 17, 1 << 18) });
      const t0 = Date.now();
      const poll = setInterval(() => {
        const size = fs.existsSync(path.join(uploads, partial)) ? fs.statSync(path.join(uploads, partial)).size : 0;
        if (size >= 1 << 18 || Date.now() - t0 > 10_000) {
          clearInterval(poll);
          call.cancel();
        }
      }, 50);
    });
    await new Promise((r) => setTimeout(r, 300));
    // What arrived is kept for the retry, and the gateway says how much.
    expect(fs.readdirSync(uploads)).toEqual([partial]);
    const held = await unary(client, client.getUploadStatus, { sha256, size: bytes.length });
    expect(held.uploadId).toBe('');
    expect(Number(held.received)).toBe(1 << 18);
    expect(Number(held.received)).toBe(fs.statSync(path.join(uploads, partial)).size);
    // Continuing at another offset than the one held is refused.
    await expect(
      new Promise((resolve, reject) => {
        const call = client.uploadSlide((err, res) => (err ? reject(err) : resolve(res)));
        call.write({ name: 'CMU-1.svs', size: bytes.length, sha256, offset: 12345, data: bytes.subarray(12345, 20000) });
        call.end();
      }),
    ).rejects.toMatchObject({ code: 9, details: expect.stringMatching(/holds \d+ bytes/) });
    // A wrong checksum.
    await expect(
      new Promise((resolve, reject) => {
        const call = client.uploadSlide((err, res) => (err ? reject(err) : resolve(res)));
        call.write({ name: 'CMU-1.svs', size: bytes.length, sha256: '0'.repeat(64), offset: 0, data: bytes });
        call.end();
      }),
    ).rejects.toMatchObject({ code: 3, details: expect.stringMatching(/checksum mismatch/) });
    // Over the announced size.
    await expect(
      new Promise((resolve, reject) => {
        const call = client.uploadSlide((err, res) => (err ? reject(err) : resolve(res)));
        call.write({ name: 'CMU-1.svs', size: 10, sha256, offset: 0, data: bytes.subarray(0, 100) });
        call.end();
      }),
    ).rejects.toMatchObject({ code: 3, details: expect.stringMatching(/longer than the 10 bytes/) });
    expect(fs.readdirSync(uploads)).toEqual([partial]);
    // A small image sent as bytes is kept as an upload too (content-addressed; no resolution in
    // a PNG, so the request gives it).
    const png = fs.readFileSync(path.join(repoRoot(), 'samples/synthetic-he-512.png'));
    await expect(unary(client, client.submitSlideJob, submitRequest({ image: png }))).rejects.toMatchObject({
      code: 3,
      details: expect.stringMatching(/resolution|mpp/i),
    });
    const byBytes = await unary(client, client.submitSlideJob, submitRequest({ image: png, mpp: 0.25 }));
    expect(byBytes.regions).toBe(1);
    const pngId = createHash('sha256').update(png).digest('hex');
    expect((await unary(client, client.cancelSlideJob, { jobId: byBytes.jobId })).source).toBe(`upload:${pngId}`);
    fs.rmSync(path.join(uploads, pngId));
    // The retry, through the CLI, then a job on the upload. Another upload of the file is running
    // (its stream open, so the gateway holds the file's lock): the CLI waits for it to end, then
    // continues from what it left.
    const from = Number(held.received);
    const other = client.uploadSlide(() => undefined);
    other.write({ name: 'CMU-1.svs', size: bytes.length, sha256, offset: from, data: bytes.subarray(from, from + 4096) });
    for (let i = 0; fs.statSync(path.join(uploads, partial)).size < from + 4096 && i < 100; i++) await new Promise((r) => setTimeout(r, 100));
    const cli = (...args: string[]) => runCli(['slide', ...args, '--gateway', gatewayAddress(gateways[0])]);
    const uploading = cli('upload', SVS);
    await new Promise((r) => setTimeout(r, 4000));
    other.cancel();
    const up = await uploading;
    expect(up.code, up.stderr).toBe(0);
    expect(up.stderr).toContain(`another upload of ${SVS} is in progress; waiting for it to end`);
    expect(up.stderr).toContain(`resuming the upload of ${SVS} at byte ${from + 4096}`);
    expect(up.stdout.trim()).toBe(`${sha256}.svs`);
    expect(fs.readFileSync(path.join(uploads, `${sha256}.svs`)).equals(bytes)).toBe(true);
    const sub = await cli('submit', '--upload', SVS, '--roi', '700,1200,256,256', '--region-size', String(REGION), '--request-id', 'upload-1');
    expect(sub.code, sub.stderr).toBe(0);
    const jobId = sub.stdout.trim();
    const st = await cli('status', jobId, '--wait');
    expect(st.code, st.stderr).toBe(0);
    expect(st.stdout).toMatch(new RegExp(`^${jobId} DONE, 1/1 regions, \\d+ nuclei`));
    expect(st.stdout).toContain(`upload:${sha256}.svs`);
    expect(st.stdout).toMatch(/, \d+ of [1-9]\d* model tiles blurred, /);
    const again = await cli('submit', '--upload', SVS, '--roi', '700,1200,256,256', '--region-size', String(REGION), '--request-id', 'upload-1');
    expect(again.stdout.trim()).toBe(jobId);
    const out = fs.mkdtempSync(path.join(os.tmpdir(), 'cfrsam-job-out-'));
    try {
      const res = await cli('result', jobId, '--out', out);
      expect(res.code, res.stderr).toBe(0);
      expect(fs.readdirSync(out).sort()).toEqual([`${jobId}.csv`, `${jobId}.geojson.gz`, `${jobId}.summary.json`]);
      const summary = JSON.parse(fs.readFileSync(path.join(out, `${jobId}.summary.json`), 'utf8')) as { nuclei: number; regions: number };
      expect(summary.regions).toBe(1);
      const list = await cli('list', '--page-size', '1');
      expect(list.stdout.split('\n')[0]).toMatch(new RegExp(`^${jobId} DONE`));
      const cancel = await cli('cancel', jobId);
      expect(cancel.code).toBe(2);
      expect(cancel.stderr).toMatch(/DONE already/);
    } finally {
      fs.rmSync(out, { recursive: true, force: true });
    }
  }, 240_000);

  it('reads a slide by URL with range requests: a small ROI fetches a fraction of the file', async () => {
    const size = fs.statSync(OME).size;
    let served = 0;
    let whole = 0;
    let requests = 0;
    const server = http.createServer((req, res) => {
      requests++;
      const m = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '');
      if (!m) {
        whole++;
        res.writeHead(200, { 'content-length': size });
        fs.createReadStream(OME).pipe(res);
        return;
      }
      const from = Number(m[1]);
      const to = Math.min(size - 1, Number(m[2]));
      served += to - from + 1;
      res.writeHead(206, { 'content-range': `bytes ${from}-${to}/${size}`, 'content-length': to - from + 1 });
      fs.createReadStream(OME, { start: from, end: to }).pipe(res);
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const url = `http://127.0.0.1:${(server.address() as { port: number }).port}/slides/crop.ome.tif?X-Signature=secret`;
    try {
      const gw = await startGateway('g-url', ['--slide-tissue-max-side', '256']);
      const job = await unary(
        gw.client,
        gw.client.submitSlideJob,
        submitRequest({ slide: { source: { $case: 'url', value: url } }, roi: { x: 300, y: 300, width: 128, height: 128, polygon: [] } }),
      );
      expect(job.regions).toBe(1);
      const done = await waitFinished(() => gw.client, job.jobId);
      expect(done.state, done.error).toBe(SlideJobState.SLIDE_JOB_STATE_DONE);
      expect(done.source).not.toContain('secret');
      expect(done.nuclei).toBeGreaterThan(0);
      expect(whole).toBe(0);
      console.log(
        `URL job: ${served} of ${size} bytes read over HTTP in ${requests} range requests (${((100 * served) / size).toFixed(1)} %), ${done.nuclei} nuclei`,
      );
      // Headers and the tile directory (read by the planning and the working gateway), one tile of a
      // low level for the tissue mask and the one level-0 tile under the ROI: not the 16 level-0 tiles.
      expect(served).toBeLessThan(size * 0.4);
      // A gateway restricted to other URL prefixes refuses it.
      const strict = await startGateway('g-strict', ['--slide-url-prefixes', 'https://slides.example.org/,https://bucket.example.org/']);
      await expect(
        unary(strict.client, strict.client.submitSlideJob, submitRequest({ slide: { source: { $case: 'url', value: url } } })),
      ).rejects.toMatchObject({ code: 7, details: expect.stringMatching(/outside the prefixes/) });
      await kill(strict);
      await kill(gw);
    } finally {
      server.close();
    }
  }, 240_000);

  it('with authentication, a caller sees and cancels only its own jobs (an admin sees all)', async () => {
    const tokens = { alice: 'alice-token-0123456789', bob: 'bob-token-0123456789', admin: 'admin-token-0123456789' };
    const tokenFile = path.join(slideRoot, '..', `cfrsam-tokens-${process.pid}.json`);
    const grant = (identity: keyof typeof tokens, rights: string[]) => ({
      sha256: createHash('sha256').update(tokens[identity]).digest('hex'),
      identity,
      rights,
    });
    fs.writeFileSync(
      tokenFile,
      JSON.stringify({ tokens: [grant('alice', ['cfrsam.v1.Segmentation/*']), grant('bob', ['cfrsam.v1.Segmentation/*']), grant('admin', ['*'])] }),
    );
    const adminProbe = new Metadata();
    adminProbe.set('authorization', `Bearer ${tokens.admin}`);
    const gw = await startGateway('g-auth', ['--auth-tokens', tokenFile, '--slide-workers', '0'], { metadata: adminProbe });
    try {
      const as = (who: keyof typeof tokens) => {
        const metadata = new Metadata();
        metadata.set('authorization', `Bearer ${tokens[who]}`);
        return { metadata };
      };
      const request = submitRequest({
        slide: bySlidePath('CMU-1.svs'),
        roi: { x: 700, y: 1200, width: 256, height: 256, polygon: [] },
        requestId: 'mine',
      });
      const alice = await unary(gw.client, gw.client.submitSlideJob, request, as('alice'));
      const bob = await unary(gw.client, gw.client.submitSlideJob, request, as('bob'));
      expect(bob.created).toBe(true); // request ids are per caller
      expect(bob.jobId).not.toBe(alice.jobId);
      await expect(unary(gw.client, gw.client.getSlideJob, { jobId: alice.jobId }, as('bob'))).rejects.toMatchObject({ code: 5 });
      await expect(unary(gw.client, gw.client.cancelSlideJob, { jobId: alice.jobId }, as('bob'))).rejects.toMatchObject({ code: 5 });
      const listOf = async (who: keyof typeof tokens) =>
        (await unary(gw.client, gw.client.listSlideJobs, { pageSize: 100, pageToken: '' }, as(who))).jobs.map((j) => j.jobId);
      expect(await listOf('bob')).toEqual([bob.jobId]);
      expect(await listOf('alice')).toEqual([alice.jobId]);
      expect(await listOf('admin')).toEqual(expect.arrayContaining([alice.jobId, bob.jobId]));
      await expect(unary(gw.client, gw.client.listSlideJobs, { pageSize: 1, pageToken: '' })).rejects.toMatchObject({ code: 16 });
      // The owner and an admin may cancel. The other tests' gateways are workers on the same
      // queue and may already have finished these small jobs: then the cancel is refused as
      // FAILED_PRECONDITION ("DONE already"), which still shows the caller was let act on the job
      // (a stranger gets NOT_FOUND, above).
      const cancelAs = (jobId: string, who: keyof typeof tokens) =>
        unary(gw.client, gw.client.cancelSlideJob, { jobId }, as(who)).then(
          (job) => (job.state === SlideJobState.SLIDE_JOB_STATE_CANCELLED ? 'cancelled' : `state ${job.state}`),
          (err: { code?: number; details?: string }) =>
            err.code === 9 && /DONE already/.test(err.details ?? '') ? 'done already' : `error ${err.code}`,
        );
      expect(['cancelled', 'done already']).toContain(await cancelAs(alice.jobId, 'alice'));
      expect(['cancelled', 'done already']).toContain(await cancelAs(bob.jobId, 'admin'));
    } finally {
      await kill(gw);
      fs.rmSync(tokenFile, { force: true });
    }
  }, 60_000);

  it('removes finished jobs with their results after the retention time', async () => {
    const g = gateways[0];
    const before = await unary(g.client, g.client.listSlideJobs, { pageSize: 100, pageToken: '' });
    expect(before.jobs.length).toBeGreaterThan(0);
    // A gateway that keeps finished jobs 2 s (and runs no regions) sweeps them all.
    const sweeper = await startGateway('g-ttl', ['--slide-job-ttl-s', '2', '--slide-workers', '0']);
    const t0 = Date.now();
    for (;;) {
      const left = await unary(g.client, g.client.listSlideJobs, { pageSize: 100, pageToken: '' });
      if (left.jobs.length === 0) break;
      expect(Date.now() - t0, JSON.stringify(left.jobs.map((j) => j.jobId))).toBeLessThan(20_000);
      await new Promise((r) => setTimeout(r, 250));
    }
    await expect(unary(g.client, g.client.getSlideJob, { jobId: before.jobs[0].jobId })).rejects.toMatchObject({ code: 5 });
    const nc = await connect({ servers: nats.url });
    const objects = await (await nc.jetstream().views.os('cfrsam-slide-results')).list();
    expect(objects.map((o) => o.name)).toEqual([]);
    await nc.close();
    await kill(sweeper);
  }, 60_000);
});
