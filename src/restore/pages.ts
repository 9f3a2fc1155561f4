import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { mkdir, rm } from 'node:fs/promises';
import { ShimError, type ErrorCode } from '../errors.js';
import { silentLogger, type Logger } from '../log/logger.js';
import { XXH64, xxh64Hex } from '../snapshot/hash.js';
import type { ManifestFile } from '../snapshot/manifest.js';
import {
  PAGE_SIZE,
  PagesUnsupportedError,
  listImagePids,
  planPages,
  readTaskImages,
  type FillOrder,
  type PagePlan,
} from './pages-image.js';
import {
  errnoName,
  fromUffdError,
  loadUffdAddon,
  uffdErrorCode,
  type LazyMessage,
  type NativeFillResult,
  type UffdBinding,
} from './pages-native.js';
import type { PageKeeperHandle } from './page-keeper.js';

/**
 * thaw's lazy-pages server: CRIU restores a process with `--lazy-pages` (everything but the
 * private anonymous memory), hands each task's userfaultfd to this server over
 * <work dir>/lazy-pages.socket, and the server fills that memory from pages-*.img with several
 * threads while answering the app's page faults first (native/src/uffd.cc). CRIU's own
 * `criu lazy-pages` does the same on one thread, which cannot keep ahead of a CUDA restore.
 *
 * The policy lives here: whether the image can be served at all, chunk size and order, how many
 * threads, how the bytes are verified, and what a failure means. A failure before the restored
 * process runs is an ordinary error (the caller restores without lazy pages); a failure after it
 * runs kills the restored tasks through the caller's hook *before* the userfaultfds are closed —
 * closing them first would let the app read zeros where its memory had not arrived yet.
 */

export const LAZY_PAGES_SOCKET = 'lazy-pages.socket';

/** Which step failed. */
export type PagePhase = 'prepare' | 'verify-before' | 'receive' | 'restore' | 'fill' | 'verify' | 'keeper';

export class PageServerError extends ShimError {
  readonly phase: PagePhase;
  /** Pids CRIU reported (namespace pids as in the image). */
  readonly pids: readonly number[];
  /** The restored tasks were killed (through the caller's hook) before the error was thrown. */
  readonly killed: boolean;
  constructor(
    code: ErrorCode,
    message: string,
    fields: { phase: PagePhase; pids: readonly number[]; killed: boolean },
    options: { cause?: unknown } = {},
  ) {
    super(code, message, options);
    this.phase = fields.phase;
    this.pids = fields.pids;
    this.killed = fields.killed;
  }
}

/** An expected checksum of one image file, by absolute path. */
export interface ImageChecksum {
  bytes: number;
  hash: string;
  algo: string;
}

/** The manifest's entries under `snapshotDir`, keyed by absolute path. */
export function checksumsFromManifest(snapshotDir: string, files: readonly ManifestFile[]): Map<string, ImageChecksum> {
  return new Map(files.map((f) => [join(snapshotDir, f.path), { bytes: f.bytes, hash: f.hash, algo: f.algo }]));
}

