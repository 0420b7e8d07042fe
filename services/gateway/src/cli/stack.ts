// Starting the whole system on one machine: prompter, encoder, N decoder replicas and the gateway,
// each its own process on loopback, from the compiled services (services/*/dist/main.js). Used by
// `cfrsam stack`, `cfrsam segment --local` and the integration tests.
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import * as readline from 'node:readline';
import { credentials, makeGenericClientConstructor, type Client, type ServiceError } from '@grpc/grpc-js';
import { repoRoot } from '@cfrsam/rpc';
import { service as healthService } from 'grpc-health-check';

/**
 * Node flags of every service process (here and in each image's ENTRYPOINT, deploy/docker). The
 * services keep a small JS heap (4-37 MB) while tiles, features and masks pass through them as
 * large external buffers; V8 sizes the old generation's first limit for a small heap, so the
 * decoder ran a full mark-compact every 0.3 s under load (about 8 per 1000 x 1000 image). A larger initial limit defers them (`node bench/services-cpu.mjs --trace-gc NAME
 * --node-args=...` shows the count; README, Benchmarks). V8 takes heap sizes only at start, and
 * not from NODE_OPTIONS, hence a flag on the command line.
 */
export const SERVICE_NODE_FLAGS: readonly string[] = ['--initial-old-space-size=128'];

export type StackServiceKind = 'prompter' | 'encoder' | 'decoder' | 'gateway' | 'standalone';

export interface StackProcess {
  /**
   * "prompter", "encoder", "decoder-0", "decoder-1", ..., "gateway"; a kind started more than
   * once is numbered like the decoders ("encoder-0", "encoder-1", "gateway-0", ...).
   */
  name: string;
  kind: StackServiceKind;
  address: string;
  port: number;
  /** "host:port" of the HTTP/JSON API, for a gateway started with --http-port; '' otherwise. */
  httpAddress: string;
  child: ChildProcess;
  /** Resolves with the exit code (or signal name) when the process ends. */
  exited: Promise<number | string>;
}

export interface StackOptions {
  /** Model bundle directory (default: models/tiny, or CFRSAM_BUNDLE). */
  bundle?: string;
  /** Decoder replicas (default 2); with `standalone`, decoder worker threads. */
  decoders?: number;
  /**
   * One process (services/standalone) serving the gateway's API with the stages inside it, instead
   * of the four services; `args.gateway` applies to it. The replica counts other than `decoders`
   * and `gateways` must be 1.
   */
  standalone?: boolean;
  /** Prompter replicas (default 1). */
  prompters?: number;
  /** Encoder replicas (default 1). */
  encoders?: number;
  /** Gateways, each in front of every stage replica (default 1). */
  gateways?: number;
  /** Gateway port (0: a free one); with several gateways, the first one's. */
  port?: number;
  /** Loopback address everything listens on (default 127.0.0.1). */
  host?: string;
  /** Extra flags per service kind, e.g. { gateway: ['--max-image-pixels', '100000'] }. */
  args?: Partial<Record<StackServiceKind, string[]>>;
  /** Node flags per process (by process name), after SERVICE_NODE_FLAGS (so they override them), e.g. ['--cpu-prof'] to profile it (NODE_OPTIONS refuses that one). */
  nodeArgs?: (name: string) => string[];
  /** Extra environment per process (by process name), e.g. a CFRSAM_TRACE_FILE each. */
  env?: (name: string) => NodeJS.ProcessEnv;
  /** Output lines of the children (default: stderr, prefixed with the process name). */
  log?: (name: string, line: string) => void;
  /** How long to wait for every service to report SERVING (default 120 s). */
  readyTimeoutMs?: number;
  /** Repository root holding services/*\/dist (default: found from this module). */
  root?: string;
}

