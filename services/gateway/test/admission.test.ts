// Admission control and the adaptive limit as pure logic, on a fake clock: the limit grows while
// latency per pixel holds and shrinks when it climbs; requests beyond the limit wait in arrival
// order per caller and are served round robin across callers; a request whose deadline cannot be
// met is refused at once with a retry delay; per-caller limits refuse one caller while another is
// served; waiting requests expire, time out and are cancelled without ever starting.
import { describe, expect, it } from 'vitest';
import { AdaptiveLimit } from '../src/admission/adaptiveLimit';
import { Admission, AdmissionRejected, type AdmissionClock, type AdmissionEvent, type AdmissionTicket } from '../src/admission/admission';

class FakeClock implements AdmissionClock {
  t = 1_000_000;
  private timers: { at: number; fn: () => void; live: boolean }[] = [];
  now(): number {
    return this.t;
  }
  setTimeout(fn: () => void, ms: number): () => void {
    const timer = { at: this.t + Math.max(0, ms), fn, live: true };
    this.timers.push(timer);
    return () => (timer.live = false);
  }
  advance(ms: number): void {
    const end = this.t + ms;
    for (;;) {
      const due = this.timers.filter((x) => x.live && x.at <= end).sort((a, b) => a.at - b.at)[0];
      if (!due) break;
      this.t = due.at;
      due.live = false;
      due.fn();
    }
    this.t = end;
  }
}

/** A limit that stays where it is put (the queue logic is tested apart from adaptation). */
function fixedLimit(n: number) {
  return { limit: n, update: () => n };
}

async function settle(): Promise<void> {
  for (let i = 0; i < 5; i++) await Promise.resolve();
}

/** Tracks which of the promises have resolved or rejected. */
function track(p: Promise<AdmissionTicket>) {
  const state: { ticket?: AdmissionTicket; error?: AdmissionRejected } = {};
  p.then(
    (t) => (state.ticket = t),
    (e: AdmissionRejected) => (state.error = e),
  );
  return state;
}

const MPX = 1_000_000;

