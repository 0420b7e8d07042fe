// One replica policy for every stage a service calls (the gateway's prompters, encoders and
// decoders; a decoder's encoders): the clients, the order in which replicas are tried, cool-down,
// failover, DNS discovery and the deadline rule, written once.
//
// - Order: round-robin (stages that keep nothing per tile) or rendezvous hashing on a key (the tile
//   digest: a tile's features and prepared state live on the same replicas on every request).
//   Replicas in their cool-down go last.
// - Failover: a call that fails with a replica failure goes to the next replica of the order, at
//   most once per replica and never after the deadline has passed or the caller gave up. A replica
//   failure is UNAVAILABLE or RESOURCE_EXHAUSTED (any source), or INTERNAL / UNKNOWN / CANCELLED
//   that did not come from a service handler (no ErrorInfo: the transport dropped the call, e.g.
//   the process died mid-call). Decided by status code and ErrorInfo, never by message text.
// - Cool-down: an unreachable replica is skipped for `cooldownMs`; a busy one (RESOURCE_EXHAUSTED)
//   is not, since it is alive and will have room soon.
// - Discovery: `dns:///NAME:PORT` entries are re-resolved every `resolveIntervalMs`; replicas
//   that disappear keep their client until calls already on them are done.
import { createHash } from 'node:crypto';
import { status, type Client, type ServiceError } from '@grpc/grpc-js';
import { ReplicaDiscovery, type ResolveAll, systemResolveAll } from './discovery';
import { grpcError, isFromService, isServiceError } from './status';

/** Rendezvous (highest random weight) order of replicas for a key. */
export function rendezvousOrder(replicas: readonly string[], key: string): string[] {
  const weight = (r: string) => createHash('sha256').update(r).update('\0').update(key).digest().readBigUInt64BE(0);
  return replicas
    .map((r) => ({ r, w: weight(r) }))
    .sort((a, b) => (a.w === b.w ? (a.r < b.r ? -1 : 1) : a.w > b.w ? -1 : 1))
    .map((x) => x.r);
}

/** Errors after which the call should go to another replica (see the file comment). */
export function isReplicaFailure(err: unknown): boolean {
  if (!isServiceError(err)) return false;
  if (err.code === status.UNAVAILABLE || err.code === status.RESOURCE_EXHAUSTED) return true;
  return (err.code === status.INTERNAL || err.code === status.UNKNOWN || err.code === status.CANCELLED) && !isFromService(err);
}

export interface ReplicaCallOptions {
  deadline?: Date;
  signal?: AbortSignal;
}

export interface ReplicaSetOptions<C extends Client> {
  /** Stage name for messages ("prompter", "encoder", "decoder"). */
  stage: string;
  /** `host:port` addresses and `dns:///NAME:PORT` names. */
  targets: readonly string[];
  makeClient: (address: string) => C;
  cooldownMs?: number;
  /** How often DNS names are resolved again (ms). */
  resolveIntervalMs?: number;
  /** How long a replica removed by discovery keeps its client for calls already on it (ms). */
  retireAfterMs?: number;
  resolveAll?: ResolveAll;
  onFailover?: (replica: string, err: ServiceError) => void;
  log?: (message: string) => void;
}

export class ReplicaSet<C extends Client> {
  private readonly clients = new Map<string, C>();
  private readonly retired = new Map<string, C>();
  private readonly downUntil = new Map<string, number>();
  private readonly discovery: ReplicaDiscovery | null;
  private next = 0;
  private failoverCount = 0;
  readonly stage: string;

  constructor(private readonly options: ReplicaSetOptions<C>) {
    this.stage = options.stage;
    if (options.targets.length === 0) throw new Error(`at least one ${options.stage} address is needed`);
    const discovery = new ReplicaDiscovery(
      options.targets,
      (addresses) => this.setAddresses(addresses),
      options.resolveIntervalMs ?? 5000,
      options.resolveAll ?? systemResolveAll,
      options.log,
      `${options.stage} replicas`,
    );
    if (discovery.dynamic) {
      this.discovery = discovery;
    } else {
      this.discovery = null;
      this.setAddresses(options.targets);
    }
  }

  /** Resolves DNS names once and keeps them current; a no-op for static lists. */
  async start(): Promise<void> {
    if (!this.discovery) return;
    await this.discovery.refresh();
    this.discovery.start();
  }

  get addresses(): string[] {
    return [...this.clients.keys()];
  }

  get failovers(): number {
    return this.failoverCount;
  }

