// The Python client (clients/python) as a user installs it: pip from the repository into a fresh
// virtual environment (stubs generated from protos/ at build time), then a script that segments
// through a live stack: numpy label map and masks, COCO RLE, the PNG label map, Refine, QuPath
// GeoJSON in slide coordinates, a clear error for bad input; and TLS with a CA file and a bearer
// token against a gateway that checks both (clients/python/tests/live_check.py).
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CallAuthenticator, hashToken } from '@cfrsam/rpc';
import { makeTestCertificates, natsSkipReason, startTestNatsServer, type TestNatsServer } from '@cfrsam/testing';
import { startGateway, type RunningGateway } from '../services/gateway/dist/server';
import { startTestStack, type TestStack } from './stack';

const run = promisify(execFile);
const ROOT = path.resolve(__dirname, '..');
const PYTHON = '/usr/bin/python3';
const TOKEN = 'python-client-token-0123456789';

/** Why the client cannot be built here (Debian packages missing), or '' when it can. */
function missingPrerequisite(): string {
  if (!fs.existsSync(PYTHON)) return `${PYTHON} not found`;
  for (const tool of ['/usr/bin/protoc', '/usr/bin/grpc_python_plugin', '/usr/bin/openssl']) {
    if (!fs.existsSync(tool)) return `${tool} not found (apt install protobuf-compiler protobuf-compiler-grpc; scripts/setup.sh does)`;
  }
  return '';
}

const missing = missingPrerequisite();
if (missing) console.warn(`skipping the Python client test: ${missing}`);

describe.skipIf(missing !== '')('Python client against a live stack', () => {
  let stack: TestStack;
  let venv: string;
  let certs: string;
  let tlsGateway: RunningGateway;
  let nats: TestNatsServer | undefined;
  let slideRoot: string;

  beforeAll(async () => {
    venv = fs.mkdtempSync(path.join(os.tmpdir(), 'cfrsam-py-'));
    // --system-site-packages: grpcio, protobuf and numpy come from Debian; --no-build-isolation
    // and --no-index: the build uses Debian's setuptools, nothing is downloaded.
    await run(PYTHON, ['-m', 'venv', '--system-site-packages', venv]);
    await run(path.join(venv, 'bin', 'pip'), ['install', '--quiet', '--no-build-isolation', '--no-index', path.join(ROOT, 'clients', 'python')], {
      cwd: venv,
    });
    // Slide jobs need a NATS JetStream server; without nats-server the client's slide-job helpers
    // are not exercised (said in the log).
    slideRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'cfrsam-py-slides-'));
    const noNats = natsSkipReason();
    if (noNats) console.warn(`Python client: slide-job helpers not tested: ${noNats}`);
    else nats = await startTestNatsServer();
    stack = await startTestStack({
      decoders: 1,
      args: nats ? { gateway: ['--nats-url', nats.url, '--slide-root', slideRoot, '--result-cache-mb', '0'] } : {},
    });
    // A second gateway in front of the same stages, serving TLS and checking tokens.
    certs = fs.mkdtempSync(path.join(os.tmpdir(), 'cfrsam-py-tls-'));
    makeTestCertificates(certs, 'server', 'gateway');
    fs.writeFileSync(
      path.join(certs, 'tokens.json'),
      JSON.stringify({ tokens: [{ sha256: hashToken(TOKEN), identity: 'python', rights: ['cfrsam.v1.Segmentation/*'] }] }),
    );
    tlsGateway = await startGateway({
      port: 0,
      host: '127.0.0.1',
      bundle: path.join(ROOT, 'models', 'tiny'),
      prompter: stack.prompter,
      encoder: stack.encoder,
      decoders: stack.decoders,
      tls: { certFile: path.join(certs, 'server.pem'), keyFile: path.join(certs, 'server.key') },
      auth: new CallAuthenticator({ tokenFile: path.join(certs, 'tokens.json') }),
    });
  });

  afterAll(async () => {
    await tlsGateway?.server.shutdown('test over');
    await stack?.close();
    await nats?.stop();
    if (slideRoot) fs.rmSync(slideRoot, { recursive: true, force: true });
    if (certs) fs.rmSync(certs, { recursive: true, force: true });
    if (venv) fs.rmSync(venv, { recursive: true, force: true });
  });

  it('installs with pip, segments to numpy, COCO RLE, PNG label map, refine, QuPath GeoJSON, TLS and token', async () => {
    const { stdout } = await run(
      path.join(venv, 'bin', 'python'),
      [
        path.join(ROOT, 'clients', 'python', 'tests', 'live_check.py'),
        stack.gateway,
        path.join(ROOT, 'samples', 'synthetic-he-512.png'),
        `127.0.0.1:${tlsGateway.server.port}`,
        path.join(certs, 'ca.pem'),
        TOKEN,
      ],
      { cwd: venv, timeout: 400_000, env: { ...process.env, CFRSAM_SLIDE_JOBS: nats ? '1' : '' } },
    ).catch((err: { stdout?: string; stderr?: string; message: string }) => {
      throw new Error(`live_check.py failed: ${err.stderr || err.stdout || err.message}`);
    });
    const lines = stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as { nuclei: number; shape: number[]; classes: string[]; tls_nuclei: number; slide_job_nuclei?: number });
    const summary = lines.find((l) => l.shape)!;
    const overTls = lines.find((l) => l.tls_nuclei !== undefined)!;
    if (nats) expect(lines.find((l) => l.slide_job_nuclei !== undefined)?.slide_job_nuclei).toBeGreaterThan(0.5 * summary.nuclei);
    expect(summary.nuclei).toBeGreaterThan(20);
    expect(overTls.tls_nuclei).toBe(summary.nuclei);
    expect(summary.shape).toEqual([512, 512]);
    expect(summary.classes.length).toBeGreaterThan(0);
  });
});
