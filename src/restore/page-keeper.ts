import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, openSync, statSync, writeFileSync } from 'node:fs';
import type { Socket } from 'node:net';
import { dirname, extname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { ShimError } from '../errors.js';
import type { Logger } from '../log/logger.js';
import { cgroupProcs, fdTarget, holdersOf, procTable, processTree } from '../procfs.js';

/**
 * The page keeper: a small detached process that makes a dying thaw process safe during a lazy
 * restore. While thaw's page server fills a restored app's memory, the kernel resolves the app's
 * faults on missing pages through the tasks' userfaultfds, which live in thaw. If thaw dies (SIGKILL,
 * OOM, crash) those fds close, the kernel drops the registrations, and the app reads zero pages where
 * its memory had not arrived yet: silent corruption.
 *
 * The keeper inherits duplicates of the userfaultfds (spawn's stdio) and a socket from thaw (its
 * stdin). While any copy of a userfaultfd is open its registrations stay, so a task touching a missing
 * page blocks instead of reading zeros. Then:
 * - thaw writes "done" (every page is in, or the tasks are already dead): the keeper closes its
 *   copies and exits;
 * - its stdin reaches EOF without "done" (thaw died): the keeper kills the whole restored container
 *   (cgroup.kill where cgroup v2 has it, SIGKILL of every pid in its cgroups, of a CRIU still holding
 *   its log and of the given pids, with their descendants), waits until they are gone, and only then
 *   closes its copies and exits.
 * The keeper lives in its own session (no group signal or hang-up of thaw's reaches it) with cwd /,
 * logs pino JSON lines to a file (its stderr), and says "ready" on its stdout once it listens.
 *
 * Waiting is done by a shell (`WAIT_SCRIPT`, ~1 MB, a millisecond to start); node, whose start-up
 * (~0.15 s of CPU, 51 MB of fresh memory) measurably slowed the fill it guards on a 2-vCPU VM, is
 * exec'd only when there is something to kill: the uffds stay open across the exec. This module
 * holds both sides: `PageKeeper.spawn` (thaw) and `runPageKeeper` (the kill, page-keeper-main.ts).
 */

/** What the keeper kills when thaw dies before every page was in. */
export interface PageKeeperTargets {
  /** Cgroup directories of the restored container (absolute, every hierarchy it has a dir in). */
  cgroupDirs: readonly string[];
  /** Processes with an open file under one of these prefixes (a CRIU writing its log), and their descendants. */
  holderPrefixes?: readonly string[];
  /** Processes killed with their descendants; `startTime` (field 22 of /proc/pid/stat) 0 = unchecked. */
  pids?: readonly { pid: number; startTime: number }[];
}

/** The keeper's configuration, passed as its one argument (JSON). */
export interface PageKeeperConfig {
  /** Label for the logs (the container id). */
  id: string;
  /** The keeper's fds that are duplicates of the tasks' userfaultfds (3, 4, …). */
  uffds: number[];
  targets: PageKeeperTargets;
  /** How long the kill may take before the keeper gives up (and exits, closing the uffds). */
  killTimeoutMs: number;
  /**
   * Inode of each existing cgroup dir when the keeper was spawned (decimal strings). At kill time a
   * dir whose inode differs was re-created for another container (the same path) and is left alone:
   * a keeper left guarding tasks that could not be killed waits until thaw exits, maybe long after.
   * Absent: taken when runPageKeeper starts.
   */
  cgroupInodes?: Record<string, string>;
}

export interface PageKeeperOptions {
  /** This process's userfaultfds; the keeper gets duplicates as its fds 3, 4, … */
  uffds: readonly number[];
  targets: PageKeeperTargets;
  /** The keeper's log (appended; also receives anything the keeper prints to stderr). */
  logPath: string;
  /** Label for the logs (the container id). */
  id: string;
  /** How long to wait for the keeper's "ready" (default 30 s). */
  readyTimeoutMs?: number;
  /** Kill deadline inside the keeper (default 30 s). */
  killTimeoutMs?: number;
  /** The keeper's entry module (tests); default page-keeper-main.{js,ts} next to this module. */
  entry?: string;
  /** The shell that waits (default /bin/sh). */
  shell?: string;
  /**
   * The node binary, its flags and environment (default process.execPath, process.execArgv and
   * process.env: loaders carry over, so the .ts entry runs from source).
   */
  node?: { file: string; args: readonly string[]; env?: NodeJS.ProcessEnv };
  log?: Logger;
}

export interface PageKeeperExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** What the page server needs of a keeper (PageKeeper, or a stand-in in tests). */
export interface PageKeeperHandle {
  readonly pid: number | undefined;
  /** Resolves once the keeper listens; rejects if it could not start or died first. */
  readonly ready: Promise<void>;
  /** Resolves when the keeper exits (never rejects). */
  readonly exited: Promise<PageKeeperExit>;
  /** Tells the keeper to let go (no kill); resolves once the message is flushed or the keeper is gone. */
  release(): Promise<void>;
}

/**
 * `page-keeper-main.js` (compiled) or `.ts` (run from source) beside this module, or at the top of
 * the bundle (dist/bundle/, when this module is one of its chunks/). Throws when neither exists: a
 * keeper that could not exec its kill would let the uffds close on a live app, so spawn must fail.
 */
export function defaultKeeperEntry(moduleUrl: string = import.meta.url): string {
  const here = fileURLToPath(moduleUrl);
  const file = `page-keeper-main${extname(here)}`;
  const candidates = [join(dirname(here), file), join(dirname(here), '..', file)];
  const found = candidates.find((p) => existsSync(p));
  if (found === undefined) throw new ShimError('Unavailable', `page keeper: no entry at ${candidates.join(' or ')}`);
  return found;
}

export const KEEPER_READY = 'ready';
export const KEEPER_DONE = 'done';

/**
 * The waiting keeper: says ready, then blocks reading thaw's socket. "done <ms>" → one log line,
 * exit (its uffd copies close); EOF or anything else → exec node with page-keeper-main (same fds)
 * to kill. $1: the id as a JSON string; the rest: node's argv. SIGPIPE is ignored: spawn resets it
 * to the default, and a thaw gone before it read "ready" must not take the keeper with it.
 */
const WAIT_SCRIPT = `trap '' PIPE
id=$1; shift
echo ${KEEPER_READY}
IFS=' ' read -r verb at
if [ "$verb" = ${KEEPER_DONE} ]; then
  printf '{"level":30,"time":%s,"pid":%s,"name":"thaw-page-keeper","id":%s,"phase":"page-keeper","msg":"released (every page in, or the tasks already killed); userfaultfds closed"}\\n' "$at" "$$" "$id" >&2
  exit 0
fi
exec "$@"`;

/** thaw's side: the spawned keeper. */
export class PageKeeper implements PageKeeperHandle {
  readonly ready: Promise<void>;
  readonly exited: Promise<PageKeeperExit>;
  readonly #child: ChildProcess;
  #released: Promise<void> | undefined;
  #exit: PageKeeperExit | undefined;

  private constructor(child: ChildProcess, opts: PageKeeperOptions) {
    this.#child = child;
    this.exited = new Promise((resolve) => {
      child.once('exit', (code, signal) => {
        this.#exit = { code, signal };
        resolve(this.#exit);
      });
      child.once('error', () => {
        if (child.pid === undefined) resolve((this.#exit = { code: null, signal: null })); // never started
      });
    });
    const timeoutMs = opts.readyTimeoutMs ?? 30_000;
    this.ready = new Promise<void>((resolve, reject) => {
      let said = '';
      const timer = setTimeout(() => fail(new Error(`no "${KEEPER_READY}" within ${timeoutMs} ms`)), timeoutMs);
      timer.unref();
      const fail = (err: Error) => {
        clearTimeout(timer);
        reject(new ShimError('Unavailable', `page keeper failed to start: ${err.message} (log: ${opts.logPath})`, { cause: err }));
      };
      child.once('error', fail);
      void this.exited.then((e) => fail(new Error(`it exited (code ${e.code}, signal ${e.signal}) before it was ready`)));
      child.stdout?.on('data', (d: Buffer) => {
        said += d.toString();
        if (!said.split('\n').includes(KEEPER_READY)) return;
        clearTimeout(timer);
        child.stdout?.destroy(); // nothing more to hear
        resolve();
      });
    });
    // The keeper must not keep thaw alive (a CLI exits after its restore, and a keeper left guarding
    // tasks that could not be killed must outlive it); only the wait for "ready" does, and the
    // last moments after release().
    (child.stdin as unknown as Socket | null)?.unref?.();
    this.ready.then(
      () => this.#released === undefined && child.unref(),
      () => child.unref(),
    );
    child.stdin?.on('error', () => undefined); // EPIPE once the keeper is gone: release() sees the exit
  }

  /**
   * Starts the keeper. The fork happens before this returns, so the keeper holds its duplicates of
   * the userfaultfds from here on (before its node has even started). Throws ShimError when the
   * spawn fails at once; later failures reject `ready`.
   */
  static spawn(opts: PageKeeperOptions): PageKeeper {
    const config: PageKeeperConfig = {
      id: opts.id,
      uffds: opts.uffds.map((_, i) => 3 + i),
      targets: opts.targets,
      killTimeoutMs: opts.killTimeoutMs ?? 30_000,
      cgroupInodes: cgroupInodes(opts.targets.cgroupDirs),
    };
    const node = opts.node ?? { file: process.execPath, args: process.execArgv };
    let logFd: number;
    try {
      logFd = openSync(opts.logPath, 'a', 0o600);
    } catch (err) {
      throw new ShimError('Unavailable', `page keeper: cannot open its log ${opts.logPath}: ${(err as Error).message}`, { cause: err });
    }
    try {
      const nodeArgv = [node.file, ...node.args, opts.entry ?? defaultKeeperEntry(), JSON.stringify(config)];
      const child = spawn(opts.shell ?? '/bin/sh', ['-c', WAIT_SCRIPT, 'thaw-page-keeper', JSON.stringify(opts.id), ...nodeArgv], {
        // 0: thaw → keeper ("done"; EOF = thaw died), 1: keeper → thaw ("ready"), 2: the log, 3…: uffds.
        stdio: ['pipe', 'pipe', logFd, ...opts.uffds],
        detached: true, // own session and process group
        cwd: '/', // pins no mount
        env: node.env ?? process.env,
      });
      const keeper = new PageKeeper(child, opts);
      opts.log?.debug({ phase: 'page-keeper', pid: child.pid, uffds: opts.uffds.length }, 'page keeper spawned');
      return keeper;
    } catch (err) {
      throw new ShimError('Unavailable', `page keeper: spawn failed: ${(err as Error).message}`, { cause: err });
    } finally {
      closeSync(logFd);
    }
  }

  get pid(): number | undefined {
    return this.#child.pid;
  }

  release(): Promise<void> {
    this.#released ??= new Promise<void>((resolve) => {
      const stdin = this.#child.stdin;
      if (this.#exit !== undefined || stdin === null || stdin.destroyed) {
        resolve();
        return;
      }
      this.#child.ref(); // it exits right after reading "done"
      void this.exited.then(() => resolve());
      stdin.once('error', () => resolve());
      // Resolves once flushed: a CLI may exit right after, and an unflushed "done" would read as EOF.
      stdin.end(`${KEEPER_DONE} ${Date.now()}\n`, () => resolve());
    });
    return this.#released;
  }
}

// ---------------------------------------------------------------------------------------------
// The keeper's side (page-keeper-main.ts).

/** Runs the keeper until thaw releases it or dies; returns the exit code (0: done or all killed). */
export async function runPageKeeper(config: PageKeeperConfig, io: { input: NodeJS.ReadableStream; log: Logger; ready: () => void }): Promise<number> {
  const log = io.log.child({ id: config.id });
  const t0 = performance.now();
  const inodes = config.cgroupInodes ?? cgroupInodes(config.targets.cgroupDirs);
  log.info({ phase: 'page-keeper', uffds: config.uffds.map((fd) => ({ fd, file: fdTarget(fd) })), targets: config.targets }, 'page keeper holding the userfaultfds');
  const verdict = await new Promise<'done' | 'eof'>((resolve) => {
    let text = '';
    io.input.on('data', (d: Buffer | string) => {
      text += d.toString();
      if (text.split('\n').some((l) => l.split(' ')[0] === KEEPER_DONE)) resolve('done');
    });
    io.input.once('end', () => resolve('eof'));
    io.input.once('close', () => resolve('eof'));
    io.input.once('error', () => resolve('eof'));
    io.ready();
  });
  if (verdict === 'done') {
    closeAll(config.uffds);
    log.info({ phase: 'page-keeper', durationMs: Math.round(performance.now() - t0) }, 'released (every page in, or the tasks already killed); userfaultfds closed');
    return 0;
  }
  log.warn({ phase: 'page-keeper', durationMs: Math.round(performance.now() - t0) }, 'thaw went away before every page was in: killing the restored container');
  const k0 = performance.now();
  const guarded = Object.keys(inodes);
  const current = guarded.filter((dir) => inodeOf(dir) === inodes[dir]);
  if (current.length < guarded.length) log.warn({ phase: 'page-keeper', dirs: guarded.filter((d) => !current.includes(d)) }, 'cgroups re-created since: left alone');
  const result = await killTargets({ ...config.targets, cgroupDirs: current }, config.killTimeoutMs);
  // Only now: with a task alive, closing its userfaultfd would hand it zero pages.
  closeAll(config.uffds);
  if (result.alive.length > 0) {
    log.error({ phase: 'page-keeper', pids: result.alive, killed: result.killed, durationMs: Math.round(performance.now() - k0) }, 'restored processes did not die; userfaultfds closed anyway');
    return 1;
  }
  log.info({ phase: 'page-keeper', killed: result.killed, durationMs: Math.round(performance.now() - k0) }, 'restored container killed; userfaultfds closed');
  return 0;
}

/**
 * SIGKILLs everything in the targets until nothing is left alive (zombies count as dead: their
 * memory is gone) or the deadline passes. Repeats, since a task may fork until it is killed.
 */
export async function killTargets(targets: PageKeeperTargets, timeoutMs: number): Promise<{ killed: number[]; alive: number[] }> {
  const killed = new Set<number>();
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const victims = liveTargets(targets);
    if (victims.length === 0) return { killed: [...killed], alive: [] };
    for (const dir of targets.cgroupDirs) {
      try {
        writeFileSync(join(dir, 'cgroup.kill'), '1'); // cgroup v2 (≥ 5.14): the whole subtree, forks included
      } catch {
        // v1, absent or already gone: the SIGKILLs below do it
      }
    }
    for (const pid of victims) {
      killed.add(pid);
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone meanwhile (cgroup.kill was quicker)
      }
    }
    if (performance.now() > deadline) return { killed: [...killed], alive: liveTargets(targets) };
    await sleep(20);
  }
}

