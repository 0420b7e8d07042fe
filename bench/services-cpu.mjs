// Cold 1000 x 1000 images through the four services, one at a time: the latency, the CPU time per
// image of every process and the kernel's part of it (system CPU and minor page faults; all from
// /proc), optionally with a CPU profile or a GC trace of some of them. Prints numbers; nothing is
// asserted. For an A/B of a change in one package, run it with the
// two builds of that package's dist/ in turn, several times alternating (the machine drifts).
//
//   npm run build && node bench/services-cpu.mjs [--images 5] [--profile gateway,decoder-0] [--trace-gc gateway]
//     [--node-args='--max-semi-space-size=32'] [--image PNG --size 256]
//
// --image and --size pick another picture and side (default: a MoNuSeg image at 1000 x 1000; e.g.
// a 256 x 256 CoNSeP tile for what one tile's request costs).
//
// Profiles land in --profile-dir (default /tmp/cfrsam-cpu-prof), one .cpuprofile per thread of
// each profiled process (open them in Chrome's DevTools, or sum self time per function).
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { coldCopy, cpuSecondsOfPid, kernelWorkOfPid, loadRgb, peakRssMb, png, root, startServices } from './common.mjs';

const { values: args } = parseArgs({
  options: {
    bundle: { type: 'string', default: path.join(root, 'models/tiny') },
    images: { type: 'string', default: '5' },
    profile: { type: 'string', default: '' },
    'profile-dir': { type: 'string', default: '/tmp/cfrsam-cpu-prof' },
    'trace-gc': { type: 'string', default: '' },
    // Extra node flags for every service process (an A/B of V8 or Node options), space-separated.
    'node-args': { type: 'string', default: '' },
    data: { type: 'string', default: path.join(root, '../shared/data') },
    image: { type: 'string', default: 'monuseg-train/TCGA-21-5784-01Z-00-DX1.png' },
    size: { type: 'string', default: '1000' },
  },
});
const SIZE = Number(args.size);
const IMAGES = Number(args.images);
const profiled = args.profile.split(',').filter(Boolean);
const gcTraced = args['trace-gc'].split(',').filter(Boolean);

const { stack, segment, stop } = await startServices(args.bundle, {
  nodeArgs: (name) => [
    ...args['node-args'].split(' ').filter(Boolean),
    ...(profiled.includes(name) ? ['--cpu-prof', `--cpu-prof-dir=${args['profile-dir']}`] : []),
    ...(gcTraced.includes(name) ? ['--trace-gc'] : []),
  ],
  log: (name, line) => {
    if (gcTraced.includes(name) && /Scavenge|Mark-Compact/.test(line)) console.log(`${name}: ${line}`);
  },
});

const cpuByProcess = () => Object.fromEntries(stack.processes.map((p) => [p.name, cpuSecondsOfPid(p.child.pid)]));
const kernelByProcess = () => Object.fromEntries(stack.processes.map((p) => [p.name, kernelWorkOfPid(p.child.pid)]));

try {
  const { rgb, source } = await loadRgb(path.resolve(args.data, args.image), SIZE);
  const images = [];
  for (let k = 0; k <= IMAGES; k++) images.push(await png(coldCopy(rgb, SIZE, 900 + k), SIZE));
  await segment(images[0]); // warm-up: graphs loaded, connections open
  const before = cpuByProcess();
  const kernelBefore = kernelByProcess();
  const t = performance.now();
  for (let k = 1; k <= IMAGES; k++) await segment(images[k]);
  const latency = (performance.now() - t) / IMAGES;
  const after = cpuByProcess();
  const kernelAfter = kernelByProcess();
  const perImage = Object.entries(after).map(([name, s]) => [name, ((s - before[name]) * 1000) / IMAGES]);
  const total = perImage.reduce((a, [, ms]) => a + ms, 0);
  console.log(`${source}: ${IMAGES} cold ${SIZE}x${SIZE} images, one at a time, after one warm-up`);
  const rss = stack.processes.map((p) => `${p.name} ${peakRssMb(p.child.pid)}`).join(', ');
  console.log(
    `latency ${latency.toFixed(0)} ms per image; peak RSS (MB) ${rss}; CPU per image ${total.toFixed(0)} ms: ${perImage.map(([n, ms]) => `${n} ${ms.toFixed(0)}`).join(', ')}`,
  );
  const kernel = Object.keys(kernelAfter).map((name) => {
    const systemMs = ((kernelAfter[name].systemSeconds - kernelBefore[name].systemSeconds) * 1000) / IMAGES;
    const faults = (kernelAfter[name].minorFaults - kernelBefore[name].minorFaults) / IMAGES;
    return `${name} ${systemMs.toFixed(0)} ms, ${faults.toFixed(0)} faults`;
  });
  console.log(`kernel work per image (system CPU, minor page faults): ${kernel.join('; ')}`);
} finally {
  await stop();
}
if (profiled.length) console.log(`CPU profiles of ${profiled.join(', ')} in ${args['profile-dir']}`);
