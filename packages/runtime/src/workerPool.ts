// OnnxWorkerPool: N worker threads, each holding an onnxruntime session per graph, fed from one
// bounded FIFO queue. Inference never blocks the event loop, so gRPC, health checks and
// cancellation stay responsive while the models run.
import * as os from 'node:os';
import * as path from 'node:path';
import { Worker } from 'node:worker_threads';
import { status } from '@grpc/grpc-js';
import { elementCount, type HostTensor } from '@cfrsam/contract';
import { logger } from '@cfrsam/rpc';
import type { WorkerData, WorkerReply, WorkerRequest } from './workerProtocol';

/** The queue is full: the service is overloaded (RESOURCE_EXHAUSTED). */
export class PoolSaturatedError extends Error {
  readonly grpcStatus = status.RESOURCE_EXHAUSTED;
  constructor(message: string) {
    super(message);
    this.name = 'PoolSaturatedError';
  }
}

/** A worker thread died while running a job (INTERNAL); the worker is replaced. */
export class WorkerCrashedError extends Error {
  readonly grpcStatus = status.INTERNAL;
  constructor(message: string) {
    super(message);
    this.name = 'WorkerCrashedError';
  }
}

/** The pool is closed or cannot start workers (UNAVAILABLE). */
export class PoolUnavailableError extends Error {
  readonly grpcStatus = status.UNAVAILABLE;
  constructor(message: string) {
    super(message);
    this.name = 'PoolUnavailableError';
  }
}

/** onnxruntime rejected a run (bad feed names/shapes, a runtime failure) (INTERNAL). */
export class InferenceError extends Error {
  readonly grpcStatus = status.INTERNAL;
  constructor(message: string) {
    super(message);
    this.name = 'InferenceError';
  }
}

function abortError(message: string): Error {
  const err = new Error(message);
  err.name = 'AbortError';
  return err;
}

export interface OnnxWorkerPoolOptions {
  /** graph name -> .onnx file (e.g. from manifest.graphs[name].path). */
  graphs: Record<string, string>;
  /** Worker threads (default 1). Each holds its own copy of every session. */
  workers?: number;
  /** onnxruntime intra-op threads per worker (default 1: parallelism comes from workers). */
  intraOpThreads?: number;
  /** Jobs that may wait for a worker; more are rejected with PoolSaturatedError (default 64). */
  maxQueue?: number;
  /** onnxruntime execution providers in preference order (default ['cpu']). */
  executionProviders?: string[];
  /** Name used in error messages and logs. */
  name?: string;
  /** Test hook: run('__exit__', {}) kills the worker that takes it. Never enable in production. */
  faultInjection?: boolean;
  /** Called after each completed job with its queue wait and run time. */
  onJobDone?: (info: { graph: string; queuedMs: number; runMs: number }) => void;
  /**
   * Called once if the pool becomes unusable (workers cannot load the graphs), e.g. to report
   * NOT_SERVING so that the orchestrator replaces the process.
   */
  onBroken?: (err: Error) => void;
  /** Where worker replacement and startup failures are reported (default: the structured logger of @cfrsam/rpc). */
  log?: (message: string) => void;
}

export interface RunOptions {
  /** Aborting removes the job if it is still queued (rejects with AbortError); a running job completes. */
  signal?: AbortSignal;
}

export interface PoolStats {
  workers: number;
  busy: number;
  queued: number;
  maxQueue: number;
  completed: number;
  crashed: number;
}

interface Job {
  id: number;
  graph: string;
  feeds: Record<string, HostTensor>;
  transfer: ArrayBuffer[];
  resolve: (outputs: Record<string, HostTensor>) => void;
  reject: (err: Error) => void;
  signal?: AbortSignal;
  onAbort?: () => void;
  enqueuedAt: number;
  startedAt: number;
}

interface Slot {
  index: number;
  worker: Worker | null;
  ready: boolean;
  job: Job | null;
  lastError: string | null;
  consecutiveStartFailures: number;
  /** Set when we terminate the worker ourselves (close), so 'exit' is not treated as a crash. */
  retiring: boolean;
}

const WORKER_SCRIPT = path.join(__dirname, 'onnxWorker.js');

