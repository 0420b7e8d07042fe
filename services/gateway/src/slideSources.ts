// Where slide jobs read slides from: a path under the slide root (a shared volume every gateway
// mounts), an http(s) URL read with range requests, or an upload streamed into the slide root
// (uploads/). A reference is resolved the same way at submit (to check the slide and plan its
// regions) and by every worker (to read its regions), so pixels never travel through the queue.
import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream, promises as fs, type WriteStream } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { grpcError, status } from '@cfrsam/rpc';
import { HttpRangeSource, openSlide, type Slide } from '@cfrsam/slides';

/** A slide job's slide: exactly one of the three. */
export type SlideRef = { path: string } | { url: string } | { uploadId: string };

export const UPLOAD_DIR = 'uploads';
const UPLOAD_ID_PATTERN = /^[0-9a-f]{64}(\.[A-Za-z0-9.]{1,16})?$/;

/** The reference as written in job listings and messages. */
export function describeRef(ref: SlideRef): string {
  if ('path' in ref) return ref.path;
  if ('url' in ref) return ref.url.replace(/\?.*$/, '?…'); // presigned URLs carry credentials in the query
  return `upload:${ref.uploadId}`;
}

/**
 * The absolute path of `relative` inside `root`, refusing anything that leaves it (`..`, absolute
 * paths, symbolic links pointing out). INVALID_ARGUMENT names the problem.
 */
export async function pathInRoot(root: string, relative: string): Promise<string> {
  if (!root) throw grpcError(status.FAILED_PRECONDITION, 'slides by path are off on this gateway: start it with --slide-root DIR');
  if (!relative || path.isAbsolute(relative) || relative.includes('\0')) {
    throw grpcError(status.INVALID_ARGUMENT, `slide path ${JSON.stringify(relative)} must be relative to the slide root`);
  }
  const realRoot = await fs.realpath(root);
  const joined = path.resolve(realRoot, relative);
  if (!inside(realRoot, joined)) throw grpcError(status.INVALID_ARGUMENT, `slide path ${JSON.stringify(relative)} leaves the slide root`);
  let real: string;
  try {
    real = await fs.realpath(joined);
  } catch {
    throw grpcError(status.NOT_FOUND, `slide ${JSON.stringify(relative)} does not exist in the slide root`);
  }
  if (!inside(realRoot, real)) throw grpcError(status.INVALID_ARGUMENT, `slide path ${JSON.stringify(relative)} leaves the slide root`);
  return real;
}

function inside(root: string, p: string): boolean {
  const rel = path.relative(root, p);
  return rel === '' || (!rel.startsWith('..') && !path.isAbsolute(rel));
}

/** A slide reader for a reference (the caller closes it). */
export async function openSlideRef(ref: SlideRef, slideRoot: string): Promise<Slide> {
  if ('url' in ref) return openSlide(await HttpRangeSource.open(ref.url));
  if ('uploadId' in ref) {
    if (!UPLOAD_ID_PATTERN.test(ref.uploadId)) throw grpcError(status.INVALID_ARGUMENT, `${JSON.stringify(ref.uploadId)} is not an upload id`);
    return openSlide(await pathInRoot(slideRoot, path.join(UPLOAD_DIR, ref.uploadId)));
  }
  return openSlide(await pathInRoot(slideRoot, ref.path));
}

/** Checks a reference's form (not yet its slide). */
export function checkRef(ref: SlideRef): void {
  if ('url' in ref) {
    let u: URL;
    try {
      u = new URL(ref.url);
    } catch {
      throw grpcError(status.INVALID_ARGUMENT, `slide URL ${JSON.stringify(ref.url)} is not a valid URL`);
    }
    if (u.protocol !== 'http:' && u.protocol !== 'https:') {
      throw grpcError(status.INVALID_ARGUMENT, `slide URL must be http or https, got ${u.protocol}`);
    }
  }
}

export interface UploadHeader {
  name: string;
  size: number;
  sha256: string;
  /** Where the first chunk starts: 0, or the bytes held from an interrupted upload. */
  offset?: number;
}

const partialName = (sha256: string, size: number) => `.partial-${sha256}-${size}`;
const lockName = (sha256: string, size: number) => `.lock-${sha256}-${size}`;

/** How often a held upload lock is touched, and after how long untouched it counts as abandoned. */
export const UPLOAD_LOCK_REFRESH_MS = 2_000;
export const UPLOAD_LOCK_STALE_MS = 15_000;

