// Who may call what: bearer-token authentication and per-method rights for every service, and TLS
// (optionally mutual) for the servers that face clients. Tokens are never stored: a token file maps
// the SHA-256 of each token to an identity and its rights, and is read again when it changes (a
// rotated Kubernetes Secret). The stage services accept one internal token (a shared secret the
// gateway and the decoders present), so that only they can call the stage APIs. Health checks are
// never wrapped (probes carry no token); reflection is served or not by flag, unauthenticated.
import { createHash, timingSafeEqual } from 'node:crypto';
import * as fs from 'node:fs';
import {
  experimental,
  Metadata,
  ServerCredentials,
  status,
  type ServerUnaryCall,
  type ServiceDefinition,
  type UntypedHandleCall,
  type UntypedServiceImplementation,
} from '@grpc/grpc-js';
import { ConfigError, type FlagSpec } from './config';
import { grpcError, type StatusError } from './status';
import { trace } from '@opentelemetry/api';
import { attachIdentity, callIdentity, type CallIdentity } from './identity';
import { logger, logRequest } from './log';
import { extractTraceContext } from './tracing';

/** ErrorInfo reasons of refused calls. */
export const AuthReason = {
  /** No `authorization: Bearer <token>` metadata (or header) was sent. */
  TOKEN_MISSING: 'TOKEN_MISSING',
  /** The token is not one the service knows. */
  TOKEN_INVALID: 'TOKEN_INVALID',
  /** The identity has no right to call this method. */
  RIGHT_MISSING: 'RIGHT_MISSING',
} as const;

/** The identity the internal token stands for (gateway, slide workers, decoders calling encoders). */
export const INTERNAL_IDENTITY = 'internal';

/** Hex SHA-256 of a token, as the token file stores it (`printf %s "$TOKEN" | sha256sum`). */
export function hashToken(token: string): string {
  return createHash('sha256').update(token, 'utf8').digest('hex');
}

/** One entry of the token file. */
export interface TokenGrant {
  /** Hex SHA-256 of the token. */
  sha256: string;
  /** Who holds it: shown in logs, spans and metrics, and the key of per-client limits. */
  identity: string;
  /**
   * Methods it may call: "cfrsam.v1.Segmentation/Segment", a whole service
   * ("cfrsam.v1.Segmentation/*") or everything ("*").
   */
  rights: string[];
}

/** Parses and checks a token file's text: `{"tokens": [{"sha256", "identity", "rights"}]}`. */
export function parseTokenFile(text: string, source: string): TokenGrant[] {
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw new ConfigError(`${source}: not JSON (${(err as Error).message})`);
  }
  const tokens = (parsed as { tokens?: unknown })?.tokens;
  if (!Array.isArray(tokens)) throw new ConfigError(`${source}: expected {"tokens": [...]}`);
  return tokens.map((entry: unknown, i) => {
    const e = entry as Partial<TokenGrant>;
    if (typeof e?.sha256 !== 'string' || !/^[0-9a-f]{64}$/.test(e.sha256)) {
      throw new ConfigError(`${source}: tokens[${i}].sha256 must be 64 lowercase hex digits (the SHA-256 of the token, never the token)`);
    }
    if (typeof e.identity !== 'string' || e.identity.length === 0 || e.identity.length > 128) {
      throw new ConfigError(`${source}: tokens[${i}].identity must be a name of 1 to 128 characters`);
    }
    if (!Array.isArray(e.rights) || !e.rights.every((r) => typeof r === 'string' && r.length > 0)) {
      throw new ConfigError(`${source}: tokens[${i}].rights must be a list of method names ("cfrsam.v1.Segmentation/*", "*")`);
    }
    return { sha256: e.sha256, identity: e.identity, rights: [...e.rights] };
  });
}

/** Whether `rights` allow `method` ("cfrsam.v1.Segmentation/Segment", no leading slash). */
export function hasRight(rights: readonly string[], method: string): boolean {
  const service = method.slice(0, method.lastIndexOf('/'));
  return rights.some((r) => r === '*' || r === method || r === `${service}/*`);
}

export interface CallAuthenticatorOptions {
  /** The token file (see parseTokenFile); read again when it changes. */
  tokenFile?: string;
  /** Grants given directly (tests, or a generated configuration). */
  grants?: TokenGrant[];
  /** The internal token: its holder is INTERNAL_IDENTITY with every right. */
  internalToken?: string;
  /** How often the token file is checked for changes (default 2000 ms). */
  reloadIntervalMs?: number;
  /** Default: the structured logger (log.ts). */
  log?: (message: string) => void;
}

/**
 * Resolves a call's bearer token to an identity and checks its right to the method. Without any
 * token configured it is off (`enabled` false) and every call passes as before.
 */
export class CallAuthenticator {
  private byHash = new Map<string, TokenGrant>();
  private readonly internalHash: Buffer | null;
  private readonly options: CallAuthenticatorOptions;
  private watching = false;
  private readonly log: (message: string) => void;

