// The public Segmentation API end to end: prompter, encoder, two decoder replicas and the gateway
// as separate processes over real gRPC on loopback, with the models/tiny bundle. Manual prompts
// at known positions keep the assertions independent of the model's automatic detections.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { PassThrough } from 'node:stream';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { digestTile } from '@cfrsam/contract';
import { ErrorReason, errorReason, errorDetailsOf, makeClient, segmentationProto, type SpanRecord, stagesProto, status, unary } from '@cfrsam/rpc';
import { labelMapFromBytes, planTiles } from '@cfrsam/nuclei';
import { runSegment } from '../services/gateway/dist/cli/segment';
import { comparableResponse, segmentRequest, startTestStack, type TestStack } from './stack';
import { blobGrid, syntheticPng, type Blob } from './synthetic';

const { PromptMode, PromptSource } = segmentationProto;
type SegmentRequest = segmentationProto.SegmentRequest;
type SegmentResponse = segmentationProto.SegmentResponse;

const MAX_PIXELS = 400_000;
const MAX_PROMPTS = 200;
const OVERLAP = 64;

let stack: TestStack;
let model: segmentationProto.ModelInfo;

const request = segmentRequest;

const pointPrompts = (blobs: readonly Blob[]): segmentationProto.Prompt[] => blobs.map((b) => ({ positive: [{ x: b.x, y: b.y }], negative: [] }));

function segment(req: SegmentRequest, timeoutMs = 120_000): Promise<SegmentResponse> {
  return unary(stack.segmentation, stack.segmentation.segment, req, { timeoutMs });
}

async function segmentError(req: SegmentRequest): Promise<{ code: number; details: string }> {
  try {
    await segment(req);
  } catch (err) {
    const e = err as { code: number; details: string };
    return { code: e.code, details: e.details };
  }
  throw new Error('the request succeeded; expected an error');
}

async function cacheStats() {
  return unary(stack.encoderClient, stack.encoderClient.getCacheStats, {}, { timeoutMs: 10_000 });
}

const comparable = comparableResponse;

/** Structural checks every response must pass. */
const SEGMENT_STAGES = ['decode', 'prompter', 'encoder', 'decoder_prepare', 'decoder_decode', 'assemble', 'total'];
const REFINE_STAGES = ['decoder_prepare', 'decoder_decode', 'assemble', 'total'];

function expectWellFormed(r: SegmentResponse, width: number, height: number, expectedStages = SEGMENT_STAGES) {
  expect([r.width, r.height]).toEqual([width, height]);
  expect(r.imageId).toMatch(/^[0-9a-f]{64}$/);
  expect(r.modelName).toBe(model.name);
  expect(r.modelVersion).toBe(model.version);
  const stages = r.timings.map((t) => t.stage);
  for (const s of expectedStages) expect(stages).toContain(s);
  const total = r.timings.find((t) => t.stage === 'total')!.ms;
  for (const t of r.timings) expect(t.ms).toBeLessThanOrEqual(total + 1e-6);
  const labels = r.labelMap ? labelMapFromBytes(r.labelMap.data, r.labelMap.width, r.labelMap.height) : undefined;
  const areaByLabel = new Map<number, number>();
  if (labels) for (const l of labels) if (l) areaByLabel.set(l, (areaByLabel.get(l) ?? 0) + 1);
  r.nuclei.forEach((n, i) => {
    expect(n.id).toBe(i + 1);
    const b = n.bbox!;
    expect(b.x0).toBeGreaterThanOrEqual(0);
    expect(b.y0).toBeGreaterThanOrEqual(0);
    expect(b.x1).toBeLessThanOrEqual(width);
    expect(b.y1).toBeLessThanOrEqual(height);
    expect(n.centroid!.x).toBeGreaterThan(b.x0);
    expect(n.centroid!.x).toBeLessThan(b.x1);
    expect(n.polygon.length).toBeGreaterThanOrEqual(3);
    for (const p of n.polygon) {
      expect(p.x).toBeGreaterThanOrEqual(b.x0);
      expect(p.x).toBeLessThanOrEqual(b.x1);
    }
    const m = n.measurements!;
    expect(m.areaPx).toBeGreaterThan(0);
    expect(m.areaUm2).toBeCloseTo(m.areaPx * model.mpp * model.mpp, 3);
    expect(m.circularity).toBeGreaterThan(0);
    expect(m.circularity).toBeLessThanOrEqual(1);
    expect(m.solidity).toBeGreaterThan(0);
    expect(m.solidity).toBeLessThanOrEqual(1);
    expect(n.score).toBeGreaterThanOrEqual(0);
    expect(n.score).toBeLessThanOrEqual(1);
    if (n.classIndex >= 0) {
      expect(n.className).toBe(model.classes[n.classIndex].name);
      expect(n.classProbabilities).toHaveLength(model.classes.length);
      expect(n.classProbabilities.reduce((a, v) => a + v, 0)).toBeCloseTo(1, 3);
    } else {
      expect(n.className).toBe('unclassified');
    }
    if (labels) expect(areaByLabel.get(n.id)).toBe(m.areaPx);
    if (n.mask) {
      expect([n.mask.width, n.mask.height]).toEqual([b.x1 - b.x0, b.y1 - b.y0]);
      const ones = n.mask.counts.filter((_, k) => k % 2 === 1).reduce((a, v) => a + v, 0);
      expect(ones).toBe(m.areaPx);
    }
  });
  if (labels) expect(areaByLabel.size).toBe(r.nuclei.length);
  const counted = r.counts.reduce((a, c) => a + c.count, 0);
  expect(counted).toBe(r.nuclei.length);
}