export interface LazyPagesOptions {
  /** CRIU image directory (runc: the checkpoint's image path). */
  imageDir: string;
  /** CRIU's working directory — `criu restore -W`, `runc restore --work-path` — where CRIU connects to the socket. */
  workDir: string;
  /** Eager fill threads over all tasks (default: CPUs - 1, at most 8, at least 1). */
  threads?: number;
  /** Bytes per eager read + copy (default 1 MiB). */
  chunkBytes?: number;
  /** Bytes installed along with a faulting page (default 64 KiB). */
  faultAheadBytes?: number;
  /**
   * Bytes after a faulting page that jump the eager queue (default 8 MiB): the fill follows a
   * sequential reader such as the CUDA restore instead of racing it from elsewhere. 0: off.
   */
  followBytes?: number;
  /** Buffered reads: how far ahead of the fill the disk is asked to read (default 2 chunks). */
  prefetchChunks?: number;
  order?: FillOrder;
  /** O_DIRECT reads for the eager fill (cold images on a real disk; not on tmpfs). */
  direct?: boolean;
  /**
   * Expected checksums of the image files (see checksumsFromManifest). With `verify` other than
   * 'off' every file the server reads must be listed, else prepare() refuses.
   */
  checksums?: ReadonlyMap<string, ImageChecksum>;
  /**
   * 'concurrent' (default with checksums): pages files are hashed on their own thread while they
   * are filled, and the restore counts as done only when the hashes match; 'before': hashed
   * before CRIU starts (an extra read); 'off'.
   */
  verify?: 'concurrent' | 'before' | 'off';
  /** For CRIU's connection and each message (default 60 s: a large restore sends uffds late). */
  receiveTimeoutMs?: number;
  /** For the whole fill (default 60 s + 100 MB/s of lazy bytes: far beyond any healthy fill). */
  fillTimeoutMs?: number;
  /**
   * After a failure before "restore finished", how long the aborted restore command may take to
   * end before what it restored is killed anyway (default 5 s; see startLazyRestore).
   */
  abortGraceMs?: number;
  log?: Logger;
  /** The addon (tests); default: loadUffdAddon(). */
  binding?: UffdBinding;
  /**
   * Starts a page keeper (page-keeper.ts) the moment CRIU's "restore finished" arrives, with every
   * task's userfaultfd: should this process die before every page is in, the keeper kills the
   * restored tasks before the last copy of their userfaultfds closes. A keeper that cannot start
   * (this throws, or `ready` rejects before the fill is done) fails the restore: the tasks are
   * killed and `PageServerError{phase: 'keeper', killed: true}` lets the caller fall back. Released
   * by close(); a failed restore whose tasks could not be killed keeps it until this process exits.
   * Default: none.
   */
  keeper?: (held: { uffds: readonly number[]; pids: readonly number[] }) => PageKeeperHandle;
}

export interface TaskPlan extends PagePlan {
  pid: number;
  pagesPath: string;
}

export interface LazyTaskResult {
  pid: number;
  /** performance.now() when every page of this task was in (before the checksum finished). */
  allPagesAt: number;
  lazyBytes: number;
  threads: number;
  native: NativeFillResult;
}

export interface LazyPagesResult {
  pids: number[];
  /** Bytes installed through userfaultfd (all tasks). */
  bytes: number;
  /** From CRIU's "restore finished" until every page was in (slowest task). */
  fillMs: number;
  /** The same from the restore's start (startLazyRestore called). */
  allPagesMs: number;
  /** From startLazyRestore until every page was in and verified. */
  totalMs: number;
  verified: boolean;
  tasks: LazyTaskResult[];
}

/** Whether thaw can serve lazy pages here; the reason when not (the caller then restores plainly). */
export function lazyPagesAvailable(binding?: UffdBinding): { ok: true; binding: UffdBinding } | { ok: false; reason: string } {
  if (binding !== undefined) return { ok: true, binding };
  const load = loadUffdAddon();
  if (load.binding === null) return { ok: false, reason: `page server addon unavailable (${load.path}): ${load.error.message}` };
  return { ok: true, binding: load.binding };
}

interface Received {
  pid: number;
  uffd: number;
}

/**
 * One lazy restore's page server. prepare() reads and plans the images and listens; serve() takes
 * CRIU's connection, fills every task and verifies; close() releases what is left. Use through
 * startLazyRestore() unless you drive CRIU's steps yourself.
 */
export class LazyPageServer implements AsyncDisposable {
  readonly socketPath: string;
  readonly plans: ReadonlyMap<number, TaskPlan>;
  readonly #b: UffdBinding;
  readonly #opts: LazyPagesOptions;
  readonly #log: Logger;
  readonly #cancelFd: number;
  #listenFd: number;
  #clientFd = -1;
  /** Userfaultfds we hold and have not closed (a failed fill leaves them to us). */
  readonly #openUffds = new Set<number>();
  readonly #received: Received[] = [];
  #canceled = false;
  #closed = false;
  #timedOut = false;
  #timer: NodeJS.Timeout | undefined;
  readonly #fills: Promise<LazyTaskResult>[] = [];
  readonly #startFd: number;
  #keeper: PageKeeperHandle | undefined;
  /** Why the keeper could not start, when that happened before every fill was done. */
  #keeperError: unknown;
  #fillsDone = false;

