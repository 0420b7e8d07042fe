// Several replicas of every stage, some killed in the middle of a run: 2 encoders, 3 decoders, 1
// prompter and 2 gateways as separate processes (models/tiny, real gRPC on loopback). Six
// concurrent clients send Segment requests of small synthetic images, alternating between the
// gateways; midway one encoder and one decoder get SIGKILL. Every request must complete or fail
// with a retryable status and a message, and every answer must equal the one computed for the
// same image before the kills. The numbers are printed for the README.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeClient, segmentationProto, stagesProto, status, unary } from '@cfrsam/rpc';
import { startTestStack, type TestStack } from './stack';
import { blobGrid, syntheticPng, type Blob } from './synthetic';

const { PromptMode } = segmentationProto;
type SegmentRequest = segmentationProto.SegmentRequest;
type SegmentResponse = segmentationProto.SegmentResponse;

const CLIENTS = 6;
const REQUESTS_BEFORE = 2;
const REQUESTS_AFTER = 3;
const RETRYABLE = new Set<number>([status.UNAVAILABLE, status.RESOURCE_EXHAUSTED, status.DEADLINE_EXCEEDED]);

let stack: TestStack;
let gateways: segmentationProto.SegmentationClient[] = [];

interface Case {
  name: string;
  request: SegmentRequest;
}

function request(image: Buffer, prompts: readonly Blob[] | null): SegmentRequest {
  return {
    image,
    model: '',
    prompts: (prompts ?? []).map((b) => ({ positive: [{ x: b.x, y: b.y }], negative: [] })),
    promptMode: prompts ? PromptMode.PROMPT_MODE_MANUAL : PromptMode.PROMPT_MODE_AUTO,
    returnLabelMap: false,
    returnMasks: false,
    minScore: 0,
    mpp: 0,
  };
}

/** What must not change between replicas: the nuclei (ids, classes, boxes, areas, ...) and counts. */
function answer(r: SegmentResponse) {
  return { imageId: r.imageId, nuclei: r.nuclei, counts: r.counts };
}

function percentile(values: number[], p: number): number {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
}

interface Outcome {
  caseIndex: number;
  startedAt: number;
  ms: number;
  response?: SegmentResponse;
  error?: { code: number; details: string };
}

async function send(client: segmentationProto.SegmentationClient, c: Case, caseIndex: number): Promise<Outcome> {
  const startedAt = Date.now();
  try {
    const response = await unary(client, client.segment, c.request, { timeoutMs: 30_000 });
    return { caseIndex, startedAt, ms: Date.now() - startedAt, response };
  } catch (err) {
    const e = err as { code?: number; details?: string; message?: string };
    return { caseIndex, startedAt, ms: Date.now() - startedAt, error: { code: e.code ?? -1, details: e.details ?? e.message ?? '' } };
  }
}

/** `CLIENTS` clients, each sending `perClient` requests one after the other, alternating gateways. */
function runClients(cases: Case[], perClient: number, round: number): Promise<Outcome[]>[] {
  return Array.from({ length: CLIENTS }, async (_, c) => {
    const out: Outcome[] = [];
    for (let i = 0; i < perClient; i++) {
      const caseIndex = (c + i + round) % cases.length;
      out.push(await send(gateways[(c + i) % gateways.length], cases[caseIndex], caseIndex));
    }
    return out;
  });
}

