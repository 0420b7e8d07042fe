#!/usr/bin/env node
// cfrsam-decoder: serves cfrsam.v1.Decoder (Prepare once per image, Decode prompt batches). Flags
// fall back to environment variables and defaults that work from a fresh clone; `--help` lists them.
import { initServiceTelemetry, parseFlags, runMain, stageServiceFlags } from '@cfrsam/common';
import { DEFAULT_DECODER_PORT, startDecoder } from './server';

const flags = {
  ...stageServiceFlags(DEFAULT_DECODER_PORT),
  maxBatch: { type: 'int', env: 'CFRSAM_MAX_BATCH', default: 32, help: 'prompts per decoder_prompts.onnx run' },
  maxPrompts: { type: 'int', env: 'CFRSAM_MAX_PROMPTS', default: 256, help: 'prompts per Decode request' },
  maxPoints: { type: 'int', env: 'CFRSAM_MAX_POINTS', default: 16, help: 'points per prompt' },
  cacheMb: { type: 'int', env: 'CFRSAM_CACHE_MB', default: 1024, help: 'prepared-state cache capacity in MiB' },
} as const;

async function main(): Promise<void> {
  const config = parseFlags(flags);
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
    maxBatch: config.maxBatch,
    maxPromptsPerRequest: config.maxPrompts,
    maxPointsPerPrompt: config.maxPoints,
    cacheBytes: config.cacheMb * 1024 * 1024,
    handleSignals: true,
    onShutdown: async () => {
      await telemetry.tracing.shutdown();
      await telemetry.metrics.close();
    },
  });
}

if (require.main === module) runMain('decoder', main);
