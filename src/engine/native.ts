/**
 * `NativeEngine`: containers under runc 1.1 with CRIU 4.x snapshots, for GPU hosts whose runsc cannot
 * reach the driver. The CUDA side goes through optional `GpuHooks` around runc's checkpoint and
 * restore. Design notes (measured on our machines) are in docs/native-engine.md; in short:
 *
 * - **Private bundle.** Each container gets `<root>/containers/<rid>/bundle/config.json`, a copy of
 *   the caller's spec with root and relative bind sources made absolute, an absolute
 *   `linux.cgroupsPath` (`/thaw/<rid>` when the spec has none) and the annotation `org.criu.config`
 *   naming a per-container CRIU config file. The caller's bundle is never written to.
 * - **Cgroups on restore.** thaw restores snapshots into new containers with new ids. On cgroup v2
 *   runc 1.1.5 gives CRIU no cgroup root, so CRIU puts the tasks back into the cgroup path recorded
 *   in the image — re-created without runc's BPF device filter (a restored app could open devices
 *   its new spec denies, measured on the GPU host) while the new container's cgroup stays empty.
 *   Before `runc restore` thaw writes `cgroup-root <new cgroupsPath>` into that config file, so CRIU
 *   restores into the new container's own cgroup, where runc has attached the filter. (On v1 runc
 *   already passes per-controller roots, which win over the global one; the file changes nothing.)
 *   The file is removed once the restore is done so that later dumps run without it.
 * - **Stdio.** CRIU can only dump stdio that is an anonymous pipe (runc lists them as external
 *   `pipe:[ino]` fds and re-attaches them on restore) or /dev/null; a host file or FIFO fails with
 *   `Can't lookup mount=… for fd=1`. Node cannot call pipe(2), so for every slot that is not already
 *   an anonymous pipe a small detached `sh` + `cat` relay makes one (see `interposeStdio`): the
 *   container writes into the pipe, `cat` copies to the caller's fd (or from it, for stdin).
 * - **Exit status.** runc has no wait verb and the container's init is not thaw's child (runc create
 *   exits; the init is reparented to pid 1). `wait` polls /proc for the init's exit and reads the
 *   status from its zombie when it sees one before pid 1 reaps it; otherwise it reports 137 if thaw
 *   sent SIGKILL, else `UNKNOWN_EXIT_STATUS` (255, containerd's value for an unknown exit).
 * - **Pids.** CRIU gives restored processes their recorded pids. In a container with its own pid
 *   namespace that never conflicts; in the host pid namespace the recorded pids must be free, so
 *   restore waits briefly for the originals to be reaped and fails with FailedPrecondition if one
 *   still runs (e.g. a `leaveRunning` source).
 * - **Lazy pages.** By default restore hands the private anonymous memory to thaw's parallel page
 *   server (`runc restore --lazy-pages`, restore/pages.ts) and runs the CUDA restore while it
 *   fills; any page server failure kills the half-restored container and restores plainly
 *   (docs/pages-restore.md, "The native engine").
 */
