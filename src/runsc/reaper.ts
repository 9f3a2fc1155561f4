import type { ChildProcess } from 'node:child_process';
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import { ShimError } from '../errors.js';
import { silentLogger, type Logger } from '../log/logger.js';
import { childrenOfThisProcess } from '../procfs.js';
import { loadReaperAddon, type ReaperBinding } from './reaper-native.js';

/**
 * Exits of the processes runsc leaves behind, read by reaping them, as containerd's runc shim and
 * gVisor's own shim do. `runsc wait` attaches through the sandbox's control socket: an app that
 * exits before that connection exists (~0.1 s) reads 255, and any other exit is reported only once
 * runsc notices (1-2 s). But the sandbox process exits with the app's status (exit code, or 128 +
 * signal: measured with runsc 20240729 for 0, 3, SIGKILL, SIGTERM, SIGSEGV), and the waiter process
 * of `runsc exec` with the exec'd process's status — only their parent can read it.
 *
 * So a runsc call that leaves processes behind runs inside `adopting()`: for its duration this
 * process is a child subreaper, so what the call forks and leaves when it exits (sandbox and gofer
 * of `create`, the waiter of `exec`) is reparented here; then every such orphan is waited for and
 * reaped (the addon polls a pidfd per process in libuv's loop). The subreaper flag is on only
 * during those calls, so processes orphaned later (the sandbox's systrap stubs when it dies) go to
 * init as before, and the native engine's runc containers keep being reparented to init — unless
 * one is orphaned while a runsc call of the same shim runs: it is then reaped here, and the native
 * engine, which reads exits from zombies it finds in /proc, reports 137 or 255 for it.
 *
 * The gofer must be reaped too: `runsc delete` waits for it to die, and a zombie never does (5 s
 * per delete, measured). Children that Node's child_process spawned are libuv's to reap: they are
 * tracked through the `child_process` diagnostics channel and never touched here.
 */

export interface ReapedExit {
  pid: number;
  /** containerd's exit status: the exit code, or 128 + the signal number. */
  status: number;
  exitedAt: Date;
}

/** The part of the reaper that Runsc needs: run a call whose leftover processes become ours. */
export interface OrphanAdopter {
  adopting<T>(fn: () => Promise<T>): Promise<T>;
}

export interface ChildReaperOptions {
  binding: ReaperBinding;
  log?: Logger;
  /** This process's children (default: /proc/self/task/<tid>/children). */
  listChildren?: () => number[];
  /** How long an exit nobody asked for yet is kept for a late `exitOf` (default 60 s). */
  keepExitMs?: number;
}

interface Adopted {
  exit: Promise<ReapedExit>;
  settled: boolean;
}

export class ChildReaper implements OrphanAdopter {
  readonly #binding: ReaperBinding;
  #log: Logger;
  readonly #listChildren: () => number[];
  readonly #keepExitMs: number;
  /** Children child_process spawned: libuv reaps them. Removed at their 'exit'. */
  readonly #spawned = new Set<ChildProcess>();
  /** Children that were there before this reaper existed, while they last: not ours to judge. */
  readonly #preexisting: Set<number>;
  /** Invariant: one entry per pid being waited for; settled entries stay `keepExitMs`, then go. */
  readonly #adopted = new Map<number, Adopted>();
  /** Open `adopting()` calls; the subreaper flag is on while this is > 0. */
  #windows = 0;
  readonly #onSpawn = (message: unknown): void => {
    const child = (message as { process?: ChildProcess }).process;
    if (child === undefined) return;
    this.#spawned.add(child);
    child.once('exit', () => this.#spawned.delete(child));
  };

