import { constants as osConstants } from 'node:os';
import { ShimError } from '../errors.js';

/**
 * Typed options for every runsc verb, each with the one function that turns it into argv, and the
 * global flags in one place. Pure functions: nothing here spawns or touches files, so argv is pinned
 * by unit tests. Verb argv never starts with global flags; `Runsc` prepends `globalArgs()`, because
 * runsc parses top-level flags only before the verb.
 */

export type RunscPlatform = 'systrap' | 'ptrace' | 'kvm';
export type RunscNetwork = 'none' | 'host' | 'sandbox';
export type CompressionLevel = 'none' | 'flate-best-speed';

export interface RunscGlobalOptions {
  /** runsc binary (PATH lookup if not absolute). */
  readonly path: string;
  /** `--root`: directory of runsc's container state files. */
  readonly root: string;
  /** Fixed at `create`; a restore must use the platform the image was taken on. */
  readonly platform: RunscPlatform;
  /** `sandbox` fails on kernels >= 6.11 (gVisor #10704), so callers pass none or host. */
  readonly network: RunscNetwork;
  /** `--debug --debug-log=<dir>/` (one file per runsc process, named by runsc); null = off. */
  readonly debugLogDir: string | null;
  /** Extra top-level flags, each passed as `--key=value` after thaw's own. */
  readonly flags: Readonly<Record<string, string>>;
  /**
   * `--log-format`. runsc writes its error records to the `--log` file as JSON whatever this says
   * (20240729 and upstream); both JSON shapes (`msg` and k8s `log`) are parsed.
   */
  readonly logFormat?: 'json' | 'json-k8s';
}

/** Flags thaw sets itself; passing them through `flags` would fight with thaw's values. */
const RESERVED_GLOBAL_FLAGS = new Set(['root', 'platform', 'network', 'log', 'log-fd', 'log-format', 'debug-log']);
const FLAG_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]*$/;

/** Top-level flags for every call; `logFile` receives runsc's JSON error records for this call. */
export function globalArgs(g: RunscGlobalOptions, logFile: string | null): string[] {
  const argv = [`--root=${g.root}`, `--platform=${g.platform}`, `--network=${g.network}`];
  if (logFile !== null) argv.push(`--log=${logFile}`, `--log-format=${g.logFormat ?? 'json'}`);
  if (g.debugLogDir !== null) {
    // A trailing slash makes runsc create one file per command inside the directory.
    argv.push('--debug', `--debug-log=${g.debugLogDir.endsWith('/') ? g.debugLogDir : `${g.debugLogDir}/`}`);
  }
  for (const [key, value] of Object.entries(g.flags)) {
    if (!FLAG_NAME.test(key) || RESERVED_GLOBAL_FLAGS.has(key)) {
      throw new ShimError('InvalidArgument', `runsc flag ${JSON.stringify(key)} cannot be passed through`);
    }
    argv.push(`--${key}=${value}`);
  }
  return argv;
}

/** One stdio slot of a runsc process that hands its stdio to the sandbox: an open fd, or nothing. */
export type RunscStdioSlot = number | 'ignore';
export type RunscStdio = readonly [stdin: RunscStdioSlot, stdout: RunscStdioSlot, stderr: RunscStdioSlot];

/** Per-call controls, accepted by every verb. */
export interface RunscCallOptions {
  readonly signal?: AbortSignal;
  /** Overrides the verb's default timeout; 0 = none. */
  readonly timeoutMs?: number;
}

export interface CreateOptions extends RunscCallOptions {
  /** OCI bundle directory (config.json + rootfs). */
  readonly bundle: string;
  /** Becomes the container's stdio: `runsc create`'s own stdio is handed to the sandbox. */
  readonly stdio: RunscStdio;
  readonly consoleSocket?: string;
  readonly pidFile?: string;
  readonly userLog?: string;
}

export function createArgs(id: string, o: CreateOptions): string[] {
  return [
    'create',
    `--bundle=${o.bundle}`,
    ...opt('console-socket', o.consoleSocket),
    ...opt('pid-file', o.pidFile),
    ...opt('user-log', o.userLog),
    id,
  ];
}

export function startArgs(id: string): string[] {
  return ['start', id];
}

export function stateArgs(id: string): string[] {
  return ['state', id];
}

export function listArgs(): string[] {
  return ['list', '--format=json'];
}

export interface WaitOptions extends RunscCallOptions {
  /** Wait for this pid in the container's PID namespace instead of the init process. */
  readonly pid?: number;
  /** Wait for this pid in the sandbox's root PID namespace. */
  readonly rootPid?: number;
}

export function waitArgs(id: string, o: WaitOptions = {}): string[] {
  if (o.pid !== undefined && o.rootPid !== undefined) {
    throw new ShimError('InvalidArgument', 'runsc wait takes pid or rootPid, not both');
  }
  return ['wait', ...optInt('pid', o.pid), ...optInt('rootpid', o.rootPid), id];
}

export interface KillOptions extends RunscCallOptions {
  /** Signal every process in the container. */
  readonly all?: boolean;
  /** Signal one process (pid in the container's PID namespace) instead of the init process. */
  readonly pid?: number;
}

/** `signal` is a number or a name (`SIGKILL`); it is passed to runsc as a number. */
export function killArgs(id: string, signal: number | NodeJS.Signals, o: KillOptions = {}): string[] {
  return ['kill', ...flag('all', o.all), ...optInt('pid', o.pid), id, String(signalNumber(signal))];
}

export interface DeleteOptions extends RunscCallOptions {
  /** Kill a running container first. */
  readonly force?: boolean;
}

