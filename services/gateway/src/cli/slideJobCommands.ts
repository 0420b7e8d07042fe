// `cfrsam slide submit | status | list | cancel | result | upload`: slide jobs on a gateway started
// with --nats-url (slideJobs.ts). The slide goes by reference: a path under the gateway's slide
// root, an http(s) URL, or a local file streamed into the slide root first (--upload). `status
// --wait` draws a progress bar until the job finishes; `result` downloads the job's artefacts.
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { createReadStream, createWriteStream, promises as fs } from 'node:fs';
import * as path from 'node:path';
import { finished } from 'node:stream/promises';
import {
  ConfigError,
  type FlagSpec,
  HelpRequested,
  makeClient,
  parseFlags,
  segmentationProto,
  status,
  unary,
  usage,
  waitForReady,
} from '@cfrsam/rpc';
import type { CliIo } from './slide';

const { SlideJobState } = segmentationProto;
type Client = segmentationProto.SegmentationClient;

const GATEWAY = { type: 'string', env: 'CFRSAM_GATEWAY', default: '127.0.0.1:50051', help: 'gateway address host:port' } satisfies FlagSpec;

const SUBMIT_FLAGS = {
  gateway: GATEWAY,
  upload: { type: 'boolean', default: false, help: 'SLIDE is a local file: stream it into the gateway slide root first' },
  roi: { type: 'string', default: '', help: 'region of interest x,y,w,h in level-0 pixels' },
  roiGeojson: { type: 'string', default: '', help: 'region of interest: a GeoJSON file with one Polygon in level-0 pixels' },
  mpp: { type: 'number', default: 0, help: 'micrometres per level-0 pixel for slides whose file has none' },
  regionSize: { type: 'int', default: 0, help: "region side in pixels at the model's resolution (0: the gateway's)" },
  overlap: { type: 'int', default: 0, help: "margin read around each region at the model's resolution (0: the gateway's)" },
  minScore: { type: 'number', default: 0, help: 'drop nuclei scoring below this' },
  requestId: { type: 'string', default: '', help: 'your id of this submission: submitting it again returns the same job' },
  wait: { type: 'boolean', default: false, help: 'wait for the job, with a progress bar' },
} satisfies Record<string, FlagSpec>;

const STATUS_FLAGS = {
  gateway: GATEWAY,
  wait: { type: 'boolean', default: false, help: 'wait until the job finishes, with a progress bar on stderr' },
  json: { type: 'boolean', default: false, help: 'print the job as JSON' },
} satisfies Record<string, FlagSpec>;

const LIST_FLAGS = {
  gateway: GATEWAY,
  pageSize: { type: 'int', default: 20, help: 'jobs per page' },
  pageToken: { type: 'string', default: '', help: 'the next-page token printed by the previous page' },
} satisfies Record<string, FlagSpec>;

const RESULT_FLAGS = {
  gateway: GATEWAY,
  out: { type: 'string', default: '.', help: 'directory for JOB.geojson.gz, JOB.csv and JOB.summary.json' },
} satisfies Record<string, FlagSpec>;

const PLAIN_FLAGS = { gateway: GATEWAY } satisfies Record<string, FlagSpec>;

export const SLIDE_JOB_USAGE = [
  '  submit     queue a slide job: cfrsam slide submit SLIDE [--upload] [--roi x,y,w,h] [--request-id ID] [--wait]',
  '             (SLIDE: a path under the gateway slide root, an http(s) URL, or with --upload a local file)',
  '  status     a job: cfrsam slide status JOB [--wait]',
  '  list       jobs, newest first: cfrsam slide list [--page-size 20] [--page-token T]',
  '  cancel     cancel a job: cfrsam slide cancel JOB',
  '  result     download a done job: cfrsam slide result JOB --out DIR',
  '  upload     stream a local slide into the gateway slide root: cfrsam slide upload FILE',
].join('\n');

const STATE_NAMES: Record<number, string> = {
  [SlideJobState.SLIDE_JOB_STATE_QUEUED]: 'QUEUED',
  [SlideJobState.SLIDE_JOB_STATE_RUNNING]: 'RUNNING',
  [SlideJobState.SLIDE_JOB_STATE_DONE]: 'DONE',
  [SlideJobState.SLIDE_JOB_STATE_FAILED]: 'FAILED',
  [SlideJobState.SLIDE_JOB_STATE_CANCELLED]: 'CANCELLED',
};

