// Slide jobs: a large image segmented region by region by every gateway that shares a NATS server.
//
// Submit (any gateway): the image is decoded and cut into square regions with the same layout and
// ownership rule as the pipeline's model tiles (planTiles: regions overlap by the tile overlap, and
// each region's core owns the nuclei whose centroid it holds). Each region's pixels are stored as a
// PNG in a JetStream object store, the job's description in a KV bucket, and one task per region is
// published to a work-queue stream.
//
// Work (every gateway, slideWorker.ts): a durable pull consumer shared by all gateways hands each
// task to one of them; the region runs through the gateway's own pipeline in-process (the Segment
// code path), its nuclei are stored under `<job>/<region>` and a `done.<job>.<region>` key is put.
// Both writes overwrite on a redelivery, so a task that runs twice (its gateway died after storing
// but before acking) is still counted once. Progress is the number of done keys.
//
// Why the object store and KV (discard=new) here, unlike the feature cache (featureStore.ts): these
// are the job's own data, not a cache; a full store must refuse a new job (RESOURCE_EXHAUSTED)
// rather than silently drop the regions of a running one. Entries expire after the job TTL.
import { randomUUID } from 'node:crypto';
import { AckPolicy, connect, nanos, RetentionPolicy, StorageType, type JetStreamClient, type KV, type NatsConnection, type ObjectStore } from 'nats';
import { type FlagSpec, grpcError, segmentationProto, status } from '@cfrsam/rpc';
import { decodeImage, encodeRgbPng, planTiles, rectContains, type RgbImage, type Tile, type TileLayout } from '@cfrsam/nuclei';

const { SlideJobState } = segmentationProto;

export const SLIDE_TASK_STREAM = 'cfrsam-slide-tasks';
export const SLIDE_TASK_SUBJECT = 'cfrsam-slide-tasks';
export const SLIDE_WORKER_DURABLE = 'cfrsam-slide-workers';
export const SLIDE_JOB_BUCKET = 'cfrsam-slide-jobs';
export const SLIDE_DATA_BUCKET = 'cfrsam-slide-data';

/** Gateway flags of slide jobs: off unless --nats-url is set. */
export function slideJobFlags() {
  return {
    natsUrl: {
      type: 'string',
      env: 'CFRSAM_NATS_URL',
      default: '',
      help: 'NATS server(s) with JetStream for slide jobs, comma separated (e.g. nats://nats:4222); empty: slide jobs off',
    },
    slideRegionSize: { type: 'int', env: 'CFRSAM_SLIDE_REGION_SIZE', default: 1024, help: 'side of a slide job region in pixels' },
    slideAckWaitMs: {
      type: 'int',
      env: 'CFRSAM_SLIDE_ACK_WAIT_MS',
      default: 30_000,
      help: 'a region task not acked (or kept alive) for this long goes to another gateway',
    },
    slideMaxDeliver: { type: 'int', env: 'CFRSAM_SLIDE_MAX_DELIVER', default: 5, help: 'attempts per region before its job fails' },
    slideWorkers: { type: 'int', env: 'CFRSAM_SLIDE_WORKERS', default: 1, help: 'region tasks this gateway runs at once (0: submit only)' },
    slideJobTtlS: { type: 'int', env: 'CFRSAM_SLIDE_JOB_TTL_S', default: 86_400, help: 'how long jobs and their results are kept' },
  } satisfies Record<string, FlagSpec>;
}

export interface SlideJobSettings {
  natsUrl: string;
  slideRegionSize: number;
  slideAckWaitMs: number;
  slideMaxDeliver: number;
  slideWorkers: number;
  slideJobTtlS: number;
}

export const DEFAULT_SLIDE_JOB_SETTINGS: Omit<SlideJobSettings, 'natsUrl'> = {
  slideRegionSize: 1024,
  slideAckWaitMs: 30_000,
  slideMaxDeliver: 5,
  slideWorkers: 1,
  slideJobTtlS: 86_400,
};

/** What a job keeps in the KV bucket under `job.<id>`. */
export interface SlideJobRecord {
  jobId: string;
  width: number;
  height: number;
  regionSize: number;
  overlap: number;
  regions: number;
  minScore: number;
  mpp: number;
  returnMasks: boolean;
  createdAt: string;
}

/** A work-queue message: one region of one job. */
export interface SlideTask {
  jobId: string;
  region: number;
}

