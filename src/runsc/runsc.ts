/**
 * `Runsc`: the gVisor runsc CLI, one method per verb, knowing nothing of containerd.
 *
 * - Every call goes through one private exec (`#run`, over command.ts): global flags first (runsc
 *   parses top-level flags only before the verb), a timeout and the caller's AbortSignal (the child
 *   is killed on abort, and if thaw exits), and a fresh per-call `--log` file. runsc appends its
 *   error records there as JSON, so a failure quotes runsc's own last error line (falling back to
 *   stderr) in a `RunscError` whose code comes from known texts (log.ts).
 * - `create`, `restore` and `exec` hand their stdio to the sandbox, which keeps those fds for the
 *   container's life: they get the caller's fds, never pipes, or awaiting the call would hang until
 *   the container exits. Their error text therefore comes only from the `--log` file. (runsc also
 *   hands that log file to the sandbox; its later errors land in the unlinked file: set
 *   `debugLogDir` to keep a sandbox's own logs.)
 * - Ids must be runtime ids. runsc matches ids by prefix (`id "a" is ambiguous` once `a` and `ab`
 *   exist, while creating `a` still succeeds and leaks), so the layer above passes fixed-length hashes
 *   (`runtimeIdFor` in engine/container-id.ts), which can never be prefixes of each other. This class
 *   only refuses ids runsc could misparse (a leading `-`, odd characters) with InvalidArgument, and
 *   refuses to `create` an id that already has state (a failed duplicate create orphans a sandbox).
 * - `capabilities()` / `version()` use probe.ts: `runsc --version`, `runsc help checkpoint`, `runsc
 *   help restore` and `runsc flags`, parsed once per binary path (and kept in `probeCacheDir` for
 *   later processes), because checkpoint flags and their defaults differ between 20240729 and
 *   upstream; `bestCheckpointFlags`/`bestRestoreFlags` choose.
 */
import { randomUUID } from 'node:crypto';
import { mkdtemp, open, readdir, readFile, rm, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { RunscError, ShimError, type ErrorCode } from '../errors.js';
import { silentLogger, type Logger } from '../log/logger.js';
import { runCommand } from './command.js';
import { lastErrorLine, translateRunscError } from './log.js';
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
  waitArgs,
  type CheckpointOptions,
  type CreateOptions,
  type DeleteOptions,
  type ExecOptions,
  type KillOptions,
  type RestoreOptions,
  type RunscCallOptions,
  type RunscGlobalOptions,
  type RunscPlatform,
  type RunscStdio,
  type WaitOptions,
} from './options.js';
import { probeRunsc, type RunscCapabilities } from './probe.js';
import type { OrphanAdopter } from './reaper.js';

export type RunscVerb =
  | 'create'
  | 'start'
  | 'state'
  | 'list'
  | 'wait'
  | 'kill'
  | 'delete'
  | 'ps'
  | 'exec'
  | 'pause'
  | 'resume'
  | 'checkpoint'
  | 'restore'
  | 'events'
  | 'probe';

/** Default per-verb timeouts (ms; 0 = none). `wait` lasts as long as the container. */
export const DEFAULT_RUNSC_TIMEOUTS_MS: Readonly<Record<RunscVerb, number>> = Object.freeze({
  create: 60_000,
  start: 30_000,
  state: 30_000,
  list: 30_000,
  wait: 0,
  kill: 30_000,
  delete: 60_000,
  ps: 30_000,
  exec: 60_000,
  pause: 30_000,
  resume: 30_000,
  // Large images (GPU memory included) take minutes at ~1-2 GB/s.
  checkpoint: 600_000,
  restore: 600_000,
  events: 30_000,
  probe: 15_000,
});

export interface RunscOptions extends RunscGlobalOptions {
  readonly logger?: Logger;
  readonly timeoutsMs?: Readonly<Partial<Record<RunscVerb, number>>>;
  /** Where per-call log files and exec's pid files live briefly (default: the OS temp dir). */
  readonly scratchDir?: string;
  /**
   * Runs the verbs that leave processes behind (`create`, `restore`, `exec`) so that those become
   * this process's children, whose exits it reads by reaping them (reaper.ts). Absent: they are
   * reparented to init and exits come from `wait` only.
   */
  readonly adopter?: OrphanAdopter;
  /** Keeps `capabilities()` probes across processes (per binary identity); absent = per process only. */
  readonly probeCacheDir?: string;
}

