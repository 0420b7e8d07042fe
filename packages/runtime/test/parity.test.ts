// Export parity: every graph of models/tiny, run in onnxruntime-node through the worker pool on
// the PyTorch inputs of the bundle's parity fixture, must reproduce PyTorch's outputs within the
// fixture's tolerance (|onnx - torch| <= atol + rtol * |torch|, per element, as numpy.allclose).
//
// Fixture format (parity/<graph>.json): { inputs: {name: {dims, dtype, file}}, outputs: {...},
// tolerance: {atol, rtol} }, each file raw little-endian row-major data of that dtype.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type HostTensor, type HostTensorType, type Manifest } from '@cfrsam/contract';
import { OnnxWorkerPool } from '@cfrsam/runtime';
import { testBundle } from '@cfrsam/testing';

interface FixtureTensor {
  dims: number[];
  dtype: string;
  file: string;
}

interface Fixture {
  inputs: Record<string, FixtureTensor>;
  outputs: Record<string, FixtureTensor>;
  tolerance: { atol: number; rtol: number };
}

const bundle = testBundle();
if (bundle.skipReason) console.warn(`parity.test: ${bundle.skipReason}`);

function readTensor(dir: string, t: FixtureTensor): HostTensor {
  const raw = fs.readFileSync(path.join(dir, t.file));
  const bytes = new Uint8Array(raw.byteLength);
  bytes.set(raw); // aligned copy
  const count = t.dims.reduce((a, b) => a * b, 1);
  const make: Record<string, () => HostTensor['data']> = {
    float32: () => new Float32Array(bytes.buffer),
    float16: () => new Uint16Array(bytes.buffer),
    int64: () => new BigInt64Array(bytes.buffer),
    int32: () => new Int32Array(bytes.buffer),
    uint8: () => bytes,
    bool: () => bytes,
  };
  if (!make[t.dtype]) throw new Error(`${t.file}: unsupported dtype ${t.dtype}`);
  const data = make[t.dtype]();
  if (data.length !== count) throw new Error(`${t.file}: ${data.length} values, dims [${t.dims}] need ${count}`);
  return { type: t.dtype as HostTensorType, dims: t.dims, data };
}

/** Counts tolerance violations and reports the worst one, for a readable failure. */
function compare(actual: HostTensor, expected: HostTensor, tol: Fixture['tolerance']) {
  let violations = 0;
  let maxAbs = 0;
  let worst = -1;
  let worstExcess = -Infinity;
  for (let i = 0; i < expected.data.length; i++) {
    const a = Number(actual.data[i]);
    const e = Number(expected.data[i]);
    const diff = Math.abs(a - e);
    const bound = tol.atol + tol.rtol * Math.abs(e);
    if (diff > maxAbs) maxAbs = diff;
    if (!(diff <= bound)) {
      violations++;
      if (worst < 0 || Number.isNaN(diff) || diff - bound > worstExcess) {
        worst = i;
        worstExcess = diff - bound;
      }
    }
  }
  return { violations, maxAbs, worst, worstActual: Number(actual.data[worst]), worstExpected: Number(expected.data[worst]) };
}

describe.skipIf(!bundle.manifest)('ONNX export parity (models/tiny)', () => {
  const manifest = bundle.manifest as Manifest;
  const parityDir = path.join(manifest.dir, 'parity');
  const graphs = Object.entries(manifest.graphs).map(([name, entry]) => ({ name, path: entry!.path }));
  let pool: OnnxWorkerPool;

  beforeAll(async () => {
    pool = await OnnxWorkerPool.create({ name: 'parity', graphs: Object.fromEntries(graphs.map((g) => [g.name, g.path])), workers: 1 });
  });
  afterAll(async () => {
    await pool?.close();
  });

  it('has a fixture for every graph', () => {
    const missing = graphs.filter((g) => !fs.existsSync(path.join(parityDir, `${g.name}.json`))).map((g) => g.name);
    expect(missing, `graphs without a parity fixture in ${parityDir}`).toEqual([]);
  });

  for (const { name } of graphs) {
    it(`${name}: every output within tolerance`, async () => {
      const fixturePath = path.join(parityDir, `${name}.json`);
      if (!fs.existsSync(fixturePath)) return; // reported by the test above
      const fixture = JSON.parse(fs.readFileSync(fixturePath, 'utf8')) as Fixture;
      const feeds = Object.fromEntries(Object.entries(fixture.inputs).map(([k, t]) => [k, readTensor(parityDir, t)]));
      const outputs = await pool.run(name, feeds);
      const expectedNames = Object.keys(fixture.outputs);
      expect(Object.keys(outputs).sort()).toEqual(expect.arrayContaining(expectedNames.sort()));
      const report: Record<string, unknown> = {};
      for (const [outName, t] of Object.entries(fixture.outputs)) {
        const expected = readTensor(parityDir, t);
        const actual = outputs[outName];
        expect(actual.dims, `${name}.${outName} dims`).toEqual(t.dims);
        const result = compare(actual, expected, fixture.tolerance);
        report[outName] = result;
        expect(
          result.violations,
          `${name}.${outName}: ${result.violations} of ${expected.data.length} values outside atol ${fixture.tolerance.atol} + rtol ${fixture.tolerance.rtol}; ` +
            `worst at ${result.worst}: onnx ${result.worstActual} vs torch ${result.worstExpected} (|diff| ${result.maxAbs})`,
        ).toBe(0);
      }
    });
  }
});
