// Fan-out of prompt batches to decoder replicas.
//
// Each tile goes to a few replicas chosen by rendezvous hashing on its digest (the same tile goes
// to the same replicas on every request, so their prepared state is reused), Prepare is sent
// once per (tile, replica), and the tile's prompt batches are spread over those replicas. A
// replica that lost the state answers FAILED_PRECONDITION "not prepared": it is prepared again
// and the batch retried. A replica that is unreachable (UNAVAILABLE, connection dropped) is
// skipped for a cool-down and its batches go to the next replica in the rendezvous order, which is
// prepared first, so a replica dying in the middle of a request still gives a complete answer.
import { createHash } from 'node:crypto';
import { status, type ServiceError } from '@grpc/grpc-js';
import {
  grpcError,
  isServiceError,
  makeClient,
  type MakeClientOptions,
  serviceMetrics,
  SpanAttributes,
  stagesProto,
  unary,
} from '@cfrsam/rpc';
import { Limiter } from './limiter';
import type { StageClock } from './timing';

/** What Prepare needs for one tile, loaded only when some replica must be prepared. */
export interface PrepareSource {
  digest: string;
  load(): Promise<{ features: stagesProto.Tensor; pixels: stagesProto.Tensor }>;
}

export interface ChildCallOptions {
  deadline?: Date;
  /** Used when there is no deadline. */
  timeoutMs: number;
  signal?: AbortSignal;
}

export interface DecoderFleetOptions {
  addresses: string[];
  modelVersion: string;
  replicasPerTile: number;
  batchSize: number;
  maxCalls: number;
  cooldownMs: number;
  client?: MakeClientOptions;
  /** Called when a replica fails over (for logs and tests). */
  onFailover?: (replica: string, err: ServiceError) => void;
}

export interface DecoderFleetStats {
  prepares: number;
  decodes: number;
  reprepares: number;
  failovers: number;
}

/** Rendezvous (highest random weight) order of replicas for a key. */
export function rendezvousOrder(replicas: readonly string[], key: string): string[] {
  const weight = (r: string) => createHash('sha256').update(r).update('\0').update(key).digest().readBigUInt64BE(0);
  return replicas
    .map((r) => ({ r, w: weight(r) }))
    .sort((a, b) => (a.w === b.w ? (a.r < b.r ? -1 : 1) : a.w > b.w ? -1 : 1))
    .map((x) => x.r);
}

/** Errors after which the batch should go to another replica. */
export function isReplicaFailure(err: unknown): boolean {
  if (!isServiceError(err)) return false;
  if (err.code === status.UNAVAILABLE || err.code === status.RESOURCE_EXHAUSTED) return true;
  const details = err.details ?? err.message ?? '';
  // A process killed mid-call shows up as a dropped connection or reset stream, whatever the code.
  return (
    (err.code === status.INTERNAL || err.code === status.UNKNOWN || err.code === status.CANCELLED) &&
    /RST_STREAM|connection|socket|ECONNRESET|ECONNREFUSED|stream (closed|refused)/i.test(details)
  );
}

function isNotPrepared(err: unknown): boolean {
  return isServiceError(err) && err.code === status.FAILED_PRECONDITION && /not prepared/i.test(err.details ?? err.message ?? '');
}

/** A bounded set (insertion-ordered, oldest dropped first). */
class BoundedSet {
  private readonly items = new Set<string>();
  constructor(private readonly max: number) {}
  has(k: string): boolean {
    return this.items.has(k);
  }
  add(k: string): void {
    this.items.delete(k);
    this.items.add(k);
    if (this.items.size > this.max) this.items.delete(this.items.values().next().value as string);
  }
  delete(k: string): void {
    this.items.delete(k);
  }
}

export class DecoderFleet {
  private readonly clients = new Map<string, stagesProto.DecoderClient>();
  /** Replicas dropped by discovery, kept until calls already on them are done. */
  private readonly retired = new Map<string, stagesProto.DecoderClient>();
  private readonly limiter: Limiter;
  /** (replica, digest) pairs this gateway prepared and has not seen fail since. */
  private readonly prepared = new BoundedSet(100_000);
  private readonly preparing = new Map<string, Promise<void>>();
  private readonly downUntil = new Map<string, number>();
  private readonly counters: DecoderFleetStats = { prepares: 0, decodes: 0, reprepares: 0, failovers: 0 };

  constructor(private readonly options: DecoderFleetOptions) {
    if (options.addresses.length === 0) throw new Error('at least one decoder address is needed');
    for (const a of options.addresses) this.clients.set(a, makeClient(stagesProto.DecoderClient, a, options.client));
    this.limiter = new Limiter(options.maxCalls);
  }

  get addresses(): string[] {
    return [...this.clients.keys()];
  }