const JOB_ID_PATTERN = /^[0-9a-f]{32}$/;
const enc = new TextEncoder();
const dec = new TextDecoder();

export const regionObjectName = (jobId: string, region: number) => `region/${jobId}/${region}`;
export const resultObjectName = (jobId: string, region: number) => `result/${jobId}/${region}`;

/** The region layout of a job (the pipeline's tiling, with regions in place of model tiles). */
export function slideLayout(job: Pick<SlideJobRecord, 'width' | 'height' | 'regionSize' | 'overlap'>): TileLayout {
  return planTiles(job.width, job.height, job.regionSize, job.overlap);
}

/** Copies a region's valid pixels out of the image. */
export function cropRegion(image: RgbImage, region: Tile): RgbImage {
  const { x0, y0, x1, y1 } = region.valid;
  const width = x1 - x0;
  const height = y1 - y0;
  const data = new Uint8Array(width * height * 3);
  for (let y = y0; y < y1; y++) data.set(image.data.subarray((y * image.width + x0) * 3, (y * image.width + x1) * 3), (y - y0) * width * 3);
  return { width, height, data };
}

/**
 * Puts regions' results together: each nucleus is moved to image coordinates and kept only by
 * the region whose core holds its centroid (so nuclei in the overlaps are reported once), then
 * renumbered 1..n in region order.
 */
export function stitchSlideResult(
  job: SlideJobRecord,
  regionResults: readonly segmentationProto.SegmentResponse[],
): segmentationProto.SegmentResponse {
  const layout = slideLayout(job);
  const nuclei: segmentationProto.Nucleus[] = [];
  let tiles = 0;
  let modelName = '';
  let modelVersion = '';
  regionResults.forEach((result, i) => {
    const region = layout.tiles[i];
    const dx = region.valid.x0;
    const dy = region.valid.y0;
    tiles += result.tiles;
    modelName ||= result.modelName;
    modelVersion ||= result.modelVersion;
    for (const n of result.nuclei) {
      const cx = (n.centroid?.x ?? 0) + dx;
      const cy = (n.centroid?.y ?? 0) + dy;
      if (!rectContains(region.core, cx, cy)) continue;
      const shift = (p: segmentationProto.Point | undefined) => (p ? { x: p.x + dx, y: p.y + dy } : undefined);
      nuclei.push({
        ...n,
        id: nuclei.length + 1,
        centroid: { x: cx, y: cy },
        bbox: n.bbox ? { x0: n.bbox.x0 + dx, y0: n.bbox.y0 + dy, x1: n.bbox.x1 + dx, y1: n.bbox.y1 + dy } : undefined,
        polygon: n.polygon.map((p) => ({ x: p.x + dx, y: p.y + dy })),
        prompt: shift(n.prompt),
      });
    }
  });
  const counts = new Map<number, segmentationProto.ClassCount>();
  for (const n of nuclei) {
    const c = counts.get(n.classIndex) ?? { classIndex: n.classIndex, className: n.className, count: 0 };
    c.count++;
    counts.set(n.classIndex, c);
  }
  return {
    imageId: job.jobId,
    width: job.width,
    height: job.height,
    nuclei,
    counts: [...counts.values()].sort((a, b) => a.classIndex - b.classIndex),
    labelMap: undefined,
    modelName,
    modelVersion,
    timings: [],
    tiles,
    imageMpp: regionResults[0]?.imageMpp ?? 0,
    mppAssumed: regionResults[0]?.mppAssumed ?? false,
    modelMpp: regionResults[0]?.modelMpp ?? 0,
  };
}

/** The NATS side of slide jobs: streams, buckets and the job records, shared by API and worker. */
export class SlideJobStore {
  private constructor(
    readonly nc: NatsConnection,
    readonly js: JetStreamClient,
    readonly kv: KV,
    readonly data: ObjectStore,
    readonly settings: SlideJobSettings,
  ) {}

