// Admission control of the gateway (pure logic: no transport, clock injectable). A request asks to
// run; it runs at once while fewer than the adaptive limit (adaptiveLimit.ts) are running, else it
// waits in its caller's queue. Queues are served round robin across callers (weighted), so one
// client sending a hundred requests does not starve another sending one. Before anything waits,
// the request is priced: its work in pixels at the model's resolution, the work ahead of it, and
// the throughput the stages delivered recently (pixels per second of busy time) give the time it
// would be answered; when that is past its deadline, it is refused at once with a retry delay
// instead of being started and abandoned. Per-identity limits (requests at once, pixels per
// second) refuse a caller over its share while the others are served.

export interface AdmissionClock {
  now(): number;
  /** Calls `fn` after `ms`; returns a function that cancels it. */
  setTimeout(fn: () => void, ms: number): () => void;
}

export const systemClock: AdmissionClock = {
  now: () => performance.timeOrigin + performance.now(),
  setTimeout: (fn, ms) => {
    const t = setTimeout(fn, Math.max(0, ms));
    t.unref?.();
    return () => clearTimeout(t);
  },
};

/** Why a request was refused (the pipeline maps each to a gRPC status). */
export type RejectionKind =
  /** Its deadline is shorter than the expected wait plus service time (RESOURCE_EXHAUSTED). */
  | 'deadline'
  /** Its caller already has maxConcurrentPerIdentity requests running or queued (RESOURCE_EXHAUSTED). */
  | 'identity_concurrency'
  /** Its caller is over pixelsPerSecondPerIdentity (RESOURCE_EXHAUSTED). */
  | 'identity_rate'
  /** maxQueue requests are waiting already (RESOURCE_EXHAUSTED). */
  | 'queue_full'
  /** It waited maxQueueWaitMs without being started (RESOURCE_EXHAUSTED). */
  | 'queue_timeout'
  /** Its deadline passed while it waited (DEADLINE_EXCEEDED). */
  | 'expired'
  /** Its caller went away while it waited (CANCELLED). */
  | 'cancelled'
  /** It is larger than the size its headers announced when its place was reserved (INVALID_ARGUMENT). */
  | 'misannounced';

export class AdmissionRejected extends Error {
  constructor(
    readonly kind: RejectionKind,
    message: string,
    /** When a retry has a chance (ms from now); absent for expired and cancelled requests. */
    readonly retryAfterMs?: number,
  ) {
    super(message);
    this.name = 'AdmissionRejected';
  }
}

export interface AdmissionRequest {
  /** The caller (callIdentity(call).id). */
  identity: string;
  /** Work of the request: pixels at the model's resolution. */
  pixels: number;
  /** Absolute deadline (clock ms), if the caller set one. */
  deadline?: number;
  /** Aborted when the caller goes away. */
  signal?: AbortSignal;
  /**
   * A reservation taken for this request when its headers arrived (reserve()): its checks are
   * done and its work is already counted, so it goes straight to the queue.
   */
  reservation?: string;
}

/**
 * A place held for a request priced from its headers before its body arrived (reserve()). Its
 * pixels count as work ahead of every later request until the request arrives (acquire() with
 * `reservation: id`) or the reservation is released.
 */
export interface AdmissionReservation {
  readonly id: string;
  readonly identity: string;
  readonly pixels: number;
  /** Gives the place up (the request failed, was cancelled or never came); idempotent. */
  release(): void;
}

export interface AdmissionTicket {
  /** ms the request waited in the queue. */
  readonly waitedMs: number;
  /**
   * Ends the request's run: `ok` answers count towards throughput and goodput; `dropped` marks a
   * failure that signals overload (the limit shrinks). Idempotent.
   */
  release(outcome: { ok: boolean; dropped?: boolean }): void;
}

/** What happened to requests, for metrics. */
export type AdmissionEvent =
  'admitted' | 'queued' | 'reserved' | 'rejected_early' | 'rejected_identity' | 'rejected_queue' | 'expired' | 'cancelled' | 'answered' | 'goodput';

