import { spawn, type ChildProcess, type StdioNull, type StdioPipe } from 'node:child_process';

/**
 * Runs one command to completion for Runsc's single exec point (`#run`), on node:child_process
 * directly. This replaced execa there: the shim runs runsc five or more times per container, and
 * execa spent 4-9 ms more per call than a plain spawn (dev VM), besides ~130 module files to load.
 * What Runsc relied on is kept: a timeout and an AbortSignal that kill the child (SIGTERM, then
 * SIGKILL after `forceKillAfterMs`), fds handed through as they are, bounded capture of stdout and
 * stderr, and children killed when this process exits.
 */

/** One stdio slot: an open fd (inherited as it is), nothing, or a captured pipe. */
export type CommandStdio = number | 'ignore' | 'pipe';

export interface CommandOptions {
  stdio: readonly [CommandStdio, CommandStdio, CommandStdio];
  /** ms; 0 = none. */
  timeoutMs: number;
  signal?: AbortSignal;
  /** After SIGTERM (timeout or abort), SIGKILL if the child is still there. */
  forceKillAfterMs: number;
  /** Per captured stream; the child is killed once one exceeds it. */
  maxBufferBytes: number;
}

export interface CommandResult {
  /** Captured text ('' for a slot that was not a pipe). */
  stdout: string;
  stderr: string;
  /** undefined when it never ran or a signal ended it. */
  exitCode: number | undefined;
  signal: NodeJS.Signals | undefined;
  timedOut: boolean;
  canceled: boolean;
  /** Set when the command could not be started (no binary, not executable, bad fd). */
  spawnError: Error | undefined;
  /** Set when a captured stream went over `maxBufferBytes`. */
  overflow: boolean;
  /** ok: ran, exited 0, nothing above happened. */
  ok: boolean;
}

/** Children still running, killed if this process exits first (execa did the same). */
const running = new Set<ChildProcess>();
let exitHookInstalled = false;

function killOnExit(child: ChildProcess): void {
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.once('exit', () => {
      for (const c of running) c.kill('SIGTERM');
    });
  }
  running.add(child);
}

export function runCommand(file: string, args: readonly string[], opts: CommandOptions): Promise<CommandResult> {
  return new Promise<CommandResult>((resolve) => {
    const out = { stdout: '', stderr: '', timedOut: false, canceled: false, overflow: false };
    let child: ChildProcess;
    try {
      child = spawn(file, args, { stdio: opts.stdio.map(nodeStdio) });
    } catch (err) {
      // spawn throws synchronously for some argument errors (e.g. a closed fd)
      resolve(finish(out, undefined, undefined, err instanceof Error ? err : new Error(String(err))));
      return;
    }
    killOnExit(child);
    let spawnError: Error | undefined;
    let forceTimer: NodeJS.Timeout | undefined;
    let stopped = false;
    const stop = (): void => {
      stopped = true;
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill('SIGTERM');
      forceTimer ??= setTimeout(() => child.kill('SIGKILL'), opts.forceKillAfterMs);
      forceTimer.unref();
    };
    const timer = opts.timeoutMs > 0 ? setTimeout(() => ((out.timedOut = true), stop()), opts.timeoutMs) : undefined;
    const onAbort = (): void => {
      out.canceled = true;
      stop();
    };
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    const capture = (stream: NodeJS.ReadableStream | null, key: 'stdout' | 'stderr'): void => {
      stream?.setEncoding('utf8');
      stream?.on('data', (chunk: string) => {
        if (out[key].length + chunk.length > opts.maxBufferBytes) {
          out.overflow = true;
          stop();
          return;
        }
        out[key] += chunk;
      });
    };
    capture(child.stdout, 'stdout');
    capture(child.stderr, 'stderr');
    child.once('error', (err) => {
      // Emitted when it could not be started (then no 'close' may follow) or could not be killed.
      spawnError ??= err;
      if (child.pid === undefined) done(undefined, undefined);
    });
    // 'close': exited and its captured pipes are drained (fds handed over are not waited for).
    child.once('close', (code, signal) => done(code ?? undefined, signal ?? undefined));
    // Once we killed it, its exit is enough: a process it left behind may hold the pipes for long.
    child.once('exit', (code, signal) => {
      if (!stopped) return;
      child.stdout?.destroy();
      child.stderr?.destroy();
      done(code ?? undefined, signal ?? undefined);
    });
    let settled = false;
    function done(code: number | undefined, signal: NodeJS.Signals | undefined): void {
      if (settled) return;
      settled = true;
      running.delete(child);
      if (timer !== undefined) clearTimeout(timer);
      if (forceTimer !== undefined) clearTimeout(forceTimer);
      opts.signal?.removeEventListener('abort', onAbort);
      resolve(finish(out, code, signal, child.pid === undefined ? spawnError : undefined));
    }
  });
}

function finish(
  out: { stdout: string; stderr: string; timedOut: boolean; canceled: boolean; overflow: boolean },
  exitCode: number | undefined,
  signal: NodeJS.Signals | undefined,
  spawnError: Error | undefined,
): CommandResult {
  const ok = spawnError === undefined && exitCode === 0 && !out.timedOut && !out.canceled && !out.overflow;
  return { ...out, exitCode, signal, spawnError, ok };
}

function nodeStdio(slot: CommandStdio): number | StdioNull | StdioPipe {
  return slot;
}
