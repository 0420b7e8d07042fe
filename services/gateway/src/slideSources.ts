// Where slide jobs read slides from: a path under the slide root (a shared volume every gateway
// mounts), an http(s) URL read with range requests, or an upload streamed into the slide root
// (uploads/). A reference is resolved the same way at submit (to check the slide and plan its
// regions) and by every worker (to read its regions), so pixels never travel through the queue.
import { createHash, randomUUID } from 'node:crypto';
import { createWriteStream, promises as fs } from 'node:fs';
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
}

/**
 * Writes an upload into `<root>/uploads/` as its chunks arrive: a temporary file first, then, once
 * the size and SHA-256 match the header, renamed to `<sha256><ext>` (so the same file uploaded twice,
 * or an interrupted upload retried, ends as the same id). An upload that breaks off leaves nothing.
 */
export class SlideUpload {
  private readonly hash = createHash('sha256');
  private received = 0;
  private readonly file;
  private failed: Error | null = null;

  private constructor(
    private readonly root: string,
    private readonly header: UploadHeader,
    private readonly tmp: string,
    private readonly maxBytes: number,
  ) {
    this.file = createWriteStream(tmp, { flags: 'wx' });
    this.file.on('error', (e) => (this.failed ??= e));
  }

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
    return new SlideUpload(root, header, path.join(dir, `.partial-${randomUUID()}`), maxBytes);
  }

  get uploadId(): string {
    const ext = path.extname(this.header.name).toLowerCase();
    return this.header.sha256 + (/^\.[a-z0-9]{1,8}$/.test(ext) ? ext : '');
  }

  async write(chunk: Uint8Array): Promise<void> {
    if (this.failed) throw this.failed;
    this.received += chunk.length;
    if (this.received > this.header.size || this.received > this.maxBytes) {
      throw grpcError(status.INVALID_ARGUMENT, `upload is longer than the ${this.header.size} bytes announced`);
    }
    this.hash.update(chunk);
    if (!this.file.write(chunk)) await new Promise<void>((resolve) => this.file.once('drain', resolve));
  }

  /** Checks size and checksum and keeps the file; returns the upload id. */
  async finish(): Promise<string> {
    await new Promise<void>((resolve, reject) => this.file.end((err?: Error | null) => (err ? reject(err) : resolve())));
    if (this.failed) throw this.failed;
    if (this.received !== this.header.size) {
      throw grpcError(status.INVALID_ARGUMENT, `upload ended after ${this.received} of the ${this.header.size} bytes announced`);
    }
    const digest = this.hash.digest('hex');
    if (digest !== this.header.sha256)
      throw grpcError(status.INVALID_ARGUMENT, `upload checksum mismatch: got sha256 ${digest}, announced ${this.header.sha256}`);
    await fs.rename(this.tmp, path.join(this.root, UPLOAD_DIR, this.uploadId));
    return this.uploadId;
  }

  /** Drops the partial file. */
  async abort(): Promise<void> {
    this.file.destroy();
    await fs.rm(this.tmp, { force: true });
  }
}
