// Replicas from DNS. In Kubernetes each stage sits behind a headless Service, whose name resolves
// to one A record per ready pod. grpc-js would open one connection to one of them, but callers
// route work to chosen replicas (rendezvous hashing, round-robin) and must see every replica as
// its own address. An entry `dns:///NAME:PORT` in a replica list (--prompter, --encoder,
// --decoders, the decoder's --encoder) is resolved every `intervalMs` to `IP:PORT` addresses;
// static entries are used as they are.
import { promises as dns } from 'node:dns';
import { logger } from './log';

export type ResolveAll = (host: string) => Promise<string[]>;

/** All addresses (IPv4 and IPv6) a host name resolves to, via the system resolver. */
export const systemResolveAll: ResolveAll = async (host) => (await dns.lookup(host, { all: true })).map((r) => r.address);

export interface DnsEntry {
  host: string;
  port: number;
}

/** Splits replica entries into static addresses and `dns:///host:port` names. */
export function parseReplicaEntries(entries: readonly string[]): { fixed: string[]; dns: DnsEntry[] } {
  const fixed: string[] = [];
  const names: DnsEntry[] = [];
  for (const entry of entries) {
    if (!entry.startsWith('dns:')) {
      fixed.push(entry);
      continue;
    }
    const target = entry.replace(/^dns:(\/\/[^/]*\/)?/, '');
    const match = /^(.+):(\d+)$/.exec(target);
    if (!match) throw new Error(`replica entry "${entry}": expected dns:///HOST:PORT`);
    names.push({ host: match[1], port: Number(match[2]) });
  }
  return { fixed, dns: names };
}

function formatAddress(ip: string, port: number): string {
  return ip.includes(':') ? `[${ip}]:${port}` : `${ip}:${port}`;
}

/**
 * Keeps a replica address list current: resolves the DNS entries now and then every
 * `intervalMs`, and reports the full list (static + resolved, sorted) to `onChange` when it
 * changes. A failed or empty resolution keeps the previous addresses of that name, so a DNS
 * hiccup never empties the fleet.
 */
export class ReplicaDiscovery {
  private readonly fixed: string[];
  private readonly names: DnsEntry[];
  private readonly last = new Map<string, string[]>();
  private current: string[] = [];
  private timer: NodeJS.Timeout | null = null;

  constructor(
    entries: readonly string[],
    private readonly onChange: (addresses: string[]) => void,
    private readonly intervalMs = 5000,
    private readonly resolveAll: ResolveAll = systemResolveAll,
    private readonly log: (message: string) => void = (m) => logger().warn(m),
    private readonly what = 'replicas',
  ) {
    const parsed = parseReplicaEntries(entries);
    this.fixed = parsed.fixed;
    this.names = parsed.dns;
  }

  /** Whether any entry needs resolving (otherwise the list is static and no timer runs). */
  get dynamic(): boolean {
    return this.names.length > 0;
  }

  /** Resolves once; returns the address list. */
  async refresh(): Promise<string[]> {
    for (const { host, port } of this.names) {
      const key = `${host}:${port}`;
      try {
        const ips = [...new Set(await this.resolveAll(host))];
        if (ips.length > 0)
          this.last.set(
            key,
            ips.map((ip) => formatAddress(ip, port)),
          );
      } catch (err) {
        this.log(`resolving ${this.what} ${key} failed (${(err as Error).message}); keeping ${this.last.get(key)?.length ?? 0} known`);
      }
    }
    const next = [...new Set([...this.fixed, ...[...this.last.values()].flat()])].sort();
    if (next.join(',') !== this.current.join(',')) {
      this.current = next;
      if (next.length > 0) this.onChange(next);
    }
    return next;
  }

  start(): void {
    if (!this.dynamic || this.timer) return;
    this.timer = setInterval(() => void this.refresh(), this.intervalMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }
}
