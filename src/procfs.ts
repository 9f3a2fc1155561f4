import { readFileSync, readdirSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';

/**
 * What the native engine and the page keeper read from /proc and cgroupfs to find and kill
 * processes: synchronous, and a process that vanishes while it is read counts as gone, never as an
 * error. Imports only node:fs, so the page keeper's process stays small.
 */

export interface ProcStat {
  /** R, S, D, Z, T, X, … */
  state: string;
  ppid: number;
  /** Clock ticks since boot (field 22): tells a reused pid apart. */
  startTime: number;
  /** waitpid-style status (field 52), meaningful for zombies. */
  exitCode: number;
}

/** /proc/<pid>/stat, or null when there is no such process. */
export function procStat(pid: number): ProcStat | null {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return null;
  }
  // comm may hold spaces and parentheses: fields start after the last ')'.
  const f = text.slice(text.lastIndexOf(')') + 2).trim().split(' ');
  return { state: f[0] ?? '', ppid: Number(f[1] ?? 0), startTime: Number(f[19] ?? 0), exitCode: Number(f[49] ?? 0) };
}

/** Pids of /proc, read once. */
export function allPids(): number[] {
  let names: string[];
  try {
    names = readdirSync('/proc');
  } catch {
    return [];
  }
  return names.filter((n) => /^\d+$/.test(n)).map(Number);
}

/** /proc/<pid>/stat of every process, read once. */
export function procTable(): Map<number, ProcStat> {
  const out = new Map<number, ProcStat>();
  for (const pid of allPids()) {
    const st = procStat(pid);
    if (st !== null) out.set(pid, st);
  }
  return out;
}

/** Where /proc/<pid>/fd/<fd> points ('' when it cannot be read). */
export function fdTarget(fd: number | string, pid: number | 'self' = 'self'): string {
  try {
    return readlinkSync(`/proc/${pid}/fd/${fd}`);
  } catch {
    return '';
  }
}

/** A process's working directory ('' when it cannot be read). */
export function cwdOf(pid: number): string {
  try {
    return readlinkSync(`/proc/${pid}/cwd`);
  } catch {
    return '';
  }
}

/** Processes (this one excepted) holding an open file whose path starts with one of `prefixes`. */
export function holdersOf(prefixes: readonly string[], pids: Iterable<number> = allPids()): number[] {
  const out: number[] = [];
  for (const pid of pids) {
    if (pid === process.pid) continue;
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${pid}/fd`);
    } catch {
      continue;
    }
    if (fds.some((fd) => prefixes.some((p) => fdTarget(fd, pid).startsWith(p)))) out.push(pid);
  }
  return out;
}

/** `roots` and all their descendants, by the parent pids in `table`. */
export function processTree(roots: Iterable<number>, table: ReadonlyMap<number, ProcStat> = procTable()): number[] {
  const children = new Map<number, number[]>();
  for (const [pid, st] of table) children.set(st.ppid, [...(children.get(st.ppid) ?? []), pid]);
  const out = new Set<number>();
  const queue = [...roots];
  for (let pid = queue.pop(); pid !== undefined; pid = queue.pop()) {
    if (out.has(pid)) continue;
    out.add(pid);
    queue.push(...(children.get(pid) ?? []));
  }
  return [...out];
}

/** Every pid listed in `cgroup.procs` of the given cgroup directories. */
export function cgroupProcs(dirs: readonly string[]): number[] {
  const pids = new Set<number>();
  for (const dir of dirs) {
    let text = '';
    try {
      text = readFileSync(join(dir, 'cgroup.procs'), 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n')) if (/^\d+$/.test(line)) pids.add(Number(line));
  }
  return [...pids];
}

/** Whether a process with this pid exists (signal 0; EPERM means it exists but is not ours). */
export function pidExists(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Every thread's children: the kernel lists a child under the thread that forked it or adopted it. */
export function childrenOfThisProcess(): number[] {
  const pids: number[] = [];
  let tids: string[];
  try {
    tids = readdirSync('/proc/self/task');
  } catch {
    return pids;
  }
  for (const tid of tids) {
    let text = '';
    try {
      text = readFileSync(`/proc/self/task/${tid}/children`, 'utf8');
    } catch {
      continue; // the thread ended
    }
    for (const word of text.split(' ')) {
      const pid = Number(word);
      if (word !== '' && Number.isSafeInteger(pid) && pid > 0) pids.push(pid);
    }
  }
  return pids;
}

/** How many file descriptors this process has open. */
export function openFdCount(): number {
  try {
    return readdirSync('/proc/self/fd').length - 1; // less the one reading the directory
  } catch {
    return 0;
  }
}
