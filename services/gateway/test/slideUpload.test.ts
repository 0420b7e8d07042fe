// Uploads into the slide root (SlideUpload), on a temporary directory: the file is kept under its
// checksum, and two gateways sharing the slide root cannot write one partial upload at once (the
// lock file next to it), while a lock a dead gateway left behind is taken over.
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { status } from '@cfrsam/rpc';
import { SlideUpload, UPLOAD_DIR, UPLOAD_LOCK_STALE_MS } from '../src/slideSources';

let root: string;
const bytes = Buffer.from(Array.from({ length: 5000 }, (_, i) => (i * 31) % 256));
const header = { name: 'a.svs', size: bytes.length, sha256: createHash('sha256').update(bytes).digest('hex') };
const lockFile = () => path.join(root, UPLOAD_DIR, `.lock-${header.sha256}-${header.size}`);

beforeEach(() => {
  root = fs.mkdtempSync(path.join(os.tmpdir(), 'cfrsam-upload-'));
});
afterEach(() => fs.rmSync(root, { recursive: true, force: true }));

describe('SlideUpload', () => {
  it('keeps the file under its checksum and leaves no lock behind', async () => {
    const upload = await SlideUpload.begin(root, header, 1 << 20);
    expect(fs.existsSync(lockFile())).toBe(true);
    await upload.write(bytes.subarray(0, 2000));
    await upload.write(bytes.subarray(2000));
    expect(await upload.finish()).toBe(`${header.sha256}.svs`);
    expect(fs.readFileSync(path.join(root, UPLOAD_DIR, `${header.sha256}.svs`))).toEqual(bytes);
    expect(fs.readdirSync(path.join(root, UPLOAD_DIR))).toEqual([`${header.sha256}.svs`]);
  });

  it('refuses a second writer of the same file while another gateway holds its lock, and takes over an abandoned lock', async () => {
    fs.mkdirSync(path.join(root, UPLOAD_DIR));
    // Another gateway (another process: this one's own guard does not know it) is uploading.
    fs.writeFileSync(lockFile(), 'other-host 1234\n');
    await expect(SlideUpload.begin(root, header, 1 << 20)).rejects.toMatchObject({
      code: status.ABORTED,
      details: expect.stringMatching(/being uploaded already, through another gateway/),
    });
    // That gateway died: its lock is no longer touched, and the next upload takes it over.
    const old = new Date(Date.now() - UPLOAD_LOCK_STALE_MS - 1000);
    fs.utimesSync(lockFile(), old, old);
    const upload = await SlideUpload.begin(root, header, 1 << 20);
    await upload.write(bytes);
    await upload.finish();
    expect(fs.existsSync(lockFile())).toBe(false);
  });

  it('releases the lock when the stream breaks off, so the retry continues', async () => {
    const first = await SlideUpload.begin(root, header, 1 << 20);
    await first.write(bytes.subarray(0, 1000));
    await first.interrupted();
    expect(fs.existsSync(lockFile())).toBe(false);
    const retry = await SlideUpload.begin(root, { ...header, offset: 1000 }, 1 << 20);
    await retry.write(bytes.subarray(1000));
    expect(await retry.finish()).toBe(`${header.sha256}.svs`);
  });
});
