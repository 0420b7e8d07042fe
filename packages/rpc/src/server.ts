// gRPC server bootstrap shared by every service: message-size limits for tensor payloads,
// grpc.health.v1 health checking, server reflection, and graceful shutdown that drains in-flight
// calls on SIGTERM/SIGINT before closing worker pools.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Server, type ServerInterceptor, type ServiceDefinition, type UntypedServiceImplementation } from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { ReflectionService } from '@grpc/reflection';
import { HealthImplementation, protoPath as healthProtoPath, type ServingStatusMap } from 'grpc-health-check';
import { authenticatedImplementation, type CallAuthenticator, serverCredentials, type ServerTlsOptions } from './auth';
import { withLowCopySerializers } from './codec';
import { protosDir } from './config';
import { logger } from './log';
import { inFlightCalls } from './rpc';

/** Default message-size limit: a batch of feature tensors fits (64 MiB). */
export const DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

export interface ServiceRegistration {
  /** Fully qualified service name, as health checks ask for it: "cfrsam.v1.Encoder". */
  name: string;
  definition: ServiceDefinition;
  implementation: UntypedServiceImplementation;
}

export interface StartServerOptions {
  /** Process name for logs ("encoder"). */
  name: string;
  /** Port to listen on; 0 picks a free one (see RunningServer.port). */
  port: number;
  /** Default "0.0.0.0". */
  host?: string;
  services: ServiceRegistration[];
  /** Max receive and send message size (default DEFAULT_MAX_MESSAGE_BYTES). */
  maxMessageBytes?: number;
  /** How long shutdown waits for in-flight calls before cancelling them (default 15 s). */
  shutdownGraceMs?: number;
  /** Shut down on SIGTERM and SIGINT (default false; main() sets it). */
  handleSignals?: boolean;
  /** Connection age limits (default: connections live as long as clients keep them). */
  connectionAge?: ConnectionAgeOptions;
  /** Serve gRPC server reflection (default true; skipped with a warning when protos/ is absent). */
  reflection?: boolean;
  /** TLS from certificate files (default plaintext, as inside the cluster). */
  tls?: ServerTlsOptions;
  /** Bearer-token authentication of every registered service (health stays open); off when absent. */
  auth?: CallAuthenticator;
  /** grpc-js server interceptors, outermost first (they see a call's headers before its message). */
  interceptors?: ServerInterceptor[];
  /** Runs after the server stopped: close worker pools, flush tracing, stop metrics. */
  onShutdown?: () => Promise<void> | void;
  /** Default: the process's structured logger (log.ts). */
  log?: (message: string) => void;
}

export interface RunningServer {
  server: Server;
  /** The bound port (useful with port 0). */
  port: number;
  /** "host:port" to connect to from this machine. */
  address: string;
  health: HealthImplementation;
  /** SERVING or NOT_SERVING for the overall server ("") and every registered service. */
  setServing(serving: boolean): void;
  /** Whether the server reports SERVING (false once a shutdown began or setServing(false)). */
  serving(): boolean;
  /**
   * Graceful shutdown: NOT_SERVING, stop accepting calls, wait for in-flight calls up to the grace
   * period, then cancel the rest, then onShutdown. Idempotent; resolves when done.
   */
  shutdown(reason?: string): Promise<void>;
}

let reflectionDefinition: protoLoader.PackageDefinition | null | undefined;

/** The cfrsam protos and the health proto, loaded once for reflection (null if protos/ is absent). */
function loadReflectionDefinition(log: (m: string) => void): protoLoader.PackageDefinition | null {
  if (reflectionDefinition !== undefined) return reflectionDefinition;
  try {
    const root = protosDir();
    const files = ['cfrsam/v1/stages.proto', 'cfrsam/v1/segmentation.proto'].filter((f) => fs.existsSync(path.join(root, f)));
    if (files.length === 0) throw new Error(`no protos under ${root}`);
    const healthRoot = path.resolve(path.dirname(healthProtoPath), '..', '..');
    const healthFile = path.relative(healthRoot, healthProtoPath);
    reflectionDefinition = protoLoader.loadSync([...files, healthFile], {
      includeDirs: [root, healthRoot],
      keepCase: true,
      longs: String,
      enums: String,
      defaults: true,
      oneofs: true,
    });
  } catch (err) {
    log(`server reflection disabled: ${(err as Error).message} (set CFRSAM_PROTOS_DIR)`);
    reflectionDefinition = null;
  }
  return reflectionDefinition;
}

export interface ConnectionAgeOptions {
  /**
   * Close each client connection (with GOAWAY) after this long, so clients reconnect and reach
   * replicas added since: gRPC clients keep one HTTP/2 connection per channel and a Service
   * balances connections, not calls. 0 or undefined: off.
   */
  maxConnectionAgeMs?: number;
  /** Time calls in flight on an aged connection get to finish before it is closed (default 60 s). */
  maxConnectionAgeGraceMs?: number;
}

