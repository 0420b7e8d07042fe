// Malformed requests, generated from a fixed seed, against a live stack: every public route (gRPC
// Segment, the HTTP/JSON routes) and every stage API (Detect, Encode, Prepare, Decode) with wrong
// types, sizes, digests, tensors, prompts and numbers. Each must be answered with a status that
// names the caller's mistake (never INTERNAL, UNKNOWN or an HTTP 5xx), no process may die, and a
// normal request must still be served afterwards. (Written after a fuzz run found the HTTP/JSON
// API answering 500 for `"image": 42` and a `null` body.)
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeClient, segmentationProto, stagesProto, unary } from '@cfrsam/rpc';
import { digestTile } from '@cfrsam/contract';
import { prng } from '@cfrsam/testing';
import { startTestStack, type TestStack } from './stack';
import { blobGrid, syntheticPng } from './synthetic';

const SEED = 20261205;
// Seeded (mulberry32), so a failure reproduces.
const random = prng(SEED);
const int = (n: number) => Math.floor(random() * n);
const pick = <T>(values: readonly T[]): T => values[int(values.length)];
const chance = (p: number) => random() < p;

const NUMBERS = [NaN, -1, 0, 0.5, 1, 2, 1e9, -1e9, Infinity, -Infinity, 255.5, 12] as const;
const JSON_VALUES = [null, -1, 0, 1e9, 'x', '1', [], {}, true, 0.25, -0.5, 1e-12] as const;
const SIDE = 256;

let stack: TestStack;
let version: string;
let images: Buffer[];
let tileRgb: Buffer;
let tileDigest: string;
let goodPng: Buffer;

beforeAll(async () => {
  stack = await startTestStack({ decoders: 1, args: { gateway: ['--http-port', '0', '--result-cache-mb', '0'] } });
  version = JSON.parse(fs.readFileSync(path.join(__dirname, '..', 'models', 'tiny', 'manifest.json'), 'utf8')).version;
  goodPng = await syntheticPng(96, 80, blobGrid([30, 60], [40]));
  images = [
    goodPng,
    await syntheticPng(1, 1, []),
    await syntheticPng(3000, 2, []),
    goodPng.subarray(0, 40),
    Buffer.from('GIF89a and then nothing'),
    Buffer.alloc(0),
    Buffer.from('not an image at all'),
  ];
  tileRgb = Buffer.alloc(SIDE * SIDE * 3);
  for (let i = 0; i < tileRgb.length; i++) tileRgb[i] = (i * 7919) % 251;
  tileDigest = digestTile(tileRgb, version);
}, 180_000);

afterAll(async () => {
  await stack?.close();
});

/** Codes that say the server, not the caller, went wrong (DEADLINE_EXCEEDED: it hung). */
const SERVER_FAULTS = new Set([2, 4, 13]);

function expectAllAlive() {
  for (const p of stack.processes) expect(`${p.name}: exit ${p.child.exitCode ?? p.child.signalCode ?? 'none'}`).toBe(`${p.name}: exit none`);
}

