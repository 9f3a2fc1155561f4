import { readFileSync } from 'node:fs';
import { silentLogger, type Logger } from '../log/logger.js';
import type { FileHasher } from '../snapshot/hash.js';
import { XXH64 } from '../snapshot/hash.js';
import type { StageReader } from './engine.js';
import { TsIo } from './fallback.js';
import {
  NativeIo,
  errnoName,
  loadNativeIo,
  type FaultSpec,
  type IoBackend,
  type IoBackendName,
  type NativeBackendName,
  type NativeIoBinding,
} from './native.js';

/**
 * The typed facade of restore I/O: `openIo()` picks the fastest backend that works here —
 * io_uring, then Linux AIO, then a pread thread pool (all in the native addon), then pure TS —
 * and returns it as an `IoBackend`. THAW_IO_BACKEND=uring|aio|pread|ts overrides the choice.
 */

export type {
  CopyResult,
  FaultSpec,
  FileHashResult,
  FileRange,
  HashOptions,
  IoBackend,
  IoBackendName,
  IoOptions,
  PrefetchResult,
  RangeResult,
  ReadIntoOptions,
} from './native.js';
export { DEFAULT_BLOCK_SIZE, DEFAULT_QUEUE_DEPTH, isUringRefused } from './native.js';

export const IO_BACKEND_ENV = 'THAW_IO_BACKEND';

export interface OpenIoOptions {
  /** Wanted backend; 'auto' (default) takes the first that works of uring, aio, pread, ts. */
  readonly backend?: IoBackendName | 'auto';
  readonly log?: Logger;
  /** Test-only: every call of the returned backend injects these faults (see FaultSpec). */
  readonly faults?: FaultSpec;
  /** Where THAW_IO_BACKEND is read (default process.env). */
  readonly env?: Readonly<Record<string, string | undefined>>;
  /** Tests: a stand-in for the addon; null means "not built". Default: the real addon, if it loads. */
  readonly binding?: NativeIoBinding | null;
}

/** After each backend, the ones tried when it is unavailable. */
const CHAIN: Readonly<Record<IoBackendName, readonly IoBackendName[]>> = {
  uring: ['uring', 'aio', 'pread', 'ts'],
  aio: ['aio', 'pread', 'ts'],
  pread: ['pread', 'ts'],
  ts: ['ts'],
};

const BACKEND_NAMES: readonly string[] = Object.keys(CHAIN);

function isBackendName(s: string): s is IoBackendName {
  return BACKEND_NAMES.includes(s);
}

/** Probe results per binding: each backend is probed (and a refusal logged) once per process. */
const probes = new WeakMap<NativeIoBinding, Map<NativeBackendName, number>>();
let addonMissingLogged = false;

/** io_uring_disabled (0 allowed, 1 only for io_uring_group, 2 off), or undefined where the sysctl is absent. */
function uringSysctl(): number | undefined {
  try {
    return Number(readFileSync('/proc/sys/kernel/io_uring_disabled', 'utf8').trim());
  } catch {
    return undefined;
  }
}

function probe(binding: NativeIoBinding, name: NativeBackendName, log: Logger, fallback: IoBackendName | undefined): boolean {
  let results = probes.get(binding);
  if (!results) probes.set(binding, (results = new Map()));
  let rc = results.get(name);
  if (rc !== undefined) return rc === 0;
  try {
    rc = binding.probe(name);
  } catch {
    rc = -1; // a throwing probe counts as unavailable (EPERM)
  }
  results.set(name, rc);
  if (rc !== 0) {
    const errno = errnoName(-rc);
    if (name === 'uring') {
      log.warn({ backend: name, errno, ioUringDisabled: uringSysctl(), fallback }, 'io_uring refused by the kernel; falling back');
    } else {
      log.warn({ backend: name, errno, fallback }, `${name} I/O unavailable; falling back`);
    }
  }
  return rc === 0;
}