export interface AdmissionOptions {
  /** The concurrency limit (shared with nothing else). */
  limit: {
    readonly limit: number;
    update(sample: { latencyMs: number; work: number; inFlight: number; queued?: number; dropped?: boolean }): number;
  };
  /** Requests waiting at most (default 1000). */
  maxQueue?: number;
  /** A request that waited this long without starting is refused (ms; default 60 000; 0: no bound). */
  maxQueueWaitMs?: number;
  /** Requests one identity may have running or queued (0: no limit). */
  maxConcurrentPerIdentity?: number;
  /** Pixels per second one identity may send (0: no limit); bursts of `burstSeconds` of it. */
  pixelsPerSecondPerIdentity?: number;
  /** Token bucket depth in seconds of pixelsPerSecondPerIdentity (default 1). */
  burstSeconds?: number;
  /** Throughput assumed before the first measurement (pixels/s; 0: no early rejection until measured). */
  initialPixelsPerSecond?: number;
  /** Weight of each sample in the throughput average: 1 - decay (default decay 0.8). */
  throughputDecay?: number;
  /**
   * Expected times are multiplied by this before a new request's deadline is compared with them
   * (default 1.2: single-request latency on the 2-core machine varied by about that much).
   * Requests already waiting are refused later only when the unscaled estimate says they will
   * miss: the margin at the door keeps such late refusals rare, and a request that has waited is
   * not refused on a margin.
   */
  safetyFactor?: number;
  /** Queue share of an identity per round (default 1 for all). */
  weightOf?: (identity: string) => number;
  clock?: AdmissionClock;
  onEvent?: (event: AdmissionEvent, identity: string) => void;
}

export interface AdmissionStats {
  limit: number;
  running: number;
  queued: number;
  /** Measured throughput (pixels per second of busy time); 0 before any. */
  pixelsPerSecond: number;
  identitiesQueued: number;
  /** Requests priced from their headers whose body has not arrived yet. */
  reserved: number;
}

/**
 * Throughput of the stages: pixels answered per ms of busy time (time with at least one request
 * running), averaged over recent answers with exponential decay. Busy time rather than wall time,
 * so idle periods do not read as a slow system.
 */
export class ThroughputEstimator {
  private running = 0;
  private last = 0;
  private busyMs = 0;
  private pixels = 0;
  private time = 0;

  constructor(
    private readonly priorPixelsPerMs: number,
    private readonly decay = 0.8,
  ) {}

  private advance(now: number): void {
    if (this.running > 0) this.busyMs += Math.max(0, now - this.last);
    this.last = now;
  }

  start(now: number): void {
    this.advance(now);
    this.running++;
  }

  /**
   * A request ended; `pixels` > 0 when it was answered. A failure adds no pixels; the busy time of a
   * stretch that served only failed work is dropped when the stages fall idle: it says nothing
   * about how fast they answer (a request abandoned after 8 s would otherwise be charged to the next
   * answer, and one 256 tile "taking" 8 s priced every later request far past its deadline, so
   * nothing was admitted to correct the figure). Failures beside answered work stay counted.
   */
  finish(now: number, pixels: number): void {
    this.advance(now);
    this.running = Math.max(0, this.running - 1);
    if (pixels > 0 && this.busyMs > 0) {
      this.pixels = this.pixels * this.decay + pixels;
      this.time = this.time * this.decay + this.busyMs;
      this.busyMs = 0;
    } else if (pixels <= 0 && this.running === 0) {
      this.busyMs = 0;
    }
  }

  /** Pixels per ms, or 0 when neither measured nor assumed. */
  pixelsPerMs(): number {
    return this.time > 0 ? this.pixels / this.time : this.priorPixelsPerMs;
  }
}

interface Waiter {
  request: AdmissionRequest;
  enqueuedAt: number;
  resolve(ticket: AdmissionTicket): void;
  reject(err: AdmissionRejected): void;
  cleanup(): void;
}

interface Running {
  identity: string;
  pixels: number;
  startedAt: number;
  /** The most requests running at once while it ran, itself included. */
  peakInFlight: number;
}

interface Bucket {
  tokens: number;
  updatedAt: number;
}

interface Reserved {
  identity: string;
  pixels: number;
  cancelTimer(): void;
}

