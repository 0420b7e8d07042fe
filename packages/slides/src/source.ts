import { open, type FileHandle } from 'node:fs/promises';
import { SlideError } from './errors.js';

/**
 * Random-access bytes. Readers only ever call `read` for the byte ranges they need (headers, tag
 * arrays, single tiles), so an HTTP range-request source can implement the same interface.
 */
export interface ByteSource {
  /** A name for messages (a path or URL). */
  readonly name: string;
  /** Total size in bytes. */
  readonly size: number;
  /**
   * Exactly `length` bytes starting at `offset`; throws `SlideError('TRUNCATED')` if the source
   * ends before `offset + length`.
   */
  read(offset: number, length: number): Promise<Buffer>;
  close(): Promise<void>;
}

function checkRange(src: ByteSource, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new SlideError('CORRUPT', `invalid byte range ${offset}+${length}`, src.name);
  }
  if (offset + length > src.size) {
    throw new SlideError('TRUNCATED', `file is truncated or corrupt: needs bytes ${offset}..${offset + length} but has ${src.size}`, src.name);
  }
}

/** A local file read with positional reads (no whole-file buffering). */
export class FileSource implements ByteSource {
  /** Bytes read so far (for tests and diagnostics). */
  bytesRead = 0;
  private constructor(
    readonly name: string,
    private fh: FileHandle | null,
    readonly size: number,
  ) {}

  static async open(path: string): Promise<FileSource> {
    let fh: FileHandle;
    try {
      fh = await open(path, 'r');
    } catch (err) {
      throw new SlideError('NOT_FOUND', `cannot open slide: ${(err as Error).message}`, path, { cause: err });
    }
    const st = await fh.stat();
    if (!st.isFile()) {
      await fh.close();
      throw new SlideError('NOT_FOUND', 'not a regular file', path);
    }
    return new FileSource(path, fh, st.size);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    if (!this.fh) throw new SlideError('CLOSED', 'slide is closed', this.name);
    checkRange(this, offset, length);
    const buf = Buffer.allocUnsafe(length);
    let done = 0;
    while (done < length) {
      const { bytesRead } = await this.fh.read(buf, done, length - done, offset + done);
      if (bytesRead === 0) throw new SlideError('TRUNCATED', 'unexpected end of file', this.name);
      done += bytesRead;
    }
    this.bytesRead += length;
    return buf;
  }

  async close(): Promise<void> {
    const fh = this.fh;
    this.fh = null;
    await fh?.close();
  }
}

/** Bytes already in memory (tests, uploads). */
export class BufferSource implements ByteSource {
  readonly size: number;
  constructor(
    private readonly buf: Buffer,
    readonly name = '<buffer>',
  ) {
    this.size = buf.length;
  }
  async read(offset: number, length: number): Promise<Buffer> {
    checkRange(this, offset, length);
    return this.buf.subarray(offset, offset + length);
  }
  async close(): Promise<void> {}
}
