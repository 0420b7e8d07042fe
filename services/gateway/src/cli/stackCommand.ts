// `cfrsam stack [--bundle models/tiny] [--decoders 2] [--port 50051]`: runs the whole system on
// this machine until SIGINT/SIGTERM, then stops every process.
import { ConfigError, type FlagSpec, parseFlags } from '@cfrsam/rpc';
import { formatHelp } from './help';
import type { CliIo } from './segment';
import { startStack } from './stack';

const STACK_FLAGS = {
  bundle: { type: 'string', default: '', help: 'model bundle directory (default models/tiny or CFRSAM_BUNDLE)' },
  decoders: { type: 'int', default: 2, help: 'decoder replicas' },
  port: { type: 'int', default: 50051, help: 'gateway port (stage services get free loopback ports)' },
  httpPort: { type: 'int', default: -1, help: 'HTTP/JSON API port of the gateway (-1: off)' },
  host: { type: 'string', default: '127.0.0.1', help: 'address every service listens on' },
  quiet: { type: 'boolean', default: false, help: "do not echo the services' logs" },
  standalone: {
    type: 'boolean',
    default: false,
    help: 'one process with the stages inside the gateway (services/standalone): the same API, no gRPC between the stages; faster on one machine',
  },
} satisfies Record<string, FlagSpec>;

export const STACK_USAGE = formatHelp(
  'cfrsam stack [--bundle DIR] [--decoders N] [--port PORT] [--http-port PORT] [--standalone]',
  'Runs prompter, encoder, decoders and gateway as local processes on loopback (Ctrl-C stops them all).',
  { flags: STACK_FLAGS },
  { bundle: 'DIR', port: 'PORT', httpPort: 'PORT', host: 'HOST' },
);

export async function runStack(argv: readonly string[], io: CliIo = { stdout: process.stdout, stderr: process.stderr }): Promise<number> {
  if (argv.includes('--help') || argv.includes('-h')) {
    io.stdout.write(`${STACK_USAGE}\n`);
    return 0;
  }
  let flags;
  try {
    flags = parseFlags(STACK_FLAGS, argv);
    if (flags.decoders < 1) throw new ConfigError(`--decoders must be >= 1, got ${flags.decoders}`);
  } catch (err) {
    if (err instanceof ConfigError) {
      io.stderr.write(`cfrsam stack: ${err.message.split('\n')[0]}\n${STACK_USAGE}\n`);
      return 2;
    }
    throw err;
  }
  // Signals that arrive while the stack is starting must still stop it.
  let signalled: NodeJS.Signals | undefined;
  let wake: (() => void) | undefined;
  const onSignal = (sig: NodeJS.Signals) => {
    signalled = sig;
    wake?.();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  io.stderr.write(
    flags.standalone
      ? `starting the standalone process (${flags.decoders} decoder worker(s))...\n`
      : `starting prompter, encoder, ${flags.decoders} decoder(s) and the gateway...\n`,
  );
  let stack;
  try {
    stack = await startStack({
      bundle: flags.bundle || undefined,
      decoders: flags.decoders,
      standalone: flags.standalone,
      port: flags.port,
      host: flags.host,
      args: flags.httpPort >= 0 ? { gateway: ['--http-port', String(flags.httpPort)] } : undefined,
      log: flags.quiet ? () => undefined : undefined,
    });
  } catch (err) {
    process.removeListener('SIGINT', onSignal);
    process.removeListener('SIGTERM', onSignal);
    io.stderr.write(`cfrsam stack: ${(err as Error).message}\n`);
    return 1;
  }
  io.stdout.write(
    [
      `gateway   ${stack.gateway}   (cfrsam.v1.Segmentation${flags.standalone ? '; prompter, encoder and decoder inside' : ''})`,
      ...(flags.standalone ? [] : [`prompter  ${stack.prompter}`, `encoder   ${stack.encoder}`]),
      ...stack.decoders.map((d, i) => `decoder-${i} ${d}`),
      'ready; Ctrl-C stops everything',
      '',
    ].join('\n'),
  );
  // Run until a signal, or until one of the services dies (then stop the rest and fail).
  let died: string | undefined;
  await new Promise<void>((resolve) => {
    wake = resolve;
    if (signalled) resolve();
    for (const p of stack.processes) {
      void p.exited.then((code) => {
        if (!signalled && !died) {
          died = `${p.name} exited unexpectedly (${code})`;
          resolve();
        }
      });
    }
  });
  io.stderr.write(died ? `cfrsam stack: ${died}; stopping the rest\n` : `received ${signalled}; stopping...\n`);
  await stack.stop();
  process.removeListener('SIGINT', onSignal);
  process.removeListener('SIGTERM', onSignal);
  io.stderr.write('stopped\n');
  return died ? 1 : 0;
}