/** Default grace after the connection age: longer than the longest stage call. */
export const DEFAULT_MAX_CONNECTION_AGE_GRACE_MS = 60_000;

/** Channel options of every service's server (message sizes, keepalive tolerance, connection age). */
export function serverChannelOptions(maxMessageBytes: number, connectionAge: ConnectionAgeOptions = {}): Record<string, number> {
  const options: Record<string, number> = {
    'grpc.max_receive_message_length': maxMessageBytes,
    'grpc.max_send_message_length': maxMessageBytes,
    // Clients ping every 30 s to detect dead connections; allow that even without calls.
    'grpc.keepalive_permit_without_calls': 1,
    'grpc.http2.min_ping_interval_without_data_ms': 10_000,
  };
  if (connectionAge.maxConnectionAgeMs && connectionAge.maxConnectionAgeMs > 0) {
    options['grpc.max_connection_age_ms'] = connectionAge.maxConnectionAgeMs;
    options['grpc.max_connection_age_grace_ms'] = connectionAge.maxConnectionAgeGraceMs ?? DEFAULT_MAX_CONNECTION_AGE_GRACE_MS;
  }
  return options;
}

/** Starts a gRPC server with health, reflection and graceful shutdown. Resolves once bound. */
export async function startServer(options: StartServerOptions): Promise<RunningServer> {
  const log = options.log ?? ((m: string) => logger().info(m));
  const host = options.host ?? '0.0.0.0';
  const maxMessageBytes = options.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
  const graceMs = options.shutdownGraceMs ?? 15_000;
  const server = new Server({ ...serverChannelOptions(maxMessageBytes, options.connectionAge), interceptors: options.interceptors ?? [] });

  for (const s of options.services) {
    // Responses are serialised with the low-copy writer (codec.ts); reflection keeps the original.
    server.addService(
      withLowCopySerializers(s.definition),
      options.auth ? authenticatedImplementation(s.definition, s.implementation, options.auth) : s.implementation,
    );
  }

  const statusMap: ServingStatusMap = { '': 'SERVING' };
  for (const s of options.services) statusMap[s.name] = 'SERVING';
  const health = new HealthImplementation(statusMap);
  health.addToServer(server);

  if (options.reflection ?? true) {
    const definition = loadReflectionDefinition(log);
    if (definition) new ReflectionService(definition).addToServer(server);
  }

  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync(`${host}:${options.port}`, serverCredentials(options.tls), (err, bound) => {
      if (err) reject(new Error(`${options.name}: cannot listen on ${host}:${options.port}: ${err.message}`));
      else resolve(bound);
    });
  });

  let servingNow = true;
  const setServing = (serving: boolean) => {
    servingNow = serving;
    const value = serving ? 'SERVING' : 'NOT_SERVING';
    health.setStatus('', value);
    for (const s of options.services) health.setStatus(s.name, value);
  };

  let shutdownPromise: Promise<void> | null = null;
  const signalHandlers: Array<[NodeJS.Signals, () => void]> = [];
  const shutdown = (reason = 'shutdown requested'): Promise<void> => {
    shutdownPromise ??= (async () => {
      log(`${options.name}: ${reason}; draining ${inFlightCalls()} in-flight call(s) (grace ${graceMs} ms)`);
      setServing(false);
      for (const [sig, handler] of signalHandlers) process.removeListener(sig, handler);
      const drained = await new Promise<boolean>((resolve) => {
        const timer = setTimeout(() => resolve(false), graceMs);
        server.tryShutdown(() => {
          clearTimeout(timer);
          resolve(true);
        });
      });
      if (!drained) {
        log(`${options.name}: grace period over with ${inFlightCalls()} call(s) in flight; cancelling them`);
        server.forceShutdown();
      }
      options.auth?.close();
      try {
        await options.onShutdown?.();
      } catch (err) {
        log(`${options.name}: error while closing: ${(err as Error).message}`);
      }
      log(`${options.name}: stopped`);
    })();
    return shutdownPromise;
  };

  if (options.handleSignals) {
    for (const sig of ['SIGTERM', 'SIGINT'] as const) {
      const handler = () => {
        void shutdown(`received ${sig}`).then(() => {
          // Everything is closed; anything left (a stuck handle) must not keep the pod alive.
          setTimeout(() => process.exit(0), 2_000).unref();
        });
      };
      signalHandlers.push([sig, handler]);
      process.once(sig, handler);
    }
  }

  const address = `${host === '0.0.0.0' || host === '::' ? '127.0.0.1' : host}:${port}`;
  const security = [
    options.tls ? (options.tls.clientCaFile ? 'mutual TLS' : 'TLS') : 'plaintext',
    options.auth?.enabled ? 'tokens required' : 'no tokens',
  ];
  log(`${options.name}: listening on ${host}:${port} (services: ${options.services.map((s) => s.name).join(', ')}; ${security.join(', ')})`);
  return { server, port, address, health, setServing, serving: () => servingNow, shutdown };
}
