// The slide job worker every gateway runs (when --nats-url is set), and the gRPC handlers of the
// slide job methods. The worker pulls tasks from the shared durable consumer, one at a time per
// slot. A region task: read the region from the slide itself (path, URL or upload; slides stay
// open per job), resample it to the model's mpp, run it through this gateway's pipeline (the
// Segment code path, in-process), keep the nuclei whose level-0 centroid lies in the region's cell
// grown by the seam band, store them, mark the region done, then ack. While a task runs it is kept
// alive (working()), so a slow region is not handed out twice; a gateway that dies stops doing so,
// and its task goes to another gateway after the ack wait. The job's state is watched while a
// region runs: a cancelled job's region is abandoned within a second. The finalize task writes the
// job's numbered nuclei and artefacts (slideJobs.ts).
import { once } from 'node:events';
import { createReadStream, promises as fs } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Readable } from 'node:stream';
import type { handleClientStreamingCall, handleServerStreamingCall, ServerWritableStream } from '@grpc/grpc-js';
import type { JsMsg } from 'nats';
import {
  callIdentity,
  type CallIdentity,
  grpcError,
  isServiceError,
  segmentationProto,
  status,
  toServiceError,
  unaryHandler,
  type CallContext,
} from '@cfrsam/rpc';
import { encodeRgbPng, nucleiToCsv, nucleiToGeoJson, type ClassStyle } from '@cfrsam/nuclei';
import { pointInRoi, readRegionAtMpp, SlideError, type Mpp, type Slide, type TissueRegion } from '@cfrsam/slides';
import type { SegmentationPipeline } from './pipeline';
import {
  ARTEFACTS,
  artefactObject,
  decodeTask,
  finalObject,
  FINISHED,
  regionObject,
  SLIDE_TASK_STREAM,
  SLIDE_WORKER_DURABLE,
  SlideJobService,
  SlideJobStore,
  slideStatusError,
  type SlideJobRecord,
  type SlideJobSettings,
  type SlideTask,
} from './slideJobs';
import { BlurTally, nucleusToLevel0, SeamLedger, TextSink } from './slideRegions';
import { describeRef, openSlideRef, SlideUpload, uploadStatus } from './slideSources';

const SERVICE = 'cfrsam.v1.Segmentation';

/**
 * Errors that another attempt cannot fix (bad pixels, a bad slide): the job fails at once. Anything
 * else, e.g. features evicted between two stages, is retried up to --slide-max-deliver times.
 */
const PERMANENT_CODES = new Set<number>([status.INVALID_ARGUMENT, status.OUT_OF_RANGE, status.UNIMPLEMENTED]);

/** Answers of a busy gateway or stage: the region waits and tries again in the same delivery. */
const BUSY_CODES = new Set<number>([status.RESOURCE_EXHAUSTED, status.UNAVAILABLE, status.DEADLINE_EXCEEDED]);

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms).unref());

/** Slides kept open by a worker, per job (the few most recent). */
class OpenSlides {
  private readonly open = new Map<string, Promise<Slide>>();
  constructor(
    private readonly slideRoot: string,
    private readonly keep = 4,
  ) {}

  get(job: SlideJobRecord): Promise<Slide> {
    let slide = this.open.get(job.jobId);
    if (!slide) {
      slide = openSlideRef(job.source, this.slideRoot);
      slide.catch(() => this.open.delete(job.jobId));
      this.open.set(job.jobId, slide);
      while (this.open.size > this.keep) {
        const [oldest, s] = this.open.entries().next().value as [string, Promise<Slide>];
        this.open.delete(oldest);
        // Let reads in flight on it finish first.
        void sleep(60_000).then(() => s.then((x) => x.close()).catch(() => undefined));
      }
    }
    return slide;
  }

  async closeAll(): Promise<void> {
    const all = [...this.open.values()];
    this.open.clear();
    await Promise.all(all.map((s) => s.then((x) => x.close()).catch(() => undefined)));
  }
}

export class SlideWorker {
  private stopped = false;
  private readonly loops: Promise<void>[] = [];
  private readonly slides: OpenSlides;
  /** The plans of the jobs this worker ran regions of lately (a finished region queues its successor from it). */
  private readonly plans = new Map<string, Promise<readonly TissueRegion[] | null>>();

