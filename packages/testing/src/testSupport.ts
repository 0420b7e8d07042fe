// Helpers for the services' tests (not exported from index): the bundle the tests run against,
// deterministic synthetic H&E-like tiles, and model-input normalisation. Tests use the real
// bundle at models/tiny (or CFRSAM_BUNDLE) and skip with a message when it is absent.
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { loadManifest, tensorToProto, type Manifest } from '@cfrsam/contract';
import { defaultBundleDir, type stagesProto } from '@cfrsam/rpc';

type Tensor = stagesProto.Tensor;

/** The test bundle, or null with the reason to skip. */
export function testBundle(): { manifest: Manifest; skipReason: null } | { manifest: null; skipReason: string } {
  const dir = defaultBundleDir();
  if (!fs.existsSync(path.join(dir, 'manifest.json'))) {
    return { manifest: null, skipReason: `no model bundle at ${dir} (export models/tiny or set CFRSAM_BUNDLE); skipping` };
  }
  return { manifest: loadManifest(dir), skipReason: null };
}

/** A small deterministic PRNG (mulberry32), so test tiles are the same on every run. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * An S x S RGB tile (interleaved bytes) resembling H&E: pink stroma with dark purple round nuclei
 * at random places, plus noise. Different seeds give different tiles (and digests).
 */
export function syntheticTileRgb(size: number, seed: number, nuclei = 12): Uint8Array {
  const rand = prng(seed);
  const rgb = new Uint8Array(size * size * 3);
  for (let i = 0; i < size * size; i++) {
    const n = (rand() - 0.5) * 20;
    rgb[i * 3] = 235 + n * 0.5;
    rgb[i * 3 + 1] = 170 + n;
    rgb[i * 3 + 2] = 205 + n;
  }
  for (let k = 0; k < nuclei; k++) {
    const cx = 10 + rand() * (size - 20);
    const cy = 10 + rand() * (size - 20);
    const r = 4 + rand() * 5;
    for (let y = Math.max(0, Math.floor(cy - r)); y <= Math.min(size - 1, Math.ceil(cy + r)); y++) {
      for (let x = Math.max(0, Math.floor(cx - r)); x <= Math.min(size - 1, Math.ceil(cx + r)); x++) {
        if ((x + 0.5 - cx) ** 2 + (y + 0.5 - cy) ** 2 <= r * r) {
          const i = (y * size + x) * 3;
          rgb[i] = 90 + rand() * 20;
          rgb[i + 1] = 50 + rand() * 20;
          rgb[i + 2] = 130 + rand() * 20;
        }
      }
    }
  }
  return rgb;
}

/** Interleaved RGB bytes -> planar normalised float32 [3, S, S] as the graphs take it. */
export function normalizeTile(rgb: Uint8Array, manifest: Manifest): Float32Array {
  const S = manifest.inputSize;
  const { mean, std } = manifest.normalization;
  const out = new Float32Array(3 * S * S);
  for (let i = 0; i < S * S; i++) {
    for (let c = 0; c < 3; c++) out[c * S * S + i] = (rgb[i * 3 + c] - mean[c]) / std[c];
  }
  return out;
}

/** A tile's pixels as the proto Tensor [3, S, S]. */
export function tilePixelsTensor(rgb: Uint8Array, manifest: Manifest): Tensor {
  const S = manifest.inputSize;
  return tensorToProto([3, S, S], normalizeTile(rgb, manifest));
}

/** A TCP port that was free a moment ago (for the Prometheus endpoint in tests). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}