/** Every live (not zombie) process the targets name, this process excepted. */
function liveTargets(targets: PageKeeperTargets): number[] {
  const table = procTable();
  const roots = new Set<number>(cgroupProcs(targets.cgroupDirs));
  for (const { pid, startTime } of targets.pids ?? []) {
    const st = table.get(pid);
    if (st !== undefined && (startTime === 0 || st.startTime === startTime)) roots.add(pid);
  }
  if ((targets.holderPrefixes ?? []).length > 0) for (const pid of holdersOf(targets.holderPrefixes ?? [], table.keys())) roots.add(pid);
  return processTree(roots, table).filter((pid) => {
    const state = table.get(pid)?.state;
    return pid !== process.pid && state !== undefined && state !== 'Z' && state !== 'X';
  });
}

function inodeOf(path: string): string | undefined {
  try {
    return String(statSync(path, { bigint: true }).ino);
  } catch {
    return undefined;
  }
}

/** Inode of each of `dirs` that exists. */
function cgroupInodes(dirs: readonly string[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (const dir of dirs) {
    const ino = inodeOf(dir);
    if (ino !== undefined) out[dir] = ino;
  }
  return out;
}

function closeAll(fds: readonly number[]): void {
  for (const fd of fds) {
    try {
      closeSync(fd);
    } catch {
      // not open
    }
  }
}
