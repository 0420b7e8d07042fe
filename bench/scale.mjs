// Scale benchmark: does a 20x image give the same nuclei as the 40x original? (prints numbers)
//
//   npm run build && node bench/scale.mjs [--images 4] [--data ../shared/data] [--gateway host:port]
//
// MoNuSeg images are 40x (0.25 um/px, the model's resolution). Each is segmented as it is, then
// halved to 20x (0.5 um/px) and segmented three ways: with mpp 0.5 (the gateway resamples it to the
// model's resolution and maps the nuclei back), and without mpp (the model's resolution assumed:
// what happens when a 20x image is sent as it is). Predictions are scored against the ground
// truth at 40x (20x label maps scaled up by 2, nearest neighbour): detection recall / precision,
// bPQ, and the median nucleus area in um^2.
import { createRequire } from 'node:module';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';

const require = createRequire(import.meta.url);
const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const lib = (p) => require(path.join(root, p));
const { makeClient, segmentationProto, unary } = lib('packages/rpc/dist/index.js');
const { metrics } = lib('packages/nuclei/dist/index.js');
const { startStack } = lib('services/gateway/dist/cli/stack.js');
const sharp = require(require.resolve('sharp', { paths: [path.join(root, 'packages/nuclei')] }));

const { values: args } = parseArgs({
  options: {
    images: { type: 'string', default: '4' },
    data: { type: 'string', default: path.join(root, '../shared/data') },
    gateway: { type: 'string' },
  },
});
const dir = path.join(args.data, 'monuseg-train');
if (!fs.existsSync(dir)) {
  console.log(`no MoNuSeg data at ${dir}: nothing to measure`);
  process.exit(0);
}
const names = fs
  .readdirSync(dir)
  .filter((f) => f.endsWith('.png') && !f.endsWith('.labels.png'))
  .sort()
  .slice(0, Number(args.images))
  .map((f) => f.slice(0, -4));

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

function labelFromBytes(width, height, bytes) {
  const data = new Uint16Array(width * height);
  for (let i = 0; i < data.length; i++) data[i] = bytes[2 * i] | (bytes[2 * i + 1] << 8);
  return { width, height, data };
}

function upscaleLabels(label, width, height) {
  const data = new Uint16Array(width * height);
  const sx = label.width / width;
  const sy = label.height / height;
  for (let y = 0; y < height; y++) {
    const row = Math.min(label.height - 1, Math.floor((y + 0.5) * sy)) * label.width;
    for (let x = 0; x < width; x++) data[y * width + x] = label.data[row + Math.min(label.width - 1, Math.floor((x + 0.5) * sx))];
  }
  return { width, height, data };
}

async function main() {
  const stack = args.gateway ? null : await startStack({ decoders: 2, port: 0, log: () => {} });
  const client = makeClient(segmentationProto.SegmentationClient, args.gateway ?? stack.gateway, { maxMessageBytes: 256 * 1024 * 1024 });
  const segment = (image, mpp) =>
    unary(client, client.segment, segmentationProto.SegmentRequest.fromPartial({ image, mpp, returnLabelMap: true }), { timeoutMs: 600_000 });
  const runs = { '40x, mpp 0.25': [], '20x, mpp 0.5 (resampled)': [], '20x, no mpp (sent as it is)': [] };
  try {
    for (const name of names) {
      const gt = await metrics.readLabelPng(path.join(dir, `${name}.labels.png`));
      const full = fs.readFileSync(path.join(dir, `${name}.png`));
      const half = await sharp(full)
        .resize(Math.round(gt.width / 2), Math.round(gt.height / 2), { kernel: 'lanczos3' })
        .png()
        .toBuffer();
      for (const [label, image, mpp] of [
        ['40x, mpp 0.25', full, 0.25],
        ['20x, mpp 0.5 (resampled)', half, 0.5],
        ['20x, no mpp (sent as it is)', half, 0],
      ]) {
        const t = performance.now();
        const res = await segment(image, mpp);
        const ms = performance.now() - t;
        const pred = upscaleLabels(labelFromBytes(res.labelMap.width, res.labelMap.height, res.labelMap.data), gt.width, gt.height);
        const score = metrics.scoreImage({ gt, pred });
        runs[label].push({ score, areas: res.nuclei.map((n) => n.measurements.areaUm2), ms });
      }
      process.stderr.write(`  ${name} done\n`);
    }
  } finally {
    client.close();
    await stack?.stop();
  }
  console.log(`MoNuSeg, ${names.length} images (${names.join(', ')}); ground truth at 40x`);
  console.log('| input | GT / predicted nuclei | detection recall | precision | bPQ | median area (um^2) | ms per image |');
  console.log('| --- | --- | --- | --- | --- | --- | --- |');
  for (const [label, list] of Object.entries(runs)) {
    const sum = (f) => list.reduce((a, r) => a + f(r), 0);
    const tp = sum((r) => r.score.detection.tp);
    const fn = sum((r) => r.score.detection.fn);
    const fp = sum((r) => r.score.detection.fp);
    const bpq = sum((r) => r.score.bpq) / list.length;
    console.log(
      `| ${label} | ${sum((r) => r.score.nGt)} / ${sum((r) => r.score.nPred)} | ${(tp / (tp + fn)).toFixed(3)} | ${(tp / (tp + fp)).toFixed(3)} | ` +
        `${bpq.toFixed(3)} | ${median(list.flatMap((r) => r.areas)).toFixed(1)} | ${median(list.map((r) => r.ms)).toFixed(0)} |`,
    );
  }
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
