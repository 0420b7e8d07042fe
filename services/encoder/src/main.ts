#!/usr/bin/env node
// cfrsam-encoder: serves cfrsam.v1.Encoder (Encode with a feature cache, GetCacheStats). Flags fall
// back to environment variables and defaults that work from a fresh clone; `--help` lists them.
// --nats-url switches on the shared feature tier in NATS JetStream (off by default).
import { parseFlags, runMain, stageServiceFlags, stageServiceMainOptions } from '@cfrsam/rpc';
import { openSharedFeatureStore, sharedFeatureCacheFlags } from '@cfrsam/runtime';
import { DEFAULT_ENCODER_PORT, startEncoder } from './server';

const flags = {
  ...stageServiceFlags(DEFAULT_ENCODER_PORT),
  maxBatch: { type: 'int', env: 'CFRSAM_MAX_BATCH', default: 4, help: 'tiles per encoder.onnx run' },
  maxTiles: { type: 'int', env: 'CFRSAM_MAX_TILES', default: 64, help: 'tiles per Encode request' },
  cacheMb: { type: 'int', env: 'CFRSAM_CACHE_MB', default: 512, help: 'feature cache capacity in MiB' },
  ...sharedFeatureCacheFlags(),
} as const;

async function main(): Promise<void> {
  const config = parseFlags(flags);
  await startEncoder({
    ...(await stageServiceMainOptions('encoder', config)),
    maxBatch: config.maxBatch,
    maxTilesPerRequest: config.maxTiles,
    cacheBytes: config.cacheMb * 1024 * 1024,
    // Connects in the background: the encoder serves (computing) while NATS is unreachable.
    sharedStore: openSharedFeatureStore(config, 'encoder'),
  });
}

if (require.main === module) runMain('encoder', main);
