// What every command that calls a gateway shares: TLS, a bearer token, and retries of the
// statuses a retry can fix (the gateway restarting or busy), waiting as the gateway's RetryInfo
// says when it says.
import * as fs from 'node:fs';
import { credentials, type ChannelCredentials } from '@grpc/grpc-js';
import { ConfigError, errorDetailsOf, type FlagSpec, status } from '@cfrsam/rpc';

export const CLIENT_FLAGS = {
  tls: { type: 'boolean', default: false, help: "connect with TLS (the system's roots, or --ca)" },
  ca: { type: 'string', env: 'CFRSAM_CA', default: '', help: "PEM file of the CA that signed the gateway's certificate (implies --tls)" },
  token: { type: 'string', env: 'CFRSAM_TOKEN', default: '', help: 'bearer token, sent as "authorization: Bearer TOKEN"' },
  retries: { type: 'int', default: 4, help: 'retries of a call the gateway answers UNAVAILABLE or RESOURCE_EXHAUSTED' },
} satisfies Record<string, FlagSpec>;

export interface ClientFlags {
  tls: boolean;
  ca: string;
  token: string;
  retries: number;
}

/** makeClient options from the flags: TLS credentials and the bearer token. */
export function clientSecurity(flags: ClientFlags): { credentials?: ChannelCredentials; bearerToken?: string } {
  if (flags.retries < 0) throw new ConfigError(`--retries must be >= 0, got ${flags.retries}`);
  let creds: ChannelCredentials | undefined;
  if (flags.tls || flags.ca) {
    let ca: Buffer | undefined;
    if (flags.ca) {
      try {
        ca = fs.readFileSync(flags.ca);
      } catch (err) {
        throw new ConfigError(`--ca ${flags.ca}: cannot read (${(err as Error).message})`);
      }
    }
    creds = credentials.createSsl(ca);
  }
  return { ...(creds ? { credentials: creds } : {}), ...(flags.token ? { bearerToken: flags.token } : {}) };
}

const RETRYABLE = new Set<number>([status.UNAVAILABLE, status.RESOURCE_EXHAUSTED]);

export interface RetryOptions {
  retries: number;
  /** First backoff in ms (doubled each retry, at most maxDelayMs), when the gateway names no delay. */
  baseDelayMs?: number;
  maxDelayMs?: number;
  /** Told before each wait: the attempt that failed, its error and the wait. */
  onRetry?: (attempt: number, err: unknown, delayMs: number) => void;
  sleep?: (ms: number) => Promise<void>;
}

/** Whether a call's error is worth retrying (UNAVAILABLE or RESOURCE_EXHAUSTED). */
export function isRetryable(err: unknown): boolean {
  const code = (err as { code?: unknown })?.code;
  return typeof code === 'number' && RETRYABLE.has(code);
}

/**
 * Runs `call`, retrying retryable failures up to `retries` times: after the gateway's RetryInfo
 * delay when it gives one, else an exponential backoff with jitter. Other errors pass at once.
 */
export async function withRetries<T>(call: () => Promise<T>, options: RetryOptions): Promise<T> {
  const base = options.baseDelayMs ?? 500;
  const max = options.maxDelayMs ?? 10_000;
  const sleep = options.sleep ?? ((ms: number) => new Promise<void>((r) => setTimeout(r, ms)));
  for (let attempt = 0; ; attempt++) {
    try {
      return await call();
    } catch (err) {
      if (attempt >= options.retries || !isRetryable(err)) throw err;
      const told = errorDetailsOf(err).retryDelayMs;
      const delay = told !== undefined && told >= 0 ? Math.min(told, 60_000) : Math.min(max, base * 2 ** attempt) * (0.5 + Math.random() / 2);
      options.onRetry?.(attempt + 1, err, delay);
      await sleep(delay);
    }
  }
}