  constructor(
    private readonly store: SlideJobStore,
    private readonly pipeline: SegmentationPipeline,
    private readonly log: (line: string) => void = (line) => process.stderr.write(`${line}\n`),
  ) {
    this.slides = new OpenSlides(store.settings.slideRoot);
  }

  start(slots: number): void {
    for (let i = 0; i < slots; i++) this.loops.push(this.loop());
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await Promise.all(this.loops);
    await this.slides.closeAll();
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
    let finalizeNow: SlideJobRecord | null = null;
    try {
      const job = await this.store.job(task.jobId);
      if (!job || FINISHED.has(job.state)) {
        msg.ack(); // removed, cancelled, failed or done: nothing left to do
        return;
      }
      if ('finalize' in task) await this.finalize(job);
      else if (await this.region(job, task)) finalizeNow = job;
      msg.ack();
    } catch (err) {
      await this.failed(msg, task, err);
    } finally {
      clearInterval(keepAlive);
    }
    if (finalizeNow) await this.finalizeAfterLastRegion(finalizeNow);
  }

  /**
   * The worker that stored a job's last region finalizes it at once: its finalize task went to the
   * back of the queue, behind other jobs' regions, and stays there as the fallback should this
   * worker die (it then finds the job done, or finalizes it). A failure here is left to that task.
   */
  private async finalizeAfterLastRegion(job: SlideJobRecord): Promise<void> {
    try {
      const current = await this.store.job(job.jobId);
      if (current && !FINISHED.has(current.state)) await this.finalize(current);
    } catch (err) {
      this.log(`slide worker: job ${job.jobId} finalize after its last region failed (its queued finalize task retries): ${(err as Error).message}`);
    }
  }

  /** A job's plan, read once per job from the store (the last few jobs' kept). */
  private plan(jobId: string): Promise<readonly TissueRegion[] | null> {
    let plan = this.plans.get(jobId);
    if (!plan) {
      plan = this.store.plan(jobId);
      plan.catch(() => this.plans.delete(jobId));
      this.plans.set(jobId, plan);
      if (this.plans.size > 8) this.plans.delete(this.plans.keys().next().value as string);
    }
    return plan;
  }

