// Replicas of one stateless-ish stage (prompter or encoder) with failover.
//
// Each call gets an order of replicas: rendezvous on a key (the encoder uses the tile digest, so
// a tile's features are computed and cached on one replica and digest-only reads find them there)
// or round-robin (the prompter keeps nothing per tile). Replicas in their cool-down go last. A
// replica that is unreachable (UNAVAILABLE, connection dropped, process killed mid-call) or busy
// (RESOURCE_EXHAUSTED) is skipped and the call goes to the next one, at most once per replica and
// never past the request's deadline; every other status is the answer.
import type { Client, ServiceError } from '@grpc/grpc-js';
import { grpcError, status } from '@cfrsam/rpc';
import { isReplicaFailure, rendezvousOrder } from './decoderFleet';

export interface StageReplicasOptions<C extends Client> {
  /** Stage name for messages ("prompter", "encoder"). */
  stage: string;
  addresses: string[];
  makeClient: (address: string) => C;
  cooldownMs: number;
  onFailover?: (replica: string, err: ServiceError) => void;
}

export class StageReplicas<C extends Client> {
  private readonly clients = new Map<string, C>();
  private readonly downUntil = new Map<string, number>();
  private next = 0;
  private failoverCount = 0;

  constructor(private readonly options: StageReplicasOptions<C>) {
    if (options.addresses.length === 0) throw new Error(`at least one ${options.stage} address is needed`);
    for (const a of options.addresses) if (!this.clients.has(a)) this.clients.set(a, options.makeClient(a));
  }

  get addresses(): string[] {
    return [...this.clients.keys()];
  }

  get failovers(): number {
    return this.failoverCount;
  }

  close(): void {
    for (const c of this.clients.values()) c.close();
  }

  private healthyFirst(order: string[]): string[] {
    const now = Date.now();
    const down = (r: string) => (this.downUntil.get(r) ?? 0) > now;
    return [...order.filter((r) => !down(r)), ...order.filter(down)];
  }

  /** Rendezvous order for `key`, healthy replicas first. */
  orderFor(key: string): string[] {
    return this.healthyFirst(rendezvousOrder(this.addresses, key));
  }

  /** The next round-robin rotation, healthy replicas first. */
  roundRobin(): string[] {
    const all = this.addresses;
    const start = this.next++ % all.length;
    return this.healthyFirst([...all.slice(start), ...all.slice(0, start)]);
  }

  /** Runs `fn` on the first replica of `order` that answers; see the file comment. */
  async call<T>(order: string[], fn: (client: C, replica: string) => Promise<T>, call: { deadline?: Date; signal?: AbortSignal }): Promise<T> {
    let lastError: ServiceError | undefined;
    const tried: string[] = [];
    for (const replica of order) {
      const client = this.clients.get(replica);
      if (!client) continue;
      if (tried.length > 0 && call.deadline && call.deadline.getTime() <= Date.now()) break;
      tried.push(replica);
      try {
        return await fn(client, replica);
      } catch (err) {
        if (call.signal?.aborted || !isReplicaFailure(err)) throw err;
        lastError = err as ServiceError;
        this.failoverCount++;
        if (lastError.code !== status.RESOURCE_EXHAUSTED) this.downUntil.set(replica, Date.now() + this.options.cooldownMs);
        this.options.onFailover?.(replica, lastError);
      }
    }
    if (!lastError) throw grpcError(status.UNAVAILABLE, `no ${this.options.stage} replica to call`);
    throw grpcError(
      lastError.code === status.RESOURCE_EXHAUSTED ? status.RESOURCE_EXHAUSTED : status.UNAVAILABLE,
      `no ${this.options.stage} replica answered (tried ${tried.join(', ')}): ${lastError.details ?? lastError.message}`,
    );
  }
}