const MIN_RETRY_MS = 100;

export class Admission {
  private readonly queues = new Map<string, Waiter[]>();
  /** Identities with waiting requests, in serving order (the next one first). */
  private readonly rotation: string[] = [];
  /** Requests the identity at the head of the rotation was given in its current turn. */
  private servedInTurn = 0;
  private readonly running = new Set<Running>();
  private readonly perIdentity = new Map<string, number>();
  private readonly buckets = new Map<string, Bucket>();
  private readonly throughput: ThroughputEstimator;
  private readonly clock: AdmissionClock;
  private queuedCount = 0;
  private readonly reserved = new Map<string, Reserved>();
  private reservedPixels = 0;
  private nextReservation = 1;

  constructor(private readonly options: AdmissionOptions) {
    this.clock = options.clock ?? systemClock;
    this.throughput = new ThroughputEstimator((options.initialPixelsPerSecond ?? 0) / 1000, options.throughputDecay ?? 0.8);
  }

  stats(): AdmissionStats {
    return {
      limit: this.options.limit.limit,
      running: this.running.size,
      queued: this.queuedCount,
      pixelsPerSecond: this.throughput.pixelsPerMs() * 1000,
      identitiesQueued: this.rotation.length,
      reserved: this.reserved.size,
    };
  }

  /** Runs `fn` once admitted; the outcome of `fn` is the request's outcome. */
  async run<T>(request: AdmissionRequest, fn: () => Promise<T>, isDropped: (err: unknown) => boolean = () => false): Promise<T> {
    const ticket = await this.acquire(request);
    try {
      const out = await fn();
      ticket.release({ ok: true });
      return out;
    } catch (err) {
      ticket.release({ ok: false, dropped: isDropped(err) });
      throw err;
    }
  }

  /** Resolves when the request may start; rejects with AdmissionRejected when it may not. */
  acquire(request: AdmissionRequest): Promise<AdmissionTicket> {
    const now = this.clock.now();
    const { identity } = request;
    if (request.signal?.aborted) return Promise.reject(new AdmissionRejected('cancelled', 'the caller went away before admission'));
    if (request.deadline !== undefined && request.deadline <= now) {
      this.emit('expired', identity);
      return Promise.reject(new AdmissionRejected('expired', 'the deadline passed before admission'));
    }
    const reservation = request.reservation ? this.takeReservation(request.reservation) : undefined;
    if (reservation) {
      // The announced size priced the request; a larger body would jump the queue estimates.
      if (request.pixels > reservation.pixels * 1.01 + 1) {
        this.refundRate({ ...request, pixels: reservation.pixels }, now);
        return Promise.reject(
          new AdmissionRejected(
            'misannounced',
            `the image is ${Math.round(request.pixels)} pixels at the model's resolution, more than the ${Math.round(reservation.pixels)} ` +
              `its x-image-size header announced; send the image's own size (or no x-image-size header)`,
          ),
        );
      }
    } else {
      const refused = this.checkIdentity(request, now) ?? this.checkDeadline(request, now);
      if (refused) return Promise.reject(refused);
      this.chargeRate(request, now);
    }
    if (this.queuedCount === 0 && this.running.size < this.options.limit.limit) {
      this.emit('admitted', identity);
      return Promise.resolve(this.start(request, now, now));
    }
    const maxQueue = this.options.maxQueue ?? 1000;
    if (this.queuedCount >= maxQueue) {
      this.refundRate(request, now);
      this.emit('rejected_queue', identity);
      return Promise.reject(
        new AdmissionRejected(
          'queue_full',
          `the gateway is busy: ${this.queuedCount} requests queued (limit ${maxQueue})`,
          this.retryAfter(this.workAhead(identity, now)),
        ),
      );
    }
    return this.enqueue(request, now);
  }