  /** Runs a region task; true when it stored the job's last region (the job is ready to finalize). */
  private async region(job: SlideJobRecord, task: Extract<SlideTask, { region: number }>): Promise<boolean> {
    if (job.state === 'QUEUED') {
      await this.store.transition(job.jobId, (j) => (j.state === 'QUEUED' ? { state: 'RUNNING', startedAt: new Date().toISOString() } : null));
    }
    const done = await this.store.progressIfDone(job.jobId, task.region);
    if (done) {
      // A redelivery of a region whose worker stopped after storing it (its nuclei are stored
      // before its bit is set): do what that worker had left to do, not the region again.
      await this.store.publishSuccessor(job, task.region, () => this.plan(job.jobId));
      if (done.done < job.regions) return false;
      await this.store.publishFinalize(job.jobId);
      return true;
    }
    // Abandon the region as soon as the job is cancelled (or failed elsewhere).
    const controller = new AbortController();
    let abortedAt = 0;
    const watch = setInterval(() => {
      this.store
        .job(job.jobId)
        .then((j) => {
          if (controller.signal.aborted || (j && !FINISHED.has(j.state))) return;
          abortedAt = Date.now();
          controller.abort(new Error(`slide job ${job.jobId} is ${j?.state ?? 'removed'}`));
        })
        .catch(() => undefined);
    }, 1_000);
    try {
      const { cell } = task;
      const slide = await this.slides.get(job);
      const m = job.marginL0;
      const rect = { x: cell.x - m.x, y: cell.y - m.y, width: cell.width + 2 * m.x, height: cell.height + 2 * m.y };
      const region = await readRegionAtMpp(slide, rect, job.modelMpp, { slideMpp: job.mpp as Mpp });
      if (controller.signal.aborted) return false;
      const request = segmentationProto.SegmentRequest.fromPartial({
        image: await encodeRgbPng(region),
        promptMode: segmentationProto.PromptMode.PROMPT_MODE_AUTO,
        minScore: job.minScore,
        mpp: (region.mpp.x + region.mpp.y) / 2,
      });
      // Admitted as the job's owner (its per-caller limits and fair share apply). A busy gateway or
      // stage is waited for here rather than counted as a failed delivery of the task.
      let response: segmentationProto.SegmentResponse;
      for (let attempt = 1; ; attempt++) {
        try {
          response = await this.pipeline.segment(request, { signal: controller.signal, identity: job.owner });
          break;
        } catch (err) {
          if (controller.signal.aborted || attempt >= 10 || !isServiceError(err) || !BUSY_CODES.has(err.code)) throw err;
          await sleep(Math.min(10_000, 250 * 2 ** attempt));
        }
      }
      if (controller.signal.aborted) return false;
      const b = job.band;
      const level0 = { width: job.width, height: job.height };
      const candidates: segmentationProto.Nucleus[] = [];
      for (const n of response.nuclei) {
        if (!n.centroid) continue;
        const cx = region.origin.x + n.centroid.x * region.scale.x;
        const cy = region.origin.y + n.centroid.y * region.scale.y;
        // the cell and a seam band around it (SeamLedger decides the seam nuclei at finalize)
        if (cx < cell.x - b.x || cx >= cell.x + cell.width + b.x || cy < cell.y - b.y || cy >= cell.y + cell.height + b.y) continue;
        if (cx < 0 || cy < 0 || cx >= level0.width || cy >= level0.height) continue;
        if (job.roi && !pointInRoi(job.roi, cx, cy)) continue;
        candidates.push(nucleusToLevel0(n, region.origin, region.scale, level0, 0));
      }
      const name = regionObject(job.jobId, task.region);
      await this.store.results.putBlob(
        { name },
        // With the region's blur check (tiles run, tiles blurred), summed at finalize.
        segmentationProto.SegmentResponse.encode(
          segmentationProto.SegmentResponse.fromPartial({ nuclei: candidates, tiles: response.tiles, blurredTiles: response.blurredTiles }),
        ).finish(),
      );
      const now = await this.store.job(job.jobId);
      if (!now || FINISHED.has(now.state)) {
        await this.store.results.delete(name).catch(() => undefined); // cancelled meanwhile: free it
        return false;
      }
      const toModel = ((job.mpp.x / job.modelMpp) * (job.mpp.y / job.modelMpp)) / 1e6;
      const progress = await this.store.regionDone(job, task.region, candidates.length, cell.width * cell.height * cell.tissueFraction * toModel);
      // The next region of this one's chain goes to the back of the queue, behind other jobs' tasks.
      await this.store.publishSuccessor(job, task.region, () => this.plan(job.jobId));
      // Whoever completes the last region queues the finalize step (deduplicated by message id),
      // then runs it (finalizeAfterLastRegion).
      if (progress.done >= job.regions) {
        await this.store.publishFinalize(job.jobId);
        return true;
      }
      return false;
    } catch (err) {
      if (controller.signal.aborted) return false;
      if (err instanceof SlideError) {
        throw grpcError(
          status.INVALID_ARGUMENT,
          `cannot read region ${task.region} at (${task.cell.x},${task.cell.y}) of ${describeRef(job.source)}: ${err.message}`,
        );
      }
      throw err;
    } finally {
      clearInterval(watch);
      if (controller.signal.aborted) {
        this.log(
          `slide worker: job ${job.jobId} region ${task.region} abandoned ${Date.now() - abortedAt} ms after it was seen ${(controller.signal.reason as Error).message.replace(/^slide job \S+ is /, '')}`,
        );
      }
    }
  }

