#!/usr/bin/env node
// The `cfrsam` command line: dispatches subcommands. (Minimal version with the evaluation
// commands; other subcommands are added beside these.)

import { runEvaluate } from './evaluate';
import { runScore } from './score';

const COMMANDS: Record<string, { run: (argv: readonly string[]) => Promise<number>; help: string }> = {
  score: { run: runScore, help: 'score predicted label maps against ground truth (PQ, AJI, Dice, F1...)' },
  evaluate: { run: runEvaluate, help: 'segment a dataset through a running gateway and score it' },
};

function usage(): string {
  return ['usage: cfrsam <command> [flags]', '', 'commands:', ...Object.entries(COMMANDS).map(([n, c]) => `  ${n.padEnd(10)} ${c.help}`)].join('\n');
}

export async function main(argv: readonly string[]): Promise<number> {
  const [command, ...rest] = argv;
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
