#!/usr/bin/env node
// cfrsam-prompter: serves cfrsam.v1.Prompter/Detect. Flags fall back to environment variables and
// defaults that work from a fresh clone (bundle models/tiny); `--help` lists them.
import { parseFlags, runMain, stageServiceFlags, stageServiceMainOptions } from '@cfrsam/rpc';
import { DEFAULT_PROMPTER_PORT, startPrompter } from './server';

const flags = {
  ...stageServiceFlags(DEFAULT_PROMPTER_PORT),
  maxBatch: { type: 'int', env: 'CFRSAM_MAX_BATCH', default: 8, help: 'tiles per prompter.onnx run' },
  maxTiles: { type: 'int', env: 'CFRSAM_MAX_TILES', default: 64, help: 'tiles per Detect request' },
} as const;

async function main(): Promise<void> {
  const config = parseFlags(flags);
  await startPrompter({
    ...(await stageServiceMainOptions('prompter', config)),
    maxBatch: config.maxBatch,
    maxTilesPerRequest: config.maxTiles,
  });
}

if (require.main === module) runMain('prompter', main);
