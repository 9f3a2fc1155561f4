import { randomBytes } from 'node:crypto';
import type { Stats } from 'node:fs';
import { lstat, mkdir, open, readdir, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { SnapshotError } from '../errors.js';
import { defaultConfig } from '../config/config.js';
import { silentLogger, type Logger } from '../log/logger.js';
import type { GpuCheckpointRecord } from '../engine/engine.js';
import { WasmXxh64Hasher, type FileHasher } from './hash.js';
import { computeKey, isSnapshotKey, type KeyInputs } from './key.js';
import { cleanStaleLocks, isLocked, isOwnerAlive, ownStartTime, tryLock, type HeldLock } from './lock.js';
import {
  MANIFEST_NAME,
  MANIFEST_SCHEMA_VERSION,
  readManifest,
  writeManifest,
  type JsonValue,
  type Manifest,
  type ManifestFile,
} from './manifest.js';

/**
 * The on-disk snapshot store. Layout under `root` (mode 0700):
 *
 *   snapshots/<key>/      committed: manifest.json, image/ (the runtime's checkpoint files), and
 *                         any other subdirectories the engine wrote (gpu/, …)
 *   tmp/<owner>-<rand>/   in progress (and removals, manifest rewrites); <owner> = pid-starttime
 *   locks/<key>.lock      per-key lock (see lock.ts)
 *
 * One snapshot per key. A checkpoint is written into tmp/ under the key's lock, hashed, fsynced and
 * renamed into snapshots/ in one step, so a snapshot is either complete or invisible. A process
 * killed mid-checkpoint leaves a tmp/ entry and a lock whose owner is dead; `open()` removes both.
 * Several processes (one shim per container, the CLI) share a store; nothing here spawns processes.
 */
export interface SnapshotInfo {
  key: string;
  /** `<root>/snapshots/<key>`; manifest file paths are relative to it. */
  dir: string;
  /** `<dir>/image`: what the engine restores from. */
  imageDir: string;
  manifest: Manifest;
}

/** A committed snapshot whose manifest cannot be used (never restored; first to go in gc). */
export interface BrokenSnapshot {
  key: string;
  dir: string;
  problem: string;
  bytes: number;
}

export interface OpenStoreOptions {
  /** Default: ThawConfig's default store path. */
  root?: string;
  log?: Logger;
  /** Default: xxhash-wasm XXH64. */
  hasher?: FileHasher;
  /** Files hashed at once in commit and verify (disk bound; 2 suits small machines). */
  hashConcurrency?: number;
}

export interface BeginOptions {
  /** Recorded in the manifest: the source container keeps running after the checkpoint. */
  leaveRunning?: boolean;
}

export interface CommitOptions {
  /** Must hash to the pending snapshot's key. */
  keyInputs: KeyInputs;
  /** Engine name (gvisor | native). */
  engine: string;
  /** Checkpoint phase timings in ms. */
  timings?: Record<string, number>;
  gpu?: GpuCheckpointRecord | null;
  /** Default: keyInputs.engine.identity.version. */
  runtimeVersion?: string | null;
  /** Default: keyInputs.engine.identity.platform. */
  platform?: string | null;
  extra?: Record<string, JsonValue>;
  signal?: AbortSignal;
}

export interface VerifyOptions {
  /** Check presence and sizes only, no hashing (cheap enough for every lookup). */
  quick?: boolean;
  signal?: AbortSignal;
}

export interface VerifyResult {
  key: string;
  files: number;
  bytes: number;
  hashed: boolean;
  durationMs: number;
}

export interface GcOptions {
  maxBytes: number;
}

export interface Evicted {
  key: string;
  bytes: number;
  reason: 'broken' | 'least-recently-used';
}

export interface GcResult {
  removed: Evicted[];
  /** Store size after gc. */
  totalBytes: number;
  /** Locked snapshots that would otherwise have been evicted. */
  skippedLocked: string[];
}

const SNAPSHOTS = 'snapshots';
const TMP = 'tmp';
const LOCKS = 'locks';
const IMAGE = 'image';
const DIR_MODE = 0o700;
/** How long recordRestore waits for a key lock held by a concurrent recordRestore/remove. */
const RECORD_LOCK_WAIT_MS = 2_000;

export class SnapshotStore {
  readonly root: string;
  readonly hasher: FileHasher;
  readonly #log: Logger;
  readonly #hashConcurrency: number;
  /** `<pid>-<starttime>`: prefixes this process's tmp/ entries so open() can tell leftovers. */
  readonly #owner: string;

  private constructor(root: string, log: Logger, hasher: FileHasher, hashConcurrency: number, owner: string) {
    this.root = root;
    this.#log = log;
    this.hasher = hasher;
    this.#hashConcurrency = hashConcurrency;
    this.#owner = owner;
  }

  /** Creates the layout (mode 0700) and removes what dead processes left in tmp/ and locks/. */
  static async open({ root = defaultConfig.store.path, log = silentLogger, hasher = new WasmXxh64Hasher(), hashConcurrency = 2 }: OpenStoreOptions = {}): Promise<SnapshotStore> {
    if (!Number.isSafeInteger(hashConcurrency) || hashConcurrency < 1) throw new RangeError('hashConcurrency must be a positive integer');
    await mkdir(root, { recursive: true, mode: DIR_MODE });
    for (const sub of [SNAPSHOTS, TMP, LOCKS]) await mkdir(join(root, sub), { recursive: true, mode: DIR_MODE });
    const store = new SnapshotStore(root, log, hasher, hashConcurrency, `${process.pid}-${await ownStartTime()}`);
    await store.#removeLeftovers();
    return store;
  }

  get snapshotsDir(): string {
    return join(this.root, SNAPSHOTS);
  }

  get tmpDir(): string {
    return join(this.root, TMP);
  }

  get locksDir(): string {
    return join(this.root, LOCKS);
  }

  snapshotDir(key: string): string {
    assertKey(key);
    return join(this.snapshotsDir, key);
  }

  lockPath(key: string): string {
    assertKey(key);
    return join(this.locksDir, `${key}.lock`);
  }

  /** The committed snapshot for `key`, or undefined. A snapshot with a bad manifest throws DataLoss. */
  async get(key: string): Promise<SnapshotInfo | undefined> {
    const dir = this.snapshotDir(key);
    if ((await lstatOrUndefined(dir)) === undefined) return undefined;
    const manifest = await readManifest(join(dir, MANIFEST_NAME), key);
    return { key, dir, imageDir: join(dir, IMAGE), manifest };
  }

  /** Usable committed snapshots, oldest first. */
  async list(): Promise<SnapshotInfo[]> {
    return (await this.#scan()).valid;
  }

  /** Committed snapshots whose manifest is unusable. */
  async broken(): Promise<BrokenSnapshot[]> {
    return (await this.#scan()).broken;
  }

  /** Bytes of all committed snapshots (usable and broken); in-progress checkpoints not counted. */
  async totalBytes(): Promise<number> {
    const { valid, broken } = await this.#scan();
    return sum(valid.map((s) => s.manifest.totalBytes)) + sum(broken.map((b) => b.bytes));
  }

  /**
   * Checks every file against the manifest: present, regular, of the recorded size, and (unless
   * `quick`) of the recorded hash; no unlisted files. Throws SnapshotError DataLoss naming every bad
   * file (`path` = the first), NotFound when there is no snapshot.
   */
  async verify(key: string, { quick = false, signal }: VerifyOptions = {}): Promise<VerifyResult> {
    const t0 = performance.now();
    const info = await this.get(key);
    if (!info) throw new SnapshotError('NotFound', `snapshot ${key} not found`, { key });
    const { manifest, dir } = info;
    const onDisk = (await listTree(dir)).files;
    onDisk.delete(MANIFEST_NAME);
    const problems: { path: string; what: string }[] = [];
    for (const f of manifest.files) {
      const st = onDisk.get(f.path);
      onDisk.delete(f.path);
      if (!st) problems.push({ path: f.path, what: 'is missing' });
      else if (!st.isFile()) problems.push({ path: f.path, what: 'is not a regular file' });
      else if (st.size !== f.bytes) problems.push({ path: f.path, what: `is ${st.size} bytes, manifest says ${f.bytes}` });
    }
    for (const extra of onDisk.keys()) problems.push({ path: extra, what: 'is not in the manifest' });
    if (!quick && problems.length === 0) {
      const wrongAlgo = manifest.files.find((f) => f.algo !== this.hasher.algo);
      if (wrongAlgo) {
        throw new SnapshotError(
          'FailedPrecondition',
          `snapshot ${key}: ${wrongAlgo.path} is hashed with ${wrongAlgo.algo}, this store's hasher computes ${this.hasher.algo}`,
          { key, path: join(dir, wrongAlgo.path) },
        );
      }
      await pool(manifest.files, this.#hashConcurrency, async (f) => {
        const got = await this.hasher.hashFile(join(dir, f.path), signal);
        if (got.bytes !== f.bytes) problems.push({ path: f.path, what: `read ${got.bytes} bytes, manifest says ${f.bytes}` });
        else if (got.hash !== f.hash) problems.push({ path: f.path, what: `${f.algo} is ${got.hash}, manifest says ${f.hash}` });
      });
    }
    if (problems.length > 0) {
      const first = problems[0]!;
      const detail = problems.map((p) => `${p.path} ${p.what}`).join('; ');
      throw new SnapshotError('DataLoss', `snapshot ${key} is damaged: ${detail}`, { key, path: join(dir, first.path) });
    }
    const durationMs = Math.round(performance.now() - t0);
    const result = { key, files: manifest.files.length, bytes: manifest.totalBytes, hashed: !quick, durationMs };
    this.#log.debug({ snapshot: key, bytes: result.bytes, durationMs, quick }, 'snapshot verified');
    return result;
  }

  /**
   * Starts a checkpoint of `key`: takes the key's lock and makes an empty directory in tmp/.
   * Throws AlreadyExists when the key has a committed snapshot or another checkpoint of it is in
   * progress (in this or another process), so concurrent checkpoints of one key yield one snapshot.
   */
  async begin(key: string, { leaveRunning = false }: BeginOptions = {}): Promise<PendingSnapshot> {
    const finalDir = this.snapshotDir(key);
    if (await lstatOrUndefined(finalDir)) throw alreadyCommitted(key, finalDir);
    const attempt = await tryLock(this.lockPath(key));
    if (!attempt.acquired) {
      const by = attempt.owner ? ` by pid ${attempt.owner.pid}` : '';
      throw new SnapshotError('AlreadyExists', `a checkpoint of snapshot ${key} is in progress${by}`, { key, path: this.lockPath(key) });
    }
    const lock = attempt.lock;
    try {
      // The other checkpoint may have committed between our first look and taking the lock.
      if (await lstatOrUndefined(finalDir)) throw alreadyCommitted(key, finalDir);
      const dir = join(this.tmpDir, `${this.#owner}-${randomBytes(6).toString('hex')}`);
      await mkdir(dir, { mode: DIR_MODE });
      await mkdir(join(dir, IMAGE), { mode: DIR_MODE });
      this.#log.debug({ snapshot: key, dir }, 'checkpoint begun');
      return new PendingSnapshot({ key, dir, leaveRunning, lock, commitFn: (p, o) => this.#commit(p, o, lock) });
    } catch (err) {
      await lock.release();
      throw err;
    }
  }

  async #commit(pending: PendingSnapshot, opts: CommitOptions, lock: HeldLock): Promise<SnapshotInfo> {
    const { key, dir } = pending;
    const t0 = performance.now();
    const computed = computeKey(opts.keyInputs);
    if (computed !== key) {
      throw new SnapshotError('InvalidArgument', `commit of snapshot ${key}: keyInputs hash to ${computed}`, { key });
    }
    const tree = await listTree(dir);
    if (tree.files.has(MANIFEST_NAME)) {
      throw new SnapshotError('InvalidArgument', `commit of snapshot ${key}: ${MANIFEST_NAME} is reserved for the store`, { key, path: join(dir, MANIFEST_NAME) });
    }
    for (const [path, st] of tree.files) {
      if (!st.isFile()) {
        throw new SnapshotError('FailedPrecondition', `commit of snapshot ${key}: ${path} is not a regular file`, { key, path: join(dir, path) });
      }
    }
    const paths = [...tree.files.keys()].sort();
    const files: ManifestFile[] = [];
    await pool(paths, this.#hashConcurrency, async (path) => {
      const abs = join(dir, path);
      const { hash, bytes } = await this.hasher.hashFile(abs, opts.signal);
      await fsyncPath(abs);
      const after = await lstat(abs);
      if (after.size !== bytes) {
        throw new SnapshotError('FailedPrecondition', `commit of snapshot ${key}: ${path} changed while being hashed`, { key, path: abs });
      }
      files.push({ path, bytes, hash, algo: this.hasher.algo });
    });
    files.sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
    const identity = opts.keyInputs.engine.identity;
    const manifest: Manifest = {
      schemaVersion: MANIFEST_SCHEMA_VERSION,
      key,
      keyInputs: opts.keyInputs,
      createdAt: new Date().toISOString(),
      files,
      totalBytes: sum(files.map((f) => f.bytes)),
      engine: opts.engine,
      runtimeVersion: opts.runtimeVersion !== undefined ? opts.runtimeVersion : (identity.version ?? null),
      platform: opts.platform !== undefined ? opts.platform : (identity.platform ?? null),
      gpu: opts.gpu ?? null,
      checkpoint: { timings: { ...(opts.timings ?? {}) }, leaveRunning: pending.leaveRunning },
      restoreCount: 0,
      lastRestoredAt: null,
      lastRestoreTimings: null,
      extra: opts.extra ?? {},
    };
    await writeManifest(join(dir, MANIFEST_NAME), manifest, join(dir, `.${MANIFEST_NAME}.tmp`));
    for (const d of [...tree.dirs].reverse()) await fsyncPath(join(dir, d));
    await fsyncPath(dir);
    const finalDir = this.snapshotDir(key);
    try {
      await rename(dir, finalDir);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOTEMPTY' || code === 'EEXIST') throw alreadyCommitted(key, finalDir);
      throw err;
    }
    await fsyncPath(this.snapshotsDir);
    await fsyncPath(this.tmpDir);
    await lock.release();
    const durationMs = Math.round(performance.now() - t0);
    this.#log.info({ snapshot: key, bytes: manifest.totalBytes, durationMs, phase: 'commit' }, 'snapshot committed');
    return { key, dir: finalDir, imageDir: join(finalDir, IMAGE), manifest };
  }

  /** Removes a committed snapshot. FailedPrecondition while its key is locked; NotFound if absent. */
  async remove(key: string): Promise<{ key: string; bytes: number }> {
    const lockPath = this.lockPath(key);
    const attempt = await tryLock(lockPath);
    if (!attempt.acquired) {
      throw new SnapshotError('FailedPrecondition', `snapshot ${key} is locked${attempt.owner ? ` by pid ${attempt.owner.pid}` : ''}`, { key, path: lockPath });
    }
    try {
      return await this.#removeLocked(key);
    } finally {
      await attempt.lock.release();
    }
  }

  async #removeLocked(key: string): Promise<{ key: string; bytes: number }> {
    const dir = this.snapshotDir(key);
    if ((await lstatOrUndefined(dir)) === undefined) throw new SnapshotError('NotFound', `snapshot ${key} not found`, { key });
    const bytes = sum([...(await listTree(dir)).files.values()].map((s) => s.size));
    // Renaming first makes the removal atomic to readers; the slow delete happens out of sight.
    const doomed = join(this.tmpDir, `${this.#owner}-removed-${key}-${randomBytes(4).toString('hex')}`);
    await rename(dir, doomed);
    await fsyncPath(this.snapshotsDir);
    await rm(doomed, { recursive: true, force: true });
    this.#log.info({ snapshot: key, bytes }, 'snapshot removed');
    return { key, bytes };
  }

  /**
   * Evicts snapshots until the store holds at most `maxBytes`: broken ones first, then the least
   * recently used (last restore, or creation when never restored; ties: oldest created). Locked
   * snapshots (checkpoint or restore bookkeeping in progress) are never evicted.
   */
  async gc({ maxBytes }: GcOptions): Promise<GcResult> {
    if (!Number.isSafeInteger(maxBytes) || maxBytes < 0) {
      throw new SnapshotError('InvalidArgument', `gc maxBytes must be a non-negative integer, got ${maxBytes}`, {});
    }
    const { valid, broken } = await this.#scan();
    let total = sum(valid.map((s) => s.manifest.totalBytes)) + sum(broken.map((b) => b.bytes));
    const lastUsed = (s: SnapshotInfo): string => s.manifest.lastRestoredAt ?? s.manifest.createdAt;
    const lru = [...valid].sort(
      (a, b) => cmp(lastUsed(a), lastUsed(b)) || cmp(a.manifest.createdAt, b.manifest.createdAt) || cmp(a.key, b.key),
    );
    const candidates: Evicted[] = [
      ...broken.map((b) => ({ key: b.key, bytes: b.bytes, reason: 'broken' as const })),
      ...lru.map((s) => ({ key: s.key, bytes: s.manifest.totalBytes, reason: 'least-recently-used' as const })),
    ];
    const removed: Evicted[] = [];
    const skippedLocked: string[] = [];
    for (const c of candidates) {
      if (total <= maxBytes) break;
      const attempt = await tryLock(this.lockPath(c.key));
      if (!attempt.acquired) {
        skippedLocked.push(c.key);
        continue;
      }
      try {
        const { bytes } = await this.#removeLocked(c.key);
        total -= c.reason === 'broken' ? bytes : c.bytes;
        removed.push(c);
      } catch (err) {
        if (!(err instanceof SnapshotError && err.code === 'NotFound')) throw err;
      } finally {
        await attempt.lock.release();
      }
    }
    if (total > maxBytes) this.#log.warn({ bytes: total, maxBytes, skippedLocked }, 'store still above its bound after gc');
    return { removed, totalBytes: total, skippedLocked };
  }

  /** Counts a restore in the manifest (atomic rewrite under the key's lock). */
  async recordRestore(key: string, timings: Record<string, number>): Promise<Manifest> {
    const lock = await this.#lockWaiting(key, RECORD_LOCK_WAIT_MS);
    try {
      const info = await this.get(key);
      if (!info) throw new SnapshotError('NotFound', `snapshot ${key} not found`, { key });
      const manifest: Manifest = {
        ...info.manifest,
        restoreCount: info.manifest.restoreCount + 1,
        lastRestoredAt: new Date().toISOString(),
        lastRestoreTimings: { ...timings },
      };
      await writeManifest(join(info.dir, MANIFEST_NAME), manifest, join(this.tmpDir, `${this.#owner}-manifest-${randomBytes(6).toString('hex')}`));
      await fsyncPath(info.dir);
      return manifest;
    } finally {
      await lock.release();
    }
  }

  /** True while some live process holds the key's lock. */
  async isLocked(key: string): Promise<boolean> {
    return isLocked(this.lockPath(key));
  }

  async #lockWaiting(key: string, waitMs: number): Promise<HeldLock> {
    const deadline = performance.now() + waitMs;
    for (;;) {
      const attempt = await tryLock(this.lockPath(key));
      if (attempt.acquired) return attempt.lock;
      if (performance.now() >= deadline) {
        throw new SnapshotError('Unavailable', `snapshot ${key} stayed locked${attempt.owner ? ` by pid ${attempt.owner.pid}` : ''} for ${waitMs} ms`, {
          key,
          path: this.lockPath(key),
        });
      }
      await sleep(20);
    }
  }

  async #scan(): Promise<{ valid: SnapshotInfo[]; broken: BrokenSnapshot[] }> {
    const valid: SnapshotInfo[] = [];
    const broken: BrokenSnapshot[] = [];
    for (const name of await readdir(this.snapshotsDir)) {
      if (!isSnapshotKey(name)) {
        this.#log.debug({ snapshot: name }, 'ignoring a non-snapshot entry in the store');
        continue;
      }
      try {
        const info = await this.get(name);
        if (info) valid.push(info);
      } catch (err) {
        if (!(err instanceof SnapshotError && err.code === 'DataLoss')) throw err;
        const dir = join(this.snapshotsDir, name);
        const bytes = sum([...(await listTree(dir).catch(() => ({ files: new Map<string, Stats>() }))).files.values()].map((s) => s.size));
        broken.push({ key: name, dir, problem: err.message, bytes });
      }
    }
    valid.sort((a, b) => cmp(a.manifest.createdAt, b.manifest.createdAt) || cmp(a.key, b.key));
    return { valid, broken };
  }

  /** tmp/ entries of dead owners, stale locks and lock temp files. */
  async #removeLeftovers(): Promise<void> {
    const removedTmp: string[] = [];
    for (const name of await readdir(this.tmpDir)) {
      const m = /^(\d+)-(\d*)-/.exec(name);
      if (m && (await isOwnerAlive({ pid: Number(m[1]), startTime: m[2] ?? '' }))) continue;
      await rm(join(this.tmpDir, name), { recursive: true, force: true });
      removedTmp.push(name);
    }
    const removedLocks = await cleanStaleLocks(this.locksDir, await readdir(this.locksDir));
    if (removedTmp.length + removedLocks.length > 0) {
      this.#log.info({ tmp: removedTmp, locks: removedLocks }, 'removed leftovers of interrupted checkpoints');
    }
  }
}