import type { ManifestFile } from '../snapshot/manifest.js';
import { spawn } from 'node:child_process';
import { closeSync, constants as fsConstants, fstatSync, openSync, readdirSync, readlinkSync, rmdirSync } from 'node:fs';
import { mkdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { constants as osConstants } from 'node:os';
import { isAbsolute, join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Cleanup } from '../cleanup.js';
import { RuncError, ShimError, asShimError, isShimError } from '../errors.js';
import { PhaseTimer, silentLogger, type Logger } from '../log/logger.js';
import {
  PageServerError,
  lazyPagesAvailable,
  verifyImageFiles,
  startLazyRestore,
  type ImageChecksum,
  type LazyPagesOptions,
  type LazyRestore,
  type LazyRestoreHooks,
} from '../restore/pages.js';
import { PageKeeper, type PageKeeperOptions } from '../restore/page-keeper.js';
import { criuCheckFeature, criuVersion, unmountAllUnder } from '../runc/criu.js';
import type { RuncStdio, RuncStdioSlot } from '../runc/options.js';
import { Runc, type RuncVerb } from '../runc/runc.js';
import { runtimeIdFor } from './container-id.js';
import { cgroupProcs, holdersOf, procStat, processTree } from '../procfs.js';
import { readSandboxCgroup, type LinuxResources, type ProcessCgroup } from './cgroup-resources.js';
import type {
  CheckpointOptions,
  CreateOptions,
  Engine,
  EngineIdentity,
  EngineState,
  EngineStatus,
  ExecHandle,
  ExecOptions,
  ExitResult,
  GpuCheckpointRecord,
  GpuHooks,
  ResourceStats,
  RestoreOptions,
  StdioFds,
} from './engine.js';

/** Written into the image dir at checkpoint: what restore needs to know about the source. */
export const NATIVE_IMAGE_FILE = 'thaw-native.json';
/** Written into the image dir when GPU hooks took part: their record, handed back on restore. */
export const GPU_RECORD_FILE = 'gpu.json';
/** Exit status reported when the init's real status could not be observed (containerd uses 255 too). */
export const UNKNOWN_EXIT_STATUS = 255;
/** The runc annotation naming a CRIU config file (runc passes it to CRIU on dump and restore). */
export const CRIU_CONFIG_ANNOTATION = 'org.criu.config';

export interface NativeEngineOptions {
  /** runc binary (ThawConfig.runc.path). */
  runcPath: string;
  /** CRIU >= 4 (ThawConfig.runc.criuPath; our wrapper /opt/thaw/criu/bin/criu). */
  criuPath: string;
  /** This engine's state directory: runc's root, per-container dirs and scratch files live under it. */
  root: string;
  log?: Logger;
  /** CUDA participation; without it an image holding CUDA state is refused at restore. */
  gpu?: GpuHooks;
  /** Namespace folded into runtime ids (containerd namespaces may reuse ids). */
  namespace?: string;
  /** Per-verb runc timeouts. */
  timeoutsMs?: Readonly<Partial<Record<RuncVerb, number>>>;
  /** How long restore waits for recorded host pids to be freed (host pid namespace only). */
  pidReleaseTimeoutMs?: number;
  /** Checkpoint established TCP connections (ThawConfig.runc.tcpEstablished). */
  tcpEstablished?: boolean;
  /**
   * Restore anonymous memory with thaw's parallel lazy-pages server (ThawConfig.restore.lazyPages;
   * default 'auto': when the addon loads and CRIU supports userfaultfd).
   */
  lazyPages?: LazyPagesMode;
  /** Page server settings (threads, timeouts, …) and test seams. */
  lazyPagesTuning?: NativeLazyPagesTuning;
  /** For tests: a ready Runc. */
  runc?: Runc;
}

/** `ThawConfig.restore.lazyPages`. */
export type LazyPagesMode = 'auto' | 'on' | 'off';

/** Page server settings passed on to startLazyRestore (restore/pages.ts); defaults there. */
export type NativeLazyPagesTuning = Pick<
  LazyPagesOptions,
  'threads' | 'chunkBytes' | 'faultAheadBytes' | 'followBytes' | 'prefetchChunks' | 'order' | 'direct' | 'receiveTimeoutMs' | 'fillTimeoutMs' | 'binding'
> & {
  /** For tests: stands in for startLazyRestore. */
  start?: (opts: LazyPagesOptions & { hooks: LazyRestoreHooks }) => Promise<LazyRestore>;
  /**
   * The page keeper (restore/page-keeper.ts) that kills the restored container should this process
   * die mid-fill. On by default; `false` turns it off (benchmarks), an object tunes it (tests).
   */
  keeper?: false | Pick<PageKeeperOptions, 'entry' | 'node' | 'shell' | 'readyTimeoutMs' | 'killTimeoutMs'>;
};

/** What `NativeEngine.restore` takes beyond the Engine's RestoreOptions (whose `pageChecksums` the page server checks while it fills). */
export interface NativeRestoreOptions extends RestoreOptions {
  /** Overrides the engine's `lazyPages` for this restore. */
  lazyPages?: LazyPagesMode;
}

/** Directories in the container's state dir for CRIU's restore log (and the page server's socket). */
const PLAIN_WORK_DIR = 'restore-work';
const LAZY_WORK_DIR = 'restore-work-lazy';
/** The page keeper's log, in the container's state dir (outside the work dirs, whose holders a kill targets). */
const PAGE_KEEPER_LOG = 'page-keeper.log';
/** CRIU's page images, relative to the snapshot dir (image/pages-1.img). */
const PAGES_IMAGE = /(^|\/)pages-\d+\.img$/;
/** How long the kill of a failed restore may take before it counts as failed. */
const KILL_TIMEOUT_MS = 10_000;

/** One restore of `NativeEngine.restore` (shared by the lazy attempt and the plain one). */
interface RestoreAttempt {
  id: string;
  rid: string;
  /** The container's state dir. */
  dir: string;
  callerBundle: string;
  imageDir: string;
  bundle: PrivateBundle;
  io: InterposedStdio;
  pidFile: string;
  consoleSocket: string | undefined;
  signal: AbortSignal | undefined;
  /** The GPU hooks' record when CUDA processes took part, else null. */
  gpuRecord: GpuCheckpointRecord | null;
  log: Logger;
  timer: PhaseTimer;
}

/** A relay process of `interposeStdio`, identified by pid and start time (pids are reused). */
export interface RelayRecord {
  pid: number;
  startTime: number;
  role: 'stdin' | 'stdout' | 'stderr';
}

/** What thaw keeps per native container (`<root>/containers/<rid>/container.json`). */
interface ContainerRecord {
  version: 1;
  id: string;
  rid: string;
  /** The caller's bundle (the private copy lives next to this file). */
  bundle: string;
  cgroupsPath: string;
  hostPidNamespace: boolean;
  /** The container's init (host pid and /proc start time), once created or restored. */
  init: { pid: number; startTime: number } | null;
  relays: RelayRecord[];
  /** Signals thaw sent to the container, for the exit status when the zombie was not seen. */
  signals: number[];
}

/** thaw-native.json */
export interface NativeImageInfo {
  version: 1;
  runc: string;
  criu: string;
  /** Host pids of the container's processes when it was dumped. */
  pids: number[];
  hostPidNamespace: boolean;
  cgroupsPath: string;
  leaveRunning: boolean;
}

export class NativeEngine implements Engine {
  readonly name = 'native' as const;
  readonly runc: Runc;
  readonly #root: string;
  readonly #criuPath: string;
  readonly #log: Logger;
  readonly #gpu: GpuHooks | undefined;
  readonly #namespace: string;
  readonly #pidReleaseTimeoutMs: number;
  readonly #lazyPages: LazyPagesMode;
  readonly #lazyTuning: NativeLazyPagesTuning;
  readonly #tcpEstablished: boolean;
  /** Serializes read-modify-write of one container's record within this process. */
  readonly #locks = new Map<string, Promise<unknown>>();

  constructor(options: NativeEngineOptions) {
    this.#root = options.root;
    this.#criuPath = options.criuPath;
    this.#log = options.log ?? silentLogger;
    this.#gpu = options.gpu;
    this.#namespace = options.namespace ?? '';
    this.#pidReleaseTimeoutMs = options.pidReleaseTimeoutMs ?? 5_000;
    this.#lazyPages = options.lazyPages ?? 'auto';
    this.#lazyTuning = options.lazyPagesTuning ?? {};
    this.#tcpEstablished = options.tcpEstablished ?? false;
    this.runc =
      options.runc ??
      new Runc({
        path: options.runcPath,
        root: join(options.root, 'runc'),
        criuPath: options.criuPath,
        logger: this.#log,
        timeoutsMs: options.timeoutsMs,
        scratchDir: join(options.root, 'tmp'),
      });
  }

  #rid(id: string): string {
    return runtimeIdFor(id, this.#namespace);
  }

  #dir(rid: string): string {
    return join(this.#root, 'containers', rid);
  }

  async identity(): Promise<EngineIdentity> {
    const [runc, criu] = await Promise.all([this.runc.version(), criuVersion(this.#criuPath)]);
    return { engine: 'native', runtime: 'runc', version: runc.version, criu };
  }

  async create(opts: CreateOptions): Promise<EngineState> {
    const rid = this.#rid(opts.id);
    await using cleanup = this.#cleanup(opts.id);
    const dir = await this.#claim(rid, cleanup);
    const bundle = await writePrivateBundle({ source: opts.bundle, dir, rid });
    refuseBusyCgroup(opts.id, bundle.cgroupsPath);
    const io = bundle.terminal ? passThrough(opts.stdio) : await interposeStdio(opts.stdio, { signal: opts.signal });
    cleanup.add('stop stdio relays', () => stopRelays(io.relays, { drainMs: 0 }));
    const pidFile = join(dir, 'init.pid');
    try {
      await this.runc.create(rid, { bundle: bundle.dir, stdio: io.fds, consoleSocket: opts.consoleSocket, pidFile, signal: opts.signal });
    } finally {
      io.close();
    }
    cleanup.add('runc delete', () => this.runc.delete(rid, { force: true }));
    const init = await readInit(pidFile);
    await this.#save({ version: 1, id: opts.id, rid, bundle: opts.bundle, cgroupsPath: bundle.cgroupsPath, hostPidNamespace: bundle.hostPidNamespace, init, relays: io.relays, signals: [] });
    cleanup.release();
    this.#log.debug({ id: opts.id, pid: init.pid }, 'native container created');
    return { id: opts.id, status: 'created', pid: init.pid };
  }

  async start(id: string): Promise<EngineState> {
    await this.runc.start(this.#rid(id));
    return this.state(id);
  }

  /** Nothing to prepare: `runc restore` creates the container itself. */
  async prepareRestore(_opts: CreateOptions): Promise<void> {}

  /**
   * Restores `opts.imageDir` as a new container. With lazy pages (see `lazyPages`), CRIU restores
   * everything but the private anonymous memory, the app starts at once and thaw's page server fills
   * that memory from several threads; the GPU hooks' CUDA restore runs as soon as runc returns, so it
   * overlaps the fill. Resolves when every page is in (and verified, with `pageChecksums`). If the
   * page server refuses the image or fails, the half-restored container is killed (before its
   * userfaultfds close) and the image is restored again the plain way; a damaged image is not
   * restored again (the caller falls back to a cold start).
   */
  async restore(opts: NativeRestoreOptions): Promise<EngineState> {
    const rid = this.#rid(opts.id);
    const image = await readImageInfo(opts.imageDir);
    const gpuRecord = await readGpuRecord(opts.imageDir);
    if (gpuRecord !== null && gpuRecord.pids.length > 0 && this.#gpu === undefined) {
      throw new ShimError('FailedPrecondition', `image ${opts.imageDir} holds CUDA state of ${gpuRecord.pids.length} process(es) but this engine has no GPU hooks`);
    }
    if (image?.hostPidNamespace) await this.#waitForPidsFree(image.pids, opts.imageDir);
    const log = this.#log.child({ id: opts.id });
    const timer = new PhaseTimer(log);
    const lazyWanted = await this.#lazyPagesWanted(opts.lazyPages ?? this.#lazyPages);

    await using cleanup = this.#cleanup(opts.id);
    const dir = await this.#claim(rid, cleanup);
    const bundle = await writePrivateBundle({ source: opts.bundle, dir, rid });
    refuseBusyCgroup(opts.id, bundle.cgroupsPath);
    // CRIU restores into the new container's own cgroup (where runc put the device filter).
    await writeFile(bundle.criuConfig, `${bundle.userCriuConfig}cgroup-root ${bundle.cgroupsPath}\n`, { mode: 0o600 });
    const io = bundle.terminal ? passThrough(opts.stdio) : await interposeStdio(opts.stdio, { signal: opts.signal });
    cleanup.add('stop stdio relays', () => stopRelays(io.relays, { drainMs: 0 }));
    const a: RestoreAttempt = {
      id: opts.id,
      rid,
      dir,
      callerBundle: opts.bundle,
      imageDir: opts.imageDir,
      bundle,
      io,
      pidFile: join(dir, 'init.pid'),
      consoleSocket: opts.consoleSocket,
      signal: opts.signal,
      gpuRecord: gpuRecord !== null && gpuRecord.pids.length > 0 ? gpuRecord : null,
      log,
      timer,
    };
    // Safe when nothing was restored; kills whatever a failed or cut-off attempt left.
    cleanup.add('kill restored container', () => this.#killRestored(a));
    let mode: 'lazy' | 'plain' = 'plain';
    try {
      // Our copies of the stdio pipes stay open until the last attempt: a killed lazy attempt must
      // not end the relays (each output relay exits at EOF, when its last writer is gone).
      if (lazyWanted.use) {
        const lazy = await this.#restoreLazy(a, opts.pageChecksums);
        if (lazy.restored) mode = 'lazy';
        else {
          log.warn({ phase: 'lazy-pages', fallback: 'restore', reason: lazy.reason, err: lazy.err }, 'restoring without lazy pages');
          // The lifecycle left these files to the page server, which gave up before checking them all.
          const unchecked = new Map([...(opts.pageChecksums ?? [])].filter(([path]) => PAGES_IMAGE.test(path)));
          if (unchecked.size > 0) await timer.phase('verify-pages', () => verifyImageFiles(unchecked, this.#lazyTuning.binding));
          // The killed tasks held the recorded host pids until pid 1 reaps them.
          if (image?.hostPidNamespace) await this.#waitForPidsFree(image.pids, opts.imageDir);
        }
      } else {
        log.debug({ phase: 'lazy-pages', reason: lazyWanted.reason }, 'lazy pages not used');
      }
      if (mode === 'plain') await this.#restorePlain(a);
    } finally {
      io.close();
      await writeUserCriuConfig(bundle.criuConfig, bundle.userCriuConfig);
    }
    cleanup.release();
    log.info({ phase: 'restore', mode, durationMs: timer.elapsed(), timings: timer.timings }, 'native restore done');
    return this.state(opts.id);
  }

  /** With lazy pages, the page server reads and checks the page images itself (pages-N.img). */
  async selfVerifiedFiles(files: readonly ManifestFile[]): Promise<ManifestFile[]> {
    if (!(await this.#lazyPagesWanted(this.#lazyPages)).use) return [];
    return files.filter((f) => PAGES_IMAGE.test(f.path));
  }

  /**
   * Whether to try lazy pages, or why not. Images of several processes too: they once hung (one
   * NCCL rank per GPU) because every task's fill held one of libuv's four pool threads and the fifth
   * task's userfaultfd was never received; fills have their own threads now (native/src/uffd_worker.cc),
   * and 5-task restores on the H100s are bit-exact (docs/bench/gpu.md, "Lazy pages for several processes").
   */
  async #lazyPagesWanted(mode: LazyPagesMode): Promise<{ use: true } | { use: false; reason: string }> {
    if (mode === 'off') return { use: false, reason: 'lazy pages are off' };
    const avail = lazyPagesAvailable(this.#lazyTuning.binding);
    if (!avail.ok) return { use: false, reason: avail.reason };
    if (mode === 'on') return { use: true };
    const check = await criuCheckFeature(this.#criuPath, 'uffd-noncoop').catch((err: unknown) => ({ ok: false, output: asShimError(err).message }));
    if (!check.ok) return { use: false, reason: `CRIU at ${this.#criuPath} cannot restore lazily: ${lastLine(check.output) || 'criu check --feature uffd-noncoop failed'}` };
    return { use: true };
  }

  /** `runc restore` without lazy pages, then the GPU step. */
  async #restorePlain(a: RestoreAttempt): Promise<void> {
    const workPath = join(a.dir, PLAIN_WORK_DIR);
    await rm(workPath, { recursive: true, force: true });
    await a.timer.phase('runc-restore', () => this.runc.restore(a.rid, { ...this.#restoreArgs(a), workPath, signal: a.signal }));
    await this.#recordInit(a);
    await this.#gpuAfterRestore(a);
  }

  /**
   * The lazy attempt. Resolves `{restored: true}` once every page is in, or `{restored: false}` when
   * nothing is left of the attempt (refused before it ran, or killed after — also when the GPU step
   * failed during the fill) and a plain restore may follow. Throws when a plain restore must not
   * follow: the image is damaged, the caller canceled, or the half-restored tasks could not be killed.
   */
  async #restoreLazy(a: RestoreAttempt, checksums: ReadonlyMap<string, ImageChecksum> | undefined): Promise<{ restored: true } | { restored: false; reason: string; err: unknown }> {
    const workDir = join(a.dir, LAZY_WORK_DIR);
    await rm(workDir, { recursive: true, force: true });
    const { start = startLazyRestore, keeper: keeperTuning = {}, ...tuning } = this.#lazyTuning;
    // Should this process die mid-fill, the keeper kills the container before the uffds close.
    const keeper: LazyPagesOptions['keeper'] =
      keeperTuning === false
        ? undefined
        : ({ uffds }) =>
            PageKeeper.spawn({
              ...keeperTuning,
              uffds,
              id: a.id,
              logPath: join(a.dir, PAGE_KEEPER_LOG),
              // A CRIU still finishing holds its log in the work dir; the tasks are in the cgroups.
              targets: { cgroupDirs: cgroupDirs(a.bundle.cgroupsPath), holderPrefixes: [`${workDir}/`] },
              log: a.log,
            });
    let ran = false;
    const hooks: LazyRestoreHooks = {
      restore: async (signal) => {
        ran = true;
        const both = a.signal === undefined ? signal : AbortSignal.any([signal, a.signal]);
        await this.runc.restore(a.rid, { ...this.#restoreArgs(a), workPath: workDir, lazyPages: true, signal: both });
      },
      kill: () => a.timer.phase('lazy-kill', () => this.#killRestored(a)),
    };
    let lazy: LazyRestore;
    try {
      lazy = await a.timer.phase('runc-restore-lazy', () => start({ ...tuning, keeper, imageDir: a.imageDir, workDir, checksums, log: a.log, hooks }));
    } catch (err) {
      return this.#lazyFailed(a, err, ran);
    }
    const onAbort = () => lazy.abort();
    a.signal?.addEventListener('abort', onAbort, { once: true });
    try {
      // The CUDA restore reads the parked device memory while it arrives: the overlap is the point.
      let stepErr: unknown;
      try {
        await this.#recordInit(a);
        await this.#gpuAfterRestore(a);
      } catch (err) {
        stepErr = err;
        lazy.abort(); // done rejects once the tasks are killed
      }
      try {
        const result = await a.timer.phase('lazy-fill-wait', () => lazy.done);
        a.timer.record('lazy-pages', result.totalMs);
        a.timer.record('lazy-fill', result.fillMs);
        a.log.info(
          { phase: 'lazy-pages', durationMs: result.totalMs, bytes: result.bytes, restoreMs: lazy.restoreMs, fillMs: Math.round(result.fillMs), verified: result.verified },
          'anonymous memory restored by the page server',
        );
      } catch (err) {
        if (stepErr !== undefined && isShimError(err, 'Canceled')) {
          // Our abort after a failed step (the CUDA restore). With the tasks dead, restore once more
          // with every page in place: a CUDA restore can fail only because pages were still
          // arriving (measured on the H100: host memory the app pinned with cudaHostRegister is
          // re-pinned before the page server filled it, CUDA_ERROR_INVALID_VALUE). A step that
          // fails again there is reported (and the caller starts cold).
          if (err instanceof PageServerError && err.killed) {
            return { restored: false, reason: `the GPU step failed while pages were arriving: ${asShimError(stepErr).message}`, err: stepErr };
          }
          throw stepErr;
        }
        return this.#lazyFailed(a, err, true);
      }
      if (stepErr !== undefined) throw stepErr;
      return { restored: true };
    } finally {
      a.signal?.removeEventListener('abort', onAbort);
    }
  }

  /** Decides what a failed lazy attempt means (see #restoreLazy). */
  #lazyFailed(a: RestoreAttempt, err: unknown, ran: boolean): { restored: false; reason: string; err: unknown } {
    if (a.signal?.aborted) throw err;
    if (ran && !(err instanceof PageServerError && err.killed)) {
      // Tasks may live with userfaultfds still open: restoring again could run two copies.
      throw new ShimError('Internal', `lazy restore failed and its tasks could not be killed: ${asShimError(err).message}`, { cause: err });
    }
    if (imageDamaged(err)) throw err;
    return { restored: false, reason: asShimError(err).message, err };
  }

  #restoreArgs(a: RestoreAttempt) {
    // Established connections in the image are restored whatever the config says now.
    return { imagePath: a.imageDir, bundle: a.bundle.dir, stdio: a.io.fds, pidFile: a.pidFile, consoleSocket: a.consoleSocket, tcpEstablished: true };
  }

  /** Saves the container record with the restored init (runc wrote its pid file). */
  async #recordInit(a: RestoreAttempt): Promise<void> {
    const init = await readInit(a.pidFile);
    await this.#save({ version: 1, id: a.id, rid: a.rid, bundle: a.callerBundle, cgroupsPath: a.bundle.cgroupsPath, hostPidNamespace: a.bundle.hostPidNamespace, init, relays: a.io.relays, signals: [] });
    a.log.debug({ pid: init.pid }, 'restored init');
  }

  async #gpuAfterRestore(a: RestoreAttempt): Promise<void> {
    if (a.gpuRecord === null || this.#gpu === undefined) return;
    const gpu = this.#gpu;
    const record = a.gpuRecord;
    const pids = await this.runc.ps(a.rid);
    await a.timer.phase('gpu-restore', () => gpu.afterRestore(record, pids));
  }

  /**
   * Kills everything a restore attempt created and waits until it is gone, so that its userfaultfds
   * may close and another restore may follow: runc's half-made state of a restore cut off mid-way,
   * runc's container (`delete --force`), the recorded init, a CRIU still running for this attempt
   * (it holds its log in a work dir) with everything it forked, and every task in the container's
   * cgroups. Safe when nothing was restored.
   */
  async #killRestored(a: RestoreAttempt): Promise<void> {
    // The saved record, not the pid file: its start time tells a reused pid apart.
    const init = (await this.#load(a.id).catch(() => null))?.init ?? null;
    // First: on a half-made state `runc delete` removes the dir recursively, through the rootfs
    // bind mount CRIU was given, and so deletes the container's rootfs (seen here).
    await this.runc.removeInterruptedRestore(a.rid);
    await this.runc.delete(a.rid, { force: true }).catch((err: unknown) => {
      if (!isShimError(err, 'NotFound')) a.log.debug({ err }, 'runc delete --force of a failed restore');
    });
    const spare = ownLineage();
    const targets = new Map<number, number>(); // pid → start time
    const kill = (pid: number) => {
      if (spare.has(pid)) return;
      const st = procStat(pid);
      if (st === null || st.state === 'Z' || st.state === 'X') return;
      if (!targets.has(pid)) targets.set(pid, st.startTime);
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone meanwhile
      }
    };
    if (init !== null && isAlive(init.pid, init.startTime)) kill(init.pid);
    // Only CRIU writes under the work dirs (its log); the rest of the state dir is read by others.
    for (const pid of processTree(holdersOf([PLAIN_WORK_DIR, LAZY_WORK_DIR].map((d) => `${join(a.dir, d)}/`)))) kill(pid);
    const deadline = performance.now() + KILL_TIMEOUT_MS;
    for (;;) {
      const inCgroup = containerCgroupProcs(a.bundle.cgroupsPath).filter((pid) => isAlive(pid, 0) && !spare.has(pid));
      inCgroup.forEach(kill);
      const alive = [...targets].filter(([pid, startTime]) => isAlive(pid, startTime)).map(([pid]) => pid);
      if (alive.length === 0 && inCgroup.length === 0) break;
      if (performance.now() > deadline) {
        throw new ShimError('DeadlineExceeded', `restored processes ${[...new Set([...alive, ...inCgroup])].join(', ')} of ${a.id} did not die within ${KILL_TIMEOUT_MS} ms`);
      }
      await sleep(20);
    }
    removeCgroupDirs(a.bundle.cgroupsPath);
    // A CRIU killed mid-restore leaves its cgroup yard mounted in its work dir.
    const mounts = await unmountAllUnder(a.dir);
    if (mounts.length > 0) a.log.debug({ mounts }, 'unmounted what CRIU left');
    if (targets.size > 0) a.log.debug({ pids: [...targets.keys()] }, 'killed what the failed restore left');
  }

  async checkpoint(id: string, opts: CheckpointOptions): Promise<void> {
    const rid = this.#rid(id);
    const rec = await this.#load(id);
    const pids = await this.runc.ps(rid);
    const dir = this.#dir(rid);
    const bundle = await readPrivateBundleInfo(dir);
    // A config left by an interrupted restore must not steer this dump.
    await writeUserCriuConfig(bundle.criuConfig, bundle.userCriuConfig);
    const workPath = join(dir, 'checkpoint-work');
    await rm(workPath, { recursive: true, force: true });

    let gpuRecord: GpuCheckpointRecord | null = null;
    if (this.#gpu !== undefined) gpuRecord = await this.#gpu.beforeCheckpoint(pids);
    const resumeGpu = async (why: string) => {
      if (gpuRecord === null || this.#gpu === undefined) return;
      try {
        await this.#gpu.resumeAfterCheckpoint(gpuRecord);
      } catch (err) {
        this.#log.error({ id, phase: 'gpu-resume', err }, `could not resume CUDA processes after ${why}`);
        throw err;
      }
    };
    const t0 = performance.now();
    try {
      await this.runc.checkpoint(rid, { imagePath: opts.imageDir, workPath, leaveRunning: opts.leaveRunning, tcpEstablished: this.#tcpEstablished, signal: opts.signal });
    } catch (err) {
      await resumeGpu('a failed checkpoint').catch(() => undefined);
      throw err;
    }
    this.#log.debug({ id, phase: 'runc-checkpoint', durationMs: round(performance.now() - t0) }, 'native checkpoint done');
    const [runcVersion, criu] = await Promise.all([this.runc.version(), criuVersion(this.#criuPath)]);
    const info: NativeImageInfo = {
      version: 1,
      runc: runcVersion.version,
      criu,
      pids,
      hostPidNamespace: rec.hostPidNamespace,
      cgroupsPath: rec.cgroupsPath,
      leaveRunning: opts.leaveRunning,
    };
    await writeFile(join(opts.imageDir, NATIVE_IMAGE_FILE), JSON.stringify(info, null, 1));
    if (gpuRecord !== null) await writeFile(join(opts.imageDir, GPU_RECORD_FILE), JSON.stringify(gpuRecord, null, 1));
    if (opts.leaveRunning) await resumeGpu('a leave-running checkpoint');
  }

  async state(id: string): Promise<EngineState> {
    const rid = this.#rid(id);
    try {
      const s = await this.runc.state(rid);
      const status: EngineStatus = s.status === 'creating' ? 'created' : s.status;
      return { id, status, pid: status === 'stopped' ? 0 : s.pid };
    } catch (err) {
      // A checkpoint without leaveRunning makes runc forget the container; thaw still knows it.
      if (isShimError(err, 'NotFound') && (await exists(join(this.#dir(rid), 'container.json')))) {
        return { id, status: 'stopped', pid: 0 };
      }
      throw err;
    }
  }

  /**
   * Resolves when the init exits. runc has no wait verb and the init is not thaw's child, so this
   * polls /proc (50 ms, backing off to 500 ms) and reads the exit status from the zombie if it sees one.
   */
  async wait(id: string, signal?: AbortSignal): Promise<ExitResult> {
    const rec = await this.#load(id);
    if (rec.init === null) throw new ShimError('FailedPrecondition', `container ${id} has no init process`);
    const status = await waitForExit(rec.init, signal);
    const exitStatus = status ?? this.#fallbackStatus((await this.#load(id).catch(() => rec)).signals);
    return { exitStatus, exitedAt: new Date() };
  }

  #fallbackStatus(signals: readonly number[]): number {
    return signals.includes(osConstants.signals.SIGKILL) ? 128 + osConstants.signals.SIGKILL : UNKNOWN_EXIT_STATUS;
  }

  async kill(id: string, signal: number, all = false): Promise<void> {
    const rid = this.#rid(id);
    await this.#update(id, (rec) => ({ ...rec, signals: [...rec.signals, signal] })).catch(() => undefined);
    await this.runc.kill(rid, signal, { all });
  }

  async delete(id: string, opts: { force?: boolean } = {}): Promise<void> {
    const rid = this.#rid(id);
    const dir = this.#dir(rid);
    const rec = await this.#load(id).catch(() => null);
    // A restore killed mid-way (e.g. the shim died) leaves runc a half-made state whose removal by
    // `runc delete` would recurse into the rootfs (see removeInterruptedRestore).
    await this.runc.removeInterruptedRestore(rid);
    try {
      await this.runc.delete(rid, { force: opts.force ?? false });
    } catch (err) {
      // Gone from runc (checkpointed, or deleted before) but still ours: finish our part.
      if (!(isShimError(err, 'NotFound') && rec !== null)) throw err;
    }
    if (rec !== null) await stopRelays(rec.relays, { drainMs: 1_000 });
    await rm(dir, { recursive: true, force: true });
    this.#log.debug({ id }, 'native container deleted');
  }

  async ps(id: string): Promise<number[]> {
    return this.runc.ps(this.#rid(id));
  }

  async exec(id: string, opts: ExecOptions): Promise<ExecHandle> {
    const rid = this.#rid(id);
    await this.#load(id);
    const terminal = opts.process.terminal === true;
    const io = terminal ? passThrough(opts.stdio) : await interposeStdio(opts.stdio, { signal: opts.signal });
    let pid: number;
    try {
      pid = await this.runc.exec(rid, { process: opts.process, stdio: io.fds, consoleSocket: opts.consoleSocket, signal: opts.signal });
    } catch (err) {
      await stopRelays(io.relays, { drainMs: 0 });
      throw err;
    } finally {
      io.close();
    }
    await this.#update(id, (rec) => ({ ...rec, relays: [...rec.relays, ...io.relays] })).catch(() => undefined);
    const startTime = procStat(pid)?.startTime ?? 0;
    const signals: number[] = [];
    const exited = waitForExit({ pid, startTime }).then((status) => ({
      exitStatus: status ?? this.#fallbackStatus(signals),
      exitedAt: new Date(),
    }));
    exited.catch(() => undefined);
    return {
      pid,
      exited,
      kill: async (signal: number) => {
        const st = procStat(pid);
        if (st === null || st.startTime !== startTime || st.state === 'Z') {
          throw new ShimError('NotFound', `exec process ${pid} of container ${id} has exited`);
        }
        signals.push(signal);
        process.kill(pid, signal);
      },
    };
  }

  async pause(id: string): Promise<void> {
    await this.runc.pause(this.#rid(id));
  }

  async resume(id: string): Promise<void> {
    await this.runc.resume(this.#rid(id));
  }

  /** `runc update`: runc writes the container's cgroup and refuses what it cannot change. */
  async update(id: string, resources: LinuxResources): Promise<void> {
    await this.runc.update(this.#rid(id), resources);
  }

  /**
   * The container's own cgroup, from its init's /proc entry (for OOM kill counts: task/oom.ts);
   * undefined while there is no init (a restore creates the container only at Start).
   */
  async cgroupOf(id: string): Promise<ProcessCgroup | undefined> {
    const pid = await this.state(id).then(
      (st) => st.pid,
      (err: unknown) => {
        if (isShimError(err, 'NotFound')) return 0;
        throw err;
      },
    );
    if (pid <= 0) return undefined;
    const { cgroup, shared } = await readSandboxCgroup(pid, '/proc', 'cgroup of the container');
    return shared ? undefined : cgroup;
  }

  async stats(id: string): Promise<ResourceStats> {
    const s = await this.runc.events(this.#rid(id));
    return {
      memoryUsageBytes: s.memory?.usage?.usage,
      memoryLimitBytes: s.memory?.usage?.limit,
      cpuUsageNanos: s.cpu?.usage?.total,
      pids: s.pids?.current,
    };
  }

  // ---- internals ----

  #cleanup(id: string): Cleanup {
    return new Cleanup((f) => this.#log.warn({ id, phase: f.name, err: f.err }, 'undo step failed'));
  }

  /** Creates the container's state dir; refuses an id runc or thaw already knows. */
  async #claim(rid: string, cleanup: Cleanup): Promise<string> {
    const dir = this.#dir(rid);
    if ((await exists(join(this.runc.root, rid))) || (await exists(join(dir, 'container.json')))) {
      throw new ShimError('AlreadyExists', `native container ${rid} already exists`);
    }
    await mkdir(join(this.#root, 'containers'), { recursive: true, mode: 0o700 });
    await rm(dir, { recursive: true, force: true });
    await mkdir(dir, { recursive: true, mode: 0o700 });
    cleanup.add('remove state dir', () => rm(dir, { recursive: true, force: true }));
    return dir;
  }

  async #load(id: string): Promise<ContainerRecord> {
    const file = join(this.#dir(this.#rid(id)), 'container.json');
    try {
      return JSON.parse(await readFile(file, 'utf8')) as ContainerRecord;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
        throw new ShimError('NotFound', `native container ${id} does not exist`, { cause: err });
      }
      throw asShimError(err, 'Internal', `cannot read ${file}`);
    }
  }

  async #save(rec: ContainerRecord): Promise<void> {
    const file = join(this.#dir(rec.rid), 'container.json');
    await writeFile(`${file}.tmp`, JSON.stringify(rec, null, 1), { mode: 0o600 });
    await rename(`${file}.tmp`, file);
  }

  async #update(id: string, change: (rec: ContainerRecord) => ContainerRecord): Promise<void> {
    const key = this.#rid(id);
    const previous = this.#locks.get(key) ?? Promise.resolve();
    const next = previous.catch(() => undefined).then(async () => this.#save(change(await this.#load(id))));
    this.#locks.set(key, next);
    try {
      await next;
    } finally {
      if (this.#locks.get(key) === next) this.#locks.delete(key);
    }
  }

  /** CRIU must give restored processes their recorded host pids: wait until the originals are reaped. */
  async #waitForPidsFree(pids: readonly number[], imageDir: string): Promise<void> {
    const deadline = performance.now() + this.#pidReleaseTimeoutMs;
    for (;;) {
      const busy = pids.filter((p) => procStat(p) !== null);
      if (busy.length === 0) return;
      if (performance.now() > deadline) {
        const live = busy.filter((p) => procStat(p)?.state !== 'Z');
        throw new ShimError(
          'FailedPrecondition',
          `cannot restore ${imageDir} in the host pid namespace: recorded pid(s) ${busy.join(', ')} still in use` +
            (live.length > 0 ? ' (the source is still running, e.g. checkpointed with leaveRunning)' : ' (not yet reaped)'),
        );
      }
      await sleep(50);
    }
  }
}

// ---- private bundle ----

interface PrivateBundle {
  /** Directory holding the rewritten config.json. */
  dir: string;
  cgroupsPath: string;
  hostPidNamespace: boolean;
  terminal: boolean;
  /** Our CRIU config file (named by the org.criu.config annotation). */
  criuConfig: string;
  /** The caller's own CRIU config text (from its annotation), kept in ours. */
  userCriuConfig: string;
}

/**
 * Writes `<dir>/bundle/config.json` from `<source>/config.json` (see the header). Everything else in
 * the spec is kept as it is.
 */
export async function writePrivateBundle(p: { source: string; dir: string; rid: string }): Promise<PrivateBundle> {
  const specFile = join(p.source, 'config.json');
  let spec: Record<string, unknown>;
  try {
    spec = JSON.parse(await readFile(specFile, 'utf8')) as Record<string, unknown>;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code === 'ENOENT' ? 'NotFound' : 'InvalidArgument';
    throw new ShimError(code, `bundle ${p.source}: cannot read config.json: ${(err as Error).message}`, { cause: err });
  }
  if (!isRecord(spec) || !isRecord(spec.root) || typeof spec.root.path !== 'string') {
    throw new ShimError('InvalidArgument', `bundle ${p.source}: config.json has no root.path`);
  }
  const source = resolve(p.source);
  spec.root = { ...spec.root, path: resolve(source, spec.root.path) };
  if (Array.isArray(spec.mounts)) {
    spec.mounts = spec.mounts.map((m: unknown) => {
      if (!isRecord(m) || typeof m.source !== 'string' || isAbsolute(m.source)) return m;
      const bind = m.type === 'bind' || (Array.isArray(m.options) && m.options.some((o) => o === 'bind' || o === 'rbind'));
      return bind ? { ...m, source: resolve(source, m.source) } : m;
    });
  }
  const linux = isRecord(spec.linux) ? { ...spec.linux } : {};
  const given = typeof linux.cgroupsPath === 'string' && linux.cgroupsPath !== '' ? linux.cgroupsPath : `/thaw/${p.rid}`;
  // CRIU is told this path verbatim, so it must be the one runc uses: absolute, one word.
  const cgroupsPath = given.startsWith('/') ? given : `/${given}`;
  if (/\s/.test(cgroupsPath)) throw new ShimError('InvalidArgument', `bundle ${p.source}: linux.cgroupsPath ${JSON.stringify(given)} contains whitespace`);
  linux.cgroupsPath = cgroupsPath;
  spec.linux = linux;
  const namespaces = Array.isArray(linux.namespaces) ? linux.namespaces : [];
  const hostPidNamespace = !namespaces.some((n) => isRecord(n) && n.type === 'pid' && (n.path === undefined || n.path === ''));

  const annotations = isRecord(spec.annotations) ? { ...(spec.annotations as Record<string, string>) } : {};
  const criuConfig = join(p.dir, 'criu.conf');
  let userCriuConfig = '';
  const theirs = annotations[CRIU_CONFIG_ANNOTATION];
  if (typeof theirs === 'string' && theirs !== '') {
    userCriuConfig = await readFile(theirs, 'utf8').catch(() => '');
    if (userCriuConfig !== '' && !userCriuConfig.endsWith('\n')) userCriuConfig += '\n';
  }
  annotations[CRIU_CONFIG_ANNOTATION] = criuConfig;
  spec.annotations = annotations;

  const bundleDir = join(p.dir, 'bundle');
  await mkdir(bundleDir, { recursive: true, mode: 0o700 });
  await writeFile(join(bundleDir, 'config.json'), JSON.stringify(spec, null, 1), { mode: 0o600 });
  await writeUserCriuConfig(criuConfig, userCriuConfig);
  const info: PrivateBundle = {
    dir: bundleDir,
    cgroupsPath,
    hostPidNamespace,
    terminal: isRecord(spec.process) && spec.process.terminal === true,
    criuConfig,
    userCriuConfig,
  };
  await writeFile(join(p.dir, 'bundle.json'), JSON.stringify(info, null, 1), { mode: 0o600 });
  return info;
}

async function readPrivateBundleInfo(dir: string): Promise<PrivateBundle> {
  try {
    return JSON.parse(await readFile(join(dir, 'bundle.json'), 'utf8')) as PrivateBundle;
  } catch (err) {
    throw asShimError(err, 'Internal', `native container state ${dir} is incomplete`);
  }
}

/** Our CRIU config outside a restore: only the caller's own lines, or no file at all. */
async function writeUserCriuConfig(file: string, text: string): Promise<void> {
  if (text === '') await rm(file, { force: true });
  else await writeFile(file, text, { mode: 0o600 });
}

async function readImageInfo(imageDir: string): Promise<NativeImageInfo | null> {
  const text = await readFile(join(imageDir, NATIVE_IMAGE_FILE), 'utf8').catch(() => null);
  if (text === null) {
    if (!(await exists(join(imageDir, 'descriptors.json')))) {
      throw new ShimError('DataLoss', `${imageDir} is not a runc checkpoint image (no descriptors.json)`);
    }
    return null; // a plain `runc checkpoint` image: restorable, nothing known about its source
  }
  try {
    return JSON.parse(text) as NativeImageInfo;
  } catch (err) {
    throw new ShimError('DataLoss', `${join(imageDir, NATIVE_IMAGE_FILE)} is damaged`, { cause: err });
  }
}

async function readGpuRecord(imageDir: string): Promise<GpuCheckpointRecord | null> {
  const text = await readFile(join(imageDir, GPU_RECORD_FILE), 'utf8').catch(() => null);
  if (text === null) return null;
  try {
    const rec = JSON.parse(text) as GpuCheckpointRecord;
    if (!Array.isArray(rec.pids)) throw new Error('no pids');
    return rec;
  } catch (err) {
    throw new ShimError('DataLoss', `${join(imageDir, GPU_RECORD_FILE)} is damaged`, { cause: err });
  }
}

// ---- stdio ----

/** The fds to hand runc, the relays serving them, and our copies to close once runc has them. */
export interface InterposedStdio {
  fds: RuncStdio;
  relays: RelayRecord[];
  /** Closes the fds this process opened (call once runc has started with them). */
  close(): void;
}

function passThrough(stdio: StdioFds): InterposedStdio {
  return { fds: stdio, relays: [], close: () => undefined };
}

/** True when `fd` is an anonymous pipe (what CRIU can restore as an external fd). */
export function isAnonymousPipe(fd: number): boolean {
  try {
    return readlinkSync(`/proc/self/fd/${fd}`).startsWith('pipe:[');
  } catch {
    return false;
  }
}

const RELAY_SETUP_TIMEOUT_MS = 10_000;

/**
 * Gives each stdio slot that is not an anonymous pipe one, served by a relay:
 * - stdout/stderr: `cat` reads the pipe and writes to the caller's fd ('ignore' → /dev/null);
 * - stdin: `cat` reads the caller's fd ('ignore' → /dev/null, i.e. EOF) and writes into the pipe.
 *   A FIFO is reopened by the relay through /proc/self/fd (the shim opens stdin FIFOs non-blocking,
 *   which `cat` would take for an error).
 * One detached `sh` (its own session, so a signal to thaw's process group does not reach it) makes
 * each pipe with a pipeline and reports pids; this process then opens its end of each pipe through
 * `/proc/<pid>/fd/<n>` (an open of a pipe's /proc link yields a new fd on the same pipe, as runc's
 * own tests do), and finally closes the control socket: the holders waiting on it exit and the
 * stdin `cat` starts. The relays outlive thaw; each `cat` exits at EOF (container gone) or on
 * `stopRelays`.
 */
export async function interposeStdio(stdio: StdioFds, opts: { signal?: AbortSignal } = {}): Promise<InterposedStdio> {
  const needs = stdio.map((slot) => slot === 'ignore' || !isAnonymousPipe(slot));
  if (!needs.some(Boolean)) return passThrough(stdio);

  const opened: number[] = [];
  const closeAll = () => {
    for (const fd of opened.splice(0)) closeQuietly(fd);
  };
  const devNull = (flags: number) => {
    const fd = openSync('/dev/null', flags);
    opened.push(fd);
    return fd;
  };
  const [inSlot, outSlot, errSlot] = stdio;
  const src = needs[0] ? (inSlot === 'ignore' ? devNull(fsConstants.O_RDONLY) : inSlot) : 'ignore';
  const dst1 = needs[1] ? (outSlot === 'ignore' ? devNull(fsConstants.O_WRONLY) : outSlot) : 'ignore';
  const dst2 = needs[2] ? (errSlot === 'ignore' ? devNull(fsConstants.O_WRONLY) : errSlot) : 'ignore';

  // fds in the relay shell: 3 stdin source, 4 stdout target, 5 stderr target, 6 control socket
  // (EOF = go), 8 = the shell's stdout, where pids are reported. Every relay closes what it does not use.
  const lines = ['exec </dev/null 2>/dev/null 8>&1'];
  if (needs[0]) {
    // The group reports its own pid (a child's $PPID): it becomes the `cat`, and its fd 1 is the pipe.
    const from = typeof src === 'number' && isFifo(src) ? '/proc/self/fd/3' : '&3';
    lines.push(`{ exec 4>&- 5>&-; sh -c 'echo "stdin $PPID 1"' >&8; exec 8>&-; read _ <&6; exec cat <${from} 3<&- 6<&-; } | : &`);
  }
  for (const [i, role] of [
    [1, 'stdout'],
    [2, 'stderr'],
  ] as const) {
    if (!needs[i]) continue;
    const target = i === 1 ? 4 : 5;
    lines.push(`{ exec 3<&- 4>&- 5>&- 8>&-; read _ <&6; } | exec cat >&${target} 3<&- 4>&- 5>&- 6<&- 8>&- &`);
    lines.push(`echo "${role} $! 0"`);
  }
  const expected = needs.filter(Boolean).length;
  const child = spawn('/bin/sh', ['-c', lines.join('\n')], {
    stdio: ['ignore', 'pipe', 'ignore', src, dst1, dst2, 'pipe'],
    detached: true,
  });
  const control = (child.stdio as readonly unknown[])[6] as { destroy(): void } | null | undefined;
  const relays: RelayRecord[] = [];
  const ours: number[] = [];
  try {
    const reports = await readReports(child, expected, opts.signal);
    const fds: RuncStdioSlot[] = [...stdio];
    for (const r of reports) {
      const link = `/proc/${r.pid}/fd/${r.fd}`;
      await untilPipe(link, opts.signal);
      const slot = r.role === 'stdin' ? 0 : r.role === 'stdout' ? 1 : 2;
      const fd = openSync(link, slot === 0 ? fsConstants.O_RDONLY : fsConstants.O_WRONLY);
      ours.push(fd);
      fds[slot] = fd;
      relays.push({ pid: r.pid, startTime: procStat(r.pid)?.startTime ?? 0, role: r.role });
    }
    return {
      fds: fds as unknown as RuncStdio,
      relays,
      close: () => {
        for (const fd of ours.splice(0)) closeQuietly(fd);
      },
    };
  } catch (err) {
    for (const fd of ours.splice(0)) closeQuietly(fd);
    killGroup(child.pid);
    throw err instanceof ShimError ? err : new ShimError('Internal', `cannot set up stdio pipes: ${(err as Error).message}`, { cause: err });
  } finally {
    // Go: the holders see EOF and exit, the stdin relay starts copying.
    control?.destroy();
    child.stdout?.destroy();
    child.unref();
    closeAll();
  }
}

interface RelayReport {
  role: RelayRecord['role'];
  pid: number;
  /** The relay's fd that is the pipe. */
  fd: number;
}

function readReports(child: ReturnType<typeof spawn>, expected: number, signal?: AbortSignal): Promise<RelayReport[]> {
  return new Promise((resolvePromise, reject) => {
    let text = '';
    const reports: RelayReport[] = [];
    const timer = setTimeout(() => done(new Error(`relay shell reported ${reports.length} of ${expected} pipes in ${RELAY_SETUP_TIMEOUT_MS} ms`)), RELAY_SETUP_TIMEOUT_MS);
    const onAbort = () => done(new ShimError('Canceled', 'stdio set-up canceled', { cause: signal?.reason }));
    signal?.addEventListener('abort', onAbort, { once: true });
    const done = (err?: Error) => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
      child.stdout?.removeAllListeners('data');
      if (err) reject(err);
      else resolvePromise(reports);
    };
    child.on('error', (err) => done(err));
    child.stdout?.on('data', (chunk: Buffer) => {
      text += chunk.toString('utf8');
      let nl: number;
      while ((nl = text.indexOf('\n')) >= 0) {
        const line = text.slice(0, nl).trim();
        text = text.slice(nl + 1);
        const m = /^(stdin|stdout|stderr) (\d+) (\d+)$/.exec(line);
        if (m) reports.push({ role: m[1] as RelayReport['role'], pid: Number(m[2]), fd: Number(m[3]) });
      }
      if (reports.length >= expected) done();
    });
    child.stdout?.on('end', () => {
      if (reports.length < expected) done(new Error(`relay shell exited after reporting ${reports.length} of ${expected} pipes`));
    });
  });
}

/** The relay sets up its pipe right after fork: wait until its /proc link shows one. */
async function untilPipe(link: string, signal?: AbortSignal): Promise<void> {
  const deadline = performance.now() + RELAY_SETUP_TIMEOUT_MS;
  for (;;) {
    let target = '';
    try {
      target = readlinkSync(link);
    } catch {
      // not there yet
    }
    if (target.startsWith('pipe:[')) return;
    if (signal?.aborted) throw new ShimError('Canceled', 'stdio set-up canceled', { cause: signal.reason });
    if (performance.now() > deadline) throw new Error(`${link} never became a pipe`);
    await sleep(1);
  }
}

/**
 * Stops relays: the stdin one at once (it may block reading the caller's fd forever); output ones
 * get `drainMs` to copy what is left and exit at EOF, then are killed. Pid reuse is ruled out by the
 * recorded start time.
 */
export async function stopRelays(relays: readonly RelayRecord[], opts: { drainMs: number }): Promise<void> {
  const alive = (r: RelayRecord) => {
    const st = procStat(r.pid);
    return st !== null && st.state !== 'Z' && st.startTime === r.startTime;
  };
  const kill = (r: RelayRecord) => {
    if (!alive(r)) return;
    try {
      process.kill(r.pid, 'SIGKILL');
    } catch {
      // already gone
    }
  };
  relays.filter((r) => r.role === 'stdin').forEach(kill);
  const outputs = relays.filter((r) => r.role !== 'stdin');
  const deadline = performance.now() + opts.drainMs;
  while (outputs.some(alive) && performance.now() < deadline) await sleep(20);
  outputs.forEach(kill);
}

function isFifo(fd: number): boolean {
  try {
    return fstatSync(fd).isFIFO();
  } catch {
    return false;
  }
}

function killGroup(pid: number | undefined): void {
  if (pid === undefined) return;
  try {
    process.kill(-pid, 'SIGKILL');
  } catch {
    // the group is gone
  }
}

function closeQuietly(fd: number): void {
  try {
    closeSync(fd);
  } catch {
    // already closed
  }
}

// ---- processes ----

/** A waitpid status → containerd's exit status (code, or 128 + signal). */
export function decodeWaitStatus(status: number): number {
  const signal = status & 0x7f;
  return signal === 0 ? (status >> 8) & 0xff : 128 + signal;
}

/**
 * Polls until the process is gone or a zombie; returns the exit status when the zombie was seen,
 * null when it was reaped (or replaced) before.
 */
async function waitForExit(proc: { pid: number; startTime: number }, signal?: AbortSignal): Promise<number | null> {
  let delay = 50;
  for (;;) {
    const st = procStat(proc.pid);
    if (st === null || (proc.startTime !== 0 && st.startTime !== proc.startTime)) return null;
    if (st.state === 'Z' || st.state === 'X') return decodeWaitStatus(st.exitCode);
    if (signal?.aborted) throw new ShimError('Canceled', `wait for pid ${proc.pid} canceled`, { cause: signal.reason });
    try {
      await sleep(delay, undefined, { signal });
    } catch {
      throw new ShimError('Canceled', `wait for pid ${proc.pid} canceled`, { cause: signal?.reason });
    }
    delay = Math.min(500, Math.round(delay * 1.5));
  }
}

/** Alive and not a zombie; with a start time, also the same process (pids are reused). */
function isAlive(pid: number, startTime: number): boolean {
  const st = procStat(pid);
  return st !== null && st.state !== 'Z' && st.state !== 'X' && (startTime === 0 || st.startTime === startTime);
}

/** This process and its ancestors: never killed, whatever cgroup they share. */
function ownLineage(): Set<number> {
  const out = new Set<number>();
  for (let pid: number | undefined = process.pid; pid !== undefined && pid > 0 && !out.has(pid); pid = procStat(pid)?.ppid) out.add(pid);
  return out;
}

/** The container's cgroup directories: `<path>` under cgroup v2 and under each v1 hierarchy. */
function cgroupDirs(cgroupsPath: string): string[] {
  const rel = cgroupsPath.split('/').filter((p) => p !== '' && p !== '.' && p !== '..');
  if (rel.length === 0) return []; // never the root cgroup
  const base = '/sys/fs/cgroup';
  let entries: string[] = [];
  try {
    entries = readdirSync(base);
  } catch {
    return [];
  }
  return [join(base, ...rel), ...entries.map((e) => join(base, e, ...rel))];
}

/** Every pid in the container's cgroups. */
function containerCgroupProcs(cgroupsPath: string): number[] {
  return cgroupProcs(cgroupDirs(cgroupsPath));
}

/**
 * runc puts a new container into a cgroup that already holds processes without a word, and from then
 * on `runc ps` — and so thaw's GPU lock and checkpoint — would take those strangers for the
 * container's own (measured on the H100: a hung container left by a killed script). Refuse instead.
 */
function refuseBusyCgroup(id: string, cgroupsPath: string): void {
  const busy = containerCgroupProcs(cgroupsPath);
  if (busy.length > 0) {
    throw new ShimError(
      'FailedPrecondition',
      `container ${id}: cgroup ${cgroupsPath} already holds processes ${busy.slice(0, 8).join(', ')}${busy.length > 8 ? ', …' : ''} (a container left behind? delete it first)`,
    );
  }
}

/** Removes the container's (empty) cgroup directories a failed restore left; busy ones stay. */
function removeCgroupDirs(cgroupsPath: string): void {
  for (const dir of cgroupDirs(cgroupsPath)) {
    try {
      rmdirSync(dir);
    } catch {
      // absent or busy
    }
  }
}

/** A checksum that differs from the manifest: the image itself is bad, a plain restore of it too. */
function imageDamaged(err: unknown): boolean {
  return err instanceof PageServerError && err.code === 'DataLoss' && (err.phase === 'prepare' || err.phase === 'verify-before' || err.phase === 'verify');
}

function lastLine(text: string): string {
  return text.trim().split('\n').at(-1)?.trim() ?? '';
}

async function readInit(pidFile: string): Promise<{ pid: number; startTime: number }> {
  const text = (await readFile(pidFile, 'utf8').catch(() => '')).trim();
  const pid = Number(text);
  if (text === '' || !Number.isSafeInteger(pid) || pid <= 0) {
    throw new RuncError('Internal', `runc wrote no init pid to ${pidFile}`, { argv: [], exitCode: undefined, logLine: '' });
  }
  return { pid, startTime: procStat(pid)?.startTime ?? 0 };
}

async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch {
    return false;
  }
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function round(ms: number): number {
  return Math.round(ms * 10) / 10;
}