describe('AdaptiveLimit', () => {
  it('grows by about one per round while the limit is in use and latency per pixel holds', () => {
    const limit = new AdaptiveLimit({ initial: 1, max: 10 });
    expect(limit.limit).toBe(1);
    limit.update({ latencyMs: 1000, work: MPX, inFlight: 1 });
    expect(limit.limit).toBe(2);
    limit.update({ latencyMs: 1000, work: MPX, inFlight: 2 });
    limit.update({ latencyMs: 1000, work: MPX, inFlight: 2 });
    expect(limit.limit).toBe(3);
  });

  it('does not grow while nothing waits behind the limit (requests sent one after another)', () => {
    const limit = new AdaptiveLimit({ initial: 1 });
    for (let i = 0; i < 10; i++) limit.update({ latencyMs: 1000, work: MPX, inFlight: 1, queued: 0 });
    expect(limit.limit).toBe(1);
    limit.update({ latencyMs: 1000, work: MPX, inFlight: 1, queued: 5 });
    expect(limit.limit).toBe(2);
  });

  it('does not grow on samples taken while the limit was not in use', () => {
    const limit = new AdaptiveLimit({ initial: 3 });
    for (let i = 0; i < 10; i++) limit.update({ latencyMs: 1000, work: MPX, inFlight: 1 });
    expect(limit.limit).toBe(3);
  });

  it('compares latency per pixel, so a large image is no congestion signal', () => {
    const limit = new AdaptiveLimit({ initial: 2 });
    limit.update({ latencyMs: 1000, work: MPX, inFlight: 2 });
    const before = limit.limit;
    limit.update({ latencyMs: 4000, work: 4 * MPX, inFlight: 2 });
    expect(limit.limit).toBeGreaterThanOrEqual(before);
  });

  it('shrinks multiplicatively when latency per pixel climbs past the tolerance, never below min', () => {
    const limit = new AdaptiveLimit({ initial: 8, tolerance: 1.5, backoff: 0.5, min: 2 });
    limit.update({ latencyMs: 1000, work: MPX, inFlight: 8 });
    const grown = limit.limit;
    limit.update({ latencyMs: 3000, work: MPX, inFlight: 8 });
    expect(limit.limit).toBe(Math.floor(grown * 0.5));
    for (let i = 0; i < 10; i++) limit.update({ latencyMs: 5000, work: MPX, inFlight: limit.limit });
    expect(limit.limit).toBe(2);
  });

  it('at the floor, a slow request that ran alone does not defer the next probe', () => {
    const limit = new AdaptiveLimit({ initial: 1, tolerance: 1.25, reprobeAfter: 3 });
    limit.update({ latencyMs: 1000, work: MPX, inFlight: 1 });
    limit.update({ latencyMs: 2000, work: MPX, inFlight: 2 }); // two at once, no throughput gained
    expect(limit.limit).toBe(1);
    for (let i = 0; i < 3; i++) limit.update({ latencyMs: i === 1 ? 1400 : 1000, work: MPX, inFlight: 1 }); // one slow alone
    expect(limit.limit).toBe(2);
  });

  it('a sample admitted before a decrease does not cut the limit again', () => {
    const limit = new AdaptiveLimit({ initial: 4, tolerance: 1.5, backoff: 0.5 });
    limit.update({ latencyMs: 1000, work: MPX, inFlight: 4 });
    limit.update({ latencyMs: 3000, work: MPX, inFlight: 4 });
    expect(limit.limit).toBe(2);
    for (let i = 0; i < 3; i++) limit.update({ latencyMs: 3000, work: MPX, inFlight: 4 }); // the same congested round
    expect(limit.limit).toBe(2);
    limit.update({ latencyMs: 3000, work: MPX, inFlight: 2 }); // admitted under the new limit, still slow
    expect(limit.limit).toBe(1);
  });

  it('shrinks on a dropped request', () => {
    const limit = new AdaptiveLimit({ initial: 4, backoff: 0.5 });
    limit.update({ latencyMs: 0, work: 0, inFlight: 4, dropped: true });
    expect(limit.limit).toBe(2);
  });

  it('after congestion at a limit, probes that limit again only after reprobeAfter samples', () => {
    const limit = new AdaptiveLimit({ initial: 1, tolerance: 1.5, reprobeAfter: 5 });
    limit.update({ latencyMs: 1000, work: MPX, inFlight: 1 });
    expect(limit.limit).toBe(2);
    limit.update({ latencyMs: 2000, work: MPX, inFlight: 2 }); // two at once: each 2x slower
    expect(limit.limit).toBe(1);
    for (let i = 0; i < 4; i++) {
      limit.update({ latencyMs: 1000, work: MPX, inFlight: 1 });
      expect(limit.limit).toBe(1);
    }
    limit.update({ latencyMs: 1000, work: MPX, inFlight: 1 });
    expect(limit.limit).toBe(2);
  });

  it('finds the concurrency where requests stop sharing the machine for free', () => {
    // A machine that runs 2 requests in parallel at full speed; beyond that they share it.
    // With tolerance 1.5 the limit may reach 3 (1.5x slower), never 5 (2.5x slower).
    const limit = new AdaptiveLimit({ initial: 1, max: 32, tolerance: 1.5 });
    const seen: number[] = [];
    for (let i = 0; i < 200; i++) {
      const n = limit.limit;
      limit.update({ latencyMs: 1000 * Math.max(1, n / 2), work: MPX, inFlight: n });
      if (i >= 20) seen.push(limit.limit);
    }
    expect(Math.min(...seen)).toBeGreaterThanOrEqual(2);
    expect(Math.max(...seen)).toBeLessThanOrEqual(4);
  });

  it('runs more at once while that delivers more pixels per second, even when each is slower', () => {
    // A lone request keeps 1.5 of 2 cores busy: two at once are each 1.5x slower (4/3 the
    // throughput), three share the cores for nothing more (each 2.25x).
    const run = (options: ConstructorParameters<typeof AdaptiveLimit>[0]) => {
      const limit = new AdaptiveLimit({ initial: 1, max: 8, tolerance: 1.25, ...options });
      const seen: number[] = [];
      for (let i = 0; i < 200; i++) {
        const n = limit.limit;
        limit.update({ latencyMs: 1000 * Math.max(1, 0.75 * n), work: MPX, inFlight: n });
        if (i >= 20) seen.push(limit.limit);
      }
      return seen;
    };
    const paying = run({});
    expect(Math.min(...paying)).toBe(2); // never back to one at a time
    expect(Math.max(...paying)).toBe(3); // three probed now and then, never kept
    expect(paying.filter((n) => n === 2).length).toBeGreaterThan(0.8 * paying.length);
    // Latency alone (the rule before): each request 1.5x slower at two is congestion, so one at a time.
    expect(new Set(run({ minThroughputGain: Infinity }))).toEqual(new Set([1, 2]));
  });

  it('a second request that only shares a full machine is congestion (no throughput gained)', () => {
    const limit = new AdaptiveLimit({ initial: 1, tolerance: 1.25 });
    limit.update({ latencyMs: 1000, work: MPX, inFlight: 1 });
    expect(limit.limit).toBe(2);
    limit.update({ latencyMs: 1800, work: MPX, inFlight: 2 }); // 1.11x the throughput: below the 1.15 bar
    expect(limit.limit).toBe(1);
  });
});

