// The default model's blur gate on a real H&E tile: a held-out CoNSeP tile as scanned and blurred
// as an out-of-focus scan is (a Gaussian of 2.5 px), through the stack. As scanned no tile is
// called blurred; blurred, the tile is, the response says so, and the gate's lower score bar finds
// more of the tile's true nuclei than the same model without a gate (its manifest without
// `prompter.blur_gate`, the graphs shared). Needs ../shared/data; skips without it.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeClient, segmentationProto, unary } from '@cfrsam/rpc';
import { metrics } from '@cfrsam/nuclei';
import { startStack, type RunningStack } from '../services/gateway/dist/cli/stack';

const ROOT = path.join(__dirname, '..');
const TILE = path.join(ROOT, '..', 'shared', 'data', 'consep-train', 'train_3_005');
const BUNDLE = path.join(ROOT, 'models', 'tiny');
const manifest = JSON.parse(fs.readFileSync(path.join(BUNDLE, 'manifest.json'), 'utf8'));
const haveTile = fs.existsSync(`${TILE}.png`);
const gated = manifest.prompter?.blur_gate !== undefined;
if (!haveTile) console.warn(`blur-gate.test: skipped, no real H&E tile at ${TILE}.png (../shared/data absent)`);
else if (!gated) console.warn('blur-gate.test: skipped, models/tiny has no blur gate');

/** The tile's ground-truth centroids, from its instance label map. */
async function truthCentroids(): Promise<{ x: number[]; y: number[] }> {
  const labels = await metrics.readLabelPng(`${TILE}.labels.png`);
  const sums = new Map<number, [number, number, number]>();
  for (let i = 0; i < labels.data.length; i++) {
    const id = labels.data[i];
    if (id === 0) continue;
    const s = sums.get(id) ?? [0, 0, 0];
    s[0] += (i % labels.width) + 0.5;
    s[1] += Math.floor(i / labels.width) + 0.5;
    s[2]++;
    sums.set(id, s);
  }
  const all = [...sums.values()];
  return { x: all.map((s) => s[0] / s[2]), y: all.map((s) => s[1] / s[2]) };
}

describe.skipIf(!haveTile || !gated)('the blur gate on a real tile', () => {
  const ungatedDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cfrsam-ungated-'));
  let stacks: RunningStack[] = [];

  beforeAll(() => {
    // The default without its gate: the same graphs (linked), the manifest without `blur_gate`.
    const ungated = { ...manifest, prompter: { ...manifest.prompter } };
    delete ungated.prompter.blur_gate;
    fs.writeFileSync(path.join(ungatedDir, 'manifest.json'), JSON.stringify(ungated));
    for (const entry of Object.values(manifest.graphs) as { file: string }[]) {
      fs.symlinkSync(path.join(BUNDLE, entry.file), path.join(ungatedDir, entry.file));
    }
  });
  afterAll(async () => {
    await Promise.all(stacks.map((s) => s.stop()));
    fs.rmSync(ungatedDir, { recursive: true, force: true });
  });

  async function segment(bundle: string, images: Buffer[]): Promise<segmentationProto.SegmentResponse[]> {
    const stack = await startStack({ standalone: true, bundle, decoders: 2, port: 0, log: () => {} });
    stacks.push(stack);
    const client = makeClient(segmentationProto.SegmentationClient, stack.gateway);
    try {
      const out: segmentationProto.SegmentResponse[] = [];
      for (const image of images) {
        out.push(await unary(client, client.segment, segmentationProto.SegmentRequest.fromPartial({ image, mpp: 0.25 }), { timeoutMs: 120_000 }));
      }
      return out;
    } finally {
      client.close();
      await stack.stop();
      stacks = stacks.filter((s) => s !== stack);
    }
  }

  it('calls the blurred copy blurred, says so, and finds more of its true nuclei than without the gate', async () => {
    const scanned = fs.readFileSync(`${TILE}.png`);
    const blurred = await sharp(scanned).blur(2.5).png().toBuffer();
    const [asScanned, gatedBlurred] = await segment(BUNDLE, [scanned, blurred]);
    const [ungatedBlurred] = await segment(ungatedDir, [blurred]);

    expect(asScanned.tiles).toBe(1);
    expect(asScanned.blurredTiles).toBe(0);
    expect(asScanned.imageNotes ?? '').not.toMatch(/blurred/);
    expect(gatedBlurred.blurredTiles).toBe(1);
    expect(gatedBlurred.imageNotes).toMatch(/1 of 1 tiles look blurred at the model's resolution/);
    expect(ungatedBlurred.blurredTiles).toBe(0);

    const truth = await truthCentroids();
    const found = (r: segmentationProto.SegmentResponse) =>
      metrics.pairCentroids(truth, { x: r.nuclei.map((n) => n.centroid!.x), y: r.nuclei.map((n) => n.centroid!.y) }, 12).pairedCount;
    console.log(
      `blur gate, train_3_005 blurred by 2.5 px: ${truth.x.length} true nuclei; found ${found(gatedBlurred)} of them with the gate ` +
        `(${gatedBlurred.nuclei.length} predicted), ${found(ungatedBlurred)} without (${ungatedBlurred.nuclei.length}); as scanned ${found(asScanned)}`,
    );
    expect(found(gatedBlurred)).toBeGreaterThan(found(ungatedBlurred));
  });
});
