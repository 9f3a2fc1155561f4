import { constants as osConstants } from 'node:os';
import { NativeIoError, type ErrorCode } from '../errors.js';
import { addonLoader, addonPath, hasFunctions, type AddonLoad as SharedAddonLoad } from '../native-addon.js';

/**
 * The I/O layer of restore: read snapshot files into the page cache, copy them to a staging file,
 * hash them (XXH64, the snapshot store's 'xxh64'), each with many reads in flight.
 *
 * This module declares the interface every implementation provides (`IoBackend`), is the only place
 * that loads the native addon `native/build/Release/thaw_io.node`, and wraps it as `NativeIo`. The
 * pure-TS implementation is in fallback.ts; io.ts picks one (`openIo`).
 */

export type IoBackendName = 'uring' | 'aio' | 'pread' | 'ts';
export type NativeBackendName = Exclude<IoBackendName, 'ts'>;

/** A byte range of a file; without `length` it runs to the end of the file. */
export interface FileRange {
  readonly path: string;
  readonly offset?: number;
  readonly length?: number;
}

/**
 * Test-only faults, applied to read results after the kernel returned them (so every backend's error
 * paths run): reads succeed until `failAfterBytes` bytes have been read in total (default 0), then fail
 * with `errno` (default EIO) or, with `shortRead`, report end of file early.
 */
export interface FaultSpec {
  readonly failAfterBytes?: number;
  readonly errno?: 'EIO';
  readonly shortRead?: true;
}

export interface IoOptions {
  /** Bytes per read (default 1 MiB; a multiple of 4096 with `direct`). */
  readonly blockSize?: number;
  /** Reads in flight at once (default per backend). */
  readonly queueDepth?: number;
  /**
   * O_DIRECT on the source files: bypasses the page cache (nothing is left cached: use it to verify or
   * to copy, not to warm the cache). Offsets must be 4096-aligned; the unaligned tail of a file is
   * handled. Where the filesystem refuses O_DIRECT the facade retries buffered. The 'ts' backend
   * ignores it (Node cannot align its buffers).
   */
  readonly direct?: boolean;
  /** XXH64 (seed 0) of each range's bytes, computed while reading, not in a second pass. */
  readonly hash?: boolean;
  readonly signal?: AbortSignal;
  readonly faults?: FaultSpec;
}

export interface RangeResult {
  path: string;
  offset: number;
  bytes: number;
  /** 16 lowercase hex chars; present when `hash` was asked. For a whole-file range: the file's hash. */
  hash?: string;
}

export interface PrefetchResult {
  bytes: number;
  files: RangeResult[];
}

export interface CopyResult {
  bytes: number;
  hash?: string;
}

export interface FileHashResult {
  path: string;
  bytes: number;
  hash: string;
}

export interface HashOptions extends Omit<IoOptions, 'hash'> {
  /** Files hashed at once, each on its own thread (default: min(files, 2)). */
  readonly concurrency?: number;
}

export interface ReadIntoOptions extends IoOptions {
  /** Where in the file to start (default 0; 4096-aligned with `direct`). */
  readonly fileOffset?: number;
  /** Bytes to read (default: to the end of the file, which must fit the buffer). */
  readonly length?: number;
}

/** What every implementation provides. All errors are NativeIoError. */
export interface IoBackend {
  readonly name: IoBackendName;
  /** Reads the ranges (buffered: they land in the page cache), optionally hashing each. */
  prefetch(ranges: readonly FileRange[], opts?: IoOptions): Promise<PrefetchResult>;
  /** Copies `src` to `dst` (created or truncated; e.g. a tmpfs or /proc/self/fd/N of a memfd). */
  copyFile(src: string, dst: string, opts?: IoOptions): Promise<CopyResult>;
  /** XXH64 of each whole file, in the order given. */
  hashFiles(paths: readonly string[], opts?: HashOptions): Promise<FileHashResult[]>;
  /**
   * Reads a file (or part of it) into `target`, e.g. memory that will be handed on. `target` must not be
   * transferred or detached while the call runs (the native side writes into it from another thread).
   */
  readInto(path: string, target: Uint8Array, opts?: ReadIntoOptions): Promise<CopyResult>;
}

