/**
 * `CudaCheckpoint`: client of a cuda-checkpoint compatible CLI — thaw's own `thaw-cuda`
 * (native/cuda) or NVIDIA's `cuda-checkpoint` binary. One method per verb, one place that execs
 * (timeout + AbortSignal on every call), and a `CudaCheckpointError` carrying the pid, the action
 * and the tool's own output on failure.
 *
 * Only the plain-text interface both tools share is used (`--get-state` prints the state word,
 * `--get-restore-tid` the tid); `probe()` is a thaw-cuda extra and reports NotImplemented for
 * NVIDIA's binary. Exit codes 3 (no libcuda), 4 (driver too old) and 5 (lock timed out) are
 * thaw-cuda's; NVIDIA's binary is classified by its output text instead.
 */
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';
import { CudaCheckpointError, type ErrorCode } from '../errors.js';
import { silentLogger, type Logger } from '../log/logger.js';

export type CudaProcessState = 'running' | 'locked' | 'checkpointed' | 'failed';
export type CudaAction = 'get-state' | 'lock' | 'checkpoint' | 'restore' | 'unlock' | 'toggle' | 'get-restore-tid' | 'probe';

const STATES: readonly CudaProcessState[] = ['running', 'locked', 'checkpointed', 'failed'];

/** thaw-cuda's exit codes (native/cuda/thaw-cuda.c). */
export const THAW_CUDA_EXIT = Object.freeze({ cuda: 1, usage: 2, noLibcuda: 3, noSymbol: 4, lockTimeout: 5 });

/**
 * Default per-action timeouts (ms). Checkpoint and restore move all GPU memory at 2-5 GB/s
 * (24 GiB: ~16 s checkpoint, ~6 s restore on an H100), so they get minutes. A lock's own timeout
 * is added to the lock entry.
 */
export const DEFAULT_CUDA_TIMEOUTS_MS: Readonly<Record<CudaAction, number>> = Object.freeze({
  'get-state': 30_000,
  lock: 30_000,
  checkpoint: 600_000,
  restore: 600_000,
  unlock: 30_000,
  toggle: 600_000,
  'get-restore-tid': 30_000,
  probe: 60_000,
});

export interface CudaCheckpointOptions {
  /** cuda-checkpoint compatible binary; null/undefined = thaw-cuda from this checkout. */
  readonly path?: string | null;
  readonly logger?: Logger;
  readonly timeoutsMs?: Readonly<Partial<Record<CudaAction, number>>>;
  /**
   * A command the tool runs under, e.g. `runsc <global flags> exec <id>`: the tool (at `path`, a
   * path inside that sandbox) then acts on the sandbox's own pids. Empty = run it directly.
   */
  readonly launcher?: readonly string[];
}

export interface CudaCallOptions {
  readonly signal?: AbortSignal;
  /** Overrides the action's default timeout. */
  readonly timeoutMs?: number;
}

/** One GPU remap for restore: the UUID at checkpoint time → the UUID to restore onto (`GPU-…`). */
export interface GpuPair {
  readonly from: string;
  readonly to: string;
}

export interface CudaRestoreOptions extends CudaCallOptions {
  /** Restore onto other GPUs of the same model (CUcheckpointGpuPair list). */
  readonly deviceMap?: readonly GpuPair[];
}

export interface CudaDevice {
  index: number;
  /** As nvidia-smi prints it: `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`. */
  uuid: string;
  name: string;
  totalMemoryBytes: number;
  pciBusId: string;
  computeCapability: string;
}

/** `thaw-cuda --probe`. */
export interface CudaProbe {
  ok: boolean;
  libcuda: boolean;
  /** From /proc/driver/nvidia/version, e.g. `580.159.04`; null when the module is not loaded. */
  kernelDriverVersion: string | null;
  /** cuDriverGetVersion, e.g. 13000. */
  cudaDriverVersion: number;
  cudaVersion: string;
  checkpointApi: boolean;
  missingSymbols: string[];
  cuInitMs: number;
  /** cuInit's error name when it failed (no device visible), else null. */
  initError: string | null;
  devices: CudaDevice[];
  /** Why libcuda could not be loaded (ok = false). */
  error?: string;
}

