import { execFile, spawn } from 'node:child_process';
import { constants as fsConstants, readdirSync, realpathSync, statSync } from 'node:fs';
import { mkdir, open, readdir, readFile, rename, rm, writeFile, type FileHandle } from 'node:fs/promises';
import { setPriority } from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { parseShimArgs, type ShimFlags } from '../cli/shim-flags.js';
import { isShimError, ShimError } from '../errors.js';
import { loadConfig } from '../config/config.js';
import { silentLogger, type Logger, type SwitchableDestination } from '../log/logger.js';
import { childrenOfThisProcess, openFdCount, pidExists as isAlive } from '../procfs.js';
import type { StartPlan } from './manager.js';
import type { ShimServer, SpareMoment } from './serve.js';

/**
 * Spare shim servers. containerd runs `start` for every container and waits for the server it
 * launches; with two Node boots on that path (`start`, `serve`) thaw's shim took ~2.5× the time of
 * containerd's runc shim for a short container (docs/bench/shim-overhead.md). A spare is a `serve`
 * process booted ahead of time — Node, the bundle and the Task service loaded — that the next
 * `start` hands its container to; bin/containerd-shim-thaw-v2 (sh) does the hand-over, so that
 * container pays neither boot. The spare then does what `start` and `serve` would have done, in
 * this process.
 *
 * Registry: SPARE_ROOT/<real path of bin/>/ — every install (and every test build) has its own
 * spares, and a spare only ever serves the code it booted:
 *   spare.<pid>-<n>/  a spare waiting (n: its n-th registration), with `reply`, a FIFO
 *   claim.<pid>-<n>/  the same directory after a `start` renamed it (the claim; one rename wins)
 *   booting           the pid of the spare being booted (at most one boots at a time)
 * Hand-over: `start` writes argv (NUL-separated), cwd, env (`env -0`) and stdin into the claimed
 * directory, then opens `reply` for reading. That open is what wakes the spare, which has been
 * blocked opening it for writing. The spare writes `status` (ok | error | declined), then the
 * bytes `start` must print on the FIFO, and closes it. On `declined` (or no answer), `start` runs
 * the TypeScript `start` as before.
 */
export const SPARE_ROOT = '/run/thaw/spares';

export type SpareStatus = 'ok' | 'error' | 'declined';

/** What `start` handed over: its argv (flags and verb), working directory, environment and stdin. */
export interface SpareRequest {
  readonly argv: string[];
  readonly cwd: string;
  readonly env: Record<string, string>;
  readonly stdin: Uint8Array;
}

export interface SpareClaim {
  readonly request: SpareRequest;
  /** Tells the waiting `start` how it went and what to print; once per claim. */
  answer(status: SpareStatus, output: Uint8Array | string): Promise<void>;
}

/** Files of a spare's directory (the sh launcher uses the same names). */
const FILES = { reply: 'reply', status: 'status', argv: 'argv', cwd: 'cwd', env: 'env', stdin: 'stdin' } as const;
const BOOTING = 'booting';

/** The real directory of bin/ for a shim script (process.argv[1] of a shim process). */
export function binDirOf(script: string): string {
  return realpathSync(path.dirname(script));
}

/**
 * The registry of the spares of one install: SPARE_ROOT followed by the real path of its bin/
 * (bin/containerd-shim-thaw-v2 builds the same path, without a process to hash it).
 */
export function spareRegistry(binDir: string, root = SPARE_ROOT): string {
  return path.join(root, binDir);
}

/**
 * The code a spare booted, as bin/launch.mjs chooses it (the bundle or tsc's output, by mtime): a
 * spare whose code was rebuilt (or removed) since it booted declines and exits instead of serving
 * old code.
 */
export class CodeStamp {
  readonly #binDir: string;
  readonly #booted: string;

  constructor(binDir: string) {
    this.#binDir = binDir;
    this.#booted = this.#now();
  }

