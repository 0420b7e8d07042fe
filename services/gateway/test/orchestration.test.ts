// The gateway's orchestration (SegmentationPipeline) driven through its stage ports by in-memory
// fakes, no processes: a synthetic image of dark disks on a light background, a fake prompter
// that finds the disks in a tile, a fake encoder that records what it was given, and a fake
// decoder that returns the disk under each prompt. What is checked is the orchestration: prompt
// modes, tiling and stitching at the edges, Refine on tiles the prompter has not seen, a failing
// batch cancelling its siblings, deadlines, and the Refine cache's accounting.
import * as path from 'node:path';
import sharp from 'sharp';
import { describe, expect, it } from 'vitest';
import { loadManifest, packBits } from '@cfrsam/contract';
import { grpcError, segmentationProto, status, type stagesProto } from '@cfrsam/rpc';
import { DEFAULT_GATEWAY_CONFIG, type GatewayConfig } from '../src/config';
import { SegmentationPipeline } from '../src/pipeline';
import type { StageCall, StagePorts, StageTile } from '../src/stages/ports';

const { PromptMode, PromptSource } = segmentationProto;
const manifest = loadManifest(path.join(__dirname, '../../../models/tiny'), { graphs: [], verifyGraphs: false });
const S = manifest.inputSize;
const K = manifest.classes.length;
const RADIUS = 6;

interface Disk {
  x: number;
  y: number;
}

function isDark(rgb: Uint8Array, i: number): boolean {
  return rgb[i * 3] < 128;
}

async function diskImage(width: number, height: number, disks: Disk[]): Promise<Buffer> {
  const raw = Buffer.alloc(width * height * 3, 235);
  for (const d of disks) {
    for (let y = Math.max(0, d.y - RADIUS); y <= Math.min(height - 1, d.y + RADIUS); y++) {
      for (let x = Math.max(0, d.x - RADIUS); x <= Math.min(width - 1, d.x + RADIUS); x++) {
        if ((x - d.x) ** 2 + (y - d.y) ** 2 <= RADIUS * RADIUS) raw.fill(60, (y * width + x) * 3, (y * width + x) * 3 + 3);
      }
    }
  }
  return sharp(raw, { raw: { width, height, channels: 3 } })
    .png()
    .toBuffer();
}

/** Dark connected components of a tile: [pixel indices]. */
function components(rgb: Uint8Array): number[][] {
  const seen = new Uint8Array(S * S);
  const out: number[][] = [];
  for (let start = 0; start < S * S; start++) {
    if (seen[start] || !isDark(rgb, start)) continue;
    const comp: number[] = [];
    const stack = [start];
    seen[start] = 1;
    while (stack.length) {
      const p = stack.pop()!;
      comp.push(p);
      const x = p % S;
      const y = (p - x) / S;
      for (const [dx, dy] of [
        [1, 0],
        [-1, 0],
        [0, 1],
        [0, -1],
      ]) {
        const nx = x + dx;
        const ny = y + dy;
        if (nx < 0 || ny < 0 || nx >= S || ny >= S) continue;
        const q = ny * S + nx;
        if (!seen[q] && isDark(rgb, q)) {
          seen[q] = 1;
          stack.push(q);
        }
      }
    }
    out.push(comp);
  }
  return out;
}

interface FakeOptions {
  /** Fails decodeTile for tiles whose digest this returns true, after `failAfterMs`. */
  failDecode?: (tile: StageTile) => boolean;
  failAfterMs?: number;
  /** Delay of every decodeTile (ms). */
  decodeDelayMs?: number;
  /** The tiles the prompter calls blurred (its blur gate). */
  blurred?: (tile: StageTile) => boolean;
}

