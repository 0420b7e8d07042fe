// Benchmark of glass-tile skipping (prints numbers; nothing is asserted): one slide region at the
// tissue's edge segmented through the four services, with glass tiles skipped (the gateway's
// default) and with every tile run (--glass-tile-max-tissue 0), each on a fresh stack with a
// warm-up request first. Prints tiles, glass tiles, nuclei and time for both.
//
//   npm run build && node bench/glass.mjs [--slide ../shared/slides/CMU-1-Small-Region.svs] [--roi X,Y,W,H]
import { createRequire } from 'node:module';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';

const require = createRequire(import.meta.url);
const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const lib = (p) => require(path.join(root, p));
const { makeClient, segmentationProto, unary } = lib('packages/rpc/dist/index.js');
const { startStack } = lib('services/gateway/dist/cli/stack.js');
const { openSlide } = lib('packages/slides/dist/index.js');
const { encodeRgbPng, glassRects, planTiles, resizeRgb } = lib('packages/nuclei/dist/index.js');
const { loadManifest } = lib('packages/contract/dist/index.js');

const { values: args } = parseArgs({
  options: {
    slide: { type: 'string', default: path.join(root, '../shared/slides/CMU-1-Small-Region.svs') },
    roi: { type: 'string', default: '200,1200,1000,1000' },
  },
});
if (!fs.existsSync(args.slide)) {
  console.log(`glass benchmark skipped: ${args.slide} is absent (see ../shared/slides/README.md)`);
  process.exit(0);
}
const [x, y, width, height] = args.roi.split(',').map(Number);
const manifest = loadManifest(path.join(root, 'models/tiny'), { graphs: [], verifyGraphs: false });
const slide = await openSlide(args.slide);
const mpp = slide.mpp ? (slide.mpp.x + slide.mpp.y) / 2 : manifest.mpp;
const region = await slide.readRegion({ level: 0, x, y, width, height });
const png = await encodeRgbPng(region);
// What the gateway will see: the region at the model's resolution, tiled.
const s = mpp / manifest.mpp;
const work = s === 1 ? region : await resizeRgb({ width, height, data: region.data }, Math.round(width * s), Math.round(height * s));
const layout = planTiles(work.width, work.height, manifest.inputSize, 64);
const glass = glassRects(
  work,
  layout.tiles.map((t) => t.valid),
  0.001,
);
console.log(
  `${path.basename(args.slide)} roi ${args.roi} at ${mpp.toFixed(3)} um/px: ${layout.tiles.length} tiles at the model's resolution, ${glass.size} glass`,
);

const warm = await encodeRgbPng(await slide.readRegion({ level: 0, x, y, width: 128, height: 128 }));
const rows = [];
for (const [label, extra] of [
  ['glass skipped (default)', []],
  ['every tile run', ['--glass-tile-max-tissue', '0']],
]) {
  const stack = await startStack({ decoders: 2, port: 0, args: { gateway: ['--result-cache-mb', '0', ...extra] }, log: () => {} });
  try {
    const client = makeClient(segmentationProto.SegmentationClient, stack.gateway, { maxMessageBytes: 256 * 1024 * 1024 });
    await unary(client, client.segment, segmentationProto.SegmentRequest.fromPartial({ image: warm, mpp }), { timeoutMs: 600_000 });
    const t0 = performance.now();
    const res = await unary(client, client.segment, segmentationProto.SegmentRequest.fromPartial({ image: png, mpp }), { timeoutMs: 600_000 });
    rows.push({ label, ms: performance.now() - t0, nuclei: res.nuclei.length });
    client.close();
  } finally {
    await stack.stop();
  }
}
console.log('');
console.log('| tiles | time | nuclei |');
console.log('| --- | --- | --- |');
for (const r of rows) console.log(`| ${r.label} | ${(r.ms / 1000).toFixed(2)} s | ${r.nuclei} |`);
console.log(`speed-up ${(rows[1].ms / rows[0].ms).toFixed(2)}x; nuclei ${rows[0].nuclei} vs ${rows[1].nuclei}`);
await slide.close?.();