  /**
   * Replaces the replica list (DNS discovery). New replicas get a client; removed ones stop being
   * chosen at once, and their client closes after `retireAfterMs` so calls already on it finish.
   */
  setAddresses(addresses: readonly string[], retireAfterMs = 60_000): void {
    if (addresses.length === 0) return;
    const wanted = new Set(addresses);
    for (const a of wanted) {
      if (this.clients.has(a)) continue;
      const revived = this.retired.get(a);
      this.retired.delete(a);
      this.clients.set(a, revived ?? makeClient(stagesProto.DecoderClient, a, this.options.client));
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
      }, retireAfterMs).unref();
    }
  }

  /** The client of a replica; a replica removed meanwhile answers like an unreachable one. */
  private client(replica: string): stagesProto.DecoderClient {
    const client = this.clients.get(replica) ?? this.retired.get(replica);
    if (!client) throw grpcError(status.UNAVAILABLE, `decoder ${replica} is no longer in the fleet`);
    return client;
  }

  stats(): DecoderFleetStats {
    return { ...this.counters };
  }

  close(): void {
    for (const c of [...this.clients.values(), ...this.retired.values()]) c.close();
    this.retired.clear();
  }

  private coolingDown(replica: string): boolean {
    const until = this.downUntil.get(replica);
    return until !== undefined && until > Date.now();
  }

  /**
   * Decodes the prompts of one tile; the answer has one mask per prompt, in order. Batches run
   * concurrently (bounded by maxCalls across the gateway).
   */
  async decodeTile(
    source: PrepareSource,
    prompts: stagesProto.PromptPoints[],
    call: ChildCallOptions,
    clock: StageClock,
  ): Promise<stagesProto.DecodedMask[]> {
    if (prompts.length === 0) return [];
    const order = rendezvousOrder(this.addresses, source.digest);
    const batches: stagesProto.PromptPoints[][] = [];
    for (let i = 0; i < prompts.length; i += this.options.batchSize) batches.push(prompts.slice(i, i + this.options.batchSize));
    const results = await Promise.all(batches.map((batch, i) => this.decodeBatch(source, batch, i, order, call, clock)));
    return results.flat();
  }

  private async decodeBatch(
    source: PrepareSource,
    batch: stagesProto.PromptPoints[],
    index: number,
    order: string[],
    call: ChildCallOptions,
    clock: StageClock,
  ): Promise<stagesProto.DecodedMask[]> {
    // The batch's home is one of the tile's top-k healthy replicas; the rest of the rendezvous
    // order (healthy first) is the fallback.
    const healthy = order.filter((r) => !this.coolingDown(r));
    const candidates = healthy.length > 0 ? healthy : order;
    const k = Math.max(1, Math.min(this.options.replicasPerTile, candidates.length));
    const home = candidates[index % k];
    const attempts = [home, ...candidates.filter((r) => r !== home), ...order.filter((r) => !candidates.includes(r))];
    let lastError: ServiceError | undefined;
    for (const replica of attempts) {
      try {
        return await this.decodeOn(replica, source, batch, call, clock);
      } catch (err) {
        if (call.signal?.aborted || !isReplicaFailure(err)) throw err;
        lastError = err as ServiceError;
        this.counters.failovers++;
        if ((err as ServiceError).code !== status.RESOURCE_EXHAUSTED) {
          this.downUntil.set(replica, Date.now() + this.options.cooldownMs);
        }
        this.prepared.delete(`${replica}|${source.digest}`);
        this.options.onFailover?.(replica, err as ServiceError);
      }
    }
    throw grpcError(
      status.UNAVAILABLE,
      `no decoder replica could decode tile ${source.digest.slice(0, 12)} (tried ${attempts.join(', ')}): ` +
        `${lastError?.details ?? lastError?.message ?? 'unknown error'}`,
    );
  }

  private async decodeOn(
    replica: string,
    source: PrepareSource,
    batch: stagesProto.PromptPoints[],
    call: ChildCallOptions,
    clock: StageClock,
  ): Promise<stagesProto.DecodedMask[]> {
    const key = `${replica}|${source.digest}`;
    if (!this.prepared.has(key)) await this.prepare(replica, source, call, clock);
    const client = this.client(replica);
    for (let attempt = 0; ; attempt++) {
      try {
        const response = await this.limiter.run(
          () =>
            clock.time('decoder_decode', () =>
              unary(
                client,
                client.decode,
                { digest: source.digest, prompts: batch, modelVersion: this.options.modelVersion },
                {
                  deadline: call.deadline,
                  timeoutMs: call.deadline ? undefined : call.timeoutMs,
                  signal: call.signal,
                  attributes: {
                    [SpanAttributes.digest]: source.digest,
                    [SpanAttributes.prompts]: batch.length,
                    [SpanAttributes.batchSize]: batch.length,
                    'cfrsam.replica': replica,
                  },
                },
              ),
            ),
          call.signal,
        );
        this.counters.decodes++;
        serviceMetrics().batch('gateway.decode', batch.length);
        if (response.masks.length !== batch.length) {
          throw grpcError(status.INTERNAL, `decoder ${replica} returned ${response.masks.length} masks for ${batch.length} prompts`);
        }
        return response.masks;
      } catch (err) {
        if (isNotPrepared(err) && attempt < 2) {
          // The replica evicted or lost the tile (restart, LRU): prepare it again and retry.
          this.prepared.delete(key);
          this.counters.reprepares++;
          await this.prepare(replica, source, call, clock);
          continue;
        }
        throw err;
      }
    }
  }

  /** Prepare once per (replica, digest); concurrent batches wait for the same call. */
  private prepare(replica: string, source: PrepareSource, call: ChildCallOptions, clock: StageClock): Promise<void> {
    const key = `${replica}|${source.digest}`;
    let pending = this.preparing.get(key);
    if (!pending) {
      pending = (async () => {
        const input = await source.load();
        const client = this.client(replica);
        await this.limiter.run(
          () =>
            clock.time('decoder_prepare', () =>
              unary(
                client,
                client.prepare,
                {
                  digest: source.digest,
                  features: input.features,
                  pixels: input.pixels,
                  modelVersion: this.options.modelVersion,
                },
                {
                  deadline: call.deadline,
                  timeoutMs: call.deadline ? undefined : call.timeoutMs,
                  signal: call.signal,
                  attributes: { [SpanAttributes.digest]: source.digest, 'cfrsam.replica': replica },
                },
              ),
            ),
          call.signal,
        );
        this.counters.prepares++;
        this.prepared.add(key);
      })().finally(() => this.preparing.delete(key));
      this.preparing.set(key, pending);
    }
    return pending;
  }
}
