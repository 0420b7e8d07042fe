// Where a request's time goes between the services: each stage's handler time (measured in the
// stage process) next to the gateway's view of the same call (handler + gRPC + queueing), per cold
// request, with only the four services up. Prints numbers; nothing is asserted.
//
//   npm run build && node bench/stage-hops.mjs [--bundle models/tiny] [--tiles 20] [--large 3] [--data ../shared/data]
//
// Rows are cfrsam_stage_duration_seconds from every process's /metrics, summed over the measured
// requests and divided by their number (a stage that runs several times per tile, as Decode does,
// sums its calls; the gateway's rows are wall time, its calls running side by side).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { coldCopy, freePorts, loadRgb, median, png, root, startServices } from './common.mjs';

const { values: args } = parseArgs({
  options: {
    bundle: { type: 'string', default: path.join(root, 'models/tiny') },
    tiles: { type: 'string', default: '20' },
    large: { type: 'string', default: '3' },
    data: { type: 'string', default: path.join(root, '../shared/data') },
  },
});
const TILES = Number(args.tiles);
const LARGE = Number(args.large);

const spare = await freePorts(4);
const metricsPorts = new Map();
const { segment: segmentOnce, stop } = await startServices(args.bundle, {
  env: (name) => {
    metricsPorts.set(name, spare[metricsPorts.size]);
    return { METRICS_PORT: String(metricsPorts.get(name)) };
  },
});
const segment = async (png) => {
  const t = performance.now();
  await segmentOnce(png);
  return performance.now() - t;
};

/** {"process:stage": {sum, count}} over every process's /metrics. */
async function scrape() {
  const out = {};
  for (const [name, port] of metricsPorts) {
    const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    for (const line of text.split('\n')) {
      const m = line.match(/^cfrsam_stage_duration_seconds_(sum|count)\{.*stage="([^"]+)".*\} ([\d.e+-]+)$/);
      if (!m) continue;
      const k = `${name}: ${m[2]}`;
      out[k] ??= { sum: 0, count: 0 };
      out[k][m[1]] += Number(m[3]);
    }
  }
  return out;
}

async function measure(label, rgb, size, n, k0) {
  const pngs = [];
  for (let k = 0; k < n; k++) pngs.push(await png(coldCopy(rgb, size, k0 + k), size));
  const before = await scrape();
  const latencies = [];
  for (const png of pngs) latencies.push(await segment(png));
  const after = await scrape();
  console.log(`\n${label}: ${n} cold requests one at a time, latency median ${median(latencies).toFixed(0)} ms`);
  for (const k of Object.keys(after).sort()) {
    const a = after[k];
    const b = before[k] ?? { sum: 0, count: 0 };
    if (a.count === b.count) continue;
    console.log(
      `  ${k.padEnd(34)} ${((1000 * (a.sum - b.sum)) / n).toFixed(1).padStart(8)} ms per request  (${((a.count - b.count) / n).toFixed(1)} calls)`,
    );
  }
}

try {
  const { rgb: tile } = await loadRgb(path.join(args.data, 'consep-train/train_3_005.png'), 256);
  const monuseg = path.join(args.data, 'monuseg-train');
  const bigFile = fs.existsSync(monuseg) ? fs.readdirSync(monuseg).find((f) => f.endsWith('.png') && !f.includes('labels')) : undefined;
  const { rgb: big } = await loadRgb(bigFile ? path.join(monuseg, bigFile) : 'x', 1000);
  for (let k = 0; k < 3; k++) await segment(await png(coldCopy(tile, 256, 50_000 + k), 256)); // sessions, JIT
  await measure('256x256 tile', tile, 256, TILES, 0);
  if (LARGE > 0) await measure('1000x1000 image', big, 1000, LARGE, 1000);
} finally {
  await stop();
}
