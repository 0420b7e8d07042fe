// Helpers the serving benchmarks share: free ports, a real (or the committed synthetic) H&E image
// as RGB bytes, and cold copies of it that miss every cache.
import { createRequire } from 'node:module';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';

const require = createRequire(import.meta.url);
export const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const sharp = require(require.resolve('sharp', { paths: [path.join(root, 'packages/nuclei')] }));

/**
 * CPU seconds (user + system, all threads) of a process, from /proc/PID/stat (Linux): the work a
 * process did, not its waiting.
 */
const TICKS_PER_S = 100;
export function cpuSecondsOfPid(pid) {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' '); // fields from 3 (state) on
  return (Number(fields[11]) + Number(fields[12])) / TICKS_PER_S; // utime, stime (fields 14, 15)
}

/**
 * The kernel's share of a process's work, from /proc/PID/stat (Linux): system CPU seconds and
 * minor page faults (first touches of fresh memory, which cost the kernel a fault and a zeroed page each).
 */
export function kernelWorkOfPid(pid) {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return { systemSeconds: Number(fields[12]) / TICKS_PER_S, minorFaults: Number(fields[7]) }; // stime (15), minflt (10)
}

/** Peak resident memory (MB) of a live process, from /proc/PID/status (Linux); null when gone. */
export function peakRssMb(pid) {
  try {
    const m = /^VmHWM:\s+(\d+)\s+kB/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Math.round(Number(m[1]) / 1024) : null;
  } catch {
    return null;
  }
}

/**
 * The four services as separate processes on loopback (1 prompter, 1 encoder, 1 decoder process
 * with 2 workers, the gateway admitting every request), and `segment(png)` through the gateway.
 * `options` go to startStack (nodeArgs, env, log); `stop()` closes the client and the processes.
 */
export async function startServices(bundle, options = {}) {
  const { makeClient, segmentationProto, unary } = require(path.join(root, 'packages/rpc/dist/index.js'));
  const { startStack } = require(path.join(root, 'services/gateway/dist/cli/stack.js'));
  const stack = await startStack({
    bundle,
    decoders: 1,
    port: 0,
    log: () => {},
    ...options,
    args: { gateway: ['--max-concurrent-requests', '1000'], decoder: ['--workers', '2'] },
  });
  const client = makeClient(segmentationProto.SegmentationClient, stack.gateway, { maxMessageBytes: 256 * 1024 * 1024 });
  const segment = (image) => unary(client, client.segment, segmentationProto.SegmentRequest.fromPartial({ image }), { timeoutMs: 300_000 });
  const stop = async () => {
    client.close();
    await stack.stop();
  };
  return { stack, segment, stop };
}

export const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

/** Ports free right now (listen on 0, then close). */
export async function freePorts(n) {
  const servers = await Promise.all(
    Array.from(
      { length: n },
      () =>
        new Promise((resolve) => {
          const s = net.createServer().listen(0, '127.0.0.1', () => resolve(s));
        }),
    ),
  );
  const ports = servers.map((s) => s.address().port);
  await Promise.all(servers.map((s) => new Promise((resolve) => s.close(resolve))));
  return ports;
}

/** A real H&E image when the shared data is there, else the committed synthetic sample. */
export async function loadRgb(preferred, size) {
  const file = fs.existsSync(preferred) ? preferred : path.join(root, 'samples/synthetic-he-512.png');
  const { data } = await sharp(file).removeAlpha().resize(size, size, { fit: 'cover' }).raw().toBuffer({ resolveWithObject: true });
  return { rgb: new Uint8Array(data), source: path.relative(root, file) };
}

/** RGB bytes of a size x size image as PNG. */
export const png = (rgb, size) =>
  sharp(Buffer.from(rgb), { raw: { width: size, height: size, channels: 3 } })
    .png()
    .toBuffer();

/**
 * Copy k of the image with a few pixels changed, one every 100 px in both directions, so every
 * model tile of every copy is new: a cold request (encoder and decoder caches miss). Red and green
 * of those pixels shift by k % 251 + 1 and floor(k / 251) + 1, unique per k (below 64,000).
 */
export function coldCopy(rgb, size, k) {
  const copy = rgb.slice();
  for (let y = 0; y < size; y += 100) {
    for (let x = 0; x < size; x += 100) {
      const i = 3 * (y * size + x);
      copy[i] = (copy[i] + (k % 251) + 1) % 256;
      copy[i + 1] = (copy[i + 1] + Math.floor(k / 251) + 1) % 256;
    }
  }
  return copy;
}
