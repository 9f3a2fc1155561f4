import { closeSync } from 'node:fs';
import { pino, type Logger, type DestinationStream } from 'pino';

/**
 * Structured logs. Field names are fixed across thaw:
 * id, execId, pid, snapshot, phase, durationMs, err (plus decision, reason, fallback, bytes where relevant;
 * a shim server's lines carry ns and shim, the id of the task that started it).
 */
export type { Logger };

export type LogLevel = 'trace' | 'debug' | 'info' | 'warn' | 'error' | 'fatal' | 'silent';

export interface LoggerOptions {
  level?: LogLevel;
  /** A path (appended to), a file descriptor, or a stream; default stderr (fd 2). */
  destination?: string | number | DestinationStream;
  name?: string;
}

export function createLogger({ level = 'info', destination = 2, name = 'thaw' }: LoggerOptions = {}): Logger {
  const dest =
    typeof destination === 'string' || typeof destination === 'number'
      ? pino.destination({ dest: destination, sync: true, append: true, mkdir: true })
      : destination;
  return pino({ name, level, base: { pid: process.pid }, serializers: { err: pino.stdSerializers.err } }, dest);
}

/**
 * A log destination whose file descriptor can change under the loggers writing to it: a shim server
 * that serves one container after another (src/shim/spare.ts) logs into each container's log FIFO
 * in turn, while loggers made earlier (the child reaper's, the crash monitor's) keep writing here.
 */
export class SwitchableDestination implements DestinationStream {
  #current: ReturnType<typeof pino.destination> | undefined;
  #fd: number | undefined;

  write(line: string): void {
    this.#current?.write(line);
  }

  /** The descriptor lines go to now (undefined: nowhere). */
  get fd(): number | undefined {
    return this.#fd;
  }

  /**
   * From now on lines go to `fd` (undefined: nowhere). The previous descriptor is flushed and
   * closed (not 1 or 2): a FIFO's reader then sees its end.
   */
  switchTo(fd: number | undefined): void {
    const previous = this.#current;
    const previousFd = this.#fd;
    this.#current = fd === undefined ? undefined : pino.destination({ dest: fd, sync: true });
    this.#fd = fd;
    if (previous === undefined || previousFd === undefined) return;
    try {
      previous.flushSync();
    } catch {
      // a reader that went away takes the unwritten lines with it
    }
    if (previousFd > 2 && previousFd !== fd) {
      try {
        closeSync(previousFd);
      } catch {
        // already closed
      }
    }
  }
}

/** A logger that drops everything (tests, library default). */
export const silentLogger: Logger = pino({ level: 'silent' });

/**
 * Times named phases of a checkpoint or restore. Each phase is logged with {phase, durationMs} and
 * kept in `timings` (milliseconds) for JSON output and manifests.
 */
export class PhaseTimer {
  readonly timings: Record<string, number> = {};
  readonly #start = performance.now();
  constructor(private readonly log: Logger = silentLogger) {}

  async phase<T>(name: string, fn: () => Promise<T> | T): Promise<T> {
    const t0 = performance.now();
    try {
      return await fn();
    } finally {
      const durationMs = round(performance.now() - t0);
      this.timings[name] = (this.timings[name] ?? 0) + durationMs;
      this.log.debug({ phase: name, durationMs }, 'phase done');
    }
  }

  /** Records a duration measured elsewhere. */
  record(name: string, durationMs: number): void {
    this.timings[name] = round(durationMs);
  }

  /** Milliseconds since the timer was created. */
  elapsed(): number {
    return round(performance.now() - this.#start);
  }
}

function round(ms: number): number {
  return Math.round(ms * 10) / 10;
}
