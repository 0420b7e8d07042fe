// The standalone process (services/standalone: the gateway with the prompter, encoder and decoder
// in its own process) against the four services: the same requests must give the same answers,
// nuclei for nuclei. The standalone one runs with caches too small for one request's tiles
// (features of one tile, prepared state of one tile), so the repair paths run too: a tile whose
// features the encoder evicted is encoded again, a tile the decoder evicted is prepared again.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeClient, segmentationProto, status, unary } from '@cfrsam/rpc';
import { startStack, type RunningStack } from '../services/gateway/dist/cli/stack';
import { comparableResponse, segmentRequest } from './stack';
import { blobGrid, syntheticPng } from './synthetic';

const { PromptMode } = segmentationProto;
type SegmentRequest = segmentationProto.SegmentRequest;
type SegmentResponse = segmentationProto.SegmentResponse;

const SAMPLE = path.join(__dirname, '..', 'samples', 'synthetic-he-512.png');

const request = segmentRequest;

const comparable = comparableResponse;

async function segmentAll(stack: RunningStack, requests: SegmentRequest[]): Promise<SegmentResponse[]> {
  const client = makeClient(segmentationProto.SegmentationClient, stack.gateway, { maxMessageBytes: 256 * 1024 * 1024 });
  try {
    const out: SegmentResponse[] = [];
    for (const r of requests) out.push(await unary(client, client.segment, r, { timeoutMs: 240_000 }));
    return out;
  } finally {
    client.close();
  }
}

describe('standalone process', () => {
  let requests: SegmentRequest[];
  let split: SegmentResponse[];
  let standalone: RunningStack;
  const standaloneLog: string[] = [];

  beforeAll(async () => {
    const blobs = blobGrid([60, 140, 220], [70, 180]);
    requests = [
      request(fs.readFileSync(SAMPLE)), // 9 tiles, automatic prompts
      request(await syntheticPng(300, 260, blobs), {
        promptMode: PromptMode.PROMPT_MODE_MANUAL,
        prompts: blobs.map((b) => ({ positive: [{ x: b.x, y: b.y }], negative: [] })),
      }),
    ];
    const services = await startStack({ decoders: 2, port: 0, log: () => {} });
    try {
      split = await segmentAll(services, requests);
    } finally {
      await services.stop();
    }
    standalone = await startStack({
      standalone: true,
      decoders: 2,
      port: 0,
      log: (_name, line) => standaloneLog.push(line),
      args: { gateway: ['--encoder-cache-mb', '1', '--decoder-cache-mb', '3', '--result-cache-mb', '0'] },
    });
  });

  afterAll(async () => {
    await standalone?.stop();
  });

  it('is one process, serving the public API', () => {
    expect(standalone.processes.map((p) => p.kind)).toEqual(['standalone']);
    expect(standalone.prompters).toEqual([]);
  });

  it('answers as the four services do, with features evicted mid-request', async () => {
    expect(split[0].nuclei.length).toBeGreaterThan(50);
    const answers = await segmentAll(standalone, requests);
    for (let i = 0; i < requests.length; i++) {
      expect(answers[i].nuclei.length).toBe(split[i].nuclei.length);
      expect(comparable(answers[i])).toEqual(comparable(split[i]));
    }
    // The encoder's cache of one tile cannot hold a 9-tile request: features were encoded again.
    // Whether a prepared tile is also evicted between its Prepare and its Decodes depends on how
    // the tiles interleave (it stopped happening here when the encoder got faster); that repair
    // is forced in services/standalone/test/localStages.test.ts.
    expect(standaloneLog.some((l) => l.includes('"reason":"FEATURES_MISSING"'))).toBe(true);
  });

  it('refuses bad input with a clear status and keeps serving', async () => {
    const client = makeClient(segmentationProto.SegmentationClient, standalone.gateway);
    try {
      const err = await unary(client, client.segment, request(Buffer.from('not an image')), { timeoutMs: 30_000 }).then(
        () => null,
        (e: { code: number; details: string }) => e,
      );
      expect(err?.code).toBe(status.INVALID_ARGUMENT);
      expect(err?.details).toMatch(/image/i);
      const again = await unary(client, client.segment, requests[1], { timeoutMs: 120_000 });
      expect(comparable(again)).toEqual(comparable(split[1]));
    } finally {
      client.close();
    }
  });
});
