#!/usr/bin/env node
// cfrsam-standalone: the public cfrsam.v1.Segmentation API (gRPC, and HTTP/JSON with
// --http-port) with the prompter, encoder and decoder running in this process (localStages.ts).
// The gateway's flags, less the stage addresses, plus the stages' own: worker threads per stage and
// cache sizes. `--help` lists them. For one machine; a cluster runs the four services apart.
import { loadManifest } from '@cfrsam/contract';
import { GATEWAY_FLAGS, startGatewayFromFlags } from '@cfrsam/gateway/dist/main';
import { type FlagSpec, listFlag, logger, parseFlags, runMain, serviceMetrics, stageServiceFlags } from '@cfrsam/rpc';
import { startLocalStages } from './compose';

const STAGE_FLAGS = stageServiceFlags(0);
// decodeParallelism too: here a tile's batches fill the decoder workers (--decoder-workers).
const {
  prompter: _p,
  encoder: _e,
  decoders: _d,
  decoderDnsIntervalMs: _i,
  internalToken: _t,
  decodeParallelism: _dp,
  ...gatewayFlags
} = GATEWAY_FLAGS;

export const STANDALONE_FLAGS = {
  ...gatewayFlags,
  prompterWorkers: { type: 'int', env: 'CFRSAM_PROMPTER_WORKERS', default: 1, help: 'prompter worker threads' },
  encoderWorkers: { type: 'int', env: 'CFRSAM_ENCODER_WORKERS', default: 1, help: 'encoder worker threads' },
  decoderWorkers: { type: 'int', env: 'CFRSAM_DECODER_WORKERS', default: 2, help: 'decoder worker threads (they share prepared tiles)' },
  // The stage services' own runtime flags, with their names and environment variables.
  intraOpThreads: STAGE_FLAGS.intraOpThreads,
  maxQueue: STAGE_FLAGS.maxQueue,
  executionProviders: STAGE_FLAGS.executionProviders,
  encoderCacheMb: { type: 'int', env: 'CFRSAM_ENCODER_CACHE_MB', default: 512, help: 'feature cache capacity in MiB' },
  decoderCacheMb: { type: 'int', env: 'CFRSAM_DECODER_CACHE_MB', default: 1024, help: 'prepared-tile cache capacity in MiB' },
} satisfies Record<string, FlagSpec>;

async function main(): Promise<void> {
  const { prompterWorkers, encoderWorkers, decoderWorkers, intraOpThreads, maxQueue, executionProviders, encoderCacheMb, decoderCacheMb, ...config } =
    parseFlags(STANDALONE_FLAGS);
  const manifest = loadManifest(config.bundle);
  const stages = await startLocalStages(manifest, {
    prompterWorkers,
    encoderWorkers,
    decoderWorkers,
    intraOpThreads,
    maxQueue,
    executionProviders: listFlag(executionProviders),
    encoderCacheBytes: encoderCacheMb * 1024 * 1024,
    decoderCacheBytes: decoderCacheMb * 1024 * 1024,
    decodeBatchSize: config.decodeBatchSize,
    maxDecoderCalls: config.maxDecoderCalls,
    // The same per-graph series the stage services export (cfrsam_stage_duration_seconds{stage="GRAPH.run"}).
    onJobDone: ({ graph, queuedMs, runMs }) => {
      serviceMetrics().poolWait(graph, queuedMs / 1000);
      serviceMetrics().stage(`${graph}.run`, runMs / 1000);
    },
  });
  const running = await startGatewayFromFlags(config, { stages, prompter: [], encoder: [], decoders: [] });
  logger().info({
    msg: `standalone: prompter, encoder and decoder in this process (${prompterWorkers}/${encoderWorkers}/${decoderWorkers} workers)`,
    port: running.server.port,
  });
}

if (require.main === module) runMain('standalone', main);