/** Default block size: 1 MiB (platform.md measured 1 MiB blocks at queue depth 32). */
export const DEFAULT_BLOCK_SIZE = 1 << 20;
/** O_DIRECT alignment of offsets, sizes and memory. */
export const DIRECT_ALIGN = 4096;
/**
 * Reads in flight when not given, per backend, buffered vs O_DIRECT (docs/bench/io.md). Buffered
 * io_uring reads slow down with depth (0.5 GB/s at 32 vs 1.0-1.3 at 1-2 cold; readahead already
 * streams and deep queues scatter it over io-wq threads); O_DIRECT needs depth to keep the device busy.
 */
export const DEFAULT_QUEUE_DEPTH: Readonly<Record<'buffered' | 'direct', Readonly<Record<IoBackendName, number>>>> = {
  buffered: { uring: 2, aio: 4, pread: 4, ts: 4 },
  direct: { uring: 16, aio: 16, pread: 8, ts: 4 },
};

// ---------------------------------------------------------------------------------------------------
// Errors

/** errno (positive) → name, e.g. 2 → 'ENOENT'. */
export function errnoName(errno: number): string {
  for (const [name, value] of Object.entries(osConstants.errno)) if (value === errno) return name;
  return `errno ${errno}`;
}

const ERRNO = osConstants.errno;

/** The error class an errno falls into. Short reads (ENODATA) and EIO mean the data could not be had. */
export function errnoCode(errno: number, op: string): ErrorCode {
  if (op === 'io_uring_queue_init' || op === 'io_setup' || op === 'pthread_create') return 'Unavailable';
  switch (errno) {
    case ERRNO.ENOENT:
    case ERRNO.ENOTDIR:
      return 'NotFound';
    case ERRNO.EINVAL:
    case ERRNO.EISDIR:
      return 'InvalidArgument';
    case ERRNO.EACCES:
    case ERRNO.EPERM:
    case ERRNO.EROFS:
      return 'FailedPrecondition';
    case ERRNO.ECANCELED:
      return 'Canceled';
    case ERRNO.EIO:
    case ERRNO.ENODATA:
      return 'DataLoss';
    case ERRNO.ENOSPC:
    case ERRNO.EDQUOT:
    case ERRNO.ENOMEM:
    case ERRNO.EMFILE:
    case ERRNO.ENFILE:
    case ERRNO.EAGAIN:
      return 'Unavailable';
    default:
      return 'Internal';
  }
}

/** Builds the NativeIoError for an errno-style failure of `op` on `path`. */
export function ioError(op: string, errno: number, path: string, detail?: string, cause?: unknown): NativeIoError {
  const what = path ? `${op} ${path}` : op;
  const message = `${what} failed: ${detail ?? errnoName(errno)}${detail ? ` (${errnoName(errno)})` : ''}`;
  return new NativeIoError(errnoCode(errno, op), message, { op, errno }, cause === undefined ? {} : { cause });
}

/** Node fs errors (err.code 'ENOENT', err.syscall) → NativeIoError; anything else → Internal. */
export function fromNodeError(err: unknown, op: string, path: string): NativeIoError {
  if (err instanceof NativeIoError) return err;
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  const errno = code !== undefined && code in ERRNO ? ERRNO[code as keyof typeof ERRNO] : 0;
  if (errno === 0) {
    const detail = err instanceof Error ? err.message : String(err);
    return new NativeIoError('Internal', `${op} ${path} failed: ${detail}`, { op, errno: 0 }, { cause: err });
  }
  return ioError(op, errno, path, undefined, err);
}

/** The error for an aborted operation (keeps the signal's reason as cause). */
export function canceledError(op: string, signal: AbortSignal): NativeIoError {
  return new NativeIoError('Canceled', `${op} canceled`, { op, errno: ERRNO.ECANCELED }, { cause: signal.reason });
}

/** Checks sizes the way every backend needs them; throws InvalidArgument. */
export function checkIoOptions(op: string, o: { blockSize: number; queueDepth: number; direct: boolean }): void {
  const bad = (m: string): NativeIoError =>
    new NativeIoError('InvalidArgument', `${op}: ${m}`, { op, errno: ERRNO.EINVAL });
  if (!Number.isSafeInteger(o.blockSize) || o.blockSize <= 0 || o.blockSize > 256 << 20) {
    throw bad(`blockSize must be an integer in 1..${256 << 20}`);
  }
  if (!Number.isSafeInteger(o.queueDepth) || o.queueDepth <= 0 || o.queueDepth > 4096) {
    throw bad('queueDepth must be an integer in 1..4096');
  }
  if (o.direct && o.blockSize % DIRECT_ALIGN !== 0) throw bad(`O_DIRECT needs a blockSize that is a multiple of ${DIRECT_ALIGN}`);
}