export interface RunningStack {
  /** The first gateway (of `gateways`). */
  gateway: string;
  /** The first gateway's HTTP/JSON API ("host:port"), when args.gateway has --http-port; '' otherwise. */
  http: string;
  /** The first prompter (of `prompters`); '' in a standalone stack (its stages serve no gRPC). */
  prompter: string;
  /** The first encoder (of `encoders`); '' in a standalone stack. */
  encoder: string;
  gateways: string[];
  prompters: string[];
  encoders: string[];
  decoders: string[];
  processes: StackProcess[];
  /** Stops one process (SIGTERM, then SIGKILL after graceMs) and waits for it. */
  stopProcess(name: string, signal?: NodeJS.Signals, graceMs?: number): Promise<void>;
  /** Stops every process, gateway first; idempotent. */
  stop(): Promise<void>;
}

/** A free TCP port on the host (the OS picks; closed again before use). */
export function freePort(host = '127.0.0.1'): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.once('error', reject);
    srv.listen(0, host, () => {
      const port = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(port));
    });
  });
}

/** The line startServer (@cfrsam/rpc) logs once bound: "NAME: listening on HOST:PORT (services: ...". */
const LISTENING_LINE = /listening on \S+:(\d+) \(services:/;
/** The gRPC port a service reports in `line` once bound, if it is its "listening on" line. */
export function listeningPort(line: string): number | undefined {
  const bound = LISTENING_LINE.exec(line);
  return bound ? Number(bound[1]) : undefined;
}
/** The line the gateway logs once its HTTP/JSON API is bound (server.ts). */
const HTTP_LISTENING_LINE = /HTTP\/JSON API listening on \S+:(\d+)/;

const HealthClient = makeGenericClientConstructor(healthService, 'grpc.health.v1.Health');

/** grpc.health.v1 Check of `service` ('' = the whole server): resolves with the status string. */
export function checkHealth(address: string, service = '', timeoutMs = 2_000): Promise<string> {
  const client = new HealthClient(address, credentials.createInsecure()) as unknown as Client & {
    check(req: { service: string }, opts: { deadline: number }, cb: (err: ServiceError | null, res: { status: string }) => void): void;
  };
  return new Promise<string>((resolve, reject) => {
    client.check({ service }, { deadline: Date.now() + timeoutMs }, (err, res) => {
      client.close();
      if (err) reject(err);
      else resolve(res.status);
    });
  });
}

async function waitServing(proc: StackProcess, deadline: number, output: () => string): Promise<void> {
  let exited: number | string | undefined;
  void proc.exited.then((code) => (exited = code));
  for (;;) {
    if (exited !== undefined) {
      throw new Error(`${proc.name} exited (${exited}) before serving; its output:\n${output()}`);
    }
    try {
      if ((await checkHealth(proc.address, '', 1_000)) === 'SERVING') return;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) throw new Error(`${proc.name} at ${proc.address} did not become SERVING in time; its output:\n${output()}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

function serviceScript(root: string, kind: StackServiceKind): string {
  const script = path.join(root, 'services', kind, 'dist', 'main.js');
  if (!fs.existsSync(script)) throw new Error(`${script} does not exist: run \`npm run build\` first`);
  return script;
}

/** Starts the stack and resolves once every service answers SERVING to a health check. */
export async function startStack(options: StackOptions = {}): Promise<RunningStack> {
  const root = options.root ?? repoRoot(__dirname);
  const host = options.host ?? '127.0.0.1';
  const decoderCount = options.decoders ?? 2;
  if (!(decoderCount >= 1)) throw new Error(`at least one decoder is needed, got ${decoderCount}`);
  const prompterCount = options.prompters ?? 1;
  const encoderCount = options.encoders ?? 1;
  const gatewayCount = options.gateways ?? 1;
  for (const [kind, n] of [
    ['prompter', prompterCount],
    ['encoder', encoderCount],
    ['gateway', gatewayCount],
  ] as const) {
    if (!(Number.isInteger(n) && n >= 1)) throw new Error(`at least one ${kind} is needed, got ${n}`);
  }
  const bundle = path.resolve(options.bundle ?? process.env.CFRSAM_BUNDLE ?? path.join(root, 'models', 'tiny'));
  if (!fs.existsSync(path.join(bundle, 'manifest.json'))) throw new Error(`no model bundle at ${bundle} (manifest.json missing)`);
  const log = options.log ?? ((name: string, line: string) => process.stderr.write(`[${name}] ${line}\n`));
  const processes: StackProcess[] = [];
  const outputs = new Map<string, string[]>();
  /** Per process: resolves with its bound gRPC port (once its HTTP/JSON port too, if it serves one). */
  const listenings = new Map<string, Promise<number>>();

  // Every process binds the port it is given, 0 by default: the OS picks a free one at bind time and
  // the process reports it in its "listening on" line. (Picking a free port here and passing it on
  // raced: between the pick and the bind another test's process could take it, and its health
  // check then answered for ours.)
  const launch = (name: string, kind: StackServiceKind, port: number, extra: string[]): StackProcess => {
    const args = [serviceScript(root, kind), '--port', String(port), '--host', host, '--bundle', bundle, ...extra, ...(options.args?.[kind] ?? [])];
    const child = spawn(process.execPath, [...SERVICE_NODE_FLAGS, ...(options.nodeArgs?.(name) ?? []), ...args], {
      cwd: root,
      env: { ...process.env, ...(options.env?.(name) ?? {}) },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const lines: string[] = [];
    outputs.set(name, lines);
    let onListening: (port: number) => void = () => {};
    const listening = new Promise<number>((resolve) => (onListening = resolve));
    let onHttpListening: (port: number) => void = () => {};
    const allArgs = [...extra, ...(options.args?.[kind] ?? [])];
    const httpFlag = allArgs.indexOf('--http-port');
    const servesHttp = httpFlag >= 0 && Number(allArgs[httpFlag + 1]) >= 0;
    // A gateway with an HTTP/JSON API counts as listening once both its ports are bound.
    const httpListening = servesHttp ? new Promise<number>((resolve) => (onHttpListening = resolve)) : Promise.resolve(-1);
    // Whole lines (readline joins a line that arrives in two chunks), so no "listening on" is missed.
    const onLine = (line: string) => {
      if (!line) return;
      lines.push(line);
      if (lines.length > 200) lines.shift();
      const bound = listeningPort(line);
      if (bound !== undefined) onListening(bound);
      const http = HTTP_LISTENING_LINE.exec(line);
      if (http) onHttpListening(Number(http[1]));
      log(name, line);
    };
    readline.createInterface({ input: child.stdout!, crlfDelay: Infinity }).on('line', onLine);
    readline.createInterface({ input: child.stderr!, crlfDelay: Infinity }).on('line', onLine);
    const exited = new Promise<number | string>((resolve) => child.once('exit', (code, signal) => resolve(code ?? signal ?? 'unknown')));
    const proc: StackProcess = { name, kind, address: `${host}:${port}`, port, httpAddress: '', child, exited };
    listenings.set(
      name,
      Promise.all([listening, httpListening]).then(([grpcPort, httpPort]) => {
        if (httpPort >= 0) proc.httpAddress = `${host}:${httpPort}`;
        return grpcPort;
      }),
    );
    processes.push(proc);
    return proc;
  };

  /** Resolves once every process of `procs` has bound its port (and sets its port and address). */
  const bound = async (procs: StackProcess[], deadline: number): Promise<StackProcess[]> => {
    await Promise.all(
      procs.map(async (proc) => {
        let timer: NodeJS.Timeout | undefined;
        const outcome = await Promise.race([
          listenings.get(proc.name)!.then((port) => ({ port })),
          proc.exited.then((code) => ({ exited: code })),
          new Promise<{ timeout: true }>((resolve) => (timer = setTimeout(() => resolve({ timeout: true }), Math.max(0, deadline - Date.now())))),
        ]);
        clearTimeout(timer);
        const output = () => (outputs.get(proc.name) ?? []).join('\n');
        if ('exited' in outcome) throw new Error(`${proc.name} exited (${outcome.exited}) before listening; its output:\n${output()}`);
        if ('timeout' in outcome) throw new Error(`${proc.name} did not report a listening port in time; its output:\n${output()}`);
        proc.port = outcome.port;
        proc.address = `${host}:${outcome.port}`;
      }),
    );
    return procs;
  };

  const stopProcess = async (name: string, signal: NodeJS.Signals = 'SIGTERM', graceMs = 10_000): Promise<void> => {
    const proc = processes.find((p) => p.name === name);
    if (!proc) throw new Error(`no process named ${name} in the stack`);
    if (proc.child.exitCode !== null || proc.child.signalCode !== null) return;
    proc.child.kill(signal);
    const timer = setTimeout(() => proc.child.kill('SIGKILL'), graceMs);
    await proc.exited;
    clearTimeout(timer);
  };

  let stopping: Promise<void> | undefined;
  const stop = () =>
    (stopping ??= (async () => {
      // The gateway first (it drains client calls that still need the stages), then the stages.
      const gateway = processes.filter((p) => p.kind === 'gateway' || p.kind === 'standalone');
      const stages = processes.filter((p) => !gateway.includes(p));
      await Promise.all(gateway.map((p) => stopProcess(p.name)));
      await Promise.all(stages.map((p) => stopProcess(p.name)));
    })());

  try {
    const deadline = Date.now() + (options.readyTimeoutMs ?? 120_000);
    // Decoders are always numbered; the other kinds only when there are several.
    const nameOf = (kind: StackServiceKind, i: number, n: number) => (n === 1 && kind !== 'decoder' ? kind : `${kind}-${i}`);
    const many = (kind: StackServiceKind, n: number, extra: () => string[]) =>
      Array.from({ length: n }, (_, i) => launch(nameOf(kind, i, n), kind, 0, extra()));
    if (options.standalone) {
      if (prompterCount !== 1 || encoderCount !== 1 || gatewayCount !== 1) {
        throw new Error('a standalone stack is one process: prompters, encoders and gateways must be 1');
      }
      const proc = launch('standalone', 'standalone', options.port ?? 0, [
        '--decoder-workers',
        String(decoderCount),
        ...(options.args?.gateway ?? []),
      ]);
      await bound([proc], deadline);
      await waitServing(proc, deadline, () => (outputs.get(proc.name) ?? []).join('\n'));
      return {
        gateway: proc.address,
        http: proc.httpAddress,
        prompter: '',
        encoder: '',
        gateways: [proc.address],
        prompters: [],
        encoders: [],
        decoders: [],
        processes,
        stopProcess,
        stop,
      };
    }
    const prompterProcs = many('prompter', prompterCount, () => []);
    const encoders = await bound(
      many('encoder', encoderCount, () => []),
      deadline,
    );
    // Decoders fetch tile features from the encoders themselves (never through the gateway).
    const encoderList = encoders.map((q) => q.address).join(',');
    const decoders = await bound(
      many('decoder', decoderCount, () => ['--encoder', encoderList]),
      deadline,
    );
    const prompters = await bound(prompterProcs, deadline);
    const gatewayArgs = [
      '--prompter',
      prompters.map((q) => q.address).join(','),
      '--encoder',
      encoders.map((q) => q.address).join(','),
      '--decoders',
      decoders.map((q) => q.address).join(','),
    ];
    const gateways = await bound(
      Array.from({ length: gatewayCount }, (_, i) =>
        launch(nameOf('gateway', i, gatewayCount), 'gateway', i === 0 ? (options.port ?? 0) : 0, gatewayArgs),
      ),
      deadline,
    );
    await Promise.all(processes.map((p) => waitServing(p, deadline, () => (outputs.get(p.name) ?? []).join('\n'))));
    return {
      gateway: gateways[0].address,
      http: gateways[0].httpAddress,
      prompter: prompters[0].address,
      encoder: encoders[0].address,
      gateways: gateways.map((p) => p.address),
      prompters: prompters.map((p) => p.address),
      encoders: encoders.map((p) => p.address),
      decoders: decoders.map((p) => p.address),
      processes,
      stopProcess,
      stop,
    };
  } catch (err) {
    await stop();
    throw err;
  }
}
