#!/usr/bin/env node
// The `cfrsam` command line: dispatches subcommands.
//   stack     run prompter, encoder, decoders and gateway as local processes
//   segment   segment images and write GeoJSON, CSV, label map, sidecar JSON and overlay
//   score     score predicted label maps against ground truth
//   evaluate  segment an annotated dataset through a gateway and score it
//   slide     whole slides: `slide run` segments every tissue region at the model's resolution

import * as fs from 'node:fs';
import * as path from 'node:path';
import { runEvaluate } from './evaluate';
import { runScore } from './score';
import { runSegment } from './segment';
import { runSlide } from './slide';
import { runStack } from './stackCommand';

const COMMANDS: Record<string, { run: (argv: readonly string[]) => Promise<number>; help: string }> = {
  stack: { run: runStack, help: 'start prompter, encoder, decoders and gateway on this machine (Ctrl-C stops them)' },
  segment: { run: runSegment, help: 'segment images; writes GeoJSON (QuPath), CSV, label PNG, sidecar JSON and overlay PNG' },
  score: { run: runScore, help: 'score predicted label maps against ground truth (PQ, AJI, Dice, F1...)' },
  evaluate: { run: runEvaluate, help: 'segment a dataset through a running gateway and score it' },
  slide: {
    run: runSlide,
    help: 'slide run SLIDE... --out DIR: segment whole slides (SVS, TIFF, OME-TIFF, DICOM) region by region; slide submit|status|list|cancel|result|upload: slide jobs on a gateway',
  },
};

function usage(): string {
  return [
    'usage: cfrsam <command> [flags]        cfrsam <command> --help   cfrsam --version',
    '',
    'CFR-SAM nuclei segmentation: segment images and whole slides through the gRPC services.',
    '',
    'commands:',
    ...Object.entries(COMMANDS).map(([n, c]) => `  ${n.padEnd(10)} ${c.help}`),
  ].join('\n');
}

/** "cfrsam VERSION" from the gateway package (this file is dist/cli/main.js inside it). */
export function versionText(): string {
  const pkg = JSON.parse(fs.readFileSync(path.join(__dirname, '..', '..', 'package.json'), 'utf8')) as { version: string };
  return `cfrsam ${pkg.version} (node ${process.version})`;
}

export async function main(argv: readonly string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command === '--version' || command === '-V' || command === 'version') {
    process.stdout.write(`${versionText()}\n`);
    return 0;
  }
  if (!command || command === '--help' || command === '-h' || command === 'help') {
    process.stdout.write(`${usage()}\n`);
    return command ? 0 : 2;
  }
  const entry = COMMANDS[command];
  if (!entry) {
    process.stderr.write(`cfrsam: unknown command "${command}"\n${usage()}\n`);
    return 2;
  }
  return entry.run(rest);
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
    },
    (err: unknown) => {
      process.stderr.write(`cfrsam: ${(err as Error).stack ?? String(err)}\n`);
      process.exitCode = 1;
    },
  );
}
