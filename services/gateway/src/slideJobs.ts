// Slide jobs: whole slides segmented region by region by every gateway that shares a NATS server.
//
// A job names its slide by reference (slideSources.ts: a path under the slide root, an http(s) URL,
// or an upload); workers read their regions themselves, so pixels never go through NATS. Submit
// (any gateway) opens the slide, finds its tissue and lays the same grid as `cfrsam slide run`
// (cells of region_size pixels at the model's resolution over the tissue or the ROI), stores the
// plan, writes the job record and publishes one task per region to a work-queue stream: the first
// --slide-job-window of them at once, then each region's successor (region + window) as that
// region finishes, so a job has at most that many tasks queued and a job submitted behind a large
// one waits for that many of its regions, not for all of them (see `publishRegions`).
//
// Everything durable lives in JetStream file storage, so a job finishes after the death of any
// worker and after restarts of every gateway and of nats-server:
//   KV cfrsam-slide-jobs      job.<id>       the job record (state changes by compare-and-set)
//                             progress.<id>  regions done as a bitmap with nuclei and tissue so far;
//                                            a region counts once however often it runs (CAS on the bit)
//                             request.<hash> the job of a (caller, request id): kv.create makes the
//                                            same id twice one job
//   Object store cfrsam-slide-results  plan/<id> (the cells), region/<id>/<i> (a region's candidate
//                             nuclei in level-0 pixels), final/<id>/<i> (its nuclei after seam
//                             de-duplication, numbered), artefact/<id>/<name> (GeoJSON gzip, CSV,
//                             summary)
//   Stream cfrsam-slide-tasks  work queue: <id>.<region> and <id>.finalize tasks, one durable
//                             consumer shared by every gateway; an unacked task is redelivered.
// When the last region is stored, the worker that stored it queues the job's finalize task: one
// worker admits the regions in order through the SeamLedger (each nucleus once across seams),
// writes the final pages and streams the artefacts, so no process ever holds a slide's nuclei.
// Finished jobs are removed with their results after --slide-job-ttl-s (every gateway sweeps).
import { createHash, randomBytes } from 'node:crypto';
import { AckPolicy, connect, nanos, RetentionPolicy, StorageType, type JetStreamClient, type KV, type NatsConnection, type ObjectStore } from 'nats';
import { type CallIdentity, type FlagSpec, grpcError, isServiceError, listFlag, segmentationProto, status } from '@cfrsam/rpc';
import { detectTissue, resolveMpp, SlideError, tissueRegions, type Roi, type TissueRegion } from '@cfrsam/slides';
import { DEFAULT_SLIDE_MARGIN, DEFAULT_SLIDE_REGION_SIZE } from './config';
import { checkRef, describeRef, openSlideRef, removeStalePartials, SlideUpload, type SlideRef } from './slideSources';

const { SlideJobState } = segmentationProto;

export const SLIDE_TASK_STREAM = 'cfrsam-slide-tasks';
export const SLIDE_TASK_SUBJECT = 'cfrsam-slide-tasks';
export const SLIDE_WORKER_DURABLE = 'cfrsam-slide-workers';
export const SLIDE_JOB_BUCKET = 'cfrsam-slide-jobs';
export const SLIDE_RESULT_BUCKET = 'cfrsam-slide-results';

/** Gateway flags of slide jobs: off unless --nats-url is set. */
export function slideJobFlags() {
  return {
    natsUrl: {
      type: 'string',
      env: 'CFRSAM_NATS_URL',
      default: '',
      help: 'NATS server(s) with JetStream for slide jobs, comma separated (e.g. nats://nats:4222); empty: slide jobs off',
    },
    slideRoot: {
      type: 'string',
      env: 'CFRSAM_SLIDE_ROOT',
      default: '',
      help: 'directory of slides that jobs may name by path (a shared volume on every gateway); uploads go to its uploads/; empty: by URL only',
    },
    slideRegionSize: {
      type: 'int',
      env: 'CFRSAM_SLIDE_REGION_SIZE',
      default: DEFAULT_SLIDE_REGION_SIZE,
      help: "side of a slide job region in pixels at the model's resolution",
    },
    slideOverlap: {
      type: 'int',
      env: 'CFRSAM_SLIDE_OVERLAP',
      default: DEFAULT_SLIDE_MARGIN,
      help: "margin read around each region, in pixels at the model's resolution (default: half the tile overlap)",
    },
    slideAckWaitMs: {
      type: 'int',
      env: 'CFRSAM_SLIDE_ACK_WAIT_MS',
      default: 30_000,
      help: 'a region task not acked (or kept alive) for this long goes to another gateway',
    },
    slideMaxDeliver: { type: 'int', env: 'CFRSAM_SLIDE_MAX_DELIVER', default: 5, help: 'attempts per region before its job fails' },
    slideJobsPerOwner: {
      type: 'int',
      env: 'CFRSAM_SLIDE_JOBS_PER_OWNER',
      default: DEFAULT_SLIDE_JOBS_PER_OWNER,
      help: "jobs of one owner (caller identity) whose tasks are queued at once; the owner's further jobs wait their turn (0: no limit)",
    },
    slideJobWindow: {
      type: 'int',
      env: 'CFRSAM_SLIDE_JOB_WINDOW',
      default: DEFAULT_SLIDE_JOB_WINDOW,
      help: 'region tasks of one job queued at once: the next is queued as one finishes, so later jobs interleave instead of waiting for the whole job; at least the workers one job should keep busy (0: all at once)',
    },
    slideWorkers: { type: 'int', env: 'CFRSAM_SLIDE_WORKERS', default: 1, help: 'region tasks this gateway runs at once (0: submit only)' },
    slideJobTtlS: {
      type: 'int',
      env: 'CFRSAM_SLIDE_JOB_TTL_S',
      default: 7 * 86_400,
      help: 'finished jobs are kept this long, then removed with their results',
    },
    slideUploadMaxMb: { type: 'int', env: 'CFRSAM_SLIDE_UPLOAD_MAX_MB', default: 20_480, help: 'largest slide UploadSlide accepts, in MiB' },
    slideUrlPrefixes: {
      type: 'string',
      env: 'CFRSAM_SLIDE_URL_PREFIXES',
      default: '',
      help: 'comma-separated URL prefixes slide jobs may read (e.g. https://bucket.s3.amazonaws.com/); empty: any http(s) URL',
    },
    slideTissueMaxSide: {
      type: 'int',
      env: 'CFRSAM_SLIDE_TISSUE_MAX_SIDE',
      default: 1024,
      help: 'long side of the tissue mask a job is planned on (the coarsest level at least this large is read)',
    },
  } satisfies Record<string, FlagSpec>;
}