  /**
   * Prices a request from its headers, before its body has arrived, and holds its place: throws
   * AdmissionRejected when it would be refused (so the caller hears it at once, instead of after
   * uploading an image the gateway will not process), else returns the reservation its acquire()
   * names. A reservation not taken up by the deadline (or within maxQueueWaitMs) lapses.
   */
  reserve(request: AdmissionRequest): AdmissionReservation {
    const now = this.clock.now();
    const { identity, pixels } = request;
    if (request.deadline !== undefined && request.deadline <= now) {
      this.emit('expired', identity);
      throw new AdmissionRejected('expired', 'the deadline passed before admission');
    }
    const refused = this.checkIdentity(request, now) ?? this.checkDeadline(request, now);
    if (refused) throw refused;
    this.chargeRate(request, now);
    const id = `r${this.nextReservation++}`;
    const maxWait = this.options.maxQueueWaitMs ?? 60_000;
    const lapseMs = Math.min(request.deadline !== undefined ? request.deadline - now : Infinity, maxWait > 0 ? maxWait : Infinity);
    const cancelTimer = Number.isFinite(lapseMs) ? this.clock.setTimeout(() => release(), lapseMs) : () => {};
    this.reserved.set(id, { identity, pixels, cancelTimer });
    this.reservedPixels += pixels;
    this.perIdentity.set(identity, (this.perIdentity.get(identity) ?? 0) + 1);
    this.emit('reserved', identity);
    const release = () => {
      if (!this.takeReservation(id)) return;
      this.refundRate(request, this.clock.now());
    };
    return { id, identity, pixels, release };
  }

  /** Ends a reservation (taken up or released); undefined when it no longer exists. */
  private takeReservation(id: string): Reserved | undefined {
    const r = this.reserved.get(id);
    if (!r) return undefined;
    this.reserved.delete(id);
    r.cancelTimer();
    this.reservedPixels -= r.pixels;
    if (this.reserved.size === 0) this.reservedPixels = 0;
    this.decrementIdentity(r.identity);
    return r;
  }

  // --------------------------------------------------------------- refusals

  private checkIdentity(request: AdmissionRequest, now: number): AdmissionRejected | undefined {
    const { identity } = request;
    const maxConcurrent = this.options.maxConcurrentPerIdentity ?? 0;
    const active = this.perIdentity.get(identity) ?? 0;
    if (maxConcurrent > 0 && active >= maxConcurrent) {
      this.emit('rejected_identity', identity);
      return new AdmissionRejected(
        'identity_concurrency',
        `${identity} has ${active} requests running or queued (limit ${maxConcurrent} per caller); wait for one to finish`,
        this.retryAfter(this.earliestFinishOf(identity, now)),
      );
    }
    const pps = this.options.pixelsPerSecondPerIdentity ?? 0;
    if (pps > 0) {
      const bucket = this.bucket(identity, now);
      const need = Math.min(request.pixels, this.bucketCapacity());
      if (bucket.tokens < need) {
        this.emit('rejected_identity', identity);
        return new AdmissionRejected(
          'identity_rate',
          `${identity} is over its limit of ${pps} pixels per second (this request is ${request.pixels} pixels at the model's resolution)`,
          this.retryAfter(((need - bucket.tokens) / pps) * 1000),
        );
      }
    }
    return undefined;
  }

  /** Refuses a request that would be answered after its deadline (by the current estimates). */
  private checkDeadline(request: AdmissionRequest, now: number): AdmissionRejected | undefined {
    if (request.deadline === undefined) return undefined;
    const rate = this.throughput.pixelsPerMs();
    if (!(rate > 0)) return undefined;
    const aheadPixels = this.workAhead(request.identity, now);
    const expectedMs = ((aheadPixels + request.pixels) / rate) * (this.options.safetyFactor ?? 1.2);
    const remaining = request.deadline - now;
    if (expectedMs <= remaining) return undefined;
    this.emit('rejected_early', request.identity);
    return new AdmissionRejected(
      'deadline',
      `the gateway expects to answer in ${(expectedMs / 1000).toFixed(1)} s (${(aheadPixels / rate / 1000).toFixed(1)} s of queued work ahead, ` +
        `${request.pixels} pixels at ${Math.round(rate * 1000)} pixels/s), past the deadline in ${(remaining / 1000).toFixed(1)} s`,
      this.retryAfter(aheadPixels / rate),
    );
  }

