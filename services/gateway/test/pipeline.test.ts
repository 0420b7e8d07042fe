import { describe, expect, it } from 'vitest';
import { segmentationProto, status } from '@cfrsam/rpc';
import { cropToForeground, encodeRle, type PlacedMask, planTiles } from '@cfrsam/nuclei';
import { assembleNuclei, nucleusScore, type DecodedCandidate } from '../src/assemble';
import { Limiter } from '../src/limiter';
import { ownerOfPrompt, promptAnchor, resolvePromptMode, toTilePoints, validatePrompts } from '../src/prompts';
import { StageClock } from '../src/timing';

const { PromptMode, PromptSource } = segmentationProto;
const limits = { maxPrompts: 3, maxPointsPerPrompt: 4 };

function expectStatus(fn: () => unknown, code: number, pattern: RegExp) {
  try {
    fn();
  } catch (err) {
    expect((err as { code: number }).code).toBe(code);
    expect((err as Error).message).toMatch(pattern);
    return;
  }
  throw new Error('expected an error');
}

describe('prompts', () => {
  it('validates prompts with messages naming the prompt and the problem', () => {
    const p = (x: number, y: number) => ({ positive: [{ x, y }], negative: [] });
    validatePrompts([p(0, 0), p(99.9, 49.9)], 100, 50, limits);
    expectStatus(
      () => validatePrompts([p(1, 1), p(1, 1), p(1, 1), p(1, 1)], 100, 50, limits),
      status.INVALID_ARGUMENT,
      /too many prompts: 4, at most 3/,
    );
    expectStatus(
      () => validatePrompts([p(1, 1), p(100, 1)], 100, 50, limits),
      status.INVALID_ARGUMENT,
      /prompts\[1\]\.positive\[0\] \(x=100, y=1\) is outside the 100x50 image/,
    );
    expectStatus(
      () => validatePrompts([{ positive: [], negative: [{ x: 1, y: 1 }] }], 100, 50, limits),
      status.INVALID_ARGUMENT,
      /no positive point and no box/,
    );
    expectStatus(
      () => validatePrompts([{ positive: [{ x: NaN, y: 1 }], negative: [] }], 100, 50, limits),
      status.INVALID_ARGUMENT,
      /not a finite point/,
    );
    expectStatus(
      () => validatePrompts([{ positive: [], negative: [], box: { x0: 5, y0: 5, x1: 5, y1: 9 } }], 100, 50, limits),
      status.INVALID_ARGUMENT,
      /malformed/,
    );
    expectStatus(
      () => validatePrompts([{ positive: [], negative: [], box: { x0: 5, y0: 5, x1: 101, y1: 9 } }], 100, 50, limits),
      status.INVALID_ARGUMENT,
      /box .* is outside/,
    );
    const many = {
      positive: Array.from({ length: 3 }, () => ({ x: 1, y: 1 })),
      negative: [
        { x: 2, y: 2 },
        { x: 3, y: 3 },
      ],
    };
    expectStatus(() => validatePrompts([many], 100, 50, limits), status.INVALID_ARGUMENT, /5 points, at most 4/);
  });

  it('resolves prompt modes', () => {
    expect(resolvePromptMode(PromptMode.PROMPT_MODE_UNSPECIFIED, 0)).toEqual({ auto: true, manual: false });
    expect(resolvePromptMode(PromptMode.PROMPT_MODE_UNSPECIFIED, 2)).toEqual({ auto: false, manual: true });
    expect(resolvePromptMode(PromptMode.PROMPT_MODE_AUTO_AND_MANUAL, 2)).toEqual({ auto: true, manual: true });
    expectStatus(() => resolvePromptMode(PromptMode.PROMPT_MODE_AUTO, 1), status.INVALID_ARGUMENT, /AUTO takes no prompts/);
    expectStatus(() => resolvePromptMode(PromptMode.PROMPT_MODE_MANUAL, 0), status.INVALID_ARGUMENT, /MANUAL needs/);
    expectStatus(() => resolvePromptMode(42 as segmentationProto.PromptMode, 0), status.INVALID_ARGUMENT, /unknown prompt_mode 42/);
  });

  it('maps a prompt into its owner tile: first positive point, else the box centre', () => {
    const layout = planTiles(600, 500, 256, 64);
    const prompt = { positive: [{ x: 300, y: 20 }], negative: [{ x: 330, y: 25 }], box: { x0: 280, y0: 5, x1: 320, y1: 40 } };
    const tile = ownerOfPrompt(layout, prompt);
    expect(tile.core.x0 <= 300 && 300 < tile.core.x1).toBe(true);
    const pts = toTilePoints(prompt, tile, 256);
    expect(pts.labels).toEqual([1, 0, 2, 3]);
    expect(pts.coords).toEqual([300 - tile.x, 20 - tile.y, 330 - tile.x, 25 - tile.y, 280 - tile.x, 5 - tile.y, 320 - tile.x, 40 - tile.y]);
    expect(promptAnchor({ positive: [], negative: [], box: { x0: 10, y0: 20, x1: 30, y1: 60 } })).toEqual({ x: 20, y: 40 });
  });
});

