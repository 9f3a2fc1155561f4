import { readdir, readFile } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';

/** Polling helpers for integration tests (container output files, runtime state). */

/** Polls `fn` until it returns something other than undefined; throws naming `what` on timeout. */
export async function until<T>(what: string, fn: () => Promise<T | undefined> | T | undefined, timeoutMs = 30_000, everyMs = 20): Promise<T> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const value = await fn();
    if (value !== undefined) return value;
    if (performance.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(everyMs);
  }
}

/** Complete lines of `file` ('' when missing); a trailing partial line is left out. */
export async function readLines(file: string): Promise<string[]> {
  const text = await readFile(file, 'utf8').catch(() => '');
  const lines = text.split('\n');
  lines.pop();
  return lines;
}

export interface WaitForLineOptions {
  timeoutMs?: number;
  /** Only lines at index >= this count (e.g. lines written after some point). */
  fromLine?: number;
}

/** The first line of `file` matching `pattern` (with its match and index). */
export async function waitForLine(
  file: string,
  pattern: RegExp,
  { timeoutMs = 60_000, fromLine = 0 }: WaitForLineOptions = {},
): Promise<{ line: string; match: RegExpExecArray; index: number }> {
  return until(
    `${pattern} in ${file}`,
    async () => {
      const lines = await readLines(file);
      for (let i = fromLine; i < lines.length; i++) {
        const match = pattern.exec(lines[i]!);
        if (match) return { line: lines[i]!, match, index: i };
      }
      return undefined;
    },
    timeoutMs,
  );
}

/** The demo app's tick numbers in `file`, in order. */
export async function ticks(file: string): Promise<number[]> {
  return (await readLines(file)).flatMap((l) => {
    const m = /^TICK n=(\d+) /.exec(l);
    return m ? [Number(m[1])] : [];
  });
}

/** Pids whose parent is `pid` (from /proc/<pid>/stat). */
export async function childPids(pid: number): Promise<number[]> {
  const out: number[] = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const stat = await readFile(`/proc/${name}/stat`, 'utf8').catch(() => '');
    // Field 4 (ppid) follows the parenthesised command name, which may itself hold spaces.
    const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
    if (ppid === pid) out.push(Number(name));
  }
  return out;
}

/** True while `pid` exists and is not a zombie. */
export async function isRunning(pid: number): Promise<boolean> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  const state = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0];
  return stat !== '' && state !== 'Z' && state !== 'X';
}