  private retryAfter(ms: number | undefined): number {
    return Math.max(MIN_RETRY_MS, Math.ceil(ms ?? 1000));
  }

  // --------------------------------------------------------------- estimates

  /** Pixels still to process of the running requests (each progressing at its share of the rate). */
  private remainingRunning(now: number): { total: number; byIdentity: Map<string, number[]> } {
    const rate = this.throughput.pixelsPerMs();
    const share = rate / Math.max(1, this.running.size);
    let total = 0;
    const byIdentity = new Map<string, number[]>();
    for (const r of this.running) {
      const left = Math.max(0, r.pixels - (now - r.startedAt) * share);
      total += left;
      const list = byIdentity.get(r.identity) ?? [];
      list.push(left);
      byIdentity.set(r.identity, list);
    }
    return { total, byIdentity };
  }

  /**
   * Pixels served before a new request of `identity`: what runs now, plus what round robin puts
   * ahead of it (its own queue, and from every other queue as many turns as it waits).
   */
  private workAhead(identity: string, now: number): number {
    // Reserved requests arrived first (their headers did); their bodies are on the way.
    let ahead = this.remainingRunning(now).total + this.reservedPixels;
    const own = this.queues.get(identity) ?? [];
    const turns = Math.floor(own.length / this.weight(identity)) + 1;
    for (const w of own) ahead += w.request.pixels;
    for (const [other, queue] of this.queues) {
      if (other === identity) continue;
      const n = Math.min(queue.length, turns * this.weight(other));
      for (let i = 0; i < n; i++) ahead += queue[i].request.pixels;
    }
    return ahead;
  }

  /** ms until the identity's first running request is expected to finish (undefined if none runs). */
  private earliestFinishOf(identity: string, now: number): number | undefined {
    const left = this.remainingRunning(now).byIdentity.get(identity);
    const rate = this.throughput.pixelsPerMs();
    if (!left || !(rate > 0)) return undefined;
    return (Math.min(...left) / rate) * Math.max(1, this.running.size);
  }

  private weight(identity: string): number {
    return Math.max(1, Math.floor(this.options.weightOf?.(identity) ?? 1));
  }

  // --------------------------------------------------------------- per-identity rate

  private bucketCapacity(): number {
    return (this.options.pixelsPerSecondPerIdentity ?? 0) * (this.options.burstSeconds ?? 1);
  }

  private bucket(identity: string, now: number): Bucket {
    const pps = this.options.pixelsPerSecondPerIdentity ?? 0;
    let b = this.buckets.get(identity);
    if (!b) {
      b = { tokens: this.bucketCapacity(), updatedAt: now };
      this.buckets.set(identity, b);
    }
    b.tokens = Math.min(this.bucketCapacity(), b.tokens + ((now - b.updatedAt) * pps) / 1000);
    b.updatedAt = now;
    // Full buckets carry no information: forget them so the map holds only recent callers.
    if (b.tokens >= this.bucketCapacity() && this.buckets.size > 10_000) this.buckets.delete(identity);
    return b;
  }

  /** Takes the request's pixels (a request larger than the bucket leaves it in debt). */
  private chargeRate(request: AdmissionRequest, now: number): void {
    if (!((this.options.pixelsPerSecondPerIdentity ?? 0) > 0)) return;
    const b = this.bucket(request.identity, now);
    b.tokens -= request.pixels;
    this.buckets.set(request.identity, b);
  }

  /** Gives back the pixels of a request that never ran. */
  private refundRate(request: AdmissionRequest, now: number): void {
    if (!((this.options.pixelsPerSecondPerIdentity ?? 0) > 0)) return;
    const b = this.bucket(request.identity, now);
    b.tokens = Math.min(this.bucketCapacity(), b.tokens + request.pixels);
  }

  // --------------------------------------------------------------- queue