  unchanged(): boolean {
    return this.#now() === this.#booted;
  }

  #now(): string {
    const mtime = (rel: string): number => statSync(path.join(this.#binDir, rel), { throwIfNoEntry: false })?.mtimeMs ?? -1;
    return `${mtime('../dist/bundle/shim.js')}:${mtime('../dist/src/cli/shim.js')}`;
  }
}

/** How often a waiting spare checks whether it is still needed (its code unchanged, not surplus). */
const UNNEEDED_CHECK_MS = 5_000;

/**
 * While a spare waits: every `intervalMs` asks `whyUnneeded`; once it names a reason, retires the
 * spare and calls `gone` (a claim that came first wins: retire() then finds the spare claimed, and
 * the wait returns that claim). Returns the function that stops the watch.
 */
export function retireWhenUnneeded(
  slot: SpareSlot,
  whyUnneeded: () => Promise<string | undefined>,
  gone: (why: string) => void,
  intervalMs = UNNEEDED_CHECK_MS,
): () => void {
  let checking = false;
  let stopped = false;
  const timer = setInterval(() => {
    if (checking) return;
    checking = true;
    void whyUnneeded()
      .catch(() => undefined)
      .then(async (why) => {
        if (why === undefined || stopped) return; // stopped: claimed meanwhile, the slot is no longer this watch's
        clearInterval(timer);
        const retired = await slot.retire().catch(() => true);
        if (retired) gone(why);
      })
      .finally(() => (checking = false));
  }, intervalMs);
  timer.unref();
  return () => {
    stopped = true;
    clearInterval(timer);
  };
}

/**
 * Why a waiting spare should leave: its code was rebuilt or removed (a test build), or it is
 * surplus — spares are no longer in demand and another one waits. Of two waiting spares the one
 * with the higher pid leaves, so that they never both do.
 */
export async function whySpareUnneeded(o: { code: CodeStamp; registry: string; pid?: number; now?: number }): Promise<string | undefined> {
  if (!o.code.unchanged()) return 'the installed code changed';
  if (sparesInDemand(o.registry, DEMAND_WINDOW_MS, o.now)) return undefined;
  const self = o.pid ?? process.pid;
  const others = (await liveSpares(o.registry)).filter((pid) => pid !== self);
  return others.some((pid) => pid < self) ? 'another spare waits and none are in demand' : undefined;
}

/**
 * How long after a container's Start (or Delete) was answered the next spare boots, if none waits
 * by then. Not at once: a server whose container ended meanwhile becomes that spare itself
 * (RecyclePolicy), and a boot overlapping the next container's Create slows its `runsc create`.
 */
export const SPARE_BOOT_DELAY_MS = 1000;

/**
 * The sh launcher's `start` touches this file in the registry when it found no spare waiting (it
 * waited for one still booting, or started Node): containers are starting faster than spares come.
 */
const MISSED = 'missed';

/** For this long after a miss, spares boot as early as they can (SpareRequests). */
export const DEMAND_WINDOW_MS = 10_000;

/**
 * How many spares may wait while they are in demand: a server whose container ended waits beside
 * the spare it (or another server) booted meanwhile, instead of exiting — otherwise, after a
 * miss, every container's server boots the next spare during its Create and then exits, and no
 * container is ever served by a recycled server until the demand ends (1.30× the runc shim in
 * the first bench after a rebuild, docs/bench/shim-overhead.md). Outside demand one is enough;
 * the surplus one leaves (whySpareUnneeded).
 */
export const MAX_SPARES_IN_DEMAND = 2;

/** Whether a `start` of this registry found no spare waiting within the last `windowMs`. */
export function sparesInDemand(registry: string, windowMs = DEMAND_WINDOW_MS, now = Date.now()): boolean {
  const missed = statSync(path.join(registry, MISSED), { throwIfNoEntry: false });
  return missed !== undefined && missed.mtimeMs >= now - windowMs;
}

/**
 * A server's requests for the next container's spare. While `start`s find spares waiting, one
 * boots `delayMs` after a Start or Delete was answered, and not at all if this server becomes that
 * spare itself first (its container ended: RecyclePolicy, cancel) — sequential containers then
 * need no boot, and none slows a Create. While spares are in demand (a recent miss: containers
 * starting back to back while earlier ones keep running), one boots as soon as the Task service
 * has loaded, so that it is ready for the next `start`. A server about to exit boots a pending
 * one at once (settle).
 */
export class SpareRequests {
  readonly #boot: () => Promise<number | undefined>;
  readonly #booted = new Set<number>();
  readonly #inDemand: () => boolean;
  readonly #delayMs: number;
  #timer: NodeJS.Timeout | undefined;
  #booting: Promise<void> | undefined;