export type RunscStatus = 'creating' | 'created' | 'running' | 'paused' | 'stopped';

/** `runsc state` / `runsc list --format=json` record. */
export interface RunscState {
  ociVersion: string;
  id: string;
  status: RunscStatus;
  /** Host pid of the sandbox (-1 once stopped). */
  pid: number;
  bundle: string;
  annotations?: Record<string, string>;
  created?: string;
  owner?: string;
}

/** `runsc events --stats` data (cgroup-style counters; absent fields were not reported). */
export interface RunscStats {
  cpu?: { usage?: { total?: number; kernel?: number; user?: number; percpu?: number[] } };
  memory?: {
    cache?: number;
    usage?: RunscMemoryEntry;
    swap?: RunscMemoryEntry;
    kernel?: RunscMemoryEntry;
    kernelTCP?: RunscMemoryEntry;
    raw?: Record<string, number>;
  };
  pids?: { current?: number; limit?: number };
  network_interfaces?: {
    Name: string;
    RxBytes: number;
    RxPackets: number;
    TxBytes: number;
    TxPackets: number;
  }[];
}

export interface RunscMemoryEntry {
  limit?: number;
  usage?: number;
  max?: number;
  failcnt?: number;
}

export interface RunscExecResult {
  /** Host pid of runsc's waiter process; it exits with the exec'd process's status. */
  pid: number;
  /** The process's pid inside the sandbox (for `wait({pid})`, `kill({pid})`). */
  internalPid: number;
}

/** Characters runsc accepts in ids; a leading `-` would be parsed as a flag. */
const SAFE_RUNTIME_ID = /^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$/;

interface RunRequest {
  verb: RunscVerb;
  /** Verb and its arguments (global flags are added here). */
  argv: readonly string[];
  call: RunscCallOptions;
  id?: string;
  /** fds handed to runsc (and on to the sandbox); absent = stdin ignored, stdout/stderr captured. */
  stdio?: RunscStdio;
  /** false for probe commands, which take no global flags and write no log file. */
  global?: boolean;
}

interface RunOutput {
  stdout: string;
  stderr: string;
}

export class Runsc {
  readonly #g: RunscGlobalOptions;
  readonly #log: Logger;
  readonly #timeouts: Readonly<Record<RunscVerb, number>>;
  readonly #scratchDir: string;
  readonly #adopter: OrphanAdopter | undefined;
  readonly #probeCacheDir: string | undefined;

  constructor(options: RunscOptions) {
    const { logger, timeoutsMs, scratchDir, adopter, probeCacheDir, ...global } = options;
    globalArgs(global, null); // refuses bad pass-through flags now rather than on the first call
    this.#g = global;
    this.#log = logger ?? silentLogger;
    this.#timeouts = { ...DEFAULT_RUNSC_TIMEOUTS_MS, ...timeoutsMs };
    this.#scratchDir = scratchDir ?? tmpdir();
    this.#adopter = adopter;
    this.#probeCacheDir = probeCacheDir;
  }

  get root(): string {
    return this.#g.root;
  }

  get platform(): RunscPlatform {
    return this.#g.platform;
  }

