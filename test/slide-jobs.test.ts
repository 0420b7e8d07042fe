// Slide jobs over a NATS JetStream work queue: a real nats-server, the stack's gateway and a second
// gateway process sharing it. A reference job runs on one gateway; the same job then runs on two,
// one of which is SIGKILLed mid-job: its unacked region goes to the survivor after the ack wait,
// and the stitched result has the same nuclei, each once.
import { spawn, type ChildProcess } from 'node:child_process';
import * as path from 'node:path';
import { connect } from 'nats';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { repoRoot, segmentationProto, unary } from '@cfrsam/rpc';
import { natsSkipReason, startTestNatsServer, type TestNatsServer } from '@cfrsam/testing';
import { checkHealth, freePort } from '../services/gateway/dist/cli/stack';
import { startTestStack, type TestStack } from './stack';
import { blobGrid, syntheticPng } from './synthetic';

const { SlideJobState } = segmentationProto;
const skip = natsSkipReason();
if (skip) console.warn(skip);

const WIDTH = 1500;
const HEIGHT = 1000;
const REGION = 512;
const ACK_WAIT_MS = 3000;

let nats: TestNatsServer;
let stack: TestStack;
let image: Buffer;

function slideArgs(url: string): string[] {
  return ['--nats-url', url, '--slide-ack-wait-ms', String(ACK_WAIT_MS)];
}