  private constructor(
    b: UffdBinding,
    opts: LazyPagesOptions,
    plans: Map<number, TaskPlan>,
    fds: { listenFd: number; cancelFd: number; startFd: number },
    socketPath: string,
  ) {
    this.#b = b;
    this.#opts = opts;
    this.#log = opts.log ?? silentLogger;
    this.plans = plans;
    this.#listenFd = fds.listenFd;
    this.#cancelFd = fds.cancelFd;
    this.#startFd = fds.startFd;
    this.socketPath = socketPath;
  }

  /**
   * Reads and checks the task images, plans the fill and listens on the socket. Throws
   * PagesUnsupportedError (or SnapshotError for damaged images) before anything ran: the caller
   * then restores without lazy pages.
   */
  static async prepare(opts: LazyPagesOptions): Promise<LazyPageServer> {
    const avail = lazyPagesAvailable(opts.binding);
    if (!avail.ok) throw new PagesUnsupportedError('FailedPrecondition', avail.reason, { path: opts.imageDir });
    const b = avail.binding;
    const log = opts.log ?? silentLogger;
    const chunkBytes = opts.chunkBytes ?? 1 << 20;
    if (chunkBytes % PAGE_SIZE !== 0 || chunkBytes <= 0) throw new RangeError('chunkBytes must be a positive multiple of 4096');
    const verify = opts.checksums === undefined ? 'off' : (opts.verify ?? 'concurrent');
    const pids = await listImagePids(opts.imageDir);
    if (pids.length === 0) throw new PagesUnsupportedError('FailedPrecondition', `no pagemap images in ${opts.imageDir}`, { path: opts.imageDir });
    const plans = new Map<number, TaskPlan>();
    for (const pid of pids) {
      const images = await readTaskImages(opts.imageDir, pid);
      if (verify !== 'off') {
        for (const [path, bytes] of images.raw) await checkSmallImage(path, bytes, opts.checksums);
        requireChecksum(images.pagesPath, opts.checksums);
      }
      const plan = planPages({ pagemap: images.pagemap, vmas: images.vmas, chunkPages: chunkBytes / PAGE_SIZE, order: opts.order ?? 'file', path: images.pagemapPath });
      plans.set(pid, { ...plan, pid, pagesPath: images.pagesPath });
    }
    if (verify === 'before') {
      const t0 = performance.now();
      await hashAndCompare(b, [...new Set([...plans.values()].map((p) => p.pagesPath))], opts.checksums);
      log.debug({ phase: 'lazy-pages-verify-before', durationMs: Math.round(performance.now() - t0) }, 'pages files verified');
    }
    const socketPath = join(opts.workDir, LAZY_PAGES_SOCKET);
    let listenFd: number;
    try {
      await mkdir(opts.workDir, { recursive: true, mode: 0o700 }); // runc creates --work-path only later
      listenFd = b.listen(socketPath);
    } catch (err) {
      throw new PageServerError('Unavailable', `cannot listen on ${socketPath}: ${(err as Error).message}`, { phase: 'prepare', pids: [], killed: false }, { cause: err });
    }
    return new LazyPageServer(b, { ...opts, verify }, plans, { listenFd, cancelFd: b.createCancel(), startFd: b.createCancel() }, socketPath);
  }

  /** How the pages files are verified (resolved from the options: 'off' without checksums). */
  get verify(): 'concurrent' | 'before' | 'off' {
    return this.#opts.verify ?? 'off';
  }

  /** Pids CRIU has handed over so far. */
  get pids(): number[] {
    return this.#received.map((r) => r.pid);
  }

