import { readFile } from 'node:fs/promises';
import { ShimError } from '../errors.js';
import type { LogLevel } from '../log/logger.js';

/** Which runtime runs a container: gVisor (runsc, default) or native (runc + CRIU, for GPU hosts). */
export type EngineChoice = 'gvisor' | 'native' | 'auto';
export type IoBackendChoice = 'auto' | 'uring' | 'aio' | 'pread';

/**
 * The one typed configuration of thaw. Loaded once (CLI start-up or shim `serve`) and passed down;
 * nothing else reads env or files for configuration.
 */
export interface ThawConfig {
  /** Runtime state: container records and the runsc/runc roots live under it. */
  stateDir: string;
  store: {
    /** Snapshot store root (created mode 0700). */
    path: string;
    /** GC bound for the whole store in bytes; null = unbounded. */
    maxBytes: number | null;
  };
  snapshot: {
    /**
     * Env var names left out of the compatibility key: their values differ per replica (CRI sets
     * HOSTNAME to the pod name) and a restored process keeps its old values anyway.
     */
    ignoreEnv: string[];
  };
  /** Default engine; per container the annotation `thaw.dev/engine` overrides it. */
  engine: EngineChoice;
  /**
   * Defaults for the `thaw.dev/*` annotations (trigger, hooks, kv-cache) for every container of this
   * runtime, e.g. `{"thaw.dev/checkpoint": "when-ready"}`; a container's own annotations win.
   */
  annotations: Record<string, string>;
  runsc: {
    /** runsc binary (PATH lookup if not absolute). */
    path: string;
    /** systrap works on our machines; kvm hangs on kvm-pvm. Restore must use the checkpoint's platform. */
    platform: 'systrap' | 'ptrace' | 'kvm';
    /** `sandbox` fails on kernels >= 6.11 (gVisor #10704), so none or host. */
    network: 'none' | 'host';
    /** Directory for runsc debug logs (`--debug --debug-log`); null = off. */
    debugLogDir: string | null;
    /** Extra global flags passed through as `--key=value` on every runsc call. */
    flags: Record<string, string>;
  };
  runc: {
    path: string;
    /** CRIU >= 4.1 (set-up unpacks trixie's into /opt/thaw/criu). */
    criuPath: string;
    /**
     * Checkpoint established TCP connections (CRIU's --tcp-established) instead of refusing them.
     * Apps of several processes talk over loopback TCP (torch.distributed's stores, NCCL's
     * bootstrap), which CRIU otherwise refuses to dump; a restored connection to a peer outside the
     * snapshot is dead and reset on its next use. Restores always accept such connections.
     */
    tcpEstablished: boolean;
  };
  checkpoint: {
    /** `none` makes pages.img raw and page-aligned (fast, stageable); `auto` = best the runsc offers. */
    compression: 'auto' | 'none' | 'flate-best-speed';
    /** O_DIRECT image writes where runsc supports them (7-10x faster checkpoints measured). */
    direct: boolean;
  };
  restore: {
    /** Stage snapshot bytes into memory while the sandbox is being created. */
    stage: boolean;
    ioBackend: IoBackendChoice;
    /** Verify file checksums against the manifest before a restore may use the bytes. */
    verify: boolean;
    /**
     * Native engine only: fill the restored process's anonymous memory with thaw's parallel
     * lazy-pages server while the app (and the CUDA restore) already runs (docs/pages-restore.md).
     * `auto` = when the page server addon loads and CRIU supports userfaultfd (`uffd-noncoop`);
     * `on` = whenever the addon loads; `off` = plain CRIU restore. Any failure falls back to the
     * plain restore.
     */
    lazyPages: 'auto' | 'on' | 'off';
  };
  gpu: {
    /** `auto` = snapshot GPU state when the driver API is present; `off` = never touch the GPU. */
    mode: 'auto' | 'off';
    /** cuda-checkpoint compatible binary; null = thaw's own thaw-cuda. */
    cudaCheckpointPath: string | null;
    /** Lock timeout; an expired lock leaves the process running. */
    lockTimeoutMs: number;
  };
  log: {
    level: LogLevel;
  };
  shim: {
    /**
     * Keep one spare server booted for the next container's `start` (src/shim/spare.ts): a
     * container then pays no Node start-up in `start` or `serve`, at the price of one idle Node
     * process (~56 MB) per install. A server that came from a spare waits as the spare again once
     * its containers are gone, unless this is off for its container.
     */
    spare: boolean;
  };
}

export const defaultConfig: ThawConfig = Object.freeze({
  stateDir: '/run/thaw',
  store: { path: '/var/lib/thaw/snapshots', maxBytes: null },
  snapshot: { ignoreEnv: ['HOSTNAME'] },
  engine: 'gvisor',
  annotations: {},
  // host-uds=open lets the app connect to the one host socket thaw mounts in (/run/thaw/thaw.sock, the
  // on-request trigger); only sockets bind-mounted into the container are reachable.
  runsc: { path: 'runsc', platform: 'systrap', network: 'none', debugLogDir: null, flags: { 'host-uds': 'open' } },
  runc: { path: 'runc', criuPath: '/opt/thaw/criu/bin/criu', tcpEstablished: false },
  checkpoint: { compression: 'auto', direct: true },
  restore: { stage: true, ioBackend: 'auto', verify: true, lazyPages: 'auto' },
  gpu: { mode: 'auto', cudaCheckpointPath: null, lockTimeoutMs: 10_000 },
  log: { level: 'info' },
  shim: { spare: true },
}) as ThawConfig;

/** Default location of the shim config; runtime options' `config_path` overrides it. */
export const DEFAULT_CONFIG_PATH = '/etc/thaw/config.json';