/**
 * Keeps two uploads of one file from writing its partial upload at once, through one gateway or two
 * (any processes sharing the slide root),
 * which would interleave their bytes: a lock file next to the partial, created exclusively (O_EXCL,
 * which NFS v3 and later honour) and touched every UPLOAD_LOCK_REFRESH_MS while the upload runs. A
 * lock untouched for UPLOAD_LOCK_STALE_MS was left by a gateway that died mid-upload and is taken
 * over. (Two gateways taking over the same stale lock in the same instant could both succeed; the
 * checksum at the end still refuses a file that came out wrong.)
 */
class UploadLock {
  private readonly refresh: NodeJS.Timeout;

  private constructor(private readonly file: string) {
    this.refresh = setInterval(() => {
      const now = new Date();
      fs.utimes(file, now, now).catch(() => undefined);
    }, UPLOAD_LOCK_REFRESH_MS);
    this.refresh.unref();
  }

  static async acquire(file: string): Promise<UploadLock> {
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        await fs.writeFile(file, `${os.hostname()} ${process.pid} ${new Date().toISOString()}\n`, { flag: 'wx' });
        return new UploadLock(file);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      }
      const held = await fs.stat(file).catch(() => null);
      if (held && Date.now() - held.mtimeMs < UPLOAD_LOCK_STALE_MS) break;
      await fs.rm(file, { force: true }); // abandoned: take it over
    }
    throw grpcError(status.ABORTED, 'this file is being uploaded already, through another gateway or this one; retry when that upload ends');
  }

  async release(): Promise<void> {
    clearInterval(this.refresh);
    await fs.rm(this.file, { force: true });
  }
}
const uploadId = (sha256: string, name: string) => {
  const ext = path.extname(name).toLowerCase();
  return sha256 + (/^\.[a-z0-9]{1,8}$/.test(ext) ? ext : '');
};

/**
 * How much of a file the slide root holds: complete (its upload id), or the bytes an interrupted
 * upload left.
 */
export async function uploadStatus(root: string, sha256: string, size: number): Promise<{ received: number; uploadId: string }> {
  if (!root) throw grpcError(status.FAILED_PRECONDITION, 'uploads are off on this gateway: start it with --slide-root DIR');
  if (!/^[0-9a-f]{64}$/.test(sha256)) throw grpcError(status.INVALID_ARGUMENT, 'sha256 must be 64 lowercase hex digits');
  const dir = path.join(root, UPLOAD_DIR);
  const done = (await fs.readdir(dir).catch(() => [] as string[])).find((f) => f === sha256 || f.startsWith(`${sha256}.`));
  if (done && (await fs.stat(path.join(dir, done))).size === size) return { received: size, uploadId: done };
  const partial = await fs.stat(path.join(dir, partialName(sha256, size))).catch(() => null);
  return { received: partial?.size ?? 0, uploadId: '' };
}

/**
 * Writes an upload into `<root>/uploads/` as its chunks arrive: to `.partial-<sha256>-<size>` first
 * (kept when the stream breaks off, so a retry continues at its end), then, once the size and
 * SHA-256 match the header, renamed to `<sha256><ext>` (the same file uploaded twice ends as the
 * same id). A wrong checksum or an overlong stream removes the partial file. Partial files left
 * behind are removed by the job sweeper after the job retention time.
 */
export class SlideUpload {
  private readonly hash = createHash('sha256');
  private received = 0;
  private file: WriteStream | null = null;
  private failed: Error | null = null;
  private lock: UploadLock | null = null;

  private constructor(
    private readonly root: string,
    private readonly header: UploadHeader,
    private readonly partial: string,
    private readonly maxBytes: number,
  ) {}

