// Messages between OnnxWorkerPool (main thread) and onnxWorker.js (worker threads).
import type { HostTensor } from '@cfrsam/contract';

export interface WorkerData {
  /** graph name -> .onnx path */
  graphs: Record<string, string>;
  intraOpThreads: number;
  executionProviders: string[];
  /** Enables the "__exit__" test graph that kills the worker mid-job. */
  faultInjection: boolean;
}

/** What a worker keeps of a run's outputs (see OnnxWorkerPool, "resident state"). */
export interface RetainedOutputs {
  bytes: number;
  dims: Record<string, number[]>;
}

export type WorkerRequest =
  | {
      kind: 'run';
      id: number;
      graph: string;
      feeds: Record<string, HostTensor>;
      /** Keep these outputs here under `key` instead of sending them back. */
      retain?: { key: string; outputs: string[] };
      /** The tensors kept under this key join the feeds (by their output names). */
      resident?: string;
    }
  /** Copies of the tensors kept under `key` (tests, diagnostics). */
  | { kind: 'read'; id: number; key: string }
  /** Forget the tensors kept under `key`. No reply. */
  | { kind: 'release'; key: string };

export type WorkerReply =
  | { kind: 'ready'; io: Record<string, { inputs: readonly string[]; outputs: readonly string[] }> }
  | { kind: 'startup-error'; message: string }
  | { kind: 'result'; id: number; outputs: Record<string, HostTensor>; runMs: number; retained?: RetainedOutputs }
  /** `residentMissing`: the job named a key this worker holds nothing under. */
  | { kind: 'error'; id: number; message: string; residentMissing?: boolean };
