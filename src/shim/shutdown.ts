import { silentLogger, type Logger } from '../log/logger.js';

/** Receives an AbortSignal that fires when the shutdown timeout passes. */
export type ShutdownCallback = (signal: AbortSignal) => unknown;

export interface ShutdownOptions {
  /** Upper bound for all callbacks together (containerd's shutdown service uses 30 s). */
  timeoutMs?: number;
  log?: Logger;
}

/**
 * Runs what each resource registered when it was created — close the ttrpc server, drain the
 * event queue, … — in parallel, at most timeoutMs, once. The caller exits the process after `done`.
 */
export class ShutdownService {
  readonly #callbacks: { name: string; fn: ShutdownCallback }[] = [];
  readonly #started = new AbortController();
  readonly #timeoutMs: number;
  readonly #log: Logger;
  readonly failures: { name: string; err: unknown }[] = [];
  #done: Promise<void> | undefined;
  #resolveDone!: () => void;
  readonly #donePromise = new Promise<void>((resolve) => (this.#resolveDone = resolve));

  constructor({ timeoutMs = 30_000, log = silentLogger }: ShutdownOptions = {}) {
    this.#timeoutMs = timeoutMs;
    this.#log = log;
  }

  /** Aborted as soon as shutdown begins: long-running loops watch it. */
  get signal(): AbortSignal {
    return this.#started.signal;
  }

  get isShuttingDown(): boolean {
    return this.#started.signal.aborted;
  }

  /** Resolves after every callback settled or the timeout passed. */
  get done(): Promise<void> {
    return this.#donePromise;
  }

  /** Registers a callback; registered after shutdown began, it runs at once (best-effort). */
  register(name: string, fn: ShutdownCallback): void {
    if (this.isShuttingDown) {
      this.#log.warn({ callback: name }, 'shutdown already running; running late callback now');
      void this.#runOne(name, fn, AbortSignal.timeout(this.#timeoutMs));
      return;
    }
    this.#callbacks.push({ name, fn });
  }

  /** Starts shutdown (idempotent) and resolves when it is done. */
  shutdown(reason = 'shutdown requested'): Promise<void> {
    this.#done ??= this.#run(reason);
    return this.#done;
  }

  async #run(reason: string): Promise<void> {
    this.#log.info({ reason }, 'shim shutting down');
    this.#started.abort();
    const timeout = new AbortController();
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<void>((resolve) => {
      timer = setTimeout(() => {
        this.#log.error({ durationMs: this.#timeoutMs }, 'shutdown callbacks timed out');
        timeout.abort();
        resolve();
      }, this.#timeoutMs);
    });
    const pending = new Set(this.#callbacks);
    const all = Promise.all(this.#callbacks.map((cb) => this.#runOne(cb.name, cb.fn, timeout.signal).finally(() => pending.delete(cb))));
    await Promise.race([all, timedOut]);
    // Callbacks still running count as failed: the process is not clean (a recycled server exits instead).
    if (timeout.signal.aborted) {
      for (const { name } of pending) this.failures.push({ name, err: new Error(`${name}: timed out after ${this.#timeoutMs} ms`) });
    }
    clearTimeout(timer);
    this.#resolveDone();
  }

  async #runOne(name: string, fn: ShutdownCallback, signal: AbortSignal): Promise<void> {
    try {
      await fn(signal);
    } catch (err) {
      this.failures.push({ name, err });
      this.#log.error({ err, callback: name }, 'shutdown callback failed');
    }
  }
}
