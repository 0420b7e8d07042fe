// HttpRangeSource against a real HTTP server on loopback: bytes equal the file's across block
// boundaries, repeated reads come from the block cache, runs of missing blocks are one request,
// and servers that cannot serve ranges (or the slide) are refused with a SlideError naming why.
import { randomBytes } from 'node:crypto';
import * as http from 'node:http';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HttpRangeSource, openSlide, readRegionAtMpp, SlideError } from '../src/index.js';
import { SAMPLES } from './helpers.js';

const FILE = randomBytes(300_000);
let server: http.Server;
let base = '';
let requests: string[] = [];
let failNext = 0;

beforeAll(async () => {
  server = http.createServer((req, res) => {
    const url = req.url ?? '';
    requests.push(`${url} ${req.headers.range ?? ''}`);
    if (url.startsWith('/missing')) return void res.writeHead(404).end();
    if (url.startsWith('/flaky') && failNext > 0) {
      failNext--;
      return void res.writeHead(503).end();
    }
    if (url.startsWith('/norange')) return void res.writeHead(200, { 'content-length': FILE.length }).end(FILE);
    const m = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '');
    if (!m) return void res.writeHead(200).end(FILE);
    const from = Number(m[1]);
    const to = Math.min(FILE.length - 1, Number(m[2]));
    res.writeHead(206, { 'content-range': `bytes ${from}-${to}/${FILE.length}` }).end(FILE.subarray(from, to + 1));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  base = `http://127.0.0.1:${(server.address() as { port: number }).port}`;
});

afterAll(() => server.close());

describe('HttpRangeSource', () => {
  it('reads exact bytes across blocks, caches blocks and fetches a run of missing blocks at once', async () => {
    requests = [];
    const src = await HttpRangeSource.open(`${base}/file.bin`, { blockBytes: 16_384, cacheBlocks: 64 });
    expect(src.size).toBe(FILE.length);
    expect((await src.read(10_000, 20_000)).equals(FILE.subarray(10_000, 30_000))).toBe(true);
    expect((await src.read(100_000, 50_000)).equals(FILE.subarray(100_000, 150_000))).toBe(true);
    const before = src.requests;
    expect((await src.read(101_000, 1000)).equals(FILE.subarray(101_000, 102_000))).toBe(true);
    expect(src.requests).toBe(before); // from the cache
    // open (block 0), blocks 1 (block 0 cached) and blocks 6..9 in one request each
    expect(requests.length).toBe(3);
    expect(src.bytesFetched).toBeLessThan(FILE.length);
    await expect(src.read(FILE.length - 10, 20)).rejects.toMatchObject({ code: 'TRUNCATED' });
    await src.close();
  });

  it('retries a 5xx answer', async () => {
    failNext = 1;
    const src = await HttpRangeSource.open(`${base}/flaky.bin`);
    expect(src.size).toBe(FILE.length);
  });

  it('refuses servers without ranges, missing files and non-http URLs with a reason', async () => {
    await expect(HttpRangeSource.open(`${base}/norange.bin`)).rejects.toMatchObject({
      code: 'UNSUPPORTED',
      message: expect.stringMatching(/range requests/),
    });
    await expect(HttpRangeSource.open(`${base}/missing.bin`)).rejects.toMatchObject({ code: 'NOT_FOUND', message: expect.stringMatching(/404/) });
    await expect(HttpRangeSource.open('file:///etc/passwd')).rejects.toBeInstanceOf(SlideError);
  });
});

const OME = join(SAMPLES, 'derived/CMU-1-Small-Region.crop.ome.tif');
describe.skipIf(!existsSync(OME))('a slide over HTTP', () => {
  it('reads the same region as from the file', async () => {
    const { readFileSync } = await import('node:fs');
    const bytes = readFileSync(OME);
    const s = http.createServer((req, res) => {
      const m = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '')!;
      const from = Number(m[1]);
      const to = Math.min(bytes.length - 1, Number(m[2]));
      res.writeHead(206, { 'content-range': `bytes ${from}-${to}/${bytes.length}` }).end(bytes.subarray(from, to + 1));
    });
    await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
    try {
      const src = await HttpRangeSource.open(`http://127.0.0.1:${(s.address() as { port: number }).port}/crop.ome.tif`);
      const remote = await openSlide(src);
      const local = await openSlide(OME);
      const rect = { x: 300, y: 300, width: 128, height: 128 };
      const a = await readRegionAtMpp(remote, rect, 0.25);
      const b = await readRegionAtMpp(local, rect, 0.25);
      expect(Buffer.from(a.data).equals(Buffer.from(b.data))).toBe(true);
      expect(src.bytesFetched).toBeLessThan(bytes.length / 3);
      await remote.close();
      await local.close();
    } finally {
      s.close();
    }
  });
});