interface RunOutput {
  stdout: string;
  /** stdout and stderr interleaved, trimmed (what an operator needs to see). */
  output: string;
  durationMs: number;
}

interface ExecResult extends RunOutput {
  exitCode: number | undefined;
  error: CudaCheckpointError | null;
}

const UUID_RE = /^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/**
 * Where thaw-cuda lives in this checkout: `<repo>/native/cuda/thaw-cuda`, found by walking up from
 * this module (src/gpu/ when run from source, dist/src/gpu/ when compiled).
 */
export function defaultThawCudaPath(): string {
  const here = dirname(fileURLToPath(import.meta.url));
  for (let dir = here, i = 0; i < 6; i++, dir = dirname(dir)) {
    if (existsSync(join(dir, 'native', 'cuda', 'Makefile'))) return join(dir, 'native', 'cuda', 'thaw-cuda');
  }
  return join(here, '..', '..', 'native', 'cuda', 'thaw-cuda');
}

export class CudaCheckpoint {
  readonly path: string;
  readonly #log: Logger;
  readonly #timeouts: Readonly<Record<CudaAction, number>>;
  readonly #launcher: readonly string[];

  constructor(options: CudaCheckpointOptions = {}) {
    this.path = options.path ?? defaultThawCudaPath();
    this.#launcher = options.launcher ?? [];
    this.#log = options.logger ?? silentLogger;
    this.#timeouts = { ...DEFAULT_CUDA_TIMEOUTS_MS, ...options.timeoutsMs };
  }

  /** `--get-state`: fails (InvalidArgument or Unknown) for a process that is not a CUDA process. */
  async getState(pid: number, call: CudaCallOptions = {}): Promise<CudaProcessState> {
    const out = await this.#run('get-state', pid, ['--get-state', '--pid', String(pid)], call);
    const word = lastLine(out.stdout).toLowerCase();
    const state = STATES.find((s) => s === word);
    if (state === undefined) throw badOutput('get-state', pid, out.output);
    return state;
  }