/**
 * A checkpoint in progress: the engine writes its image into `imageDir` (other subdirectories of
 * `dir` are allowed), then calls `commit`. Disposing it (`await using`) aborts unless committed.
 */
export class PendingSnapshot implements AsyncDisposable {
  readonly key: string;
  /** tmp/ directory that becomes `snapshots/<key>` on commit. */
  readonly dir: string;
  /** `<dir>/image`, created empty. */
  readonly imageDir: string;
  readonly leaveRunning: boolean;
  #state: 'open' | 'committing' | 'committed' | 'aborted' = 'open';
  #committing: Promise<SnapshotInfo> | undefined;
  readonly #lock: HeldLock;
  readonly #commitFn: (p: PendingSnapshot, o: CommitOptions) => Promise<SnapshotInfo>;

  /** @internal — made by SnapshotStore.begin. */
  constructor(args: {
    key: string;
    dir: string;
    leaveRunning: boolean;
    lock: HeldLock;
    commitFn: (p: PendingSnapshot, o: CommitOptions) => Promise<SnapshotInfo>;
  }) {
    this.key = args.key;
    this.dir = args.dir;
    this.imageDir = join(args.dir, IMAGE);
    this.leaveRunning = args.leaveRunning;
    this.#lock = args.lock;
    this.#commitFn = args.commitFn;
  }

