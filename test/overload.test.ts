// Overload behaviour of the real stack (prompter, encoder, one decoder and the gateway as separate
// processes over loopback gRPC): a request whose deadline passes mid-way ends DEADLINE_EXCEEDED and
// no decoder batch runs for it afterwards; a request refused early for its deadline is refused
// within a second with a retry delay and costs no stage any work; a caller over its per-identity
// limit gets RESOURCE_EXHAUSTED with a retry delay while another caller is served; a request that
// announces its image size in x-image-size is priced from its headers. Stage work is
// counted from each stage's Prometheus endpoint: cfrsam_pool_queue_seconds_count counts the
// onnxruntime runs per graph (decoder_prompts: one per decoder batch).
import { Metadata, type ServiceError, status } from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { errorDetailsOf, segmentationProto, unary } from '@cfrsam/rpc';
import { freePort } from '../services/gateway/dist/cli/stack';
import { startTestStack, type TestStack } from './stack';
import { blobGrid, syntheticPng } from './synthetic';

let stack: TestStack;
const metricsPorts: Record<'prompter' | 'encoder' | 'decoder', number> = { prompter: 0, encoder: 0, decoder: 0 };
let gatewayMetricsPort = 0;

/** The gateway's cfrsam_admission_total, by event. */
async function admissionEvents(): Promise<Record<string, number>> {
  const text = await (await fetch(`http://127.0.0.1:${gatewayMetricsPort}/metrics`)).text();
  const events: Record<string, number> = {};
  for (const line of text.split('\n')) {
    const m = /^cfrsam_admission_total\{[^}]*event="([^"]+)"[^}]*\} (\d+)/.exec(line);
    if (m) events[m[1]] = Number(m[2]);
  }
  return events;
}

/** onnxruntime runs so far, per graph, summed over the stage services. */
async function graphRuns(): Promise<Record<string, number>> {
  const runs: Record<string, number> = {};
  for (const port of Object.values(metricsPorts)) {
    const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    for (const line of text.split('\n')) {
      const m = /^cfrsam_pool_queue_seconds_count\{[^}]*graph="([^"]+)"[^}]*\} (\d+)/.exec(line);
      if (m) runs[m[1]] = (runs[m[1]] ?? 0) + Number(m[2]);
    }
  }
  return runs;
}

function segment(
  request: Partial<segmentationProto.SegmentRequest>,
  client: string,
  timeoutMs: number,
  imageSize?: string,
): Promise<segmentationProto.SegmentResponse> {
  const metadata = new Metadata();
  metadata.set('x-client-id', client);
  if (imageSize) metadata.set('x-image-size', imageSize);
  return unary(stack.segmentation, stack.segmentation.segment, segmentationProto.SegmentRequest.fromPartial(request), { timeoutMs, metadata });
}