async function startSecondGateway(): Promise<{ child: ChildProcess; exited: Promise<unknown> }> {
  const port = await freePort();
  const child = spawn(
    process.execPath,
    [
      path.join(repoRoot(), 'services/gateway/dist/main.js'),
      ...['--port', String(port), '--host', '127.0.0.1', '--bundle', path.join(repoRoot(), 'models/tiny')],
      ...['--prompter', stack.prompter, '--encoder', stack.encoder, '--decoders', stack.decoders.join(',')],
      ...slideArgs(nats.url),
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  child.stderr!.resume();
  const exited = new Promise((resolve) => child.once('exit', resolve));
  const deadline = Date.now() + 30_000;
  for (;;) {
    const state = await checkHealth(`127.0.0.1:${port}`).catch(() => '');
    if (state === 'SERVING') break;
    if (Date.now() > deadline || child.exitCode !== null) {
      child.kill('SIGKILL');
      throw new Error('the second gateway did not start');
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  return { child, exited };
}

const submit = () =>
  unary(stack.segmentation, stack.segmentation.submitSlideJob, { image, regionSize: REGION, minScore: 0, mpp: 0, returnMasks: false });
const progress = (jobId: string) => unary(stack.segmentation, stack.segmentation.getSlideJob, { jobId });
const result = (jobId: string) => unary(stack.segmentation, stack.segmentation.getSlideJobResult, { jobId }, { timeoutMs: 60_000 });

async function waitDone(jobId: string, onProgress?: (p: segmentationProto.SlideJob) => Promise<void> | void): Promise<segmentationProto.SlideJob> {
  const deadline = Date.now() + 90_000;
  for (;;) {
    const p = await progress(jobId);
    if (p.state === SlideJobState.SLIDE_JOB_STATE_DONE || p.state === SlideJobState.SLIDE_JOB_STATE_FAILED) return p;
    await onProgress?.(p);
    if (Date.now() > deadline) throw new Error(`job ${jobId} not done: ${JSON.stringify(p)}`);
    await new Promise((r) => setTimeout(r, 150));
  }
}

function bboxIou(a: segmentationProto.BoundingBox, b: segmentationProto.BoundingBox): number {
  const iw = Math.max(0, Math.min(a.x1, b.x1) - Math.max(a.x0, b.x0));
  const ih = Math.max(0, Math.min(a.y1, b.y1) - Math.max(a.y0, b.y0));
  const inter = iw * ih;
  const area = (r: segmentationProto.BoundingBox) => (r.x1 - r.x0) * (r.y1 - r.y0);
  return inter / (area(a) + area(b) - inter);
}

describe.skipIf(!!skip)('slide jobs (NATS JetStream work queue)', () => {
  beforeAll(async () => {
    nats = await startTestNatsServer();
    stack = await startTestStack({ args: { gateway: slideArgs(nats.url) } });
    const xs = Array.from({ length: 24 }, (_, i) => 40 + i * 60);
    const ys = Array.from({ length: 16 }, (_, i) => 40 + i * 60);
    image = await syntheticPng(WIDTH, HEIGHT, blobGrid(xs, ys), 7);
    // The gateway sets up its NATS streams in the background (UNAVAILABLE until then).
    for (let i = 0; ; i++) {
      const code = await progress('0'.repeat(32)).then(
        () => 0,
        (err: { code: number }) => err.code,
      );
      if (code !== 14 || i > 100) break;
      await new Promise((r) => setTimeout(r, 100));
    }
  }, 120_000);

  afterAll(async () => {
    await stack?.close();
    await nats?.dispose();
  });

  it('answers NOT_FOUND for unknown jobs and FAILED_PRECONDITION before a job is done', async () => {
    await expect(progress('0123456789abcdef0123456789abcdef')).rejects.toMatchObject({ code: 5 });
    await expect(result('nope')).rejects.toMatchObject({ code: 5 });
  });

  it('finishes a job when a gateway is killed mid-job, reporting each nucleus once', async () => {
    // Reference: the stack's gateway alone.
    const started = Date.now();
    const ref = await submit();
    expect(ref.regions).toBe(12);
    await expect(result(ref.jobId)).rejects.toMatchObject({ code: 9 });
    const refDone = await waitDone(ref.jobId);
    expect(refDone.state).toBe(SlideJobState.SLIDE_JOB_STATE_DONE);
    const reference = await result(ref.jobId);
    const referenceMs = Date.now() - started;
    expect(reference.nuclei.length).toBeGreaterThan(100);

    // The same job on two gateways; the second one dies (SIGKILL) while the job runs.
    const second = await startSecondGateway();
    let killed = false;
    // Kill the second gateway only while both hold a region (one worker slot each), so that one
    // region is certainly lost with it and must be redelivered to the survivor.
    const nc = await connect({ servers: nats.url });
    const jsm = await nc.jetstreamManager();
    const job = await submit();
    const t0 = Date.now();
    const done = await waitDone(job.jobId, async (p) => {
      if (killed || p.tilesDone < 2) return;
      const consumer = await jsm.consumers.info('cfrsam-slide-tasks', 'cfrsam-slide-workers');
      if (consumer.num_ack_pending >= 2) {
        killed = true;
        second.child.kill('SIGKILL');
        await second.exited;
      }
    });
    await nc.close();
    if (!killed) second.child.kill('SIGKILL');
    expect(killed).toBe(true);
    expect(done).toMatchObject({ state: SlideJobState.SLIDE_JOB_STATE_DONE, tilesTotal: 12, tilesDone: 12 });
    const stitched = await result(job.jobId);
    console.log(
      `slide job ${WIDTH}x${HEIGHT}, 12 regions: reference (1 gateway) ${referenceMs} ms, ${reference.nuclei.length} nuclei; ` +
        `with a gateway killed ${Date.now() - t0} ms, ${stitched.nuclei.length} nuclei`,
    );

    expect(stitched.nuclei.length).toBe(reference.nuclei.length);
    expect(stitched.nuclei.map((n) => n.id)).toEqual(stitched.nuclei.map((_, i) => i + 1));
    const key = (n: segmentationProto.Nucleus) => `${n.centroid!.x.toFixed(2)},${n.centroid!.y.toFixed(2)}`;
    expect(stitched.nuclei.map(key).sort()).toEqual(reference.nuclei.map(key).sort());
    for (let i = 0; i < stitched.nuclei.length; i++) {
      for (let j = i + 1; j < stitched.nuclei.length; j++) {
        const a = stitched.nuclei[i];
        const b = stitched.nuclei[j];
        expect(bboxIou(a.bbox!, b.bbox!), `nuclei ${a.id} and ${b.id}`).toBeLessThanOrEqual(0.5);
      }
    }
    expect(stitched.counts.reduce((s, c) => s + c.count, 0)).toBe(stitched.nuclei.length);
  }, 180_000);
});