/** The nucleus whose mask holds the point, from the label map. */
function nucleusAt(r: SegmentResponse, x: number, y: number): segmentationProto.Nucleus | undefined {
  const labels = labelMapFromBytes(r.labelMap!.data, r.width, r.height);
  const id = labels[Math.floor(y) * r.width + Math.floor(x)];
  return id ? r.nuclei[id - 1] : undefined;
}

/**
 * Manual prompts at blob centres: each nucleus contains at most one prompt's point, no prompt is
 * covered twice (the label map has one id per pixel), and at least `fraction` of the prompts got a
 * nucleus (the model may miss a blob; the pipeline must not lose or duplicate any it found).
 */
function expectPromptsCovered(r: SegmentResponse, blobs: readonly Blob[], fraction: number): Map<Blob, segmentationProto.Nucleus> {
  const found = new Map<Blob, segmentationProto.Nucleus>();
  const owners = new Map<number, Blob>();
  for (const b of blobs) {
    const n = nucleusAt(r, b.x, b.y);
    if (!n) continue;
    expect(owners.has(n.id), `nucleus ${n.id} covers two prompts`).toBe(false);
    owners.set(n.id, b);
    expect(n.source).toBe(PromptSource.PROMPT_SOURCE_MANUAL);
    expect(n.prompt).toEqual({ x: b.x, y: b.y });
    found.set(b, n);
  }
  expect(r.nuclei.length).toBeLessThanOrEqual(blobs.length);
  expect(found.size, `${found.size} of ${blobs.length} prompts got a nucleus`).toBeGreaterThanOrEqual(Math.ceil(fraction * blobs.length));
  return found;
}

/** The gateway's Segment span of the (last) call that produced `imageId`, and every span of its trace. */
function segmentTrace(imageId: string): { root: SpanRecord; trace: SpanRecord[] } {
  const spans = stack.spans();
  const root = spans
    .filter(
      (s) => s.service === 'gateway' && s.kind === 'SERVER' && s.name.endsWith('Segmentation/Segment') && s.attributes['cfrsam.image_id'] === imageId,
    )
    .pop();
  if (!root) throw new Error(`no Segment span for ${imageId}`);
  return { root, trace: spans.filter((s) => s.traceId === root.traceId) };
}

/** Prompts sent to decoders in the trace of the call that produced `imageId` (sum over Decode batches). */
function decodedPrompts(imageId: string): number {
  return segmentTrace(imageId)
    .trace.filter((s) => s.service === 'gateway' && s.kind === 'CLIENT' && s.name.endsWith('Decoder/Decode'))
    .reduce((n, s) => n + Number(s.attributes['cfrsam.prompts']), 0);
}

beforeAll(async () => {
  stack = await startTestStack({
    decoders: 2,
    args: {
      gateway: [
        '--max-image-pixels',
        String(MAX_PIXELS),
        '--max-prompts',
        String(MAX_PROMPTS),
        '--tile-overlap',
        String(OVERLAP),
        '--decode-batch-size',
        '4',
        '--max-decoder-calls',
        '4',
        '--replica-cooldown-ms',
        '600000',
      ],
    },
  });
  model = await unary(stack.segmentation, stack.segmentation.getModelInfo, {}, { timeoutMs: 10_000 });
});

