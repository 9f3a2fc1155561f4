import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ShimError, isShimError } from '../errors.js';
import { presentCriToRunsc } from '../bundle/cri.js';
import { readBundleSpec } from '../bundle/bundle.js';
import { readSandboxCgroup, updateSandboxCgroup, type LinuxResources, type ProcessCgroup } from './cgroup-resources.js';
import { silentLogger, type Logger } from '../log/logger.js';
import { Runsc, type RunscExecResult, type RunscOptions } from '../runsc/runsc.js';
import { childReaper, type ChildReaper } from '../runsc/reaper.js';
import { bestCheckpointFlags, bestRestoreFlags, type ImageFormat } from '../runsc/probe.js';
import type { ThawConfig } from '../config/config.js';
import type { GpuDriver } from '../gpu/driver.js';
import { runtimeIdFor } from './container-id.js';
import { addThawCudaMount, planForBundle, readGpuRecord, sandboxGpuDriver, SANDBOX_THAW_CUDA, writeGpuRecord } from './gvisor-gpu.js';
import type {
  CheckpointOptions,
  CreateOptions,
  Engine,
  EngineIdentity,
  EngineState,
  ExecHandle,
  ExecOptions,
  ExitResult,
  ResourceStats,
  RestoreOptions,
} from './engine.js';

/** Written next to the runsc image: how it was written, so restore picks matching flags. */
export const IMAGE_FORMAT_FILE = 'thaw-image.json';

export interface GvisorEngineOptions {
  config: ThawConfig;
  log?: Logger;
  /** Namespace folded into runtime ids (containerd namespaces may reuse ids). */
  namespace?: string;
  /** For tests: a ready Runsc. */
  runsc?: Runsc;
  /** For tests: where the host's NVIDIA module lists GPUs (/proc/driver/nvidia). */
  nvidiaProcDir?: string;
  /**
   * Reaps the sandbox and exec waiter processes for exact, immediate exits; default: the process's
   * reaper (the shim's `serve` enables one), null = exits from `runsc wait` only.
   */
  reaper?: ChildReaper | null;
}

/**
 * The default engine: gVisor's runsc. Container ids become fixed-length runtime ids (runsc matches
 * ids by prefix). Checkpoints use the best format the installed runsc writes (uncompressed,
 * O_DIRECT where available); restore is `runsc create` (prepareRestore, overlapping the staging of
 * the image) followed by `runsc restore` into that sandbox.
 */
export class GvisorEngine implements Engine {
  readonly name = 'gvisor' as const;
  readonly runsc: Runsc;
  readonly #config: ThawConfig;
  readonly #log: Logger;
  readonly #namespace: string;
  /** Exit of each app this engine started: its sandbox's reaped exit, or a `runsc wait` attached as it ran. */
  readonly #exits = new Map<string, Promise<ExitResult>>();
  /** Host pid of each created container's sandbox, from create until delete. */
  readonly #sandboxPids = new Map<string, number>();
  readonly #reaper: ChildReaper | null;
  /** Restore must use the checkpoint's staged state: page-cache staging and O_DIRECT reads exclude each other. */
  stagedRestore: boolean;

  readonly #nvidiaProcDir: string | undefined;

  constructor({ config, log = silentLogger, namespace = '', runsc, nvidiaProcDir, reaper = childReaper() }: GvisorEngineOptions) {
    this.#nvidiaProcDir = nvidiaProcDir;
    this.#reaper = reaper;
    this.#config = config;
    this.#log = log;
    this.#namespace = namespace;
    this.stagedRestore = config.restore.stage;
    const options: RunscOptions = {
      path: config.runsc.path,
      root: join(config.stateDir, 'runsc'),
      platform: config.runsc.platform,
      network: config.runsc.network,
      debugLogDir: config.runsc.debugLogDir,
      flags: config.runsc.flags,
      logger: log,
      scratchDir: join(config.stateDir, 'tmp'),
      probeCacheDir: join(config.stateDir, 'cache'),
      ...(reaper ? { adopter: reaper } : {}),
    };
    this.runsc = runsc ?? new Runsc(options);
  }

  #rid(id: string): string {
    return runtimeIdFor(id, this.#namespace);
  }