  /** `boot` returns the pid of the spare it started, if it started one. */
  constructor(boot: () => Promise<number | undefined>, inDemand: () => boolean, delayMs = SPARE_BOOT_DELAY_MS) {
    this.#boot = boot;
    this.#inDemand = inDemand;
    this.#delayMs = delayMs;
  }

  request(moment: SpareMoment): void {
    if (this.#inDemand()) {
      void this.#bootNow();
      return;
    }
    if (moment === 'loaded' || this.#timer !== undefined) return;
    this.#timer = setTimeout(() => void this.#bootNow(), this.#delayMs);
    this.#timer.unref();
  }

  /** Boots a requested spare now instead of later, and waits until any boot has been launched. */
  async settle(): Promise<void> {
    if (this.#timer !== undefined) await this.#bootNow();
    await this.#booting;
  }

  /** Drops a pending request (this process is about to wait as the spare itself). */
  cancel(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
  }

  /** Spares this server started: its children until they are reparented, but not its leftovers. */
  get booted(): ReadonlySet<number> {
    return this.#booted;
  }

  async #bootNow(): Promise<void> {
    this.cancel();
    this.#booting = this.#boot().then(
      (pid) => void (pid !== undefined && this.#booted.add(pid)),
      () => undefined,
    );
    await this.#booting;
  }
}

/** What RecyclePolicy weighs once a server's last container is gone and its shutdown ran. */
export interface ServerAfterShutdown {
  readonly shutdownFailures: number;
  /** The finished container's config (`shim.spare`). */
  readonly sparesOn: boolean;
  readonly codeUnchanged: boolean;
  readonly rssBytes: number;
  /** Open descriptors, its log FIFO closed. */
  readonly openFds: number;
  /** Child processes left (a sandbox not reaped yet), spares it booted aside. */
  readonly children: number;
}

/**
 * A recycled server's RSS grows ~0.1 MB per container (54.6 → 59.8 MB over 38 on the dev VM; after
 * one container with execs up to ~60 MB): past 60 MiB (62.9 MB) it exits and a fresh spare (~56 MB)
 * takes over.
 */
export const RECYCLE_LIMITS = { maxContainers: 100, maxRssBytes: 60 * 2 ** 20 } as const;

/**
 * Whether a server that came from a spare may wait as a spare again once its containers are gone,
 * instead of exiting: the next container then needs no Node boot at all (~0.4 s of CPU on our
 * 2-core VM, docs/bench/shim-overhead.md). Only a clean process qualifies: its shutdown without
 * failures, the same code, no child left, no more open descriptors than after its first container
 * (a leak shows as growth), bounded memory and a bounded number of containers.
 */
export class RecyclePolicy {
  readonly #limits: { readonly maxContainers: number; readonly maxRssBytes: number };
  #served = 0;
  #fdBaseline: number | undefined;

  constructor(limits: { readonly maxContainers: number; readonly maxRssBytes: number } = RECYCLE_LIMITS) {
    this.#limits = limits;
  }

  /** Containers served so far (counting the one being judged). */
  get served(): number {
    return this.#served;
  }