  static async begin(root: string, header: UploadHeader, maxBytes: number): Promise<SlideUpload> {
    if (!root) throw grpcError(status.FAILED_PRECONDITION, 'uploads are off on this gateway: start it with --slide-root DIR');
    if (!/^[0-9a-f]{64}$/.test(header.sha256))
      throw grpcError(status.INVALID_ARGUMENT, 'the first upload message needs sha256: 64 lowercase hex digits');
    if (!(header.size > 0)) throw grpcError(status.INVALID_ARGUMENT, 'the first upload message needs the file size in bytes');
    if (header.size > maxBytes) {
      throw grpcError(
        status.INVALID_ARGUMENT,
        `upload of ${header.size} bytes is over this gateway's limit of ${maxBytes} bytes (--slide-upload-max-mb)`,
      );
    }
    const dir = path.join(root, UPLOAD_DIR);
    await fs.mkdir(dir, { recursive: true });
    const upload = new SlideUpload(root, header, path.join(dir, partialName(header.sha256, header.size)), maxBytes);
    try {
      upload.lock = await UploadLock.acquire(path.join(dir, lockName(header.sha256, header.size)));
      await upload.open(header.offset ?? 0);
    } catch (err) {
      await upload.close();
      throw err;
    }
    return upload;
  }

  private async open(offset: number): Promise<void> {
    if (offset > 0) {
      const held = (await fs.stat(this.partial).catch(() => null))?.size ?? 0;
      if (held !== offset) {
        throw grpcError(
          status.FAILED_PRECONDITION,
          `cannot continue the upload at byte ${offset}: the gateway holds ${held} bytes of it (GetUploadStatus)`,
        );
      }
      // The hash of what is held, so the checksum covers the whole file.
      for await (const chunk of createReadStream(this.partial)) this.hash.update(chunk as Buffer);
      this.received = offset;
    }
    this.file = createWriteStream(this.partial, { flags: offset > 0 ? 'a' : 'w' });
    this.file.on('error', (e) => (this.failed ??= e));
  }

  get uploadId(): string {
    return uploadId(this.header.sha256, this.header.name);
  }

  async write(chunk: Uint8Array): Promise<void> {
    if (this.failed) throw this.failed;
    this.received += chunk.length;
    if (this.received > this.header.size || this.received > this.maxBytes) {
      await this.discard();
      throw grpcError(status.INVALID_ARGUMENT, `upload is longer than the ${this.header.size} bytes announced`);
    }
    this.hash.update(chunk);
    if (!this.file!.write(chunk)) await new Promise<void>((resolve) => this.file!.once('drain', resolve));
  }

  /** Checks size and checksum and keeps the file; returns the upload id. */
  async finish(): Promise<string> {
    // The lock is held until the partial has its final name: another upload of the file must not
    // reopen (and truncate) it in between.
    try {
      await this.closeFile();
      if (this.failed) throw this.failed;
      if (this.received !== this.header.size) {
        throw grpcError(status.INVALID_ARGUMENT, `upload ended after ${this.received} of the ${this.header.size} bytes announced`);
      }
      const digest = this.hash.digest('hex');
      if (digest !== this.header.sha256) {
        await this.discard();
        throw grpcError(status.INVALID_ARGUMENT, `upload checksum mismatch: got sha256 ${digest}, announced ${this.header.sha256}`);
      }
      await fs.rename(this.partial, path.join(this.root, UPLOAD_DIR, this.uploadId));
      return this.uploadId;
    } finally {
      await this.close();
    }
  }

  /** The stream broke off: keep what arrived for a retry to continue. */
  async interrupted(): Promise<void> {
    await this.close();
  }

  /** Drops the partial file (corrupt: wrong checksum or too long). */
  async discard(): Promise<void> {
    await this.closeFile();
    await fs.rm(this.partial, { force: true });
    await this.close();
  }

  private async closeFile(): Promise<void> {
    const file = this.file;
    if (file && !file.closed) await new Promise<void>((resolve) => file.end(() => resolve()));
  }

  /** Ends the upload here: the file closed, the lock released (idempotent). */
  private async close(): Promise<void> {
    await this.closeFile();
    const lock = this.lock;
    this.lock = null;
    await lock?.release();
  }
}

/** Removes partial uploads (and locks a dead gateway left) untouched for `maxAgeMs` (the job sweeper calls it). */
export async function removeStalePartials(root: string, maxAgeMs: number, now = Date.now()): Promise<number> {
  if (!root) return 0;
  const dir = path.join(root, UPLOAD_DIR);
  let removed = 0;
  for (const f of await fs.readdir(dir).catch(() => [] as string[])) {
    if (!f.startsWith('.partial-') && !f.startsWith('.lock-')) continue;
    const st = await fs.stat(path.join(dir, f)).catch(() => null);
    if (st && now - st.mtimeMs > maxAgeMs) {
      await fs.rm(path.join(dir, f), { force: true });
      removed++;
    }
  }
  return removed;
}