/**
 * Region tasks of one job in the queue at once. Workers take tasks first in, first out; were all of
 * a 3000-region slide's tasks queued at its submit, every job behind it would wait hours for its
 * first region. With a window, region i's completion queues region i + window, so the jobs in the
 * queue take turns, a window's worth of regions at a time. A job keeps as many workers busy as its
 * window: 16 is the regions deploy/k8s runs at once (8 gateways of 2 workers); a cluster with more
 * should raise it.
 */
export const DEFAULT_SLIDE_JOB_WINDOW = 16;

/**
 * Jobs of one owner with tasks in the queue at once. The window makes jobs take turns, but a lab
 * that submits ten slides would still queue ten windows ahead of the next lab's job; its further
 * jobs are parked instead (QUEUED, no tasks queued) and released, oldest first, as its earlier
 * ones finish. Two, so that one job's last regions and finalize overlap the next one's start.
 */
export const DEFAULT_SLIDE_JOBS_PER_OWNER = 2;

export interface SlideJobSettings {
  natsUrl: string;
  slideRoot: string;
  slideRegionSize: number;
  slideOverlap: number;
  slideAckWaitMs: number;
  slideMaxDeliver: number;
  slideJobWindow: number;
  slideJobsPerOwner: number;
  slideWorkers: number;
  slideJobTtlS: number;
  slideUploadMaxMb: number;
  slideTissueMaxSide: number;
  slideUrlPrefixes: string;
}

export const DEFAULT_SLIDE_JOB_SETTINGS: Omit<SlideJobSettings, 'natsUrl'> = {
  slideRoot: '',
  slideRegionSize: DEFAULT_SLIDE_REGION_SIZE,
  slideOverlap: DEFAULT_SLIDE_MARGIN,
  slideAckWaitMs: 30_000,
  slideMaxDeliver: 5,
  slideJobWindow: DEFAULT_SLIDE_JOB_WINDOW,
  slideJobsPerOwner: DEFAULT_SLIDE_JOBS_PER_OWNER,
  slideWorkers: 1,
  slideJobTtlS: 7 * 86_400,
  slideUploadMaxMb: 20_480,
  slideTissueMaxSide: 1024,
  slideUrlPrefixes: '',
};

export type JobState = 'QUEUED' | 'RUNNING' | 'DONE' | 'FAILED' | 'CANCELLED';
export const FINISHED: ReadonlySet<JobState> = new Set(['DONE', 'FAILED', 'CANCELLED']);

/** What a job keeps in the KV bucket under `job.<id>`. */
export interface SlideJobRecord {
  jobId: string;
  requestId: string;
  /** KV key of the request id (empty without one). */
  requestKey: string;
  owner: string;
  source: SlideRef;
  width: number;
  height: number;
  mpp: { x: number; y: number; source: string };
  modelMpp: number;
  modelVersion: string;
  regionSize: number;
  overlap: number;
  /** A region's read margin and the seam band (SeamLedger), in level-0 pixels. */
  marginL0: { x: number; y: number };
  band: { x: number; y: number };
  roi: Roi | null;
  minScore: number;
  regions: number;
  tissueMpxTotal: number;
  tissueFraction: number;
  state: JobState;
  error: string;
  createdAt: string;
  startedAt: string;
  finishedAt: string;
  /** The first `taskWindow` region tasks are in the queue (a submit that died half way is completed by the sweeper). */
  published: boolean;
  /**
   * Region tasks queued at once (see DEFAULT_SLIDE_JOB_WINDOW): the first ones at submit, then each
   * region's successor (region + taskWindow) when it is done. 0 or absent (jobs submitted before
   * the window existed): every task was queued at submit.
   */
  taskWindow?: number;
  /** Waiting for its owner's earlier jobs (DEFAULT_SLIDE_JOBS_PER_OWNER): no task queued yet. */
  parked?: boolean;
  nuclei: number;
  /** Once DONE: model tiles run over the regions, and those the blur gate called blurred. */
  modelTiles?: number;
  blurredTiles?: number;
  artefacts: string[];
}

/** `progress.<id>`: regions done (a bitmap, so a region run twice counts once) and their sums. */
export interface ProgressRecord {
  bits: string;
  done: number;
  nuclei: number;
  tissueMpx: number;
}

/** A work-queue message: one region of one job, or the job's finalize step. */
export type SlideTask = { jobId: string; region: number; cell: TissueRegion } | { jobId: string; finalize: true };

const JOB_ID_PATTERN = /^[0-9a-f]{32}$/;
const enc = new TextEncoder();
const dec = new TextDecoder();