/** In-memory stages with call logs. */
function fakeStages(options: FakeOptions = {}) {
  const log = {
    detect: [] as string[],
    blurred: [] as string[],
    encode: [] as string[],
    decode: [] as { digest: string; prompts: number }[],
    aborted: 0,
    calls: [] as StageCall[],
    /** Tiles in flight at the gateway as each decodeTile saw it. */
    tilesInFlight: [] as (number | undefined)[],
  };
  const stages: StagePorts = {
    prompter: {
      async detect(tiles, call) {
        log.calls.push(call);
        const out = new Map<string, stagesProto.TileDetections>();
        for (const t of tiles) {
          log.detect.push(t.digest);
          const blurred = options.blurred?.(t) ?? false;
          if (blurred) log.blurred.push(t.digest);
          out.set(t.digest, {
            digest: t.digest,
            blurred,
            detections: components(t.rgb).map((comp) => {
              const cx = comp.reduce((a, p) => a + (p % S), 0) / comp.length + 0.5;
              const cy = comp.reduce((a, p) => a + Math.floor(p / S), 0) / comp.length + 0.5;
              const probs = Array.from({ length: K }, (_, k) => (k === 1 ? 0.7 : 0.3 / (K - 1)));
              return { x: cx, y: cy, classIndex: 1, foreground: 0.95, classProbabilities: probs };
            }),
          });
        }
        return out;
      },
    },
    encoder: {
      async encode(tiles) {
        for (const t of tiles) log.encode.push(t.digest);
        return { cacheHits: 0 };
      },
    },
    decoder: {
      async decodeTile(tile, prompts, call) {
        log.calls.push(call);
        log.decode.push({ digest: tile.digest, prompts: prompts.length });
        if (options.decodeDelayMs || options.failDecode?.(tile)) {
          const ms = options.failDecode?.(tile) ? (options.failAfterMs ?? 5) : options.decodeDelayMs!;
          await new Promise<void>((resolve, reject) => {
            const timer = setTimeout(resolve, ms);
            call.signal?.addEventListener('abort', () => {
              clearTimeout(timer);
              log.aborted++;
              reject(grpcError(status.CANCELLED, 'cancelled'));
            });
          });
        }
        log.tilesInFlight.push(call.tilesInFlight?.()); // after the delay: concurrent requests have all started
        if (options.failDecode?.(tile)) throw grpcError(status.INTERNAL, 'decoder exploded');
        const comps = components(tile.rgb);
        return prompts.map((p) => {
          const px = Math.min(S - 1, Math.floor(p.coords[0]));
          const py = Math.min(S - 1, Math.floor(p.coords[1]));
          const comp = comps.find((c) => c.includes(py * S + px));
          if (!comp) return { x0: 0, y0: 0, width: 0, height: 0, bits: Buffer.alloc(0), predictedIou: 0, meanProbability: 0 };
          const xs = comp.map((q) => q % S);
          const ys = comp.map((q) => Math.floor(q / S));
          const x0 = Math.min(...xs);
          const y0 = Math.min(...ys);
          const w = Math.max(...xs) - x0 + 1;
          const h = Math.max(...ys) - y0 + 1;
          const mask = new Uint8Array(w * h);
          for (const q of comp) mask[(Math.floor(q / S) - y0) * w + ((q % S) - x0)] = 1;
          return { x0, y0, width: w, height: h, bits: Buffer.from(packBits(mask, w, h)), predictedIou: 0.9, meanProbability: 0.9 };
        });
      },
    },
    close() {},
  };
  return { stages, log };
}

function pipelineWith(stages: StagePorts, overrides: Partial<GatewayConfig> = {}) {
  const config: GatewayConfig = { ...DEFAULT_GATEWAY_CONFIG, prompter: ['p'], encoder: ['e'], decoders: ['d'], ...overrides };
  return new SegmentationPipeline(manifest, config, stages);
}

function request(image: Buffer, extra: Partial<segmentationProto.SegmentRequest> = {}): segmentationProto.SegmentRequest {
  return segmentationProto.SegmentRequest.fromPartial({ image, ...extra });
}

function nearest(nuclei: segmentationProto.Nucleus[], d: Disk) {
  return nuclei.find((n) => Math.hypot(n.centroid!.x - d.x - 0.5, n.centroid!.y - d.y - 0.5) < 2);
}