  /**
   * `runsc <global flags> exec <id>` for a tool that must run inside the sandbox in the foreground
   * and report its own exit status and output (thaw-cuda on the sandbox's pids); the caller appends
   * the tool's argv and runs it. Flags are built here, like every other runsc command's.
   */
  execPrefix(id: string): string[] {
    return [this.#g.path, ...globalArgs(this.#g, null), 'exec', safeId(id)];
  }

  /**
   * Creates the sandbox and container; the app waits for `start` (or `restore`). An id that already
   * has a state file under the root is refused here (AlreadyExists) without calling runsc: a failing
   * duplicate `runsc create` deletes the existing container's state files and orphans its sandbox
   * (seen with 20240729; upstream's create has the same clean-up path).
   */
  /** With `pidFile`, returns the sandbox's pid from it (what `runsc state` reports, without a runsc call). */
  async create(id: string, opts: CreateOptions): Promise<number | undefined> {
    if (await this.#hasStateFile(safeId(id))) {
      throw new ShimError('AlreadyExists', `runsc container ${id} already exists under ${this.#g.root}`);
    }
    await this.#adopting(() => this.#run({ verb: 'create', id, argv: createArgs(safeId(id), opts), call: opts, stdio: opts.stdio }));
    return opts.pidFile === undefined ? undefined : readPidFile(opts.pidFile, 'create');
  }

  async start(id: string, call: RunscCallOptions = {}): Promise<void> {
    await this.#run({ verb: 'start', id, argv: startArgs(safeId(id)), call });
  }

  async state(id: string, call: RunscCallOptions = {}): Promise<RunscState> {
    const out = await this.#run({ verb: 'state', id, argv: stateArgs(safeId(id)), call });
    return parseState(parseJson(out.stdout, 'state'), 'state');
  }

  /** Every container under this root. */
  async list(call: RunscCallOptions = {}): Promise<RunscState[]> {
    const out = await this.#run({ verb: 'list', argv: listArgs(), call });
    const value = parseJson(out.stdout, 'list');
    if (value === null) return [];
    if (!Array.isArray(value)) throw badOutput('list', out.stdout);
    return value.map((v) => parseState(v, 'list'));
  }

  /**
   * Waits for the container's init process (or `pid`) to exit and returns its exit status as
   * containerd expects it: the exit code, or 128 + signal number. runsc already decodes the wait
   * status into that form (`exitStatus` in its JSON). Call it before the exit: once a sandbox is
   * gone runsc fails with "sandbox no longer running and its exit status is unavailable".
   */
  async wait(id: string, opts: WaitOptions = {}): Promise<number> {
    const out = await this.#run({ verb: 'wait', id, argv: waitArgs(safeId(id), opts), call: opts });
    const value = parseJson(out.stdout, 'wait');
    const exitStatus = isRecord(value) ? value.exitStatus : undefined;
    if (typeof exitStatus !== 'number' || !Number.isInteger(exitStatus)) throw badOutput('wait', out.stdout);
    return exitStatus;
  }

  async kill(id: string, signal: number | NodeJS.Signals, opts: KillOptions = {}): Promise<void> {
    await this.#run({ verb: 'kill', id, argv: killArgs(safeId(id), signal, opts), call: opts });
  }

  async delete(id: string, opts: DeleteOptions = {}): Promise<void> {
    await this.#run({ verb: 'delete', id, argv: deleteArgs(safeId(id), opts), call: opts });
  }

  /** Pids of the container's processes, as the sandbox numbers them. */
  async ps(id: string, call: RunscCallOptions = {}): Promise<number[]> {
    const out = await this.#run({ verb: 'ps', id, argv: psArgs(safeId(id)), call });
    const value = parseJson(out.stdout, 'ps');
    if (value === null) return [];
    if (!Array.isArray(value) || !value.every((p) => Number.isInteger(p))) throw badOutput('ps', out.stdout);
    return value as number[];
  }

  /** Starts a process in the container (detached) and returns once it runs. */
  async exec(id: string, opts: ExecOptions): Promise<RunscExecResult> {
    safeId(id);
    const dir = await mkdtemp(join(this.#scratchDir, 'thaw-runsc-exec-'));
    try {
      const files = {
        pidFile: join(dir, 'pid'),
        internalPidFile: join(dir, 'internal.pid'),
        ...(opts.process !== undefined ? { processFile: join(dir, 'process.json') } : {}),
      };
      if (files.processFile !== undefined) {
        await writeFile(files.processFile, JSON.stringify(opts.process), { mode: 0o600 });
      }
      const argv = execArgs(id, opts, files);
      await this.#adopting(() => this.#run({ verb: 'exec', id, argv, call: opts, stdio: opts.stdio }));
      return {
        pid: await readPidFile(files.pidFile, 'exec'),
        internalPid: await readPidFile(files.internalPidFile, 'exec'),
      };
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }

  async pause(id: string, call: RunscCallOptions = {}): Promise<void> {
    await this.#run({ verb: 'pause', id, argv: pauseArgs(safeId(id)), call });
  }

  async resume(id: string, call: RunscCallOptions = {}): Promise<void> {
    await this.#run({ verb: 'resume', id, argv: resumeArgs(safeId(id)), call });
  }

  /**
   * Writes the image into `imagePath`. Without `leaveRunning` the container stops asynchronously
   * (runsc reports `running` for about a second after this returns).
   */
  async checkpoint(id: string, opts: CheckpointOptions): Promise<void> {
    await this.#run({ verb: 'checkpoint', id, argv: checkpointArgs(safeId(id), opts), call: opts });
  }

  /**
   * Restores `imagePath` into `id` (detached). After `create(id)` the app keeps `create`'s stdio and
   * the sandbox keeps `create`'s platform; without a prior create, runsc creates `id` from the bundle
   * and `opts.stdio` becomes the container's stdio.
   */
  async restore(id: string, opts: RestoreOptions): Promise<void> {
    // After a prior create nothing new is forked; without one, restore makes the sandbox itself.
    await this.#adopting(() => this.#run({ verb: 'restore', id, argv: restoreArgs(safeId(id), opts), call: opts, stdio: opts.stdio }));
  }

  /** One sample of resource usage (`runsc events --stats`). */
  async events(id: string, call: RunscCallOptions = {}): Promise<RunscStats> {
    const out = await this.#run({ verb: 'events', id, argv: eventsArgs(safeId(id)), call });
    const value = parseJson(lastNonEmpty(out.stdout), 'events');
    if (!isRecord(value) || !isRecord(value.data)) throw badOutput('events', out.stdout);
    return value.data as RunscStats;
  }

  /** The installed runsc's version string (probed once per binary path). */
  async version(call: RunscCallOptions = {}): Promise<string> {
    return (await this.capabilities(call)).version;
  }

  /**
   * What the installed runsc supports (probed once per binary path). The probe is shared, so it runs
   * under its own timeout only; a caller's abort rejects that caller's promise, not the probe.
   */
  capabilities(call: RunscCallOptions = {}): Promise<RunscCapabilities> {
    const probe = probeRunsc(this.#g.path, async (args) => {
      const timeoutMs = call.timeoutMs ?? this.#timeouts.probe;
      const out = await this.#run({ verb: 'probe', argv: args, call: { timeoutMs }, global: false });
      return out.stdout + out.stderr;
    }, this.#probeCacheDir);
    return call.signal === undefined ? probe : untilAborted(probe, call.signal, 'probe');
  }

  /** The one place that execs runsc. */
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
        throw new RunscError('Canceled', `runsc ${verb} canceled`, fields, { cause: call.signal.reason });
      }
      const stdio = req.stdio;
      const t0 = performance.now();
      const result = await runCommand(path, argv, {
        stdio: [stdio?.[0] ?? 'ignore', stdio?.[1] ?? 'pipe', stdio?.[2] ?? 'pipe'],
        timeoutMs: timeout,
        signal: call.signal,
        forceKillAfterMs: 2_000,
        maxBufferBytes: 16 * 1024 * 1024,
      });
      const durationMs = Math.round((performance.now() - t0) * 10) / 10;
      const { stdout, stderr } = result;
      this.#log.debug({ id: req.id, argv: fullArgv, exitCode: result.exitCode, durationMs }, 'runsc');
      if (result.ok) return { stdout, stderr };

      const logText = logFile === null ? '' : await readFile(logFile, 'utf8').catch(() => '');
      const logLine = lastErrorLine(logText, stderr);
      const fields = { argv: fullArgv, exitCode: result.exitCode, logLine };
      const cause = result.spawnError;
      let code: ErrorCode;
      let detail: string;
      if (result.canceled) {
        code = 'Canceled';
        detail = 'canceled';
      } else if (result.timedOut) {
        code = 'DeadlineExceeded';
        detail = `timed out after ${timeout} ms`;
      } else if (result.spawnError !== undefined) {
        // Never ran: no binary, not executable, or bad fds.
        code = 'Unavailable';
        detail = `cannot run ${path}: ${result.spawnError.message}`;
      } else if (result.overflow) {
        code = 'Internal';
        detail = 'output larger than 16 MiB';
      } else if (result.exitCode === undefined) {
        code = 'Unknown';
        detail = `killed by ${result.signal}${logLine ? `: ${logLine}` : ''}`;
      } else {
        code = translateRunscError(logLine);
        detail = logLine || `exit status ${result.exitCode}`;
      }
      const err = new RunscError(code, `runsc ${verb} failed: ${detail}`, fields, { cause });
      this.#log.debug({ id: req.id, err }, 'runsc failed');
      throw err;
    } finally {
      if (logFile !== null) await unlink(logFile).catch(() => undefined);
    }
  }

  /**
   * Whether `id` is its sandbox's root container (the one whose `create` started the sandbox, so
   * the sandbox process exits with its app's status), from runsc's state file name
   * `<id>_sandbox:<sandbox id>.state`. False for a container that joined another's sandbox, and
   * when there is no state.
   */
  async isSandboxRoot(id: string): Promise<boolean> {
    const names = await readdir(this.#g.root).catch(() => [] as string[]);
    return names.includes(`${safeId(id)}_sandbox:${id}.state`);
  }

  #adopting<T>(fn: () => Promise<T>): Promise<T> {
    return this.#adopter === undefined ? fn() : this.#adopter.adopting(fn);
  }

  /** runsc keeps `<id>_sandbox:<sandbox id>.state` per container under its root. */
  async #hasStateFile(id: string): Promise<boolean> {
    const names = await readdir(this.#g.root).catch(() => [] as string[]);
    return names.some((n) => n.startsWith(`${id}_sandbox:`) && n.endsWith('.state'));
  }

  /** A private, empty log file: created here (O_EXCL, 0600) so runsc only ever appends to ours. */
  async #newLogFile(verb: RunscVerb): Promise<string> {
    const file = join(this.#scratchDir, `thaw-runsc-${verb}-${randomUUID()}.log`);
    const handle = await open(file, 'wx', 0o600);
    await handle.close();
    return file;
  }
}

function untilAborted<T>(work: Promise<T>, signal: AbortSignal, what: string): Promise<T> {
  const canceled = () => new ShimError('Canceled', `runsc ${what} canceled`, { cause: signal.reason });
  if (signal.aborted) return Promise.reject(canceled());
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(canceled());
    signal.addEventListener('abort', onAbort, { once: true });
    work.then(resolve, reject).finally(() => signal.removeEventListener('abort', onAbort));
  });
}

