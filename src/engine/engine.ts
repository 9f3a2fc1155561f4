/**
 * The one runtime interface that task/ (the shim) and cli/ (thaw) use. `gvisor.ts` implements it
 * with runsc, `native.ts` with runc + CRIU. Ids given to an engine are thaw's container ids
 * (validated by `validateContainerId`); each engine maps them to its runtime's own ids.
 */
import type { ImageChecksum } from '../restore/pages.js';
import type { LinuxResources, ProcessCgroup } from './cgroup-resources.js';
import type { ManifestFile } from '../snapshot/manifest.js';

export type EngineName = 'gvisor' | 'native';

/** One stdio slot of the container's init process: an open fd, or nothing. */
export type StdioSlot = number | 'ignore';
export type StdioFds = readonly [stdin: StdioSlot, stdout: StdioSlot, stderr: StdioSlot];

export interface CreateOptions {
  id: string;
  /** OCI bundle directory holding config.json and rootfs/. */
  bundle: string;
  /** The container's stdio (runsc: the `create` process's stdio becomes the container's). */
  stdio: StdioFds;
  /** Unix socket receiving the pty master when the spec asks for a terminal. */
  consoleSocket?: string;
  signal?: AbortSignal;
}

export interface RestoreOptions extends CreateOptions {
  /** Directory holding the runtime's checkpoint image files. */
  imageDir: string;
  /**
   * Expected checksums (by absolute path) of the snapshot's files, given when the engine verifies
   * some of them itself while restoring (`selfVerifiedFiles`); the restore fails if they do not
   * match. Absent: the bytes were verified before (or verification is off).
   */
  pageChecksums?: ReadonlyMap<string, ImageChecksum>;
}

export interface CheckpointOptions {
  /** Empty directory the image is written into. */
  imageDir: string;
  /** Keep the source running (the first replica keeps serving). */
  leaveRunning: boolean;
  signal?: AbortSignal;
}

export type EngineStatus = 'created' | 'running' | 'paused' | 'stopped';

export interface EngineState {
  id: string;
  status: EngineStatus;
  /** Host pid of the container's init process (gVisor: the sandbox's), 0 if none. */
  pid: number;
}

export interface ExecOptions {
  /** OCI process spec (JSON) for the new process. */
  process: Record<string, unknown>;
  stdio: StdioFds;
  consoleSocket?: string;
  signal?: AbortSignal;
}

/** A process started by `exec`: its host pid, its exit, and a way to signal it. */
export interface ExecHandle {
  pid: number;
  /** Resolves when the exec'd process exits (from the runtime, not from reaping). */
  exited: Promise<ExitResult>;
  kill(signal: number): Promise<void>;
}

export interface ExitResult {
  exitStatus: number;
  exitedAt: Date;
}

export interface ResourceStats {
  memoryUsageBytes?: number;
  memoryLimitBytes?: number;
  cpuUsageNanos?: number;
  pids?: number;
}

/**
 * Runtime identity that must match between checkpoint and restore (runtime name and version,
 * platform, checkpoint format options). Goes into the snapshot key.
 */
export type EngineIdentity = Readonly<Record<string, string>>;

/** GPU participation hooks an engine calls around its own checkpoint and restore (see gpu/driver.ts). */
export interface GpuHooks {
  /** Lock + checkpoint every CUDA process among `pids`; returns what it touched (for the manifest). */
  beforeCheckpoint(pids: readonly number[]): Promise<GpuCheckpointRecord>;
  /** Undo `beforeCheckpoint` when the engine's own checkpoint failed or ran with leaveRunning. */
  resumeAfterCheckpoint(record: GpuCheckpointRecord): Promise<void>;
  /** CUDA restore + unlock of the processes recorded at checkpoint, now at `pids` (new host pids). */
  afterRestore(record: GpuCheckpointRecord, pids: readonly number[]): Promise<void>;
}

export interface GpuCheckpointRecord {
  /** Processes that were CUDA-checkpointed, by host pid at checkpoint time. */
  pids: number[];
  /** Phase timings in ms. */
  timings: Record<string, number>;
}

export interface Engine {
  readonly name: EngineName;
  identity(): Promise<EngineIdentity>;
  /** Creates the container (sandbox up, app not started). */
  create(opts: CreateOptions): Promise<EngineState>;
  start(id: string): Promise<EngineState>;
  /**
   * Prepares for a restore (gVisor: `runsc create`, which can overlap staging; native: nothing).
   * Must be followed by `restore` or `delete`.
   */
  prepareRestore(opts: CreateOptions): Promise<void>;
  /**
   * Of a snapshot's files, those this engine reads and checks itself while it restores (the native
   * engine's lazy-pages server hashes the page images as it fills them): the lifecycle neither stages
   * nor pre-verifies them and passes their checksums instead, so those bytes are read once. Absent
   * or empty: the lifecycle verifies everything before the restore.
   */
  selfVerifiedFiles?(files: readonly ManifestFile[]): Promise<ManifestFile[]>;
  /** Restores `imageDir` into the container `opts.id`; the app runs when this resolves. */
  restore(opts: RestoreOptions): Promise<EngineState>;
  checkpoint(id: string, opts: CheckpointOptions): Promise<void>;
  state(id: string): Promise<EngineState>;
  /** Resolves when the init process exits (from the runtime's own wait, not from reaping). */
  wait(id: string, signal?: AbortSignal): Promise<ExitResult>;
  kill(id: string, signal: number, all?: boolean): Promise<void>;
  delete(id: string, opts?: { force?: boolean }): Promise<void>;
  /** Host pids of the container's processes (native) or sandbox-internal pids (gVisor). */
  ps(id: string): Promise<number[]>;
  exec(id: string, opts: ExecOptions): Promise<ExecHandle>;
  pause(id: string): Promise<void>;
  resume(id: string): Promise<void>;
  stats(id: string): Promise<ResourceStats>;
  /**
   * Applies new resource limits to the running container (Task.Update). Optional: the Task service
   * answers NotImplemented for an engine without it. Fields the engine cannot change are refused
   * (NotImplemented or InvalidArgument naming the field), never ignored.
   */
  update?(id: string, resources: LinuxResources): Promise<void>;
  /**
   * The cgroup that holds the created container (gVisor: the whole sandbox), where the Task service
   * watches for OOM kills (TaskOOM). undefined when it has no cgroup of its own (no
   * linux.cgroupsPath: it shares the shim's, whose counts are not the container's) or none is known.
   * Optional: an engine without it publishes no OOM events.
   */
  cgroupOf?(id: string): Promise<ProcessCgroup | undefined>;
}
