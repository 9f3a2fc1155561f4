import { randomBytes } from 'node:crypto';
import { unlinkSync } from 'node:fs';
import { link, open, readFile, rename, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { pidExists } from '../procfs.js';

/**
 * Cross-process lock files: `<dir>/<name>.lock` holding the owner's pid, the owner's start time and
 * a random token.
 *
 * Why not flock(2): Node has no flock without a native addon, and the locks must work between
 * separate processes (one shim per container, plus the `thaw` CLI). Instead a lock file is created
 * atomically and its owner's liveness decides staleness: a lock whose pid is dead (or a zombie, or
 * reused by a process that started later) is stale and may be broken.
 *
 * Creation uses link(2) of a fully written, fsynced temp file onto the lock path: like
 * open(O_CREAT|O_EXCL) it fails with EEXIST when the lock exists, but the file appears with its
 * content already in place, so a reader never sees a half-written lock and mistakes it for stale.
 *
 * All processes sharing a store must see one pid namespace (shims and the CLI run on the host).
 */
export interface LockOwner {
  pid: number;
  /** Process start time in clock ticks since boot (/proc/<pid>/stat field 22); '' when unknown. */
  startTime: string;
  /** Unique per acquisition, so a release never removes somebody else's lock. */
  token: string;
  createdAt: string;
}

export interface HeldLock {
  readonly path: string;
  readonly owner: LockOwner;
  /** Removes the lock file if it is still ours. Idempotent. */
  release(): Promise<void>;
}

export type TryLockResult = { acquired: true; lock: HeldLock } | { acquired: false; owner: LockOwner | undefined };

/** Locks held by this process, removed synchronously if the process exits while holding them. */
const heldPaths = new Set<string>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.once('exit', () => {
    for (const p of heldPaths) {
      try {
        unlinkSync(p);
      } catch {
        // Already gone; nothing else can be done while exiting.
      }
    }
  });
}

/**
 * Tries once to take the lock at `path`. A stale lock (dead owner, or unreadable content) is broken
 * and the acquisition retried once; a live owner means `{acquired: false, owner}`.
 */
export async function tryLock(path: string): Promise<TryLockResult> {
  const owner: LockOwner = {
    pid: process.pid,
    startTime: await ownStartTime(),
    token: randomBytes(12).toString('hex'),
    createdAt: new Date().toISOString(),
  };
  for (let attempt = 0; attempt < 2; attempt++) {
    if (await createLockFile(path, owner)) return { acquired: true, lock: heldLock(path, owner) };
    const current = await readLockOwner(path);
    if (current === 'missing') continue; // released between our link and read: try again
    if (current !== 'unreadable' && (await isOwnerAlive(current))) return { acquired: false, owner: current };
    await breakStaleLock(path, current);
  }
  const current = await readLockOwner(path);
  return { acquired: false, owner: typeof current === 'string' ? undefined : current };
}

/** True when a lock exists at `path` and its owner is alive. */
export async function isLocked(path: string): Promise<boolean> {
  const current = await readLockOwner(path);
  if (current === 'missing') return false;
  if (current === 'unreadable') return false;
  return isOwnerAlive(current);
}

/** Removes the lock at `path` if its owner is dead; returns true if it removed one. */
export async function removeIfStale(path: string): Promise<boolean> {
  const current = await readLockOwner(path);
  if (current === 'missing') return false;
  if (current !== 'unreadable' && (await isOwnerAlive(current))) return false;
  return breakStaleLock(path, current);
}

function heldLock(path: string, owner: LockOwner): HeldLock {
  heldPaths.add(path);
  installExitHook();
  let released = false;
  return {
    path,
    owner,
    async release() {
      if (released) return;
      released = true;
      heldPaths.delete(path);
      const current = await readLockOwner(path);
      if (typeof current !== 'string' && current.token === owner.token) await unlink(path).catch(ignoreMissing);
    },
  };
}

async function createLockFile(path: string, owner: LockOwner): Promise<boolean> {
  const tmp = join(dirname(path), `.${basename(path)}.${owner.pid}.${owner.token}`);
  const fh = await open(tmp, 'wx', 0o600);
  try {
    await fh.writeFile(JSON.stringify(owner));
    await fh.sync();
  } finally {
    await fh.close();
  }
  try {
    await link(tmp, path);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw err;
  } finally {
    await unlink(tmp).catch(ignoreMissing);
  }
}

