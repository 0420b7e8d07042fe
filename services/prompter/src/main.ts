#!/usr/bin/env node
// cfrsam-prompter: serves cfrsam.v1.Prompter/Detect. Flags fall back to environment variables and
// defaults that work from a fresh clone (bundle models/tiny); `--help` lists them.
import { connectionAgeFromFlags, initServiceTelemetry, parseFlags, runMain, stageServiceFlags } from '@cfrsam/rpc';
import { DEFAULT_PROMPTER_PORT, startPrompter } from './server';

const flags = {
  ...stageServiceFlags(DEFAULT_PROMPTER_PORT),
  maxBatch: { type: 'int', env: 'CFRSAM_MAX_BATCH', default: 8, help: 'tiles per prompter.onnx run' },
  maxTiles: { type: 'int', env: 'CFRSAM_MAX_TILES', default: 64, help: 'tiles per Detect request' },
} as const;

async function main(): Promise<void> {
  const config = parseFlags(flags);
  const connectionAge = connectionAgeFromFlags(config);
  const telemetry = await initServiceTelemetry({ serviceName: 'prompter', ...config });
  await startPrompter({
    port: config.port,
    host: config.host,
    bundle: config.bundle,
    workers: config.workers,
    intraOpThreads: config.intraOpThreads,
    maxQueue: config.maxQueue,
    executionProviders: config.executionProviders
      .split(',')
      .map((s) => s.trim())
      .filter(Boolean),
    maxMessageBytes: config.maxMessageMb * 1024 * 1024,
    shutdownGraceMs: config.shutdownGraceMs,
    connectionAge,
    internalToken: config.internalToken || undefined,
    reflection: config.reflection,
    maxBatch: config.maxBatch,
    maxTilesPerRequest: config.maxTiles,
    handleSignals: true,
    onShutdown: async () => {
      await telemetry.tracing.shutdown();
      await telemetry.metrics.close();
    },
  });
}

if (require.main === module) runMain('prompter', main);