  /** Why the server must exit now; undefined when it may wait as a spare again. */
  judge(s: ServerAfterShutdown): string | undefined {
    this.#served++;
    if (s.shutdownFailures > 0) return `${s.shutdownFailures} shutdown step(s) failed`;
    if (!s.sparesOn) return 'shim.spare is off';
    if (!s.codeUnchanged) return 'the installed code changed';
    if (this.#served >= this.#limits.maxContainers) return `served ${this.#served} containers`;
    if (s.rssBytes > this.#limits.maxRssBytes) return `RSS ${Math.round(s.rssBytes / 2 ** 20)} MiB`;
    if (s.children > 0) return `${s.children} child process(es) left`;
    this.#fdBaseline ??= s.openFds;
    if (s.openFds > this.#fdBaseline) return `${s.openFds - this.#fdBaseline} more open descriptors than after the first container`;
    return undefined;
  }
}

export interface AfterServingOptions {
  readonly server: ShimServer;
  readonly policy: RecyclePolicy;
  readonly slot: SpareSlot;
  readonly codeUnchanged: boolean;
  /** Where the server logs: the finished container's log FIFO, closed here. */
  readonly serverLog?: SwitchableDestination;
  readonly spareRequests?: SpareRequests;
  /** Whether spares are in demand now (sparesInDemand): then it may wait beside another spare. */
  readonly inDemand?: () => boolean;
  readonly log?: Logger;
}

/**
 * Waits until a server that came from a spare has shut down; then closes its container's log and either
 * waits in the registry again (RecyclePolicy allows it, and no other spare waits — or one, while
 * spares are in demand) or tells the caller to exit, after booting the next container's spare if
 * one was asked for.
 */
export async function afterServing(o: AfterServingOptions): Promise<{ readonly kind: 'recycled' } | { readonly kind: 'exit'; readonly code: number }> {
  await o.server.done;
  const exitCode = o.server.shutdown.failures.length === 0 ? 0 : 1;
  const facts: ServerAfterShutdown = {
    shutdownFailures: o.server.shutdown.failures.length,
    sparesOn: await loadConfig(o.server.configPath).then(
      (c) => c.shim.spare,
      () => false,
    ),
    codeUnchanged: o.codeUnchanged,
    rssBytes: process.memoryUsage.rss(),
    openFds: openFdCount() - ((o.serverLog?.fd ?? 2) > 2 ? 1 : 0), // the log FIFO is still open
    children: childrenOfThisProcess().filter((pid) => !o.spareRequests?.booted.has(pid)).length,
  };
  const whyExit = o.policy.judge(facts);
  o.log?.debug({ ...facts, whyExit, served: o.policy.served }, whyExit ? 'shim server exits' : 'shim server waits as a spare again');
  o.serverLog?.switchTo(undefined); // the container's log FIFO closes: containerd's reader sees its end
  if (whyExit !== undefined) {
    await o.spareRequests?.settle(); // leave the next container a spare
    return { kind: 'exit', code: exitCode };
  }
  o.spareRequests?.cancel(); // this process is the next container's spare
  const room = o.inDemand?.() ? MAX_SPARES_IN_DEMAND : 1;
  if (!(await o.slot.recycle(room))) return { kind: 'exit', code: exitCode }; // enough wait already
  process.chdir('/');
  return { kind: 'recycled' };
}

/** A spare boots at nice 19 (ensureSpare); claimed, each of its threads takes normal priority back. */
export function takeNormalPriority(): void {
  let threads: string[];
  try {
    threads = readdirSync('/proc/self/task');
  } catch {
    threads = [String(process.pid)];
  }
  for (const tid of threads) {
    try {
      setPriority(Number(tid), 0);
    } catch {
      // not permitted (an unprivileged containerd): the server runs niced
    }
  }
}

/** One spare's place in the registry, from registration until it is claimed or retires. */
export class SpareSlot {
  readonly #registry: string;
  readonly #log: Logger;
  #generation = 0;
  /** Set once retire() took the spare out of the registry; settles when its directory is gone. */
  #retiring: Promise<void> | undefined;

  private constructor(registry: string, log: Logger) {
    this.#registry = registry;
    this.#log = log;
  }

  /**
   * Registers this process as a spare; undefined when a live spare already waits (one is enough:
   * `start`s claim one at a time, and the server a spare becomes asks for the next).
   */
  static async register(registry: string, log: Logger = silentLogger): Promise<SpareSlot | undefined> {
    await mkdir(registry, { recursive: true, mode: 0o700 });
    if ((await liveSpares(registry)).length > 0) {
      await clearBootingMarker(registry);
      return undefined;
    }
    const slot = new SpareSlot(registry, log);
    await slot.#publish();
    await clearBootingMarker(registry);
    return slot;
  }

  get #name(): string {
    return `${process.pid}-${this.#generation}`;
  }

  get #waitingDir(): string {
    return path.join(this.#registry, `spare.${this.#name}`);
  }

  get #claimDir(): string {
    return path.join(this.#registry, `claim.${this.#name}`);
  }

  /** A fresh directory with its FIFO, moved into place in one rename (a `start` never sees it half made). */
  async #publish(): Promise<void> {
    this.#generation++;
    const staging = path.join(this.#registry, `new.${this.#name}`);
    await rm(staging, { recursive: true, force: true });
    await rm(this.#claimDir, { recursive: true, force: true }); // an earlier process with this pid
    await mkdir(staging, { mode: 0o700 });
    await promisify(execFile)('mkfifo', ['-m', '0600', path.join(staging, FILES.reply)]);
    await rename(staging, this.#waitingDir);
  }

  /**
   * Waits until a `start` claims this spare and returns its request; undefined once retire() took
   * the spare out of the registry instead.
   */
  async waitForClaim(): Promise<SpareClaim | undefined> {
    const reply = await this.#openReply();
    if (this.#retiring !== undefined) {
      await reply.close();
      await this.#retiring.catch(() => undefined);
      return undefined;
    }
    try {
      const dir = this.#claimDir;
      const [argv, cwd, env, stdin] = await Promise.all([
        readFile(path.join(dir, FILES.argv)),
        readFile(path.join(dir, FILES.cwd), 'utf8'),
        readFile(path.join(dir, FILES.env)),
        readFile(path.join(dir, FILES.stdin)),
      ]);
      const request: SpareRequest = { argv: splitNul(argv), cwd, env: parseEnv(splitNul(env)), stdin };
      return { request, answer: (status, output) => this.#answer(dir, reply, status, output) };
    } catch (err) {
      await this.#answer(this.#claimDir, reply, 'declined', '').catch(() => undefined);
      throw new ShimError('InvalidArgument', `spare claim without a complete request: ${(err as Error).message}`, { cause: err });
    }
  }

  /**
   * Blocks (in a libuv worker thread) until a reader opens the FIFO: the claiming `start`, or
   * retire() unblocking it. The directory may already be renamed when the open starts.
   */
  async #openReply(): Promise<FileHandle> {
    try {
      return await open(path.join(this.#waitingDir, FILES.reply), 'w');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      return open(path.join(this.#claimDir, FILES.reply), 'w');
    }
  }

  async #answer(dir: string, reply: FileHandle, status: SpareStatus, output: Uint8Array | string): Promise<void> {
    try {
      // status first: `start` reads it once the FIFO is closed.
      await writeFile(path.join(dir, FILES.status), `${status}\n`, { mode: 0o600 });
      await reply.write(typeof output === 'string' ? Buffer.from(output) : output);
    } finally {
      await reply.close();
    }
  }

  /** After a claim that did not use this process (the container's group already had a server): wait again. */
  async reregister(): Promise<void> {
    await this.#publish();
  }

  /**
   * A server that finished its containers waits as a spare again (RecyclePolicy said it may);
   * false when `room` spares wait already (this process then exits).
   */
  async recycle(room = 1): Promise<boolean> {
    if ((await liveSpares(this.#registry)).length >= room) return false;
    await this.#publish();
    return true;
  }

  /**
   * Leaves the registry (code rebuilt, bin/ gone). False when a `start` claimed the spare first:
   * then that claim must be served and waitForClaim() returns it.
   */
  async retire(): Promise<boolean> {
    const retiredDir = path.join(this.#registry, `retired.${this.#name}`);
    try {
      await rename(this.#waitingDir, retiredDir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
      throw err;
    }
    this.#retiring = (async () => {
      // Our own open for writing is blocked until a reader comes: be that reader.
      const unblock = await open(path.join(retiredDir, FILES.reply), fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
      try {
        await rm(retiredDir, { recursive: true, force: true });
      } finally {
        await unblock.close();
      }
    })();
    await this.#retiring;
    this.#log.debug({ registry: this.#registry }, 'spare retired');
    return true;
  }
}

export interface ClaimDeps {
  /** Whether the installed code is still what this spare booted. */
  readonly codeUnchanged: () => boolean;
  readonly planStart: (opts: { flags: ShimFlags; stdin: Uint8Array; bundle: string }) => Promise<StartPlan>;
  readonly writeStartFiles: (bundle: string, address: string, pid: number | undefined) => Promise<void>;
  /** Serves the plan's socket in this process (logger on the bundle's log FIFO, Task service). */
  readonly serve: (plan: StartPlan, bundle: string) => Promise<ShimServer>;
  /** Called once the request is accepted, before anything else (priority back to normal). */
  readonly onAccepted?: () => void;
  readonly binary: string;
}

/** What a claim made of this process: a container's server, still a spare, or nothing more. */
export type ClaimOutcome = { readonly kind: 'serving'; readonly server: ShimServer } | { readonly kind: 'spare' } | { readonly kind: 'exit'; readonly code: number };

/**
 * Does for a claim what `start` (and the `serve` it would launch) would: declines what only a
 * Node `start` should do (another verb, code rebuilt since this spare booted), takes on the
 * environment, working directory and stdin of the `start`, plans, and either answers with the
 * group's running server (the spare stays one) or serves the container here.
 */
export async function handleClaim(claim: SpareClaim, deps: ClaimDeps): Promise<ClaimOutcome> {
  const { request } = claim;
  let flags: ShimFlags;
  try {
    const args = parseShimArgs(request.argv);
    if (args.verb !== 'start' || !deps.codeUnchanged()) throw new Error('not for a spare');
    flags = args.flags;
  } catch {
    await claim.answer('declined', '');
    return { kind: 'exit', code: 0 };
  }
  adoptEnvironment(request.env);
  process.chdir(request.cwd);
  deps.onAccepted?.();
  const failed = async (err: unknown): Promise<ClaimOutcome> => {
    await claim.answer('error', `${deps.binary}: ${(err as Error).message}\n`);
    return { kind: 'exit', code: 1 };
  };
  let plan: StartPlan;
  try {
    plan = await deps.planStart({ flags, stdin: request.stdin, bundle: request.cwd });
  } catch (err) {
    return failed(err);
  }
  if (plan.running) {
    // The container joins its group's server; this process stays a spare.
    await deps.writeStartFiles(request.cwd, plan.address, undefined);
    await claim.answer('ok', plan.reply);
    return { kind: 'spare' };
  }
  if (plan.ttrpcAddress) process.env.TTRPC_ADDRESS = plan.ttrpcAddress;
  let server: ShimServer;
  try {
    server = await deps.serve(plan, request.cwd);
    await deps.writeStartFiles(request.cwd, plan.address, process.pid);
  } catch (err) {
    if (!isShimError(err, 'AlreadyExists')) return failed(err);
    // Another start of the group got there first: its server takes the container.
    await deps.writeStartFiles(request.cwd, plan.address, undefined);
    await claim.answer('ok', plan.reply);
    return { kind: 'exit', code: 0 };
  }
  await claim.answer('ok', plan.reply);
  return { kind: 'serving', server };
}

export interface EnsureSpareOptions {
  readonly registry: string;
  /** node, its flags and the shim script; `spare` is appended. */
  readonly command: { readonly file: string; readonly args: readonly string[] };
  readonly log?: Logger;
}

/**
 * Boots a spare unless one waits or boots already. It runs at the lowest CPU priority (`nice -n
 * 19`), so that its boot takes only idle CPU from the containers starting now; the spare takes its
 * priority back when it is claimed. Returns the new spare's pid, or undefined when none was needed.
 */
export async function ensureSpare({ registry, command, log = silentLogger }: EnsureSpareOptions): Promise<number | undefined> {
  await mkdir(registry, { recursive: true, mode: 0o700 });
  if ((await liveSpares(registry)).length > 0) return undefined;
  const marker = path.join(registry, BOOTING);
  let handle: FileHandle;
  try {
    handle = await open(marker, 'wx', 0o600);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    const pid = Number.parseInt(await readFile(marker, 'utf8').catch(() => ''), 10);
    if (isAlive(pid)) return undefined;
    await rm(marker, { force: true }); // its spare died while booting
    return ensureSpare({ registry, command, log });
  }
  try {
    const child = spawn('nice', ['-n', '19', command.file, ...command.args, 'spare'], { cwd: '/', detached: true, stdio: 'ignore' });
    const pid = await new Promise<number>((resolve, reject) => {
      child.once('spawn', () => resolve(child.pid!));
      child.once('error', reject);
    });
    child.unref();
    await handle.writeFile(`${pid}\n`); // a line: the sh launcher reads it with `read`
    log.debug({ pid, registry }, 'booting a spare shim server');
    return pid;
  } catch (err) {
    await rm(marker, { force: true });
    throw new ShimError('Unavailable', `boot a spare shim server failed: ${(err as Error).message}`, { cause: err });
  } finally {
    await handle.close();
  }
}

/** Pids of the spares waiting in a registry (directories of dead processes are removed). */
export async function liveSpares(registry: string): Promise<number[]> {
  const names = await readdir(registry).catch(() => [] as string[]);
  const live: number[] = [];
  for (const name of names) {
    const match = /^spare\.(\d+)-\d+$/.exec(name);
    if (match === null) continue;
    const pid = Number(match[1]);
    if (isAlive(pid)) live.push(pid);
    else await rm(path.join(registry, name), { recursive: true, force: true });
  }
  return live;
}

/**
 * A claimed spare takes on the environment of the `start` it replaces (containerd's TTRPC_ADDRESS,
 * GRPC_ADDRESS, NAMESPACE, …): mutated in place, so that the C environment runsc inherits follows.
 */
export function adoptEnvironment(env: Readonly<Record<string, string>>): void {
  for (const key of Object.keys(process.env)) if (!(key in env)) delete process.env[key];
  Object.assign(process.env, env);
}

async function clearBootingMarker(registry: string): Promise<void> {
  const marker = path.join(registry, BOOTING);
  const pid = Number.parseInt(await readFile(marker, 'utf8').catch(() => ''), 10);
  if (pid === process.pid || !isAlive(pid)) await rm(marker, { force: true });
}

function splitNul(data: Buffer): string[] {
  const parts = data.toString('utf8').split('\0');
  if (parts.at(-1) === '') parts.pop();
  return parts;
}

function parseEnv(entries: readonly string[]): Record<string, string> {
  const env: Record<string, string> = {};
  for (const entry of entries) {
    const eq = entry.indexOf('=');
    if (eq > 0) env[entry.slice(0, eq)] = entry.slice(eq + 1);
  }
  return env;
}

