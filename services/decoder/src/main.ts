#!/usr/bin/env node
// cfrsam-decoder: serves cfrsam.v1.Decoder (Prepare once per image, Decode prompt batches). Flags
// fall back to environment variables and defaults that work from a fresh clone; `--help` lists them.
// --nats-url lets Prepare take features from the shared feature tier (off by default).
import { connectionAgeFromFlags, initServiceTelemetry, parseFlags, runMain, stageServiceFlags } from '@cfrsam/rpc';
import { openSharedFeatureStore, sharedFeatureCacheFlags } from '@cfrsam/runtime';
import { DEFAULT_DECODER_PORT, startDecoder } from './server';

const flags = {
  ...stageServiceFlags(DEFAULT_DECODER_PORT),
  maxBatch: { type: 'int', env: 'CFRSAM_MAX_BATCH', default: 32, help: 'prompts per decoder_prompts.onnx run' },
  maxPrompts: { type: 'int', env: 'CFRSAM_MAX_PROMPTS', default: 256, help: 'prompts per Decode request' },
  maxPoints: { type: 'int', env: 'CFRSAM_MAX_POINTS', default: 16, help: 'points per prompt' },
  cacheMb: { type: 'int', env: 'CFRSAM_CACHE_MB', default: 1024, help: 'prepared-state cache capacity in MiB' },
  ...sharedFeatureCacheFlags(),
} as const;

async function main(): Promise<void> {
  const config = parseFlags(flags);
  const connectionAge = connectionAgeFromFlags(config);
  const telemetry = await initServiceTelemetry({ serviceName: 'decoder', ...config });
  await startDecoder({
    port: config.port,
    host: config.host,
    bundle: config.bundle,
    workers: config.workers,
    intraOpThreads: config.intraOpThreads,
    maxQueue: config.maxQueue,
    executionProviders: config.executionProviders.split(',').map((s) => s.trim()).filter(Boolean),
    maxMessageBytes: config.maxMessageMb * 1024 * 1024,
    shutdownGraceMs: config.shutdownGraceMs,
    connectionAge,
    maxBatch: config.maxBatch,
    maxPromptsPerRequest: config.maxPrompts,
    maxPointsPerPrompt: config.maxPoints,
    cacheBytes: config.cacheMb * 1024 * 1024,
    // Prepares without features read the shared tier (see pipeline.ts); off without --nats-url.
    sharedStore: openSharedFeatureStore(config, 'decoder'),
    handleSignals: true,
    onShutdown: async () => {
      await telemetry.tracing.shutdown();
      await telemetry.metrics.close();
    },
  });
}

if (require.main === module) runMain('decoder', main);
