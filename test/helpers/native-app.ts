import { closeSync, existsSync, readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import type { RelayRecord } from '../../src/engine/native.js';
import { procStat } from '../../src/procfs.js';
import { until } from './wait.js';

/**
 * What the native-engine integration tests share about the demo app they run in runc containers:
 * its output lines, its SIGUSR1 memory check, the stdio relays and cgroups the engine leaves behind.
 */

export function closeQuietly(fd: number): void {
  try {
    closeSync(fd);
  } catch {
    // closed
  }
}

/** The non-empty lines of the app's output file. */
export function lines(path: string): string[] {
  return readFileSync(path, 'utf8')
    .split('\n')
    .filter((l) => l !== '');
}

/** test/helpers/wait.ts's `until`, with these tests' defaults (60 s, every 50 ms). */
export const waitFor = <T>(what: string, fn: () => T | undefined, timeoutMs = 60_000): Promise<T> => until(what, fn, timeoutMs, 50);

/** Sends SIGUSR1 and waits for the app's verdict on its memory. */
export async function verify(pid: number, path: string, timeoutMs = 60_000): Promise<string> {
  const before = lines(path).length;
  process.kill(pid, 'SIGUSR1');
  return waitFor('VERIFY line', () => lines(path).slice(before).find((l) => l.startsWith('VERIFY ')), timeoutMs);
}

/** The relays among `relays` still running (same start time: pids are reused). */
export function relaysAlive(relays: readonly RelayRecord[]): RelayRecord[] {
  return relays.filter((r) => {
    const st = procStat(r.pid);
    return st !== null && st.state !== 'Z' && st.startTime === r.startTime;
  });
}

/** Cgroup directories named after `rid` anywhere under /sys/fs/cgroup (v1 controllers and v2). */
export function cgroupDirsOf(rid: string): string[] {
  const base = '/sys/fs/cgroup';
  return [join(base, 'thaw', rid), ...readdirSync(base).map((c) => join(base, c, 'thaw', rid))].filter((p) => existsSync(p));
}
