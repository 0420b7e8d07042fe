// `cfrsam slide run` end to end on the real 20x SVS in ../shared/slides (or $CFRSAM_SLIDES_DIR),
// through a local stack the CLI starts itself: level-0 GeoJSON inside the slide and the ROI, each
// nucleus once across region seams, areas that follow the file's 0.499 um/px, CSV = GeoJSON, the
// overview, flat peak memory on a 4x larger ROI, and bad input (exit code 2, one clear line per
// slide, the other slides still processed). Needs `npm run build` first.
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { gunzipSync } from 'node:zlib';
import sharp from 'sharp';
import { afterAll, describe, expect, it } from 'vitest';
import { parseCsv } from '@cfrsam/nuclei';

const ROOT = path.resolve(__dirname, '..');
const SLIDES = process.env.CFRSAM_SLIDES_DIR ?? path.resolve(ROOT, '../shared/slides');
const SVS = path.join(SLIDES, 'CMU-1-Small-Region.svs');
const have = existsSync(SVS);
if (!have) console.warn(`slide samples not found at ${SLIDES}: skipping the cfrsam slide run tests (set CFRSAM_SLIDES_DIR)`);

const CLI = path.join(ROOT, 'services/gateway/dist/cli/main.js');
const W0 = 2220,
  H0 = 2967,
  SLIDE_MPP = 0.499,
  MODEL_MPP = 0.25;
// A 512 x 512 level-0 rectangle in tissue, and one 4x its area with the same corner.
const ROI = { x: 832, y: 1152, width: 512, height: 512 };
const ROI4 = { x: 832, y: 1152, width: 1024, height: 1024 };
// 416 + 2 x 32 = 480 px images (2 x 2 model tiles); 208 level-0 px cells: 3 x 3 regions in ROI.
const REGION = ['--region-size', '416', '--overlap', '32'];
const MARGIN_L0 = (32 * MODEL_MPP) / SLIDE_MPP;

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

function cli(args: string[]): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '',
      stderr = '';
    child.stdout.on('data', (b: Buffer) => (stdout += b.toString()));
    child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
    child.once('error', reject);
    child.once('close', (code) => resolve({ code, stdout, stderr }));
  });
}

const roiArg = (r: { x: number; y: number; width: number; height: number }) => `${r.x},${r.y},${r.width},${r.height}`;

interface Feature {
  geometry: { type: string; coordinates: number[][][] };
  properties: { objectType: string; measurements: Record<string, number>; classification?: { name: string } };
}

function readOutputs(dir: string, name = 'CMU-1-Small-Region') {
  const geo = JSON.parse(gunzipSync(readFileSync(path.join(dir, `${name}.geojson.gz`))).toString('utf8')) as {
    type: string;
    properties: Record<string, unknown> & { model: { mpp: number }; slide: { mpp: { x: number; source: string } } };
    features: Feature[];
  };
  const csv = parseCsv(readFileSync(path.join(dir, `${name}.csv`), 'utf8'));
  const summary = JSON.parse(readFileSync(path.join(dir, `${name}.summary.json`), 'utf8'));
  return { geo, csv, summary };
}

function insidePolygon(ring: number[][], x: number, y: number): boolean {
  let inside = false;
  for (let i = 0, j = ring.length - 1; i < ring.length; j = i++) {
    const [xi, yi] = ring[i],
      [xj, yj] = ring[j];
    if (yi > y !== yj > y && x < ((xj - xi) * (y - yi)) / (yj - yi) + xi) inside = !inside;
  }
  return inside;
}

const centroidOf = (f: Feature): [number, number] => [f.properties.measurements['Centroid X px'], f.properties.measurements['Centroid Y px']];

/** Pairs of features where one's centroid lies inside the other's outline: one nucleus written twice. */
function twins(features: Feature[]): string[] {
  const out: string[] = [];
  const c = features.map(centroidOf);
  for (let i = 0; i < features.length; i++) {
    for (let j = i + 1; j < features.length; j++) {
      if (Math.hypot(c[i][0] - c[j][0], c[i][1] - c[j][1]) > 40) continue;
      const pa = features[i].geometry.coordinates[0],
        pb = features[j].geometry.coordinates[0];
      // A centroid says where its nucleus is only when it lies on it: a C-shaped nucleus' centroid
      // can fall on the neighbour it wraps, which is no twin.
      const jOnI = insidePolygon(pb, c[j][0], c[j][1]) && insidePolygon(pa, c[j][0], c[j][1]);
      const iOnJ = insidePolygon(pa, c[i][0], c[i][1]) && insidePolygon(pb, c[i][0], c[i][1]);
      if (jOnI || iOnJ) out.push(`${c[i]} / ${c[j]}`);
    }
  }
  return out;
}