describe('malformed input, from a fixed seed', () => {
  it('the HTTP/JSON routes answer 4xx with a message, never 5xx', async () => {
    const faults: string[] = [];
    const pointish = () => (chance(0.5) ? { x: pick(JSON_VALUES), y: pick(JSON_VALUES) } : { x: int(120) - 10, y: int(100) - 10 });
    for (let i = 0; i < 120; i++) {
      const body: Record<string, unknown> = {};
      if (chance(0.9)) body.image = chance(0.8) ? pick(images).toString('base64') : pick(JSON_VALUES);
      if (chance(0.5)) {
        body.prompts = chance(0.7)
          ? Array.from({ length: int(4) }, () => ({
              positive: Array.from({ length: int(3) }, pointish),
              negative: chance(0.3) ? [pointish()] : pick(JSON_VALUES),
            }))
          : pick(JSON_VALUES);
      }
      for (const key of ['promptMode', 'mpp', 'minScore', 'downsample', 'returnLabelMap', 'returnMasks', 'origin', 'maskEncoding', 'imageId']) {
        if (chance(0.2)) body[key] = pick([...JSON_VALUES, 'PROMPT_MODE_MANUAL', 'MASK_ENCODING_RLE', { x: 5, y: -3 }, { x: 'a' }]);
      }
      const route = pick(['/v1/segment', '/v1/segment/geojson', '/v1/refine']);
      const raw = chance(0.1) ? pick(['{', '[]', 'null', '"x"', '{"image": 5', '\u0000']) : JSON.stringify(body);
      const res = await fetch(`http://${stack.http}${route}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: raw });
      const answer = await res.text();
      if (res.status >= 500) faults.push(`${route} ${raw.slice(0, 120)} -> ${res.status} ${answer.slice(0, 200)}`);
      else if (res.status >= 400) expect(JSON.parse(answer).message, `${route} ${raw.slice(0, 120)}`).toBeTruthy();
    }
    expect(faults).toEqual([]);
    expectAllAlive();
  }, 180_000);

  it('gRPC Segment answers a caller error, never INTERNAL or UNKNOWN', async () => {
    const faults: string[] = [];
    for (let i = 0; i < 60; i++) {
      const request = segmentationProto.SegmentRequest.fromPartial({
        image: pick(images),
        prompts: chance(0.5)
          ? Array.from({ length: int(3) }, () => ({ positive: [{ x: random() * 200 - 50, y: random() * 200 - 50 }], negative: [] }))
          : [],
        promptMode: int(5),
        mpp: pick([0, -1, 0.25, 1e9, NaN, 1e-9]),
        minScore: pick([0, -1, 2, NaN, 0.5]),
        downsample: pick([0, -2, 1, 1e9, NaN]),
        returnLabelMap: chance(0.5),
        returnMasks: chance(0.5),
        maskEncoding: int(4),
        labelMapEncoding: int(4),
      });
      await unary(stack.segmentation, stack.segmentation.segment, request, { timeoutMs: 60_000 }).catch((err: { code: number; details: string }) => {
        if (SERVER_FAULTS.has(err.code)) faults.push(`Segment #${i} -> ${err.code} ${err.details}`);
      });
    }
    expect(faults).toEqual([]);
    expectAllAlive();
  }, 180_000);

  it('the stage APIs answer a caller error, never INTERNAL or UNKNOWN, and keep serving', async () => {
    const prompter = makeClient(stagesProto.PrompterClient, stack.prompter, { maxMessageBytes: 256 * 1024 * 1024 });
    const decoder = makeClient(stagesProto.DecoderClient, stack.decoders[0], { maxMessageBytes: 256 * 1024 * 1024 });
    const encoder = stack.encoderClient;
    const faults: string[] = [];
    const fault = (what: string) => (err: { code: number; details: string }) => {
      if (SERVER_FAULTS.has(err.code)) faults.push(`${what} -> ${err.code} ${err.details}`);
    };
    const tensor = () => ({
      dims: Array.from({ length: int(5) }, () => pick([0, 1, 3, 16, 256, -1, 1e6])),
      dtype: int(6),
      data: Buffer.alloc(pick([0, 4, 1000, SIDE * SIDE * 12])),
    });
    const tile = () => {
      const out: stagesProto.TileInput = { digest: pick([tileDigest, '', 'abc', 'f'.repeat(64), tileDigest.toUpperCase()]) };
      const kind = int(4);
      if (kind === 0) out.rgb = tileRgb;
      else if (kind === 1) out.rgb = Buffer.alloc(pick([0, 3, SIDE * SIDE * 3 - 1, SIDE * SIDE * 3 + 3]));
      else if (kind === 2) out.pixels = tensor();
      return out;
    };
    const modelVersion = () => pick([version, version, '', 'another-model']);
    try {
      for (let i = 0; i < 30; i++) {
        const tiles = Array.from({ length: pick([0, 1, 1, 2, 40]) }, tile);
        await unary(
          prompter,
          prompter.detect,
          { tiles, minForeground: pick(NUMBERS), nmsRadius: pick(NUMBERS), modelVersion: modelVersion() },
          { timeoutMs: 60_000 },
        ).catch(fault(`Detect #${i}`));
        await unary(encoder, encoder.encode, { tiles, modelVersion: modelVersion(), returnFeatures: chance(0.5) }, { timeoutMs: 60_000 }).catch(
          fault(`Encode #${i}`),
        );
      }
      // A real tile encoded and prepared, so Prepare and Decode reach their deeper paths too.
      await unary(encoder, encoder.encode, { tiles: [{ digest: tileDigest, rgb: tileRgb }], modelVersion: version });
      for (let i = 0; i < 30; i++) {
        const request: stagesProto.PrepareRequest = { digest: pick([tileDigest, '', 'zz', 'f'.repeat(64)]), modelVersion: modelVersion() };
        if (chance(0.3)) request.features = tensor();
        if (chance(0.3)) request.pixels = tensor();
        if (chance(0.4)) request.rgb = pick([tileRgb, Buffer.alloc(5)]);
        if (chance(0.4)) request.featuresFrom = pick([stack.encoder, '127.0.0.1:1', 'nonsense', '', 'dns:///nowhere:1']);
        if (chance(0.3)) request.featuresWaitMs = pick([0, 1, 50, 4_294_967_295]);
        await unary(decoder, decoder.prepare, request, { timeoutMs: 60_000 }).catch(fault(`Prepare #${i}`));
      }
      await unary(decoder, decoder.prepare, { digest: tileDigest, modelVersion: version, rgb: tileRgb, featuresFrom: stack.encoder });
      for (let i = 0; i < 40; i++) {
        const prompts = Array.from({ length: pick([0, 1, 3, 16, 200]) }, () => {
          const n = pick([0, 1, 2, 3]);
          return {
            coords: Array.from({ length: 2 * n + pick([0, 0, 1]) }, () => pick([...NUMBERS, int(SIDE)])),
            labels: Array.from({ length: n + pick([0, 0, 1]) }, () => pick([0, 1, 2, 3, -1, 7])),
          };
        });
        await unary(
          decoder,
          decoder.decode,
          { digest: pick([tileDigest, tileDigest, 'f'.repeat(64)]), prompts, modelVersion: modelVersion() },
          { timeoutMs: 60_000 },
        ).catch(fault(`Decode #${i}`));
      }
    } finally {
      prompter.close();
      decoder.close();
    }
    expect(faults).toEqual([]);
    expectAllAlive();
    // Still serving: a normal request through the whole pipeline.
    const answer = await unary(stack.segmentation, stack.segmentation.segment, segmentationProto.SegmentRequest.fromPartial({ image: goodPng }), {
      timeoutMs: 60_000,
    });
    expect(answer.width).toBe(96);
  }, 240_000);
});