  /** Stops whatever is running (accept, receive, fill); the userfaultfds stay open. */
  cancel(): void {
    if (this.#canceled || this.#closed) return;
    this.#canceled = true;
    this.#b.cancel(this.#cancelFd);
  }

  /**
   * Accepts CRIU's connection and serves each task from the moment its userfaultfd arrives: faults
   * at once (the restore itself may touch lazy memory), the eager fill only after CRIU's "restore
   * finished" (before it, lazy VMAs may still be unregistered). Resolves with the pids at "restore
   * finished"; fill() then tracks the fills.
   */
  async receive(): Promise<number[]> {
    const timeout = this.#opts.receiveTimeoutMs ?? 60_000;
    try {
      this.#clientFd = await this.#answeredWithin(this.#b.accept(this.#listenFd, this.#cancelFd, timeout), timeout, 'accept');
      for (;;) {
        const m = (await this.#answeredWithin(this.#b.receive(this.#clientFd, this.#cancelFd, timeout), timeout, 'receive')) as LazyMessage & {
          pid: number;
          uffd: number;
        };
        if (m.kind !== 'closed') this.#log.debug({ phase: 'lazy-pages-receive', kind: m.kind, pid: m.pid, uffd: m.uffd, received: this.#received.length }, 'lazy-pages message');
        if (m.kind === 'task') {
          this.#openUffds.add(m.uffd);
          this.#received.push({ pid: m.pid, uffd: m.uffd });
          if (!this.plans.has(m.pid)) {
            throw new PageServerError('DataLoss', `CRIU sent task ${m.pid}, which has no pagemap image`, { phase: 'receive', pids: this.pids, killed: false });
          }
          this.#fills.push(this.#startFill(m.pid, m.uffd));
        } else if (m.kind === 'finished') {
          // First: CRIU resumes the tasks right after sending this; from the fork on, the keeper
          // holds their userfaultfds.
          this.#startKeeper();
          this.#b.cancel(this.#startFd); // opens every fill's gate
          this.#armTimeout();
          return this.pids;
        } else if (m.kind === 'closed') {
          throw new PageServerError('Unavailable', 'CRIU closed the lazy-pages socket before the restore finished', { phase: 'receive', pids: this.pids, killed: false });
        } // zombies have no memory to serve
      }
    } catch (err) {
      this.cancel(); // fills already started stop; their userfaultfds stay open
      if (err instanceof ShimError) throw err;
      const e = fromUffdError(err, 'receive');
      throw new PageServerError(e.code, `lazy-pages socket: ${e.message}`, { phase: 'receive', pids: this.pids, killed: false }, { cause: e });
    } finally {
      this.#closeFd(this.#listenFd);
      this.#listenFd = -1;
    }
  }

  /** The page keeper, if any (see LazyPagesOptions.keeper). */
  get keeper(): PageKeeperHandle | undefined {
    return this.#keeper;
  }

  #startKeeper(): void {
    if (this.#opts.keeper === undefined) return;
    const t0 = performance.now();
    try {
      this.#keeper = this.#opts.keeper({ uffds: [...this.#openUffds], pids: this.pids });
    } catch (err) {
      throw new PageServerError('Unavailable', `cannot start the page keeper: ${(err as Error).message}`, { phase: 'keeper', pids: this.pids, killed: false }, { cause: err });
    }
    const keeper = this.#keeper;
    const spawnMs = Math.round((performance.now() - t0) * 100) / 100;
    keeper.ready.then(
      () => this.#log.debug({ phase: 'page-keeper', pid: keeper.pid, spawnMs, durationMs: Math.round(performance.now() - t0) }, 'page keeper ready'),
      (err: unknown) => {
        if (this.#fillsDone || this.#closed) return; // every page is in: nothing left to guard
        this.#keeperError = err;
        this.#log.warn({ phase: 'page-keeper', err }, 'page keeper failed to start; giving up the lazy restore');
        this.cancel();
      },
    );
  }

  /**
   * The addon's accept/receive time out on their own, but only once a libuv pool thread runs them:
   * should the pool be busy elsewhere, this side stops waiting a little later and cancels them.
   */
  async #answeredWithin<T>(call: Promise<T>, timeoutMs: number, op: string): Promise<T> {
    const ms = timeoutMs + ANSWER_MARGIN_MS;
    if (!(await settlesWithin(call, ms))) {
      this.cancel();
      throw Object.assign(new Error(`${op} did not answer within ${ms} ms`), { code: 'ETIMEDOUT', errno: 110 });
    }
    return call;
  }

  #startFill(pid: number, uffd: number): Promise<LazyTaskResult> {
    const plan = this.plans.get(pid)!;
    const totalThreads = Math.max(1, this.#opts.threads ?? Math.min(8, availableParallelism() - 1));
    const allPages = [...this.plans.values()].reduce((sum, p) => sum + p.lazyPages, 0);
    const threads = Math.max(1, Math.round((totalThreads * plan.lazyPages) / Math.max(1, allPages)));
    const started = performance.now();
    const run = this.#b
      .fill({
        uffd,
        pagesPath: plan.pagesPath,
        direct: this.#opts.direct ?? false,
        threads,
        faultAheadPages: Math.floor((this.#opts.faultAheadBytes ?? 64 << 10) / PAGE_SIZE),
        followChunks: Math.ceil((this.#opts.followBytes ?? 8 << 20) / (this.#opts.chunkBytes ?? 1 << 20)),
        prefetchChunks: this.#opts.prefetchChunks ?? 2,
        hash: this.#opts.verify === 'concurrent',
        closeWhenFilled: true,
        cancelFd: this.#cancelFd,
        startFd: this.#startFd,
        extents: plan.extents,
        chunks: plan.chunks,
      })
      .then((native) => {
        for (const t of native.targets) {
          if (t.closed) this.#openUffds.delete(t.uffd);
          else this.#openUffds.add(t.uffd); // fork children of a failed fill
        }
        return { pid, allPagesAt: started + native.fillMs, lazyBytes: plan.lazyPages * PAGE_SIZE, threads, native };
      });
    run.catch(() => undefined); // observed in fill()
    return run;
  }

  #armTimeout(): void {
    const lazyBytes = this.#received.reduce((s, r) => s + (this.plans.get(r.pid)?.lazyPages ?? 0) * PAGE_SIZE, 0);
    const timeoutMs = this.#opts.fillTimeoutMs ?? 60_000 + lazyBytes / 100e3;
    this.#timer = setTimeout(() => {
      this.#log.warn({ phase: 'lazy-pages-fill', durationMs: timeoutMs }, 'page server fill timed out');
      this.#timedOut = true;
      this.cancel();
    }, timeoutMs);
  }

  /**
   * Waits for every task's fill (started by receive()) and checks it: every page installed exactly
   * once, no task gone, checksums equal. Throws PageServerError (killed: false) on any failure; the
   * userfaultfds of a failed fill stay open for close().
   */
  async fill(): Promise<LazyTaskResult[]> {
    try {
      const results = await Promise.all(this.#fills).catch((err: unknown) => {
        throw fromUffdError(err, 'fill');
      });
      this.#fillsDone = true;
      if (this.#keeperError !== undefined) {
        const e = this.#keeperError;
        throw new PageServerError('Unavailable', (e as Error).message ?? String(e), { phase: 'keeper', pids: this.pids, killed: false }, { cause: e });
      }
      for (const r of results) this.#check(r);
      return results;
    } finally {
      clearTimeout(this.#timer);
    }
  }

  #check({ pid, native }: LazyTaskResult): void {
    const fail = (code: ErrorCode, message: string, phase: PagePhase = 'fill'): never => {
      throw new PageServerError(code, `task ${pid}: ${message}`, { phase, pids: this.pids, killed: false });
    };
    if (native.canceled) fail(this.#timedOut ? 'DeadlineExceeded' : 'Canceled', this.#timedOut ? 'page server fill timed out' : 'page server fill canceled');
    if (native.error !== undefined) {
      const { op, errno, message } = native.error;
      fail(errno === 0 ? 'DataLoss' : uffdErrorCode(errno), `${op} failed${errno ? ` (${errnoName(errno)})` : ''}: ${message}`);
    }
    const [main] = native.targets;
    if (main === undefined) fail('Internal', 'the fill reported no target');
    if (main!.exited) fail('Unavailable', 'the restored task exited while its memory was being filled');
    for (const t of native.targets) {
      if (t.pagesLeft !== 0) fail('DataLoss', `${t.pagesLeft} pages never arrived`);
      const accounted = t.pagesCopied + t.pagesExisting + t.pagesDropped + t.pagesVanished;
      if (accounted !== t.totalPages) fail('Internal', `${accounted} of ${t.totalPages} pages accounted for`);
      // Without a fork nothing but this server can install a page into a missing-mode range: a page
      // already present means it came twice.
      if (!t.forked && t.pagesExisting !== 0) fail('DataLoss', `${t.pagesExisting} pages were installed twice`);
      if (t.pagesVanished !== 0) {
        // A page whose VMA went away without an unmap event: nothing can read it, but it is unusual.
        this.#log.warn({ phase: 'lazy-pages', pid, pages: t.pagesVanished }, 'pages without a registered VMA were skipped');
      }
    }
    if (this.#opts.verify === 'concurrent') {
      const path = this.plans.get(pid)!.pagesPath;
      compareHash(path, native.hash ?? '', native.hashedBytes ?? -1, this.#opts.checksums, 'verify');
    }
  }

  /**
   * Closes every descriptor still held, releases the page keeper and removes the socket. Call after
   * a successful fill, or after the restored tasks are dead.
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    for (const fd of this.#openUffds) this.#closeFd(fd);
    this.#openUffds.clear();
    await this.#keeper?.release();
    this.#closeFd(this.#clientFd);
    this.#closeFd(this.#listenFd);
    this.#closeFd(this.#cancelFd);
    this.#closeFd(this.#startFd);
    clearTimeout(this.#timer);
    await rm(this.socketPath, { force: true });
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  #closeFd(fd: number): void {
    if (fd < 0) return;
    try {
      this.#b.close(fd);
    } catch {
      // already closed: nothing to release
    }
  }
}

function requireChecksum(path: string, checksums: ReadonlyMap<string, ImageChecksum> | undefined): ImageChecksum {
  const c = checksums?.get(path);
  if (c === undefined || c.algo !== XXH64) {
    throw new PageServerError('FailedPrecondition', `no ${XXH64} checksum for ${path} in the snapshot manifest`, { phase: 'prepare', pids: [], killed: false });
  }
  return c;
}

async function checkSmallImage(path: string, bytes: Uint8Array, checksums: ReadonlyMap<string, ImageChecksum> | undefined): Promise<void> {
  const c = requireChecksum(path, checksums);
  const hash = await xxh64Hex(bytes);
  if (hash !== c.hash || bytes.byteLength !== c.bytes) {
    throw new PageServerError('DataLoss', `${path}: checksum ${hash} (${bytes.byteLength} bytes) does not match the manifest's ${c.hash} (${c.bytes} bytes)`, {
      phase: 'prepare',
      pids: [],
      killed: false,
    });
  }
}

/** How much longer than the addon's own timeout the JS side waits for an accept or receive. */
const ANSWER_MARGIN_MS = 5_000;
/** After the kill, how long the aborted restore's promises may take to settle before going on. */
const KILLED_SETTLE_MS = 10_000;

/** Whether `p` settles within `ms` (rejects as `p` does; `p` is not cancelled either way). */
async function settlesWithin(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const expired = new Promise<false>((resolve) => (timer = setTimeout(() => resolve(false), ms)));
  try {
    return await Promise.race([p.then(() => true as const), expired]);
  } finally {
    clearTimeout(timer);
  }
}

/** Hashes each file (the addon, in parallel) and compares it with its checksum; DataLoss on a mismatch. */
async function hashAndCompare(b: UffdBinding, paths: readonly string[], checksums: ReadonlyMap<string, ImageChecksum> | undefined): Promise<void> {
  const cancelFd = b.createCancel();
  try {
    await Promise.all(
      paths.map(async (path) => {
        const got = await b.hashFile(path, cancelFd).catch((err: unknown) => {
          throw fromUffdError(err, 'hash');
        });
        compareHash(path, got.hash, got.bytes, checksums, 'verify-before');
      }),
    );
  } finally {
    b.close(cancelFd);
  }
}

/**
 * Checks image files against their checksums before a plain restore uses them: for when a lazy
 * restore, which would have checked them while filling, gave up part-way.
 */
export async function verifyImageFiles(checksums: ReadonlyMap<string, ImageChecksum>, binding?: UffdBinding): Promise<void> {
  const avail = lazyPagesAvailable(binding);
  if (!avail.ok) throw new PageServerError('Unavailable', `cannot verify ${[...checksums.keys()].join(', ')}: ${avail.reason}`, { phase: 'verify-before', pids: [], killed: false });
  await hashAndCompare(avail.binding, [...checksums.keys()], checksums);
}

function compareHash(path: string, hash: string, bytes: number, checksums: ReadonlyMap<string, ImageChecksum> | undefined, phase: PagePhase): void {
  const c = requireChecksum(path, checksums);
  if (hash !== c.hash || bytes !== c.bytes) {
    throw new PageServerError('DataLoss', `${path}: checksum ${hash} (${bytes} bytes) does not match the manifest's ${c.hash} (${c.bytes} bytes)`, {
      phase,
      pids: [],
      killed: false,
    });
  }
}

// ---------------------------------------------------------------------------------------------
// The choreography around CRIU.

export interface LazyRestoreHooks {
  /**
   * Runs the restore with lazy pages — `criu restore --lazy-pages -W <workDir> …` or
   * `runc restore --lazy-pages --work-path <workDir> …` — and resolves once it returned
   * successfully (detached). Must stop when `signal` aborts.
   */
  restore(signal: AbortSignal): Promise<void>;
  /**
   * Kills everything the restore created and resolves once it is gone (its pids free again, so a
   * plain restore can follow). `pids` are the task pids CRIU reported (image/namespace pids); the
   * whole restored tree must go, including children the app forked during the fill (their
   * userfaultfds are closed right after this hook) and a task CRIU restored but never reported.
   * Must be safe when nothing was restored.
   */
  kill(pids: readonly number[]): Promise<void>;
}

export interface LazyRestore {
  pids: number[];
  /** When the restore command returned, ms after startLazyRestore was called. */
  restoreMs: number;
  /**
   * Resolves when every page is in and verified. Rejects with PageServerError (killed: true) after
   * the restored tasks were killed: the caller then falls back (plain restore or cold start).
   */
  done: Promise<LazyPagesResult>;
  /** Gives up (e.g. the CUDA restore failed): `done` rejects once the tasks are killed. */
  abort(): void;
}

/**
 * Restores with thaw's page server: prepare (plan, checks, listen) → the caller's restore with
 * lazy pages, while receiving the tasks' userfaultfds → fill from "restore finished" on. Resolves
 * as soon as the restore command returned, with `done` tracking the fill, so the caller can run the
 * CUDA restore while pages arrive. Throws PageServerError with `killed` telling whether restored
 * tasks had to be killed; either way nothing is left running and the caller may fall back.
 */
export async function startLazyRestore(opts: LazyPagesOptions & { hooks: LazyRestoreHooks }): Promise<LazyRestore> {
  const t0 = performance.now();
  const log = opts.log ?? silentLogger;
  const server = await LazyPageServer.prepare(opts); // throws before anything ran
  const ac = new AbortController();
  let killed = false;
  const killAndClose = async (): Promise<void> => {
    server.cancel();
    try {
      await opts.hooks.kill(server.pids);
      killed = true;
    } finally {
      // Only now: closing a userfaultfd while its task lives would hand the task zero pages.
      if (killed) await server.close();
    }
  };

  const receiving = server.receive();
  const restoring = opts.hooks.restore(ac.signal);
  restoring.catch(() => undefined); // observed below; it may settle only after the kill
  try {
    // Both must succeed; whichever fails first stops the other.
    await Promise.all([
      receiving.catch((err: unknown) => {
        ac.abort();
        throw err;
      }),
      restoring.catch((err: unknown) => {
        server.cancel();
        throw err;
      }),
    ]);
  } catch (err) {
    ac.abort();
    server.cancel();
    // The aborted restore command ends soon (runc: SIGTERM, SIGKILL 2 s later), but its promise
    // settles only once every process holding its output is gone — and a CRIU waiting for a task
    // stuck on a page nobody serves (the H100s showed one) never goes. So what the attempt restored
    // is killed after a grace period either way, and only then is the rest waited for.
    const settled = Promise.allSettled([receiving, restoring, server.fill()]);
    const graceMs = opts.abortGraceMs ?? 5_000;
    if (!(await settlesWithin(settled, graceMs))) {
      log.warn({ phase: 'lazy-pages-abort', durationMs: graceMs }, 'the aborted restore did not end: killing what it restored');
    }
    await killAndClose().catch((e: unknown) => log.error({ err: e }, 'killing a failed lazy restore failed'));
    if (!(await settlesWithin(settled, KILLED_SETTLE_MS))) {
      log.error({ phase: 'lazy-pages-abort', durationMs: KILLED_SETTLE_MS }, 'the aborted restore still did not end after the kill');
    }
    const phase: PagePhase = err instanceof PageServerError ? err.phase : 'restore';
    const code = err instanceof ShimError ? err.code : 'Unknown';
    throw new PageServerError(code, `lazy restore failed: ${(err as Error).message}`, { phase, pids: server.pids, killed }, { cause: err });
  }
  const pids = await receiving;
  const restoreMs = Math.round(performance.now() - t0);
  log.debug({ phase: 'lazy-pages-restore', durationMs: restoreMs, pids }, 'restore returned, pages arriving');

  const done = (async (): Promise<LazyPagesResult> => {
    let tasks: LazyTaskResult[];
    try {
      tasks = await server.fill();
    } catch (err) {
      await killAndClose().catch((e: unknown) => log.error({ err: e }, 'killing a failed lazy restore failed'));
      const e = err instanceof PageServerError ? err : new PageServerError('Internal', String(err), { phase: 'fill', pids, killed }, { cause: err });
      log.warn({ phase: e.phase, err: e, fallback: 'restore' }, 'page server failed; restored tasks killed');
      throw new PageServerError(e.code, e.message, { phase: e.phase, pids, killed }, { cause: err });
    }
    await server.close();
    const result: LazyPagesResult = {
      pids,
      bytes: tasks.reduce((s, t) => s + t.native.targets.reduce((n, x) => n + x.pagesCopied * PAGE_SIZE, 0), 0),
      fillMs: Math.max(0, ...tasks.map((t) => t.native.fillMs - Math.max(0, t.native.startMs))),
      allPagesMs: Math.round(Math.max(0, ...tasks.map((t) => t.allPagesAt)) - t0),
      totalMs: Math.round(performance.now() - t0),
      verified: server.verify !== 'off',
      tasks,
    };
    log.info({ phase: 'lazy-pages', durationMs: result.totalMs, bytes: result.bytes, fillMs: Math.round(result.fillMs) }, 'lazy pages in');
    return result;
  })();
  done.catch(() => undefined); // the caller may await it later; never an unhandled rejection
  return { pids, restoreMs, done, abort: () => server.cancel() };
}