async function failure(p: Promise<unknown>): Promise<ServiceError> {
  try {
    await p;
  } catch (err) {
    return err as ServiceError;
  }
  throw new Error('expected the call to fail');
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

let bigImage: Buffer;
let wideImage: Buffer;
let tileImage: Buffer;

beforeAll(async () => {
  for (const kind of Object.keys(metricsPorts) as (keyof typeof metricsPorts)[]) metricsPorts[kind] = await freePort();
  gatewayMetricsPort = await freePort();
  stack = await startTestStack({
    decoders: 1,
    args: {
      prompter: ['--metrics-port', String(metricsPorts.prompter)],
      encoder: ['--metrics-port', String(metricsPorts.encoder)],
      decoder: ['--metrics-port', String(metricsPorts.decoder)],
      // Every request runs the model (no result cache); one request at a time per caller.
      gateway: ['--result-cache-mb', '0', '--max-requests-per-identity', '1', '--metrics-port', String(gatewayMetricsPort)],
    },
  });
  const xs = Array.from({ length: 20 }, (_, i) => 24 + i * 50);
  bigImage = await syntheticPng(1024, 1024, blobGrid(xs, xs), 7);
  // Wide enough that no machine finishes it within the 8 s deadline below (a 2048-wide image, 50
  // tiles, was done in under 8 s once decoding got cheaper).
  wideImage = await syntheticPng(
    4096,
    1024,
    blobGrid(
      [0, 1024, 2048, 3072].flatMap((dx) => xs.map((x) => x + dx)),
      xs,
    ),
    9,
  );
  tileImage = await syntheticPng(256, 256, blobGrid([40, 120, 200], [40, 120, 200]), 8);
}, 180_000);

afterAll(async () => {
  await stack?.close();
});

describe('overload', () => {
  it('a request whose deadline passes mid-way is DEADLINE_EXCEEDED and runs no decoder batch afterwards', async () => {
    // Before any answer the gateway has no throughput figure, so it admits the request.
    const started = Date.now();
    // 4096 x 1024 is 105 tiles: after 8 s the decoder is busy with it, and far from done.
    const err = await failure(segment({ image: wideImage }, 'expiring', 8_000));
    expect(err.code).toBe(status.DEADLINE_EXCEEDED);
    expect(Date.now() - started).toBeLessThan(10_000);
    // A batch already running when the deadline passed completes; nothing starts after it.
    await sleep(1_000);
    const atExpiry = await graphRuns();
    expect(atExpiry.decoder_prompts ?? 0).toBeGreaterThan(0);
    await sleep(3_000);
    const later = await graphRuns();
    expect(later.decoder_prompts ?? 0).toBe(atExpiry.decoder_prompts ?? 0);
    expect(later.decoder_image ?? 0).toBe(atExpiry.decoder_image ?? 0);
    expect(later.prompter ?? 0).toBe(atExpiry.prompter ?? 0);
  }, 60_000);

  it('a request that cannot meet its deadline is refused within a second with a retry delay, and no stage works for it', async () => {
    // One answer of the same size gives the gateway its throughput figure (pixels per second):
    // 1024 x 1024 takes seconds on two cores, so a 1 s deadline cannot be met.
    const answered = await segment({ image: bigImage }, 'warm-up', 60_000);
    expect(answered.width).toBe(1024);
    await sleep(500);
    const before = await graphRuns();
    const started = Date.now();
    const err = await failure(segment({ image: bigImage }, 'hurried', 1_000));
    const refusedAfterMs = Date.now() - started;
    expect(err.code).toBe(status.RESOURCE_EXHAUSTED);
    expect(refusedAfterMs).toBeLessThan(1_000);
    const details = errorDetailsOf(err);
    expect(details.retryDelayMs).toBeGreaterThan(0);
    expect(details.metadata?.admission).toBe('deadline');
    await sleep(1_500);
    const after = await graphRuns();
    for (const graph of ['prompter', 'encoder', 'decoder_image', 'decoder_prompts']) expect(after[graph] ?? 0).toBe(before[graph] ?? 0);
  }, 120_000);

  it('a request announcing its size (x-image-size) is priced from its headers: refused before its body is read, or its place held', async () => {
    // The gateway has its throughput figure from the previous test's answer. The body here is not
    // an image at all: refused from the headers, the call never gets to decoding it.
    const before = await admissionEvents();
    const started = Date.now();
    const err = await failure(segment({ image: Buffer.alloc(4 << 20, 1) }, 'announcing', 1_000, '1024x1024'));
    expect(Date.now() - started).toBeLessThan(1_000);
    expect(err.code).toBe(status.RESOURCE_EXHAUSTED);
    expect(errorDetailsOf(err).metadata?.admission).toBe('deadline');
    expect(errorDetailsOf(err).retryDelayMs).toBeGreaterThan(0);
    // Announced truthfully with time to spare: its place is held from the headers and it is answered.
    const answered = await segment({ image: tileImage }, 'announcing', 60_000, '256x256');
    expect(answered.width).toBe(256);
    const after = await admissionEvents();
    expect((after.rejected_early ?? 0) - (before.rejected_early ?? 0)).toBe(1);
    expect((after.reserved ?? 0) - (before.reserved ?? 0)).toBe(1);
    // An image larger than announced, and a malformed header: INVALID_ARGUMENT naming the header.
    const under = await failure(segment({ image: bigImage }, 'announcing', 60_000, '256x256'));
    expect(under.code).toBe(status.INVALID_ARGUMENT);
    expect(under.details).toMatch(/x-image-size/);
    const malformed = await failure(segment({ image: tileImage }, 'announcing', 60_000, 'large'));
    expect(malformed.code).toBe(status.INVALID_ARGUMENT);
    expect(malformed.details).toMatch(/x-image-size must be WIDTHxHEIGHT/);
  }, 120_000);

  it('a caller over its per-identity limit gets RESOURCE_EXHAUSTED with a retry delay while another caller is served', async () => {
    // Two calls of one caller at once: whichever arrives second is refused (their order on the
    // wire is not fixed), while the other caller is served.
    const greedy = [segment({ image: tileImage }, 'greedy', 60_000), segment({ image: tileImage }, 'greedy', 60_000)];
    const other = segment({ image: tileImage }, 'modest', 60_000);
    const outcomes = await Promise.allSettled(greedy);
    const refused = outcomes.filter((o) => o.status === 'rejected');
    expect(refused).toHaveLength(1);
    const err = (refused[0] as PromiseRejectedResult).reason as ServiceError;
    const first = (outcomes.find((o) => o.status === 'fulfilled') as PromiseFulfilledResult<segmentationProto.SegmentResponse>).value;
    expect(err.code).toBe(status.RESOURCE_EXHAUSTED);
    expect(err.details).toMatch(/client:greedy/);
    const details = errorDetailsOf(err);
    expect(details.retryDelayMs).toBeGreaterThan(0);
    expect(details.metadata?.admission).toBe('identity_concurrency');
    expect([first.width, (await other).width]).toEqual([256, 256]);
  }, 120_000);
});