  constructor(options: CallAuthenticatorOptions) {
    this.options = options;
    this.log = options.log ?? ((m) => logger().warn(m));
    this.internalHash = options.internalToken ? Buffer.from(hashToken(options.internalToken), 'hex') : null;
    if (options.tokenFile) {
      this.load(true);
      // Polling (not fs.watch): a Secret volume swaps a symlink, which fs.watch misses.
      fs.watchFile(options.tokenFile, { interval: options.reloadIntervalMs ?? 2000, persistent: false }, () => this.load(false));
      this.watching = true;
    }
    for (const g of options.grants ?? []) this.byHash.set(g.sha256, g);
  }

  /** True when some token is configured: calls without a valid one are refused. */
  get enabled(): boolean {
    return this.internalHash !== null || this.options.tokenFile !== undefined || (this.options.grants?.length ?? 0) > 0;
  }

  private load(initial: boolean): void {
    const file = this.options.tokenFile!;
    try {
      const grants = parseTokenFile(fs.readFileSync(file, 'utf8'), file);
      const next = new Map<string, TokenGrant>();
      for (const g of [...grants, ...(this.options.grants ?? [])]) next.set(g.sha256, g);
      this.byHash = next;
      if (!initial) this.log(`auth: reloaded ${grants.length} token(s) from ${file}`);
    } catch (err) {
      // At start a bad file is a configuration error; later the previous tokens stay in force.
      if (initial) throw err instanceof ConfigError ? err : new ConfigError(`cannot read the token file ${file}: ${(err as Error).message}`);
      this.log(`auth: keeping the previous tokens; ${file} is unusable: ${(err as Error).message}`);
    }
  }

  /**
   * The identity of a caller presenting `authorization` (the header's value) for `method`, or a
   * StatusError: UNAUTHENTICATED without a known token, PERMISSION_DENIED without the right.
   */
  authenticate(authorization: string | undefined, method: string): CallIdentity | StatusError {
    const match = authorization ? /^Bearer\s+(\S+)\s*$/i.exec(authorization) : null;
    if (!match) {
      return grpcError(status.UNAUTHENTICATED, `${method}: send a token as "authorization: Bearer <token>" metadata`, {
        reason: AuthReason.TOKEN_MISSING,
      });
    }
    const hash = hashToken(match[1]!);
    const hashBytes = Buffer.from(hash, 'hex');
    if (this.internalHash && timingSafeEqual(hashBytes, this.internalHash)) {
      return { id: INTERNAL_IDENTITY, authenticated: true, rights: ['*'] };
    }
    // A map lookup by hash: comparing hashes leaks nothing usable about the token itself.
    const grant = this.byHash.get(hash);
    if (!grant) return grpcError(status.UNAUTHENTICATED, `${method}: the token is not valid here`, { reason: AuthReason.TOKEN_INVALID });
    if (!hasRight(grant.rights, method)) {
      return grpcError(status.PERMISSION_DENIED, `${method}: identity "${grant.identity}" has no right to call this method`, {
        reason: AuthReason.RIGHT_MISSING,
        metadata: { identity: grant.identity, method },
      });
    }
    return { id: grant.identity, authenticated: true, rights: grant.rights };
  }

  /** Stops watching the token file. */
  close(): void {
    if (this.watching) fs.unwatchFile(this.options.tokenFile!);
    this.watching = false;
  }
}

/** The `authorization` value of a call's metadata, if one string was sent. */
export function authorizationOf(metadata: Metadata): string | undefined {
  const value = metadata.get('authorization')[0];
  return typeof value === 'string' ? value : undefined;
}

type AnyServerCall = ServerUnaryCall<unknown, unknown> & { emit(event: 'error', err: unknown): boolean; end?: () => void };

/**
 * The service implementation with every method behind `auth`: the handler runs only for an
 * authenticated caller with the right, after its identity is attached to the call (callIdentity).
 * Refused unary calls get the status through the callback; streaming calls get it as an error.
 */