const median = (v: number[]) => {
  const s = [...v].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

describe.skipIf(!have || !existsSync(CLI))('cfrsam slide run on the 20x SVS', () => {
  const tmp = mkdtempSync(path.join(tmpdir(), 'cfrsam-slide-run-'));
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));
  let firstPeakMb = 0;

  it("an ROI: level-0 GeoJSON inside the slide and the ROI, nuclei once across seams, areas at the file's mpp, CSV, overview", async () => {
    const out = path.join(tmp, 'roi');
    const run = await cli(['slide', 'run', SVS, '--out', out, '--roi', roiArg(ROI), ...REGION]);
    expect(run.code, run.stderr).toBe(0);
    expect(run.stdout).toMatch(/peak RSS\s+cli \d+ MB/);
    const { geo, csv, summary } = readOutputs(out);

    expect(geo.type).toBe('FeatureCollection');
    expect(geo.properties.model).toMatchObject({ name: expect.any(String), version: expect.any(String), mpp: MODEL_MPP });
    expect(geo.properties.slide.mpp).toMatchObject({ x: SLIDE_MPP, source: 'aperio ImageDescription MPP' });
    expect(geo.properties.roi).toEqual(ROI);
    expect(geo.properties.tissueFraction).toBeGreaterThan(0.1);
    expect(summary.regions).toBeGreaterThanOrEqual(4); // several regions, so there are seams
    expect(summary.regionsFailed).toBe(0);
    expect(geo.features.length).toBe(summary.nuclei);
    expect(geo.features.length).toBeGreaterThan(50);
    // The blur check: every region's model tiles counted, those blurred among them.
    expect(summary.tiles.model).toBeGreaterThanOrEqual(summary.regions);
    expect(summary.tiles.blurred).toBeGreaterThanOrEqual(0);
    expect(summary.tiles.blurred).toBeLessThanOrEqual(summary.tiles.model);
    expect(summary.blurredRegions.length).toBeLessThanOrEqual(summary.regions);
    expect(run.stdout).toContain(`blur         ${summary.tiles.blurred} of ${summary.tiles.model} model tiles blurred at the model's resolution`);

    const centroids: [number, number][] = [];
    for (const f of geo.features) {
      expect(f.properties.objectType).toBe('detection');
      expect(f.geometry.type).toBe('Polygon');
      for (const [x, y] of f.geometry.coordinates[0]) {
        // inside level 0, and inside the ROI up to the margin an owned nucleus may reach past it
        expect(x >= 0 && x <= W0 && y >= 0 && y <= H0, `${x},${y} outside level 0`).toBe(true);
        expect(x >= ROI.x - MARGIN_L0 - 1 && x <= ROI.x + ROI.width + MARGIN_L0 + 1, `x ${x} outside the ROI`).toBe(true);
        expect(y >= ROI.y - MARGIN_L0 - 1 && y <= ROI.y + ROI.height + MARGIN_L0 + 1, `y ${y} outside the ROI`).toBe(true);
      }
      const cx = f.properties.measurements['Centroid X px'],
        cy = f.properties.measurements['Centroid Y px'];
      expect(cx >= ROI.x && cx < ROI.x + ROI.width && cy >= ROI.y && cy < ROI.y + ROI.height, `centroid ${cx},${cy} outside the ROI`).toBe(true);
      centroids.push([cx, cy]);
    }
    // Each nucleus once: no two centroids coincide, and no nucleus' centroid lies inside another's
    // outline (a nucleus found by two regions whose margins overlap at a seam, its centroid
    // estimated a pixel or two apart).
    const keys = new Set(centroids.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`));
    expect(keys.size).toBe(centroids.length);
    expect(twins(geo.features), 'nuclei found twice').toEqual([]);

    // Areas in um^2 follow the file's 0.499 um/px (a flat 20x run, read as 0.25, reports ~4x less).
    const areas = geo.features.map((f) => f.properties.measurements['Area µm^2']);
    const med = median(areas);
    console.log(`slide run ROI ${roiArg(ROI)}: ${summary.regions} regions, ${geo.features.length} nuclei, median area ${med.toFixed(1)} um^2`);
    // A plausibility band for nuclei (the exact 20x-vs-40x agreement is bench/scale.mjs's job); the
    // per-nucleus check below ties every area to the file's resolution.
    expect(med).toBeGreaterThan(5);
    expect(med).toBeLessThan(120);
    for (const f of geo.features.slice(0, 50)) {
      const m = f.properties.measurements;
      // The outline's area in level-0 pixels (shoelace; the outline is simplified, so within 25%).
      const ring = f.geometry.coordinates[0];
      let twice = 0;
      for (let i = 0; i + 1 < ring.length; i++) twice += ring[i][0] * ring[i + 1][1] - ring[i + 1][0] * ring[i][1];
      expect(m['Area µm^2'] / ((Math.abs(twice) / 2) * SLIDE_MPP * SLIDE_MPP)).toBeGreaterThan(0.75);
      expect(m['Area µm^2'] / ((Math.abs(twice) / 2) * SLIDE_MPP * SLIDE_MPP)).toBeLessThan(1.25);
      expect(m['Nucleus ID']).toBeGreaterThan(0);
    }

    // CSV: a header and one row per feature, centroids in level-0 pixels and the owning region.
    const [header, ...rows] = csv.filter((r) => r.length > 1);
    expect(rows.length).toBe(geo.features.length);
    expect(header).toEqual(expect.arrayContaining(['id', 'class', 'centroid_x', 'centroid_y', 'area_um2', 'region']));
    const ix = header.indexOf('centroid_x');
    expect(Number(rows[0][ix])).toBeGreaterThanOrEqual(ROI.x);

    const meta = await sharp(path.join(out, 'CMU-1-Small-Region.overview.png')).metadata();
    expect(Math.max(meta.width!, meta.height!)).toBe(2048);
    expect(Math.abs(meta.width! / meta.height! - W0 / H0)).toBeLessThan(0.01);

    expect(summary.peakRssMb.cli).toBeGreaterThan(0);
    for (const name of ['prompter', 'encoder', 'decoder-0', 'gateway']) expect(summary.peakRssMb[name], name).toBeGreaterThan(0);
    expect(summary.tissueMpxPerS).toBeGreaterThan(0);
    firstPeakMb = summary.peakRssMb.cli;
  });

  it('peak memory of the CLI stays flat on an ROI four times larger', async () => {
    expect(firstPeakMb).toBeGreaterThan(0);
    const out = path.join(tmp, 'roi4');
    const run = await cli(['slide', 'run', SVS, '--out', out, '--roi', roiArg(ROI4), ...REGION]);
    expect(run.code, run.stderr).toBe(0);
    const { geo, summary } = readOutputs(out);
    const peak = summary.peakRssMb.cli as number;
    console.log(
      `peak RSS of the CLI: ROI ${roiArg(ROI)} ${firstPeakMb} MB, ROI ${roiArg(ROI4)} (4x) ${peak} MB; ${summary.regions} regions, ${geo.features.length} nuclei`,
    );
    expect(summary.regions).toBeGreaterThan(12);
    expect(twins(geo.features), 'nuclei found twice').toEqual([]);
    expect(peak).toBeLessThanOrEqual(1.5 * firstPeakMb + 64);
  });

  it('bad input: a clear line and exit code 2 per bad slide, the other slides still processed', async () => {
    const dir = path.join(tmp, 'bad');
    const out = path.join(tmp, 'bad-out');
    rmSync(dir, { recursive: true, force: true });
    const { mkdirSync } = await import('node:fs');
    mkdirSync(dir, { recursive: true });
    const bytes = readFileSync(SVS);
    const truncated = path.join(dir, 'truncated.svs');
    writeFileSync(truncated, bytes.subarray(0, Math.floor(bytes.length / 2)));
    const text = path.join(dir, 'notes.svs');
    writeFileSync(text, 'this is not a slide, just a text file named .svs\n'.repeat(20));
    const crop = path.join(SLIDES, 'derived/CMU-1-Small-Region.crop.ome.tif'); // 1024 x 1024: the ROI misses it
    const boxes = path.join(SLIDES, 'openslide-python_boxes.tiff'); // no resolution in the file
    // 128 x 128 in the SVS's tissue; outside the 1024 x 1024 crop.
    const roi = '1100,1200,128,128';
    const run = await cli(['slide', 'run', truncated, text, crop, boxes, SVS, '--out', out, '--roi', roi, ...REGION, '--quiet']);
    expect(run.code, run.stderr).toBe(2);
    const lines = run.stderr.split('\n').filter((l) => l.startsWith('cfrsam slide run:'));
    const lineOf = (file: string) => lines.find((l) => l.includes(file)) ?? '';
    expect(lineOf(truncated)).toMatch(/truncated|corrupt/i);
    expect(lineOf(text)).toMatch(/unknown slide format/i);
    expect(lineOf(crop)).toMatch(/ROI .*outside the slide/);
    expect(lineOf(boxes)).toMatch(/no resolution.*--mpp/);
    console.log(`bad input lines:\n${lines.join('\n')}`);
    expect(lines.length).toBe(4);
    for (const name of ['truncated', 'notes', 'CMU-1-Small-Region.crop', 'openslide-python_boxes']) {
      expect(existsSync(path.join(out, `${name}.geojson.gz`)), name).toBe(false);
    }
    // The good slide in the same invocation was processed.
    const { geo, summary } = readOutputs(out);
    expect(summary.regionsFailed).toBe(0);
    expect(geo.features.length).toBeGreaterThan(0);
    expect(run.stdout).toMatch(/wrote 1 of 5 slide\(s\)/);

    // The same file with --mpp is accepted (and its mpp source says so).
    const withMpp = await cli(['slide', 'run', boxes, '--out', out, '--mpp', '0.5', '--quiet']);
    expect(withMpp.code, withMpp.stderr).toBe(0);
    const boxesSummary = JSON.parse(readFileSync(path.join(out, 'openslide-python_boxes.summary.json'), 'utf8'));
    expect(boxesSummary.mpp).toMatchObject({ x: 0.5, source: 'option' });
  });
});