/**
 * Prepares feeds for postMessage. A typed array that spans its own ArrayBuffer is transferred
 * (no copy; the caller's array is detached afterwards). A view into a larger buffer (a slice of a
 * received message, a pooled Buffer) is copied to an exact-size buffer first: structured clone
 * would otherwise copy the whole underlying buffer. SharedArrayBuffer views are shared as is.
 */
/** Why a feed cannot be sent (its data does not fill its dims, e.g. a buffer already transferred), or null. */
function unusableFeed(feeds: Record<string, HostTensor>): string | null {
  for (const [name, t] of Object.entries(feeds)) {
    const count = elementCount(t.dims);
    if (t.data.length !== count) {
      const detached = t.data.length === 0 && t.data.buffer.byteLength === 0 && count > 0;
      return detached
        ? `feed "${name}" has no data: its buffer was transferred to a worker by an earlier run (pass a copy)`
        : `feed "${name}" has ${t.data.length} values, dims [${t.dims.join(',')}] need ${count}`;
    }
  }
  return null;
}

function prepareFeeds(feeds: Record<string, HostTensor>): { feeds: Record<string, HostTensor>; transfer: ArrayBuffer[] } {
  const out: Record<string, HostTensor> = {};
  const transfer: ArrayBuffer[] = [];
  const seen = new Set<ArrayBufferLike>();
  for (const [name, t] of Object.entries(feeds)) {
    let data = t.data;
    if (!(data.buffer instanceof SharedArrayBuffer)) {
      const whole = data.byteOffset === 0 && data.byteLength === data.buffer.byteLength;
      if (!whole || seen.has(data.buffer)) data = data.slice() as HostTensor['data'];
      seen.add(data.buffer);
      transfer.push(data.buffer as ArrayBuffer);
    }
    out[name] = { type: t.type, dims: [...t.dims], data };
  }
  return { feeds: out, transfer };
}

export class OnnxWorkerPool {
  private readonly options: Required<Omit<OnnxWorkerPoolOptions, 'onJobDone' | 'onBroken'>> & Pick<OnnxWorkerPoolOptions, 'onJobDone' | 'onBroken'>;
  private readonly slots: Slot[] = [];
  private readonly queue: Job[] = [];
  private nextId = 1;
  private closed = false;
  private completed = 0;
  private crashed = 0;
  private readonly readyWaiters: Array<{ resolve: () => void; reject: (err: Error) => void }> = [];
  private startupFailure: Error | null = null;
  private graphIo: Record<string, { inputs: readonly string[]; outputs: readonly string[] }> = {};

  /** Starts the workers; use `await pool.ready()` (or OnnxWorkerPool.create) before relying on it. */
  constructor(options: OnnxWorkerPoolOptions) {
    if (Object.keys(options.graphs).length === 0) throw new Error('OnnxWorkerPool: no graphs given');
    this.options = {
      workers: Math.max(1, options.workers ?? 1),
      intraOpThreads: Math.max(1, options.intraOpThreads ?? 1),
      maxQueue: Math.max(0, options.maxQueue ?? 64),
      executionProviders: options.executionProviders ?? ['cpu'],
      name: options.name ?? 'onnx',
      faultInjection: options.faultInjection ?? false,
      log: options.log ?? ((m: string) => logger().warn(m)),
      graphs: options.graphs,
      onJobDone: options.onJobDone,
      onBroken: options.onBroken,
    };
    for (let i = 0; i < this.options.workers; i++) {
      const slot: Slot = { index: i, worker: null, ready: false, job: null, lastError: null, consecutiveStartFailures: 0, retiring: false };
      this.slots.push(slot);
      this.spawn(slot);
    }
  }

  /** Creates a pool and waits until every worker has loaded its sessions. */
  static async create(options: OnnxWorkerPoolOptions): Promise<OnnxWorkerPool> {
    const pool = new OnnxWorkerPool(options);
    try {
      await pool.ready();
    } catch (err) {
      await pool.close();
      throw err;
    }
    return pool;
  }

  /** Resolves when all workers are ready; rejects if a worker cannot load the graphs. */
  ready(): Promise<void> {
    if (this.startupFailure) return Promise.reject(this.startupFailure);
    if (this.slots.every((s) => s.ready)) return Promise.resolve();
    return new Promise((resolve, reject) => this.readyWaiters.push({ resolve, reject }));
  }