// ---------------------------------------------------------------------------------------------------
// The addon

/** Options as the addon takes them: everything resolved by TS. */
export interface NativeCallOptions {
  backend: NativeBackendName;
  blockSize: number;
  queueDepth: number;
  direct: boolean;
  hash: boolean;
  /** Element 0 set non-zero (Atomics.store) cancels the operation. */
  cancel?: Int32Array;
  faults?: { failAfterBytes: number; errno: number; shortRead: boolean };
}

export interface NativeHashed {
  bytes: number;
  hash?: string;
}

/** The addon's exports (native/src/addon.cc). */
export interface NativeIoBinding {
  readonly version: string;
  /** 0 if the backend can set up a queue here, else -errno (io_uring refused: -EPERM / -ENOSYS). */
  probe(backend: NativeBackendName): number;
  prefetch(
    ranges: { path: string; offset?: number; length?: number }[],
    opts: NativeCallOptions,
  ): Promise<{ bytes: number; files: (NativeHashed & { path: string; offset: number })[] }>;
  copyFile(src: string, dst: string, opts: NativeCallOptions): Promise<NativeHashed>;
  hashFiles(paths: string[], opts: NativeCallOptions): Promise<{ path: string; bytes: number; hash: string }[]>;
  /** length -1: to the end of the file. */
  readInto(path: string, target: Uint8Array, fileOffset: number, length: number, opts: NativeCallOptions): Promise<NativeHashed>;
  /** One-shot XXH64 (seed 0) of a buffer, from libxxhash. */
  xxh64(data: Uint8Array): string;
}

/** How the addon rejects: an Error with these fields set (native/src/workers.cc MakeIoError). */
interface RawNativeError extends Error {
  op: string;
  errno: number;
  path: string;
  backend: string;
  /** io_uring refused by the kernel (EPERM/ENOSYS at set-up). */
  refused: boolean;
}

function isRawNativeError(err: unknown): err is RawNativeError {
  return err instanceof Error && typeof (err as Partial<RawNativeError>).op === 'string' && typeof (err as Partial<RawNativeError>).errno === 'number';
}

function isBinding(mod: unknown): mod is NativeIoBinding {
  return hasFunctions(mod, ['probe', 'prefetch', 'copyFile', 'hashFiles', 'readInto', 'xxh64']) && typeof (mod as { version?: unknown }).version === 'string';
}

/** `<repo>/native/build/Release/thaw_io.node`. */
export function defaultAddonPath(): string {
  return addonPath('', 'thaw_io.node');
}

export type AddonLoad = SharedAddonLoad<NativeIoBinding>;

const loadThawIo = addonLoader('thaw_io', isBinding);

/** Loads the addon once per process; a missing or broken build is reported, not thrown. */
export function loadNativeIo(path = defaultAddonPath()): AddonLoad {
  return loadThawIo(path);
}

// ---------------------------------------------------------------------------------------------------
// NativeIo: IoBackend over the addon

function nativeFaults(f: FaultSpec | undefined): NativeCallOptions['faults'] {
  if (f === undefined) return undefined;
  return { failAfterBytes: f.failAfterBytes ?? 0, errno: ERRNO[f.errno ?? 'EIO'], shortRead: f.shortRead === true };
}

function fromRaw(err: unknown, op: string, path: string): NativeIoError {
  if (isRawNativeError(err)) {
    return new NativeIoError(errnoCode(err.errno, err.op), err.message, { op: err.op, errno: err.errno }, { cause: err });
  }
  // Argument errors thrown synchronously by the addon (TypeError/RangeError).
  const detail = err instanceof Error ? err.message : String(err);
  return new NativeIoError('InvalidArgument', `${op} ${path} failed: ${detail}`, { op, errno: ERRNO.EINVAL }, { cause: err });
}

function isDirectRefused(err: NativeIoError): boolean {
  return err.op === 'open' && err.errno === ERRNO.EINVAL;
}

/** True when a NativeIoError says the kernel refuses io_uring (see native/src/workers.cc). */
export function isUringRefused(err: unknown): boolean {
  return (
    err instanceof NativeIoError &&
    err.op === 'io_uring_queue_init' &&
    (err.errno === ERRNO.EPERM || err.errno === ERRNO.ENOSYS)
  );
}

export class NativeIo implements IoBackend {
  readonly name: NativeBackendName;
  readonly #binding: NativeIoBinding;
  readonly #onDirectRefused: (path: string) => void;