/**
 * Breaks a stale lock without ever removing a live one: the lock is first renamed to a unique name
 * (atomic, whatever is there moves), then the moved file is compared with what was judged stale. If
 * another process broke it and took the lock in between, its lock is linked back in place.
 */
async function breakStaleLock(path: string, judged: LockOwner | 'unreadable'): Promise<boolean> {
  const aside = join(dirname(path), `.${basename(path)}.stale.${process.pid}.${randomBytes(6).toString('hex')}`);
  try {
    await rename(path, aside);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw err;
  }
  const moved = await readLockOwner(aside);
  const sameAsJudged =
    typeof moved === 'string' ? judged === 'unreadable' : judged !== 'unreadable' && moved.token === judged.token;
  if (!sameAsJudged && typeof moved !== 'string' && (await isOwnerAlive(moved))) {
    await link(aside, path).catch(() => undefined); // put the live lock back (EEXIST: a newer one won)
    await unlink(aside).catch(ignoreMissing);
    return false;
  }
  await unlink(aside).catch(ignoreMissing);
  return true;
}

async function readLockOwner(path: string): Promise<LockOwner | 'missing' | 'unreadable'> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return 'missing';
    throw err;
  }
  try {
    const v = JSON.parse(text) as Partial<LockOwner>;
    if (!Number.isSafeInteger(v.pid) || typeof v.startTime !== 'string' || typeof v.token !== 'string') return 'unreadable';
    return { pid: v.pid!, startTime: v.startTime, token: v.token, createdAt: String(v.createdAt ?? '') };
  } catch {
    return 'unreadable';
  }
}

/** Owner alive = its pid exists, is not a zombie, and (when known) started when the owner did. */
export async function isOwnerAlive(owner: Pick<LockOwner, 'pid' | 'startTime'>): Promise<boolean> {
  if (owner.pid <= 0) return false;
  const stat = await readProcStat(owner.pid);
  if (stat === 'no-proc') return pidExists(owner.pid);
  if (stat === undefined) return false;
  if (stat.state === 'Z' || stat.state === 'X') return false;
  return owner.startTime === '' || stat.startTime === owner.startTime;
}

let ownStart: Promise<string> | undefined;
/** This process's start time (clock ticks since boot), '' where /proc is unavailable. */
export function ownStartTime(): Promise<string> {
  ownStart ??= readProcStat(process.pid).then((s) => (s === undefined || s === 'no-proc' ? '' : s.startTime));
  return ownStart;
}

interface ProcStat {
  state: string;
  startTime: string;
}

async function readProcStat(pid: number): Promise<ProcStat | undefined | 'no-proc'> {
  let text: string;
  try {
    text = await readFile(`/proc/${pid}/stat`, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ESRCH') {
      return (await procMounted()) ? undefined : 'no-proc';
    }
    return 'no-proc';
  }
  // comm (field 2) is in parentheses and may hold spaces or ')': parse after the last ')'.
  const rest = text.slice(text.lastIndexOf(')') + 2).split(' ');
  const state = rest[0];
  const startTime = rest[19]; // field 22 overall; `rest` starts at field 3
  if (state === undefined || startTime === undefined) return 'no-proc';
  return { state, startTime };
}

let procCheck: Promise<boolean> | undefined;
function procMounted(): Promise<boolean> {
  procCheck ??= readFile('/proc/self/stat', 'utf8').then(
    () => true,
    () => false,
  );
  return procCheck;
}

function ignoreMissing(err: unknown): void {
  if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
}

/**
 * Removes stale locks in `dir` and the temp files a crashed `tryLock` may have left
 * (`.<name>.lock.<pid>.<token>`, `.<name>.lock.stale.<pid>.<rand>`). Returns the removed names.
 */
export async function cleanStaleLocks(dir: string, names: readonly string[]): Promise<string[]> {
  const removed: string[] = [];
  for (const name of names) {
    const path = join(dir, name);
    if (!name.startsWith('.')) {
      if (name.endsWith('.lock') && (await removeIfStale(path))) removed.push(name);
      continue;
    }
    const pid = Number(/\.lock\.(?:stale\.)?(\d+)\.[0-9a-f]+$/.exec(name)?.[1] ?? NaN);
    if (Number.isSafeInteger(pid) && (await isOwnerAlive({ pid, startTime: '' }))) continue;
    await unlink(path).catch(ignoreMissing);
    removed.push(name);
  }
  return removed;
}
