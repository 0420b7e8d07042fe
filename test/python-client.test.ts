// The Python client (clients/python) as a user installs it: pip from the repository into a fresh
// virtual environment (stubs generated from protos/ at build time), then a script that segments
// through a live stack: numpy label map and masks, COCO RLE, the PNG label map, Refine, QuPath
// GeoJSON in slide coordinates, a clear error for bad input (clients/python/tests/live_check.py).
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestStack, type TestStack } from './stack';

const run = promisify(execFile);
const ROOT = path.resolve(__dirname, '..');
const PYTHON = '/usr/bin/python3';

/** Why the client cannot be built here (Debian packages missing), or '' when it can. */
function missingPrerequisite(): string {
  if (!fs.existsSync(PYTHON)) return `${PYTHON} not found`;
  for (const tool of ['/usr/bin/protoc', '/usr/bin/grpc_python_plugin']) {
    if (!fs.existsSync(tool)) return `${tool} not found (apt install protobuf-compiler protobuf-compiler-grpc; scripts/setup.sh does)`;
  }
  return '';
}

const missing = missingPrerequisite();
if (missing) console.warn(`skipping the Python client test: ${missing}`);

describe.skipIf(missing !== '')('Python client against a live stack', () => {
  let stack: TestStack;
  let venv: string;

  beforeAll(async () => {
    venv = fs.mkdtempSync(path.join(os.tmpdir(), 'cfrsam-py-'));
    // --system-site-packages: grpcio, protobuf and numpy come from Debian; --no-build-isolation
    // and --no-index: the build uses Debian's setuptools, nothing is downloaded.
    await run(PYTHON, ['-m', 'venv', '--system-site-packages', venv]);
    await run(path.join(venv, 'bin', 'pip'), ['install', '--quiet', '--no-build-isolation', '--no-index', path.join(ROOT, 'clients', 'python')], {
      cwd: venv,
    });
    stack = await startTestStack({ decoders: 1 });
  });

  afterAll(async () => {
    await stack?.close();
    if (venv) fs.rmSync(venv, { recursive: true, force: true });
  });

  it('installs with pip, segments to numpy, COCO RLE, PNG label map, refine and QuPath GeoJSON', async () => {
    const { stdout } = await run(
      path.join(venv, 'bin', 'python'),
      [path.join(ROOT, 'clients', 'python', 'tests', 'live_check.py'), stack.gateway, path.join(ROOT, 'samples', 'synthetic-he-512.png')],
      { cwd: venv, timeout: 240_000 },
    ).catch((err: { stdout?: string; stderr?: string; message: string }) => {
      throw new Error(`live_check.py failed: ${err.stderr || err.stdout || err.message}`);
    });
    const summary = JSON.parse(stdout.trim().split('\n').pop()!) as { nuclei: number; shape: number[]; classes: string[] };
    expect(summary.nuclei).toBeGreaterThan(20);
    expect(summary.shape).toEqual([512, 512]);
    expect(summary.classes.length).toBeGreaterThan(0);
  });
});