const finishedState = (s: segmentationProto.SlideJobState) =>
  s === SlideJobState.SLIDE_JOB_STATE_DONE || s === SlideJobState.SLIDE_JOB_STATE_FAILED || s === SlideJobState.SLIDE_JOB_STATE_CANCELLED;

function positional(argv: readonly string[], booleans: readonly string[]): { args: string[]; flags: string[] } {
  const args: string[] = [];
  const flags: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a.startsWith('--')) {
      flags.push(a);
      const bare = a.replace(/^--(no-)?/, '');
      if (!a.includes('=') && !booleans.includes(bare) && i + 1 < argv.length) flags.push(argv[++i]);
    } else {
      args.push(a);
    }
  }
  return { args, flags };
}

async function gatewayClient(address: string): Promise<Client> {
  const client = makeClient(segmentationProto.SegmentationClient, address);
  try {
    await waitForReady(client, 10_000);
  } catch {
    client.close();
    throw new ConfigError(`cannot reach the gateway at ${address}`);
  }
  return client;
}

function formatDuration(s: number): string {
  if (!Number.isFinite(s) || s < 0) return '--';
  s = Math.round(s);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return h > 0 ? `${h}h${String(m).padStart(2, '0')}m` : m > 0 ? `${m}m${String(s % 60).padStart(2, '0')}s` : `${s % 60}s`;
}

export function formatJob(j: segmentationProto.SlideJob): string {
  const state = STATE_NAMES[j.state] ?? String(j.state);
  const parts = [
    `${j.jobId} ${state}${j.waitingForOwner ? ' (behind your earlier jobs)' : ''}`,
    `${j.tilesDone}/${j.tilesTotal} regions`,
    `${j.nuclei} nuclei`,
    `${j.tissueMpxDone.toFixed(2)}/${j.tissueMpxTotal.toFixed(2)} tissue Mpx`,
    `${j.tissueMpxPerS.toFixed(3)} Mpx/s`,
  ];
  if (!finishedState(j.state)) parts.push(`ETA ${j.etaS >= 0 ? formatDuration(j.etaS) : '--'}`);
  if (j.modelTiles > 0) parts.push(`${j.blurredTiles} of ${j.modelTiles} model tiles blurred`);
  parts.push(j.source);
  if (j.requestId) parts.push(`request ${j.requestId}`);
  if (j.error) parts.push(`error: ${j.error}`);
  return parts.join(', ');
}

function progressLine(j: segmentationProto.SlideJob, tty: boolean): string {
  const frac = j.tilesTotal > 0 ? j.tilesDone / j.tilesTotal : 1;
  const w = 24;
  const filled = Math.round(frac * w);
  const bar = tty ? `[${'#'.repeat(filled)}${'-'.repeat(w - filled)}] ${(frac * 100).toFixed(0)}% ` : '';
  return `${bar}${formatJob(j)}`;
}

/** Polls a job until it finishes, drawing progress on stderr; returns the last state. */
async function waitJob(client: Client, jobId: string, io: CliIo): Promise<segmentationProto.SlideJob> {
  const tty = Boolean(io.stderr.isTTY);
  let lastPrint = 0;
  for (;;) {
    const j = await unary(client, client.getSlideJob, { jobId }, { timeoutMs: 10_000 }).catch((err: { code?: number }) => {
      if (err.code === 14 || err.code === 4) return null; // gateway or NATS restarting: keep waiting
      throw err;
    });
    if (j) {
      const now = Date.now();
      if (finishedState(j.state) || now - lastPrint >= (tty ? 250 : 5000)) {
        io.stderr.write(tty ? `\r\x1b[K${progressLine(j, true)}` : `${progressLine(j, false)}\n`);
        lastPrint = now;
      }
      if (finishedState(j.state)) {
        if (tty) io.stderr.write('\n');
        return j;
      }
    }
    await new Promise((r) => setTimeout(r, tty ? 250 : 1000));
  }
}

/**
 * Streams a local file to UploadSlide (size and SHA-256 first). Before each attempt it asks the
 * gateway what it holds: a complete copy is not sent again, and an interrupted upload continues
 * where it broke off. While another upload of the same file runs (ABORTED: through this gateway or
 * another one sharing the slide root) it waits, up to `waitMs`, and then finds the file there or
 * continues what that upload left.
 */