export function authenticatedImplementation(
  definition: ServiceDefinition,
  implementation: UntypedServiceImplementation,
  auth: CallAuthenticator,
): UntypedServiceImplementation {
  if (!auth.enabled) return implementation;
  const wrapped: UntypedServiceImplementation = {};
  for (const [name, handler] of Object.entries(implementation)) {
    const method = definition[name]?.path.replace(/^\//, '') ?? name;
    const unaryResponse = definition[name] ? !definition[name].responseStream : true;
    const clientStreaming = definition[name]?.requestStream ?? false;
    wrapped[name] = ((call: AnyServerCall, callback?: (err: unknown) => void) => {
      const result = auth.authenticate(authorizationOf(call.metadata), method);
      if (result instanceof Error) {
        // The handler never runs, so its request line is written here.
        const traced = trace.getSpanContext(extractTraceContext(call.metadata));
        logRequest(
          {
            method,
            identity: callIdentity(call).id,
            authenticated: false,
            code: status[result.code],
            durationMs: 0,
            traceId: traced?.traceId ?? '',
            spanId: traced?.spanId ?? '',
            error: result.details,
          },
          false,
        );
        if (unaryResponse && callback) callback(result);
        else call.emit('error', result);
        return;
      }
      attachIdentity(call, result);
      // Whoever reads the metadata downstream never sees the caller's secret.
      call.metadata.remove('authorization');
      if (unaryResponse || clientStreaming) (handler as (c: unknown, cb: unknown) => void)(call, callback);
      else (handler as (c: unknown) => void)(call);
    }) as UntypedHandleCall;
  }
  return wrapped;
}

/** TLS of a server: certificate and key files (read again when they change), optional client CA. */
export interface ServerTlsOptions {
  certFile: string;
  keyFile: string;
  /** When set, clients must present a certificate signed by this CA (mutual TLS). */
  clientCaFile?: string;
  /** How often the files are read again (default 60 s; a renewed certificate is served after that). */
  refreshIntervalMs?: number;
}

/** Server credentials: insecure without `tls`, else TLS from files that are watched for renewal. */
export function serverCredentials(tls: ServerTlsOptions | undefined): ServerCredentials {
  if (!tls) return ServerCredentials.createInsecure();
  for (const [flag, file] of [
    ['--tls-cert', tls.certFile],
    ['--tls-key', tls.keyFile],
    ['--tls-client-ca', tls.clientCaFile],
  ] as const) {
    if (file !== undefined && !fs.existsSync(file)) throw new ConfigError(`${flag}: ${file} does not exist`);
  }
  const provider = new experimental.FileWatcherCertificateProvider({
    certificateFile: tls.certFile,
    privateKeyFile: tls.keyFile,
    caCertificateFile: tls.clientCaFile,
    refreshIntervalMs: tls.refreshIntervalMs ?? 60_000,
  });
  // grpc-js 1.14 constructs these credentials with its first argument as the identity (certificate
  // and key) provider, whatever the typings name it; one provider holding certificate, key and
  // client CA serves both roles, so the order cannot matter.
  return experimental.createCertificateProviderServerCredentials(provider, tls.clientCaFile ? provider : null, tls.clientCaFile !== undefined);
}

/** Flags of the services' security settings (the gateway uses all, stage services the internal token). */
export function securityFlags() {
  return {
    tlsCert: { type: 'string', env: 'CFRSAM_TLS_CERT', default: '', help: 'TLS certificate file (PEM); with --tls-key serves TLS' },
    tlsKey: { type: 'string', env: 'CFRSAM_TLS_KEY', default: '', help: 'TLS private key file (PEM)' },
    tlsClientCa: {
      type: 'string',
      env: 'CFRSAM_TLS_CLIENT_CA',
      default: '',
      help: 'CA file (PEM): clients must present a certificate it signed (mutual TLS); empty: no client certificates',
    },
    authTokens: {
      type: 'string',
      env: 'CFRSAM_AUTH_TOKENS',
      default: '',
      help: 'token file {"tokens":[{"sha256","identity","rights"}]}: callers need a listed bearer token; empty: no client tokens',
    },
    internalToken: {
      type: 'string',
      env: 'CFRSAM_INTERNAL_TOKEN',
      default: '',
      help: 'shared secret of the services: stage services accept only callers presenting it; the gateway and decoders send it',
    },
    reflection: { type: 'boolean', env: 'CFRSAM_REFLECTION', default: true, help: 'serve gRPC server reflection' },
  } satisfies Record<string, FlagSpec>;
}

export interface SecurityConfig {
  tlsCert: string;
  tlsKey: string;
  tlsClientCa: string;
  authTokens: string;
  internalToken: string;
}

/** startServer's TLS options from the flags (undefined: plaintext); checks that they go together. */
export function tlsFromFlags(config: SecurityConfig): ServerTlsOptions | undefined {
  if (!config.tlsCert && !config.tlsKey) {
    if (config.tlsClientCa) throw new ConfigError('--tls-client-ca needs --tls-cert and --tls-key');
    return undefined;
  }
  if (!config.tlsCert || !config.tlsKey) throw new ConfigError('--tls-cert and --tls-key go together');
  return { certFile: config.tlsCert, keyFile: config.tlsKey, clientCaFile: config.tlsClientCa || undefined };
}

/**
 * The authenticator of a server from the flags. `acceptClientTokens` is false for stage services,
 * which take only the internal token.
 */
export function authenticatorFromFlags(config: SecurityConfig, acceptClientTokens: boolean): CallAuthenticator {
  if (!acceptClientTokens && config.authTokens) throw new ConfigError('--auth-tokens is for the gateway; stage services take --internal-token');
  return new CallAuthenticator({
    tokenFile: acceptClientTokens && config.authTokens ? config.authTokens : undefined,
    internalToken: acceptClientTokens ? undefined : config.internalToken || undefined,
  });
}