describe('replicas of every stage, some killed mid-run', () => {
  let cases: Case[] = [];

  beforeAll(async () => {
    // Without the result cache: every request must do its stage work while replicas die.
    stack = await startTestStack({ prompters: 1, encoders: 2, decoders: 3, gateways: 2, args: { gateway: ['--result-cache-mb', '0'] } });
    gateways = stack.gateways.map((g) => makeClient(segmentationProto.SegmentationClient, g));
    // Six 256x256 images (one tile each): four with manual prompts at the blob centres (the
    // answer does not depend on the model's detections) and two in automatic mode.
    const grids = [
      blobGrid([30, 80, 130, 180, 230], [40, 110, 180]),
      blobGrid([40, 100, 160, 220], [30, 90, 150, 210]),
      blobGrid([25, 75, 125, 175, 225], [60, 140, 220]),
      blobGrid([50, 128, 206], [50, 128, 206]),
      blobGrid([40, 100, 160, 220], [50, 130, 210]),
      blobGrid([30, 90, 150, 210], [40, 120, 200]),
    ];
    cases = await Promise.all(
      grids.map(async (blobs, i) => {
        const png = await syntheticPng(256, 256, blobs, 100 + i);
        return { name: `${i < 4 ? 'manual' : 'auto'}-${i}`, request: request(png, i < 4 ? blobs : null) };
      }),
    );
  }, 120_000);

  afterAll(async () => {
    for (const g of gateways) g.close();
    await stack?.close();
  });

  it('answers every request correctly or with a retryable status while an encoder and a decoder die', async () => {
    // Reference answers, one per image, before anything is killed.
    const reference: SegmentResponse[] = [];
    for (const c of cases) reference.push(await unary(gateways[0], gateways[0].segment, c.request, { timeoutMs: 60_000 }));
    for (const [i, r] of reference.entries()) {
      expect(r.nuclei.length, cases[i].name).toBeGreaterThan(0);
    }

    const before = (await Promise.all(runClients(cases, REQUESTS_BEFORE, 0))).flat();

    // Kill the encoder holding the most tiles and the busiest decoder (so later calls for those
    // tiles must fail over), while the next round of requests is in flight.
    const encoderEntries = await Promise.all(
      stack.encoders.map(async (address) => {
        const encoder = makeClient(stagesProto.EncoderClient, address);
        try {
          return Number((await unary(encoder, encoder.getCacheStats, {}, { timeoutMs: 10_000 })).entries);
        } finally {
          encoder.close();
        }
      }),
    );
    const encoderVictim = stack.processes.filter((p) => p.kind === 'encoder')[encoderEntries[0] >= encoderEntries[1] ? 0 : 1];
    // The decoder that answered the most Decode calls (a tile's batches go to its rendezvous home).
    const decodes = (name: string) => stack.spans(name).filter((s) => s.name.endsWith('Decoder/Decode')).length;
    const decoderVictim = stack.processes
      .filter((p) => p.kind === 'decoder')
      .map((p) => ({ p, n: decodes(p.name) }))
      .sort((x, y) => y.n - x.n)[0].p;
    const afterPending = runClients(cases, REQUESTS_AFTER, 1);
    await new Promise((r) => setTimeout(r, 150));
    const killedAt = Date.now();
    await Promise.all([stack.stopProcess(encoderVictim.name, 'SIGKILL'), stack.stopProcess(decoderVictim.name, 'SIGKILL')]);
    const after = (await Promise.all(afterPending)).flat();

    const all = [...before, ...after];
    const ok = all.filter((o) => o.response);
    const failed = all.filter((o) => o.error);
    for (const o of failed) {
      expect(RETRYABLE.has(o.error!.code), `${cases[o.caseIndex].name}: status ${o.error!.code} ${o.error!.details}`).toBe(true);
      expect(o.error!.details.length).toBeGreaterThan(0);
    }
    for (const o of ok) {
      expect(answer(o.response!), cases[o.caseIndex].name).toEqual(answer(reference[o.caseIndex]));
    }
    // Failover, not luck: the requests after the kills were answered, and some gateway moved a
    // call off the dead encoder.
    const okAfterKill = after.filter((o) => o.response && o.startedAt + o.ms > killedAt);
    expect(okAfterKill.length).toBeGreaterThan(0);
    const gatewayLogs = [...stack.logs.entries()]
      .filter(([name]) => name.startsWith('gateway'))
      .flatMap(([, lines]) => lines)
      .join('\n');
    const failovers = (what: string, address: string) =>
      (gatewayLogs.match(new RegExp(`${what} ${address.replace(/\./g, '\\.')} failed .*trying the next replica`, 'g')) ?? []).length;
    const encoderFailovers = failovers('encoder', encoderVictim.address);
    const decoderFailovers = failovers('decoder', decoderVictim.address);
    expect(encoderFailovers).toBeGreaterThan(0);
    expect(decoderFailovers).toBeGreaterThan(0);

    const startedBefore = all.filter((o) => o.startedAt < killedAt && o.response).map((o) => o.ms);
    const startedAfter = all.filter((o) => o.startedAt >= killedAt && o.response).map((o) => o.ms);
    const inFlight = after.filter((o) => o.startedAt < killedAt).length;
    const f = (n: number) => (Number.isNaN(n) ? '-' : `${Math.round(n)} ms`);
    console.log(
      [
        `replicas: 1 prompter, 2 encoders, 3 decoders, 2 gateways; ${CLIENTS} clients, ${cases.length} images 256x256; ` +
          `killed ${encoderVictim.name} and ${decoderVictim.name} (SIGKILL) with ${inFlight} requests in flight`,
        `requests ${all.length}: ${ok.length} answered (all equal to the pre-kill answer), ${failed.length} retryable failures` +
          (failed.length ? ` (${failed.map((o) => status[o.error!.code]).join(', ')})` : ''),
        `latency started before the kills: p50 ${f(percentile(startedBefore, 50))}, p95 ${f(percentile(startedBefore, 95))} (n=${startedBefore.length})`,
        `latency started after the kills:  p50 ${f(percentile(startedAfter, 50))}, p95 ${f(percentile(startedAfter, 95))} (n=${startedAfter.length})`,
        `gateway failovers logged: encoder ${encoderFailovers}, decoder ${decoderFailovers}`,
      ].join('\n'),
    );
  }, 120_000);
});