function safeId(id: string): string {
  if (!SAFE_RUNTIME_ID.test(id)) {
    throw new ShimError('InvalidArgument', `unsafe runsc container id ${JSON.stringify(id)}`);
  }
  return id;
}

const STATUSES: ReadonlySet<string> = new Set<RunscStatus>(['creating', 'created', 'running', 'paused', 'stopped']);

function parseState(value: unknown, verb: RunscVerb): RunscState {
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
    status: value.status as RunscStatus,
    pid: value.pid,
    bundle: typeof value.bundle === 'string' ? value.bundle : '',
    ...(isRecord(value.annotations) ? { annotations: value.annotations as Record<string, string> } : {}),
    ...(typeof value.created === 'string' ? { created: value.created } : {}),
    ...(typeof value.owner === 'string' ? { owner: value.owner } : {}),
  };
}

function parseJson(text: string, verb: RunscVerb): unknown {
  try {
    return JSON.parse(text);
  } catch (cause) {
    throw badOutput(verb, text, cause);
  }
}

function badOutput(verb: RunscVerb, text: string, cause?: unknown): ShimError {
  return new ShimError('Internal', `runsc ${verb}: unexpected output ${JSON.stringify(text.slice(0, 200))}`, { cause });
}

async function readPidFile(file: string, verb: RunscVerb): Promise<number> {
  const text = (await readFile(file, 'utf8').catch(() => '')).trim();
  const pid = Number(text);
  if (text === '' || !Number.isSafeInteger(pid) || pid <= 0) {
    throw new ShimError('Internal', `runsc ${verb}: no pid in ${file}`);
  }
  return pid;
}

function lastNonEmpty(text: string): string {
  const lines = text.split('\n').filter((l) => l.trim() !== '');
  return lines.at(-1) ?? '';
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}