describe('assembly', () => {
  const disk = (cx: number, cy: number, r: number): PlacedMask => {
    const x0 = Math.floor(cx - r);
    const y0 = Math.floor(cy - r);
    const w = Math.ceil(2 * r) + 1;
    const data = new Uint8Array(w * w);
    for (let y = 0; y < w; y++) for (let x = 0; x < w; x++) data[y * w + x] = (x0 + x + 0.5 - cx) ** 2 + (y0 + y + 0.5 - cy) ** 2 <= r * r ? 1 : 0;
    return { x0, y0, width: w, height: w, data };
  };
  const cand = (cx: number, cy: number, score: number, classIndex: number): DecodedCandidate => ({
    mask: disk(cx, cy, 6),
    prompt: { x: cx, y: cy },
    score,
    predictedIou: score,
    source: PromptSource.PROMPT_SOURCE_AUTO,
    classIndex,
    classProbabilities: classIndex >= 0 ? [0.7, 0.3] : [],
  });
  const image = { width: 64, height: 48, data: new Uint8Array(64 * 48 * 3).fill(100) };
  const options = {
    classNames: ['a', 'b'],
    mpp: 0.5,
    minScore: 0.2,
    returnLabelMap: true,
    returnMasks: true,
    minKeptFraction: 0.5,
    minAreaPx: 4,
    polygonTolerance: 0.5,
  };

  it('numbers nuclei in reading order, drops duplicates and low scores, counts classes, paints the label map', () => {
    const out = assembleNuclei(
      [cand(40, 30, 0.9, 1), cand(12, 10, 0.8, 0), cand(41, 30, 0.5, 0), cand(20, 40, 0.1, 0), cand(50, 10, 0.6, -1)],
      image,
      options,
    );
    expect(out.nuclei.map((n) => [n.id, Math.round(n.centroid!.x), n.className])).toEqual([
      [1, 12, 'a'],
      [2, 50, 'unclassified'],
      [3, 40, 'b'],
    ]);
    expect(out.counts).toEqual([
      { classIndex: 0, className: 'a', count: 1 },
      { classIndex: 1, className: 'b', count: 1 },
      { classIndex: -1, className: 'unclassified', count: 1 },
    ]);
    const n = out.nuclei[0];
    expect(n.measurements!.areaUm2).toBeCloseTo(n.measurements!.areaPx * 0.25, 6);
    expect(n.measurements!.meanR).toBe(100);
    expect(n.mask).toEqual(encodeRle(cropToForeground(disk(12, 10, 6))));
    const labels = out.labelMap!.data;
    expect(labels.length).toBe(64 * 48 * 2);
    expect(labels.readUInt16LE((10 * 64 + 12) * 2)).toBe(1);
    expect(labels.readUInt16LE((30 * 64 + 40) * 2)).toBe(3);
  });

  it('scores as clamped IoU times class confidence', () => {
    expect(nucleusScore(1.2, 0.5)).toBe(0.5);
    expect(nucleusScore(-0.1, 0.5)).toBe(0);
    expect(nucleusScore(0.8, 0.5)).toBeCloseTo(0.4, 9);
  });
});

describe('stage clock and limiter', () => {
  it('counts overlapping calls of a stage once', async () => {
    const clock = new StageClock();
    const wait = (ms: number) => new Promise((r) => setTimeout(r, ms));
    await Promise.all([clock.time('encoder', () => wait(60)), clock.time('encoder', () => wait(60)), clock.time('prompter', () => wait(30))]);
    const t = Object.fromEntries(clock.timings().map((x) => [x.stage, x.ms]));
    expect(t.encoder).toBeGreaterThanOrEqual(55);
    expect(t.encoder).toBeLessThan(110);
    expect(t.total).toBeGreaterThanOrEqual(t.encoder);
  });

  it('caps calls in flight', async () => {
    const limiter = new Limiter(2);
    let running = 0;
    let peak = 0;
    await Promise.all(
      Array.from({ length: 6 }, () =>
        limiter.run(async () => {
          running++;
          peak = Math.max(peak, running);
          await new Promise((r) => setTimeout(r, 10));
          running--;
        }),
      ),
    );
    expect(peak).toBe(2);
    const ac = new AbortController();
    const blockers = [limiter.run(() => new Promise((r) => setTimeout(r, 50))), limiter.run(() => new Promise((r) => setTimeout(r, 50)))];
    const waiting = limiter.run(async () => 1, ac.signal);
    ac.abort();
    await expect(waiting).rejects.toThrow(/cancelled/);
    await Promise.all(blockers);
  });
});