  async #ensureDirs(): Promise<void> {
    await mkdir(this.runsc.root, { recursive: true, mode: 0o700 });
    await mkdir(join(this.#config.stateDir, 'tmp'), { recursive: true, mode: 0o700 });
  }

  async identity(): Promise<EngineIdentity> {
    const caps = await this.runsc.capabilities();
    const flags = bestCheckpointFlags(caps, { compression: this.#config.checkpoint.compression, direct: this.#config.checkpoint.direct });
    return {
      runtime: 'runsc',
      version: caps.version,
      platform: this.#config.runsc.platform,
      network: this.#config.runsc.network,
      compression: flags.compression ?? 'default',
    };
  }

  async create(opts: CreateOptions): Promise<EngineState> {
    await this.#ensureDirs();
    const rid = this.#rid(opts.id);
    const gpu = await planForBundle(opts.bundle, await this.runsc.capabilities(), this.#config);
    if (gpu.kind !== 'none') await addThawCudaMount(opts.bundle, gpu.hostTool);
    // A CRI pod container gets a runsc sandbox of its own (in the pod's netns) instead of joining CRI's sandbox id.
    await presentCriToRunsc(opts.bundle);
    // The sandbox pid from --pid-file instead of a `runsc state` afterwards (30-40 ms per container).
    const pidFile = join(this.#config.stateDir, 'tmp', `create-${rid}.pid`);
    try {
      const pid = await this.runsc.create(rid, { bundle: opts.bundle, stdio: opts.stdio, consoleSocket: opts.consoleSocket, pidFile, signal: opts.signal });
      // Remembered while it is known: once the app ran, `runsc state` may say -1.
      if (pid !== undefined) this.#sandboxPids.set(opts.id, pid);
      return { id: opts.id, status: 'created', pid: pid ?? 0 };
    } finally {
      await rm(pidFile, { force: true });
    }
  }

  async start(id: string): Promise<EngineState> {
    await this.runsc.start(this.#rid(id));
    this.#watch(id);
    return this.#running(id);
  }

  /**
   * State right after start/restore. With the sandbox pid known from create, no `runsc state` (30-40
   * ms): the app runs, and an app that already exited is reported by the exit watcher. `runsc state`
   * could not tell its pid any more (-1) once the sandbox was reaped.
   */
  async #running(id: string): Promise<EngineState> {
    const pid = this.#sandboxPids.get(id);
    return pid === undefined ? this.state(id) : { id, status: 'running', pid };
  }

  /**
   * Starts watching for the app's exit as soon as it runs. A root container's sandbox process exits
   * with the app's status and was reparented to this process by `runsc create` (runsc/reaper.ts):
   * reaping it gives the exit at once and exactly. Otherwise (no reaper, a container that joined
   * another's sandbox, a sandbox that is not our child) `runsc wait` attaches now. Not before the
   * start: runsc 20240729 answers a Wait on a container that is not started yet with "not started",
   * then can only wait for the sandbox process and fails with "exit status is unavailable" (255).
   * An app that exits before that wait connects (~0.1 s) still reads 255 there.
   */
  #watch(id: string): void {
    const exited = this.#exitOf(id);
    exited.catch(() => undefined);
    this.#exits.set(id, exited);
  }

  async #exitOf(id: string): Promise<ExitResult> {
    const rid = this.#rid(id);
    const pid = this.#sandboxPids.get(id);
    if (this.#reaper !== null && pid !== undefined && (await this.runsc.isSandboxRoot(rid))) {
      try {
        const exit = await this.#reaper.exitOf(pid);
        return { exitStatus: exit.status, exitedAt: exit.exitedAt };
      } catch (err) {
        if (!isShimError(err, 'NotFound')) throw err;
        this.#log.debug({ id, pid, err }, 'sandbox is not our child; waiting through runsc');
      }
    }
    const exitStatus = await this.runsc.wait(rid, { timeoutMs: 0 });
    return { exitStatus, exitedAt: new Date() };
  }

  async prepareRestore(opts: CreateOptions): Promise<void> {
    await this.create(opts);
  }

  async restore(opts: RestoreOptions): Promise<EngineState> {
    const caps = await this.runsc.capabilities();
    const format = await readImageFormat(opts.imageDir);
    const flags = bestRestoreFlags(caps, format);
    // A staged image sits in the page cache; O_DIRECT reads would go around it to the disk.
    const direct = flags.direct && !this.stagedRestore;
    await this.runsc.restore(this.#rid(opts.id), {
      bundle: opts.bundle,
      imagePath: opts.imageDir,
      stdio: opts.stdio,
      direct,
      background: flags.background,
      signal: opts.signal,
    });
    // CUDA processes thaw checkpointed through `runsc exec` (a runsc with --cuda-checkpoint-path
    // toggles them back itself): restore + unlock before the app is reported running.
    const gpuRecord = await readGpuRecord(opts.imageDir);
    if (gpuRecord !== null && gpuRecord.pids.length > 0) {
      const rid = this.#rid(opts.id);
      await this.#gpuDriver(rid).afterRestore(gpuRecord, await this.runsc.ps(rid));
    }
    this.#watch(opts.id);
    return this.#running(opts.id);
  }

  async checkpoint(id: string, opts: CheckpointOptions): Promise<void> {
    const caps = await this.runsc.capabilities();
    const flags = bestCheckpointFlags(caps, { compression: this.#config.checkpoint.compression, direct: this.#config.checkpoint.direct });
    const rid = this.#rid(id);
    const bundle = (await this.runsc.state(rid)).bundle;
    const gpu = bundle ? await planForBundle(bundle, caps, this.#config) : ({ kind: 'none', reason: 'no bundle' } as const);
    const gpuDriver = gpu.kind === 'exec' ? this.#gpuDriver(rid) : null;
    const gpuRecord = gpuDriver ? await gpuDriver.beforeCheckpoint(await this.runsc.ps(rid)) : null;
    try {
      await this.runsc.checkpoint(rid, {
        imagePath: opts.imageDir,
        leaveRunning: opts.leaveRunning,
        ...flags,
        ...(gpu.kind === 'runsc' ? { cudaCheckpointPath: SANDBOX_THAW_CUDA } : {}),
        signal: opts.signal,
      });
    } catch (err) {
      // The sandbox still runs: its CUDA processes go back to running.
      if (gpuDriver && gpuRecord && gpuRecord.pids.length > 0) await gpuDriver.resumeAfterCheckpoint(gpuRecord).catch((e: unknown) => this.#log.error({ id, err: e }, 'GPU resume after a failed checkpoint failed'));
      throw err;
    }
    if (gpuDriver && gpuRecord && gpuRecord.pids.length > 0) {
      await writeGpuRecord(opts.imageDir, gpuRecord);
      if (opts.leaveRunning) await gpuDriver.resumeAfterCheckpoint(gpuRecord);
    }
    const format: ImageFormat = { compression: flags.compression, direct: flags.direct ?? false };
    await writeFile(join(opts.imageDir, IMAGE_FORMAT_FILE), JSON.stringify(format));
    this.#log.debug({ id, ...format }, 'runsc checkpoint written');
  }

  /** GPU hooks for one sandbox: thaw-cuda runs inside it through `runsc exec`. */
  #gpuDriver(rid: string): GpuDriver {
    return sandboxGpuDriver({ config: this.#config, execPrefix: this.runsc.execPrefix(rid), log: this.#log, nvidiaProcDir: this.#nvidiaProcDir });
  }

  async state(id: string): Promise<EngineState> {
    const s = await this.runsc.state(this.#rid(id));
    const status = s.status === 'creating' ? 'created' : s.status;
    return { id, status, pid: s.pid > 0 ? s.pid : 0 };
  }

  async wait(id: string, signal?: AbortSignal): Promise<ExitResult> {
    const attached = this.#exits.get(id);
    if (attached) return attached;
    const exitStatus = await this.runsc.wait(this.#rid(id), { signal, timeoutMs: 0 });
    return { exitStatus, exitedAt: new Date() };
  }

  async kill(id: string, signal: number, all = false): Promise<void> {
    await this.runsc.kill(this.#rid(id), signal, { all });
  }

  async delete(id: string, opts: { force?: boolean } = {}): Promise<void> {
    this.#exits.delete(id);
    this.#sandboxPids.delete(id);
    await this.runsc.delete(this.#rid(id), { force: opts.force ?? false });
  }

  async ps(id: string): Promise<number[]> {
    return this.runsc.ps(this.#rid(id));
  }

  async exec(id: string, opts: ExecOptions): Promise<ExecHandle> {
    const rid = this.#rid(id);
    const r = await this.runsc.exec(rid, {
      process: opts.process,
      stdio: opts.stdio,
      consoleSocket: opts.consoleSocket,
      signal: opts.signal,
    });
    const exited = this.#execExitOf(rid, r);
    exited.catch(() => undefined);
    return { pid: r.pid, exited, kill: (signal) => this.runsc.kill(rid, signal, { pid: r.internalPid }) };
  }

  /**
   * runsc's waiter process (r.pid) exits with the exec'd process's status; `runsc exec` left it to
   * this process's reaper. Without one, `runsc wait --pid`, which misses a process that exits
   * before it attaches (255).
   */
  async #execExitOf(rid: string, r: RunscExecResult): Promise<ExitResult> {
    if (this.#reaper !== null) {
      try {
        const exit = await this.#reaper.exitOf(r.pid);
        return { exitStatus: exit.status, exitedAt: exit.exitedAt };
      } catch (err) {
        if (!isShimError(err, 'NotFound')) throw err;
        this.#log.debug({ pid: r.pid, err }, 'exec waiter is not our child; waiting through runsc');
      }
    }
    const exitStatus = await this.runsc.wait(rid, { pid: r.internalPid, timeoutMs: 0 });
    return { exitStatus, exitedAt: new Date() };
  }

  async pause(id: string): Promise<void> {
    await this.runsc.pause(this.#rid(id));
  }

  async resume(id: string): Promise<void> {
    await this.runsc.resume(this.#rid(id));
  }

  async stats(id: string): Promise<ResourceStats> {
    const s = await this.runsc.events(this.#rid(id));
    return {
      memoryUsageBytes: s.memory?.usage?.usage,
      memoryLimitBytes: s.memory?.usage?.limit,
      cpuUsageNanos: s.cpu?.usage?.total,
      pids: s.pids?.current,
    };
  }

  /**
   * runsc 20240729 has no `update`: the new limits go straight into the sandbox's cgroup (runsc put
   * the sentry and the gofer into the spec's linux.cgroupsPath), where the host kernel enforces them.
   * The sentry keeps what it learnt at boot (--total-memory, --cpu-num): see docs/update.md.
   */
  async update(id: string, resources: LinuxResources): Promise<void> {
    const state = await this.runsc.state(this.#rid(id));
    const pid = this.#sandboxPids.get(id) ?? (state.pid > 0 ? state.pid : 0);
    if (state.status === 'stopped' || pid <= 0) throw new ShimError('FailedPrecondition', `cannot update task in ${state.status} state`);
    const spec = state.bundle ? await readBundleSpec(state.bundle) : undefined;
    // Only compared with the request (fields it cannot change must stay as they are): not validated.
    const inSpec = spec?.linux?.['resources'];
    const specResources = typeof inSpec === 'object' && inSpec !== null ? (inSpec as LinuxResources) : undefined;
    await updateSandboxCgroup({ pid, resources, specResources, id, log: this.#log });
  }

  /**
   * The sandbox's cgroup (runsc puts the sentry and the gofer into the spec's linux.cgroupsPath), from
   * the sandbox pid known since create; undefined when the sandbox has no cgroup of its own.
   */
  async cgroupOf(id: string): Promise<ProcessCgroup | undefined> {
    const pid = this.#sandboxPids.get(id);
    if (pid === undefined) return undefined;
    const { cgroup, shared } = await readSandboxCgroup(pid, '/proc', 'cgroup of the sandbox');
    return shared ? undefined : cgroup;
  }

  /** Removes runsc state of containers whose sandboxes died (after a crash of thaw). */
  async forget(id: string): Promise<void> {
    await this.runsc.delete(this.#rid(id), { force: true }).catch(() => undefined);
    await rm(join(this.runsc.root, this.#rid(id)), { recursive: true, force: true });
  }
}

async function readImageFormat(imageDir: string): Promise<ImageFormat> {
  try {
    const f = JSON.parse(await readFile(join(imageDir, IMAGE_FORMAT_FILE), 'utf8')) as Partial<ImageFormat>;
    return { compression: f.compression, direct: f.direct === true };
  } catch (err) {
    throw new ShimError('DataLoss', `image ${imageDir} has no readable ${IMAGE_FORMAT_FILE}`, { cause: err });
  }
}