export async function uploadSlideFile(client: Client, file: string, io: CliIo, attempts = 5, waitMs = 3_600_000): Promise<string> {
  const size = (await fs.stat(file)).size;
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(file)) hash.update(chunk as Buffer);
  const sha256 = hash.digest('hex');
  const waitUntil = Date.now() + waitMs;
  let waiting = false;
  for (let attempt = 1; ; attempt++) {
    try {
      const held = await unary(client, client.getUploadStatus, { sha256, size }, { timeoutMs: 30_000 });
      if (held.uploadId) return held.uploadId;
      const offset = Number(held.received);
      if (offset > 0) io.stderr.write(`resuming the upload of ${file} at byte ${offset} of ${size}\n`);
      return await new Promise<string>((resolve, reject) => {
        const call = client.uploadSlide((err, res) => (err ? reject(err) : resolve(res!.uploadId)));
        void (async () => {
          let first = true;
          try {
            for await (const chunk of createReadStream(file, { start: offset, highWaterMark: 1024 * 1024 })) {
              const message = first
                ? { name: path.basename(file), size, sha256, offset, data: chunk as Buffer }
                : { name: '', size: 0, sha256: '', offset: 0, data: chunk as Buffer };
              first = false;
              if (!call.write(message)) await once(call, 'drain');
            }
            if (first) call.write({ name: path.basename(file), size, sha256, offset, data: Buffer.alloc(0) });
            call.end();
          } catch (err) {
            call.cancel();
            reject(err);
          }
        })();
      });
    } catch (err) {
      const code = (err as { code?: number }).code;
      if (code === status.ABORTED && Date.now() < waitUntil) {
        if (!waiting) io.stderr.write(`another upload of ${file} is in progress; waiting for it to end\n`);
        waiting = true;
        attempt--; // not a failed attempt of this upload
        await new Promise((r) => setTimeout(r, 1_000));
        continue;
      }
      if (attempt >= attempts || code === 3) throw err;
      io.stderr.write(`upload of ${file} interrupted (${(err as Error).message.split('\n')[0]}); retrying\n`);
      await new Promise((r) => setTimeout(r, 500 * attempt));
    }
  }
}

function parseRoi(flags: { roi: string; roiGeojson: string }, roiText: string | null): segmentationProto.SlideRoi | undefined {
  if (flags.roi && flags.roiGeojson) throw new ConfigError('give --roi or --roi-geojson, not both');
  if (flags.roi) {
    const v = flags.roi.split(',').map(Number);
    if (v.length !== 4 || v.some((n) => !Number.isFinite(n)) || !(v[2] > 0 && v[3] > 0)) {
      throw new ConfigError(`--roi wants x,y,w,h (four numbers in level-0 pixels, positive size), got "${flags.roi}"`);
    }
    return { x: v[0], y: v[1], width: v[2], height: v[3], polygon: [] };
  }
  if (roiText !== null) {
    // parseRoiGeoJson (slide.ts) checks the file; here only its outer ring matters.
    const ring = (JSON.parse(roiText) as { polygon?: [number, number][] }).polygon ?? [];
    return { x: 0, y: 0, width: 0, height: 0, polygon: ring.map(([x, y]) => ({ x, y })) };
  }
  return undefined;
}