export const planObject = (jobId: string) => `plan/${jobId}`;
export const regionObject = (jobId: string, region: number) => `region/${jobId}/${region}`;
export const finalObject = (jobId: string, region: number) => `final/${jobId}/${region}`;
export const artefactObject = (jobId: string, name: string) => `artefact/${jobId}/${name}`;
export const ARTEFACTS = ['nuclei.geojson.gz', 'nuclei.csv', 'summary.json'] as const;

/** Job ids sort by creation time (hex milliseconds first), so listings page newest first by key. */
export function newJobId(now = Date.now()): string {
  return now.toString(16).padStart(12, '0') + randomBytes(10).toString('hex');
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms).unref());

/** Parses a task message; null when it is not one. */
export function decodeTask(data: Uint8Array): SlideTask | null {
  try {
    const task = JSON.parse(dec.decode(data)) as SlideTask;
    if (typeof task.jobId !== 'string') return null;
    if ('finalize' in task) return task.finalize === true ? task : null;
    return Number.isInteger(task.region) && task.cell && Number.isFinite(task.cell.x) ? task : null;
  } catch {
    return null;
  }
}

function bitSet(bits: Buffer, i: number): boolean {
  return (bits[i >> 3] & (1 << (i & 7))) !== 0;
}

/** The NATS side of slide jobs: streams, buckets and records, shared by the API and the workers. */
export class SlideJobStore {
  private constructor(
    readonly nc: NatsConnection,
    readonly js: JetStreamClient,
    readonly kv: KV,
    readonly results: ObjectStore,
    readonly settings: SlideJobSettings,
  ) {}

