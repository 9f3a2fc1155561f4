import { constants as osConstants } from 'node:os';
import { ShimError } from '../errors.js';

/**
 * Typed options for every runc verb, each with the one function that turns it into argv, and the
 * global flags in one place. Pure functions: nothing here spawns or touches files, so argv is pinned
 * by unit tests. Verb argv never holds global flags; `Runc` prepends `globalArgs()` (runc, a urfave/cli
 * program, parses global flags only before the verb). Values are separate words (`--root DIR`), as
 * runc's own documentation writes them.
 */

export interface RuncGlobalOptions {
  /** runc binary (PATH lookup if not absolute). */
  readonly path: string;
  /** `--root`: directory of runc's container state (one subdirectory per container id). */
  readonly root: string;
  /** `--criu`: CRIU >= 4 (on our machines the private-prefix wrapper /opt/thaw/criu/bin/criu). */
  readonly criuPath: string;
}

/** Global flags for every call; `logFile` receives runc's JSON log records for this call. */
export function globalArgs(g: RuncGlobalOptions, logFile: string | null): string[] {
  const argv = ['--root', g.root, '--criu', g.criuPath];
  if (logFile !== null) argv.push('--log', logFile, '--log-format', 'json');
  return argv;
}

/** One stdio slot of a runc process that hands its stdio to the container: an open fd, or nothing. */
export type RuncStdioSlot = number | 'ignore';
export type RuncStdio = readonly [stdin: RuncStdioSlot, stdout: RuncStdioSlot, stderr: RuncStdioSlot];

/** Per-call controls, accepted by every verb. */
export interface RuncCallOptions {
  readonly signal?: AbortSignal;
  /** Overrides the verb's default timeout; 0 = none. */
  readonly timeoutMs?: number;
}

export interface CreateOptions extends RuncCallOptions {
  /** OCI bundle directory (config.json; its root.path may be absolute). */
  readonly bundle: string;
  /**
   * Becomes the container's stdio: without a terminal, runc create passes its own stdio through to
   * the container's init. For checkpoints these must be anonymous pipes (CRIU cannot dump a host
   * file or FIFO outside the container's mounts).
   */
  readonly stdio: RuncStdio;
  readonly consoleSocket?: string;
  readonly pidFile?: string;
  readonly noPivot?: boolean;
}

export function createArgs(id: string, o: CreateOptions): string[] {
  const argv = ['create', '--bundle', o.bundle];
  if (o.consoleSocket !== undefined) argv.push('--console-socket', o.consoleSocket);
  if (o.pidFile !== undefined) argv.push('--pid-file', o.pidFile);
  if (o.noPivot === true) argv.push('--no-pivot');
  argv.push(id);
  return argv;
}

export function startArgs(id: string): string[] {
  return ['start', id];
}

export function stateArgs(id: string): string[] {
  return ['state', id];
}

export function listArgs(): string[] {
  return ['list', '--format', 'json'];
}

export interface KillOptions extends RuncCallOptions {
  /** Signal every process of the container, not only its init. */
  readonly all?: boolean;
}

/** `runc kill [--all] ID SIGNAL`; the signal goes as a number (runc accepts numbers and names). */
export function killArgs(id: string, signal: number | NodeJS.Signals, o: KillOptions = {}): string[] {
  const argv = ['kill'];
  if (o.all === true) argv.push('--all');
  argv.push(id, String(signalNumber(signal)));
  return argv;
}

export interface DeleteOptions extends RuncCallOptions {
  /** Kill a running container first (runc: SIGKILL, then delete). */
  readonly force?: boolean;
}

export function deleteArgs(id: string, o: DeleteOptions = {}): string[] {
  const argv = ['delete'];
  if (o.force === true) argv.push('--force');
  argv.push(id);
  return argv;
}

/** `runc ps --format json ID` prints the host pids of the container's processes. */
export function psArgs(id: string): string[] {
  return ['ps', '--format', 'json', id];
}

export interface ExecOptions extends RuncCallOptions {
  /** Path of a JSON file holding the OCI process spec. */
  readonly processFile: string;
  /** Receives the host pid of the new process. */
  readonly pidFile: string;
  /** The new process's stdio (runc exec --detach passes its own stdio through). */
  readonly stdio: RuncStdio;
  readonly consoleSocket?: string;
}

export function execArgs(id: string, o: ExecOptions): string[] {
  const argv = ['exec', '--detach', '--pid-file', o.pidFile, '--process', o.processFile];
  if (o.consoleSocket !== undefined) argv.push('--console-socket', o.consoleSocket);
  argv.push(id);
  return argv;
}