  constructor({ binding, log = silentLogger, listChildren = childrenOfThisProcess, keepExitMs = 60_000 }: ChildReaperOptions) {
    this.#binding = binding;
    this.#log = log;
    this.#listChildren = listChildren;
    this.#keepExitMs = keepExitMs;
    subscribe('child_process', this.#onSpawn);
    this.#preexisting = new Set(listChildren());
  }

  /** Logs through `log` from now on (a server that serves its next container: that container's logger). */
  useLogger(log: Logger): void {
    this.#log = log;
  }

  /**
   * Runs `fn` (a runsc call that forks processes and exits) while this process is a child
   * subreaper, then adopts the processes it left behind. Concurrent calls share the window.
   */
  async adopting<T>(fn: () => Promise<T>): Promise<T> {
    if (this.#windows++ === 0) this.#setSubreaper(true);
    try {
      return await fn();
    } finally {
      if (--this.#windows === 0) this.#setSubreaper(false);
      this.adoptOrphans();
    }
  }

  /**
   * Waits for (and reaps) every child of this process that child_process did not spawn and that is
   * not waited for yet. Returns the pids it adopted now.
   */
  adoptOrphans(): number[] {
    const libuv = new Set<number>();
    for (const child of this.#spawned) {
      // A spawn that failed never gets a pid (spawn() has returned by now, so one that worked has).
      if (child.pid === undefined) this.#spawned.delete(child);
      else libuv.add(child.pid);
    }
    const children = this.#listChildren();
    for (const pid of this.#preexisting) if (!children.includes(pid)) this.#preexisting.delete(pid);
    const adopted: number[] = [];
    for (const pid of children) {
      if (libuv.has(pid) || this.#preexisting.has(pid) || this.#adopted.get(pid)?.settled === false) continue;
      this.#adopt(pid);
      adopted.push(pid);
    }
    if (adopted.length > 0) this.#log.debug({ pids: adopted }, 'adopted orphaned runtime processes');
    return adopted;
  }

  /**
   * The exit of `pid`: an adopted process, or any child of this process that child_process did not
   * spawn. Rejects with NotFound when `pid` is not (or no longer) a child of this process.
   */
  exitOf(pid: number): Promise<ReapedExit> {
    const known = this.#adopted.get(pid);
    if (known !== undefined) return known.exit;
    const libuv = this.#preexisting.has(pid) || [...this.#spawned].some((child) => child.pid === pid);
    if (libuv) return Promise.reject(new ShimError('InvalidArgument', `process ${pid} is not an orphan: its own parent reaps it`));
    return this.#adopt(pid).exit;
  }

  /** Stops watching child_process spawns (tests; the shim keeps its reaper for its life). */
  close(): void {
    unsubscribe('child_process', this.#onSpawn);
  }

  #adopt(pid: number): Adopted {
    const entry: Adopted = {
      settled: false,
      exit: this.#binding.waitExit(pid).then((r) => {
        if (r.errno !== 0) {
          throw new ShimError('NotFound', `process ${pid} cannot be reaped here (errno ${r.errno}): not a child of this process`);
        }
        return { pid, status: r.signal !== 0 ? 128 + r.signal : r.code, exitedAt: new Date() };
      }),
    };
    this.#adopted.set(pid, entry);
    const settle = (): void => {
      entry.settled = true;
      const forget = setTimeout(() => {
        if (this.#adopted.get(pid) === entry) this.#adopted.delete(pid);
      }, this.#keepExitMs);
      forget.unref();
    };
    entry.exit.then(
      (exit) => {
        this.#log.debug({ pid, exitStatus: exit.status }, 'reaped');
        settle();
      },
      settle,
    );
    return entry;
  }

  #setSubreaper(on: boolean): void {
    const errno = this.#binding.setChildSubreaper(on);
    if (errno !== 0) this.#log.warn({ errno, on }, 'prctl(PR_SET_CHILD_SUBREAPER) failed; exits come from runsc wait');
  }
}

let processReaper: ChildReaper | null = null;

export interface EnableChildReaperOptions {
  log?: Logger;
  /** For tests: the addon, or null for "not built". */
  binding?: ReaperBinding | null;
}

/**
 * Makes this process's runsc exits come from reaping (the shim's `serve` calls this before any
 * runsc, and again for each further container a recycled server serves). Returns null, logging
 * why, where that cannot work here: no addon (then `runsc wait` reports exits, as before), no
 * pidfds (Linux < 5.3), or prctl refused.
 */
export function enableChildReaper({ log = silentLogger, binding }: EnableChildReaperOptions = {}): ChildReaper | null {
  if (processReaper !== null) {
    // Called again by a server that serves its next container: same reaper, that container's logger.
    processReaper.useLogger(log);
    return processReaper;
  }
  let b = binding;
  if (b === undefined) {
    const loaded = loadReaperAddon();
    if (loaded.binding === null) {
      log.info({ err: loaded.error, path: loaded.path }, 'reaper addon not loaded: exits come from runsc wait');
      return null;
    }
    b = loaded.binding;
  }
  if (b === null) return null;
  const pidfd = b.pidfdSupport();
  const prctl = pidfd === 0 ? b.setChildSubreaper(false) : 0;
  if (pidfd !== 0 || prctl !== 0) {
    log.info({ pidfdErrno: pidfd, prctlErrno: prctl }, 'cannot reap runsc processes here: exits come from runsc wait');
    return null;
  }
  processReaper = new ChildReaper({ binding: b, log });
  return processReaper;
}

/** This process's reaper, when `enableChildReaper` set one up; null elsewhere (the thaw CLI, tests). */
export function childReaper(): ChildReaper | null {
  return processReaper;
}