  private enqueue(request: AdmissionRequest, now: number): Promise<AdmissionTicket> {
    const { identity } = request;
    return new Promise<AdmissionTicket>((resolve, reject) => {
      const cancels: Array<() => void> = [];
      const waiter: Waiter = {
        request,
        enqueuedAt: now,
        resolve,
        reject,
        cleanup: () => {
          for (const c of cancels.splice(0)) c();
        },
      };
      const drop = (kind: RejectionKind, event: AdmissionEvent, message: string, retryAfterMs?: number) => {
        if (!this.remove(waiter)) return;
        this.refundRate(request, this.clock.now());
        this.emit(event, identity);
        reject(new AdmissionRejected(kind, message, retryAfterMs));
      };
      if (request.deadline !== undefined) {
        cancels.push(this.clock.setTimeout(() => drop('expired', 'expired', 'the deadline passed while the request waited'), request.deadline - now));
      }
      const maxWait = this.options.maxQueueWaitMs ?? 60_000;
      if (maxWait > 0) {
        cancels.push(
          this.clock.setTimeout(
            () =>
              drop(
                'queue_timeout',
                'rejected_queue',
                `the request waited ${Math.round(maxWait / 1000)} s in the queue without starting`,
                this.retryAfter(this.workAhead(identity, this.clock.now()) / Math.max(1e-9, this.throughput.pixelsPerMs())),
              ),
            maxWait,
          ),
        );
      }
      if (request.signal) {
        const onAbort = () => drop('cancelled', 'cancelled', 'the caller went away while the request waited');
        request.signal.addEventListener('abort', onAbort, { once: true });
        cancels.push(() => request.signal?.removeEventListener('abort', onAbort));
      }
      let queue = this.queues.get(identity);
      if (!queue) {
        queue = [];
        this.queues.set(identity, queue);
        this.rotation.push(identity);
      }
      queue.push(waiter);
      this.queuedCount++;
      this.perIdentity.set(identity, (this.perIdentity.get(identity) ?? 0) + 1);
      this.emit('queued', identity);
    });
  }

  /** Takes a waiter out of its queue; false when it is no longer queued. */
  private remove(waiter: Waiter): boolean {
    const identity = waiter.request.identity;
    const queue = this.queues.get(identity);
    const i = queue ? queue.indexOf(waiter) : -1;
    if (!queue || i < 0) return false;
    queue.splice(i, 1);
    waiter.cleanup();
    this.queuedCount--;
    this.decrementIdentity(identity);
    if (queue.length === 0) this.dropFromRotation(identity);
    return true;
  }

  private dropFromRotation(identity: string): void {
    this.queues.delete(identity);
    const r = this.rotation.indexOf(identity);
    if (r >= 0) {
      this.rotation.splice(r, 1);
      if (r === 0) this.servedInTurn = 0;
    }
  }

  /** The next waiter in weighted round robin order, taken out of its queue. */
  private next(): Waiter | undefined {
    while (this.rotation.length > 0) {
      const identity = this.rotation[0];
      const queue = this.queues.get(identity);
      if (!queue || queue.length === 0) {
        this.dropFromRotation(identity);
        continue;
      }
      const waiter = queue.shift()!;
      this.queuedCount--;
      this.servedInTurn++;
      if (queue.length === 0) this.dropFromRotation(identity);
      else if (this.servedInTurn >= this.weight(identity)) {
        this.rotation.push(this.rotation.shift()!);
        this.servedInTurn = 0;
      }
      waiter.cleanup();
      return waiter;
    }
    return undefined;
  }

  /** The waiters in the order round robin will serve them (without changing any queue). */
  private servingOrder(): Waiter[] {
    const cursors = this.rotation.map((identity) => ({ identity, queue: this.queues.get(identity) ?? [], next: 0 }));
    const order: Waiter[] = [];
    let first = true;
    while (cursors.some((c) => c.next < c.queue.length)) {
      for (const c of cursors) {
        // The head identity may already have used part of its turn.
        const turn = this.weight(c.identity) - (first && c === cursors[0] ? this.servedInTurn : 0);
        for (let i = 0; i < turn && c.next < c.queue.length; i++) order.push(c.queue[c.next++]);
      }
      first = false;
    }
    return order;
  }