afterAll(async () => {
  await stack?.close();
});

describe('gateway', () => {
  const small = blobGrid([40, 100, 170, 220], [50, 130, 210]);
  let smallPng: Buffer;
  let first: SegmentResponse;

  it('describes the served model', () => {
    const manifest = JSON.parse(fs.readFileSync(`${process.env.CFRSAM_BUNDLE ?? 'models/tiny'}/manifest.json`, 'utf8'));
    expect(model.name).toBe(manifest.name);
    expect(model.version).toBe(manifest.version);
    expect(model.inputSize).toBe(manifest.input_size);
    expect(model.classes.map((c) => c.name)).toEqual(manifest.classes.map((c: { name: string }) => c.name));
    expect(Number(model.maxImagePixels)).toBe(MAX_PIXELS);
    expect(model.maxPrompts).toBe(MAX_PROMPTS);
  });

  it('segments manual prompts into well-formed nuclei, deterministically; a repeat hits the result cache, a variant the encoder cache', async () => {
    smallPng = await syntheticPng(256, 256, small);
    const req = request(smallPng, { prompts: pointPrompts(small) });
    first = await segment(req);
    expectWellFormed(first, 256, 256);
    expect(first.tiles).toBe(1);
    expectPromptsCovered(first, small, 0.9);
    const before = await cacheStats();
    // The same request again: answered from the gateway's result cache, no stage runs.
    const again = await segment(req);
    expect(comparable(again)).toEqual(comparable(first));
    expect(again.timings.map((t) => t.stage)).toEqual(['result_cache']);
    expect(await cacheStats()).toEqual(before);
    // Another request on the same pixels: the stages run, the encoder serves its cached features.
    const variant = await segment({ ...req, minScore: 1e-6 });
    const after = await cacheStats();
    expect(comparable(variant)).toEqual(comparable(first));
    expect(Number(after.hits)).toBe(Number(before.hits) + 1);
    expect(Number(after.computations)).toBe(Number(before.computations));
  });

  it('segments automatic detections into well-formed nuclei', async () => {
    const r = await segment(request(smallPng, { promptMode: PromptMode.PROMPT_MODE_AUTO, returnMasks: false }));
    expectWellFormed(r, 256, 256);
    for (const n of r.nuclei) expect(n.source).toBe(PromptSource.PROMPT_SOURCE_AUTO);
    expect(r.imageId).toBe(first.imageId);
  });

  it('tiles a large image and stitches it without duplicates or nuclei cut at seams', async () => {
    const layout = planTiles(600, 500, model.inputSize, OVERLAP);
    expect(layout.tiles.length).toBeGreaterThan(1);
    const seamsX = layout.colBounds.slice(1, -1);
    const seamsY = layout.rowBounds.slice(1, -1);
    // Nuclei centred on every seam and seam crossing, and between the seams.
    const xs = [40, ...seamsX, ...seamsX.map((s) => s + 40), 560].sort((a, b) => a - b);
    const ys = [40, ...seamsY, ...seamsY.map((s) => s + 45), 460].sort((a, b) => a - b);
    const blobs = blobGrid(xs, ys);
    const png = await syntheticPng(600, 500, blobs, 7);
    const r = await segment(request(png, { prompts: pointPrompts(blobs) }));
    expectWellFormed(r, 600, 500);
    expect(r.tiles).toBe(layout.tiles.length);
    // Every prompt is decoded by exactly one tile (its owner), so none is lost or reported twice.
    expect(decodedPrompts(r.imageId)).toBe(blobs.length);
    const found = expectPromptsCovered(r, blobs, 0.9);
    // A nucleus on a seam is segmented whole: its mask reaches well past the seam on both sides.
    for (const [b, n] of found) {
      for (const s of seamsX.filter((q) => q === b.x)) {
        expect(n.bbox!.x0, `nucleus at seam x=${s}`).toBeLessThanOrEqual(s - 3);
        expect(n.bbox!.x1, `nucleus at seam x=${s}`).toBeGreaterThanOrEqual(s + 3);
      }
      for (const s of seamsY.filter((q) => q === b.y)) {
        expect(n.bbox!.y0, `nucleus at seam y=${s}`).toBeLessThanOrEqual(s - 3);
        expect(n.bbox!.y1, `nucleus at seam y=${s}`).toBeGreaterThanOrEqual(s + 3);
      }
    }
    expect([...found.keys()].filter((b) => seamsX.includes(b.x) || seamsY.includes(b.y)).length).toBeGreaterThan(4);
    // Seam nuclei are as big as the others (a cut one would be about half).
    const areas = r.nuclei.map((n) => n.measurements!.areaPx).sort((a, b) => a - b);
    const median = areas[Math.floor(areas.length / 2)];
    for (const [b, n] of found) {
      if (seamsX.includes(b.x) || seamsY.includes(b.y)) expect(n.measurements!.areaPx).toBeGreaterThan(0.6 * median);
    }
  });

  it('refines new points on a segmented image without calling the encoder', async () => {
    const before = await cacheStats();
    const points = [small[0], small[5]].map((b) => ({ positive: [{ x: b.x + 1, y: b.y }], negative: [{ x: b.x + 30, y: b.y }] }));
    const r = await unary(
      stack.segmentation,
      stack.segmentation.refine,
      { imageId: first.imageId, prompts: points, returnLabelMap: true, returnMasks: false },
      { timeoutMs: 60_000 },
    );
    const after = await cacheStats();
    expect(after).toEqual(before);
    expect(r.imageId).toBe(first.imageId);
    expectWellFormed(r, 256, 256, REFINE_STAGES);
    expect(r.nuclei.length).toBeGreaterThanOrEqual(1);
    expect(r.nuclei.length).toBeLessThanOrEqual(2);
    expect(r.timings.find((t) => t.stage === 'encoder')).toBeUndefined();
    const unknown = await unary(
      stack.segmentation,
      stack.segmentation.refine,
      { imageId: 'f'.repeat(64), prompts: points, returnLabelMap: false, returnMasks: false },
      { timeoutMs: 10_000 },
    ).catch((e: { code: number; details: string }) => e);
    expect((unknown as { code: number }).code).toBe(status.NOT_FOUND);
    expect((unknown as { details: string }).details).toMatch(/call Segment first/);
  });

  it('answers bad input with INVALID_ARGUMENT naming the problem, and keeps serving', async () => {
    const one = await sharp({ create: { width: 1, height: 1, channels: 3, background: 'red' } })
      .png()
      .toBuffer();
    const huge = await sharp({ create: { width: 700, height: 700, channels: 3, background: 'white' } })
      .png()
      .toBuffer();
    const pdf = Buffer.from('%PDF-1.4\n%\u00e2\u00e3\n1 0 obj\n<<>>\nendobj\n');
    const bmp = Buffer.concat([Buffer.from('BM'), Buffer.alloc(64, 1)]);
    const corrupt = Buffer.concat([smallPng.subarray(0, 64), Buffer.alloc(256, 7)]);
    const prompt = (x: number, y: number) => ({ positive: [{ x, y }], negative: [] });
    const cases: Array<[string, SegmentRequest, RegExp]> = [
      ['corrupt bytes', request(corrupt), /corrupt/],
      ['empty image', request(Buffer.alloc(0)), /empty/],
      ['1x1 image', request(one), /1x1 pixels, smaller than the minimum/],
      ['over the pixel limit', request(huge), /700x700 = 490000 pixels, over the limit of 400000/],
      ['PDF', request(pdf), /PDF images are not supported; send PNG, JPEG, TIFF, WebP or GIF/],
      ['BMP', request(bmp), /BMP images are not supported/],
      [
        'point outside',
        request(smallPng, { prompts: [prompt(300, 10)] }),
        /prompts\[0\]\.positive\[0\] \(x=300, y=10\) is outside the 256x256 image/,
      ],
      ['negative coordinates', request(smallPng, { prompts: [prompt(10, -1)] }), /outside the 256x256 image/],
      [
        'too many prompts',
        request(smallPng, { prompts: Array.from({ length: MAX_PROMPTS + 1 }, () => prompt(10, 10)) }),
        /too many prompts: 201, at most 200/,
      ],
      [
        'malformed box',
        request(smallPng, { prompts: [{ positive: [], negative: [], box: { x0: 50, y0: 50, x1: 40, y1: 60 } }] }),
        /box .* is malformed/,
      ],
      ['empty prompt', request(smallPng, { prompts: [{ positive: [], negative: [{ x: 5, y: 5 }] }] }), /no positive point and no box/],
      ['wrong model', request(smallPng, { model: 'sam-vit-h' }), /model "sam-vit-h" is not served here/],
      ['manual mode without prompts', request(smallPng, { promptMode: PromptMode.PROMPT_MODE_MANUAL }), /MANUAL needs at least one prompt/],
    ];
    for (const [what, req, pattern] of cases) {
      const err = await segmentError(req);
      expect(err.code, what).toBe(status.INVALID_ARGUMENT);
      expect(err.details, what).toMatch(pattern);
    }
    const ok = await segment(request(smallPng, { prompts: pointPrompts(small.slice(0, 2)) }));
    expect(ok.imageId).toBe(first.imageId);
    expectWellFormed(ok, 256, 256);
  });

  it('traces one Segment call across gateway, prompter, encoder and every decoder batch', async () => {
    const blobs = blobGrid([30, 200, 330, 470], [60, 200]);
    const png = await syntheticPng(500, 260, blobs, 3);
    const r = await segment(request(png, { prompts: pointPrompts(blobs) }));
    const { root, trace } = segmentTrace(r.imageId);
    const byService = (svc: string, name: string, kind: string) => trace.filter((s) => s.service === svc && s.name.endsWith(name) && s.kind === kind);
    expect(byService('prompter', 'Prompter/Detect', 'SERVER').length).toBeGreaterThan(0);
    expect(byService('encoder', 'Encoder/Encode', 'SERVER').length).toBeGreaterThan(0);
    const decodeClients = byService('gateway', 'Decoder/Decode', 'CLIENT');
    const decodeServers = trace.filter((s) => s.service.startsWith('decoder') && s.name.endsWith('Decoder/Decode') && s.kind === 'SERVER');
    // 8 prompts over 2 tiles in batches of 4: at least one batch per tile.
    expect(decodeClients.length).toBeGreaterThanOrEqual(2);
    expect(decodeServers.length).toBe(decodeClients.length);
    const clientIds = new Set(decodeClients.map((s) => s.spanId));
    for (const s of decodeServers) expect(clientIds.has(s.parentSpanId!)).toBe(true);
    for (const s of decodeClients) {
      expect(s.attributes['cfrsam.digest']).toMatch(/^[0-9a-f]{64}$/);
      expect(Number(s.attributes['cfrsam.batch_size'])).toBeGreaterThan(0);
    }
    // Every span of the call hangs off the root (one trace, no orphans).
    const ids = new Set(trace.map((s: SpanRecord) => s.spanId));
    for (const s of trace) if (s !== root) expect(ids.has(s.parentSpanId!), `${s.service} ${s.name}`).toBe(true);
    expect(byService('gateway', 'gateway.decode_image', 'INTERNAL')).toHaveLength(1);
  });

  it("sends each tile's Prepare with its Encode; the decoder waits at that encoder for the features", async () => {
    const blobs = blobGrid([40, 200, 330], [60, 190]);
    const png = await syntheticPng(420, 260, blobs, 11);
    const r = await segment(request(png));
    const { trace } = segmentTrace(r.imageId);
    const encodes = trace.filter((s) => s.service === 'gateway' && s.kind === 'CLIENT' && s.name.endsWith('Encoder/Encode'));
    const prepares = trace.filter((s) => s.service === 'gateway' && s.kind === 'CLIENT' && s.name.endsWith('Decoder/Prepare'));
    expect(encodes.length).toBeGreaterThan(0);
    expect(prepares.length).toBeGreaterThan(0);
    for (const prepare of prepares) {
      const digest = String(prepare.attributes['cfrsam.digest']);
      const encode = encodes.find((e) => String(e.attributes['cfrsam.digest']).split(',').includes(digest));
      expect(encode, `the Encode of tile ${digest.slice(0, 12)}`).toBeDefined();
      // Sent before the Encode answered (not after it, as before).
      expect(prepare.startMs).toBeLessThan(encode!.startMs + encode!.durationMs);
      // The decoder fetched the features itself, from an encoder, under this Prepare.
      const server = trace.find((s) => s.parentSpanId === prepare.spanId && s.kind === 'SERVER');
      expect(server).toBeDefined();
      const fetch = trace.find((s) => s.parentSpanId === server!.spanId && s.kind === 'CLIENT' && s.name.endsWith('Encoder/Encode'));
      expect(fetch, 'the decoder asked an encoder for the features').toBeDefined();
      expect(fetch!.attributes['rpc.grpc.status_code']).toBe(0);
    }
  });

  it('a Prepare waits for features only when asked (features_wait_ms): evicted ones are reported at once', async () => {
    const decoder = makeClient(stagesProto.DecoderClient, stack.decoders[0], { maxMessageBytes: 64 * 1024 * 1024 });
    const freshTile = (seed: number) => {
      const rgb = Buffer.alloc(model.inputSize * model.inputSize * 3);
      for (let i = 0; i < rgb.length; i++) rgb[i] = (i * 7919 + seed * 104729) % 251;
      return { rgb, digest: digestTile(rgb, model.version) };
    };
    const prepare = (t: { rgb: Buffer; digest: string }, featuresWaitMs?: number) =>
      unary(decoder, decoder.prepare, { digest: t.digest, rgb: t.rgb, featuresFrom: stack.encoder, modelVersion: model.version, featuresWaitMs });
    try {
      // Features no encoder holds, no wait asked (a Refine long after its Segment): FEATURES_MISSING
      // without the decoder's 1 s wait (its cap) being spent.
      const absent = freshTile(Date.now() % 1000);
      const started = Date.now();
      const err = await prepare(absent).catch((e: unknown) => e);
      expect(errorReason(err)).toBe(ErrorReason.FEATURES_MISSING);
      expect(Date.now() - started).toBeLessThan(900);
      // The same, with a wait asked and the tile's Encode sent after the Prepare: the fetch waits
      // at the encoder for it and the Prepare succeeds.
      const early = prepare(absent, 1_000);
      await new Promise((resolve) => setTimeout(resolve, 50));
      await unary(stack.encoderClient, stack.encoderClient.encode, {
        tiles: [{ digest: absent.digest, rgb: absent.rgb }],
        modelVersion: model.version,
        returnFeatures: false,
      });
      expect((await early).alreadyPrepared).toBe(false);
    } finally {
      decoder.close();
    }
  });

  it('grows each nucleus into its cell when asked (cell_expansion_um), and refuses a bad distance', async () => {
    const blobs = blobGrid([50, 150, 250], [60, 180]);
    const png = await syntheticPng(320, 256, blobs, 13);
    const plain = await segment(request(png, { prompts: pointPrompts(blobs), mpp: 0.5 }));
    const grown = await segment(request(png, { prompts: pointPrompts(blobs), mpp: 0.5, cellExpansionUm: 3, returnLabelMap: false }));
    expect(grown.labelMap).toBeUndefined();
    expect(grown.nuclei.map((n) => n.id)).toEqual(plain.nuclei.map((n) => n.id));
    expect(plain.nuclei.every((n) => n.cell === undefined)).toBe(true);
    for (const n of grown.nuclei) {
      const cell = n.cell!;
      expect(cell, `nucleus ${n.id}`).toBeDefined();
      expect(cell.polygon.length).toBeGreaterThanOrEqual(3);
      // 3 µm at 0.5 µm/px: up to 6 px around the nucleus, so the cell is larger, and holds it.
      expect(cell.areaPx).toBeGreaterThan(n.measurements!.areaPx);
      const xs = cell.polygon.map((p) => p.x);
      const ys = cell.polygon.map((p) => p.y);
      expect(Math.min(...xs)).toBeLessThanOrEqual(n.bbox!.x0);
      expect(Math.max(...xs)).toBeGreaterThanOrEqual(n.bbox!.x1);
      expect(Math.min(...ys)).toBeLessThanOrEqual(n.bbox!.y0);
      expect(Math.max(...ys)).toBeGreaterThanOrEqual(n.bbox!.y1);
      expect(cell.nucleusHematoxylinOd).toBeGreaterThan(0);
    }
    for (const um of [-1, 51, Number.NaN]) {
      const err = await segmentError(request(png, { cellExpansionUm: um }));
      expect(err.code, String(um)).toBe(status.INVALID_ARGUMENT);
      expect(err.details).toMatch(/cell_expansion_um must be in \[0, 50\]/);
    }
  });

  it('propagates the client deadline', async () => {
    const blobs = blobGrid([40, 300, 560], [40, 250, 460]);
    const png = await syntheticPng(600, 500, blobs, 5);
    const err = await segment(request(png, { prompts: pointPrompts(blobs) }), 30).catch((e: { code: number }) => e);
    // Either it ran out of time, or the gateway, knowing its throughput from earlier answers,
    // refused it at once because 30 ms cannot fit the work (admission, test/overload.test.ts).
    if ((err as { code: number }).code === status.RESOURCE_EXHAUSTED) expect(errorDetailsOf(err).metadata?.admission).toBe('deadline');
    else expect((err as { code: number }).code).toBe(status.DEADLINE_EXCEEDED);
    const ok = await segment(request(smallPng, { prompts: pointPrompts(small.slice(0, 1)) }));
    expectWellFormed(ok, 256, 256);
  });

  it('cfrsam segment writes GeoJSON, CSV, label map, sidecar and overlay', async () => {
    const out = fs.mkdtempSync(path.join(os.tmpdir(), 'cfrsam-segment-'));
    try {
      const imagePath = path.join(out, 'tile.png');
      fs.writeFileSync(imagePath, smallPng);
      const stdout = new PassThrough();
      const stderr = new PassThrough();
      let text = '';
      stdout.on('data', (d) => (text += d));
      stderr.on('data', (d) => (text += d));
      const code = await runSegment([imagePath, '--gateway', stack.gateway, '--out', path.join(out, 'res')], { stdout, stderr });
      expect(code, text).toBe(0);
      expect(text).toMatch(/tile: 256x256, 1 tile, \d+ nuclei/);
      const res = (f: string) => path.join(out, 'res', f);
      const geo = JSON.parse(fs.readFileSync(res('tile.geojson'), 'utf8'));
      expect(geo.type).toBe('FeatureCollection');
      const sidecar = JSON.parse(fs.readFileSync(res('tile.json'), 'utf8'));
      expect(sidecar.classNames).toEqual(model.classes.map((c) => c.name));
      expect(geo.features).toHaveLength(sidecar.instances);
      for (const f of geo.features) {
        expect(f.geometry.type).toBe('Polygon');
        expect(f.properties.objectType).toBe('detection');
        const ring = f.geometry.coordinates[0];
        expect(ring[0]).toEqual(ring[ring.length - 1]);
      }
      const csv = fs.readFileSync(res('tile.csv'), 'utf8').trim().split('\n');
      expect(csv[0]).toMatch(/^id,class_index,class,score/);
      expect(csv).toHaveLength(sidecar.instances + 1);
      const labels = await sharp(res('tile.labels.png')).metadata();
      expect([labels.width, labels.height, labels.depth, labels.channels]).toEqual([256, 256, 'ushort', 1]);
      const overlay = await sharp(res('tile.overlay.png')).metadata();
      expect([overlay.width, overlay.height]).toEqual([256, 256]);
    } finally {
      fs.rmSync(out, { recursive: true, force: true });
    }
  });

  it('still answers completely when a decoder replica is killed in the middle of a request', async () => {
    const xs = Array.from({ length: 22 }, (_, i) => 18 + i * 26);
    const ys = Array.from({ length: 8 }, (_, i) => 20 + i * 30);
    const blobs = blobGrid(xs, ys).slice(0, MAX_PROMPTS);
    const png = await syntheticPng(600, 250, blobs, 11);
    const req = request(png, { prompts: pointPrompts(blobs), returnMasks: false });
    const reference = await segment(req);
    expect(reference.nuclei.length).toBeGreaterThan(0.5 * blobs.length);
    const victim = stack.processes.find((p) => p.name === 'decoder-1')!;
    const victimSpans = () => stack.spans(victim.name).filter((s) => s.name.endsWith('Decoder/Decode')).length;
    const decodesBefore = victimSpans();
    // Not the same request (that would be answered from the result cache): the same work.
    const pending = segment({ ...req, minScore: 1e-6 });
    // Kill the replica as soon as it has answered a Decode of this request.
    const deadline = Date.now() + 60_000;
    while (victimSpans() === decodesBefore && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    victim.child.kill('SIGKILL');
    const r = await pending;
    await victim.exited;
    expect(comparable(r)).toEqual(comparable(reference));
    const gatewayLog = (stack.logs.get('gateway') ?? []).join('\n');
    expect(gatewayLog).toMatch(new RegExp(`decoder ${victim.address.replace(/\./g, '\\.')} failed .* trying the next replica`));
  });
});
