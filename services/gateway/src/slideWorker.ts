// The slide job worker every gateway runs (when --nats-url is set), and the gRPC handlers of the
// slide job methods. The worker pulls region tasks from the shared durable consumer one at a time
// per slot, runs each region through this gateway's pipeline (the Segment code path, in-process),
// stores the result, then acks. While a region runs the task is kept alive (working()), so a slow
// region is not handed out twice; a gateway that dies stops doing so, and its task goes to another
// gateway after the ack wait.
import type { JsMsg } from 'nats';
import { grpcError, isServiceError, segmentationProto, status, unaryHandler } from '@cfrsam/rpc';
import type { SegmentationPipeline } from './pipeline';
import { decodeTask, SLIDE_TASK_STREAM, SLIDE_WORKER_DURABLE, SlideJobService, SlideJobStore, type SlideTask } from './slideJobs';

const SERVICE = 'cfrsam.v1.Segmentation';

/** Errors that another attempt cannot fix: the job fails at once. */
const PERMANENT_CODES = new Set<number>([status.INVALID_ARGUMENT, status.FAILED_PRECONDITION, status.OUT_OF_RANGE, status.UNIMPLEMENTED]);

export class SlideWorker {
  private stopped = false;
  private readonly loops: Promise<void>[] = [];

  constructor(
    private readonly store: SlideJobStore,
    private readonly pipeline: SegmentationPipeline,
    private readonly log: (line: string) => void = (line) => process.stderr.write(`${line}\n`),
  ) {}

  start(slots: number): void {
    for (let i = 0; i < slots; i++) this.loops.push(this.loop());
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await Promise.all(this.loops);
  }

  private async loop(): Promise<void> {
    while (!this.stopped) {
      let msg: JsMsg | null = null;
      try {
        const consumer = await this.store.js.consumers.get(SLIDE_TASK_STREAM, SLIDE_WORKER_DURABLE);
        msg = await consumer.next({ expires: 2_000 });
      } catch (err) {
        if (this.stopped) return;
        this.log(`slide worker: cannot take a task: ${(err as Error).message}`);
        await sleep(1_000);
        continue;
      }
      if (msg) await this.run(msg);
    }
  }

  private async run(msg: JsMsg): Promise<void> {
    const task = decodeTask(msg.data);
    if (!task) {
      this.log(`slide worker: dropping a malformed task on ${msg.subject}`);
      msg.term('malformed task');
      return;
    }
    const keepAlive = setInterval(() => msg.working(), Math.max(500, this.store.settings.slideAckWaitMs / 3));
    try {
      const job = await this.store.job(task.jobId);
      if (!job || (await this.store.failure(task.jobId))) {
        msg.ack(); // expired or failed job: nothing left to do
        return;
      }
      await this.store.markStarted(task.jobId);
      const image = await this.store.regionImage(task);
      if (!image) throw grpcError(status.FAILED_PRECONDITION, `the pixels of region ${task.region} are missing`);
      const result = await this.pipeline.segment({
        image: Buffer.from(image.buffer, image.byteOffset, image.byteLength),
        model: '',
        prompts: [],
        promptMode: segmentationProto.PromptMode.PROMPT_MODE_AUTO,
        returnLabelMap: false,
        returnMasks: job.returnMasks,
        minScore: job.minScore,
        mpp: job.mpp,
      });
      await this.store.storeRegionResult(task, result);
      msg.ack();
    } catch (err) {
      await this.failed(msg, task, err);
    } finally {
      clearInterval(keepAlive);
    }
  }

  private async failed(msg: JsMsg, task: SlideTask, err: unknown): Promise<void> {
    const message = isServiceError(err) ? err.details || err.message : (err as Error).message;
    const permanent = isServiceError(err) && PERMANENT_CODES.has(err.code);
    const lastAttempt = msg.info.redeliveryCount >= this.store.settings.slideMaxDeliver;
    this.log(`slide worker: job ${task.jobId} region ${task.region} attempt ${msg.info.redeliveryCount} failed: ${message}`);
    if (permanent || lastAttempt) {
      await this.store.markFailed(task.jobId, `region ${task.region}: ${message}`).catch(() => undefined);
      msg.term(message);
    } else {
      msg.nak(1_000);
    }
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms).unref());
}

type SlideMethods = Pick<segmentationProto.SegmentationServer, 'submitSlideJob' | 'getSlideJob' | 'getSlideJobResult'>;

/** Handlers of the slide job methods; with no runtime (no --nats-url) every call is FAILED_PRECONDITION. */
export function slideJobHandlers(runtime: SlideJobsRuntime | null): SlideMethods {
  const require = (): SlideJobService => {
    if (!runtime)
      throw grpcError(status.FAILED_PRECONDITION, 'slide jobs are off on this gateway: start it with --nats-url (a NATS server with JetStream)');
    return runtime.service();
  };
  return {
    submitSlideJob: unaryHandler(`${SERVICE}/SubmitSlideJob`, async (request: segmentationProto.SubmitSlideJobRequest, ctx) => {
      const response = await require().submit(request);
      ctx.span.setAttributes({ 'cfrsam.slide_job': response.jobId, 'cfrsam.regions': response.regions });
      return response;
    }),
    getSlideJob: unaryHandler(`${SERVICE}/GetSlideJob`, async (request: segmentationProto.GetSlideJobRequest) => require().get(request)),
    getSlideJobResult: unaryHandler(`${SERVICE}/GetSlideJobResult`, async (request: segmentationProto.GetSlideJobResultRequest) =>
      require().result(request),
    ),
  };
}

export interface SlideJobsRuntime {
  /** The API; UNAVAILABLE until the NATS server has been reached and the streams exist. */
  service(): SlideJobService;
  close(): Promise<void>;
}

/**
 * Opens the store in the background (retrying, so a gateway serves Segment even while NATS is
 * down) and then starts the worker (slots 0: this gateway only submits and reports).
 */
export async function startSlideJobs(
  settings: ConstructorParameters<typeof SlideJobService>[1] & SlideJobStore['settings'],
  pipeline: SegmentationPipeline,
  log: (line: string) => void = (line) => process.stderr.write(`${line}\n`),
): Promise<SlideJobsRuntime> {
  let closed = false;
  let ready: { store: SlideJobStore; worker: SlideWorker; service: SlideJobService } | null = null;
  const opening = (async () => {
    while (!closed) {
      try {
        const store = await SlideJobStore.open(settings);
        if (closed) {
          await store.close();
          return;
        }
        const worker = new SlideWorker(store, pipeline, log);
        worker.start(settings.slideWorkers);
        ready = { store, worker, service: new SlideJobService(store, settings) };
        return;
      } catch (err) {
        log(`slide jobs: cannot set up NATS at ${settings.natsUrl}: ${(err as Error).message}; retrying`);
        await sleep(2_000);
      }
    }
  })();
  return {
    service() {
      if (!ready) throw grpcError(status.UNAVAILABLE, `slide jobs: the NATS server at ${settings.natsUrl} is not reachable yet`);
      return ready.service;
    },
    async close() {
      closed = true;
      await opening;
      const r = ready as { store: SlideJobStore; worker: SlideWorker } | null;
      if (r) {
        await r.worker.stop();
        await r.store.close();
      }
    },
  };
}