type DeepPartial<T> = { [K in keyof T]?: T[K] extends object ? (T[K] extends unknown[] ? T[K] : DeepPartial<T[K]>) : T[K] };
export type ThawConfigInput = DeepPartial<ThawConfig>;

/** Merges `input` over the defaults and validates every field; errors name the field. */
export function resolveConfig(input: unknown, source = 'config'): ThawConfig {
  if (input === undefined || input === null) input = {};
  if (!isObject(input)) throw invalid(source, '', 'must be a JSON object');
  const merged = merge(structuredClone(defaultConfig) as unknown as Record<string, unknown>, input, source, '');
  const c = merged as unknown as ThawConfig;
  oneOf(source, 'engine', c.engine, ['gvisor', 'native', 'auto']);
  oneOf(source, 'runsc.platform', c.runsc.platform, ['systrap', 'ptrace', 'kvm']);
  oneOf(source, 'runsc.network', c.runsc.network, ['none', 'host']);
  oneOf(source, 'checkpoint.compression', c.checkpoint.compression, ['auto', 'none', 'flate-best-speed']);
  oneOf(source, 'restore.ioBackend', c.restore.ioBackend, ['auto', 'uring', 'aio', 'pread']);
  oneOf(source, 'restore.lazyPages', c.restore.lazyPages, ['auto', 'on', 'off']);
  oneOf(source, 'gpu.mode', c.gpu.mode, ['auto', 'off']);
  oneOf(source, 'log.level', c.log.level, ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent']);
  for (const [k, v] of Object.entries(c.runsc.flags)) {
    if (typeof v !== 'string') throw invalid(source, `runsc.flags.${k}`, 'must be a string');
    if (!/^[a-z][a-z0-9-]*$/.test(k)) throw invalid(source, `runsc.flags.${k}`, 'is not a runsc flag name');
  }
  for (const [k, v] of Object.entries(c.annotations)) {
    if (typeof v !== 'string') throw invalid(source, `annotations.${k}`, 'must be a string');
    if (!k.startsWith('thaw.dev/')) throw invalid(source, `annotations.${k}`, 'only thaw.dev/* annotations have defaults');
  }
  if (!Array.isArray(c.snapshot.ignoreEnv) || !c.snapshot.ignoreEnv.every((e) => typeof e === 'string')) {
    throw invalid(source, 'snapshot.ignoreEnv', 'must be an array of strings');
  }
  if (c.store.maxBytes !== null && (!Number.isSafeInteger(c.store.maxBytes) || c.store.maxBytes < 0)) {
    throw invalid(source, 'store.maxBytes', 'must be a non-negative integer or null');
  }
  if (!Number.isSafeInteger(c.gpu.lockTimeoutMs) || c.gpu.lockTimeoutMs < 0) {
    throw invalid(source, 'gpu.lockTimeoutMs', 'must be a non-negative integer');
  }
  return c;
}

/** Reads a JSON config file. A missing file at the default path means defaults; elsewhere it is an error. */
export async function loadConfig(path: string | undefined, overrides: ThawConfigInput = {}): Promise<ThawConfig> {
  let fromFile: unknown = {};
  const file = path ?? DEFAULT_CONFIG_PATH;
  try {
    fromFile = JSON.parse(await readFile(file, 'utf8'));
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (!(code === 'ENOENT' && path === undefined)) {
      throw new ShimError('InvalidArgument', `cannot load config ${file}: ${(err as Error).message}`, { cause: err });
    }
  }
  const base = resolveConfig(fromFile, file);
  return resolveConfig(mergeInputs(base, overrides), file);
}

function mergeInputs(base: ThawConfig, overrides: ThawConfigInput): unknown {
  const out = structuredClone(base) as unknown as Record<string, unknown>;
  deepAssign(out, overrides as Record<string, unknown>);
  return out;
}

function deepAssign(target: Record<string, unknown>, src: Record<string, unknown>): void {
  for (const [k, v] of Object.entries(src)) {
    if (v === undefined) continue;
    const t = target[k];
    if (isObject(v) && isObject(t)) deepAssign(t, v);
    else target[k] = v;
  }
}

function merge(base: Record<string, unknown>, input: Record<string, unknown>, source: string, prefix: string): Record<string, unknown> {
  for (const [k, v] of Object.entries(input)) {
    const field = prefix ? `${prefix}.${k}` : k;
    if (!(k in base)) throw invalid(source, field, 'is not a known setting');
    const d = base[k];
    if ((k === 'flags' && prefix === 'runsc') || (k === 'annotations' && prefix === '')) {
      if (!isObject(v)) throw invalid(source, field, 'must be an object of strings');
      // Added to the defaults, not replacing them; a user turns a default off by giving another value.
      base[k] = { ...(d as Record<string, unknown>), ...v };
    } else if (isObject(d)) {
      if (!isObject(v)) throw invalid(source, field, 'must be an object');
      merge(d, v, source, field);
    } else if (d === null) {
      base[k] = v;
    } else {
      if (typeof v !== typeof d) throw invalid(source, field, `must be a ${typeof d}`);
      base[k] = v;
    }
  }
  return base;
}

function oneOf(source: string, field: string, value: unknown, allowed: readonly string[]): void {
  if (typeof value !== 'string' || !allowed.includes(value)) {
    throw invalid(source, field, `must be one of ${allowed.join('|')} (got ${JSON.stringify(value)})`);
  }
}

function invalid(source: string, field: string, what: string): ShimError {
  return new ShimError('InvalidArgument', `invalid ${source}: ${field || 'document'} ${what}`);
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}
