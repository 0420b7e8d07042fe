// The stage ports over gRPC: one replica set per stage (@cfrsam/rpc ReplicaSet: ordering,
// cool-down, failover, DNS discovery), with what each stage needs on top.
//
// - Prompter: round-robin (it keeps nothing per tile).
// - Encoder: each tile to its rendezvous replica by digest, so its features are computed and
//   cached on one replica; a batch splits by replica. The features stay there: the gateway never
//   asks for them (return_features unset) and remembers which replica holds each tile.
// - Decoder: each tile's prompt batches are spread over its top-k rendezvous replicas. Prepare is
//   sent once per (replica, tile) with the tile's RGB bytes and the encoder that holds its
//   features; the decoder fetches them itself. NOT_PREPARED (the replica lost the state) means
//   prepare again; FEATURES_MISSING (evicted everywhere) means encode again, then prepare.
//
// Tiles travel as RGB bytes (S*S*3), a quarter of normalised float32 pixels; `bytes` counts the
// tensor payload that crosses the gateway (tile bytes out, features in) for the benchmark.
import type { ServiceError } from '@grpc/grpc-js';
import {
  ErrorReason,
  errorReason,
  grpcError,
  isReplicaFailure,
  makeClient,
  ReplicaSet,
  serviceMetrics,
  SpanAttributes,
  stagesProto,
  status,
  unary,
  type MakeClientOptions,
} from '@cfrsam/rpc';
import { Limiter } from '../limiter';
import { withSpan } from '../spans';
import type { DecoderPort, EncoderPort, PrompterPort, StageCall, StagePorts, StageTile } from './ports';
import { promptBatches, tileParallelism } from './promptBatches';

/**
 * How long a Prepare sent with its tile's Encode asks the decoder to wait at the encoder for the
 * tile (PrepareRequest.features_wait_ms; the decoder caps it). The tile normally arrives within
 * milliseconds; the wait runs out only when the Encode failed over to another replica.
 */
export const PREPARE_WITH_ENCODE_WAIT_MS = 1_000;

export interface GrpcStagesOptions {
  prompter: string[];
  encoder: string[];
  decoders: string[];
  modelVersion: string;
  /** Most prompts per Decode call. */
  decodeBatchSize: number;
  /** Decode calls of one tile that run at once (promptBatches). */
  decodeParallelism: number;
  /** Decoder replicas (rendezvous top-k) sharing one tile's batches. */
  replicasPerTile: number;
  /** Decoder calls in flight across the gateway. */
  maxDecoderCalls: number;
  replicaCooldownMs: number;
  /** Timeout of stage calls when the request has no deadline (ms). */
  defaultTimeoutMs: number;
  dnsIntervalMs?: number;
  client?: MakeClientOptions;
  onFailover?: (stage: string, replica: string, err: ServiceError) => void;
}

export interface GrpcStagesStats {
  prepares: number;
  decodes: number;
  reprepares: number;
  reencodes: number;
  failovers: { prompter: number; encoder: number; decoder: number };
  /** Tensor payload bytes sent to stages (tile RGB) and received from them (features; 0 by design). */
  bytes: { tilesOut: number; featuresIn: number };
}

/** A bounded insertion-ordered set (oldest dropped first). */
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

/** A bounded map (oldest dropped first). */
class BoundedMap<V> {
  private readonly items = new Map<string, V>();
  constructor(private readonly max: number) {}
  get(k: string): V | undefined {
    return this.items.get(k);
  }
  set(k: string, v: V): void {
    this.items.delete(k);
    this.items.set(k, v);
    if (this.items.size > this.max) this.items.delete(this.items.keys().next().value as string);
  }
}

export class GrpcStages implements StagePorts, PrompterPort, EncoderPort, DecoderPort {
  readonly prompters: ReplicaSet<stagesProto.PrompterClient>;
  readonly encoders: ReplicaSet<stagesProto.EncoderClient>;
  readonly decoders: ReplicaSet<stagesProto.DecoderClient>;
  private readonly limiter: Limiter;
  private readonly prepared = new BoundedSet(100_000);
  private readonly preparing = new Map<string, Promise<void>>();
  /** The encoder replica that encoded each tile: the decoder's first place to fetch features. */
  private readonly encodedOn = new BoundedMap<string>(100_000);
  /** Decode batches this gateway has in flight or queued per decoder replica. */
  private readonly busy = new Map<string, number>();
  private readonly counters = { prepares: 0, decodes: 0, reprepares: 0, reencodes: 0, tilesOut: 0, featuresIn: 0 };