// Disks on a 600 x 500 image: in tile interiors, on the seams of the 256/64 tiling, at the border.
const DISKS: Disk[] = [
  { x: 40, y: 40 },
  { x: 200, y: 100 },
  { x: 224, y: 230 }, // in the overlap of four tiles
  { x: 300, y: 60 },
  { x: 420, y: 300 },
  { x: 590, y: 490 }, // cut by the image corner
  { x: 150, y: 420 },
  { x: 500, y: 120 },
];

describe('SegmentationPipeline over in-memory stages', () => {
  it('automatic mode: every disk once, across seams, with the class and score of its detection', async () => {
    const { stages, log } = fakeStages();
    const p = pipelineWith(stages);
    const res = await p.segment(request(await diskImage(600, 500, DISKS)));
    expect(res.nuclei).toHaveLength(DISKS.length);
    for (const d of DISKS) {
      const n = nearest(res.nuclei, d);
      expect(n, `disk at ${d.x},${d.y}`).toBeDefined();
      expect(n!.source).toBe(PromptSource.PROMPT_SOURCE_AUTO);
      expect(n!.classIndex).toBe(1);
      expect(n!.score).toBeCloseTo(0.9 * 0.95 * 0.7, 5);
    }
    // Every tile went to the prompter and the encoder exactly once.
    expect(log.detect.length).toBe(res.tiles);
    expect(new Set(log.encode)).toEqual(new Set(log.detect));
  });

  it("counts the tiles the prompter calls blurred, and says so in the image's notes", async () => {
    const image = await diskImage(600, 500, DISKS);
    const { stages: plain } = fakeStages();
    const sharp = await pipelineWith(plain).segment(request(image));
    expect(sharp.blurredTiles).toBe(0);
    expect(sharp.imageNotes ?? '').not.toMatch(/blurred/);
    // Tiles holding two or more nuclei play the blurred ones here.
    const { stages, log } = fakeStages({ blurred: (t) => components(t.rgb).length >= 2 });
    const res = await pipelineWith(stages).segment(request(image));
    expect(log.blurred.length).toBeGreaterThan(0);
    expect(log.blurred.length).toBeLessThan(res.tiles);
    expect(res.blurredTiles).toBe(log.blurred.length);
    expect(res.imageNotes).toContain(`${log.blurred.length} of ${res.tiles} tiles look blurred at the model's resolution`);
    expect(res.nuclei).toHaveLength(sharp.nuclei.length); // what the prompter found is served as before
  });

  it('automatic mode skips glass tiles (no stained tissue) but not a tile with a lone nucleus on glass', async () => {
    // Stained tissue on the left (pink, purple nuclei), white glass on the right with one nucleus.
    const width = 600;
    const height = 500;
    const raw = Buffer.alloc(width * height * 3, 245);
    for (let y = 0; y < height; y++) for (let x = 0; x < 280; x++) raw.set([236, 190, 214], (y * width + x) * 3);
    const disks: Disk[] = [
      { x: 60, y: 60 },
      { x: 200, y: 300 },
      { x: 500, y: 100 },
    ];
    for (const d of disks) {
      for (let y = d.y - RADIUS; y <= d.y + RADIUS; y++) {
        for (let x = d.x - RADIUS; x <= d.x + RADIUS; x++) {
          if ((x - d.x) ** 2 + (y - d.y) ** 2 <= RADIUS * RADIUS) raw.set([72, 38, 118], (y * width + x) * 3);
        }
      }
    }
    const png = await sharp(raw, { raw: { width, height, channels: 3 } })
      .png()
      .toBuffer();
    const { stages, log } = fakeStages();
    const res = await pipelineWith(stages).segment(request(png));
    for (const d of disks) expect(nearest(res.nuclei, d), `disk at ${d.x},${d.y}`).toBeDefined();
    // 9 tiles; the right column's lower two hold only glass (the lone nucleus is in the top one).
    expect(res.tiles).toBe(9);
    expect(log.detect).toHaveLength(7);
    expect(new Set(log.encode)).toEqual(new Set(log.detect));
    // Off: every tile runs.
    const all = fakeStages();
    await pipelineWith(all.stages, { glassTileMaxTissue: 0 }).segment(request(png));
    expect(all.log.detect).toHaveLength(9);
  });

  it('manual mode: only the prompted tiles run, and each prompt gives its nucleus', async () => {
    const { stages, log } = fakeStages();
    const p = pipelineWith(stages);
    const prompts = [DISKS[0], DISKS[4]].map((d) => ({ positive: [{ x: d.x, y: d.y }], negative: [] }));
    const res = await p.segment(request(await diskImage(600, 500, DISKS), { prompts }));
    expect(res.nuclei).toHaveLength(2);
    for (const n of res.nuclei) expect(n.source).toBe(PromptSource.PROMPT_SOURCE_MANUAL);
    expect(log.detect.length).toBe(2); // the two owner tiles, for classes
    expect(res.tiles).toBeGreaterThan(2);
  });

  it('AUTO_AND_MANUAL: a manual prompt replaces the automatic detection around it', async () => {
    const { stages } = fakeStages();
    const p = pipelineWith(stages);
    const prompts = [{ positive: [{ x: DISKS[1].x + 1, y: DISKS[1].y }], negative: [] }];
    const res = await p.segment(request(await diskImage(600, 500, DISKS), { prompts, promptMode: PromptMode.PROMPT_MODE_AUTO_AND_MANUAL }));
    expect(res.nuclei).toHaveLength(DISKS.length);
    const replaced = nearest(res.nuclei, DISKS[1])!;
    expect(replaced.source).toBe(PromptSource.PROMPT_SOURCE_MANUAL);
    expect(replaced.classIndex).toBe(1); // the class of the detection it replaced
    expect(res.nuclei.filter((n) => n.source === PromptSource.PROMPT_SOURCE_AUTO)).toHaveLength(DISKS.length - 1);
  });

  it('Refine on a tile the prompter has not seen classifies it first, and the cache counts the growth', async () => {
    const { stages, log } = fakeStages();
    const p = pipelineWith(stages);
    const image = await diskImage(600, 500, DISKS);
    const seg = await p.segment(request(image, { prompts: [{ positive: [{ x: DISKS[0].x, y: DISKS[0].y }], negative: [] }] }));
    const before = p.stats().refineCache.bytes;
    const detectsBefore = log.detect.length;
    const refined = await p.refine(
      segmentationProto.RefineRequest.fromPartial({
        imageId: seg.imageId,
        prompts: [{ positive: [{ x: DISKS[4].x, y: DISKS[4].y }], negative: [] }],
      }),
    );
    expect(refined.nuclei).toHaveLength(1);
    expect(refined.nuclei[0].classIndex).toBe(1);
    expect(log.detect.length).toBe(detectsBefore + 1);
    expect(p.stats().refineCache.bytes).toBeGreaterThan(before);
    // Refine never encodes: the decoders fetch features themselves.
    expect(log.encode.length).toBe(1);
    await expect(
      p.refine(segmentationProto.RefineRequest.fromPartial({ imageId: 'f'.repeat(64), prompts: [{ positive: [{ x: 1, y: 1 }], negative: [] }] })),
    ).rejects.toMatchObject({
      code: status.NOT_FOUND,
    });
  });

  it('a failing tile cancels its siblings and the request answers with its status', async () => {
    let failing: string | undefined;
    const { stages, log } = fakeStages({
      failDecode: (t) => (failing ??= t.digest) === t.digest,
      failAfterMs: 30,
      decodeDelayMs: 2_000,
    });
    const p = pipelineWith(stages);
    const started = Date.now();
    await expect(p.segment(request(await diskImage(600, 500, DISKS)))).rejects.toMatchObject({ code: status.INTERNAL });
    expect(Date.now() - started).toBeLessThan(1_500);
    expect(log.aborted).toBeGreaterThan(0);
    expect(p.stats().inFlight).toBe(0);
  });

  it('passes the client deadline to every stage call, and sets one when the client has none', async () => {
    const { stages, log } = fakeStages();
    const p = pipelineWith(stages, { defaultTimeoutMs: 7_000 });
    const deadline = new Date(Date.now() + 20_000);
    await p.segment(request(await diskImage(300, 300, DISKS.slice(0, 2))), { deadline });
    expect(log.calls.length).toBeGreaterThan(0);
    for (const c of log.calls) expect(c.deadline).toEqual(deadline);
    log.calls.length = 0;
    const t0 = Date.now();
    await p.segment(request(await diskImage(300, 300, DISKS.slice(1, 3))));
    expect(log.calls.length).toBeGreaterThan(0);
    for (const c of log.calls) {
      expect(c.deadline!.getTime()).toBeGreaterThanOrEqual(t0 + 7_000);
      expect(c.deadline!.getTime()).toBeLessThanOrEqual(Date.now() + 7_000);
    }
  });

  it('tiles edge cases: a 1-pixel remainder and an image smaller than a tile', async () => {
    for (const [w, h, disks] of [
      [
        S + 1,
        300,
        [
          { x: S - 3, y: 100 },
          { x: 30, y: 290 },
        ],
      ],
      [
        100,
        80,
        [
          { x: 50, y: 40 },
          { x: 95, y: 75 },
        ],
      ],
    ] as const) {
      const { stages } = fakeStages();
      const res = await pipelineWith(stages).segment(request(await diskImage(w, h, [...disks])));
      expect(res.width).toBe(w);
      expect(res.height).toBe(h);
      expect(res.nuclei).toHaveLength(disks.length);
      for (const n of res.nuclei) {
        expect(n.bbox!.x1).toBeLessThanOrEqual(w);
        expect(n.bbox!.y1).toBeLessThanOrEqual(h);
      }
    }
  });

  it('segments a 20x image at the model resolution and reports it in the image pixels', async () => {
    // The same scene at 0.25 um/px (the model's) and halved to 0.5 um/px (20x).
    const disks40 = DISKS.slice(0, 5);
    const disks20 = disks40.map((d) => ({ x: Math.round(d.x / 2), y: Math.round(d.y / 2) }));
    const { stages } = fakeStages();
    const p = pipelineWith(stages);
    const at40 = await p.segment(request(await diskImage(600, 500, disks40)));
    const small = await sharp(await diskImage(600, 500, disks40))
      .resize(300, 250, { kernel: 'nearest' })
      .png()
      .toBuffer();
    const at20 = await p.segment(request(small, { mpp: 0.5 }));
    expect(at20.width).toBe(300);
    expect(at20.imageMpp).toBe(0.5);
    expect(at20.mppAssumed).toBe(false);
    expect(at20.modelMpp).toBe(manifest.mpp);
    expect(at20.nuclei).toHaveLength(at40.nuclei.length);
    for (const d of disks20) expect(at20.nuclei.some((n) => Math.hypot(n.centroid!.x - d.x, n.centroid!.y - d.y) < 2)).toBe(true);
    const area = (r: segmentationProto.SegmentResponse) => r.nuclei.map((n) => n.measurements!.areaUm2).reduce((a, b) => a + b, 0) / r.nuclei.length;
    // Same physical areas up to the discretisation of 3-pixel-radius disks at 20x (bench/scale.mjs
    // measures this on real MoNuSeg nuclei).
    expect(Math.abs(area(at20) / area(at40) - 1)).toBeLessThan(0.2);
    // Without an mpp the model's is assumed, and the response says so.
    const assumed = await p.segment(request(small));
    expect(assumed.mppAssumed).toBe(true);
    expect(assumed.imageMpp).toBe(manifest.mpp);
    // Manual prompts are given in the image's pixels.
    const manual = await p.segment(request(small, { mpp: 0.5, prompts: [{ positive: [{ x: disks20[1].x, y: disks20[1].y }], negative: [] }] }));
    expect(manual.nuclei).toHaveLength(1);
    expect(Math.hypot(manual.nuclei[0].centroid!.x - disks20[1].x, manual.nuclei[0].centroid!.y - disks20[1].y)).toBeLessThan(2);
  });

  it('tells the decoder port the tiles in flight over all requests (one request alone may spread its tile)', async () => {
    const { stages, log } = fakeStages({ decodeDelayMs: 40 });
    const p = pipelineWith(stages, { initialConcurrentRequests: 2 }); // admission would start at one request
    const one = await diskImage(S, S, [DISKS[0], DISKS[1]]);
    await p.segment(request(one));
    expect(log.tilesInFlight).toEqual([1]);
    // Two one-tile requests at once: the decodes see both tiles.
    log.tilesInFlight.length = 0;
    const [a, b] = [await diskImage(S, S, [DISKS[1]]), await diskImage(S, S, [{ x: 100, y: 200 }])];
    await Promise.all([p.segment(request(a)), p.segment(request(b))]);
    expect(log.tilesInFlight).toContain(2);
    // A 600 x 500 image alone: its 9 tiles (3 x 3 at the 64 px overlap).
    log.tilesInFlight.length = 0;
    await p.segment(request(await diskImage(600, 500, DISKS)));
    expect(Math.max(...log.tilesInFlight.map(Number))).toBe(9);
    // Nothing stays counted after the requests, failed ones included.
    const failing = fakeStages({ failDecode: () => true });
    const q = pipelineWith(failing.stages);
    await expect(q.segment(request(one))).rejects.toThrow(/decoder exploded/);
    await q.segment(request(one)).catch(() => undefined);
    expect(failing.log.tilesInFlight).toEqual([1, 1]);
  });

  it("prepares each tile together with its encode, while the prompter still works; a failed early prepare is not the request's", async () => {
    const { stages, log } = fakeStages();
    const events: string[] = [];
    let releasePrompter!: () => void;
    const prompterHeld = new Promise<void>((resolve) => (releasePrompter = resolve));
    const detect = stages.prompter.detect.bind(stages.prompter);
    stages.prompter.detect = async (tiles, call) => {
      events.push('detect:start');
      await prompterHeld;
      events.push('detect:end');
      return detect(tiles, call);
    };
    const prepared: string[] = [];
    stages.decoder.prepareTile = async (tile) => {
      events.push('prepare');
      prepared.push(tile.digest);
      // The early prepare has no say in the result: the port's decodeTile prepares again.
      if (prepared.length === 1) throw grpcError(status.UNAVAILABLE, 'decoder restarting');
    };
    const p = pipelineWith(stages, { tileBatchSize: 4, tileBatchConcurrency: 1 });
    const pending = p.segment(request(await diskImage(300, 300, DISKS.slice(0, 2))));
    await new Promise((r) => setTimeout(r, 20));
    // One batch of four tiles: each tile's Prepare went out with the batch's Detect and Encode
    // (the decoder waits at the encoder for the features), and the prompter has not answered.
    expect(events).toEqual(['prepare', 'prepare', 'prepare', 'prepare', 'detect:start']);
    expect(log.encode).toHaveLength(4);
    expect(events).not.toContain('detect:end');
    releasePrompter();
    const res = await pending;
    expect(res.nuclei).toHaveLength(2);
    expect(new Set(prepared)).toEqual(new Set(log.encode));
  });

  it('answers a repeated request from the result cache without running a stage', async () => {
    const { stages, log } = fakeStages();
    const p = pipelineWith(stages);
    const image = await diskImage(600, 500, DISKS);
    const first = await p.segment(request(image));
    const calls = [log.detect.length, log.encode.length, log.decode.length];
    const again = await p.segment(request(image));
    expect([log.detect.length, log.encode.length, log.decode.length]).toEqual(calls);
    expect(again.nuclei).toEqual(first.nuclei);
    expect(again.imageId).toBe(first.imageId);
    expect(again.timings.map((t) => t.stage)).toEqual(['result_cache']);
    expect(p.stats().resultHits).toBe(1);
    // Any other parameter is another request.
    await p.segment(request(image, { minScore: 0.5 }));
    expect(log.decode.length).toBeGreaterThan(calls[2]);
    // So is another image with the same parameters.
    await p.segment(request(await diskImage(600, 501, DISKS)));
    expect(p.stats().resultHits).toBe(1);
    // Off when its capacity is 0.
    const off = pipelineWith(fakeStages().stages, { resultCacheBytes: 0 });
    await off.segment(request(image));
    await off.segment(request(image));
    expect(off.stats().resultHits).toBe(0);
  });
});