/** Picks the backend (env override, then `backend`, then auto) and returns it. Never throws for lack of a backend: 'ts' always works. */
export function openIo({ backend = 'auto', log = silentLogger, faults, env = process.env, binding }: OpenIoOptions = {}): IoBackend {
  let wanted: IoBackendName | 'auto' = backend;
  const override = env[IO_BACKEND_ENV];
  if (override !== undefined && override !== '') {
    if (isBackendName(override)) wanted = override;
    else log.warn({ [IO_BACKEND_ENV]: override, allowed: BACKEND_NAMES }, `ignoring unknown ${IO_BACKEND_ENV}`);
  }
  let native: NativeIoBinding | null;
  if (binding !== undefined) {
    native = binding;
  } else {
    const addon = loadNativeIo();
    native = addon.binding;
    if (addon.binding === null && !addonMissingLogged) {
      addonMissingLogged = true;
      log.info({ err: addon.error, path: addon.path }, 'native I/O addon not loaded; using TypeScript I/O');
    }
  }
  const chain = CHAIN[wanted === 'auto' ? 'uring' : wanted];
  let chosen: IoBackend = new TsIo();
  for (let i = 0; i < chain.length; i++) {
    const name = chain[i]!;
    if (name === 'ts') break;
    if (native === null) break;
    if (probe(native, name, log, chain[i + 1])) {
      chosen = new NativeIo({
        binding: native,
        backend: name,
        onDirectRefused: (path) => log.debug({ backend: name, path }, 'O_DIRECT refused by the filesystem; read buffered'),
      });
      break;
    }
  }
  if (wanted !== 'auto' && chosen.name !== wanted) {
    log.warn({ backend: chosen.name, wanted }, `I/O backend ${wanted} unavailable; using ${chosen.name}`);
  }
  log.debug({ backend: chosen.name }, 'I/O backend chosen');
  return faults === undefined ? chosen : withFaults(chosen, faults);
}

/** The backends that work here, in preference order (always ends with 'ts'). */
export function availableBackends({ binding }: { readonly binding?: NativeIoBinding | null } = {}): IoBackendName[] {
  const native = binding === undefined ? loadNativeIo().binding : binding;
  const out: IoBackendName[] = [];
  if (native !== null) {
    for (const name of ['uring', 'aio', 'pread'] as const) if (probe(native, name, silentLogger, undefined)) out.push(name);
  }
  out.push('ts');
  return out;
}

/** Wraps a backend so that every call injects `spec` (tests, and proving the restore engine's fallbacks). */
export function withFaults(io: IoBackend, spec: FaultSpec): IoBackend {
  return {
    name: io.name,
    prefetch: (ranges, opts = {}) => io.prefetch(ranges, { ...opts, faults: spec }),
    copyFile: (src, dst, opts = {}) => io.copyFile(src, dst, { ...opts, faults: spec }),
    hashFiles: (paths, opts = {}) => io.hashFiles(paths, { ...opts, faults: spec }),
    readInto: (path, target, opts = {}) => io.readInto(path, target, { ...opts, faults: spec }),
  };
}

/** The snapshot store's FileHasher over a backend (same 'xxh64' strings as WasmXxh64Hasher). */
export function ioFileHasher(io: IoBackend): FileHasher {
  return {
    algo: XXH64,
    async hashFile(path, signal) {
      const [r] = await io.hashFiles([path], signal ? { signal } : {});
      return { hash: r!.hash, bytes: r!.bytes };
    },
  };
}

/** The restore stager's reader over a backend: one buffered pass that warms the page cache and hashes. */
export function ioStageReader(io: IoBackend): StageReader {
  return {
    name: io.name,
    algo: XXH64,
    async readAndHash(path, signal) {
      const r = await io.prefetch([{ path }], signal ? { hash: true, signal } : { hash: true });
      const f = r.files[0]!;
      return { hash: f.hash!, bytes: f.bytes };
    },
  };
}
