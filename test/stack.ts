// Test helper: the whole system (prompter, encoder, decoders, gateway) as separate processes on
// loopback, started from the compiled services (run `npm run build` first) with the committed
// bundle models/tiny (CFRSAM_BUNDLE overrides it). Each process writes its spans as JSON lines
// to <traceDir>/<process>.jsonl, so tests can put together the trace of one call.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { makeClient, segmentationProto, type SpanRecord, stagesProto } from '@cfrsam/rpc';
import { startStack, type RunningStack, type StackOptions } from '../services/gateway/dist/cli/stack';

export interface TestStack extends RunningStack {
  segmentation: segmentationProto.SegmentationClient;
  encoderClient: stagesProto.EncoderClient;
  traceDir: string;
  /** The last lines each process printed (for failure messages and log assertions). */
  logs: Map<string, string[]>;
  /** All spans written so far by every process (or by the named process only). */
  spans(processName?: string): SpanRecord[];
  /** Stops the processes, closes the clients and removes the trace directory. */
  close(): Promise<void>;
}

export async function startTestStack(options: Omit<StackOptions, 'env' | 'log'> = {}): Promise<TestStack> {
  const traceDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cfrsam-trace-'));
  const logs = new Map<string, string[]>();
  const stack = await startStack({
    decoders: 2,
    port: 0,
    ...options,
    env: (name) => ({ CFRSAM_TRACE_FILE: path.join(traceDir, `${name}.jsonl`) }),
    log: (name, line) => {
      const lines = logs.get(name) ?? [];
      lines.push(line);
      if (lines.length > 500) lines.shift();
      logs.set(name, lines);
      if (process.env.CFRSAM_TEST_VERBOSE) process.stderr.write(`[${name}] ${line}\n`);
    },
  });
  const segmentation = makeClient(segmentationProto.SegmentationClient, stack.gateway, { maxMessageBytes: 256 * 1024 * 1024 });
  const encoderClient = makeClient(stagesProto.EncoderClient, stack.encoder);
  return {
    ...stack,
    segmentation,
    encoderClient,
    traceDir,
    logs,
    spans(processName?: string) {
      const out: SpanRecord[] = [];
      const files = processName ? [`${processName}.jsonl`].filter((f) => fs.existsSync(path.join(traceDir, f))) : fs.readdirSync(traceDir);
      for (const f of files) {
        for (const line of fs.readFileSync(path.join(traceDir, f), 'utf8').split('\n')) {
          if (line.trim()) out.push(JSON.parse(line) as SpanRecord);
        }
      }
      return out;
    },
    async close() {
      segmentation.close();
      encoderClient.close();
      await stack.stop();
      fs.rmSync(traceDir, { recursive: true, force: true });
    },
  };
}

/** A Segment request with the defaults the tests build on (label map and masks returned). */
export function segmentRequest(image: Buffer, extra: Partial<segmentationProto.SegmentRequest> = {}): segmentationProto.SegmentRequest {
  return {
    image,
    model: '',
    prompts: [],
    promptMode: segmentationProto.PromptMode.PROMPT_MODE_UNSPECIFIED,
    returnLabelMap: true,
    returnMasks: true,
    minScore: 0,
    mpp: 0,
    ...extra,
  };
}

/** A response without its timings (which differ run to run), for comparing answers. */
export function comparableResponse(r: segmentationProto.SegmentResponse): segmentationProto.SegmentResponse {
  return { ...r, timings: [] };
}
