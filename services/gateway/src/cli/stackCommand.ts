// `cfrsam stack [--bundle models/tiny] [--decoders 2] [--port 50051]`: runs the whole system on
// this machine until SIGINT/SIGTERM, then stops every process.
import { ConfigError, type FlagSpec, parseFlags } from '@cfrsam/rpc';
import { formatHelp } from './help';
import type { CliIo } from './segment';
import { startStack } from './stack';

const STACK_FLAGS = {
  bundle: { type: 'string', default: '', help: 'model bundle directory (default models/tiny or CFRSAM_BUNDLE)' },
  decoders: { type: 'int', default: 2, help: 'decoder replicas' },
  prompters: { type: 'int', default: 1, help: 'prompter replicas (the gateways spread tile batches over them)' },
  encoders: { type: 'int', default: 1, help: 'encoder replicas (the decoders fetch features from the one that encoded a tile)' },
  gateways: {
    type: 'int',
    default: 1,
    help: 'gateways, each in front of every stage replica: the first on --port, the others on free ports (printed)',
  },
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
  'cfrsam stack [--bundle DIR] [--decoders N] [--prompters N] [--encoders N] [--gateways N] [--port PORT] [--http-port PORT] [--standalone]',
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
    for (const kind of ['decoders', 'prompters', 'encoders', 'gateways'] as const) {
      if (flags[kind] < 1) throw new ConfigError(`--${kind} must be >= 1, got ${flags[kind]}`);
    }
    if (flags.standalone && (flags.prompters > 1 || flags.encoders > 1 || flags.gateways > 1)) {
      throw new ConfigError('--standalone is one process: --prompters, --encoders and --gateways must be 1 (--decoders sets its decoder workers)');
    }
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
      : `starting ${flags.prompters} prompter(s), ${flags.encoders} encoder(s), ${flags.decoders} decoder(s) and ${flags.gateways} gateway(s)...\n`,
  );
  let stack;
  try {
    stack = await startStack({
      bundle: flags.bundle || undefined,
      decoders: flags.decoders,
      prompters: flags.prompters,
      encoders: flags.encoders,
      gateways: flags.gateways,
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
      ...stack.gateways.map(
        (g, i) =>
          `gateway${stack.gateways.length > 1 ? `-${i}` : ''}   ${g}   (cfrsam.v1.Segmentation${flags.standalone ? '; prompter, encoder and decoder inside' : ''})`,
      ),
      ...(flags.standalone ? [] : [...stack.prompters.map((a, i) => `prompter-${i} ${a}`), ...stack.encoders.map((a, i) => `encoder-${i} ${a}`)]),
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