export function pauseArgs(id: string): string[] {
  return ['pause', id];
}

export function resumeArgs(id: string): string[] {
  return ['resume', id];
}

/** New resource limits, read as OCI LinuxResources JSON from stdin (`-`); other update flags are then ignored by runc. */
export function updateArgs(id: string): string[] {
  return ['update', '--resources', '-', id];
}

/** One sample of the container's resource usage, then exit. */
export function eventsArgs(id: string): string[] {
  return ['events', '--stats', id];
}

export type ManageCgroupsMode = 'soft' | 'full' | 'strict' | 'ignore';

/** CRIU switches runc passes on to CRIU (checkpoint and restore alike). */
export interface CriuSwitches {
  readonly tcpEstablished?: boolean;
  readonly extUnixSk?: boolean;
  readonly shellJob?: boolean;
  readonly fileLocks?: boolean;
  readonly manageCgroupsMode?: ManageCgroupsMode;
}

function criuSwitchArgs(o: CriuSwitches): string[] {
  const argv: string[] = [];
  if (o.tcpEstablished === true) argv.push('--tcp-established');
  if (o.extUnixSk === true) argv.push('--ext-unix-sk');
  if (o.shellJob === true) argv.push('--shell-job');
  if (o.fileLocks === true) argv.push('--file-locks');
  if (o.manageCgroupsMode !== undefined) argv.push('--manage-cgroups-mode', o.manageCgroupsMode);
  return argv;
}

export interface CheckpointOptions extends RuncCallOptions, CriuSwitches {
  /** Directory the CRIU image files are written into (runc adds descriptors.json). */
  readonly imagePath: string;
  /** Directory for CRIU's dump.log and stats (keeps logs out of the image). */
  readonly workPath: string;
  /** Keep the container running after the dump (otherwise CRIU kills it and runc destroys it). */
  readonly leaveRunning?: boolean;
}

export function checkpointArgs(id: string, o: CheckpointOptions): string[] {
  const argv = ['checkpoint', '--image-path', o.imagePath, '--work-path', o.workPath];
  if (o.leaveRunning === true) argv.push('--leave-running');
  argv.push(...criuSwitchArgs(o), id);
  return argv;
}

export interface RestoreOptions extends RuncCallOptions, CriuSwitches {
  readonly imagePath: string;
  /** Directory for CRIU's restore.log (must be writable; the image may be read-only). */
  readonly workPath: string;
  readonly bundle: string;
  /**
   * runc restore's stdio: CRIU re-attaches the image's external `pipe:[ino]` fds (listed in
   * descriptors.json) to these fds of runc, so they must be fds the caller keeps meaningful.
   */
  readonly stdio: RuncStdio;
  readonly pidFile?: string;
  readonly consoleSocket?: string;
  readonly noPivot?: boolean;
  /**
   * `--lazy-pages`: CRIU restores everything but the private anonymous memory, which it registers
   * with a userfaultfd and hands to the lazy-pages server listening on `<workPath>/lazy-pages.socket`
   * (thaw's own, restore/pages.ts). Nobody listening there fails the restore at once.
   */
  readonly lazyPages?: boolean;
}

/** Always detached: runc returns once the restored container runs. */
export function restoreArgs(id: string, o: RestoreOptions): string[] {
  const argv = ['restore', '--detach', '--image-path', o.imagePath, '--work-path', o.workPath, '--bundle', o.bundle];
  if (o.pidFile !== undefined) argv.push('--pid-file', o.pidFile);
  if (o.consoleSocket !== undefined) argv.push('--console-socket', o.consoleSocket);
  if (o.noPivot === true) argv.push('--no-pivot');
  if (o.lazyPages === true) argv.push('--lazy-pages');
  argv.push(...criuSwitchArgs(o), id);
  return argv;
}

export function versionArgs(): string[] {
  return ['--version'];
}

/** A signal as runc's number; names are resolved with Node's table, unknown names are refused. */
export function signalNumber(signal: number | NodeJS.Signals): number {
  if (typeof signal === 'number') {
    if (!Number.isInteger(signal) || signal <= 0 || signal > 64) {
      throw new ShimError('InvalidArgument', `invalid signal ${signal}`);
    }
    return signal;
  }
  const n = (osConstants.signals as Record<string, number | undefined>)[signal];
  if (n === undefined) throw new ShimError('InvalidArgument', `unknown signal ${signal}`);
  return n;
}
