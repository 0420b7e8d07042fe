#!/usr/bin/env node
// cfrsam-decoder: serves cfrsam.v1.Decoder (Prepare once per image, Decode prompt batches). Flags
// fall back to environment variables and defaults that work from a fresh clone; `--help` lists them.
// Prepare fetches a tile's features itself: from the shared tier (--nats-url) and from the encoders
// (--encoder), so they never travel through the gateway.
import { listFlag, parseFlags, runMain, stageServiceFlags, stageServiceMainOptions } from '@cfrsam/rpc';
import { openSharedFeatureStore, sharedFeatureCacheFlags } from '@cfrsam/runtime';
import { DEFAULT_MAX_FEATURES_WAIT_MS } from './pipeline';
import { DEFAULT_DECODER_PORT, startDecoder } from './server';

const flags = {
  ...stageServiceFlags(DEFAULT_DECODER_PORT),
  maxBatch: { type: 'int', env: 'CFRSAM_MAX_BATCH', default: 32, help: 'prompts per decoder_prompts.onnx run' },
  maxPrompts: { type: 'int', env: 'CFRSAM_MAX_PROMPTS', default: 256, help: 'prompts per Decode request' },
  maxPoints: { type: 'int', env: 'CFRSAM_MAX_POINTS', default: 16, help: 'points per prompt' },
  cacheMb: { type: 'int', env: 'CFRSAM_CACHE_MB', default: 1024, help: 'prepared-state cache capacity in MiB' },
  encoder: {
    type: 'string',
    env: 'CFRSAM_ENCODER',
    default: '127.0.0.1:50053',
    help: 'encoder replicas Prepare fetches features from, comma separated: host:port or dns:///NAME:PORT ("" for none)',
  },
  featuresWaitMs: {
    type: 'int',
    env: 'CFRSAM_FEATURES_WAIT_MS',
    default: DEFAULT_MAX_FEATURES_WAIT_MS,
    help: "the longest a Prepare may ask its feature fetch to wait at the encoder for a tile still on its way there (ms; the gateway asks while the tile's Encode is in flight)",
  },
  acceptUnverifiedInput: {
    type: 'boolean',
    env: 'CFRSAM_ACCEPT_UNVERIFIED_INPUT',
    default: false,
    help: 'accept Prepares carrying features or float pixels, which cannot be checked against the digest (tools and tests only)',
  },
  ...sharedFeatureCacheFlags(),
} as const;

async function main(): Promise<void> {
  const config = parseFlags(flags);
  await startDecoder({
    ...(await stageServiceMainOptions('decoder', config)),
    maxBatch: config.maxBatch,
    maxPromptsPerRequest: config.maxPrompts,
    maxPointsPerPrompt: config.maxPoints,
    cacheBytes: config.cacheMb * 1024 * 1024,
    acceptUnverifiedInput: config.acceptUnverifiedInput,
    // Prepares without features read the shared tier (see pipeline.ts); off without --nats-url.
    sharedStore: openSharedFeatureStore(config, 'decoder'),
    encoders: listFlag(config.encoder),
    maxFeaturesWaitMs: config.featuresWaitMs,
  });
}

if (require.main === module) runMain('decoder', main);
