/**
 * `GpuDriver`: the CUDA side of a snapshot, staged like CRIU's CUDA plugin (style.md habit 10) and
 * plugged into an engine as its `GpuHooks`.
 *
 * Checkpoint: probe (driver + checkpoint API present, else disabled with a reason — never a failed
 * container) → discover (the pids holding /dev/nvidia* fds) → read every state (before any side
 * effect; a `failed` process stops here) → lock the running ones with a timeout → checkpoint them.
 * Pids found locked or checkpointed by someone else are left as found. Every step that changes a
 * process registers its undo in a Cleanup, so a partial failure puts every touched process back
 * the way it was found (checkpointed → restore + unlock, locked → unlock); an expired lock leaves
 * its process running. Stages run in parallel across pids (or sequentially), each one timed.
 *
 * Restore: the restored pids carry no /dev/nvidia* fds (the CUDA checkpoint closed them), so every
 * given pid is asked for its state; the checkpointed ones are restored (with a device map when the
 * GPUs differ from the recorded ones) and then unlocked. A failed restore re-checkpoints the pids
 * it already restored, leaving all as found.
 */
import { readdir, readlink } from 'node:fs/promises';
import { join } from 'node:path';
import { Cleanup } from '../cleanup.js';
import type { ThawConfig } from '../config/config.js';
import type { GpuCheckpointRecord, GpuHooks } from '../engine/engine.js';
import { CudaCheckpointError, ShimError } from '../errors.js';
import { PhaseTimer, silentLogger, type Logger } from '../log/logger.js';
import { CudaCheckpoint, isLockTimeout, type CudaProbe, type CudaProcessState, type GpuPair } from './cuda-checkpoint.js';
import { NVIDIA_PROC_DIR, readGpuInventory, type GpuInventory } from './probe.js';

export interface GpuDriverOptions {
  readonly cuda: CudaCheckpoint;
  /** `off` never touches the GPU (checkpoints of GPU processes then fail with the reason). */
  readonly mode?: 'auto' | 'off';
  /** Lock timeout per process; an expired lock leaves the process running. */
  readonly lockTimeoutMs: number;
  readonly logger?: Logger;
  /** Run each stage across pids in parallel (default) or one pid at a time. */
  readonly parallel?: boolean;
  /** How many tool calls run at once in a parallel stage. */
  readonly concurrency?: number;
  /** /proc (tests point it at a fixture holding <pid>/fd/* links). */
  readonly procRoot?: string;
  /** /proc/driver/nvidia. */
  readonly nvidiaProcDir?: string;
  /**
   * How CUDA processes are found among the pids: by their /dev/nvidia* fds in the host's /proc
   * (default), or by asking the tool for every pid (`ask-tool`: gVisor's sandbox pids have no host
   * /proc entries; a non-CUDA process answers with an error and is left alone).
   */
  readonly discovery?: 'proc-fds' | 'ask-tool';
}

export type GpuAvailability =
  | { enabled: true; inventory: GpuInventory; probe: CudaProbe | null }
  | { enabled: false; reason: string };

/** A process the driver saw and did not touch, with the state it was in. */
export interface SkippedProcess {
  pid: number;
  state: CudaProcessState | 'not-cuda';
}

/** What `beforeCheckpoint` records in the snapshot manifest. */
export interface GpuSnapshotRecord extends GpuCheckpointRecord {
  skipped: SkippedProcess[];
  /** GPU UUIDs at checkpoint time in bus order (the restore's device map starts from these). */
  devices: string[];
  driverVersion: string;
  model: string;
  /** Present when GPU snapshots were disabled; `pids` is then empty. */
  disabledReason?: string;
}

export interface GpuRestoreResult {
  /** Host pids restored and unlocked. */
  pids: number[];
  deviceMap: GpuPair[];
  timings: Record<string, number>;
}

const DEFAULT_CONCURRENCY = 8;

export class GpuDriver implements GpuHooks {
  readonly #cuda: CudaCheckpoint;
  readonly #mode: 'auto' | 'off';
  readonly #lockTimeoutMs: number;
  readonly #log: Logger;
  readonly #parallel: boolean;
  readonly #concurrency: number;
  readonly #procRoot: string;
  readonly #nvidiaProcDir: string;
  readonly #discovery: 'proc-fds' | 'ask-tool';
  #availability: Promise<GpuAvailability> | undefined;

