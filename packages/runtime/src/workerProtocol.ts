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

export type WorkerRequest = { kind: 'run'; id: number; graph: string; feeds: Record<string, HostTensor> };

export type WorkerReply =
  | { kind: 'ready'; io: Record<string, { inputs: readonly string[]; outputs: readonly string[] }> }
  | { kind: 'startup-error'; message: string }
  | { kind: 'result'; id: number; outputs: Record<string, HostTensor>; runMs: number }
  | { kind: 'error'; id: number; message: string };
