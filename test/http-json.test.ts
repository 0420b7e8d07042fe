// The HTTP/JSON API beside gRPC, called with a plain HTTP client (fetch) against the real
// services: segment an image sent as base64 JSON, refine on its image_id, read the model, get a
// clear error status for bad input, and CORS for a browser origin.
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestStack, type TestStack } from './stack';
import { blobGrid, syntheticPng } from './synthetic';

let stack: TestStack;
let base: string;

beforeAll(async () => {
  stack = await startTestStack({ decoders: 1, args: { gateway: ['--http-port', '0', '--cors-origins', 'https://viewer.example'] } });
  base = `http://${stack.http}`;
});

afterAll(async () => {
  await stack?.close();
});

const post = (route: string, body: unknown, headers: Record<string, string> = {}) =>
  fetch(`${base}${route}`, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify(body) });

describe('HTTP/JSON API', () => {
  it('segments a base64 image, refines on its image_id, and describes the model', async () => {
    const blobs = blobGrid([60, 130, 200], [70, 180]);
    const png = await syntheticPng(256, 256, blobs);
    const prompts = blobs.map((b) => ({ positive: [{ x: b.x, y: b.y }] }));
    const res = await post('/v1/segment', { image: png.toString('base64'), prompts, mpp: 0.25 });
    expect(res.status).toBe(200);
    const body = (await res.json()) as {
      imageId: string;
      width: number;
      nuclei: Array<{ polygon: unknown[]; source: string; measurements: { areaUm2: number } }>;
      imageMpp: number;
    };
    expect(body.width).toBe(256);
    expect(body.imageMpp).toBe(0.25);
    expect(body.nuclei.length).toBeGreaterThanOrEqual(blobs.length - 1);
    expect(body.nuclei[0].source).toBe('PROMPT_SOURCE_MANUAL');
    expect(body.nuclei[0].polygon.length).toBeGreaterThan(3);
    expect(body.nuclei[0].measurements.areaUm2).toBeGreaterThan(0);

    const refined = await post('/v1/refine', { imageId: body.imageId, prompts: [prompts[0]] });
    expect(refined.status).toBe(200);
    expect(((await refined.json()) as { nuclei: unknown[] }).nuclei).toHaveLength(1);

    const model = await fetch(`${base}/v1/model`);
    expect(model.status).toBe(200);
    expect(((await model.json()) as { name: string; mpp: number }).mpp).toBe(0.25);
  });

  it("answers QuPath GeoJSON in the slide's coordinates on /v1/segment/geojson, with QuPath's names", async () => {
    const blobs = blobGrid([60, 130, 200], [70, 180]);
    const png = await syntheticPng(256, 256, blobs);
    const prompts = blobs.map((b) => ({ positive: [{ x: b.x, y: b.y }] }));
    const plain = (await (await post('/v1/segment', { image: png.toString('base64'), prompts, mpp: 0.5 })).json()) as {
      nuclei: Array<{ id: number; polygon: Array<{ x?: number; y?: number }> }>;
    };
    // A region read at downsample 2 whose top-left corner is (40000, 12000) in the slide.
    const res = await post('/v1/segment/geojson?classes=inflammatory=Tumor', {
      image: png.toString('base64'),
      prompts,
      mpp: 0.5,
      origin: { x: 40000, y: 12000 },
      downsample: 2,
    });
    expect(res.status).toBe(200);
    const geo = (await res.json()) as {
      type: string;
      properties: { model: { name: string; version: string; mpp: number }; image: { origin: number[]; downsample: number } };
      features: Array<{
        geometry: { coordinates: number[][][] };
        properties: { measurements: Record<string, number>; classification?: { name: string; color: number[] } };
      }>;
    };
    expect(geo.type).toBe('FeatureCollection');
    expect(geo.properties.model.mpp).toBe(0.25);
    expect(geo.properties.image).toMatchObject({ origin: [40000, 12000], downsample: 2 });
    expect(geo.features).toHaveLength(plain.nuclei.length);
    const first = geo.features[0];
    const p0 = plain.nuclei[0].polygon[0];
    expect(first.geometry.coordinates[0][0]).toEqual([40000 + 2 * (p0.x ?? 0), 12000 + 2 * (p0.y ?? 0)]);
    expect(first.properties.measurements['Nucleus ID']).toBe(plain.nuclei[0].id);
    for (const name of ['Area µm^2', 'Length µm', 'Max diameter µm', 'Min diameter µm'])
      expect(first.properties.measurements[name]).toBeGreaterThan(0);
    const names = new Set(geo.features.map((f) => f.properties.classification?.name));
    expect([...names].every((n) => n === undefined || ['Other', 'Tumor', 'Epithelial', 'Stroma'].includes(n))).toBe(true);
    // ?cells=3: each nucleus grown by 3 µm into a QuPath cell object.
    const withCells = await post('/v1/segment/geojson?cells=3', {
      image: png.toString('base64'),
      prompts,
      mpp: 0.5,
      origin: { x: 40000, y: 12000 },
      downsample: 2,
    });
    expect(withCells.status).toBe(200);
    const cellGeo = (await withCells.json()) as {
      features: Array<{
        geometry: { coordinates: number[][][] };
        properties: { objectType: string; nucleusGeometry?: { coordinates: number[][][] }; measurements: Record<string, number> };
      }>;
    };
    expect(cellGeo.features).toHaveLength(plain.nuclei.length);
    for (const f of cellGeo.features) {
      expect(f.properties.objectType).toBe('cell');
      expect(f.properties.nucleusGeometry?.coordinates[0][0]).toEqual(geo.features[cellGeo.features.indexOf(f)].geometry.coordinates[0][0]);
      expect(f.properties.measurements['Cell: Area µm^2']).toBeGreaterThan(f.properties.measurements['Nucleus: Area µm^2']);
      expect(f.properties.measurements['Nucleus: Hematoxylin OD mean']).toBeGreaterThan(0);
    }
    const bad = await post('/v1/segment/geojson?classes=nonsense', { image: png.toString('base64') });
    expect(bad.status).toBe(400);
    expect(((await bad.json()) as { message: string }).message).toMatch(/class map entry "nonsense"/);
  });

  it.skipIf(!fs.existsSync('/usr/bin/curl'))('segments an image with curl -d @request.json, as the README shows', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cfrsam-curl-'));
    try {
      const png = await syntheticPng(256, 256, blobGrid([60, 130, 200], [70, 180]));
      fs.writeFileSync(path.join(dir, 'request.json'), JSON.stringify({ image: png.toString('base64'), mpp: 0.25 }));
      const { stdout } = await promisify(execFile)(
        '/usr/bin/curl',
        ['-sS', '--fail-with-body', `${base}/v1/segment`, '-H', 'content-type: application/json', '-d', '@request.json'],
        { cwd: dir, maxBuffer: 64 * 1024 * 1024 },
      );
      const body = JSON.parse(stdout) as { width: number; nuclei: unknown[]; modelName: string };
      expect(body.width).toBe(256);
      expect(body.modelName).toBeTruthy();
      expect(Array.isArray(body.nuclei)).toBe(true);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('answers bad input with the matching HTTP status and the gRPC status in JSON', async () => {
    const bad = await post('/v1/segment', { image: Buffer.from('not an image').toString('base64') });
    expect(bad.status).toBe(400);
    const err = (await bad.json()) as { status: string; message: string };
    expect(err.status).toBe('INVALID_ARGUMENT');
    expect(err.message).toMatch(/format not recognised/);

    const unknown = await post('/v1/refine', { imageId: 'f'.repeat(64), prompts: [{ positive: [{ x: 1, y: 1 }] }] });
    expect(unknown.status).toBe(404);
    const notJson = await fetch(`${base}/v1/segment`, { method: 'POST', body: '{oops' });
    expect(notJson.status).toBe(400);
    expect(((await notJson.json()) as { message: string }).message).toMatch(/not JSON/);
    // JSON of the wrong shape is the caller's mistake too (it had been a 500 from inside the
    // generated fromJSON), with what was wrong.
    for (const [route, body, message] of [
      ['/v1/segment', 'null', /must be a JSON object .*got null/],
      ['/v1/refine', '[1, 2]', /must be a JSON object .*got an array/],
      ['/v1/segment', JSON.stringify({ image: 42 }), /image must be the file's bytes as a base64 string, got number/],
      ['/v1/segment/geojson', JSON.stringify({ image: { data: 'x' } }), /image must be .* base64 string, got object/],
    ] as const) {
      const wrong = await fetch(`${base}${route}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body });
      expect(wrong.status, `${route} ${body}`).toBe(400);
      expect(((await wrong.json()) as { message: string }).message).toMatch(message);
    }
    expect((await fetch(`${base}/v1/nothing`)).status).toBe(404);
    // Still serving.
    expect((await fetch(`${base}/healthz`)).status).toBe(200);
  });

  it('prices a request announcing its image size (X-Image-Size) from its headers, before reading the body', async () => {
    // The body is not even JSON: the malformed header is answered first, so the body was never parsed.
    const malformed = await fetch(`${base}/v1/segment`, { method: 'POST', body: '{oops', headers: { 'x-image-size': 'big' } });
    expect(malformed.status).toBe(400);
    expect(((await malformed.json()) as { message: string }).message).toMatch(/x-image-size must be WIDTHxHEIGHT/);
    const png = await syntheticPng(512, 512, blobGrid([60, 300], [70, 400]));
    const understated = await post('/v1/segment', { image: png.toString('base64') }, { 'x-image-size': '256x256' });
    expect(understated.status).toBe(400);
    expect(((await understated.json()) as { message: string }).message).toMatch(/more than the \d+ its x-image-size header announced/);
    const truthful = await post('/v1/segment', { image: png.toString('base64') }, { 'x-image-size': '512x512' });
    expect(truthful.status).toBe(200);
    expect(((await truthful.json()) as { width: number }).width).toBe(512);
  });

  it('allows the configured browser origin (CORS preflight) and no other', async () => {
    const pre = await fetch(`${base}/v1/segment`, {
      method: 'OPTIONS',
      headers: { origin: 'https://viewer.example', 'access-control-request-method': 'POST' },
    });
    expect(pre.status).toBe(204);
    expect(pre.headers.get('access-control-allow-origin')).toBe('https://viewer.example');
    const other = await fetch(`${base}/v1/model`, { headers: { origin: 'https://elsewhere.example' } });
    expect(other.headers.get('access-control-allow-origin')).toBeNull();
  });
});
