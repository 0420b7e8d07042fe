// Per-request stage timing. Stages overlap (tile batches run concurrently, the prompter and the
// encoder run side by side), so a stage's time is the wall-clock time during which at least one
// of its calls was running: the time the request spent waiting on that stage, never more than
// the request's total.

export class StageClock {
  private readonly active = new Map<string, { count: number; since: number }>();
  private readonly totals = new Map<string, number>();
  private readonly order: string[] = [];
  private readonly started = performance.now();

  start(stage: string): void {
    const a = this.active.get(stage);
    if (a && a.count > 0) {
      a.count++;
      return;
    }
    if (!this.totals.has(stage)) {
      this.totals.set(stage, 0);
      this.order.push(stage);
    }
    this.active.set(stage, { count: 1, since: performance.now() });
  }

  stop(stage: string): void {
    const a = this.active.get(stage);
    if (!a || a.count === 0) return;
    a.count--;
    if (a.count === 0) this.totals.set(stage, (this.totals.get(stage) ?? 0) + performance.now() - a.since);
  }

  async time<T>(stage: string, fn: () => Promise<T>): Promise<T> {
    this.start(stage);
    try {
      return await fn();
    } finally {
      this.stop(stage);
    }
  }

  timeSync<T>(stage: string, fn: () => T): T {
    this.start(stage);
    try {
      return fn();
    } finally {
      this.stop(stage);
    }
  }

  /** Declares a stage so it is reported (as 0 ms) even when it did not run. */
  declare(...stages: string[]): void {
    for (const s of stages) {
      if (!this.totals.has(s)) {
        this.totals.set(s, 0);
        this.order.push(s);
      }
    }
  }

  /** Stage times in first-use order, then "total" (since construction). */
  timings(): { stage: string; ms: number }[] {
    const now = performance.now();
    const out = this.order.map((stage) => {
      const a = this.active.get(stage);
      const running = a && a.count > 0 ? now - a.since : 0;
      return { stage, ms: round((this.totals.get(stage) ?? 0) + running) };
    });
    out.push({ stage: 'total', ms: round(now - this.started) });
    return out;
  }
}

function round(ms: number): number {
  return Math.round(ms * 1000) / 1000;
}