  constructor(private readonly options: GrpcStagesOptions) {
    const common = { cooldownMs: options.replicaCooldownMs, resolveIntervalMs: options.dnsIntervalMs };
    const failover = (stage: string) => (replica: string, err: ServiceError) => options.onFailover?.(stage, replica, err);
    this.prompters = new ReplicaSet({
      ...common,
      stage: 'prompter',
      targets: options.prompter,
      makeClient: (a) => makeClient(stagesProto.PrompterClient, a, options.client),
      onFailover: failover('prompter'),
    });
    this.encoders = new ReplicaSet({
      ...common,
      stage: 'encoder',
      targets: options.encoder,
      makeClient: (a) => makeClient(stagesProto.EncoderClient, a, options.client),
      onFailover: failover('encoder'),
    });
    this.decoders = new ReplicaSet({
      ...common,
      stage: 'decoder',
      targets: options.decoders,
      makeClient: (a) => makeClient(stagesProto.DecoderClient, a, options.client),
      onFailover: failover('decoder'),
    });
    this.limiter = new Limiter(options.maxDecoderCalls);
  }

  get prompter(): PrompterPort {
    return this;
  }
  get encoder(): EncoderPort {
    return this;
  }
  get decoder(): DecoderPort {
    return this;
  }

  /** Resolves dns:/// replica names (and keeps them current). */
  async start(): Promise<void> {
    await Promise.all([this.prompters.start(), this.encoders.start(), this.decoders.start()]);
    for (const set of [this.prompters, this.encoders, this.decoders]) {
      if (set.addresses.length === 0) throw new Error(`no ${set.stage} replicas found`);
    }
  }

  close(): void {
    this.prompters.close();
    this.encoders.close();
    this.decoders.close();
  }

  stats(): GrpcStagesStats {
    const c = this.counters;
    return {
      prepares: c.prepares,
      decodes: c.decodes,
      reprepares: c.reprepares,
      reencodes: c.reencodes,
      failovers: { prompter: this.prompters.failovers, encoder: this.encoders.failovers, decoder: this.decoders.failovers },
      bytes: { tilesOut: c.tilesOut, featuresIn: c.featuresIn },
    };
  }

  private unaryOptions(call: StageCall, attributes: Record<string, string | number | boolean>) {
    return {
      deadline: call.deadline,
      timeoutMs: call.deadline ? undefined : this.options.defaultTimeoutMs,
      signal: call.signal,
      attributes,
    };
  }

  private tileInputs(tiles: readonly StageTile[]): stagesProto.TileInput[] {
    for (const t of tiles) this.counters.tilesOut += t.rgb.byteLength;
    return tiles.map((t) => ({ digest: t.digest, rgb: Buffer.from(t.rgb.buffer, t.rgb.byteOffset, t.rgb.byteLength) }));
  }

  // ---------------------------------------------------------------- prompter

  async detect(tiles: readonly StageTile[], call: StageCall): Promise<Map<string, stagesProto.TileDetections>> {
    const inputs = this.tileInputs(tiles);
    const response = await call.clock.time('prompter', () =>
      this.prompters
        .call(
          this.prompters.roundRobin(),
          (client, replica) =>
            unary(
              client,
              client.detect,
              { tiles: inputs, minForeground: 0, nmsRadius: 0, modelVersion: this.options.modelVersion },
              this.unaryOptions(call, {
                [SpanAttributes.tiles]: tiles.length,
                [SpanAttributes.digest]: tiles.map((t) => t.digest).join(','),
                'cfrsam.replica': replica,
              }),
            ),
          call,
        )
        .catch((err) => {
          throw stageError('prompter', err);
        }),
    );
    return new Map(response.tiles.map((t) => [t.digest, t]));
  }

  // ---------------------------------------------------------------- encoder

  async encode(tiles: readonly StageTile[], call: StageCall): Promise<{ cacheHits: number }> {
    const groups = new Map<string, { order: string[]; tiles: StageTile[] }>();
    for (const tile of tiles) {
      const order = this.encoders.orderFor(tile.digest);
      const group = groups.get(order[0]);
      if (group) group.tiles.push(tile);
      else groups.set(order[0], { order, tiles: [tile] });
    }
    const hits = await call.clock.time('encoder', () =>
      Promise.all(
        [...groups.values()].map((group) =>
          withSpan('gateway.encode', { [SpanAttributes.tiles]: group.tiles.length }, async (span) => {
            const inputs = this.tileInputs(group.tiles);
            const { res, replica } = await this.encoders
              .call(
                group.order,
                async (client, replica) => ({
                  replica,
                  res: await unary(
                    client,
                    client.encode,
                    { tiles: inputs, modelVersion: this.options.modelVersion, returnFeatures: false },
                    this.unaryOptions(call, {
                      [SpanAttributes.tiles]: group.tiles.length,
                      [SpanAttributes.digest]: group.tiles.map((t) => t.digest).join(','),
                      'cfrsam.replica': replica,
                    }),
                  ),
                }),
                call,
              )
              .catch((err) => {
                throw stageError('encoder', err);
              });
            for (const t of res.tiles) {
              this.encodedOn.set(t.digest, replica);
              this.counters.featuresIn += t.features?.data.byteLength ?? 0;
            }
            const n = res.tiles.filter((t) => t.cacheHit).length;
            serviceMetrics().cache('encoder_features', { hits: n, misses: res.tiles.length - n });
            span.setAttributes({ [SpanAttributes.cacheHit]: n === res.tiles.length, 'cfrsam.cache_hits': n });
            return n;
          }),
        ),
      ),
    );
    return { cacheHits: hits.reduce((a, b) => a + b, 0) };
  }

