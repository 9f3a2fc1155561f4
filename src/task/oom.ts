/**
 * OOM kills of a task, for containerd's TaskOOM event (CRI turns it into reason "OOMKilled"). In a
 * gVisor sandbox the host kernel's OOM killer kills the sentry, so the whole sandbox dies with
 * SIGKILL; the sandbox's cgroup counts the kill (`oom_kill` in v1 memory.oom_control or v2
 * memory.events, cgroup-resources.ts). The watcher keeps the count it saw last and reports each rise
 * once. It is read when the task exits (the service publishes TaskOOM before TaskExit; the cgroup
 * lives until runsc delete) and, while the task runs, on v2 whenever the kernel notifies the file
 * (inotify works on cgroup v2 files), on v1 by a slow poll (v1 files give no inotify events; the
 * eventfd interface needs a syscall Node lacks).
 */
import { watch, type FSWatcher } from 'node:fs';
import { oomKillFile, readOomKillCount, type ProcessCgroup } from '../engine/cgroup-resources.js';
import { silentLogger, type Logger } from '../log/logger.js';

export interface OomWatcherOptions {
  /** Container id, for logs. */
  id: string;
  /** The container's own cgroup (Engine.cgroupOf). */
  cgroup: ProcessCgroup;
  /** Called once per rise of the count, with the new count. */
  onOom: (count: number) => void;
  log?: Logger;
  /** v1 (and v2 when inotify fails): how often the count is read while the task runs; 0 = only at checks (exit). */
  pollMs?: number;
}

/** Default v1 poll: one read of a small cgroup file a second, on an unref'd timer. */
export const OOM_POLL_MS = 1000;

/**
 * v2: reads after inotify at most this often. memory.events also changes on every `max`/`high` hit
 * (a task pressing on its limit: up to 100 notifications a second, the kernel's own rate limit).
 */
export const OOM_NOTIFY_MIN_INTERVAL_MS = 100;

/**
 * Watches one cgroup's OOM kill count. `open` reads the baseline (before the app starts), `watch`
 * starts live watching, `check` reads the count now, `stop` ends everything (idempotent). Checks
 * run one at a time, so a kill seen by the live watch and by the exit check is reported once.
 */
export class OomWatcher {
  readonly #o: OomWatcherOptions;
  /** The counter file: v1 memory.oom_control or v2 memory.events. */
  readonly file: string;
  readonly #log: Logger;
  #last: number;
  #queue: Promise<void> = Promise.resolve();
  #fsWatcher: FSWatcher | undefined;
  #timer: NodeJS.Timeout | undefined;
  /** A read scheduled after an inotify event; later events until it runs are covered by it. */
  #notifyTimer: NodeJS.Timeout | undefined;
  #lastNotifyRead = 0;
  #stopped = false;

  private constructor(o: OomWatcherOptions, file: string, baseline: number) {
    this.#o = o;
    this.file = file;
    this.#log = o.log ?? silentLogger;
    this.#last = baseline;
  }

  /**
   * Reads the baseline count; undefined (nothing to watch) when no memory hierarchy holds the cgroup
   * or its file has no count (v1 before kernel 4.13, v2 without the memory controller).
   */
  static async open(o: OomWatcherOptions): Promise<OomWatcher | undefined> {
    const file = oomKillFile(o.cgroup);
    const baseline = file === undefined ? undefined : await readOomKillCount(file);
    if (file === undefined || baseline === undefined) {
      (o.log ?? silentLogger).debug({ id: o.id, cgroup: o.cgroup.path }, 'no OOM kill count in the cgroup; no OOM events');
      return undefined;
    }
    return new OomWatcher(o, file, baseline);
  }

  /** The count last seen (the baseline until a rise). */
  get count(): number {
    return this.#last;
  }

  get watching(): boolean {
    return this.#fsWatcher !== undefined || this.#timer !== undefined;
  }

  /** Starts live watching: inotify on v2, a poll on v1 (or when inotify is unavailable). */
  watch(): void {
    if (this.#stopped || this.watching) return;
    if (this.#o.cgroup.mode === 'v2') {
      try {
        // persistent: false — the watch never keeps the shim alive on its own.
        const w = watch(this.file, { persistent: false }, this.#onNotify);
        w.on('error', (err) => {
          this.#log.debug({ id: this.#o.id, err }, 'OOM watch ended');
          this.#closeFsWatcher();
        });
        this.#fsWatcher = w;
        return;
      } catch (err) {
        this.#log.debug({ id: this.#o.id, err }, 'inotify on the OOM counter failed; polling');
      }
    }
    const every = this.#o.pollMs ?? OOM_POLL_MS;
    if (every > 0) this.#timer = setInterval(() => void this.check(), every).unref();
  }

  /** Reads the count now and reports a rise; never throws. Resolves after any check already running. */
  check(): Promise<void> {
    this.#queue = this.#queue.then(() => this.#readAndReport());
    return this.#queue;
  }

  /** Ends live watching and further checks (Delete; the exit after its check). */
  stop(): void {
    this.#stopped = true;
    this.#closeFsWatcher();
    if (this.#timer !== undefined) clearInterval(this.#timer);
    this.#timer = undefined;
    if (this.#notifyTimer !== undefined) clearTimeout(this.#notifyTimer);
    this.#notifyTimer = undefined;
  }

  #onNotify = (): void => {
    if (this.#notifyTimer !== undefined || this.#stopped) return;
    const wait = Math.max(0, this.#lastNotifyRead + OOM_NOTIFY_MIN_INTERVAL_MS - Date.now());
    this.#notifyTimer = setTimeout(() => {
      this.#notifyTimer = undefined;
      this.#lastNotifyRead = Date.now();
      void this.check();
    }, wait).unref();
  };

  async #readAndReport(): Promise<void> {
    if (this.#stopped) return;
    let count: number | undefined;
    try {
      count = await readOomKillCount(this.file);
    } catch (err) {
      this.#log.debug({ id: this.#o.id, err }, 'reading the OOM kill count failed');
      return;
    }
    // undefined: the cgroup is gone (runsc delete); a lower count: a new cgroup at the same path.
    if (count === undefined || this.#stopped) return;
    const rose = count > this.#last;
    this.#last = count;
    if (!rose) return;
    this.#log.warn({ id: this.#o.id, oomKills: count }, 'the kernel OOM-killed in the container cgroup');
    try {
      this.#o.onOom(count);
    } catch (err) {
      this.#log.error({ id: this.#o.id, err }, 'OOM report failed');
    }
  }

  #closeFsWatcher(): void {
    this.#fsWatcher?.close();
    this.#fsWatcher = undefined;
  }
}