  constructor(options: GpuDriverOptions) {
    this.#cuda = options.cuda;
    this.#mode = options.mode ?? 'auto';
    this.#lockTimeoutMs = options.lockTimeoutMs;
    this.#log = options.logger ?? silentLogger;
    this.#parallel = options.parallel ?? true;
    this.#concurrency = Math.max(1, options.concurrency ?? DEFAULT_CONCURRENCY);
    this.#procRoot = options.procRoot ?? '/proc';
    this.#nvidiaProcDir = options.nvidiaProcDir ?? NVIDIA_PROC_DIR;
    this.#discovery = options.discovery ?? 'proc-fds';
  }

  /**
   * Whether GPU snapshots can work here, decided once per driver: the NVIDIA module lists GPUs
   * and the checkpoint tool runs and finds the driver's checkpoint API. Never throws.
   */
  probe(): Promise<GpuAvailability> {
    this.#availability ??= this.#probe();
    return this.#availability;
  }

  async #probe(): Promise<GpuAvailability> {
    const disabled = (reason: string): GpuAvailability => {
      this.#log.info({ phase: 'gpu.probe', reason }, 'GPU snapshots disabled');
      return { enabled: false, reason };
    };
    if (this.#mode === 'off') return disabled('gpu.mode is off');
    const inventory = await readGpuInventory({ procDir: this.#nvidiaProcDir });
    if (inventory === null) return disabled(`no NVIDIA GPU: ${join(this.#nvidiaProcDir, 'gpus')} is missing or empty`);
    let probe: CudaProbe | null = null;
    try {
      probe = await this.#cuda.probe();
    } catch (err) {
      // NVIDIA's own binary has no --probe: its first real call will tell.
      if (!(err instanceof CudaCheckpointError && err.code === 'NotImplemented')) {
        return disabled(`cannot run ${this.#cuda.path}: ${errorText(err)}`);
      }
    }
    if (probe !== null && !probe.ok) return disabled(probe.error ?? 'libcuda.so.1 cannot be loaded');
    if (probe !== null && !probe.checkpointApi) {
      return disabled(`the NVIDIA driver lacks the checkpoint API (${probe.missingSymbols.join(', ')}); needs R550 or newer`);
    }
    this.#log.debug({ phase: 'gpu.probe', gpus: inventory.gpus.length, driverVersion: inventory.driverVersion }, 'GPU snapshots enabled');
    return { enabled: true, inventory, probe };
  }

  /** Pids (of `pids`) with a /dev/nvidia* fd open, or whose fds cannot be read (root-owned, gone). */
  async findGpuUsers(pids: readonly number[]): Promise<number[]> {
    if (this.#discovery === 'ask-tool') {
      const states = await mapLimit(pids, this.#concurrency, (pid) => this.#stateOf(pid));
      return pids.filter((_, i) => states[i] !== 'not-cuda');
    }
    const users = await mapLimit(pids, this.#concurrency, async (pid) => ((await this.#holdsNvidiaFd(pid)) ? pid : null));
    return users.filter((p): p is number => p !== null);
  }

  async #holdsNvidiaFd(pid: number): Promise<boolean> {
    const dir = join(this.#procRoot, String(pid), 'fd');
    let fds: string[];
    try {
      fds = await readdir(dir);
    } catch (err) {
      // Gone: not a user. Unreadable: ask the driver.
      return (err as NodeJS.ErrnoException).code === 'EACCES' || (err as NodeJS.ErrnoException).code === 'EPERM';
    }
    for (const fd of fds) {
      const target = await readlink(join(dir, fd)).catch(() => '');
      if (target.startsWith('/dev/nvidia')) return true;
    }
    return false;
  }

  async beforeCheckpoint(pids: readonly number[]): Promise<GpuSnapshotRecord> {
    const timer = new PhaseTimer(this.#log);
    const avail = await timer.phase('gpu.probe', () => this.probe());
    const users = await timer.phase('gpu.discover', () => this.findGpuUsers(pids));
    if (!avail.enabled) {
      if (users.length > 0) {
        throw new ShimError('FailedPrecondition', `GPU snapshot needed but disabled: pids ${users.join(', ')} hold /dev/nvidia* open; ${avail.reason}`);
      }
      return { pids: [], timings: timer.timings, skipped: [], devices: [], driverVersion: '', model: '', disabledReason: avail.reason };
    }

    // Read every state before acting: a failed process stops the checkpoint with nothing touched.
    const states = await timer.phase('gpu.state', () => mapLimit(users, this.#concurrency, (pid) => this.#stateOf(pid)));
    const failed = users.filter((_, i) => states[i] === 'failed');
    if (failed.length > 0) {
      throw new CudaCheckpointError('FailedPrecondition', `CUDA process ${failed.join(', ')} is in the failed state; cannot checkpoint`, {
        pid: failed[0]!,
        action: 'get-state',
        output: 'failed',
      });
    }
    const running = users.filter((_, i) => states[i] === 'running');
    const skipped: SkippedProcess[] = users.flatMap((pid, i) => (states[i] === 'running' ? [] : [{ pid, state: states[i]! }]));
    for (const s of skipped) this.#log.info({ pid: s.pid, state: s.state }, 'GPU process left as found');

    await using undo = new Cleanup((f) => this.#log.error({ err: f.err, step: f.name }, 'GPU undo step failed'));
    await timer.phase('gpu.lock', () =>
      this.#stage(running, async (pid) => {
        try {
          await this.#cuda.lock(pid, this.#lockTimeoutMs);
        } catch (err) {
          // An expired lock leaves the process running; anything else: look before undoing.
          if (!isLockTimeout(err) && (await this.#stateOf(pid)) === 'locked') undo.add(`unlock ${pid}`, () => this.#cuda.unlock(pid));
          throw err;
        }
        undo.add(`unlock ${pid}`, () => this.#cuda.unlock(pid));
      }),
    );
    await timer.phase('gpu.checkpoint', () =>
      this.#stage(running, async (pid) => {
        try {
          await this.#cuda.checkpoint(pid);
        } catch (err) {
          if ((await this.#stateOf(pid)) === 'checkpointed') undo.add(`restore ${pid}`, () => this.#cuda.restore(pid));
          throw err;
        }
        undo.add(`restore ${pid}`, () => this.#cuda.restore(pid));
      }),
    );
    undo.release();
    const { inventory } = avail;
    return {
      pids: running,
      timings: timer.timings,
      skipped,
      devices: inventory.gpus.map((g) => g.uuid),
      driverVersion: inventory.driverVersion,
      model: [...new Set(inventory.gpus.map((g) => g.model))].join(' + '),
    };
  }

  /** Puts the recorded processes (same pids, still alive) back to running, whatever step they reached. */
  async resumeAfterCheckpoint(record: GpuCheckpointRecord): Promise<void> {
    const timer = new PhaseTimer(this.#log);
    await timer.phase('gpu.resume', () =>
      this.#stage(record.pids, async (pid) => {
        const state = await this.#stateOf(pid);
        if (state === 'checkpointed') await this.#cuda.restore(pid);
        if (state === 'checkpointed' || state === 'locked') await this.#cuda.unlock(pid);
      }, { all: true }),
    );
  }

  async afterRestore(record: GpuCheckpointRecord, pids: readonly number[]): Promise<void> {
    await this.restoreProcesses(record, pids);
  }

  /** `afterRestore` returning what it did and its phase timings (ms). */
  async restoreProcesses(record: GpuCheckpointRecord, pids: readonly number[]): Promise<GpuRestoreResult> {
    const timer = new PhaseTimer(this.#log);
    if (record.pids.length === 0) return { pids: [], deviceMap: [], timings: timer.timings };
    const avail = await timer.phase('gpu.probe', () => this.probe());
    if (!avail.enabled) {
      throw new ShimError('FailedPrecondition', `snapshot holds ${record.pids.length} CUDA process(es) but GPU snapshots are disabled: ${avail.reason}`);
    }
    const deviceMap = planDeviceMap(recordedDevices(record), avail.inventory);
    // Checkpointed processes hold no /dev/nvidia* fds, so every pid is asked.
    const states = await timer.phase('gpu.discover', () => mapLimit(pids, this.#concurrency, (pid) => this.#stateOf(pid)));
    const targets = pids.filter((_, i) => states[i] === 'checkpointed');
    if (targets.length < record.pids.length) {
      throw new ShimError(
        'FailedPrecondition',
        `expected ${record.pids.length} checkpointed CUDA process(es) among restored pids ${pids.join(', ')}, found ${targets.length}`,
      );
    }
    if (targets.length > record.pids.length) {
      this.#log.warn({ expected: record.pids.length, found: targets.length }, 'more checkpointed CUDA processes than recorded; restoring all');
    }

    await using undo = new Cleanup((f) => this.#log.error({ err: f.err, step: f.name }, 'GPU undo step failed'));
    await timer.phase('gpu.restore', () =>
      this.#stage(targets, async (pid) => {
        try {
          await this.#cuda.restore(pid, { deviceMap });
        } catch (err) {
          if ((await this.#stateOf(pid)) === 'locked') undo.add(`checkpoint ${pid}`, () => this.#cuda.checkpoint(pid));
          throw err;
        }
        // Restored processes are LOCKED; checkpointing again returns them to how they were found.
        undo.add(`checkpoint ${pid}`, () => this.#cuda.checkpoint(pid));
      }),
    );
    undo.release();
    await timer.phase('gpu.unlock', () => this.#stage(targets, (pid) => this.#cuda.unlock(pid)));
    return { pids: targets, deviceMap, timings: timer.timings };
  }

  /** The pid's CUDA state, or 'not-cuda' when the driver does not know it as a CUDA process. */
  async #stateOf(pid: number): Promise<CudaProcessState | 'not-cuda'> {
    try {
      return await this.#cuda.getState(pid);
    } catch (err) {
      this.#log.debug({ pid, err }, 'not a CUDA process');
      return 'not-cuda';
    }
  }

  /**
   * Runs `fn` for every pid: in parallel (bounded), letting every started call finish before
   * reporting, or one by one, stopping at the first failure (`all` keeps going). Throws the first
   * error; the others are logged.
   */
  async #stage(pids: readonly number[], fn: (pid: number) => Promise<void>, { all = false } = {}): Promise<void> {
    const errors: unknown[] = [];
    if (this.#parallel) {
      const results = await mapLimit(pids, this.#concurrency, (pid) => fn(pid).then(() => null, (err: unknown) => err ?? new Error('failed')));
      for (const r of results) if (r !== null) errors.push(r);
    } else {
      for (const pid of pids) {
        try {
          await fn(pid);
        } catch (err) {
          errors.push(err);
          if (!all) break;
        }
      }
    }
    for (const err of errors.slice(1)) this.#log.error({ err }, 'GPU step failed');
    if (errors.length > 0) throw errors[0];
  }
}

/** A driver from the `gpu` section of the config. */
export function gpuDriverFromConfig(config: Pick<ThawConfig, 'gpu'>, logger?: Logger): GpuDriver {
  const cuda = new CudaCheckpoint({ path: config.gpu.cudaCheckpointPath, ...(logger ? { logger } : {}) });
  return new GpuDriver({ cuda, mode: config.gpu.mode, lockTimeoutMs: config.gpu.lockTimeoutMs, ...(logger ? { logger } : {}) });
}

/**
 * Maps the checkpoint-time GPUs onto this host's, position by position (bus order). Same UUIDs → no
 * map. Different count or model → FailedPrecondition (the snapshot key should have prevented it).
 */
export function planDeviceMap(recorded: readonly string[], inventory: GpuInventory): GpuPair[] {
  const current = inventory.gpus.map((g) => g.uuid);
  if (recorded.length === 0 || recorded.every((u, i) => u === current[i])) return [];
  if (recorded.length !== current.length) {
    throw new ShimError('FailedPrecondition', `snapshot was taken on ${recorded.length} GPU(s), this host has ${current.length}`);
  }
  if (current.some((u) => u === '') || recorded.some((u) => u === '')) {
    throw new ShimError('FailedPrecondition', 'GPU UUIDs unknown; cannot map the snapshot onto these GPUs');
  }
  return recorded.map((from, i) => ({ from, to: current[i]! })).filter((p) => p.from !== p.to);
}

function recordedDevices(record: GpuCheckpointRecord): string[] {
  const devices = (record as Partial<GpuSnapshotRecord>).devices;
  return Array.isArray(devices) ? devices.filter((d): d is string => typeof d === 'string') : [];
}

async function mapLimit<T, R>(items: readonly T[], limit: number, fn: (item: T) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(items.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i]!);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
