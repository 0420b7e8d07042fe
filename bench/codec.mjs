// Serialising the stage messages: the generated grpc-js serializer against the low-copy one
// (packages/rpc/src/codec.ts), one process, interleaved. Prints ms per message and the
// garbage-collection time per 100 messages; nothing is asserted.
//
//   npm run build && node --expose-gc bench/codec.mjs [--rounds 5] [--messages 200]
import { createRequire } from 'node:module';
import * as path from 'node:path';
import { PerformanceObserver } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { median, root } from './common.mjs';

const require = createRequire(import.meta.url);
const { lowCopySerializer, stagesProto } = require(path.join(root, 'packages/rpc/dist/index.js'));

const { values: args } = parseArgs({ options: { rounds: { type: 'string', default: '5' }, messages: { type: 'string', default: '200' } } });
const ROUNDS = Number(args.rounds);
const MESSAGES = Number(args.messages);

let gcMs = 0;
new PerformanceObserver((list) => {
  for (const e of list.getEntries()) gcMs += e.duration;
}).observe({ entryTypes: ['gc'] });

const rgb = (n, seed) => Uint8Array.from({ length: n }, (_, i) => (i * 31 + seed) & 0xff);
const cases = {
  // What the gateway sends the prompter and the encoder: a batch of 4 tiles of 256 x 256 RGB.
  'EncodeRequest, 4 tiles (786 KB)': {
    type: stagesProto.EncodeRequest,
    generated: stagesProto.EncoderService.encode.requestSerialize,
    message: stagesProto.EncodeRequest.fromPartial({
      tiles: [0, 1, 2, 3].map((k) => ({ digest: `d${k}`, rgb: rgb(256 * 256 * 3, k) })),
      modelVersion: 'v',
    }),
  },
  // What an encoder answers a decoder fetching one tile's features (tiny: [3, 192, 16, 16] float32).
  'EncodeResponse, 1 tile of features (590 KB)': {
    type: stagesProto.EncodeResponse,
    generated: stagesProto.EncoderService.encode.responseSerialize,
    message: stagesProto.EncodeResponse.fromPartial({
      tiles: [{ digest: 'd', features: { dims: [3, 192, 16, 16], dtype: 1, data: rgb(3 * 192 * 16 * 16 * 4, 9) } }],
    }),
  },
};

// GC entries reach the observer asynchronously: wait a turn of the event loop before reading them.
const settle = () => new Promise((resolve) => setTimeout(resolve, 20));
const time = async (serialize, message) => {
  globalThis.gc?.();
  await settle();
  gcMs = 0;
  const t = performance.now();
  for (let i = 0; i < MESSAGES; i++) serialize(message);
  const ms = (performance.now() - t) / MESSAGES;
  await settle();
  return { ms, gc: (gcMs / MESSAGES) * 100 };
};

console.log(
  `${ROUNDS} rounds of ${MESSAGES} messages per serializer, interleaved${globalThis.gc ? '' : ' (run with --expose-gc for a clean start per round)'}`,
);
console.log('| message | generated: ms per message | low-copy | speed-up | GC ms per 100 messages: generated | low-copy |');
console.log('| --- | --- | --- | --- | --- | --- |');
for (const [name, c] of Object.entries(cases)) {
  const lowCopy = lowCopySerializer(c.type);
  if (Buffer.compare(lowCopy(c.message), c.generated(c.message)) !== 0) throw new Error(`${name}: the serializers disagree`);
  const g = [];
  const l = [];
  for (let r = 0; r < ROUNDS; r++) {
    g.push(await time(c.generated, c.message));
    l.push(await time(lowCopy, c.message));
  }
  const gm = median(g.map((x) => x.ms));
  const lm = median(l.map((x) => x.ms));
  console.log(
    `| ${name} | ${gm.toFixed(3)} | ${lm.toFixed(3)} | ${(gm / lm).toFixed(2)}x | ${median(g.map((x) => x.gc)).toFixed(1)} | ${median(l.map((x) => x.gc)).toFixed(1)} |`,
  );
}