  // ---------------------------------------------------------------- decoder

  async decodeTile(tile: StageTile, prompts: readonly stagesProto.PromptPoints[], call: StageCall): Promise<stagesProto.DecodedMask[]> {
    if (prompts.length === 0) return [];
    const parallelism = tileParallelism(this.options.decodeParallelism, call.tilesInFlight?.() ?? 1);
    const batches = promptBatches(prompts, this.options.decodeBatchSize, parallelism);
    // A tile's batches go to its top-k replicas; each of them prepares the tile (decoder_image),
    // so spreading pays only when the gateway has fewer tiles in flight (over all requests) than
    // there are replicas to keep busy; under load the second decoder_image run is pure extra work.
    // Otherwise the tile goes to the less busy of its two rendezvous replicas (power of two
    // choices): affinity keeps prepared state reusable, the choice keeps replicas evenly loaded.
    const order = this.decodeOrder(tile, call);
    const results = await Promise.all(
      batches.map((batch, i) =>
        this.decoders
          .call(order(i), (_client, replica) => this.decodeOn(replica, tile, batch, call), call)
          .catch((err) => {
            throw stageError('decoder', err);
          }),
      ),
    );
    return results.flat();
  }

  /** Prepares the tile on the replica its first batch would go to now (see DecoderPort.prepareTile). */
  async prepareTile(tile: StageTile, call: StageCall): Promise<void> {
    const replica = this.decodeOrder(tile, call)(0).find((r) => !this.decoders.coolingDown(r));
    if (!replica || this.prepared.has(`${replica}|${tile.digest}`)) return;
    this.busy.set(replica, (this.busy.get(replica) ?? 0) + 1);
    try {
      await this.prepare(replica, tile, call, true);
    } finally {
      this.busy.set(replica, (this.busy.get(replica) ?? 1) - 1);
    }
  }

  /** The replica order for a tile's batch i (decodeTile's rule, shared with prepareTile). */
  private decodeOrder(tile: StageTile, call: StageCall): (batch: number) => string[] {
    const replicas = this.decoders.addresses.length;
    const inFlight = Math.max(1, call.tilesInFlight?.() ?? 1);
    const k = Math.max(1, Math.min(this.options.replicasPerTile, Math.ceil(replicas / inFlight)));
    if (k > 1) return (i) => this.decoders.spreadOrderFor(tile.digest, i, k);
    const order = this.leastBusyFirst(this.decoders.orderFor(tile.digest), tile.digest);
    return () => order;
  }

  /**
   * The order with one of its first two healthy replicas first: the one that holds the tile
   * prepared (or is preparing it) when only one does, else the less busy.
   */
  private leastBusyFirst(order: string[], digest: string): string[] {
    const healthy = order.filter((r) => !this.decoders.coolingDown(r));
    if (healthy.length < 2) return order;
    const [a, b] = healthy;
    const holds = (r: string) => this.prepared.has(`${r}|${digest}`) || this.preparing.has(`${r}|${digest}`);
    let first: string;
    if (holds(a) !== holds(b)) first = holds(a) ? a : b;
    else first = (this.busy.get(b) ?? 0) < (this.busy.get(a) ?? 0) ? b : a;
    return [first, ...order.filter((r) => r !== first)];
  }

