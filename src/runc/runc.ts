/**
 * `Runc`: the runc CLI (1.1.x), one method per verb, knowing nothing of containerd or snapshots.
 *
 * - Every call goes through one private exec (`#run`): global flags first (`--root`, `--criu`, and a
 *   fresh per-call `--log FILE --log-format json`), a timeout and the caller's AbortSignal (execa
 *   kills the child on abort or timeout). A failure becomes a `RuncError` quoting runc's last error
 *   record from that log (falling back to stderr); for checkpoint and restore it also quotes CRIU's
 *   own error line from `dump.log` / `restore.log` in the work path (criu.ts), because runc only says
 *   `criu failed: type NOTIFY errno 0`.
 * - `create`, `restore` and `exec` run detached without a terminal, so runc passes its own stdio
 *   through to the container process: they get the caller's fds, never execa pipes (awaiting the
 *   call would then last as long as the container holds the pipe). runc's own error text therefore
 *   comes only from the `--log` file. (On failure runc also prints the error to its stderr, which is
 *   the container's stderr: one line lands there.)
 * - Ids are passed as given; the engine above passes fixed-length hashes. Ids runc could misparse
 *   (a leading `-`, odd characters) are refused with InvalidArgument.
 */
import { randomUUID } from 'node:crypto';
import { mkdir, mkdtemp, open, readFile, rm, stat, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { RuncError, ShimError, type ErrorCode } from '../errors.js';
import { silentLogger, type Logger } from '../log/logger.js';
import { readCriuError, unmountAllUnder, type CriuAction } from './criu.js';
import {
  checkpointArgs,
  createArgs,
  deleteArgs,
  eventsArgs,
  execArgs,
  globalArgs,
  killArgs,
  listArgs,
  pauseArgs,
  psArgs,
  restoreArgs,
  resumeArgs,
  startArgs,
  stateArgs,
  updateArgs,
  versionArgs,
  type CheckpointOptions,
  type CreateOptions,
  type DeleteOptions,
  type KillOptions,
  type RestoreOptions,
  type RuncCallOptions,
  type RuncGlobalOptions,
  type RuncStdio,
} from './options.js';

export type RuncVerb =
  | 'create'
  | 'start'
  | 'state'
  | 'list'
  | 'kill'
  | 'delete'
  | 'ps'
  | 'exec'
  | 'pause'
  | 'resume'
  | 'events'
  | 'update'
  | 'checkpoint'
  | 'restore'
  | 'version';

/** Default per-verb timeouts (ms; 0 = none). */
export const DEFAULT_RUNC_TIMEOUTS_MS: Readonly<Record<RuncVerb, number>> = Object.freeze({
  create: 60_000,
  start: 30_000,
  state: 30_000,
  list: 30_000,
  kill: 30_000,
  delete: 60_000,
  ps: 30_000,
  exec: 60_000,
  pause: 30_000,
  resume: 30_000,
  events: 30_000,
  update: 30_000,
  // CRIU moves memory at ~1-2 GB/s: tens of GiB (GPU memory included) take minutes.
  checkpoint: 900_000,
  restore: 900_000,
  version: 15_000,
});

export interface RuncOptions extends RuncGlobalOptions {
  readonly logger?: Logger;
  readonly timeoutsMs?: Readonly<Partial<Record<RuncVerb, number>>>;
  /** Where per-call log files and exec's pid/process files live briefly (default: the OS temp dir). */
  readonly scratchDir?: string;
}

export type RuncStatus = 'creating' | 'created' | 'running' | 'paused' | 'stopped';

/** `runc state` / `runc list --format json` record. */
export interface RuncState {
  ociVersion: string;
  id: string;
  /** Host pid of the container's init (0 once stopped). */
  pid: number;
  status: RuncStatus;
  bundle: string;
  rootfs: string;
  created: string;
  annotations?: Record<string, string>;
}

/** `runc events --stats` data (cgroup counters; absent fields were not reported). */
export interface RuncStats {
  cpu?: { usage?: { total?: number; kernel?: number; user?: number; percpu?: number[] } };
  memory?: {
    cache?: number;
    usage?: RuncMemoryEntry;
    swap?: RuncMemoryEntry;
    kernel?: RuncMemoryEntry;
    raw?: Record<string, number>;
  };
  pids?: { current?: number; limit?: number };
}

export interface RuncMemoryEntry {
  limit?: number;
  usage?: number;
  max?: number;
  failcnt?: number;
}

export interface RuncVersion {
  /** `1.1.5+ds1` */
  version: string;
  commit: string;
  /** OCI runtime spec version runc implements. */
  spec: string;
}

export interface RuncExecRequest extends RuncCallOptions {
  /** OCI process spec of the new process. */
  readonly process: Record<string, unknown>;
  readonly stdio: RuncStdio;
  readonly consoleSocket?: string;
}

const SAFE_RUNTIME_ID = /^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$/;

interface RunRequest {
  verb: RuncVerb;
  /** Verb and its arguments (global flags are added here). */
  argv: readonly string[];
  call: RuncCallOptions;
  id?: string;
  /** fds handed to runc (and on to the container); absent = stdin ignored, stdout/stderr captured. */
  stdio?: RuncStdio;
  /** For checkpoint/restore: where CRIU's log to quote lives. */
  criu?: { workDir: string; action: CriuAction };
  /** false for `--version`, which takes no global flags and writes no log. */
  global?: boolean;
  /** Written to runc's stdin (`update --resources -`); stdio[0] is then unused. */
  input?: string;
}

interface RunOutput {
  stdout: string;
  stderr: string;
}

export class Runc {
  readonly #g: RuncGlobalOptions;
  readonly #log: Logger;
  readonly #timeouts: Readonly<Record<RuncVerb, number>>;
  readonly #scratchDir: string;
  #version: Promise<RuncVersion> | undefined;

  constructor(options: RuncOptions) {
    const { logger, timeoutsMs, scratchDir, ...global } = options;
    this.#g = global;
    this.#log = logger ?? silentLogger;
    this.#timeouts = { ...DEFAULT_RUNC_TIMEOUTS_MS, ...timeoutsMs };
    this.#scratchDir = scratchDir ?? tmpdir();
  }

  get root(): string {
    return this.#g.root;
  }

  get criuPath(): string {
    return this.#g.criuPath;
  }

  /** Creates the container; its init waits for `start`. */
  async create(id: string, opts: CreateOptions): Promise<void> {
    await this.#run({ verb: 'create', id, argv: createArgs(safeId(id), opts), call: opts, stdio: opts.stdio });
  }

  async start(id: string, call: RuncCallOptions = {}): Promise<void> {
    await this.#run({ verb: 'start', id, argv: startArgs(safeId(id)), call });
  }

  async state(id: string, call: RuncCallOptions = {}): Promise<RuncState> {
    const out = await this.#run({ verb: 'state', id, argv: stateArgs(safeId(id)), call });
    return parseState(parseJson(out.stdout, 'state'), 'state');
  }

  /** Every container under this root. */
  async list(call: RuncCallOptions = {}): Promise<RuncState[]> {
    const out = await this.#run({ verb: 'list', argv: listArgs(), call });
    const value = parseJson(out.stdout.trim() === '' ? 'null' : out.stdout, 'list');
    if (value === null) return [];
    if (!Array.isArray(value)) throw badOutput('list', out.stdout);
    return value.map((v) => parseState(v, 'list'));
  }

  async kill(id: string, signal: number | NodeJS.Signals, opts: KillOptions = {}): Promise<void> {
    await this.#run({ verb: 'kill', id, argv: killArgs(safeId(id), signal, opts), call: opts });
  }

  async delete(id: string, opts: DeleteOptions = {}): Promise<void> {
    await this.#run({ verb: 'delete', id, argv: deleteArgs(safeId(id), opts), call: opts });
  }

  /** Host pids of the container's processes. */
  async ps(id: string, call: RuncCallOptions = {}): Promise<number[]> {
    const out = await this.#run({ verb: 'ps', id, argv: psArgs(safeId(id)), call });
    const value = parseJson(out.stdout.trim() === '' ? 'null' : out.stdout, 'ps');
    if (value === null) return [];
    if (!Array.isArray(value) || !value.every((p) => Number.isSafeInteger(p) && (p as number) > 0)) {
      throw badOutput('ps', out.stdout);
    }
    return value as number[];
  }

  /** Starts a process in the container (detached); returns its host pid. */
  async exec(id: string, opts: RuncExecRequest): Promise<number> {
    safeId(id);
    await mkdir(this.#scratchDir, { recursive: true, mode: 0o700 });
    const dir = await mkdtemp(join(this.#scratchDir, 'thaw-runc-exec-'));
    try {
      const files = { processFile: join(dir, 'process.json'), pidFile: join(dir, 'pid') };
      await writeFile(files.processFile, JSON.stringify(opts.process), { mode: 0o600 });
      const argv = execArgs(id, { ...files, stdio: opts.stdio, consoleSocket: opts.consoleSocket });
      await this.#run({ verb: 'exec', id, argv, call: opts, stdio: opts.stdio });
      return await readPidFile(files.pidFile, 'exec');
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }

  async pause(id: string, call: RuncCallOptions = {}): Promise<void> {
    await this.#run({ verb: 'pause', id, argv: pauseArgs(safeId(id)), call });
  }

  async resume(id: string, call: RuncCallOptions = {}): Promise<void> {
    await this.#run({ verb: 'resume', id, argv: resumeArgs(safeId(id)), call });
  }

  /** One sample of resource usage (`runc events --stats`). */
  async events(id: string, call: RuncCallOptions = {}): Promise<RuncStats> {
    const out = await this.#run({ verb: 'events', id, argv: eventsArgs(safeId(id)), call });
    const value = parseJson(lastNonEmptyLine(out.stdout), 'events');
    if (!isRecord(value) || !isRecord(value.data)) throw badOutput('events', out.stdout);
    return value.data as RuncStats;
  }

  /**
   * Applies new resource limits to the container's cgroup: `runc update --resources -` with `resources`
   * (an OCI LinuxResources object, e.g. engine/cgroup-resources.ts's) as JSON on stdin.
   */
  async update(id: string, resources: object, call: RuncCallOptions = {}): Promise<void> {
    await this.#run({ verb: 'update', id, argv: updateArgs(safeId(id)), call, input: JSON.stringify(resources) });
  }

  /**
   * Dumps the container with CRIU into `imagePath`. Without `leaveRunning` CRIU kills the container
   * and runc destroys it (it disappears from `runc list`). On failure the container keeps running.
   */
  async checkpoint(id: string, opts: CheckpointOptions): Promise<void> {
    await mkdir(opts.workPath, { recursive: true, mode: 0o700 });
    await this.#run({
      verb: 'checkpoint',
      id,
      argv: checkpointArgs(safeId(id), opts),
      call: opts,
      criu: { workDir: opts.workPath, action: 'dump' },
    });
  }

  /**
   * Restores `imagePath` as container `id` (which must not exist) from `bundle`, detached: the app
   * runs when this resolves. The image's external pipes are re-attached to `opts.stdio`.
   */
  async restore(id: string, opts: RestoreOptions): Promise<void> {
    await mkdir(opts.workPath, { recursive: true, mode: 0o700 });
    await this.#run({
      verb: 'restore',
      id,
      argv: restoreArgs(safeId(id), opts),
      call: opts,
      stdio: opts.stdio,
      criu: { workDir: opts.workPath, action: 'restore' },
    });
  }

  /**
   * Removes what a `runc restore` killed mid-way leaves under runc's root: the container's state
   * dir without a state.json, holding `criu-root` (runc bind-mounts the rootfs there for CRIU and
   * unmounts it only when it returns). runc does not list such a container and refuses the id
   * ('container with given ID already exists'); worse, `runc delete` of it removes the dir with
   * RemoveAll, through the still-mounted rootfs: it deletes the container's rootfs (measured with
   * runc 1.1.5). So call this before `delete` whenever a restore may have been cut off. Does
   * nothing when runc has a complete state (state.json) or no dir at all. Only call it when no
   * `runc restore` for this id is running (its state.json is written last).
   */
  async removeInterruptedRestore(id: string): Promise<boolean> {
    const dir = join(this.#g.root, safeId(id));
    if (!(await pathExists(dir)) || (await pathExists(join(dir, 'state.json')))) return false;
    // criu-root is the rootfs itself (a recursive bind): never delete through it.
    const mounts = await unmountAllUnder(dir);
    await rm(dir, { recursive: true, force: true });
    this.#log.debug({ id, dir, mounts }, 'removed the state of an interrupted runc restore');
    return true;
  }

  /** `runc --version`, parsed (probed once per instance). */
  version(call: RuncCallOptions = {}): Promise<RuncVersion> {
    if (this.#version === undefined) {
      const p = this.#run({ verb: 'version', argv: versionArgs(), call, global: false }).then((out) =>
        parseRuncVersion(out.stdout),
      );
      this.#version = p;
      p.catch(() => {
        if (this.#version === p) this.#version = undefined;
      });
    }
    return this.#version;
  }

  /** The one place that execs runc. */
  async #run(req: RunRequest): Promise<RunOutput> {
    const { verb, call } = req;
    const path = this.#g.path;
    const timeout = call.timeoutMs ?? this.#timeouts[verb];
    const logFile = req.global === false ? null : await this.#newLogFile(verb);
    try {
      const argv = [...(req.global === false ? [] : globalArgs(this.#g, logFile)), ...req.argv];
      const fullArgv = [path, ...argv];
      if (call.signal?.aborted) {
        const fields = { argv: fullArgv, exitCode: undefined, logLine: '' };
        throw new RuncError('Canceled', `runc ${verb} canceled`, fields, { cause: call.signal.reason });
      }
      const stdio = req.stdio;
      const t0 = performance.now();
      const result = await execa(path, argv, {
        reject: false,
        timeout,
        cancelSignal: call.signal,
        forceKillAfterDelay: 2_000,
        ...(req.input === undefined ? { stdin: execaFd(stdio?.[0] ?? 'ignore') } : { input: req.input }),
        stdout: execaFd(stdio?.[1] ?? 'pipe'),
        stderr: execaFd(stdio?.[2] ?? 'pipe'),
        encoding: 'utf8',
        stripFinalNewline: false,
        maxBuffer: 16 * 1024 * 1024,
      });
      const durationMs = Math.round((performance.now() - t0) * 10) / 10;
      const stdout = typeof result.stdout === 'string' ? result.stdout : '';
      const stderr = typeof result.stderr === 'string' ? result.stderr : '';
      this.#log.debug({ id: req.id, argv: fullArgv, exitCode: result.exitCode, durationMs }, 'runc');
      if (!result.failed) return { stdout, stderr };

      const logText = logFile === null ? '' : await readFile(logFile, 'utf8').catch(() => '');
      const runcLine = lastRuncErrorLine(logText, stderr);
      const criuLine = req.criu === undefined ? '' : await readCriuError(req.criu.workDir, req.criu.action);
      const logLine = criuLine === '' ? runcLine : `${runcLine || `runc ${verb} failed`}; criu: ${criuLine}`;
      const fields = { argv: fullArgv, exitCode: result.exitCode, logLine };
      const cause = 'cause' in result && result.cause !== undefined ? result.cause : result;
      let code: ErrorCode;
      let detail: string;
      if (result.isCanceled) {
        code = 'Canceled';
        detail = 'canceled';
      } else if (result.timedOut) {
        code = 'DeadlineExceeded';
        detail = `timed out after ${timeout} ms`;
      } else if (result.exitCode === undefined && result.signal === undefined) {
        // Never ran: no binary, not executable, or bad fds.
        code = 'Unavailable';
        detail = `cannot run ${path}: ${result.shortMessage}`;
      } else if (result.exitCode === undefined) {
        code = 'Unknown';
        detail = `killed by ${result.signal}${logLine ? `: ${logLine}` : ''}`;
      } else {
        code = translateRuncError(logLine);
        detail = logLine || `exit status ${result.exitCode}`;
      }
      const err = new RuncError(code, `runc ${verb} failed: ${detail}`, fields, { cause });
      this.#log.debug({ id: req.id, err }, 'runc failed');
      throw err;
    } finally {
      if (logFile !== null) await unlink(logFile).catch(() => undefined);
    }
  }

  /** A private, empty log file: created here (O_EXCL, 0600) so runc only ever appends to ours. */
  async #newLogFile(verb: RuncVerb): Promise<string> {
    await mkdir(this.#scratchDir, { recursive: true, mode: 0o700 });
    const file = join(this.#scratchDir, `thaw-runc-${verb}-${randomUUID()}.log`);
    const handle = await open(file, 'wx', 0o600);
    await handle.close();
    return file;
  }
}

/**
 * runc's JSON log holds one record per line (`{"level":"error","msg":"…","time":"…"}`); the line to
 * quote is the last error record's message (newlines folded), else the last stderr line.
 */
export function lastRuncErrorLine(logText: string, stderr = ''): string {
  let last = '';
  for (const line of logText.split('\n')) {
    if (line.trim() === '') continue;
    let value: unknown;
    try {
      value = JSON.parse(line);
    } catch {
      continue;
    }
    if (!isRecord(value) || typeof value.msg !== 'string') continue;
    if (value.level === 'error' || value.level === 'fatal') last = value.msg;
  }
  if (last !== '') return foldLines(last);
  return lastNonEmptyLine(stderr).replace(/^time="[^"]*" level=\w+ msg="(.*)"$/, '$1');
}

/**
 * Known runc and CRIU texts → thaw error classes. Unknown texts are `Unknown`; timeouts and aborts
 * are classified by the caller, not by text.
 */
const TRANSLATIONS: readonly (readonly [RegExp, ErrorCode])[] = [
  [/\bcontainer with id exists\b|\balready exists\b/i, 'AlreadyExists'],
  [/\bcontainer does not exist\b|\bno such container\b/i, 'NotFound'],
  // CRIU cannot give a restored process its recorded pid: the original (or its zombie) still holds it.
  [/Can't fork for \d+: File exists/, 'FailedPrecondition'],
  [/\bnot running\b|\bnot stopped\b|\bis not paused\b|\bis paused\b|\bthat has stopped\b|\balready running\b|\bstill running\b/i, 'FailedPrecondition'],
];

export function translateRuncError(line: string): ErrorCode {
  for (const [pattern, code] of TRANSLATIONS) {
    if (pattern.test(line)) return code;
  }
  return 'Unknown';
}

/** `runc version 1.1.5+ds1\ncommit: …\nspec: 1.0.2-dev\n…` */
export function parseRuncVersion(text: string): RuncVersion {
  const version = /^runc version (\S+)/m.exec(text)?.[1];
  if (version === undefined) throw badOutput('version', text);
  return {
    version,
    commit: /^commit: (\S+)/m.exec(text)?.[1] ?? '',
    spec: /^spec: (\S+)/m.exec(text)?.[1] ?? '',
  };
}

/**
 * execa's types list only the literal fds 3-9, but any open fd is handed to spawn as it is (a single
 * number is a "native" stdio value: no pipe, nothing to drain).
 */
function execaFd(slot: number | 'ignore' | 'pipe'): 'ignore' | 'pipe' | 3 {
  return slot as 'ignore' | 'pipe' | 3;
}

function safeId(id: string): string {
  if (!SAFE_RUNTIME_ID.test(id)) {
    throw new ShimError('InvalidArgument', `unsafe runc container id ${JSON.stringify(id)}`);
  }
  return id;
}

const STATUSES: ReadonlySet<string> = new Set<RuncStatus>(['creating', 'created', 'running', 'paused', 'stopped']);

function parseState(value: unknown, verb: RuncVerb): RuncState {
  if (
    !isRecord(value) ||
    typeof value.id !== 'string' ||
    typeof value.status !== 'string' ||
    !STATUSES.has(value.status) ||
    typeof value.pid !== 'number'
  ) {
    throw badOutput(verb, JSON.stringify(value));
  }
  return {
    ociVersion: typeof value.ociVersion === 'string' ? value.ociVersion : '',
    id: value.id,
    pid: value.pid,
    status: value.status as RuncStatus,
    bundle: typeof value.bundle === 'string' ? value.bundle : '',
    rootfs: typeof value.rootfs === 'string' ? value.rootfs : '',
    created: typeof value.created === 'string' ? value.created : '',
    ...(isRecord(value.annotations) ? { annotations: value.annotations as Record<string, string> } : {}),
  };
}

function parseJson(text: string, verb: RuncVerb): unknown {
  try {
    return JSON.parse(text);
  } catch (cause) {
    throw badOutput(verb, text, cause);
  }
}

function badOutput(verb: RuncVerb, text: string, cause?: unknown): ShimError {
  return new ShimError('Internal', `runc ${verb}: unexpected output ${JSON.stringify(text.slice(0, 200))}`, { cause });
}

async function readPidFile(file: string, verb: RuncVerb): Promise<number> {
  const text = (await readFile(file, 'utf8').catch(() => '')).trim();
  const pid = Number(text);
  if (text === '' || !Number.isSafeInteger(pid) || pid <= 0) {
    throw new ShimError('Internal', `runc ${verb}: no pid in ${file}`);
  }
  return pid;
}

async function pathExists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch {
    return false;
  }
}

function lastNonEmptyLine(text: string): string {
  const lines = text.split('\n');
  for (let i = lines.length - 1; i >= 0; i--) {
    const line = lines[i]!.trim();
    if (line !== '') return line;
  }
  return '';
}

function foldLines(text: string): string {
  return text
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '')
    .join('; ');
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}