  constructor({
    binding,
    backend,
    onDirectRefused = () => undefined,
  }: {
    readonly binding: NativeIoBinding;
    readonly backend: NativeBackendName;
    /** Called when a filesystem refuses O_DIRECT and the call is retried buffered. */
    readonly onDirectRefused?: (path: string) => void;
  }) {
    this.#binding = binding;
    this.name = backend;
    this.#onDirectRefused = onDirectRefused;
  }

  prefetch(ranges: readonly FileRange[], opts: IoOptions = {}): Promise<PrefetchResult> {
    const plain = ranges.map((r) => ({
      path: r.path,
      ...(r.offset === undefined ? {} : { offset: r.offset }),
      ...(r.length === undefined ? {} : { length: r.length }),
    }));
    return this.#call('prefetch', ranges[0]?.path ?? '', opts, opts.hash === true, async (o) => {
      const r = await this.#binding.prefetch(plain, o);
      return { bytes: r.bytes, files: r.files.map((f) => ({ ...f })) };
    });
  }

  copyFile(src: string, dst: string, opts: IoOptions = {}): Promise<CopyResult> {
    return this.#call('copyFile', src, opts, opts.hash === true, (o) => this.#binding.copyFile(src, dst, o));
  }

  async hashFiles(paths: readonly string[], opts: HashOptions = {}): Promise<FileHashResult[]> {
    const concurrency = Math.max(1, Math.min(opts.concurrency ?? 2, paths.length));
    // Files are dealt round-robin to `concurrency` native calls: each runs on its own libuv thread.
    const groups: { index: number; path: string }[][] = Array.from({ length: concurrency }, () => []);
    paths.forEach((path, index) => groups[index % concurrency]!.push({ index, path }));
    const out: FileHashResult[] = new Array<FileHashResult>(paths.length);
    await Promise.all(
      groups.map(async (group) => {
        if (group.length === 0) return;
        const got = await this.#call('hashFiles', group[0]!.path, opts, true, (o) =>
          this.#binding.hashFiles(group.map((g) => g.path), o),
        );
        got.forEach((r, i) => (out[group[i]!.index] = { path: r.path, bytes: r.bytes, hash: r.hash }));
      }),
    );
    return out;
  }

  readInto(path: string, target: Uint8Array, opts: ReadIntoOptions = {}): Promise<CopyResult> {
    return this.#call('readInto', path, opts, opts.hash === true, (o) =>
      this.#binding.readInto(path, target, opts.fileOffset ?? 0, opts.length ?? -1, o),
    );
  }

  /** Resolves options, wires the AbortSignal to the cancel flag, maps errors, retries without O_DIRECT once. */
  async #call<T extends object>(
    op: string,
    path: string,
    opts: IoOptions,
    hash: boolean,
    fn: (o: NativeCallOptions) => Promise<T>,
  ): Promise<T> {
    const signal = opts.signal;
    if (signal?.aborted) throw canceledError(op, signal);
    const o: NativeCallOptions = {
      backend: this.name,
      blockSize: opts.blockSize ?? DEFAULT_BLOCK_SIZE,
      queueDepth: opts.queueDepth ?? DEFAULT_QUEUE_DEPTH[opts.direct === true ? 'direct' : 'buffered'][this.name],
      direct: opts.direct === true,
      hash,
    };
    checkIoOptions(op, o);
    const faults = nativeFaults(opts.faults);
    if (faults) o.faults = faults;
    let onAbort: (() => void) | undefined;
    if (signal) {
      // Its own ArrayBuffer: always off the V8 heap, so the worker thread's pointer to it never moves.
      const cancel = new Int32Array(new ArrayBuffer(4));
      o.cancel = cancel;
      onAbort = () => Atomics.store(cancel, 0, 1);
      signal.addEventListener('abort', onAbort, { once: true });
    }
    try {
      try {
        return await fn(o);
      } catch (err) {
        const e = fromRaw(err, op, path);
        if (!(o.direct && isDirectRefused(e))) throw e;
        this.#onDirectRefused(path);
        return await fn({ ...o, direct: false });
      }
    } catch (err) {
      const e = err instanceof NativeIoError ? err : fromRaw(err, op, path);
      if (e.code === 'Canceled' && signal) throw canceledError(op, signal);
      throw e;
    } finally {
      if (onAbort) signal?.removeEventListener('abort', onAbort);
    }
  }
}