export function deleteArgs(id: string, o: DeleteOptions = {}): string[] {
  return ['delete', ...flag('force', o.force), id];
}

export function psArgs(id: string): string[] {
  return ['ps', '--format=json', id];
}

export interface ExecOptions extends RunscCallOptions {
  /** OCI process spec, written to a process.json (`--process`). Exactly one of process and args. */
  readonly process?: Readonly<Record<string, unknown>>;
  /** Command line, run with the container's process defaults. */
  readonly args?: readonly string[];
  /** Becomes the new process's stdio (runsc hands its own stdio to the process). */
  readonly stdio: RunscStdio;
  readonly consoleSocket?: string;
  readonly cwd?: string;
  readonly env?: readonly string[];
  /** `uid[:gid]` */
  readonly user?: string;
}

/** The exec is always detached: `runsc exec --detach` returns once the process has started. */
export interface ExecArgvFiles {
  /** process.json written from `process`; required when `process` is set. */
  readonly processFile?: string;
  /** Receives the host pid of runsc's waiter process, which exits with the process's status. */
  readonly pidFile: string;
  /** Receives the process's pid inside the sandbox (for `wait --pid` and `kill --pid`). */
  readonly internalPidFile: string;
}

export function execArgs(id: string, o: ExecOptions, files: ExecArgvFiles): string[] {
  const hasArgs = o.args !== undefined && o.args.length > 0;
  if ((o.process !== undefined) === hasArgs) {
    throw new ShimError('InvalidArgument', 'runsc exec takes exactly one of process and args');
  }
  if (o.process !== undefined && files.processFile === undefined) {
    throw new ShimError('InvalidArgument', 'runsc exec with a process spec needs its process file');
  }
  return [
    'exec',
    '--detach',
    `--pid-file=${files.pidFile}`,
    `--internal-pid-file=${files.internalPidFile}`,
    ...opt('console-socket', o.consoleSocket),
    ...opt('cwd', o.cwd),
    ...(o.env ?? []).map((e) => `--env=${e}`),
    ...opt('user', o.user),
    ...(o.process !== undefined ? [`--process=${files.processFile}`, id] : [id, ...(o.args ?? [])]),
  ];
}

export function pauseArgs(id: string): string[] {
  return ['pause', id];
}

export function resumeArgs(id: string): string[] {
  return ['resume', id];
}

export interface CheckpointOptions extends RunscCallOptions {
  /** Directory for the image; runsc needs a fresh one per checkpoint. */
  readonly imagePath: string;
  /** Keep the container running (runsc restores it in place; its pid may change). */
  readonly leaveRunning?: boolean;
  /** Omitted = runsc's default, which differs by version (flate in 20240729, none upstream). */
  readonly compression?: CompressionLevel;
  /** O_DIRECT writes of pages.img (uncompressed images). */
  readonly direct?: boolean;
  readonly excludeCommittedZeroPages?: boolean;
  /** Path of cuda-checkpoint inside the container (upstream release-20260608.0+). */
  readonly cudaCheckpointPath?: string;
  readonly cudaCheckpointSequential?: boolean;
}

export function checkpointArgs(id: string, o: CheckpointOptions): string[] {
  return [
    'checkpoint',
    `--image-path=${o.imagePath}`,
    ...flag('leave-running', o.leaveRunning),
    ...opt('compression', o.compression),
    ...flag('direct', o.direct),
    ...flag('exclude-committed-zero-pages', o.excludeCommittedZeroPages),
    ...opt('cuda-checkpoint-path', o.cudaCheckpointPath),
    ...flag('cuda-checkpoint-sequential', o.cudaCheckpointSequential),
    id,
  ];
}

export interface RestoreOptions extends RunscCallOptions {
  readonly bundle: string;
  readonly imagePath: string;
  /**
   * Used only when `restore` creates the container itself (no prior `create`): then it becomes the
   * container's stdio. After a `create`, the app keeps the stdio given to `create`.
   */
  readonly stdio: RunscStdio;
  /** O_DIRECT reads of pages.img; only for images written with `--direct`. */
  readonly direct?: boolean;
  /** Keep loading pages after `restore` returns (upstream only; uncompressed images). */
  readonly background?: boolean;
  readonly consoleSocket?: string;
  readonly pidFile?: string;
}

/** Always `--detach`: an attached restore would wait for the container to exit. */
export function restoreArgs(id: string, o: RestoreOptions): string[] {
  return [
    'restore',
    '--detach',
    `--bundle=${o.bundle}`,
    `--image-path=${o.imagePath}`,
    ...flag('direct', o.direct),
    ...flag('background', o.background),
    ...opt('console-socket', o.consoleSocket),
    ...opt('pid-file', o.pidFile),
    id,
  ];
}

export function eventsArgs(id: string): string[] {
  return ['events', '--stats', id];
}

function opt(name: string, value: string | undefined): string[] {
  return value === undefined || value === '' ? [] : [`--${name}=${value}`];
}

function optInt(name: string, value: number | undefined): string[] {
  if (value === undefined) return [];
  if (!Number.isSafeInteger(value)) throw new ShimError('InvalidArgument', `runsc --${name} must be an integer`);
  return [`--${name}=${value}`];
}

function flag(name: string, on: boolean | undefined): string[] {
  return on === true ? [`--${name}`] : [];
}

function signalNumber(signal: number | NodeJS.Signals): number {
  const n = typeof signal === 'number' ? signal : osConstants.signals[signal];
  if (n === undefined || !Number.isInteger(n) || n <= 0 || n > 64) {
    throw new ShimError('InvalidArgument', `invalid signal ${JSON.stringify(signal)}`);
  }
  return n;
}