  get state(): 'open' | 'committing' | 'committed' | 'aborted' {
    return this.#state;
  }

  /** Hashes and fsyncs every file, writes manifest.json, renames into place, releases the lock. */
  async commit(opts: CommitOptions): Promise<SnapshotInfo & { totalBytes: number }> {
    if (this.#state !== 'open') {
      throw new SnapshotError('FailedPrecondition', `cannot commit snapshot ${this.key}: it is ${this.#state}`, { key: this.key });
    }
    this.#state = 'committing';
    const committing = this.#commitFn(this, opts);
    this.#committing = committing;
    try {
      const info = await committing;
      this.#state = 'committed';
      return { ...info, totalBytes: info.manifest.totalBytes };
    } catch (err) {
      this.#state = 'open';
      throw err;
    } finally {
      this.#committing = undefined;
    }
  }

  /**
   * Removes the directory and releases the lock. No-op once committed or aborted; while a commit
   * is running (e.g. `return pending.commit()` without await inside `await using`) it waits for it.
   */
  async abort(): Promise<void> {
    if (this.#committing) await this.#committing.catch(() => undefined);
    if (this.#state === 'committed' || this.#state === 'aborted') return;
    this.#state = 'aborted';
    try {
      await rm(this.dir, { recursive: true, force: true });
    } finally {
      await this.#lock.release();
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.abort();
  }
}

function assertKey(key: string): void {
  if (!isSnapshotKey(key)) throw new SnapshotError('InvalidArgument', `${JSON.stringify(key)} is not a snapshot key (64 hex chars)`, { key });
}

function alreadyCommitted(key: string, dir: string): SnapshotError {
  return new SnapshotError('AlreadyExists', `snapshot ${key} already exists`, { key, path: dir });
}

async function lstatOrUndefined(path: string): Promise<Stats | undefined> {
  try {
    return await lstat(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
}

/** Every non-directory entry (relative '/'-path → lstat) and every directory (pre-order) under `root`. */
async function listTree(root: string): Promise<{ files: Map<string, Stats>; dirs: string[] }> {
  const files = new Map<string, Stats>();
  const dirs: string[] = [];
  const walk = async (rel: string): Promise<void> => {
    for (const entry of await readdir(rel === '' ? root : join(root, rel), { withFileTypes: true })) {
      const p = rel === '' ? entry.name : `${rel}/${entry.name}`;
      if (entry.isDirectory()) {
        dirs.push(p);
        await walk(p);
      } else {
        files.set(p, await lstat(join(root, p)));
      }
    }
  };
  await walk('');
  return { files, dirs };
}

/** fsync of a file or directory (a read-only descriptor is enough on Linux). */
async function fsyncPath(path: string): Promise<void> {
  const fh = await open(path, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Runs `fn` over `items` with at most `limit` in flight; the first failure rejects (after the rest settle). */
async function pool<T>(items: readonly T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  let failed = false;
  const worker = async (): Promise<void> => {
    while (!failed && next < items.length) {
      const item = items[next++]!;
      try {
        await fn(item);
      } catch (err) {
        failed = true;
        throw err;
      }
    }
  };
  const results = await Promise.allSettled(Array.from({ length: Math.min(limit, items.length) }, worker));
  const rejected = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (rejected) throw rejected.reason;
}

function sum(xs: readonly number[]): number {
  return xs.reduce((s, x) => s + x, 0);
}

function cmp(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}