  /** Connects (reconnecting forever once connected) and creates what is missing. */
  static async open(settings: SlideJobSettings): Promise<SlideJobStore> {
    const nc = await connect({
      servers: listFlag(settings.natsUrl),
      name: 'cfrsam-gateway-slide-jobs',
      maxReconnectAttempts: -1,
      reconnectTimeWait: 500,
    });
    try {
      const jsm = await nc.jetstreamManager();
      try {
        await jsm.streams.info(SLIDE_TASK_STREAM);
      } catch {
        await jsm.streams
          .add({
            name: SLIDE_TASK_STREAM,
            subjects: [`${SLIDE_TASK_SUBJECT}.>`],
            retention: RetentionPolicy.Workqueue,
            storage: StorageType.File,
            duplicate_window: nanos(120_000),
          })
          .catch(async (err) => {
            // Another gateway created it in between.
            if (!(await jsm.streams.info(SLIDE_TASK_STREAM).catch(() => null))) throw err;
          });
      }
      await jsm.consumers
        .add(SLIDE_TASK_STREAM, {
          durable_name: SLIDE_WORKER_DURABLE,
          ack_policy: AckPolicy.Explicit,
          ack_wait: nanos(settings.slideAckWaitMs),
          max_deliver: settings.slideMaxDeliver,
          max_ack_pending: 10_000,
        })
        .catch(async (err) => {
          if (!(await jsm.consumers.info(SLIDE_TASK_STREAM, SLIDE_WORKER_DURABLE).catch(() => null))) throw err;
        });
      const js = nc.jetstream();
      const kv = await js.views.kv(SLIDE_JOB_BUCKET, { history: 1, storage: StorageType.File });
      const results = await js.views.os(SLIDE_RESULT_BUCKET, { storage: StorageType.File });
      return new SlideJobStore(nc, js, kv, results, settings);
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

  async progress(jobId: string): Promise<ProgressRecord> {
    const entry = await this.kv.get(`progress.${jobId}`);
    if (!entry || entry.operation !== 'PUT') return { bits: '', done: 0, nuclei: 0, tissueMpx: 0 };
    return JSON.parse(entry.string()) as ProgressRecord;
  }

  /**
   * Read-modify-write of a JSON record by compare-and-set: `change` returns the new value, or null
   * to leave it. Returns the value after the call (null if absent and unchanged).
   */
  async update<T>(key: string, change: (current: T | null) => T | null): Promise<{ value: T | null; changed: boolean }> {
    for (let attempt = 0; ; attempt++) {
      const entry = await this.kv.get(key);
      const current = entry && entry.operation === 'PUT' ? (JSON.parse(entry.string()) as T) : null;
      const next = change(current);
      if (next === null) return { value: current, changed: false };
      try {
        if (entry) await this.kv.update(key, enc.encode(JSON.stringify(next)), entry.revision);
        else await this.kv.create(key, enc.encode(JSON.stringify(next)));
        return { value: next, changed: true };
      } catch (err) {
        // Someone else wrote in between: read again. Anything else after a few tries is real.
        if (attempt >= 50 || !/wrong last sequence|key exists/i.test((err as Error).message)) throw err;
      }
    }
  }

  /** Moves a job to a state unless it is finished already; returns the record after the call. */
  async transition(
    jobId: string,
    change: (job: SlideJobRecord) => Partial<SlideJobRecord> | null,
  ): Promise<{ job: SlideJobRecord | null; changed: boolean }> {
    const { value, changed } = await this.update<SlideJobRecord>(`job.${jobId}`, (job) => {
      if (!job || FINISHED.has(job.state)) return null;
      const patch = change(job);
      return patch ? { ...job, ...patch } : null;
    });
    return { job: value, changed };
  }

  /** Marks a region done (once) with its nuclei and tissue; returns the progress after it. */
  async regionDone(job: SlideJobRecord, region: number, nuclei: number, tissueMpx: number): Promise<ProgressRecord> {
    const { value } = await this.update<ProgressRecord>(`progress.${job.jobId}`, (p) => {
      const bits = Buffer.alloc(Math.ceil(job.regions / 8));
      if (p?.bits) Buffer.from(p.bits, 'base64').copy(bits);
      if (bitSet(bits, region)) return null;
      bits[region >> 3] |= 1 << (region & 7);
      return {
        bits: bits.toString('base64'),
        done: (p?.done ?? 0) + 1,
        nuclei: (p?.nuclei ?? 0) + nuclei,
        tissueMpx: (p?.tissueMpx ?? 0) + tissueMpx,
      };
    });
    return value!;
  }

  async publishFinalize(jobId: string): Promise<void> {
    await this.js.publish(`${SLIDE_TASK_SUBJECT}.${jobId}.finalize`, enc.encode(JSON.stringify({ jobId, finalize: true })), {
      msgID: `${jobId}.finalize`,
    });
  }

  /**
   * Queues a job's first region tasks: its window's worth (every one without a window). The rest
   * follow one by one, each queued by its predecessor's completion (publishSuccessor), so each of
   * the window's chains has one task queued or running at a time. Idempotent within the stream's
   * duplicate window.
   */
  async publishRegions(job: SlideJobRecord, cells: readonly TissueRegion[]): Promise<void> {
    const first = job.taskWindow ? cells.slice(0, job.taskWindow) : cells;
    const batch = 128;
    for (let i = 0; i < first.length; i += batch) {
      await Promise.all(first.slice(i, i + batch).map((cell, k) => this.publishRegion(job.jobId, i + k, cell)));
    }
    if (cells.length === 0) await this.publishFinalize(job.jobId);
  }

  /**
   * Queues the region after `region` in its chain (region + taskWindow), if the job has one.
   * Called when `region` is done, before its task is acked: a worker that dies in between leaves
   * the task to be redelivered, and the redelivery queues the successor (a duplicate within the
   * stream's duplicate window is dropped by message id; a later one finds its region done and only
   * passes the chain on).
   */
  async publishSuccessor(job: SlideJobRecord, region: number, plan: () => Promise<readonly TissueRegion[] | null>): Promise<void> {
    if (!job.taskWindow) return;
    const next = region + job.taskWindow;
    if (next >= job.regions) return;
    const cell = (await plan())?.[next];
    if (!cell) throw new Error(`slide job ${job.jobId}: its plan has no region ${next}`);
    await this.publishRegion(job.jobId, next, cell);
    // Cancelled (or removed) in between: its tasks were purged, so purge this one too.
    const now = await this.job(job.jobId);
    if (!now || FINISHED.has(now.state)) {
      const jsm = await this.nc.jetstreamManager();
      await jsm.streams.purge(SLIDE_TASK_STREAM, { filter: `${SLIDE_TASK_SUBJECT}.${job.jobId}.${next}` });
    }
  }

  private async publishRegion(jobId: string, region: number, cell: TissueRegion): Promise<void> {
    await this.js.publish(`${SLIDE_TASK_SUBJECT}.${jobId}.${region}`, enc.encode(JSON.stringify({ jobId, region, cell })), {
      msgID: `${jobId}.${region}`,
    });
  }

  /** The job's progress if `region` is done already (a redelivered task), else null. */
  async progressIfDone(jobId: string, region: number): Promise<ProgressRecord | null> {
    const progress = await this.progress(jobId);
    return progress.bits !== '' && bitSet(Buffer.from(progress.bits, 'base64'), region) ? progress : null;
  }

  async plan(jobId: string): Promise<TissueRegion[] | null> {
    const bytes = await this.results.getBlob(planObject(jobId));
    return bytes ? (JSON.parse(dec.decode(bytes)) as TissueRegion[]) : null;
  }

  /** Removes a job's queued tasks. */
  async purgeTasks(jobId: string): Promise<void> {
    const jsm = await this.nc.jetstreamManager();
    await jsm.streams.purge(SLIDE_TASK_STREAM, { filter: `${SLIDE_TASK_SUBJECT}.${jobId}.>` });
  }

  /** Deletes a job's stored results (plan, region and final pages, artefacts). */
  async deleteResults(job: Pick<SlideJobRecord, 'jobId' | 'regions'>): Promise<void> {
    const names = [planObject(job.jobId), ...ARTEFACTS.map((a) => artefactObject(job.jobId, a))];
    for (let i = 0; i < job.regions; i++) names.push(regionObject(job.jobId, i), finalObject(job.jobId, i));
    const parallel = 16;
    for (let i = 0; i < names.length; i += parallel) {
      await Promise.all(names.slice(i, i + parallel).map((n) => this.results.delete(n).catch(() => undefined)));
    }
  }

  /** Removes a job entirely: tasks, results, progress, request id and record. */
  async removeJob(job: SlideJobRecord): Promise<void> {
    await this.purgeTasks(job.jobId).catch(() => undefined);
    await this.deleteResults(job);
    await this.kv.purge(`progress.${job.jobId}`).catch(() => undefined);
    if (job.requestKey) await this.kv.purge(job.requestKey).catch(() => undefined);
    await this.kv.purge(`job.${job.jobId}`);
  }

  /** The owner's jobs that are neither finished nor parked (their tasks are queued), and the parked ones, oldest first. */
  async jobsOf(owner: string): Promise<{ active: SlideJobRecord[]; parked: SlideJobRecord[] }> {
    const active: SlideJobRecord[] = [];
    const parked: SlideJobRecord[] = [];
    // A scan of the job records: as many reads as jobs are kept (the retention bounds them).
    for (const id of (await this.jobIds()).reverse()) {
      const job = await this.job(id);
      if (!job || job.owner !== owner || FINISHED.has(job.state)) continue;
      (job.parked ? parked : active).push(job);
    }
    return { active, parked };
  }

  /**
   * Queues the tasks of the owner's parked jobs, oldest first, while it has fewer than
   * slideJobsPerOwner jobs with queued tasks. Called when one of its jobs finishes (and by the
   * sweeper); a job is released once however many gateways do this at once (compare-and-set on
   * `parked`).
   */
  async releaseParked(owner: string, log: (line: string) => void = () => undefined): Promise<void> {
    const limit = this.settings.slideJobsPerOwner;
    const { active, parked } = await this.jobsOf(owner);
    let free = limit > 0 ? limit - active.length : parked.length;
    for (const job of parked) {
      if (free <= 0) return;
      const { changed } = await this.transition(job.jobId, (j) => (j.parked ? { parked: false } : null));
      if (!changed) continue;
      free--;
      const cells = await this.plan(job.jobId);
      if (cells) await this.publishRegions(job, cells);
      await this.transition(job.jobId, () => ({ published: true }));
      log(`slide jobs: job ${job.jobId} released: its owner's earlier jobs finished`);
    }
  }

  /** Every job id, newest first. */
  async jobIds(): Promise<string[]> {
    const ids: string[] = [];
    for await (const key of await this.kv.keys('job.*')) ids.push(key.slice(4));
    return ids.filter((id) => JOB_ID_PATTERN.test(id)).sort((a, b) => (a < b ? 1 : a > b ? -1 : 0));
  }

  /**
   * Retention and repair, run by every gateway now and then (idempotent): finished jobs older than
   * the TTL are removed with their results, and partial uploads untouched as long; a job whose submit died before all its tasks were
   * queued gets them queued.
   */
  async sweep(now = Date.now(), log: (line: string) => void = () => undefined): Promise<void> {
    const partials = await removeStalePartials(this.settings.slideRoot, this.settings.slideJobTtlS * 1000, now);
    if (partials > 0) log(`slide jobs: removed ${partials} partial upload(s) untouched for ${this.settings.slideJobTtlS} s`);
    // Owners with parked jobs whose earlier jobs may have finished without releasing them (a
    // gateway died there): released once per owner after the scan.
    const parkedOwners = new Set<string>();
    for (const id of await this.jobIds()) {
      const job = await this.job(id);
      if (!job) continue;
      if (FINISHED.has(job.state)) {
        if (now - Date.parse(job.finishedAt || job.createdAt) > this.settings.slideJobTtlS * 1000) {
          await this.removeJob(job);
          log(`slide jobs: removed job ${id} (finished ${job.finishedAt}, retention ${this.settings.slideJobTtlS} s)`);
        }
      } else if (job.parked) {
        parkedOwners.add(job.owner);
      } else if (!job.published && now - Date.parse(job.createdAt) > 60_000) {
        const cells = await this.plan(id);
        if (!cells) continue;
        await this.publishRegions(job, cells);
        await this.transition(id, () => ({ published: true }));
        log(`slide jobs: queued the tasks of job ${id}, whose submit stopped half way`);
      }
    }
    for (const owner of parkedOwners) await this.releaseParked(owner, log);
  }
}

/** A SlideError or gRPC error as the status a client gets. */
export function slideStatusError(err: unknown, what: string): Error {
  if (isServiceError(err)) return err as Error;
  if (err instanceof SlideError) {
    const code =
      err.code === 'NOT_FOUND' ? status.NOT_FOUND : err.code === 'OPENSLIDE_MISSING' ? status.FAILED_PRECONDITION : status.INVALID_ARGUMENT;
    return grpcError(code, `${what}: ${err.message}`);
  }
  return err as Error;
}

/** The job as the API describes it. */
export function jobMessage(job: SlideJobRecord, progress: ProgressRecord, now = Date.now()): segmentationProto.SlideJob {
  const state = {
    QUEUED: SlideJobState.SLIDE_JOB_STATE_QUEUED,
    RUNNING: SlideJobState.SLIDE_JOB_STATE_RUNNING,
    DONE: SlideJobState.SLIDE_JOB_STATE_DONE,
    FAILED: SlideJobState.SLIDE_JOB_STATE_FAILED,
    CANCELLED: SlideJobState.SLIDE_JOB_STATE_CANCELLED,
  }[job.state];
  const done = job.state === 'DONE' ? job.regions : Math.min(progress.done, job.regions);
  const tissueDone = job.state === 'DONE' ? job.tissueMpxTotal : progress.tissueMpx;
  const end = job.finishedAt ? Date.parse(job.finishedAt) : now;
  const elapsedS = job.startedAt ? Math.max(0.001, (end - Date.parse(job.startedAt)) / 1000) : 0;
  const rate = elapsedS > 0 ? tissueDone / elapsedS : 0;
  const eta = FINISHED.has(job.state) ? 0 : rate > 0 ? (job.tissueMpxTotal - tissueDone) / rate : -1;
  return {
    jobId: job.jobId,
    state,
    tilesTotal: job.regions,
    tilesDone: done,
    error: job.error,
    width: job.width,
    height: job.height,
    requestId: job.requestId,
    source: describeRef(job.source),
    nuclei: job.state === 'DONE' ? job.nuclei : progress.nuclei,
    modelTiles: job.modelTiles ?? 0,
    blurredTiles: job.blurredTiles ?? 0,
    tissueMpxTotal: job.tissueMpxTotal,
    tissueMpxDone: tissueDone,
    tissueMpxPerS: rate,
    etaS: eta,
    createdAt: job.createdAt,
    startedAt: job.startedAt,
    waitingForOwner: job.state === 'QUEUED' && Boolean(job.parked),
    finishedAt: job.finishedAt,
    artefacts: job.state === 'DONE' ? job.artefacts : [],
  };
}

/**
 * Jobs belong to their submitter: with authentication on, a caller sees (gets, lists, cancels,
 * reads) only its own jobs unless it holds every right ("*"). Without authentication every caller
 * is anonymous and sees every job.
 */
export function visibleTo(job: Pick<SlideJobRecord, 'owner'>, caller: CallIdentity): boolean {
  return !caller.authenticated || job.owner === caller.id || caller.rights.includes('*');
}

/** What submit needs to know about the served model. */
export interface SlideModel {
  inputSize: number;
  mpp: number;
  version: string;
}

/** The reference of a submit request (or an upload of its image bytes). */
async function requestRef(request: segmentationProto.SubmitSlideJobRequest, settings: SlideJobSettings): Promise<SlideRef> {
  const source = request.slide?.source;
  const ref: SlideRef | null = !source
    ? null
    : source.$case === 'path'
      ? { path: source.value }
      : source.$case === 'url'
        ? { url: source.value }
        : { uploadId: source.value };
  if (ref && request.image.length > 0) throw grpcError(status.INVALID_ARGUMENT, 'give one slide: a reference or image bytes, not both');
  if (ref) return ref;
  if (request.image.length === 0) throw grpcError(status.INVALID_ARGUMENT, 'no slide given: set slide.path, slide.url or slide.upload_id');
  const upload = await SlideUpload.begin(
    settings.slideRoot,
    { name: 'image', size: request.image.length, sha256: createHash('sha256').update(request.image).digest('hex') },
    settings.slideUploadMaxMb * 1024 * 1024,
  );
  try {
    await upload.write(request.image);
    return { uploadId: await upload.finish() };
  } catch (err) {
    await upload.discard();
    throw err;
  }
}

function requestRoi(roi: segmentationProto.SlideRoi | undefined): Roi | null {
  if (!roi) return null;
  if (roi.polygon.length > 0) {
    if (roi.polygon.length < 3) throw grpcError(status.INVALID_ARGUMENT, `an ROI polygon needs at least 3 points, got ${roi.polygon.length}`);
    return { polygon: roi.polygon.map((p) => [p.x, p.y] as [number, number]) };
  }
  if (!(roi.width > 0 && roi.height > 0) || ![roi.x, roi.y, roi.width, roi.height].every(Number.isFinite)) {
    throw grpcError(status.INVALID_ARGUMENT, `ROI width and height must be positive, got ${roi.width}x${roi.height}`);
  }
  return { x: roi.x, y: roi.y, width: roi.width, height: roi.height };
}

/** The public API of slide jobs, on top of a store. */
export class SlideJobService {
  constructor(
    readonly store: SlideJobStore,
    private readonly model: SlideModel,
  ) {}

  async submit(request: segmentationProto.SubmitSlideJobRequest, caller: CallIdentity): Promise<segmentationProto.SubmitSlideJobResponse> {
    const owner = caller.id;
    const settings = this.store.settings;
    const regionSize = request.regionSize || settings.slideRegionSize;
    if (!Number.isInteger(regionSize) || regionSize < this.model.inputSize || regionSize > 16_384) {
      throw grpcError(status.INVALID_ARGUMENT, `region_size must be between the model input ${this.model.inputSize} and 16384 px, got ${regionSize}`);
    }
    const overlap = request.overlap || settings.slideOverlap;
    if (!Number.isInteger(overlap) || overlap < 0 || overlap >= regionSize) {
      throw grpcError(status.INVALID_ARGUMENT, `overlap must be in [0, region_size), got ${overlap}`);
    }
    if (!Number.isFinite(request.minScore) || request.minScore < 0 || request.minScore > 1) {
      throw grpcError(status.INVALID_ARGUMENT, `min_score must be in [0, 1], got ${request.minScore}`);
    }
    if (!Number.isFinite(request.mpp) || request.mpp < 0) {
      throw grpcError(status.INVALID_ARGUMENT, `mpp must be a positive number of micrometres per pixel (or 0: from the file), got ${request.mpp}`);
    }
    if (request.requestId.length > 256) throw grpcError(status.INVALID_ARGUMENT, 'request_id is longer than 256 characters');
    const requestKey = request.requestId ? `request.${createHash('sha256').update(`${owner}\0${request.requestId}`).digest('hex')}` : '';
    if (requestKey) {
      const existing = await this.existingRequest(requestKey);
      if (existing) return { jobId: existing.jobId, regions: existing.regions, created: false };
    }
    const roi = requestRoi(request.roi);
    const ref = await requestRef(request, settings);
    checkRef(ref);
    if ('url' in ref && settings.slideUrlPrefixes) {
      const prefixes = listFlag(settings.slideUrlPrefixes);
      if (!prefixes.some((p) => ref.url.startsWith(p))) {
        throw grpcError(status.PERMISSION_DENIED, `slide URL ${describeRef(ref)} is outside the prefixes this gateway reads (--slide-url-prefixes)`);
      }
    }

    // Open the slide and plan its regions now, so bad input is answered here, not by a worker.
    const name = describeRef(ref);
    let slide;
    try {
      slide = await openSlideRef(ref, settings.slideRoot);
    } catch (err) {
      throw slideStatusError(err, `slide ${name}`);
    }
    let job: SlideJobRecord;
    let cells: TissueRegion[];
    try {
      const mpp = slide.mpp ?? resolveMpp(slide, request.mpp > 0 ? request.mpp : undefined);
      const tissue = await detectTissue(slide, { maxSide: settings.slideTissueMaxSide });
      const modelMpp = this.model.mpp;
      const cellL0 = {
        width: Math.max(1, Math.round((regionSize * modelMpp) / mpp.x)),
        height: Math.max(1, Math.round((regionSize * modelMpp) / mpp.y)),
      };
      cells = tissueRegions(tissue, cellL0, roi ? { roi } : {});
      const marginL0 = { x: (overlap * modelMpp) / mpp.x, y: (overlap * modelMpp) / mpp.y };
      const toModel = (mpp.x / modelMpp) * (mpp.y / modelMpp);
      const L0 = slide.levels[0];
      job = {
        jobId: newJobId(),
        requestId: request.requestId,
        requestKey,
        owner,
        source: ref,
        width: L0.width,
        height: L0.height,
        mpp: { x: mpp.x, y: mpp.y, source: mpp.source },
        modelMpp,
        modelVersion: this.model.version,
        regionSize,
        overlap,
        marginL0,
        // as `cfrsam slide run`: 16 px at the model's resolution, at most the margin
        band: { x: Math.min(marginL0.x, (16 * modelMpp) / mpp.x), y: Math.min(marginL0.y, (16 * modelMpp) / mpp.y) },
        roi,
        minScore: request.minScore,
        regions: cells.length,
        tissueMpxTotal: cells.reduce((s, c) => s + c.width * c.height * c.tissueFraction, 0) * (toModel / 1e6),
        tissueFraction: tissue.fraction,
        state: 'QUEUED',
        error: '',
        createdAt: new Date().toISOString(),
        startedAt: '',
        finishedAt: '',
        published: false,
        taskWindow: Math.max(0, settings.slideJobWindow),
        nuclei: 0,
        artefacts: [],
      };
    } catch (err) {
      throw slideStatusError(err, `slide ${name}`);
    } finally {
      await slide.close().catch(() => undefined);
    }

    if (requestKey) {
      try {
        await this.store.kv.create(requestKey, enc.encode(job.jobId));
      } catch {
        // The same request id was submitted at the same time: that submission's job wins.
        const existing = await this.existingRequest(requestKey, 30_000);
        if (existing) return { jobId: existing.jobId, regions: existing.regions, created: false };
        throw grpcError(status.ABORTED, `request_id ${JSON.stringify(request.requestId)} is being submitted concurrently; retry`);
      }
    }
    // Plan, record, progress, then the tasks: a worker that gets a task finds everything it needs.
    await this.store.results.putBlob({ name: planObject(job.jobId) }, enc.encode(JSON.stringify(cells)));
    // Behind the owner's earlier jobs when it has its share running (released as they finish).
    const perOwner = settings.slideJobsPerOwner;
    if (perOwner > 0 && (await this.store.jobsOf(owner)).active.length >= perOwner) job.parked = true;
    await this.store.kv.create(`job.${job.jobId}`, enc.encode(JSON.stringify(job)));
    if (job.parked) {
      // An earlier job may have finished since the count: let the release rule decide.
      await this.store.releaseParked(owner);
      return { jobId: job.jobId, regions: job.regions, created: true };
    }
    await this.store.publishRegions(job, cells);
    await this.store.transition(job.jobId, () => ({ published: true }));
    return { jobId: job.jobId, regions: job.regions, created: true };
  }

  /**
   * The job a request key names. A key whose job record never appeared (its submit died before
   * writing it) is taken over after `staleMs`.
   */
  private async existingRequest(requestKey: string, waitMs = 0): Promise<SlideJobRecord | null> {
    const deadline = Date.now() + waitMs;
    for (;;) {
      const entry = await this.store.kv.get(requestKey);
      if (!entry || entry.operation !== 'PUT') return null;
      const job = await this.store.job(entry.string());
      if (job) return job;
      if (Date.now() - entry.created.getTime() > 120_000) {
        await this.store.kv.purge(requestKey);
        return null;
      }
      if (Date.now() >= deadline) return null;
      await sleep(200);
    }
  }

  async requireJob(jobId: string, caller: CallIdentity): Promise<SlideJobRecord> {
    const job = await this.store.job(jobId);
    if (!job || !visibleTo(job, caller))
      throw grpcError(status.NOT_FOUND, `no slide job ${JSON.stringify(jobId)} (unknown, or removed after its retention time)`);
    return job;
  }

  async get(jobId: string, caller: CallIdentity): Promise<segmentationProto.SlideJob> {
    const job = await this.requireJob(jobId, caller);
    return jobMessage(job, await this.store.progress(jobId));
  }

  async list(request: segmentationProto.ListSlideJobsRequest, caller: CallIdentity): Promise<segmentationProto.ListSlideJobsResponse> {
    const size = request.pageSize || 50;
    if (!Number.isInteger(size) || size < 1 || size > 1000) throw grpcError(status.INVALID_ARGUMENT, `page_size must be in [1, 1000], got ${size}`);
    if (request.pageToken && !JOB_ID_PATTERN.test(request.pageToken))
      throw grpcError(status.INVALID_ARGUMENT, 'page_token is not one this API returned');
    const ids = (await this.store.jobIds()).filter((id) => !request.pageToken || id < request.pageToken);
    const jobs: segmentationProto.SlideJob[] = [];
    let last = '';
    for (const id of ids) {
      if (jobs.length === size) return { jobs, nextPageToken: last };
      const job = await this.store.job(id);
      if (!job || !visibleTo(job, caller)) continue;
      jobs.push(jobMessage(job, await this.store.progress(id)));
      last = id;
    }
    return { jobs, nextPageToken: '' };
  }

  /** Cancels a job: no more regions start, running ones stop (the workers watch the state), results go. */
  async cancel(jobId: string, caller: CallIdentity): Promise<segmentationProto.SlideJob> {
    const job = await this.requireJob(jobId, caller);
    const { job: after, changed } = await this.store.transition(jobId, () => ({
      state: 'CANCELLED',
      error: 'cancelled by the client',
      finishedAt: new Date().toISOString(),
    }));
    if (!changed) {
      if (after?.state === 'CANCELLED') return this.get(jobId, caller);
      throw grpcError(
        status.FAILED_PRECONDITION,
        `slide job ${jobId} is ${after?.state ?? job.state} already; only queued or running jobs can be cancelled`,
      );
    }
    await this.store.purgeTasks(jobId);
    await this.store.deleteResults(job);
    await this.store.releaseParked(job.owner);
    return this.get(jobId, caller);
  }

  async requireDone(jobId: string, caller: CallIdentity): Promise<SlideJobRecord> {
    const job = await this.requireJob(jobId, caller);
    if (job.state === 'DONE') return job;
    if (job.state === 'FAILED') throw grpcError(status.FAILED_PRECONDITION, `slide job ${jobId} failed: ${job.error}`);
    if (job.state === 'CANCELLED') throw grpcError(status.FAILED_PRECONDITION, `slide job ${jobId} was cancelled; it has no results`);
    const p = await this.store.progress(jobId);
    throw grpcError(status.FAILED_PRECONDITION, `slide job ${jobId} is not done yet (${p.done}/${job.regions} regions)`);
  }

  /** The final nuclei of region `region` (numbered, level 0). */
  async finalRegion(job: SlideJobRecord, region: number): Promise<segmentationProto.Nucleus[]> {
    const bytes = await this.store.results.getBlob(finalObject(job.jobId, region));
    if (!bytes) throw grpcError(status.DATA_LOSS, `slide job ${job.jobId}: the nuclei of region ${region} are missing`);
    return segmentationProto.SegmentResponse.decode(bytes).nuclei;
  }

  /** Pages of a done job's nuclei from a page token ("region.offset"), one region in memory at a time. */
  async *nucleiPages(
    request: segmentationProto.StreamSlideJobNucleiRequest,
    caller: CallIdentity,
  ): AsyncGenerator<segmentationProto.SlideJobNucleiPage> {
    const size = request.pageSize || 1000;
    if (!Number.isInteger(size) || size < 1 || size > 10_000)
      throw grpcError(status.INVALID_ARGUMENT, `page_size must be in [1, 10000], got ${size}`);
    const job = await this.requireDone(request.jobId, caller);
    let region = 0;
    let offset = 0;
    if (request.pageToken) {
      const m = /^(\d+)\.(\d+)$/.exec(request.pageToken);
      if (!m || Number(m[1]) > job.regions) throw grpcError(status.INVALID_ARGUMENT, 'page_token is not one this API returned');
      region = Number(m[1]);
      offset = Number(m[2]);
    }
    let page: segmentationProto.Nucleus[] = [];
    let yielded = false;
    for (; region < job.regions; region++, offset = 0) {
      const nuclei = await this.finalRegion(job, region);
      while (offset < nuclei.length) {
        const take = nuclei.slice(offset, offset + size - page.length);
        page.push(...take);
        offset += take.length;
        if (page.length === size) {
          // The position after this page; a last page may come back empty.
          yield { nuclei: page, nextPageToken: `${region}.${offset}` };
          yielded = true;
          page = [];
        }
      }
    }
    if (page.length > 0 || !yielded) yield { nuclei: page, nextPageToken: '' };
  }

  /** A done job's nuclei as one response, for small jobs only (large ones page with StreamSlideJobNuclei). */
  async result(jobId: string, caller: CallIdentity, maxNuclei = 50_000): Promise<segmentationProto.SegmentResponse> {
    const job = await this.requireDone(jobId, caller);
    if (job.nuclei > maxNuclei) {
      throw grpcError(
        status.FAILED_PRECONDITION,
        `slide job ${jobId} has ${job.nuclei} nuclei, more than GetSlideJobResult returns (${maxNuclei}); page them with StreamSlideJobNuclei`,
      );
    }
    const nuclei: segmentationProto.Nucleus[] = [];
    for (let r = 0; r < job.regions; r++) nuclei.push(...(await this.finalRegion(job, r)));
    const counts = new Map<number, segmentationProto.ClassCount>();
    for (const n of nuclei) {
      const c = counts.get(n.classIndex) ?? { classIndex: n.classIndex, className: n.className, count: 0 };
      c.count++;
      counts.set(n.classIndex, c);
    }
    return segmentationProto.SegmentResponse.fromPartial({
      imageId: job.jobId,
      width: job.width,
      height: job.height,
      nuclei,
      counts: [...counts.values()].sort((a, b) => a.classIndex - b.classIndex),
      modelVersion: job.modelVersion,
      tiles: job.regions,
      imageMpp: (job.mpp.x + job.mpp.y) / 2,
      modelMpp: job.modelMpp,
    });
  }

  /** An artefact's bytes as a stream of chunks. */
  async artefact(jobId: string, name: string, caller: CallIdentity): Promise<{ size: number; chunks: AsyncIterable<Uint8Array> }> {
    const job = await this.requireDone(jobId, caller);
    if (!job.artefacts.includes(name)) {
      throw grpcError(status.NOT_FOUND, `slide job ${jobId} has no artefact ${JSON.stringify(name)} (it has ${job.artefacts.join(', ')})`);
    }
    const obj = await this.store.results.get(artefactObject(jobId, name));
    if (!obj) throw grpcError(status.DATA_LOSS, `slide job ${jobId}: artefact ${name} is missing`);
    const reader = obj.data.getReader();
    return {
      size: obj.info.size,
      chunks: {
        async *[Symbol.asyncIterator]() {
          for (;;) {
            const { done, value } = await reader.read();
            if (done) return;
            yield value;
          }
        },
      },
    };
  }
}