  /** Each nucleus once across seams, numbered 1..N; final pages and artefacts written as streams. */
  private async finalize(job: SlideJobRecord): Promise<void> {
    const cells = await this.store.plan(job.jobId);
    if (!cells) throw grpcError(status.DATA_LOSS, 'the region plan is missing');
    const model = this.pipeline.modelInfo();
    const classes: ClassStyle[] = model.classes.map((c) => ({ index: c.index, name: c.name, color: c.color }));
    const ledger = new SeamLedger(cells, job.band);
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), `cfrsam-job-${job.jobId}-`));
    const files = { geojson: path.join(dir, ARTEFACTS[0]), csv: path.join(dir, ARTEFACTS[1]) };
    const geo = new TextSink(files.geojson, true);
    const csv = new TextSink(files.csv, false);
    const started = performance.now();
    try {
      const properties = {
        software: 'cfrsam slide job',
        job: job.jobId,
        coordinates: 'level-0 pixels',
        model: { name: model.name, version: model.version, mpp: job.modelMpp },
        slide: { source: describeRef(job.source), width: job.width, height: job.height, mpp: job.mpp },
        tissueFraction: job.tissueFraction,
        roi: job.roi,
        regionSize: job.regionSize,
        overlap: job.overlap,
      };
      await geo.write(`{"type":"FeatureCollection","properties":${JSON.stringify(properties)},"features":[\n`);
      await csv.write(`${nucleiToCsv([], classes).trimEnd()},region\n`);
      const imageKey = `${job.jobId}:${job.width}x${job.height}`;
      let written = 0;
      const byClass: Record<string, number> = {};
      const blur = new BlurTally();
      for (let i = 0; i < cells.length; i++) {
        const bytes = await this.store.results.getBlob(regionObject(job.jobId, i));
        if (!bytes) throw grpcError(status.DATA_LOSS, `the nuclei of region ${i} are missing`);
        const region = segmentationProto.SegmentResponse.decode(bytes);
        blur.add(cells[i], region);
        const kept: segmentationProto.Nucleus[] = [];
        const feats: string[] = [];
        for (const n of ledger.admit(i, region.nuclei)) {
          n.id = written + kept.length + 1;
          const f = nucleiToGeoJson([n], classes, imageKey).features[0];
          if (!f) continue; // no polygon: written nowhere, so every output agrees
          feats.push(JSON.stringify(f));
          kept.push(n);
          byClass[n.className || 'unclassified'] = (byClass[n.className || 'unclassified'] ?? 0) + 1;
        }
        if (kept.length > 0) {
          await geo.write((written > 0 ? ',\n' : '') + feats.join(',\n'));
          const rows = nucleiToCsv(kept, classes).split('\n').slice(1, -1);
          await csv.write(rows.map((r) => `${r},${i}`).join('\n') + '\n');
        }
        written += kept.length;
        await this.store.results.putBlob(
          { name: finalObject(job.jobId, i) },
          segmentationProto.SegmentResponse.encode(segmentationProto.SegmentResponse.fromPartial({ nuclei: kept })).finish(),
        );
      }
      await geo.write('\n]}\n');
      await geo.end();
      await csv.end();
      for (const [name, file] of [
        [ARTEFACTS[0], files.geojson],
        [ARTEFACTS[1], files.csv],
      ] as const) {
        await this.store.results.put({ name: artefactObject(job.jobId, name) }, Readable.toWeb(createReadStream(file)) as ReadableStream<Uint8Array>);
      }
      const summary = {
        job: job.jobId,
        source: describeRef(job.source),
        level0: { width: job.width, height: job.height },
        mpp: job.mpp,
        model: { name: model.name, version: model.version, mpp: job.modelMpp },
        tissueFraction: job.tissueFraction,
        roi: job.roi,
        regions: job.regions,
        nuclei: written,
        nucleiByClass: byClass,
        // Model tiles run and those the model's blur gate called blurred; the regions where
        // they were more than half (level-0 pixels).
        tiles: blur.tiles,
        blurredRegions: blur.blurredRegions,
        tissueMpx: job.tissueMpxTotal,
        createdAt: job.createdAt,
        startedAt: job.startedAt,
        finalizeS: (performance.now() - started) / 1000,
      };
      await this.store.results.putBlob(
        { name: artefactObject(job.jobId, ARTEFACTS[2]) },
        new TextEncoder().encode(JSON.stringify(summary, null, 1) + '\n'),
      );
      const { job: after } = await this.store.transition(job.jobId, (j) => ({
        state: 'DONE',
        nuclei: written,
        modelTiles: blur.tiles.model,
        blurredTiles: blur.tiles.blurred,
        finishedAt: new Date().toISOString(),
        startedAt: j.startedAt || j.createdAt,
        artefacts: [...ARTEFACTS],
      }));
      if (after && after.state !== 'DONE') await this.store.deleteResults(job); // cancelled while finalizing
      this.log(`slide jobs: job ${job.jobId} done: ${job.regions} regions, ${written} nuclei`);
      await this.store
        .releaseParked(job.owner, this.log)
        .catch((err) => this.log(`slide jobs: releasing the next job of ${job.owner} failed (the sweeper retries): ${(err as Error).message}`));
    } finally {
      geo.destroy();
      csv.destroy();
      await fs.rm(dir, { recursive: true, force: true });
    }
  }

  private async failed(msg: JsMsg, task: SlideTask, err: unknown): Promise<void> {
    const message = isServiceError(err) ? err.details || err.message : (err as Error).message;
    const permanent = isServiceError(err) && PERMANENT_CODES.has(err.code);
    const lastAttempt = msg.info.redeliveryCount >= this.store.settings.slideMaxDeliver;
    const what = 'finalize' in task ? 'finalize' : `region ${task.region}`;
    this.log(`slide worker: job ${task.jobId} ${what} attempt ${msg.info.redeliveryCount} failed: ${message}`);
    if (permanent || lastAttempt) {
      try {
        const { changed } = await this.store.transition(task.jobId, () => ({
          state: 'FAILED',
          error: `${what}: ${message}`,
          finishedAt: new Date().toISOString(),
        }));
        if (changed) await this.store.purgeTasks(task.jobId);
        msg.term(message);
        const job = changed ? await this.store.job(task.jobId) : null;
        if (job) await this.store.releaseParked(job.owner, this.log).catch(() => undefined); // else the sweeper
      } catch {
        msg.nak(1_000); // NATS is away: try again when it is back
      }
    } else {
      msg.nak(1_000);
    }
  }
}