  /** Connects (reconnecting forever once connected) and creates what is missing. */
  static async open(settings: SlideJobSettings): Promise<SlideJobStore> {
    const nc = await connect({
      servers: settings.natsUrl
        .split(',')
        .map((s) => s.trim())
        .filter(Boolean),
      name: 'cfrsam-gateway-slide-jobs',
      maxReconnectAttempts: -1,
    });
    try {
      const jsm = await nc.jetstreamManager();
      const streamConfig = {
        name: SLIDE_TASK_STREAM,
        subjects: [`${SLIDE_TASK_SUBJECT}.>`],
        retention: RetentionPolicy.Workqueue,
        storage: StorageType.File,
        max_age: nanos(settings.slideJobTtlS * 1000),
        duplicate_window: nanos(120_000),
      };
      try {
        await jsm.streams.info(SLIDE_TASK_STREAM);
      } catch {
        await jsm.streams.add(streamConfig).catch(async (err) => {
          // Another gateway created it in between.
          if (!(await jsm.streams.info(SLIDE_TASK_STREAM).catch(() => null))) throw err;
        });
      }
      const consumerConfig = {
        durable_name: SLIDE_WORKER_DURABLE,
        ack_policy: AckPolicy.Explicit,
        ack_wait: nanos(settings.slideAckWaitMs),
        max_deliver: settings.slideMaxDeliver,
        max_ack_pending: 1000,
      };
      await jsm.consumers.add(SLIDE_TASK_STREAM, consumerConfig).catch(async (err) => {
        if (!(await jsm.consumers.info(SLIDE_TASK_STREAM, SLIDE_WORKER_DURABLE).catch(() => null))) throw err;
      });
      const js = nc.jetstream();
      const kv = await js.views.kv(SLIDE_JOB_BUCKET, { ttl: settings.slideJobTtlS * 1000, history: 1 });
      const data = await js.views.os(SLIDE_DATA_BUCKET, { ttl: nanos(settings.slideJobTtlS * 1000) });
      return new SlideJobStore(nc, js, kv, data, settings);
    } catch (err) {
      await nc.close().catch(() => undefined);
      throw err;
    }
  }

  async close(): Promise<void> {
    await this.nc.drain().catch(() => undefined);
  }

  async job(jobId: string): Promise<SlideJobRecord | null> {
    if (!JOB_ID_PATTERN.test(jobId)) return null;
    const entry = await this.kv.get(`job.${jobId}`);
    if (!entry || entry.operation !== 'PUT') return null;
    return JSON.parse(entry.string()) as SlideJobRecord;
  }

  async failure(jobId: string): Promise<string | null> {
    const entry = await this.kv.get(`failed.${jobId}`);
    return entry && entry.operation === 'PUT' ? entry.string() : null;
  }

  async markFailed(jobId: string, error: string): Promise<void> {
    await this.kv.put(`failed.${jobId}`, enc.encode(error));
  }

  async markStarted(jobId: string): Promise<void> {
    await this.kv.put(`started.${jobId}`, enc.encode(new Date().toISOString()));
  }

  async regionsDone(jobId: string): Promise<number> {
    let n = 0;
    for await (const _ of await this.kv.keys(`done.${jobId}.*`)) n++;
    return n;
  }

  async storeRegionResult(task: SlideTask, result: segmentationProto.SegmentResponse): Promise<void> {
    const bytes = segmentationProto.SegmentResponse.encode(result).finish();
    await this.data.putBlob({ name: resultObjectName(task.jobId, task.region) }, bytes);
    await this.kv.put(`done.${task.jobId}.${task.region}`, enc.encode(String(result.nuclei.length)));
  }

  async regionImage(task: SlideTask): Promise<Uint8Array | null> {
    return this.data.getBlob(regionObjectName(task.jobId, task.region));
  }
}

/** The public API of slide jobs (the three Segmentation methods), on top of a store. */
export class SlideJobService {
  constructor(
    private readonly store: SlideJobStore,
    private readonly limits: { maxImagePixels: number; minImageSide: number; tileOverlap: number; modelInputSize: number },
  ) {}

