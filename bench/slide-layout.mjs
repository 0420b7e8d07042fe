// Benchmark of slide region layouts (prints numbers; nothing is asserted): `cfrsam slide run` on one
// slide with each layout in turn, alternating for --rounds rounds, every run on its own fresh local
// stack (a shared stack would answer repeated tiles from its caches). A layout is REGION:MARGIN in
// pixels at the model's resolution; the default compares the former layout (1024 px regions read
// with a 64 px margin) with the tile-aligned one the CLI uses now. Prints, per run and per layout,
// the tiles each full region costs, regions, nuclei, wall time and tissue Mpx/s, and the ratio of
// each layout's time to the first one's.
//
//   npm run build && node bench/slide-layout.mjs [--slide ../shared/slides/CMU-1-Small-Region.svs]
//       [--layouts 1024:64,1144:32] [--rounds 2] [--standalone]
import { execFileSync } from 'node:child_process';
import { createRequire } from 'node:module';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';

const require = createRequire(import.meta.url);
const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const { planAxis } = require(path.join(root, 'packages/nuclei/dist/index.js'));
const { DEFAULT_GATEWAY_CONFIG, DEFAULT_SLIDE_MARGIN, DEFAULT_SLIDE_REGION_SIZE } = require(path.join(root, 'services/gateway/dist/config.js'));

const { values: args } = parseArgs({
  options: {
    slide: { type: 'string', default: path.join(root, '../shared/slides/CMU-1-Small-Region.svs') },
    layouts: { type: 'string', default: `1024:64,${DEFAULT_SLIDE_REGION_SIZE}:${DEFAULT_SLIDE_MARGIN}` },
    rounds: { type: 'string', default: '2' },
    standalone: { type: 'boolean', default: false },
  },
});
if (!fs.existsSync(args.slide)) {
  console.log(`slide layout benchmark skipped: ${args.slide} is absent (see ../shared/slides/README.md)`);
  process.exit(0);
}
const layouts = args.layouts.split(',').map((spec) => {
  const [region, margin] = spec.split(':').map(Number);
  if (!(region > 0 && margin >= 0)) throw new Error(`bad layout ${spec}: expected REGION:MARGIN`);
  return { region, margin };
});
// The committed model's input side: what the gateway cuts a region into.
const tileSize = JSON.parse(fs.readFileSync(path.join(root, 'models/tiny/manifest.json'), 'utf8')).input_size;
const tilesPerRegion = ({ region, margin }) => planAxis(region + 2 * margin, tileSize, DEFAULT_GATEWAY_CONFIG.tileOverlap).starts.length ** 2;

const cli = path.join(root, 'services/gateway/dist/cli/main.js');
const runs = [];
for (let round = 1; round <= Number(args.rounds); round++) {
  for (const layout of layouts) {
    const out = fs.mkdtempSync(path.join(os.tmpdir(), 'slide-layout-'));
    const flags = ['--region-size', String(layout.region), '--overlap', String(layout.margin), '--quiet'];
    if (args.standalone) flags.push('--standalone');
    const t0 = performance.now();
    execFileSync(process.execPath, [cli, 'slide', 'run', args.slide, '--out', out, ...flags], { stdio: ['ignore', 'ignore', 'inherit'] });
    const wallS = (performance.now() - t0) / 1000;
    const summaryFile = fs.readdirSync(out).find((f) => f.endsWith('.summary.json'));
    if (!summaryFile) throw new Error(`cfrsam slide run wrote no summary in ${out}`);
    const summary = JSON.parse(fs.readFileSync(path.join(out, summaryFile), 'utf8'));
    fs.rmSync(out, { recursive: true, force: true });
    const run = {
      round,
      ...layout,
      tiles: tilesPerRegion(layout),
      regions: summary.regions,
      nuclei: summary.nuclei,
      segmentS: summary.segmentS,
      mpxPerS: summary.tissueMpxPerS,
      wallS,
    };
    runs.push(run);
    console.log(
      `round ${round} ${layout.region}:${layout.margin}  ${run.tiles} tiles per region, ${run.regions} regions, ${run.nuclei} nuclei, ` +
        `regions ${run.segmentS.toFixed(1)} s, ${run.mpxPerS.toFixed(3)} tissue Mpx/s (CLI wall ${wallS.toFixed(1)} s)`,
    );
  }
}
console.log(
  '\n| layout (region:margin) | tiles per region | tiles per Mpx of slide | regions | nuclei | seconds (each round) | tissue Mpx/s | time vs first layout |',
);
console.log('| --- | --- | --- | --- | --- | --- | --- | --- |');
const first = runs.filter((r) => r.region === layouts[0].region && r.margin === layouts[0].margin);
for (const layout of layouts) {
  const mine = runs.filter((r) => r.region === layout.region && r.margin === layout.margin);
  const ratios = mine.map((r, i) => (first[i].segmentS / r.segmentS).toFixed(2) + 'x');
  console.log(
    `| ${layout.region}:${layout.margin} | ${mine[0].tiles} | ${(mine[0].tiles / (layout.region ** 2 / 1e6)).toFixed(1)} | ${mine[0].regions} | ${mine.map((r) => r.nuclei).join(', ')} | ` +
      `${mine.map((r) => r.segmentS.toFixed(1)).join(', ')} | ${mine.map((r) => r.mpxPerS.toFixed(3)).join(', ')} | ${ratios.join(', ')} |`,
  );
}
