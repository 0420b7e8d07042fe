// The `score` and `evaluate` commands: argument handling, scoring of PNG fixtures written to a temp
// dir, and the pure parts of `evaluate` (its end-to-end run needs a running gateway; see test/).
import { promises as fs } from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { PassThrough } from 'node:stream';
import { segmentationProto } from '@cfrsam/rpc';
import { metrics } from '@cfrsam/nuclei';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { formatDuration, formatProgress, labelMapFromResponse, modelClassNames, predictionMeta, runEvaluate } from '../src/cli/evaluate';
import { runScore } from '../src/cli/score';

function capture() {
  const out: string[] = [];
  const err: string[] = [];
  const stdout = new PassThrough();
  const stderr = new PassThrough();
  stdout.on('data', (c) => out.push(String(c)));
  stderr.on('data', (c) => err.push(String(c)));
  return { io: { stdout, stderr }, out: () => out.join(''), err: () => err.join('') };
}

let dir: string;

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'cfrsam-score-'));
  await fs.mkdir(path.join(dir, 'gt'));
  const data = new Uint16Array(64 * 64);
  for (let y = 4; y < 12; y++) for (let x = 4; x < 12; x++) data[y * 64 + x] = 5;
  for (let y = 30; y < 40; y++) for (let x = 40; x < 48; x++) data[y * 64 + x] = 9;
  await metrics.writeLabelPng(path.join(dir, 'gt', 't1.labels.png'), { width: 64, height: 64, data });
  await fs.writeFile(path.join(dir, 'gt', 't1.json'), JSON.stringify({ classNames: ['a', 'b'], instances: 2, classes: { '5': 0, '9': 1 } }));
});

afterAll(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

describe('cfrsam score', () => {
  it('scores identical directories as perfect and writes the report', async () => {
    const c = capture();
    const out = path.join(dir, 'out');
    const code = await runScore(['--gt', path.join(dir, 'gt'), '--pred', path.join(dir, 'gt'), '--classes', '--out', out], c.io);
    expect(c.err()).toMatch(/wrote .*scores\.json/);
    expect(code).toBe(0);
    expect(c.out()).toMatch(/^t1\s+2\s+2\s+1\.0000\s+1\.0000/m);
    expect(c.out()).toMatch(/^mPQ\s+1\.0000/m);
    const json = JSON.parse(await fs.readFile(path.join(out, 'scores.json'), 'utf8'));
    expect(json.dataset.perImageMean.aji).toBe(1);
    expect(json.classNames).toEqual(['a', 'b']);
  });

  it('exits 2 on bad usage and 1 on unreadable data, naming the problem', async () => {
    let c = capture();
    expect(await runScore(['--gt', dir], c.io)).toBe(2);
    expect(c.err()).toMatch(/--gt and --pred are required/);
    c = capture();
    expect(await runScore(['--gt', dir, '--pred', dir, '--radius', '-3'], c.io)).toBe(2);
    expect(c.err()).toMatch(/--radius must be >= 0/);
    c = capture();
    expect(await runScore(['--gt', dir, '--pred', dir, '--bogus'], c.io)).toBe(2);
    expect(c.err()).toMatch(/unknown flag --bogus/);
    c = capture();
    expect(await runScore(['--gt', path.join(dir, 'nope'), '--pred', dir], c.io)).toBe(1);
    expect(c.err()).toMatch(/ENOENT|no such file/);
    c = capture();
    expect(await runScore(['--help'], c.io)).toBe(0);
    expect(c.out()).toMatch(/usage: cfrsam score/);
  });
});

describe('cfrsam evaluate', () => {
  const model = segmentationProto.ModelInfo.fromPartial({
    name: 'cfrsam-tiny',
    version: '0.1.0',
    classes: [
      { index: 1, name: 'inflammatory' },
      { index: 0, name: 'other' },
    ],
  });

  it('decodes the little-endian label map of a response and rejects a missing or short one', () => {
    const bytes = Buffer.from([1, 0, 0, 1, 0, 0, 255, 255]);
    const res = segmentationProto.SegmentResponse.fromPartial({ labelMap: { width: 2, height: 2, data: bytes } });
    expect(Array.from(labelMapFromResponse(res).data)).toEqual([1, 256, 0, 65535]);
    expect(() => labelMapFromResponse(segmentationProto.SegmentResponse.fromPartial({}))).toThrow(/no label map/);
    const short = segmentationProto.SegmentResponse.fromPartial({ labelMap: { width: 2, height: 2, data: bytes.subarray(0, 6) } });
    expect(() => labelMapFromResponse(short)).toThrow(/carries 6 bytes \(expected 8\)/);
  });

  it('writes predictions in the dataset layout with the model taxonomy', () => {
    const res = segmentationProto.SegmentResponse.fromPartial({
      modelName: 'cfrsam-tiny',
      modelVersion: '0.1.0',
      nuclei: [
        { id: 1, classIndex: 1 },
        { id: 2, classIndex: 0 },
      ],
    });
    const meta = predictionMeta(res, model);
    expect(meta.classNames).toEqual(['other', 'inflammatory']);
    expect(meta.classes).toEqual({ '1': 1, '2': 0 });
    expect(meta.instances).toBe(2);
    expect(modelClassNames(model)).toEqual(['other', 'inflammatory']);
    const gap = segmentationProto.ModelInfo.fromPartial({
      classes: [
        { index: 0, name: 'a' },
        { index: 2, name: 'b' },
      ],
    });
    expect(() => modelClassNames(gap)).toThrow(/not indexed 0\.\.1/);
  });

  it('formats progress with rate and ETA', () => {
    expect(formatProgress(12, 432, 6000)).toBe(' 12/432 images  2.00 img/s  ETA 3m30s');
    expect(formatProgress(432, 432, 3_700_000, 2)).toBe('432/432 images  0.12 img/s  took 1h01m  (2 failed)');
    expect(formatDuration(NaN)).toBe('?');
    expect(formatDuration(59.6)).toBe('1m00s');
  });

  it('exits 2 without --data and 1 when the gateway cannot be reached', async () => {
    let c = capture();
    expect(await runEvaluate([], c.io)).toBe(2);
    expect(c.err()).toMatch(/--data is required/);
    // A port nobody listens on: take a free one and close it.
    const port = await new Promise<number>((resolve) => {
      const s = net.createServer().listen(0, '127.0.0.1', () => {
        const p = (s.address() as net.AddressInfo).port;
        s.close(() => resolve(p));
      });
    });
    c = capture();
    const code = await runEvaluate(
      ['--data', path.join(dir, 'gt'), '--gateway', `127.0.0.1:${port}`, '--connect-timeout-s', '0.5', '--out', path.join(dir, 'eval')],
      c.io,
    );
    expect(code).toBe(1);
    expect(c.err()).toMatch(/cannot reach the gateway at 127\.0\.0\.1:\d+ within 0\.5 s/);
  });
});