  /** Input and output names of each graph, as the sessions report them (after ready()). */
  io(graph: string): { inputs: readonly string[]; outputs: readonly string[] } | undefined {
    return this.graphIo[graph];
  }

  /**
   * Runs `graph` on `feeds` in the next free worker. Feeds that own their ArrayBuffer are
   * transferred, i.e. detached from the caller (see prepareFeeds); outputs come back transferred.
   * Rejects with PoolSaturatedError when maxQueue jobs already wait, AbortError when `signal`
   * aborts while queued, WorkerCrashedError when the worker dies, InferenceError when onnxruntime
   * fails, PoolUnavailableError after close().
   */
  run(graph: string, feeds: Record<string, HostTensor>, options: RunOptions = {}): Promise<Record<string, HostTensor>> {
    if (this.closed) return Promise.reject(new PoolUnavailableError(`${this.options.name} pool is closed`));
    if (this.startupFailure) return Promise.reject(new PoolUnavailableError(this.startupFailure.message));
    if (options.signal?.aborted) return Promise.reject(abortError(`${graph}: cancelled before it was queued`));
    const idle = this.slots.find((s) => s.ready && !s.job);
    if (!idle && this.queue.length >= this.options.maxQueue) {
      return Promise.reject(
        new PoolSaturatedError(
          `${this.options.name}: ${this.queue.length} inference jobs already queued (limit ${this.options.maxQueue}); retry later`,
        ),
      );
    }
    const unusable = unusableFeed(feeds);
    // A worker never receives a message whose transfer list holds a detached buffer (postMessage
    // drops it silently), so such a job would wait forever: refuse it here.
    if (unusable) return Promise.reject(new InferenceError(`${graph}: ${unusable}`));
    const prepared = prepareFeeds(feeds);
    return new Promise((resolve, reject) => {
      const job: Job = {
        id: this.nextId++,
        graph,
        feeds: prepared.feeds,
        transfer: prepared.transfer,
        resolve,
        reject,
        signal: options.signal,
        enqueuedAt: performance.now(),
        startedAt: 0,
      };
      if (options.signal) {
        job.onAbort = () => {
          const i = this.queue.indexOf(job);
          if (i >= 0) {
            this.queue.splice(i, 1);
            reject(abortError(`${graph}: cancelled while queued`));
          }
        };
        options.signal.addEventListener('abort', job.onAbort, { once: true });
      }
      if (idle) this.dispatch(idle, job);
      else this.queue.push(job);
    });
  }

  stats(): PoolStats {
    return {
      workers: this.slots.length,
      busy: this.slots.filter((s) => s.job).length,
      queued: this.queue.length,
      maxQueue: this.options.maxQueue,
      completed: this.completed,
      crashed: this.crashed,
    };
  }

