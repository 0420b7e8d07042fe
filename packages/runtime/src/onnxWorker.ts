// The worker-thread side of OnnxWorkerPool: holds one onnxruntime InferenceSession per graph and
// runs one job at a time. session.run blocks the thread it runs on, which is why it lives here
// and not on the event loop that serves gRPC. Protocol: see workerProtocol.ts.
import { parentPort, workerData } from 'node:worker_threads';
import * as ort from 'onnxruntime-node';
import type { HostTensor } from '@cfrsam/contract';
import type { WorkerData, WorkerReply, WorkerRequest } from './workerProtocol';

const config = workerData as WorkerData;
const port = parentPort;
if (!port) throw new Error('onnxWorker.js must run in a worker thread (started by OnnxWorkerPool)');

const sessions = new Map<string, ort.InferenceSession>();

function send(reply: WorkerReply, transfer: ArrayBuffer[] = []): void {
  port!.postMessage(reply, transfer);
}

/** Copies a typed array into a buffer of its own unless it already spans one, so it can be transferred. */
function ownBuffer<T extends HostTensor['data']>(data: T): T {
  if (data.byteOffset === 0 && data.byteLength === data.buffer.byteLength && !(data.buffer instanceof SharedArrayBuffer)) {
    return data;
  }
  return data.slice() as T;
}

async function start(): Promise<void> {
  const options: ort.InferenceSession.SessionOptions = {
    intraOpNumThreads: config.intraOpThreads,
    interOpNumThreads: 1,
    executionMode: 'sequential',
    graphOptimizationLevel: 'all',
    executionProviders: config.executionProviders,
  };
  for (const [name, file] of Object.entries(config.graphs)) {
    try {
      sessions.set(name, await ort.InferenceSession.create(file, options));
    } catch (err) {
      send({ kind: 'startup-error', message: `cannot load graph "${name}" from ${file}: ${(err as Error).message}` });
      return;
    }
  }
  const io: Record<string, { inputs: readonly string[]; outputs: readonly string[] }> = {};
  for (const [name, s] of sessions) io[name] = { inputs: s.inputNames, outputs: s.outputNames };
  send({ kind: 'ready', io });
}

async function run(request: Extract<WorkerRequest, { kind: 'run' }>): Promise<void> {
  if (request.graph === '__exit__' && config.faultInjection) {
    // Test hook (only with faultInjection): the worker dies mid-job, as it would on a native crash.
    process.exit(70);
  }
  const session = sessions.get(request.graph);
  if (!session) {
    send({ kind: 'error', id: request.id, message: `no graph "${request.graph}" in this pool (have: ${[...sessions.keys()].join(', ')})` });
    return;
  }
  try {
    const feeds: Record<string, ort.Tensor> = {};
    for (const [name, t] of Object.entries(request.feeds)) {
      // onnxruntime-node refuses SharedArrayBuffer memory; copy shared feeds (the decoder's
      // prepared state) here, off the main thread.
      const data = t.data.buffer instanceof SharedArrayBuffer ? t.data.slice() : t.data;
      feeds[name] = new ort.Tensor(t.type, data as never, t.dims);
    }
    const started = performance.now();
    const results = await session.run(feeds);
    const runMs = performance.now() - started;
    const outputs: Record<string, HostTensor> = {};
    const transfer: ArrayBuffer[] = [];
    for (const [name, t] of Object.entries(results)) {
      const data = ownBuffer(t.data as HostTensor['data']);
      outputs[name] = { type: t.type as HostTensor['type'], dims: [...t.dims], data };
      transfer.push(data.buffer as ArrayBuffer);
      t.dispose?.();
    }
    send({ kind: 'result', id: request.id, outputs, runMs }, transfer);
  } catch (err) {
    send({ kind: 'error', id: request.id, message: (err as Error).message ?? String(err) });
  }
}

port.on('message', (request: WorkerRequest) => {
  if (request.kind === 'run') void run(request);
});

void start();