  /**
   * `--action lock --timeout MS` (0 = wait forever). A lock whose timeout expires fails with
   * DeadlineExceeded and leaves the process running (`isLockTimeout`).
   */
  async lock(pid: number, timeoutMs: number, call: CudaCallOptions = {}): Promise<void> {
    const argv = ['--action', 'lock', '--pid', String(pid)];
    if (timeoutMs > 0) argv.push('--timeout', String(timeoutMs));
    // The exec timeout must outlast the lock's own, so an expired lock is reported by the tool.
    const execTimeout = call.timeoutMs ?? (timeoutMs > 0 ? this.#timeouts.lock + timeoutMs : 0);
    await this.#run('lock', pid, argv, { ...call, timeoutMs: execTimeout });
  }

  async checkpoint(pid: number, call: CudaCallOptions = {}): Promise<void> {
    await this.#run('checkpoint', pid, ['--action', 'checkpoint', '--pid', String(pid)], call);
  }

  /** `--action restore`: the process is LOCKED afterwards; `unlock` lets it run. */
  async restore(pid: number, opts: CudaRestoreOptions = {}): Promise<void> {
    const argv = ['--action', 'restore', '--pid', String(pid)];
    if (opts.deviceMap !== undefined && opts.deviceMap.length > 0) argv.push('--device-map', deviceMapArg(opts.deviceMap));
    await this.#run('restore', pid, argv, opts);
  }

  async unlock(pid: number, call: CudaCallOptions = {}): Promise<void> {
    await this.#run('unlock', pid, ['--action', 'unlock', '--pid', String(pid)], call);
  }

  /** running → checkpointed, or checkpointed → running, in one call. */
  async toggle(pid: number, call: CudaCallOptions = {}): Promise<void> {
    await this.#run('toggle', pid, ['--toggle', '--pid', String(pid)], call);
  }

  /** The CUDA restore thread's tid; fails for processes without a CUDA context. */
  async getRestoreTid(pid: number, call: CudaCallOptions = {}): Promise<number> {
    const out = await this.#run('get-restore-tid', pid, ['--get-restore-tid', '--pid', String(pid)], call);
    const tid = Number(lastLine(out.stdout));
    if (!Number.isSafeInteger(tid) || tid <= 0) throw badOutput('get-restore-tid', pid, out.output);
    return tid;
  }

  /**
   * `thaw-cuda --probe`: driver and CUDA versions, whether the checkpoint API exists, devices.
   * Resolves with `ok: false` when libcuda is missing; throws when the binary cannot run or is
   * not thaw-cuda (NotImplemented).
   */
  async probe(call: CudaCallOptions = {}): Promise<CudaProbe> {
    const res = await this.#exec('probe', 0, ['--probe'], call);
    // Exit 3 (no libcuda) still prints the probe JSON with ok: false.
    if (res.error === null || res.exitCode === THAW_CUDA_EXIT.noLibcuda) {
      const parsed = parseProbe(res.stdout);
      if (parsed !== null) return parsed;
      if (res.error === null) throw badOutput('probe', 0, res.output);
    }
    if (res.error?.code === 'InvalidArgument') {
      throw new CudaCheckpointError('NotImplemented', `${this.path} has no --probe (not thaw-cuda)`, { pid: 0, action: 'probe', output: res.output }, { cause: res.error });
    }
    throw res.error;
  }

  async #run(action: CudaAction, pid: number, argv: readonly string[], call: CudaCallOptions): Promise<RunOutput> {
    const res = await this.#exec(action, pid, argv, call);
    if (res.error !== null) throw res.error;
    return res;
  }

  /** The one place that execs the tool; failures come back as an error value, not thrown. */
  async #exec(action: CudaAction, pid: number, argv: readonly string[], call: CudaCallOptions): Promise<ExecResult> {
    const timeout = call.timeoutMs ?? this.#timeouts[action];
    const fullArgv = [...this.#launcher, this.path, ...argv];
    if (call.signal?.aborted) {
      const error = new CudaCheckpointError('Canceled', `cuda-checkpoint ${action} of pid ${pid} canceled`, { pid, action, output: '' }, { cause: call.signal.reason });
      return { stdout: '', output: '', durationMs: 0, exitCode: undefined, error };
    }
    const t0 = performance.now();
    const result = await execa(fullArgv[0]!, fullArgv.slice(1), {
      reject: false,
      timeout: timeout > 0 ? timeout : undefined,
      cancelSignal: call.signal,
      forceKillAfterDelay: 2_000,
      stdin: 'ignore',
      all: true,
      encoding: 'utf8',
      maxBuffer: 4 * 1024 * 1024,
    });
    const durationMs = Math.round((performance.now() - t0) * 10) / 10;
    const stdout = typeof result.stdout === 'string' ? result.stdout : '';
    const output = (typeof result.all === 'string' ? result.all : stdout).trim();
    this.#log.debug({ pid, argv: fullArgv, exitCode: result.exitCode, durationMs }, 'cuda-checkpoint');
    if (!result.failed) return { stdout, output, durationMs, exitCode: 0, error: null };

    let code: ErrorCode;
    let detail: string;
    const line = lastLine(output);
    if (result.isCanceled) {
      code = 'Canceled';
      detail = 'canceled';
    } else if (result.timedOut) {
      // The tool was killed mid-call: the process's CUDA state is unknown (read it again).
      code = 'DeadlineExceeded';
      detail = `no answer within ${timeout} ms (killed; state unknown)`;
    } else if (result.exitCode === undefined && result.signal === undefined) {
      code = 'Unavailable';
      detail = `cannot run ${this.path}: ${result.shortMessage}`;
    } else if (result.exitCode === undefined) {
      code = 'Unknown';
      detail = `killed by ${result.signal}${line ? `: ${line}` : ''}`;
    } else {
      code = classify(result.exitCode, output);
      detail = line || `exit status ${result.exitCode}`;
    }
    const error = new CudaCheckpointError(
      code,
      `cuda-checkpoint ${action}${pid > 0 ? ` of pid ${pid}` : ''} failed: ${detail}`,
      { pid, action, output },
      { cause: 'cause' in result && result.cause !== undefined ? result.cause : undefined },
    );
    this.#log.debug({ pid, err: error }, 'cuda-checkpoint failed');
    return { stdout, output, durationMs, exitCode: result.exitCode, error };
  }
}