  /**
   * Rejects queued jobs, lets running jobs finish (up to `graceMs`, default 10 s), then terminates
   * the workers. Idempotent.
   */
  async close(graceMs = 10_000): Promise<void> {
    if (!this.closed) {
      this.closed = true;
      for (const job of this.queue.splice(0)) this.settle(job, new PoolUnavailableError(`${this.options.name} pool closed`));
      for (const w of this.readyWaiters.splice(0)) w.reject(new PoolUnavailableError(`${this.options.name} pool closed`));
    }
    const deadline = Date.now() + graceMs;
    while (this.slots.some((s) => s.job) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    await Promise.all(
      this.slots.map(async (slot) => {
        const worker = slot.worker;
        slot.retiring = true;
        slot.worker = null;
        slot.ready = false;
        if (slot.job) this.settle(slot.job, new PoolUnavailableError(`${this.options.name} pool closed while the job ran`));
        slot.job = null;
        if (worker) await worker.terminate();
      }),
    );
  }

  private spawn(slot: Slot): void {
    const data: WorkerData = {
      graphs: this.options.graphs,
      intraOpThreads: this.options.intraOpThreads,
      executionProviders: this.options.executionProviders,
      faultInjection: this.options.faultInjection,
    };
    const worker = new Worker(WORKER_SCRIPT, { workerData: data, env: process.env });
    slot.worker = worker;
    slot.ready = false;
    slot.retiring = false;
    slot.lastError = null;
    worker.on('message', (reply: WorkerReply) => this.onMessage(slot, worker, reply));
    worker.on('error', (err) => {
      slot.lastError = err.message;
    });
    worker.on('exit', (code) => this.onExit(slot, worker, code));
  }

  private onMessage(slot: Slot, worker: Worker, reply: WorkerReply): void {
    if (slot.worker !== worker) return;
    switch (reply.kind) {
      case 'ready':
        slot.ready = true;
        slot.consecutiveStartFailures = 0;
        this.graphIo = reply.io;
        if (this.slots.every((s) => s.ready)) for (const w of this.readyWaiters.splice(0)) w.resolve();
        this.pump();
        return;
      case 'startup-error': {
        const err = new PoolUnavailableError(`${this.options.name} worker ${slot.index}: ${reply.message}`);
        this.failStartup(err);
        return;
      }
      case 'result':
      case 'error': {
        const job = slot.job;
        if (!job || job.id !== reply.id) return;
        slot.job = null;
        if (reply.kind === 'result') {
          this.completed++;
          this.options.onJobDone?.({ graph: job.graph, queuedMs: job.startedAt - job.enqueuedAt, runMs: reply.runMs });
          this.settle(job, null, reply.outputs);
        } else {
          this.settle(job, new InferenceError(`${job.graph}: ${reply.message}`));
        }
        this.pump();
        return;
      }
    }
  }

  private onExit(slot: Slot, worker: Worker, code: number): void {
    if (slot.worker !== worker || slot.retiring || this.closed) return;
    const wasReady = slot.ready;
    slot.worker = null;
    slot.ready = false;
    const reason = slot.lastError ? `: ${slot.lastError}` : '';
    const job = slot.job;
    slot.job = null;
    if (job) {
      this.crashed++;
      this.settle(
        job,
        new WorkerCrashedError(
          `${this.options.name} worker ${slot.index} died (exit code ${code}${reason}) while running "${job.graph}"; ` +
            'the job failed and the worker is being replaced',
        ),
      );
    }
    if (!wasReady) {
      // Died while loading sessions: retry a few times, then give up (a broken bundle or no memory).
      slot.consecutiveStartFailures++;
      if (slot.consecutiveStartFailures >= 3) {
        this.failStartup(new PoolUnavailableError(`${this.options.name} worker ${slot.index} failed to start 3 times (exit code ${code}${reason})`));
        return;
      }
    }
    this.options.log(`${this.options.name}: worker ${slot.index} exited with code ${code}${reason}; starting a replacement`);
    const delay = wasReady ? 0 : 200 * slot.consecutiveStartFailures;
    setTimeout(() => {
      if (!this.closed && slot.worker === null) this.spawn(slot);
    }, delay).unref();
  }

  private failStartup(err: Error): void {
    if (this.startupFailure) return;
    this.startupFailure = err;
    this.options.log(err.message);
    this.options.onBroken?.(err);
    for (const w of this.readyWaiters.splice(0)) w.reject(err);
    for (const job of this.queue.splice(0)) this.settle(job, err);
  }

  private dispatch(slot: Slot, job: Job): void {
    if (job.signal && job.onAbort) job.signal.removeEventListener('abort', job.onAbort);
    slot.job = job;
    job.startedAt = performance.now();
    const request: WorkerRequest = { kind: 'run', id: job.id, graph: job.graph, feeds: job.feeds };
    try {
      slot.worker!.postMessage(request, job.transfer);
    } catch (err) {
      slot.job = null;
      this.settle(job, new InferenceError(`${job.graph}: cannot send the feeds to a worker: ${(err as Error).message}`));
      return;
    }
    // The worker owns the feed buffers now; drop our references.
    job.feeds = {};
    job.transfer = [];
  }

  private pump(): void {
    for (const slot of this.slots) {
      if (this.queue.length === 0) return;
      if (slot.ready && !slot.job && slot.worker) this.dispatch(slot, this.queue.shift()!);
    }
  }

  private settle(job: Job, err: Error | null, outputs?: Record<string, HostTensor>): void {
    if (job.signal && job.onAbort) job.signal.removeEventListener('abort', job.onAbort);
    if (err) job.reject(err);
    else job.resolve(outputs!);
  }
}

/** Default worker count: one per core, at most 4 (each worker holds a copy of the sessions). */
export function defaultWorkerCount(): number {
  return Math.max(1, Math.min(4, os.availableParallelism?.() ?? os.cpus().length));
}
