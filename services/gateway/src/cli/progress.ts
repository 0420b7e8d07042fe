// A progress line on stderr for work measured in units (pixels of images): a bar on a terminal
// (redrawn in place), a plain line every few seconds otherwise, with the rate and the time left at
// that rate. Between updates, a timer keeps the elapsed time (and the ETA) moving.

export interface ProgressIo {
  stderr: NodeJS.WritableStream & { isTTY?: boolean };
}

export function formatDuration(s: number): string {
  if (!Number.isFinite(s) || s < 0) return '--';
  s = Math.round(s);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  return h > 0 ? `${h}h${String(m).padStart(2, '0')}m` : m > 0 ? `${m}m${String(sec).padStart(2, '0')}s` : `${sec}s`;
}

export class WorkProgress {
  private readonly started = performance.now();
  private readonly tty: boolean;
  private done = 0;
  private items = 0;
  private current = '';
  private currentUnits = 0;
  private currentStarted = 0;
  private timer?: NodeJS.Timeout;
  private lastPlain = 0;

  constructor(
    private readonly io: ProgressIo,
    private readonly totalUnits: number,
    private readonly totalItems: number,
    private readonly itemName: string,
    private readonly describe: (units: number) => string,
  ) {
    this.tty = Boolean(io.stderr.isTTY);
    this.timer = setInterval(() => this.draw(false), this.tty ? 500 : 1000);
    this.timer.unref();
  }

  /** An item of `units` starts (its name is shown). */
  start(name: string, units: number): void {
    this.current = name;
    this.currentUnits = units;
    this.currentStarted = performance.now();
    this.draw(true);
  }

  /** The current item is done. */
  finish(): void {
    this.done += this.currentUnits;
    this.items++;
    this.currentUnits = 0;
    this.current = '';
    this.draw(true);
  }

  /** Seconds left: the units left at the rate so far (in-flight work counted as time spent). */
  eta(): number {
    const now = performance.now();
    const elapsed = (now - this.started) / 1000;
    if (this.done <= 0) return NaN;
    const rate = this.done / Math.max(1e-3, elapsed - (this.currentUnits > 0 ? (now - this.currentStarted) / 1000 : 0));
    const left = this.totalUnits - this.done;
    const inFlight = this.currentUnits > 0 ? (now - this.currentStarted) / 1000 : 0;
    return Math.max(0, left / rate - inFlight);
  }

  line(): string {
    const elapsed = (performance.now() - this.started) / 1000;
    const frac = this.totalUnits > 0 ? this.done / this.totalUnits : 0;
    const eta = this.items >= this.totalItems ? '0s' : formatDuration(this.eta());
    const doing = this.current ? `, ${this.current}` : '';
    const rate = elapsed > 0 ? this.describe(this.done / elapsed) : '';
    const stats = `${this.items}/${this.totalItems} ${this.itemName}${doing}, ${rate}, ${formatDuration(elapsed)} elapsed, ETA ${eta}`;
    if (!this.tty) return stats;
    const w = 24;
    const filled = Math.round(frac * w);
    return `[${'#'.repeat(filled)}${'-'.repeat(w - filled)}] ${(frac * 100).toFixed(0)}% ${stats}`;
  }

  private draw(changed: boolean): void {
    if (this.tty) {
      this.io.stderr.write(`\r\x1b[K${this.line()}`);
      return;
    }
    const now = performance.now();
    if (!changed && now - this.lastPlain < 5000) return;
    this.lastPlain = now;
    this.io.stderr.write(`${this.line()}\n`);
  }

  close(): void {
    clearInterval(this.timer);
    if (this.tty) this.io.stderr.write('\n');
  }
}