/** True when a lock failed because its timeout expired: the process is still running, unharmed. */
export function isLockTimeout(err: unknown): boolean {
  return err instanceof CudaCheckpointError && err.action === 'lock' && err.code === 'DeadlineExceeded' && !/state unknown/.test(err.message);
}

/** Validates and joins a device map for `--device-map OLD=NEW,...`. */
export function deviceMapArg(pairs: readonly GpuPair[]): string {
  return pairs
    .map(({ from, to }) => {
      for (const u of [from, to]) {
        if (!UUID_RE.test(u)) {
          throw new CudaCheckpointError('InvalidArgument', `invalid GPU UUID ${JSON.stringify(u)} in device map`, { pid: 0, action: 'restore', output: '' });
        }
      }
      return `${from}=${to}`;
    })
    .join(',');
}

/** Exit code + output → error class (thaw-cuda's codes first, then NVIDIA's texts). */
function classify(exitCode: number, output: string): ErrorCode {
  if (exitCode === THAW_CUDA_EXIT.lockTimeout || /CUDA_ERROR_NOT_READY|timed out/i.test(output)) return 'DeadlineExceeded';
  if (exitCode === THAW_CUDA_EXIT.noLibcuda) return 'Unavailable';
  if (exitCode === THAW_CUDA_EXIT.noSymbol) return 'NotImplemented';
  if (exitCode === THAW_CUDA_EXIT.usage || /unknown option|unrecognized option|invalid option|usage:/i.test(output)) return 'InvalidArgument';
  if (/ILLEGAL_STATE|invalid state|cannot toggle/i.test(output)) return 'FailedPrecondition';
  if (/INVALID_VALUE|not a CUDA process|could not find restore thread|no such process/i.test(output)) return 'NotFound';
  if (/CUDA_ERROR_NOT_SUPPORTED|not supported/i.test(output)) return 'NotImplemented';
  return 'Unknown';
}

function lastLine(text: string): string {
  const lines = text.split('\n').map((l) => l.trim()).filter((l) => l !== '');
  return lines.at(-1) ?? '';
}

function badOutput(action: CudaAction, pid: number, output: string): CudaCheckpointError {
  return new CudaCheckpointError('Internal', `cuda-checkpoint ${action} gave unexpected output: ${JSON.stringify(lastLine(output))}`, { pid, action, output });
}

function parseProbe(stdout: string): CudaProbe | null {
  let v: unknown;
  try {
    v = JSON.parse(lastLine(stdout));
  } catch {
    return null;
  }
  if (typeof v !== 'object' || v === null || typeof (v as { ok?: unknown }).ok !== 'boolean') return null;
  const o = v as Partial<CudaProbe> & { ok: boolean };
  return {
    ok: o.ok,
    libcuda: o.libcuda ?? false,
    kernelDriverVersion: o.kernelDriverVersion ?? null,
    cudaDriverVersion: o.cudaDriverVersion ?? 0,
    cudaVersion: o.cudaVersion ?? '',
    checkpointApi: o.checkpointApi ?? false,
    missingSymbols: o.missingSymbols ?? [],
    cuInitMs: o.cuInitMs ?? 0,
    initError: o.initError ?? null,
    devices: Array.isArray(o.devices) ? o.devices : [],
    ...(o.error !== undefined ? { error: o.error } : {}),
  };
}