/** The Segmentation methods of slide jobs (served here; segmentationHandlers serves the rest). */
export type SlideMethods = Pick<
  segmentationProto.SegmentationServer,
  | 'submitSlideJob'
  | 'getSlideJob'
  | 'getSlideJobResult'
  | 'listSlideJobs'
  | 'cancelSlideJob'
  | 'streamSlideJobNuclei'
  | 'downloadSlideJobArtefact'
  | 'uploadSlide'
  | 'getUploadStatus'
>;

/** A server-streaming handler over an async iterable, with backpressure; errors become a status. */
function serverStream<Req, Res>(
  method: string,
  fn: (request: Req, caller: CallIdentity) => Promise<AsyncIterable<Res>>,
): handleServerStreamingCall<Req, Res> {
  return (call: ServerWritableStream<Req, Res>) => {
    void (async () => {
      try {
        for await (const message of await fn(call.request, callIdentity(call))) {
          if (call.cancelled) return;
          if (!call.write(message)) await once(call, 'drain');
        }
        call.end();
      } catch (err) {
        const e = toServiceError(err);
        if (e.code === status.INTERNAL || e.code === status.UNKNOWN) console.error(`${method}: ${e.details}`);
        call.emit('error', e);
      }
    })();
  };
}

/** Handlers of the slide job methods; with no runtime (no --nats-url) every call is FAILED_PRECONDITION. */
export function slideJobHandlers(runtime: SlideJobsRuntime | null): SlideMethods {
  const require = (): SlideJobService => {
    if (!runtime)
      throw grpcError(status.FAILED_PRECONDITION, 'slide jobs are off on this gateway: start it with --nats-url (a NATS server with JetStream)');
    return runtime.service();
  };
  const unary = <Req, Res>(name: string, fn: (request: Req, ctx: CallContext, caller: CallIdentity) => Promise<Res>) => {
    const handler = (caller: CallIdentity) => unaryHandler(`${SERVICE}/${name}`, (request: Req, ctx: CallContext) => fn(request, ctx, caller));
    return ((call, callback) => handler(callIdentity(call))(call, callback)) as typeof handler extends (c: CallIdentity) => infer H ? H : never;
  };
  return {
    submitSlideJob: unary('SubmitSlideJob', async (request: segmentationProto.SubmitSlideJobRequest, ctx, caller) => {
      const response = await require().submit(request, caller);
      ctx.span.setAttributes({ 'cfrsam.slide_job': response.jobId, 'cfrsam.regions': response.regions });
      return response;
    }),
    getSlideJob: unary('GetSlideJob', async (request: segmentationProto.GetSlideJobRequest, _ctx, caller) => require().get(request.jobId, caller)),
    getSlideJobResult: unary('GetSlideJobResult', async (request: segmentationProto.GetSlideJobResultRequest, _ctx, caller) =>
      require().result(request.jobId, caller),
    ),
    listSlideJobs: unary('ListSlideJobs', async (request: segmentationProto.ListSlideJobsRequest, _ctx, caller) => require().list(request, caller)),
    cancelSlideJob: unary('CancelSlideJob', async (request: segmentationProto.CancelSlideJobRequest, _ctx, caller) =>
      require().cancel(request.jobId, caller),
    ),
    streamSlideJobNuclei: serverStream(`${SERVICE}/StreamSlideJobNuclei`, async (request: segmentationProto.StreamSlideJobNucleiRequest, caller) => {
      const service = require();
      await service.requireDone(request.jobId, caller); // answer a status before the stream starts
      return service.nucleiPages(request, caller);
    }),
    downloadSlideJobArtefact: serverStream(
      `${SERVICE}/DownloadSlideJobArtefact`,
      async (request: segmentationProto.DownloadSlideJobArtefactRequest, caller) => {
        const { size, chunks } = await require().artefact(request.jobId, request.name, caller);
        return (async function* () {
          for await (const data of chunks) yield { data: Buffer.from(data), totalSize: size };
        })();
      },
    ),
    uploadSlide: uploadHandler(() => require().store.settings),
    getUploadStatus: unary('GetUploadStatus', async (request: segmentationProto.GetUploadStatusRequest) => {
      const { received, uploadId } = await uploadStatus(require().store.settings.slideRoot, request.sha256, Number(request.size));
      return { received, uploadId };
    }),
  };
}