  /**
   * Replaces the replica list. New replicas get a client; removed ones stop being chosen at once,
   * and their client closes after `retireAfterMs` so calls already on it finish.
   */
  setAddresses(addresses: readonly string[]): void {
    if (addresses.length === 0) return;
    const wanted = new Set(addresses);
    for (const a of wanted) {
      if (this.clients.has(a)) continue;
      const revived = this.retired.get(a);
      this.retired.delete(a);
      this.clients.set(a, revived ?? this.options.makeClient(a));
    }
    for (const [a, client] of [...this.clients]) {
      if (wanted.has(a)) continue;
      this.clients.delete(a);
      this.retired.set(a, client);
      setTimeout(() => {
        if (this.retired.get(a) === client) {
          this.retired.delete(a);
          client.close();
        }
      }, this.options.retireAfterMs ?? 60_000).unref();
    }
  }

  close(): void {
    this.discovery?.stop();
    for (const c of [...this.clients.values(), ...this.retired.values()]) c.close();
    this.clients.clear();
    this.retired.clear();
  }

  /** True while a replica is in its cool-down. */
  coolingDown(replica: string): boolean {
    return (this.downUntil.get(replica) ?? 0) > Date.now();
  }

  private healthyFirst(order: string[]): string[] {
    return [...order.filter((r) => !this.coolingDown(r)), ...order.filter((r) => this.coolingDown(r))];
  }

  /** Rendezvous order for `key`, healthy replicas first. */
  orderFor(key: string): string[] {
    return this.healthyFirst(rendezvousOrder(this.addresses, key));
  }

  /**
   * The order for one of several calls sharing a key (prompt batches of one tile): call `index`
   * starts on the (index mod k)-th healthy replica of the key's rendezvous order, spreading the
   * calls over the key's top k replicas, then falls back on the rest.
   */
  spreadOrderFor(key: string, index: number, k: number): string[] {
    const order = this.orderFor(key);
    const healthy = order.filter((r) => !this.coolingDown(r));
    const pool = healthy.length > 0 ? healthy : order;
    const home = pool[index % Math.max(1, Math.min(k, pool.length))];
    return [home, ...order.filter((r) => r !== home)];
  }

  /** The next round-robin rotation, healthy replicas first. */
  roundRobin(): string[] {
    const all = this.addresses;
    if (all.length === 0) return [];
    const start = this.next++ % all.length;
    return this.healthyFirst([...all.slice(start), ...all.slice(0, start)]);
  }

  /** The client of a replica; one removed meanwhile answers like an unreachable one. */
  client(replica: string): C {
    const client = this.clients.get(replica) ?? this.retired.get(replica);
    if (!client) throw grpcError(status.UNAVAILABLE, `${this.stage} ${replica} is no longer a replica`);
    return client;
  }

  /** Records a replica failure: cool-down (unless it was only busy) and the failover count. */
  markFailed(replica: string, err: ServiceError): void {
    this.failoverCount++;
    if (err.code !== status.RESOURCE_EXHAUSTED) this.downUntil.set(replica, Date.now() + (this.options.cooldownMs ?? 5000));
    this.options.onFailover?.(replica, err);
  }

  /** Runs `fn` on the first replica of `order` that answers; see the file comment. */
  async call<T>(order: readonly string[], fn: (client: C, replica: string) => Promise<T>, call: ReplicaCallOptions = {}): Promise<T> {
    let lastError: ServiceError | undefined;
    const tried: string[] = [];
    for (const replica of order) {
      if (tried.length > 0 && call.deadline && call.deadline.getTime() <= Date.now()) break;
      if (call.signal?.aborted) break;
      tried.push(replica);
      try {
        return await fn(this.client(replica), replica);
      } catch (err) {
        if (call.signal?.aborted || !isReplicaFailure(err)) throw err;
        lastError = err as ServiceError;
        this.markFailed(replica, lastError);
      }
    }
    if (!lastError) throw grpcError(status.UNAVAILABLE, `no ${this.stage} replica to call`);
    const busy = lastError.code === status.RESOURCE_EXHAUSTED;
    throw grpcError(
      busy ? status.RESOURCE_EXHAUSTED : status.UNAVAILABLE,
      `no ${this.stage} replica answered (tried ${tried.join(', ')}): ${lastError.details ?? lastError.message}`,
      { reason: busy ? 'QUEUE_FULL' : 'NO_REPLICA', metadata: { stage: this.stage } },
    );
  }
}
