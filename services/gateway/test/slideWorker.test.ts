// The slide worker's handling of a redelivered region task whose region is done already (its worker
// stored it and died before the ack), against an in-memory store: it must not segment the region
// again, and must do what that worker had left to do — queue the region's successor in its chain
// and, for the job's last region, queue and run the finalize step.
import { describe, expect, it } from 'vitest';
import type { JsMsg } from 'nats';
import type { SegmentationPipeline } from '../src/pipeline';
import { DEFAULT_SLIDE_JOB_SETTINGS, type ProgressRecord, type SlideJobRecord, type SlideJobStore } from '../src/slideJobs';
import { SlideWorker } from '../src/slideWorker';

const cell = { x: 0, y: 0, width: 10, height: 10, tissueFraction: 1 };

function fakes(progress: ProgressRecord, regions: number) {
  const job = { jobId: 'a'.repeat(32), regions, taskWindow: 2, state: 'RUNNING' } as SlideJobRecord;
  const calls: string[] = [];
  let jobReads = 0;
  const store = {
    settings: { ...DEFAULT_SLIDE_JOB_SETTINGS, natsUrl: '' },
    // The second read is finalizeAfterLastRegion's: answer "done" so the test stops there.
    job: async () => (jobReads++ === 0 ? job : { ...job, state: 'DONE' }),
    progressIfDone: async () => progress,
    publishSuccessor: async (_job: SlideJobRecord, region: number) => void calls.push(`successor of ${region}`),
    publishFinalize: async () => void calls.push('finalize queued'),
    plan: async () => Array.from({ length: regions }, () => cell),
  } as unknown as SlideJobStore;
  const pipeline = {
    segment: async () => {
      calls.push('segmented');
      return { nuclei: [] };
    },
  } as unknown as SegmentationPipeline;
  const acks: string[] = [];
  const msg = {
    data: new TextEncoder().encode(JSON.stringify({ jobId: job.jobId, region: 0, cell })),
    subject: `cfrsam-slide-tasks.${job.jobId}.0`,
    info: { redeliveryCount: 2 },
    ack: () => void acks.push('ack'),
    nak: () => void acks.push('nak'),
    term: () => void acks.push('term'),
    working: () => undefined,
  } as unknown as JsMsg;
  const worker = new SlideWorker(store, pipeline, () => undefined);
  return { run: () => (worker as unknown as { run(m: JsMsg): Promise<void> }).run(msg), calls, acks, jobReads: () => jobReads };
}

describe('SlideWorker, a redelivered region that is done already', () => {
  it('passes its chain on without segmenting it again', async () => {
    const f = fakes({ bits: Buffer.from([1]).toString('base64'), done: 1, nuclei: 3, tissueMpx: 0.1 }, 4);
    await f.run();
    expect(f.calls).toEqual(['successor of 0']);
    expect(f.acks).toEqual(['ack']);
  });

  it("queues and runs the finalize step when it was the job's last region", async () => {
    const f = fakes({ bits: Buffer.from([15]).toString('base64'), done: 4, nuclei: 9, tissueMpx: 0.4 }, 4);
    await f.run();
    expect(f.calls).toEqual(['successor of 0', 'finalize queued']);
    expect(f.acks).toEqual(['ack']);
    expect(f.jobReads()).toBe(2); // finalizeAfterLastRegion looked at the job (done by then: nothing to do)
  });
});
