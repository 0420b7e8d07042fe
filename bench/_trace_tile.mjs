import * as fs from 'node:fs';
import * as path from 'node:path';
import { coldCopy, loadRgb, png, root, startServices } from './common.mjs';
const dir = '/tmp/tr';
for (const f of fs.readdirSync(dir)) fs.unlinkSync(path.join(dir, f));
const N = Number(process.argv[2] ?? 20);
const { segment, stop } = await startServices(path.join(root, 'models/tiny'), { env: (name) => ({ CFRSAM_TRACE_FILE: `${dir}/${name}.jsonl` }) });
const { rgb } = await loadRgb(path.resolve(root, '../shared/data/consep-train/train_3_005.png'), 256);
const imgs = [];
for (let k = 0; k <= N; k++) imgs.push(await png(coldCopy(rgb, 256, 700 + k), 256));
await segment(imgs[0]);
const lat = [];
for (let k = 1; k <= N; k++) { const t = performance.now(); await segment(imgs[k]); lat.push(performance.now() - t); }
await new Promise((r) => setTimeout(r, 500));
await stop();
console.log('latency', lat.map((x) => x.toFixed(0)).join(' '));