describe('Admission', () => {
  function make(options: Partial<ConstructorParameters<typeof Admission>[0]> = {}) {
    const clock = new FakeClock();
    const events: [AdmissionEvent, string][] = [];
    const admission = new Admission({ limit: fixedLimit(1), clock, onEvent: (e, id) => events.push([e, id]), ...options });
    return { clock, admission, events };
  }

  it('starts requests up to the limit and queues the rest in arrival order', async () => {
    const { admission } = make({ limit: fixedLimit(2) });
    const a = track(admission.acquire({ identity: 'x', pixels: MPX }));
    const b = track(admission.acquire({ identity: 'x', pixels: MPX }));
    const c = track(admission.acquire({ identity: 'x', pixels: MPX }));
    const d = track(admission.acquire({ identity: 'x', pixels: MPX }));
    await settle();
    expect([!!a.ticket, !!b.ticket, !!c.ticket, !!d.ticket]).toEqual([true, true, false, false]);
    expect(admission.stats()).toMatchObject({ running: 2, queued: 2 });
    a.ticket!.release({ ok: true });
    await settle();
    expect(!!c.ticket && !d.ticket).toBe(true);
  });

  it('serves callers round robin: one caller with many requests does not starve another with one', async () => {
    const { admission } = make();
    const first = track(admission.acquire({ identity: 'heavy', pixels: MPX }));
    const heavy = Array.from({ length: 5 }, () => track(admission.acquire({ identity: 'heavy', pixels: MPX })));
    const light = track(admission.acquire({ identity: 'light', pixels: MPX }));
    await settle();
    first.ticket!.release({ ok: true });
    await settle();
    // heavy's second request had waited first, so it goes; then light's, before heavy's third.
    expect(!!heavy[0].ticket && !light.ticket).toBe(true);
    heavy[0].ticket!.release({ ok: true });
    await settle();
    expect(!!light.ticket && !heavy[1].ticket).toBe(true);
  });

  it('weights: a caller of weight 2 gets two turns per round', async () => {
    const { admission } = make({ weightOf: (id) => (id === 'gold' ? 2 : 1) });
    const first = track(admission.acquire({ identity: 'x', pixels: 1 }));
    const gold = Array.from({ length: 4 }, () => track(admission.acquire({ identity: 'gold', pixels: 1 })));
    const plain = Array.from({ length: 4 }, () => track(admission.acquire({ identity: 'plain', pixels: 1 })));
    await settle();
    const order: string[] = [];
    let current = first.ticket!;
    for (let i = 0; i < 6; i++) {
      current.release({ ok: true });
      await settle();
      const g = gold.find((s) => s.ticket && !order.includes(`g${gold.indexOf(s)}`));
      const p = plain.find((s) => s.ticket && !order.includes(`p${plain.indexOf(s)}`));
      if (g) {
        order.push(`g${gold.indexOf(g)}`);
        current = g.ticket!;
      } else {
        order.push(`p${plain.indexOf(p!)}`);
        current = p!.ticket!;
      }
    }
    expect(order).toEqual(['g0', 'g1', 'p0', 'g2', 'g3', 'p1']);
  });

  it('refuses at once a request whose deadline is shorter than the expected wait plus service time', async () => {
    // Measured: 1 Mpx answered in 1 s of busy time.
    const { admission, clock, events } = make();
    const warm = await admission.acquire({ identity: 'x', pixels: MPX });
    clock.advance(1000);
    warm.release({ ok: true });
    expect(admission.stats().pixelsPerSecond).toBeCloseTo(MPX, -3);

    const running = await admission.acquire({ identity: 'a', pixels: MPX });
    const queued = track(admission.acquire({ identity: 'b', pixels: MPX, deadline: clock.now() + 2500 }));
    await settle();
    expect(queued.ticket ?? queued.error).toBeUndefined(); // 1 s ahead + 1 s of its own < 2.5 s: it waits
    // Two requests ahead now (1 s each), 1 s of its own: 3 s > 2.5 s.
    const refused = admission.acquire({ identity: 'c', pixels: MPX, deadline: clock.now() + 2500 });
    const err = await refused.catch((e: AdmissionRejected) => e);
    expect(err).toBeInstanceOf(AdmissionRejected);
    expect((err as AdmissionRejected).kind).toBe('deadline');
    expect((err as AdmissionRejected).retryAfterMs).toBeGreaterThanOrEqual(1900);
    expect((err as AdmissionRejected).retryAfterMs).toBeLessThanOrEqual(2100);
    expect(events.filter(([e]) => e === 'rejected_early')).toHaveLength(1);
    // With a longer deadline the same request waits instead.
    const patient = track(admission.acquire({ identity: 'c', pixels: MPX, deadline: clock.now() + 4000 }));
    await settle();
    expect(patient.error).toBeUndefined();
    running.release({ ok: true });
  });

  it('reserves from the headers: a reservation is work ahead of later requests, and its request goes straight to the queue', async () => {
    const { admission, clock, events } = make();
    const warm = await admission.acquire({ identity: 'x', pixels: MPX });
    clock.advance(1000);
    warm.release({ ok: true });
    const running = await admission.acquire({ identity: 'a', pixels: MPX });
    // 1 s running + 1 s of its own (x 1.2) < 2.5 s: its place is held while its body uploads.
    const reservation = admission.reserve({ identity: 'b', pixels: MPX, deadline: clock.now() + 2500 });
    expect(admission.stats().reserved).toBe(1);
    // The reserved megapixel is ahead of the next caller: 3 s > 2.5 s, refused from its headers.
    let refusal: unknown;
    try {
      admission.reserve({ identity: 'c', pixels: MPX, deadline: clock.now() + 2500 });
    } catch (err) {
      refusal = err;
    }
    expect(refusal).toBeInstanceOf(AdmissionRejected);
    expect((refusal as AdmissionRejected).kind).toBe('deadline');
    expect((refusal as AdmissionRejected).retryAfterMs).toBeGreaterThanOrEqual(1900);
    // b's body arrives 0.4 s later: not priced again, it waits its turn.
    clock.advance(400);
    const b = track(admission.acquire({ identity: 'b', pixels: MPX, deadline: clock.now() + 2100, reservation: reservation.id }));
    await settle();
    expect(b.ticket ?? b.error).toBeUndefined();
    expect(admission.stats()).toMatchObject({ reserved: 0, queued: 1 });
    reservation.release(); // taken up already: a no-op
    expect(admission.stats().queued).toBe(1);
    clock.advance(600);
    running.release({ ok: true });
    await settle();
    expect(b.ticket).toBeDefined();
    expect(events.filter(([e]) => e === 'reserved')).toHaveLength(1);
    b.ticket!.release({ ok: true });
  });

  it('a released or lapsed reservation stops counting as work ahead', async () => {
    const { admission, clock } = make({ initialPixelsPerSecond: MPX });
    const held = admission.reserve({ identity: 'a', pixels: 2 * MPX, deadline: clock.now() + 5000 });
    expect(() => admission.reserve({ identity: 'b', pixels: MPX, deadline: clock.now() + 2500 })).toThrow(AdmissionRejected);
    held.release();
    const second = admission.reserve({ identity: 'b', pixels: 2 * MPX, deadline: clock.now() + 3000 });
    expect(admission.stats().reserved).toBe(1);
    // Its body never came: the place lapses at its deadline.
    clock.advance(3000);
    expect(admission.stats().reserved).toBe(0);
    const late = track(admission.acquire({ identity: 'b', pixels: 2 * MPX, deadline: clock.now() + 3000, reservation: second.id }));
    await settle();
    expect(late.ticket).toBeDefined(); // priced afresh: 2 s x 1.2 < 3 s, and nothing ahead
  });

  it('refuses a request larger than its headers announced', async () => {
    const { admission, clock } = make({ initialPixelsPerSecond: MPX });
    const reservation = admission.reserve({ identity: 'a', pixels: MPX, deadline: clock.now() + 5000 });
    const err = await admission.acquire({ identity: 'a', pixels: 4 * MPX, reservation: reservation.id }).catch((e: AdmissionRejected) => e);
    expect((err as AdmissionRejected).kind).toBe('misannounced');
    expect((err as AdmissionRejected).message).toMatch(/x-image-size/);
    expect(admission.stats()).toMatchObject({ reserved: 0, running: 0, queued: 0 });
  });

  it('does not charge the time of abandoned work to the next answer', async () => {
    const { admission, clock } = make();
    const warm = await admission.acquire({ identity: 'x', pixels: MPX });
    clock.advance(1000);
    warm.release({ ok: true });
    // A request that fails after 8 s alone (its caller's deadline passed)...
    const doomed = await admission.acquire({ identity: 'y', pixels: 4 * MPX });
    clock.advance(8000);
    doomed.release({ ok: false });
    // ...and then 1 Mpx answered in 1 s: the rate stays 1 Mpx/s, not 1 Mpx per 9 s.
    const next = await admission.acquire({ identity: 'z', pixels: MPX });
    clock.advance(1000);
    next.release({ ok: true });
    expect(admission.stats().pixelsPerSecond).toBeCloseTo(MPX, -3);
  });

  it('counts the throughput prior before any measurement (and nothing without one)', async () => {
    const none = make();
    await none.admission.acquire({ identity: 'x', pixels: MPX });
    const admitted = track(none.admission.acquire({ identity: 'y', pixels: 100 * MPX, deadline: none.clock.now() + 10 }));
    await settle();
    expect(admitted.error).toBeUndefined();

    const prior = make({ initialPixelsPerSecond: MPX });
    const err = await prior.admission.acquire({ identity: 'x', pixels: 5 * MPX, deadline: prior.clock.now() + 4000 }).catch((e) => e);
    expect((err as AdmissionRejected).kind).toBe('deadline');
  });

  it('expires a waiting request at its deadline without starting it, and frees its place', async () => {
    const { admission, clock, events } = make();
    const running = await admission.acquire({ identity: 'a', pixels: MPX });
    const doomed = track(admission.acquire({ identity: 'b', pixels: MPX, deadline: clock.now() + 500 }));
    const next = track(admission.acquire({ identity: 'c', pixels: MPX }));
    clock.advance(600);
    await settle();
    expect(doomed.error?.kind).toBe('expired');
    expect(doomed.error?.retryAfterMs).toBeUndefined();
    running.release({ ok: true });
    await settle();
    expect(next.ticket).toBeDefined();
    expect(doomed.ticket).toBeUndefined();
    expect(events.map(([e]) => e)).toContain('expired');
  });

  it('drops a waiting request when its caller goes away', async () => {
    const { admission } = make();
    const running = await admission.acquire({ identity: 'a', pixels: MPX });
    const controller = new AbortController();
    const gone = track(admission.acquire({ identity: 'b', pixels: MPX, signal: controller.signal }));
    controller.abort();
    await settle();
    expect(gone.error?.kind).toBe('cancelled');
    expect(admission.stats().queued).toBe(0);
    running.release({ ok: true });
  });

  it('refuses a request that waited past maxQueueWaitMs, with a retry delay', async () => {
    const { admission, clock } = make({ maxQueueWaitMs: 1000 });
    const running = await admission.acquire({ identity: 'a', pixels: MPX });
    const waiting = track(admission.acquire({ identity: 'b', pixels: MPX }));
    clock.advance(1001);
    await settle();
    expect(waiting.error?.kind).toBe('queue_timeout');
    expect(waiting.error?.retryAfterMs).toBeGreaterThan(0);
    running.release({ ok: true });
  });

  it('refuses beyond maxQueue', async () => {
    const { admission } = make({ maxQueue: 1 });
    await admission.acquire({ identity: 'a', pixels: 1 });
    track(admission.acquire({ identity: 'a', pixels: 1 }));
    const err = await admission.acquire({ identity: 'b', pixels: 1 }).catch((e) => e);
    expect((err as AdmissionRejected).kind).toBe('queue_full');
  });

  it('per-identity concurrency: a caller over its limit is refused while another caller is admitted', async () => {
    const { admission } = make({ limit: fixedLimit(4), maxConcurrentPerIdentity: 2 });
    await admission.acquire({ identity: 'a', pixels: MPX });
    await admission.acquire({ identity: 'a', pixels: MPX });
    const err = await admission.acquire({ identity: 'a', pixels: MPX }).catch((e) => e);
    expect((err as AdmissionRejected).kind).toBe('identity_concurrency');
    expect((err as AdmissionRejected).retryAfterMs).toBeGreaterThan(0);
    await expect(admission.acquire({ identity: 'b', pixels: MPX })).resolves.toBeDefined();
  });

  it('per-identity pixels per second: refused with the time until the bucket refills, then admitted', async () => {
    const { admission, clock } = make({ limit: fixedLimit(10), pixelsPerSecondPerIdentity: MPX });
    (await admission.acquire({ identity: 'a', pixels: MPX })).release({ ok: true });
    const err = (await admission.acquire({ identity: 'a', pixels: MPX / 2 }).catch((e) => e)) as AdmissionRejected;
    expect(err.kind).toBe('identity_rate');
    expect(err.retryAfterMs).toBeGreaterThanOrEqual(499);
    expect(err.retryAfterMs).toBeLessThanOrEqual(501);
    await expect(admission.acquire({ identity: 'b', pixels: MPX })).resolves.toBeDefined();
    clock.advance(err.retryAfterMs!);
    await expect(admission.acquire({ identity: 'a', pixels: MPX / 2 })).resolves.toBeDefined();
  });

  it('refuses at dispatch a waiting request whose deadline became unreachable', async () => {
    const { admission, clock } = make();
    // Measured 1 Mpx/s.
    const warm = await admission.acquire({ identity: 'x', pixels: MPX });
    clock.advance(1000);
    warm.release({ ok: true });
    const slow = await admission.acquire({ identity: 'a', pixels: MPX });
    const waiting = track(admission.acquire({ identity: 'b', pixels: MPX, deadline: clock.now() + 2500 }));
    // The running request takes 2 s instead of 1: 0.5 s are left, the waiter needs 1 s.
    clock.advance(2000);
    slow.release({ ok: true });
    await settle();
    expect(waiting.error?.kind).toBe('deadline');
  });

  it('refuses waiting requests as soon as the throughput says they would miss their deadline', async () => {
    // Cold start: no throughput figure, so everything queues behind the first request.
    const { admission, clock } = make();
    const first = await admission.acquire({ identity: 'w', pixels: MPX });
    const deadline = clock.now() + 3500;
    const waiting = ['a', 'b', 'c', 'd'].map((identity) => track(admission.acquire({ identity, pixels: MPX, deadline })));
    await settle();
    expect(waiting.every((w) => !w.ticket && !w.error)).toBe(true);
    // 1 Mpx answered in 1 s: a starts; b would be answered at 3 s (in time), c and d at 4 s and 5 s.
    clock.advance(1000);
    first.release({ ok: true });
    await settle();
    expect(waiting.map((w) => (w.ticket ? 'started' : (w.error?.kind ?? 'waiting')))).toEqual(['started', 'waiting', 'deadline', 'deadline']);
    expect(waiting[2].error!.retryAfterMs).toBeGreaterThanOrEqual(1900);
    expect(waiting[2].error!.retryAfterMs).toBeLessThanOrEqual(2100);
    expect(admission.stats().queued).toBe(1);
  });

  it('counts goodput only for answers within their deadline', async () => {
    const { admission, clock, events } = make({ limit: fixedLimit(2) });
    const inTime = await admission.acquire({ identity: 'a', pixels: 1, deadline: clock.now() + 1000 });
    const late = await admission.acquire({ identity: 'b', pixels: 1, deadline: clock.now() + 1000 });
    clock.advance(500);
    inTime.release({ ok: true });
    clock.advance(1000);
    late.release({ ok: true });
    expect(events.filter(([e]) => e === 'answered')).toHaveLength(2);
    expect(events.filter(([e]) => e === 'goodput').map(([, id]) => id)).toEqual(['a']);
  });

  it('adapts: the adaptive limit grows while requests wait behind it and latency per pixel holds', async () => {
    const limit = new AdaptiveLimit({ initial: 1 });
    const { admission, clock } = make({ limit });
    for (let i = 0; i < 3; i++) {
      const tickets = await Promise.all(Array.from({ length: limit.limit }, () => admission.acquire({ identity: 'a', pixels: MPX })));
      const waiting = admission.acquire({ identity: 'a', pixels: MPX });
      clock.advance(1000);
      for (const t of tickets) t.release({ ok: true });
      const late = await waiting;
      clock.advance(1000);
      late.release({ ok: true });
    }
    expect(limit.limit).toBeGreaterThan(1);
  });

  it('keeps the limit at 1 for requests that come one after another', async () => {
    const limit = new AdaptiveLimit({ initial: 1 });
    const { admission, clock } = make({ limit });
    for (let i = 0; i < 5; i++) {
      const ticket = await admission.acquire({ identity: 'a', pixels: MPX });
      clock.advance(1000);
      ticket.release({ ok: true });
    }
    expect(limit.limit).toBe(1);
  });
});
