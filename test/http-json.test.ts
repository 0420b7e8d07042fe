// The HTTP/JSON API beside gRPC, called with a plain HTTP client (fetch) against the real
// services: segment an image sent as base64 JSON, refine on its image_id, read the model, get a
// clear error status for bad input, and CORS for a browser origin.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort } from '@cfrsam/testing';
import { startTestStack, type TestStack } from './stack';
import { blobGrid, syntheticPng } from './synthetic';

let stack: TestStack;
let base: string;

beforeAll(async () => {
  const port = await freePort();
  stack = await startTestStack({ decoders: 1, args: { gateway: ['--http-port', String(port), '--cors-origins', 'https://viewer.example'] } });
  base = `http://127.0.0.1:${port}`;
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
    expect((await fetch(`${base}/v1/nothing`)).status).toBe(404);
    // Still serving.
    expect((await fetch(`${base}/healthz`)).status).toBe(200);
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
