import { constants as osConstants } from 'node:os';
import { NativeIoError, type ErrorCode } from '../errors.js';
import { addonLoader, addonPath, hasFunctions, type AddonLoad } from '../native-addon.js';

/**
 * The typed facade of the userfaultfd page server addon (`native/uffd` → `thaw_uffd.node`, sources
 * native/src/uffd*.cc). This is the only file that loads it. There is no TypeScript fallback: a
 * userfaultfd cannot be served from JS (each fault would wait on the event loop, and the copies need
 * threads). Without the addon the caller restores with plain CRIU instead (pages.ts decides).
 */

/** One message of CRIU's lazy-pages protocol. */
export type LazyMessage =
  | { kind: 'task'; pid: number; uffd: number }
  | { kind: 'zombie'; pid: number }
  | { kind: 'finished' }
  | { kind: 'closed' };

export interface NativeFillOptions {
  /** The task's userfaultfd (received from CRIU). */
  uffd: number;
  /** The task's pages-<id>.img. */
  pagesPath: string;
  /** O_DIRECT reads for the eager fill (faults read buffered). */
  direct: boolean;
  /** Eager fill threads; faults are answered by one more thread. */
  threads: number;
  /** Pages copied along with a faulting page (same extent, still missing). */
  faultAheadPages: number;
  /** After a fault, this many chunks that follow it in memory jump the queue (0: off). */
  followChunks: number;
  /** Buffered reads: readahead (FADV_WILLNEED) this many queued chunks ahead (0: off). */
  prefetchChunks: number;
  /** XXH64 the pages file on its own thread while filling. */
  hash: boolean;
  /** Close the userfaultfd(s) once every page is in; never done on failure. */
  closeWhenFilled: boolean;
  /** From createCancel(); cancel(fd) stops the fill (userfaultfds stay open). */
  cancelFd: number;
  /**
   * Eager copies start once this fd (from createCancel(), signalled with cancel()) is readable —
   * CRIU's "restore finished": before it the restore itself may fault and lazy VMAs may still be
   * unregistered. Faults are answered from the start. -1: start at once.
   */
  startFd: number;
  /** [addr, firstPage, pages] per extent, sorted by addr, none crossing a dump-time VMA. */
  extents: BigUint64Array;
  /** [firstPage, pages] per chunk, in fill order, each inside one extent. */
  chunks: BigUint64Array;
}

export interface NativeFillTarget {
  uffd: number;
  /** Created by UFFD_EVENT_FORK during the fill. */
  forked: boolean;
  /** Its mm went away during the fill. */
  exited: boolean;
  /** The addon closed this userfaultfd (every page was in). */
  closed: boolean;
  totalPages: number;
  pagesCopied: number;
  pagesExisting: number;
  pagesDropped: number;
  pagesVanished: number;
  pagesLeft: number;
  /** A fault and a worker copied the same page at once; the second got EEXIST (harmless, informative). */
  pagesRaced: number;
  faults: number;
  faultPagesCopied: number;
  zeroPages: number;
  events: { fork: number; remap: number; remove: number; unmap: number };
}

export interface NativeFillResult {
  ok: boolean;
  canceled: boolean;
  error?: { op: string; errno: number; message: string };
  bytesRead: number;
  /** When the start gate opened (ms after the fill began; -1: never). */
  startMs: number;
  /** Until every page was in (ms after the fill began: includes the wait for the gate). */
  fillMs: number;
  /** Including the hash. */
  durationMs: number;
  faultWaitMaxUs: number;
  hash?: string;
  hashedBytes?: number;
  targets: NativeFillTarget[];
}

/** The addon's exports (native/src/uffd_worker.cc). */
export interface UffdBinding {
  /** A listening AF_UNIX socket at path (a stale socket file is replaced). */
  listen(path: string): number;
  accept(listenFd: number, cancelFd: number, timeoutMs: number): Promise<number>;
  receive(clientFd: number, cancelFd: number, timeoutMs: number): Promise<{ kind: LazyMessage['kind']; pid: number; uffd: number }>;
  /** Resolves in every outcome; read `ok`, and close what `targets[].closed` says is still open. */
  fill(options: NativeFillOptions): Promise<NativeFillResult>;
  /** XXH64 (seed 0) of a file, 16 lowercase hex chars. */
  hashFile(path: string, cancelFd: number): Promise<{ hash: string; bytes: number }>;
  createCancel(): number;
  cancel(fd: number): void;
  close(fd: number): void;
}

function isBinding(mod: unknown): mod is UffdBinding {
  return hasFunctions(mod, ['listen', 'accept', 'receive', 'fill', 'hashFile', 'createCancel', 'cancel', 'close']);
}

/** `<repo>/native/uffd/build/Release/thaw_uffd.node`. */
export function defaultUffdAddonPath(): string {
  return addonPath('uffd', 'thaw_uffd.node');
}

export type UffdAddonLoad = AddonLoad<UffdBinding>;

const loadThawUffd = addonLoader('thaw_uffd', isBinding);

/** Loads the addon once per process; a missing or broken build is reported, not thrown. */
export function loadUffdAddon(path = defaultUffdAddonPath()): UffdAddonLoad {
  return loadThawUffd(path);
}

const errnoNames = new Map<number, string>(Object.entries(osConstants.errno).map(([name, n]) => [n, name]));

/** The errno's name (ETIMEDOUT …), or its number. */
export function errnoName(errno: number): string {
  return errnoNames.get(errno) ?? String(errno);
}

/** The error class of an errno from the page server. */
export function uffdErrorCode(errno: number): ErrorCode {
  switch (errnoNames.get(errno)) {
    case 'ETIMEDOUT':
      return 'DeadlineExceeded';
    case 'ECANCELED':
      return 'Canceled';
    case 'ENOENT':
      return 'NotFound';
    case 'EPERM':
    case 'EACCES':
    case 'ENOSYS':
      return 'FailedPrecondition';
    case 'EPROTO':
    case 'EIO':
      return 'DataLoss';
    default:
      return 'Internal';
  }
}

/** Turns what the addon threw into a NativeIoError (op + errno kept). */
export function fromUffdError(err: unknown, op: string): NativeIoError {
  if (err instanceof Error && typeof (err as { errno?: unknown }).errno === 'number') {
    const raw = err as Error & { errno: number; op?: unknown };
    const rawOp = typeof raw.op === 'string' ? raw.op : op;
    return new NativeIoError(uffdErrorCode(raw.errno), raw.message, { op: rawOp, errno: raw.errno }, { cause: err });
  }
  const detail = err instanceof Error ? err.message : String(err);
  return new NativeIoError('InvalidArgument', `${op} failed: ${detail}`, { op, errno: osConstants.errno.EINVAL }, { cause: err });
}