  private async decodeOn(replica: string, tile: StageTile, batch: stagesProto.PromptPoints[], call: StageCall): Promise<stagesProto.DecodedMask[]> {
    const key = `${replica}|${tile.digest}`;
    this.busy.set(replica, (this.busy.get(replica) ?? 0) + 1);
    try {
      if (!this.prepared.has(key)) await this.prepare(replica, tile, call);
      const client = this.decoders.client(replica);
      for (let attempt = 0; ; attempt++) {
        try {
          const response = await this.limiter.run(
            () =>
              call.clock.time('decoder_decode', () =>
                unary(
                  client,
                  client.decode,
                  { digest: tile.digest, prompts: batch, modelVersion: this.options.modelVersion },
                  this.unaryOptions(call, {
                    [SpanAttributes.digest]: tile.digest,
                    [SpanAttributes.prompts]: batch.length,
                    [SpanAttributes.batchSize]: batch.length,
                    'cfrsam.replica': replica,
                  }),
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
          if (errorReason(err) === ErrorReason.NOT_PREPARED && attempt < 2) {
            // The replica evicted or lost the tile (restart, LRU): prepare it again and retry.
            this.prepared.delete(key);
            this.counters.reprepares++;
            await this.prepare(replica, tile, call);
            continue;
          }
          throw err;
        }
      }
    } catch (err) {
      if (isReplicaFailure(err)) this.prepared.delete(key);
      throw err;
    } finally {
      this.busy.set(replica, (this.busy.get(replica) ?? 1) - 1);
    }
  }

  /**
   * Prepare once per (replica, digest); concurrent batches wait for the same call. `withEncode`:
   * the tile's Encode is in flight (prepareTile), so the decoder's feature fetch may wait for it.
   */
  private async prepare(replica: string, tile: StageTile, call: StageCall, withEncode = false): Promise<void> {
    const key = `${replica}|${tile.digest}`;
    const joined = this.preparing.get(key);
    if (joined) {
      try {
        return await joined;
      } catch (err) {
        // The Prepare belonged to another request, which was cancelled or ran out of time: that
        // is no failure of this one, which prepares the tile itself.
        if (call.signal?.aborted || !isCallerGone(err)) throw err;
        if (this.preparing.get(key) === joined) this.preparing.delete(key);
        return this.prepare(replica, tile, call);
      }
    }
    let pending = this.preparing.get(key);
    if (!pending) {
      pending = (async () => {
        try {
          await this.prepareOnce(replica, tile, call, withEncode);
        } catch (err) {
          if (errorReason(err) !== ErrorReason.FEATURES_MISSING) throw err;
          // Evicted from every encoder and the shared tier: encode again (the tile's bytes are
          // here), then prepare.
          this.counters.reencodes++;
          await this.encode([tile], call);
          await this.prepareOnce(replica, tile, call);
        }
        this.prepared.add(key);
      })().finally(() => this.preparing.delete(key));
      this.preparing.set(key, pending);
    }
    return pending;
  }

  private async prepareOnce(replica: string, tile: StageTile, call: StageCall, withEncode = false): Promise<void> {
    const client = this.decoders.client(replica);
    const [input] = this.tileInputs([tile]);
    await this.limiter.run(
      () =>
        call.clock.time('decoder_prepare', () =>
          unary(
            client,
            client.prepare,
            {
              digest: tile.digest,
              rgb: input.rgb,
              // The encoder that encoded the tile, or (a Prepare sent with the Encode) the one the
              // Encode goes to: the decoder waits there for the tile's features.
              featuresFrom: this.encodedOn.get(tile.digest) ?? this.encoders.orderFor(tile.digest)[0] ?? '',
              // Only a Prepare sent with its Encode waits for the features; any other finds them
              // or reports FEATURES_MISSING at once (evicted everywhere: the gateway encodes again).
              featuresWaitMs: withEncode ? PREPARE_WITH_ENCODE_WAIT_MS : 0,
              modelVersion: this.options.modelVersion,
            },
            this.unaryOptions(call, { [SpanAttributes.digest]: tile.digest, 'cfrsam.replica': replica }),
          ),
        ),
      call.signal,
    );
    this.counters.prepares++;
  }
}

/** A failure caused by the calling request going away (its abort, or its deadline), not by the stage. */
function isCallerGone(err: unknown): boolean {
  const code = (err as { code?: unknown })?.code;
  return (err as Error)?.name === 'AbortError' || code === status.CANCELLED || code === status.DEADLINE_EXCEEDED;
}

/** A stage call failure with the stage named; the status code and error details are kept. */
export function stageError(stage: string, err: unknown): Error {
  if (err && typeof err === 'object' && typeof (err as ServiceError).code === 'number') {
    const e = err as ServiceError;
    if (String(e.details ?? '').startsWith(`${stage}:`) || String(e.details ?? '').startsWith(`no ${stage} replica`)) return e;
    return grpcError(e.code, `${stage}: ${e.details ?? e.message}`, errorDetailsOrEmpty(err));
  }
  return err instanceof Error ? err : new Error(String(err));
}

function errorDetailsOrEmpty(err: unknown) {
  const reason = errorReason(err);
  return reason ? { reason } : {};
}
