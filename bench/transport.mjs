// One gRPC hop on this machine: a bare grpc-js echo (the request's bytes in, 64 bytes out) between
// two processes, over loopback TCP and over a Unix domain socket, taking turns. Prints the
// round-trip time and the CPU of both sides per call; nothing is asserted. Asks whether the
// stage hops' cost on one machine is the kernel's TCP (a socket would spare it) or grpc-js's
// HTTP/2 work in user space (the same either way).
//
//   node bench/transport.mjs [--pairs 2] [--calls 300] [--sizes 64,200704,604160]
//
// The sizes default to an empty call, one 256 x 256 RGB tile (196 KB, what the gateway sends the
// prompter, the encoder and the decoder) and one tile's features at `tiny` (590 KB, what the
// decoder fetches from the encoder).
import { fork } from 'node:child_process';
import { createRequire } from 'node:module';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { freePorts } from './common.mjs';

const require = createRequire(import.meta.url);
const grpc = require('@grpc/grpc-js');

const same = (b) => b;
const echo = {
  echo: {
    path: '/bench.Transport/Echo',
    requestStream: false,
    responseStream: false,
    requestSerialize: same,
    requestDeserialize: same,
    responseSerialize: same,
    responseDeserialize: same,
  },
};
const LIMITS = { 'grpc.max_receive_message_length': 64 << 20, 'grpc.max_send_message_length': 64 << 20 };
const cpuMs = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
};

if (process.argv[2] === '--serve') {
  // The server side, in its own process as a stage service is.
  const server = new grpc.Server(LIMITS);
  const answer = Buffer.alloc(64);
  server.addService(echo, { echo: (_call, done) => done(null, answer) });
  server.bindAsync(process.argv[3], grpc.ServerCredentials.createInsecure(), (err) => {
    if (err) throw err;
    process.send({ ready: true });
  });
  process.on('message', () => process.send({ cpuMs: cpuMs() }));
} else {
  const { values: args } = parseArgs({
    options: {
      pairs: { type: 'string', default: '2' },
      calls: { type: 'string', default: '300' },
      sizes: { type: 'string', default: '64,200704,604160' },
    },
  });
  const Client = grpc.makeGenericClientConstructor(echo);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cfrsam-transport-'));
  const [port] = await freePorts(1);

  async function measure(address, bytes, calls) {
    const server = fork(new URL(import.meta.url).pathname, ['--serve', address]);
    const ask = () =>
      new Promise((resolve) => {
        server.once('message', resolve);
        server.send('cpu');
      });
    await new Promise((resolve) => server.once('message', resolve));
    const client = new Client(address, grpc.credentials.createInsecure(), LIMITS);
    const body = Buffer.alloc(bytes, 7);
    const call = () => new Promise((resolve, reject) => client.echo(body, (err, out) => (err ? reject(err) : resolve(out))));
    for (let i = 0; i < 50; i++) await call(); // connection, JIT and buffers warmed
    const serverBefore = (await ask()).cpuMs;
    const clientBefore = cpuMs();
    const start = performance.now();
    for (let i = 0; i < calls; i++) await call();
    const wallMs = (performance.now() - start) / calls;
    const clientMs = (cpuMs() - clientBefore) / calls;
    const serverMs = ((await ask()).cpuMs - serverBefore) / calls;
    client.close();
    server.kill();
    return { wallMs, clientMs, serverMs };
  }

  console.log(`${os.cpus().length} CPUs; ${args.pairs} pairs per size, ${args.calls} sequential calls each, TCP and Unix socket taking turns`);
  console.log('| bytes | transport | round trip (ms) | CPU per call, client + server (ms) |');
  console.log('| --- | --- | --- | --- |');
  for (const bytes of args.sizes.split(',').map(Number)) {
    const runs = { 'loopback TCP': [], 'Unix socket': [] };
    for (let pair = 0; pair < Number(args.pairs); pair++) {
      runs['loopback TCP'].push(await measure(`127.0.0.1:${port}`, bytes, Number(args.calls)));
      runs['Unix socket'].push(await measure(`unix://${path.join(dir, `echo-${bytes}-${pair}.sock`)}`, bytes, Number(args.calls)));
    }
    for (const [name, rs] of Object.entries(runs)) {
      const wall = rs.map((r) => r.wallMs.toFixed(2)).join(', ');
      const cpu = rs.map((r) => `${r.clientMs.toFixed(2)} + ${r.serverMs.toFixed(2)}`).join(', ');
      const mean = rs.reduce((sum, r) => sum + r.wallMs, 0) / rs.length;
      console.log(`| ${bytes} | ${name} | ${wall} (mean ${mean.toFixed(2)}) | ${cpu} |`);
    }
  }
  fs.rmSync(dir, { recursive: true, force: true });
}