  /**
   * Refuses, now, the waiting requests that by the current estimates would be answered after their
   * deadline (the throughput was unknown when they arrived, or the stages slowed down), instead of
   * letting them wait until they expire: they get RESOURCE_EXHAUSTED with a retry delay while a
   * retry can still succeed.
   */
  private shed(): void {
    const rate = this.throughput.pixelsPerMs();
    if (!(rate > 0) || this.queuedCount === 0) return;
    const now = this.clock.now();
    let ahead = this.remainingRunning(now).total;
    const refused: { waiter: Waiter; ahead: number; expectedMs: number }[] = [];
    for (const waiter of this.servingOrder()) {
      const { request } = waiter;
      const expectedMs = (ahead + request.pixels) / rate;
      if (request.deadline !== undefined && expectedMs > request.deadline - now) refused.push({ waiter, ahead, expectedMs });
      else ahead += request.pixels;
    }
    for (const { waiter, ahead: before, expectedMs } of refused) {
      if (!this.remove(waiter)) continue;
      this.refundRate(waiter.request, now);
      this.emit('rejected_early', waiter.request.identity);
      waiter.reject(
        new AdmissionRejected(
          'deadline',
          `after waiting ${((now - waiter.enqueuedAt) / 1000).toFixed(1)} s the request is expected to be answered in ` +
            `${(expectedMs / 1000).toFixed(1)} s, after its deadline in ${((waiter.request.deadline! - now) / 1000).toFixed(1)} s`,
          this.retryAfter(before / rate),
        ),
      );
    }
  }

  /** Starts waiting requests while the limit allows. */
  private pump(): void {
    while (this.running.size < this.options.limit.limit) {
      const waiter = this.next();
      if (!waiter) return;
      const now = this.clock.now();
      const { request } = waiter;
      this.decrementIdentity(request.identity);
      // Its deadline may have become unreachable while it waited (the stages slowed down): even
      // alone at the full measured rate it would not finish, so it is refused before any work.
      const rate = this.throughput.pixelsPerMs();
      if (request.deadline !== undefined && rate > 0 && request.pixels / rate > request.deadline - now) {
        this.refundRate(request, now);
        this.emit('rejected_early', request.identity);
        waiter.reject(
          new AdmissionRejected(
            'deadline',
            `after waiting ${((now - waiter.enqueuedAt) / 1000).toFixed(1)} s the request cannot be answered before its deadline`,
            this.retryAfter(this.remainingRunning(now).total / rate),
          ),
        );
        continue;
      }
      waiter.resolve(this.start(request, waiter.enqueuedAt, now));
    }
  }

  private decrementIdentity(identity: string): void {
    const n = (this.perIdentity.get(identity) ?? 1) - 1;
    if (n <= 0) this.perIdentity.delete(identity);
    else this.perIdentity.set(identity, n);
  }

  private start(request: AdmissionRequest, enqueuedAt: number, now: number): AdmissionTicket {
    const run: Running = { identity: request.identity, pixels: request.pixels, startedAt: now, peakInFlight: this.running.size + 1 };
    this.running.add(run);
    // A request that started alone and shared the cores later ran as one of several: its latency
    // sample counts at that concurrency.
    for (const other of this.running) other.peakInFlight = Math.max(other.peakInFlight, this.running.size);
    this.perIdentity.set(request.identity, (this.perIdentity.get(request.identity) ?? 0) + 1);
    this.throughput.start(now);
    let released = false;
    return {
      waitedMs: now - enqueuedAt,
      release: ({ ok, dropped }) => {
        if (released) return;
        released = true;
        const end = this.clock.now();
        this.running.delete(run);
        this.decrementIdentity(request.identity);
        this.throughput.finish(end, ok ? request.pixels : 0);
        // A failure says nothing about latency (bad input fails fast), unless it signals overload.
        if (ok || dropped) {
          this.options.limit.update({
            latencyMs: end - now,
            work: request.pixels,
            inFlight: run.peakInFlight,
            queued: this.queuedCount,
            dropped: dropped ?? false,
          });
        }
        if (ok) {
          this.emit('answered', request.identity);
          if (request.deadline === undefined || end <= request.deadline) this.emit('goodput', request.identity);
        }
        this.pump();
        this.shed();
      },
    };
  }

  private emit(event: AdmissionEvent, identity: string): void {
    this.options.onEvent?.(event, identity);
  }
}
