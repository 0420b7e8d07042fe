// Overload benchmark (issue 16): many clients with deadlines against one stack, versus the same
// stack answering one request after another. Prints one table row per deadline:
// answered OK (and when), RESOURCE_EXHAUSTED (how soon, and the retry delay it carried),
// DEADLINE_EXCEEDED, CANCELLED, and the time of the first answer.
//
//   npm run build && node bench/overload.mjs [--clients 40] [--deadline 30,60] [--images 8] [--size 1000]
//        [--sequential-s 30] [--decoders 2] [--data ../shared/data] [--gateway host:port] [--without-size-header]
//
// Images: --images distinct base images of --size x --size pixels, cut from
// ../shared/data/monuseg-train when present (MoNuSeg is 1000 x 1000 at the model's 0.25 um/px),
// else synthetic (dark ellipses on pink). Every request gets its own copy (brightness shifted by a
// unique offset) so no cache (result, features, prepared state) answers for it: each costs the
// full model. First phase: one client sends requests one after another for --sequential-s seconds
// (no deadline); that also gives the gateway its throughput figure, as a running service has.
// Then, per deadline, --clients clients send one request each at the same moment, each with its own
// x-client-id and its own connection (opened, and the request encoded, before the burst: they stand
// for separate machines), announcing the image size in x-image-size. The local stack runs the gateway with the result cache off and a /metrics port,
// whose admission figures (limit, throughput) are printed at the end.
import { createRequire } from 'node:module';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';

const require = createRequire(import.meta.url);
const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const lib = (p) => require(path.join(root, p));
const { errorDetailsOf, makeClient, segmentationProto, unary } = lib('packages/rpc/dist/index.js');
const { startStack, freePort } = lib('services/gateway/dist/cli/stack.js');
const { Metadata, status } = require(require.resolve('@grpc/grpc-js', { paths: [path.join(root, 'packages/rpc')] }));
const sharp = require(require.resolve('sharp', { paths: [path.join(root, 'packages/nuclei')] }));

const { values: args } = parseArgs({
  options: {
    clients: { type: 'string', default: '40' },
    deadline: { type: 'string', default: '30,60' },
    images: { type: 'string', default: '8' },
    size: { type: 'string', default: '1000' },
    'sequential-s': { type: 'string', default: '30' },
    decoders: { type: 'string', default: '2' },
    data: { type: 'string', default: path.join(root, '../shared/data') },
    gateway: { type: 'string' },
    // Leave x-image-size out: the gateway prices each request only when its body has arrived.
    'without-size-header': { type: 'boolean', default: false },
  },
});
const clients = Number(args.clients);
const deadlinesS = args.deadline.split(',').map(Number);
const size = Number(args.size);
const sequentialS = Number(args['sequential-s']);
if (!(clients >= 1) || deadlinesS.some((d) => !(d > 0)) || !(size >= 64) || !(sequentialS > 0) || !(Number(args.images) >= 1)) {
  console.error('usage: --clients N --deadline S[,S...] --images N --size PX --sequential-s S (positive numbers; size >= 64)');
  process.exit(2);
}

