import { SlideError } from './errors.js';
import type { ByteSource } from './source.js';

export interface HttpSourceOptions {
  /** Bytes fetched per block: reads are rounded out to whole blocks and cached (default 64 KiB). */
  blockBytes?: number;
  /** Blocks kept (least recently used dropped first; default 256, i.e. 16 MiB at the default block). */
  cacheBlocks?: number;
  /** Timeout of each request in ms (default 30 s). */
  timeoutMs?: number;
  /** Attempts per range request on a network error or a 5xx answer (default 3). */
  attempts?: number;
}

/**
 * A slide over HTTP(S) read with range requests (any server or object store that honours `Range`,
 * e.g. a presigned URL). The TIFF and DICOM readers read headers, tag arrays and single tiles, so a
 * region costs the tiles it touches, not the file. Reads are rounded out to blocks that are cached,
 * so the many small header reads become a few requests; a read spanning missing blocks is one
 * request. The size comes from the first request (`Range: bytes=0-...` answered with
 * Content-Range), which also proves that the server serves ranges: a server answering 200 with the
 * whole file is refused rather than downloaded.
 */
export class HttpRangeSource implements ByteSource {
  /** Bytes received and range requests made (for tests and diagnostics). */
  bytesFetched = 0;
  requests = 0;
  private readonly blocks = new Map<number, Buffer>();
  private closed = false;

  private constructor(
    readonly name: string,
    readonly size: number,
    private readonly blockBytes: number,
    private readonly cacheBlocks: number,
    private readonly timeoutMs: number,
    private readonly attempts: number,
  ) {}

  static async open(url: string, opts: HttpSourceOptions = {}): Promise<HttpRangeSource> {
    let parsed: URL;
    try {
      parsed = new URL(url);
    } catch {
      throw new SlideError('BAD_ARGUMENT', 'not a valid URL', url);
    }
    if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') {
      throw new SlideError('BAD_ARGUMENT', `only http and https URLs are read, not ${parsed.protocol}`, url);
    }
    const blockBytes = opts.blockBytes ?? 64 * 1024;
    const src = new HttpRangeSource(url, 0, blockBytes, opts.cacheBlocks ?? 256, opts.timeoutMs ?? 30_000, opts.attempts ?? 3);
    const { body, total } = await src.fetchRange(0, blockBytes - 1);
    const sized = new HttpRangeSource(url, total, blockBytes, src.cacheBlocks, src.timeoutMs, src.attempts);
    sized.bytesFetched = body.length;
    sized.requests = 1;
    sized.remember(0, body);
    return sized;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    if (this.closed) throw new SlideError('CLOSED', 'slide is closed', this.name);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new SlideError('CORRUPT', `invalid byte range ${offset}+${length}`, this.name);
    }
    if (offset + length > this.size) {
      throw new SlideError('TRUNCATED', `file is truncated or corrupt: needs bytes ${offset}..${offset + length} but has ${this.size}`, this.name);
    }
    if (length === 0) return Buffer.alloc(0);
    const b = this.blockBytes;
    const first = Math.floor(offset / b);
    const last = Math.floor((offset + length - 1) / b);
    const missing: number[] = [];
    for (let i = first; i <= last; i++) if (!this.blocks.has(i)) missing.push(i);
    if (missing.length > 0) {
      const from = missing[0] * b;
      const to = Math.min(this.size, (missing[missing.length - 1] + 1) * b) - 1;
      const { body } = await this.fetchRange(from, to);
      this.bytesFetched += body.length;
      this.requests++;
      for (let i = missing[0]; i <= missing[missing.length - 1]; i++) {
        const start = (i - missing[0]) * b;
        this.remember(i, body.subarray(start, Math.min(body.length, start + b)));
      }
    }
    const parts: Buffer[] = [];
    for (let i = first; i <= last; i++) {
      const block = this.blocks.get(i)!;
      // refresh its place in the LRU order
      this.blocks.delete(i);
      this.blocks.set(i, block);
      const s = i === first ? offset - i * b : 0;
      const e = i === last ? offset + length - i * b : block.length;
      parts.push(block.subarray(s, e));
    }
    return parts.length === 1 ? parts[0] : Buffer.concat(parts);
  }

  async close(): Promise<void> {
    this.closed = true;
    this.blocks.clear();
  }

  private remember(index: number, block: Buffer): void {
    this.blocks.set(index, block);
    while (this.blocks.size > this.cacheBlocks) this.blocks.delete(this.blocks.keys().next().value as number);
  }

  /** Bytes from..to inclusive, and the file's total size from Content-Range. */
  private async fetchRange(from: number, to: number): Promise<{ body: Buffer; total: number }> {
    for (let attempt = 1; ; attempt++) {
      let res: Response;
      try {
        res = await fetch(this.name, { headers: { range: `bytes=${from}-${to}` }, signal: AbortSignal.timeout(this.timeoutMs) });
      } catch (err) {
        const cause = (err as { cause?: { code?: string; message?: string } }).cause;
        if (attempt < this.attempts) {
          await new Promise((r) => setTimeout(r, 200 * attempt));
          continue;
        }
        throw new SlideError('NOT_FOUND', `cannot reach the URL: ${cause?.code ?? cause?.message ?? (err as Error).message}`, this.name, {
          cause: err,
        });
      }
      if (res.status >= 500 && attempt < this.attempts) {
        await res.body?.cancel().catch(() => undefined);
        await new Promise((r) => setTimeout(r, 200 * attempt));
        continue;
      }
      if (res.status === 416 && from === 0) {
        await res.body?.cancel().catch(() => undefined);
        throw new SlideError('CORRUPT', 'file is empty', this.name);
      }
      if (res.status !== 206) {
        await res.body?.cancel().catch(() => undefined);
        if (res.status === 200) {
          throw new SlideError('UNSUPPORTED', 'the server does not answer range requests (200 instead of 206 Partial Content)', this.name);
        }
        throw new SlideError(
          res.status === 404 || res.status === 403 || res.status === 410 ? 'NOT_FOUND' : 'UNSUPPORTED',
          `HTTP ${res.status} ${res.statusText}`,
          this.name,
        );
      }
      const m = /^bytes (\d+)-(\d+)\/(\d+)$/.exec(res.headers.get('content-range') ?? '');
      if (!m || Number(m[1]) !== from) {
        await res.body?.cancel().catch(() => undefined);
        throw new SlideError(
          'UNSUPPORTED',
          `unexpected Content-Range ${JSON.stringify(res.headers.get('content-range'))} for bytes ${from}-${to}`,
          this.name,
        );
      }
      const body = Buffer.from(await res.arrayBuffer());
      const expected = Math.min(to, Number(m[3]) - 1) - from + 1;
      if (body.length !== expected) {
        throw new SlideError('TRUNCATED', `short range answer: ${body.length} of ${expected} bytes at ${from}`, this.name);
      }
      return { body, total: Number(m[3]) };
    }
  }
}