/** UploadSlide: chunks streamed into the slide root (SlideUpload), checked, then kept. */
function uploadHandler(
  settings: () => SlideJobSettings,
): handleClientStreamingCall<segmentationProto.UploadSlideRequest, segmentationProto.UploadSlideResponse> {
  return (call, callback) => {
    void (async () => {
      let upload: SlideUpload | null = null;
      try {
        const s = settings();
        let size = 0;
        for await (const message of call as AsyncIterable<segmentationProto.UploadSlideRequest>) {
          if (!upload) {
            upload = await SlideUpload.begin(
              s.slideRoot,
              { name: message.name, size: Number(message.size), sha256: message.sha256, offset: Number(message.offset) },
              s.slideUploadMaxMb * 1024 * 1024,
            );
            size = Number(message.size);
          }
          if (message.data.length > 0) await upload.write(message.data);
        }
        if (!upload) throw grpcError(status.INVALID_ARGUMENT, 'empty upload: the first message names the file, its size and sha256');
        if (call.cancelled) throw grpcError(status.CANCELLED, 'upload cancelled by the client');
        const uploadId = await upload.finish();
        callback(null, { uploadId, size });
      } catch (err) {
        await upload?.interrupted().catch(() => undefined); // kept for a retry to continue (a corrupt one is gone)
        callback(toServiceError(slideStatusError(err, 'upload')));
      }
    })();
  };
}

export interface SlideJobsRuntime {
  /** The API; UNAVAILABLE until the NATS server has been reached and the streams exist. */
  service(): SlideJobService;
  close(): Promise<void>;
}

/**
 * Opens the store in the background (retrying, so a gateway serves Segment even while NATS is
 * down), then starts the worker (slots 0: this gateway only submits and reports) and the sweeper of
 * expired jobs.
 */
export async function startSlideJobs(
  settings: SlideJobSettings,
  pipeline: SegmentationPipeline,
  log: (line: string) => void = (line) => process.stderr.write(`${line}\n`),
): Promise<SlideJobsRuntime> {
  let closed = false;
  let ready: { store: SlideJobStore; worker: SlideWorker; service: SlideJobService; sweeper: NodeJS.Timeout } | null = null;
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
        const info = pipeline.modelInfo();
        const sweep = () => void store.sweep(Date.now(), log).catch((err) => log(`slide jobs: sweep failed: ${(err as Error).message}`));
        const sweeper = setInterval(sweep, Math.min(60_000, Math.max(1_000, (settings.slideJobTtlS * 1000) / 4)));
        sweeper.unref();
        sweep();
        ready = { store, worker, service: new SlideJobService(store, { inputSize: info.inputSize, mpp: info.mpp, version: info.version }), sweeper };
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
      const r = ready as { store: SlideJobStore; worker: SlideWorker; sweeper: NodeJS.Timeout } | null;
      if (r) {
        clearInterval(r.sweeper);
        await r.worker.stop();
        await r.store.close();
      }
    },
  };
}