/** Base images: MoNuSeg crops when present, else synthetic tissue. */
async function baseImages(n) {
  const dir = path.join(args.data, 'monuseg-train');
  if (fs.existsSync(dir)) {
    const files = fs
      .readdirSync(dir)
      .filter((f) => f.endsWith('.png') && !f.endsWith('.labels.png'))
      .sort()
      .slice(0, n);
    if (files.length > 0) {
      const out = [];
      for (const f of files) {
        const img = sharp(path.join(dir, f)).removeAlpha();
        const meta = await img.metadata();
        const side = Math.min(size, meta.width, meta.height);
        out.push(await img.extract({ left: 0, top: 0, width: side, height: side }).resize(size, size).raw().toBuffer({ resolveWithObject: true }));
      }
      return { source: `monuseg-train (${out.length} images)`, images: out };
    }
  }
  const images = [];
  for (let k = 0; k < n; k++) {
    const data = Buffer.alloc(size * size * 3);
    let s = 12345 + k * 7919;
    const rand = () => (s = (s * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
    for (let i = 0; i < size * size; i++) {
      const noise = (rand() - 0.5) * 16;
      data[i * 3] = 236 + noise;
      data[i * 3 + 1] = 190 + noise;
      data[i * 3 + 2] = 214 + noise;
    }
    for (let y = 20; y < size - 20; y += 40) {
      for (let x = 20 + ((y / 40) % 2) * 20; x < size - 20; x += 40) {
        const rx = 8 + rand() * 4;
        const ry = 7 + rand() * 4;
        for (let yy = Math.floor(y - ry); yy <= y + ry; yy++) {
          for (let xx = Math.floor(x - rx); xx <= x + rx; xx++) {
            if (((xx - x) / rx) ** 2 + ((yy - y) / ry) ** 2 > 1) continue;
            const i = (yy * size + xx) * 3;
            data[i] = 72;
            data[i + 1] = 38;
            data[i + 2] = 118;
          }
        }
      }
    }
    images.push({ data, info: { width: size, height: size, channels: 3 } });
  }
  return { source: `synthetic (${n} images)`, images };
}

let bases;
let nextCopy = 0;
/** A copy of a base image no cache has seen: brightness shifted by a unique offset. */
async function freshImages(n) {
  const out = [];
  for (let i = 0; i < n; i++, nextCopy++) {
    const base = bases.images[nextCopy % bases.images.length];
    const offset = 1 + Math.floor(nextCopy / bases.images.length);
    if (offset > 40) throw new Error('out of distinct copies: pass more --images');
    const sign = offset % 2 ? 1 : -1;
    out.push(
      await sharp(base.data, { raw: base.info })
        .linear(1, sign * Math.ceil(offset / 2))
        .png({ compressionLevel: 1 })
        .toBuffer(),
    );
  }
  return out;
}

const codeName = (code) => status[code] ?? String(code);
const range = (xs, unit = 's', digits = 1) =>
  xs.length === 0 ? '-' : `${Math.min(...xs).toFixed(digits)}-${Math.max(...xs).toFixed(digits)} ${unit}`.replace(/^(\S+)-\1 /, '$1 ');

async function main() {
  bases = await baseImages(Number(args.images));
  const metricsPort = args.gateway ? 0 : await freePort();
  const stack = args.gateway
    ? null
    : await startStack({
        decoders: Number(args.decoders),
        port: 0,
        args: { gateway: ['--result-cache-mb', '0', '--metrics-port', String(metricsPort)] },
        log: () => {},
      });
  const address = args.gateway ?? stack.gateway;
  // One connection per simulated client, as separate clients have (grpc-js would otherwise share
  // one subchannel, so every upload would queue behind the others on a single HTTP/2 connection).
  const connections = new Map();
  const clientFor = (clientId) => {
    if (!connections.has(clientId)) {
      connections.set(
        clientId,
        makeClient(segmentationProto.SegmentationClient, address, {
          maxMessageBytes: 256 * 1024 * 1024,
          channelOptions: { 'grpc.use_local_subchannel_pool': 1 },
        }),
      );
    }
    return connections.get(clientId);
  };
  // Every request announces its image's size (x-image-size, as the CLI and the Python client do),
  // so the gateway prices it from its headers, before the upload.
  const metadataFor = (clientId) => {
    const metadata = new Metadata();
    metadata.set('x-client-id', clientId);
    if (!args['without-size-header']) metadata.set('x-image-size', `${size}x${size}`);
    return metadata;
  };
  const segment = (image, clientId, options) => {
    const client = clientFor(clientId);
    return unary(client, client.segment, segmentationProto.SegmentRequest.fromPartial({ image }), { ...options, metadata: metadataFor(clientId) });
  };
  // The burst's clients stand for separate machines: each has its connection open and its request
  // encoded before the burst (40 clients in this one process would otherwise spend ~0.7 s of its
  // single event loop serialising 3 MB messages before the first header left, time a fleet spends in
  // parallel on its own CPUs). The upload itself still shares this machine with the stack.
  const segmentPath = segmentationProto.SegmentationService.segment.path;
  const encodedSegment = (clientId, encoded, deadline) => {
    const client = clientFor(clientId);
    return new Promise((resolve, reject) =>
      client.makeUnaryRequest(
        segmentPath,
        (b) => b,
        segmentationProto.SegmentationService.segment.responseDeserialize,
        encoded,
        metadataFor(clientId),
        { deadline },
        (err, response) => (err ? reject(err) : resolve(response)),
      ),
    );
  };
  const connect = (clientId) =>
    new Promise((resolve, reject) => clientFor(clientId).waitForReady(Date.now() + 10_000, (err) => (err ? reject(err) : resolve())));
  console.log(
    `overload benchmark: ${bases.source}, ${size} x ${size} px, ${clients} clients, deadlines ${deadlinesS.join(', ')} s, gateway ${address}, ` +
      (args['without-size-header'] ? 'no x-image-size header (priced when the body has arrived)' : 'x-image-size header (priced from the headers)'),
  );

  try {
    // ---------------------------------------------------------------- one after another
    const sequentialImages = await freshImages(Math.max(4, Math.ceil(sequentialS)));
    const latencies = [];
    /** When each sequential answer came, from the start of the phase (s). */
    const answeredAt = [];
    const seqStart = performance.now();
    // The request running at the end is let finish (not cancelled, which would cost the gateway's
    // throughput figure the time it ran); only answers within the phase count.
    for (const image of sequentialImages) {
      if (performance.now() - seqStart >= sequentialS * 1000) break;
      const t0 = performance.now();
      await segment(image, 'sequential', { timeoutMs: 600_000 });
      latencies.push((performance.now() - t0) / 1000);
      answeredAt.push((performance.now() - seqStart) / 1000);
    }
    const sequentialOk = answeredAt.filter((t) => t <= sequentialS).length;
    const single = [...latencies].sort((a, b) => a - b)[Math.floor(latencies.length / 2)] ?? NaN;
    console.log(
      `one after another for ${sequentialS} s: ${sequentialOk} answered (${range(latencies)} each, median ${single.toFixed(1)} s); ` +
        `wall ${((performance.now() - seqStart) / 1000).toFixed(1)} s`,
    );
    await new Promise((r) => setTimeout(r, 2_000));

    // ---------------------------------------------------------------- concurrent clients
    const rows = [];
    for (const deadlineS of deadlinesS) {
      const images = await freshImages(clients);
      const encoded = images.map((image) =>
        Buffer.from(segmentationProto.SegmentRequest.encode(segmentationProto.SegmentRequest.fromPartial({ image })).finish()),
      );
      await Promise.all(images.map((_, i) => connect(`client-${deadlineS}-${i}`)));
      const t0 = performance.now();
      const results = await Promise.all(
        encoded.map((body, i) =>
          encodedSegment(`client-${deadlineS}-${i}`, body, Date.now() + deadlineS * 1000).then(
            () => ({ code: status.OK, at: (performance.now() - t0) / 1000 }),
            (err) => ({ code: err.code, at: (performance.now() - t0) / 1000, retryMs: errorDetailsOf(err).retryDelayMs, details: err.details }),
          ),
        ),
      );
      const by = (code) => results.filter((r) => r.code === code);
      const ok = by(status.OK);
      const exhausted = by(status.RESOURCE_EXHAUSTED);
      const other = results.filter((r) => ![status.OK, status.RESOURCE_EXHAUSTED, status.DEADLINE_EXCEEDED, status.CANCELLED].includes(r.code));
      rows.push({
        deadlineS,
        ok,
        exhausted,
        expired: by(status.DEADLINE_EXCEEDED),
        cancelled: by(status.CANCELLED),
        other,
        first: ok.length ? Math.min(...ok.map((r) => r.at)) : NaN,
      });
      for (const r of other) console.log(`  unexpected ${codeName(r.code)} at ${r.at.toFixed(1)} s: ${r.details}`);
      await new Promise((r) => setTimeout(r, 2_000));
    }

    console.log('');
    console.log(
      '| client deadline | answered OK | RESOURCE_EXHAUSTED (time to rejection; retry delay) | DEADLINE_EXCEEDED | CANCELLED | first answer |',
    );
    console.log('| --- | --- | --- | --- | --- | --- |');
    for (const r of rows) {
      const retries = r.exhausted.filter((x) => x.retryMs !== undefined).map((x) => x.retryMs / 1000);
      console.log(
        `| ${r.deadlineS} s | ${r.ok.length} (in ${range(r.ok.map((x) => x.at))}) | ${r.exhausted.length} (in ${range(
          r.exhausted.map((x) => x.at),
          's',
          2,
        )}; ` +
          `retry ${range(retries)}${retries.length < r.exhausted.length ? `, ${r.exhausted.length - retries.length} without` : ''}) | ` +
          `${r.expired.length}${r.expired.length ? ` (at ${range(r.expired.map((x) => x.at))})` : ''} | ${r.cancelled.length} | ` +
          `${Number.isNaN(r.first) ? '-' : `${r.first.toFixed(1)} s`} |`,
      );
    }
    console.log('');
    console.log(`one after another in ${sequentialS} s: ${sequentialOk} answered; single-request latency (median) ${single.toFixed(1)} s`);
    for (const r of rows) {
      const slow = r.exhausted.filter((x) => x.at > 1).length;
      // The same stack answering one request after another for as long as the deadline.
      const baseline = r.deadlineS <= sequentialS ? answeredAt.filter((t) => t <= r.deadlineS).length : undefined;
      const parts = [
        baseline === undefined
          ? `deadline ${r.deadlineS} s: ${r.ok.length} answered (longer than the ${sequentialS} s sequential phase: no ratio)`
          : `deadline ${r.deadlineS} s: answered within the deadline / one after another in ${r.deadlineS} s = ${r.ok.length}/${baseline}` +
            (baseline ? ` = ${((100 * r.ok.length) / baseline).toFixed(0)}%` : ''),
        `rejections later than 1 s: ${slow}`,
        `first answer / single latency = ${(r.first / single).toFixed(2)}`,
      ];
      console.log(parts.join('; '));
    }
    if (metricsPort) {
      const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
      const pick = (name) =>
        text
          .split('\n')
          .find((l) => l.startsWith(name))
          ?.split(' ')
          .pop();
      console.log(
        `gateway admission at the end: limit ${pick('cfrsam_admission_limit')}, ` +
          `throughput ${Math.round(Number(pick('cfrsam_admission_throughput_pixels_per_second')))} pixels/s`,
      );
    }
  } finally {
    for (const c of connections.values()) c.close();
    await stack?.stop();
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