  async submit(request: segmentationProto.SubmitSlideJobRequest): Promise<segmentationProto.SubmitSlideJobResponse> {
    const regionSize = request.regionSize || this.store.settings.slideRegionSize;
    if (!Number.isInteger(regionSize) || regionSize < this.limits.modelInputSize || regionSize > 16_384) {
      throw grpcError(
        status.INVALID_ARGUMENT,
        `region_size must be between the model input ${this.limits.modelInputSize} and 16384 px, got ${regionSize}`,
      );
    }
    if (!Number.isFinite(request.minScore) || request.minScore < 0 || request.minScore > 1) {
      throw grpcError(status.INVALID_ARGUMENT, `min_score must be in [0, 1], got ${request.minScore}`);
    }
    if (!Number.isFinite(request.mpp) || request.mpp < 0) {
      throw grpcError(status.INVALID_ARGUMENT, `mpp must be a positive number of micrometres per pixel (or 0 for the model's), got ${request.mpp}`);
    }
    const image = await decodeImage(request.image, { maxPixels: this.limits.maxImagePixels, minSide: this.limits.minImageSide });
    const job: SlideJobRecord = {
      jobId: randomUUID().replace(/-/g, ''),
      width: image.width,
      height: image.height,
      regionSize,
      overlap: this.limits.tileOverlap,
      regions: 0,
      minScore: request.minScore,
      mpp: request.mpp,
      returnMasks: request.returnMasks,
      createdAt: new Date().toISOString(),
    };
    const layout = slideLayout(job);
    job.regions = layout.tiles.length;
    // Region pixels first, then the job record, then the tasks: a worker that gets a task finds
    // everything it needs.
    for (const region of layout.tiles) {
      const png = await encodeRgbPng(cropRegion(image, region));
      await this.store.data.putBlob({ name: regionObjectName(job.jobId, region.index) }, png);
    }
    await this.store.kv.put(`job.${job.jobId}`, enc.encode(JSON.stringify(job)));
    for (const region of layout.tiles) {
      const task: SlideTask = { jobId: job.jobId, region: region.index };
      await this.store.js.publish(`${SLIDE_TASK_SUBJECT}.${job.jobId}.${region.index}`, enc.encode(JSON.stringify(task)), {
        msgID: `${job.jobId}.${region.index}`,
      });
    }
    return { jobId: job.jobId, regions: job.regions };
  }

  private async requireJob(jobId: string): Promise<SlideJobRecord> {
    const job = await this.store.job(jobId);
    if (!job) throw grpcError(status.NOT_FOUND, `no slide job ${JSON.stringify(jobId)} (unknown or expired)`);
    return job;
  }

  async get(request: segmentationProto.GetSlideJobRequest): Promise<segmentationProto.SlideJob> {
    const job = await this.requireJob(request.jobId);
    const [done, error, started] = await Promise.all([
      this.store.regionsDone(job.jobId),
      this.store.failure(job.jobId),
      this.store.kv.get(`started.${job.jobId}`),
    ]);
    const state = error
      ? SlideJobState.SLIDE_JOB_STATE_FAILED
      : done >= job.regions
        ? SlideJobState.SLIDE_JOB_STATE_DONE
        : done > 0 || (started && started.operation === 'PUT')
          ? SlideJobState.SLIDE_JOB_STATE_RUNNING
          : SlideJobState.SLIDE_JOB_STATE_QUEUED;
    return {
      jobId: job.jobId,
      state,
      tilesTotal: job.regions,
      tilesDone: Math.min(done, job.regions),
      error: error ?? '',
      width: job.width,
      height: job.height,
    };
  }

  async result(request: segmentationProto.GetSlideJobResultRequest): Promise<segmentationProto.SegmentResponse> {
    const progress = await this.get(request);
    if (progress.state === SlideJobState.SLIDE_JOB_STATE_FAILED) {
      throw grpcError(status.FAILED_PRECONDITION, `slide job ${progress.jobId} failed: ${progress.error}`);
    }
    if (progress.state !== SlideJobState.SLIDE_JOB_STATE_DONE) {
      throw grpcError(
        status.FAILED_PRECONDITION,
        `slide job ${progress.jobId} is not done yet (${progress.tilesDone}/${progress.tilesTotal} regions)`,
      );
    }
    const job = (await this.store.job(progress.jobId))!;
    const results: segmentationProto.SegmentResponse[] = [];
    for (let i = 0; i < job.regions; i++) {
      const bytes = await this.store.data.getBlob(resultObjectName(job.jobId, i));
      if (!bytes) throw grpcError(status.DATA_LOSS, `slide job ${job.jobId}: the result of region ${i} is missing`);
      results.push(segmentationProto.SegmentResponse.decode(bytes));
    }
    return stitchSlideResult(job, results);
  }
}

/** Parses a task message; null when it is not one. */
export function decodeTask(data: Uint8Array): SlideTask | null {
  try {
    const task = JSON.parse(dec.decode(data)) as SlideTask;
    return typeof task.jobId === 'string' && Number.isInteger(task.region) ? task : null;
  } catch {
    return null;
  }
}
