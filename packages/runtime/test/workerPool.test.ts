// OnnxWorkerPool against the real prompter graph of models/tiny.
import * as fs from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { status, toServiceError } from '@cfrsam/rpc';
import { float32Tensor, type Manifest } from '@cfrsam/contract';
import { OnnxWorkerPool, PoolSaturatedError, PoolUnavailableError, WorkerCrashedError } from '@cfrsam/runtime';
import { testBundle } from '@cfrsam/testing';

const bundle = testBundle();
if (bundle.skipReason) console.warn(`workerPool.test: ${bundle.skipReason}`);

describe.skipIf(!bundle.manifest)('OnnxWorkerPool', () => {
  const manifest = bundle.manifest as Manifest;
  const S = manifest.inputSize;
  const image = () => float32Tensor([1, 3, S, S]);
  let pool: OnnxWorkerPool;

  beforeAll(async () => {
    pool = await OnnxWorkerPool.create({
      name: 'test',
      graphs: { prompter: manifest.graphs.prompter!.path },
      workers: 2,
      maxQueue: 1,
      faultInjection: true,
      log: () => {},
    });
  });
  afterAll(async () => {
    await pool?.close();
  });

  it('runs a graph off the main thread, transferring buffers it owns', async () => {
    const input = image();
    const out = await pool.run('prompter', { image: input });
    expect(out.points.dims).toEqual([1, manifest.prompter.anchors, 2]);
    expect(out.logits.dims).toEqual([1, manifest.prompter.anchors, manifest.classes.length + 1]);
    expect(out.points.data).toBeInstanceOf(Float32Array);
    expect(input.data.byteLength).toBe(0); // transferred, not copied

    // A view into a larger buffer is copied, so the caller's memory stays intact.
    const big = new Float32Array(3 * S * S + 16);
    const view = big.subarray(16);
    await pool.run('prompter', { image: { type: 'float32', dims: [1, 3, S, S], data: view } });
    expect(big.byteLength).toBe((3 * S * S + 16) * 4);
  });

  it('refuses a feed whose buffer an earlier run took over, or that does not fill its dims, and keeps serving', async () => {
    const input = image();
    await pool.run('prompter', { image: input });
    // postMessage drops a message whose transfer list holds a detached buffer: without the check
    // this job would never settle.
    await expect(pool.run('prompter', { image: input })).rejects.toThrow(/feed "image" has no data: its buffer was transferred/);
    await expect(pool.run('prompter', { image: { type: 'float32', dims: [1, 3, S, S], data: new Float32Array(5) } })).rejects.toThrow(
      /feed "image" has 5 values, dims \[1,3,256,256\] need 196608/,
    );
    await expect(pool.run('prompter', { image: image() })).resolves.toHaveProperty('points');
  });

  it('fails a job whose worker dies, replaces the worker, and leaves other jobs alone', async () => {
    const other = pool.run('prompter', { image: image() });
    const crash = pool.run('__exit__', {});
    await expect(crash).rejects.toThrow(WorkerCrashedError);
    await expect(crash).rejects.toThrow(/worker \d died \(exit code 70\) while running "__exit__"/);
    await expect(other).resolves.toHaveProperty('points');
    expect(toServiceError(await crash.catch((e) => e)).code).toBe(status.INTERNAL);
    // The replacement loads its sessions, then serves the next jobs.
    await pool.ready();
    expect(pool.stats().busy).toBe(0);
    const again = await Promise.all([pool.run('prompter', { image: image() }), pool.run('prompter', { image: image() })]);
    expect(again).toHaveLength(2);
    expect(pool.stats()).toMatchObject({ workers: 2, crashed: 1 });
  });

  it('rejects work beyond the queue bound with RESOURCE_EXHAUSTED', async () => {
    const running = [pool.run('prompter', { image: image() }), pool.run('prompter', { image: image() })];
    const queued = pool.run('prompter', { image: image() });
    const rejected = pool.run('prompter', { image: image() });
    await expect(rejected).rejects.toThrow(PoolSaturatedError);
    expect(toServiceError(await rejected.catch((e) => e)).code).toBe(status.RESOURCE_EXHAUSTED);
    await Promise.all([...running, queued]);
  });

  it('drops a queued job when its signal aborts', async () => {
    const running = [pool.run('prompter', { image: image() }), pool.run('prompter', { image: image() })];
    const controller = new AbortController();
    const queued = pool.run('prompter', { image: image() }, { signal: controller.signal });
    controller.abort();
    await expect(queued).rejects.toMatchObject({ name: 'AbortError' });
    expect(toServiceError(await queued.catch((e) => e)).code).toBe(status.CANCELLED);
    await Promise.all(running);
    expect(pool.stats().queued).toBe(0);
  });

  it('reports an unknown graph and an unloadable model clearly', async () => {
    await expect(pool.run('nope', {})).rejects.toThrow(/no graph "nope" in this pool/);
    const broken = '/tmp/cfrsam-not-a-model.onnx';
    fs.writeFileSync(broken, 'not onnx');
    await expect(OnnxWorkerPool.create({ graphs: { bad: broken }, log: () => {} })).rejects.toThrow(
      /cannot load graph "bad" from \/tmp\/cfrsam-not-a-model\.onnx/,
    );
    fs.rmSync(broken, { force: true });
  });

  it('rejects queued and new jobs once closed', async () => {
    const local = await OnnxWorkerPool.create({ graphs: { prompter: manifest.graphs.prompter!.path }, workers: 1 });
    const running = local.run('prompter', { image: image() });
    const queued = local.run('prompter', { image: image() });
    const closing = local.close();
    await expect(queued).rejects.toThrow(PoolUnavailableError);
    await expect(running).resolves.toHaveProperty('logits'); // running work completes
    await closing;
    await expect(local.run('prompter', { image: image() })).rejects.toThrow(/pool is closed/);
  });
});