/** Runs one of the job subcommands; returns the exit code. */
export async function runSlideJobCommand(
  sub: string,
  argv: readonly string[],
  io: CliIo,
  parseRoiGeoJson: (text: string, file: string) => unknown,
): Promise<number> {
  const specs: Record<string, Record<string, FlagSpec>> = {
    submit: SUBMIT_FLAGS,
    status: STATUS_FLAGS,
    list: LIST_FLAGS,
    cancel: PLAIN_FLAGS,
    result: RESULT_FLAGS,
    upload: PLAIN_FLAGS,
  };
  const spec = specs[sub];
  const booleans = Object.entries(spec)
    .filter(([, s]) => s.type === 'boolean')
    .map(([k]) => k.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`));
  let client: Client | undefined;
  try {
    const { args, flags: flagArgs } = positional(argv, booleans);
    const flags = parseFlags(spec, flagArgs) as Record<string, string | number | boolean>;
    const need = (what: string) => {
      if (args.length !== 1) throw new ConfigError(`cfrsam slide ${sub} takes one ${what}`);
      return args[0];
    };
    if (sub === 'list' && args.length > 0) throw new ConfigError('cfrsam slide list takes no arguments');
    const target = sub === 'list' ? '' : need(sub === 'submit' || sub === 'upload' ? 'SLIDE' : 'JOB id');
    client = await gatewayClient(String(flags.gateway));
    switch (sub) {
      case 'upload': {
        io.stdout.write(`${await uploadSlideFile(client, target, io)}\n`);
        return 0;
      }
      case 'submit': {
        const f = flags as unknown as { roi: string; roiGeojson: string; upload: boolean; wait: boolean } & Record<string, number & string>;
        let roiText: string | null = null;
        if (f.roiGeojson) roiText = JSON.stringify(parseRoiGeoJson(await fs.readFile(f.roiGeojson, 'utf8'), f.roiGeojson));
        const roi = parseRoi(f, roiText);
        let source: segmentationProto.SlideReference['source'];
        if (f.upload) source = { $case: 'uploadId', value: await uploadSlideFile(client, target, io) };
        else if (/^https?:\/\//i.test(target)) source = { $case: 'url', value: target };
        else source = { $case: 'path', value: target };
        const res = await unary(
          client,
          client.submitSlideJob,
          segmentationProto.SubmitSlideJobRequest.fromPartial({
            slide: { source },
            roi,
            mpp: f.mpp,
            regionSize: f.regionSize,
            overlap: f.overlap,
            minScore: f.minScore,
            requestId: f.requestId,
          }),
          { timeoutMs: 600_000 },
        );
        io.stdout.write(`${res.jobId}\n`);
        io.stderr.write(`${res.created ? 'submitted' : 'already submitted with this request id:'} job ${res.jobId}, ${res.regions} regions\n`);
        if (!f.wait) return 0;
        const j = await waitJob(client, res.jobId, io);
        return j.state === SlideJobState.SLIDE_JOB_STATE_DONE ? 0 : 1;
      }
      case 'status': {
        const j = flags.wait ? await waitJob(client, target, io) : await unary(client, client.getSlideJob, { jobId: target });
        io.stdout.write(flags.json ? `${JSON.stringify(segmentationProto.SlideJob.toJSON(j))}\n` : `${formatJob(j)}\n`);
        return j.state === SlideJobState.SLIDE_JOB_STATE_FAILED || j.state === SlideJobState.SLIDE_JOB_STATE_CANCELLED ? 1 : 0;
      }
      case 'list': {
        const page = await unary(client, client.listSlideJobs, { pageSize: Number(flags.pageSize), pageToken: String(flags.pageToken) });
        for (const j of page.jobs) io.stdout.write(`${formatJob(j)}\n`);
        if (page.nextPageToken) io.stderr.write(`more: --page-token ${page.nextPageToken}\n`);
        return 0;
      }
      case 'cancel': {
        const j = await unary(client, client.cancelSlideJob, { jobId: target });
        io.stdout.write(`${formatJob(j)}\n`);
        return 0;
      }
      case 'result': {
        const job = await unary(client, client.getSlideJob, { jobId: target });
        if (job.state !== SlideJobState.SLIDE_JOB_STATE_DONE) throw new ConfigError(`job ${target} is ${STATE_NAMES[job.state]}, not DONE`);
        const out = String(flags.out);
        await fs.mkdir(out, { recursive: true });
        for (const name of job.artefacts) {
          const file = path.join(out, `${target}.${name.replace(/^nuclei\./, '')}`);
          const sink = createWriteStream(file);
          for await (const chunk of client.downloadSlideJobArtefact({ jobId: target, name }) as AsyncIterable<segmentationProto.FileChunk>) {
            if (!sink.write(chunk.data)) await once(sink, 'drain');
          }
          sink.end();
          await finished(sink);
          io.stdout.write(`${file}\n`);
        }
        return 0;
      }
    }
    return 2;
  } catch (err) {
    if (err instanceof HelpRequested) {
      io.stdout.write(`usage: cfrsam slide ${sub} ...\n${usage(spec)}\n`);
      return 0;
    }
    if (err instanceof ConfigError) {
      io.stderr.write(`cfrsam slide ${sub}: ${err.message.split('\n')[0]}\n`);
      return 2;
    }
    const e = err as { code?: number; details?: string; message?: string };
    io.stderr.write(`cfrsam slide ${sub}: ${(e.details ?? e.message ?? String(err)).split('\n')[0]}\n`);
    return e.code === 3 || e.code === 5 || e.code === 9 ? 2 : 1;
  } finally {
    client?.close();
  }
}
