// An adaptive concurrency limit (AIMD on measured latency, in the manner of Netflix's
// concurrency-limits and Envoy's adaptive concurrency filter): how many requests the gateway runs
// at once is learnt from how long they take, not fixed. Requests differ in size by orders of
// magnitude, so latency is compared per unit of work (ms per pixel): a sample slower than
// `tolerance` times the best recent one means the stages are oversubscribed (requests share the
// cores and each one takes longer) and the limit shrinks multiplicatively; a fast sample taken
// while the limit was in full use lets it grow by one per round of `limit` samples. No npm library
// does this for Node (the maintained limiters, p-limit and the like, take a fixed number).
//
// A slower sample is no congestion when running that many at once still pays: when c requests at
// once deliver at least `minThroughputGain` more pixels per second than c - 1 did (the recent mean
// latency per pixel at c times (c - 1) against the one at c - 1 times c; means, not the best: a
// level probed now and then has few samples, and its best against the other's would be biased).
// A lone small request leaves cores idle (a 256 tile keeps 1.5 of 2 busy: its stages wait on each
// other), so two at once are each 1.6x slower yet a quarter more tiles per second
// (bench/admission-throughput.mjs); a large image already fills the cores, and a second one only
// doubles both latencies.

export interface AdaptiveLimitOptions {
  /** Limit before any sample (default 1: the first request runs alone, at its single-request latency). */
  initial?: number;
  /** Lower bound (default 1). */
  min?: number;
  /** Upper bound (default 64). */
  max?: number;
  /** A sample slower than tolerance x the baseline counts as congestion (default 1.5). */
  tolerance?: number;
  /** Multiplicative decrease on congestion or a dropped request (default 0.75). */
  backoff?: number;
  /**
   * How fast the baseline (the best latency per unit of work) may rise per sample, so that a
   * machine that became slower for good is learnt (default 0.001: doubling takes ~700 samples).
   * A window minimum would forget the uncongested latency after a window of congested samples and
   * let the limit creep up.
   */
  baselineDrift?: number;
  /**
   * After congestion at a limit, growth back to that limit waits this many samples (default 20),
   * as TCP's slow-start threshold does: on CPU stages one more request at once only makes every
   * request slower, and re-probing it on every round of a queue made each burst's first answer
   * share the cores with a second request (1.76x the single latency in one run).
   */
  reprobeAfter?: number;
  /**
   * The throughput gain (fraction) that one more request at once must bring for a slower sample
   * not to count as congestion (default 0.15; Infinity: latency alone decides).
   */
  minThroughputGain?: number;
}

export interface LimitSample {
  /** Service time of the request (ms, from start of work to the answer). */
  latencyMs: number;
  /** Its work (pixels); latency is compared per unit of work. */
  work: number;
  /** The most requests running at once while it ran, itself included. */
  inFlight: number;
  /**
   * Requests waiting for admission when it finished (undefined: unknown, taken as some). With none
   * waiting the limit did not hold anyone back, so its answer earns no growth.
   */
  queued?: number;
  /** It failed for a reason that signals overload (a stage timed out or was exhausted). */
  dropped?: boolean;
}

export class AdaptiveLimit {
  private value: number;
  private readonly min: number;
  private readonly max: number;
  private readonly tolerance: number;
  private readonly backoff: number;
  private readonly drift: number;
  private best: number | undefined;
  /** Recent mean latency per unit of work of samples that ran with (at most) n requests at once, by n. */
  private readonly meanAt = new Map<number, number>();
  private readonly minThroughputGain: number;
  private readonly reprobeAfter: number;
  /** The limit at which congestion was last seen (Infinity: never). */
  private congestedAt = Infinity;
  private samplesSinceCongestion = 0;

  constructor(options: AdaptiveLimitOptions = {}) {
    this.min = Math.max(1, options.min ?? 1);
    this.max = Math.max(this.min, options.max ?? 64);
    this.value = clamp(options.initial ?? 1, this.min, this.max);
    this.tolerance = Math.max(1, options.tolerance ?? 1.5);
    this.backoff = clamp(options.backoff ?? 0.75, 0.1, 0.99);
    this.drift = clamp(options.baselineDrift ?? 0.001, 0, 1);
    this.reprobeAfter = Math.max(0, options.reprobeAfter ?? 20);
    this.minThroughputGain = Math.max(0, options.minThroughputGain ?? 0.15);
  }

  /** Requests that may run at once now. */
  get limit(): number {
    return Math.floor(this.value);
  }

  /** The best recent latency per unit of work (ms per pixel), or undefined before any sample. */
  get baseline(): number | undefined {
    return this.best;
  }

  /** Feeds one finished request; returns the new limit. */
  update(sample: LimitSample): number {
    if (sample.dropped) {
      this.congested();
      return this.limit;
    }
    if (!(sample.work > 0) || !(sample.latencyMs >= 0)) return this.limit;
    // Ran with more at once than the limit allows now: admitted before the last decrease, whose
    // cause it shares. Counted again, the samples of one congested round would cut the limit
    // once each (3 -> 2 -> 1 from one probe of 3; bench/admission-throughput.mjs).
    if (sample.inFlight > this.limit) return this.limit;
    const perUnit = sample.latencyMs / sample.work;
    const baseline = this.best === undefined ? perUnit : Math.min(perUnit, this.best * (1 + this.drift));
    this.best = baseline;
    const n = Math.max(1, Math.floor(sample.inFlight));
    const previous = this.meanAt.get(n);
    const mean = previous === undefined ? perUnit : previous + MEAN_WEIGHT * (perUnit - previous);
    this.meanAt.set(n, mean);
    const below = this.meanAt.get(n - 1);
    // n at once pay when they deliver (1 + gain) x the pixels per second of n - 1 at once.
    const pays = below !== undefined && mean * (n - 1) * (1 + this.minThroughputGain) <= n * below;
    // At the floor, a request that ran alone has nothing to shrink and says nothing about two at
    // once: counted as congestion, its noise (a lone tile's latency varies 1.5x) would keep
    // deferring the next probe.
    const congestion = perUnit > this.tolerance * baseline && !pays && (n > 1 || this.limit > this.min);
    if (congestion) {
      this.congested();
    } else if (sample.inFlight >= this.limit && (sample.queued ?? 1) > 0) {
      // Only a limit in full use, with demand waiting behind it, earns more: answers to requests
      // sent one after another say nothing about what one more concurrent request would cost
      // (learning 2 from them made a later burst start with two large images sharing the cores).
      this.samplesSinceCongestion++;
      let next = Math.min(this.max, this.value + 1 / Math.max(1, this.limit));
      // The limit that was congested is probed again only after reprobeAfter samples.
      if (Math.floor(next) >= this.congestedAt && this.samplesSinceCongestion < this.reprobeAfter) {
        next = Math.max(this.value, Math.min(next, this.congestedAt - 1e-6));
      }
      this.value = next;
    }
    return this.limit;
  }

  private congested(): void {
    this.congestedAt = Math.max(this.min + 1, Math.floor(this.value));
    this.samplesSinceCongestion = 0;
    this.value = Math.max(this.min, this.value * this.backoff);
  }
}

/** Weight of a new sample in its level's mean (about the last 5 samples). */
const MEAN_WEIGHT = 0.2;

function clamp(x: number, lo: number, hi: number): number {
  return Math.min(hi, Math.max(lo, x));
}
