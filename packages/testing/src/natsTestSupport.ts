// A real nats-server with JetStream for the shared feature cache tests (not exported from index):
// started on a random free loopback port with a temporary store directory, stopped and removed by the
// test. Tests skip with a message when the binary is missing (CI installs it).
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

/** The nats-server binary: CFRSAM_NATS_SERVER, else the Debian package's, else one on PATH. */
export function natsServerBinary(): string | null {
  const candidates = [process.env.CFRSAM_NATS_SERVER, '/usr/sbin/nats-server'];
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) if (dir) candidates.push(path.join(dir, 'nats-server'));
  return candidates.find((c): c is string => !!c && fs.existsSync(c)) ?? null;
}

/** Why NATS tests cannot run here, or null. */
export function natsSkipReason(): string | null {
  return natsServerBinary()
    ? null
    : 'nats-server not found (install the nats-server package, or set CFRSAM_NATS_SERVER); skipping the shared feature cache tests';
}

export interface TestNatsServer {
  url: string;
  port: number;
  storeDir: string;
  /** Stops the server (SIGTERM, then SIGKILL after 5 s). Idempotent. */
  stop(): Promise<void>;
  /** stop() and remove the store directory. */
  dispose(): Promise<void>;
}

/**
 * Starts `nats-server -js` on 127.0.0.1 and resolves once it accepts clients. With `port` and
 * `storeDir` of a stopped server it starts that server again (same address, same JetStream data).
 */
export async function startTestNatsServer(again?: { port: number; storeDir: string }): Promise<TestNatsServer> {
  const binary = natsServerBinary();
  if (!binary) throw new Error(natsSkipReason()!);
  // A fresh server takes a random free port (-p -1) and logs it: a port picked here and released
  // could be taken by another test's server before nats-server binds it.
  let port = again?.port ?? -1;
  const storeDir = again?.storeDir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'cfrsam-nats-'));
  const child: ChildProcess = spawn(binary, ['-js', '-a', '127.0.0.1', '-p', String(port), '-sd', storeDir], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  let output = '';
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`nats-server did not start within 10 s:\n${output}`)), 10_000);
      child.stderr!.on('data', (chunk: Buffer) => {
        output += chunk.toString();
        const listening = /Listening for client connections on [^\s:]+:(\d+)/.exec(output);
        if (listening) port = Number(listening[1]);
        if (output.includes('Server is ready')) {
          clearTimeout(timer);
          resolve();
        }
      });
      child.once('exit', (code) => {
        clearTimeout(timer);
        reject(new Error(`nats-server exited with ${code}:\n${output}`));
      });
    });
  } catch (err) {
    child.kill('SIGKILL');
    if (!again) fs.rmSync(storeDir, { recursive: true, force: true });
    throw err;
  }
  // Keep draining the log so the pipe never fills up.
  child.stderr!.resume();
  const stop = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill('SIGTERM');
    const killer = setTimeout(() => child.kill('SIGKILL'), 5_000);
    await exited;
    clearTimeout(killer);
  };
  return {
    url: `nats://127.0.0.1:${port}`,
    port,
    storeDir,
    stop,
    dispose: async () => {
      await stop();
      fs.rmSync(storeDir, { recursive: true, force: true });
    },
  };
}
