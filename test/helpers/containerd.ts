/**
 * A private containerd for integration tests and benchmarks: temp root/state/socket, thaw's shim
 * (compiled from this checkout) on its PATH, a thaw config under the same temp dir, and a cleanup
 * that removes everything a test can leave behind — tasks, containers, images, shim servers, runsc
 * sandboxes under thaw's state dir, mounts under the temp dir, shim sockets in /run/containerd/s
 * and ctr FIFO dirs — even when the test failed half-way.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, existsSync, openSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { chmod, copyFile, mkdir, mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { cwdOf } from '../../src/procfs.js';

/** The checkout's root: the nearest directory above this file with a package.json (also from dist/). */
export const repo = findRepo(path.dirname(fileURLToPath(import.meta.url)));

function findRepo(dir: string): string {
  for (let d = dir; ; d = path.dirname(d)) {
    if (existsSync(path.join(d, 'package.json'))) return d;
    if (path.dirname(d) === d) throw new Error(`no package.json above ${dir}`);
  }
}
export const SHIM_BINARY = 'containerd-shim-thaw-v2';
export const THAW_RUNTIME = 'io.containerd.thaw.v2';
const SOCKET_DIR = '/run/containerd/s';
const GLOBAL_FIFO_DIR = '/run/containerd/fifo';
const TASK_DIR = 'io.containerd.runtime.v2.task';

// ---------------------------------------------------------------- processes

export interface CommandResult {
  code: number | null;
  /** Exit signal when the command was killed. */
  signal: NodeJS.Signals | null;
  out: string;
  err: string;
  ms: number;
}

export interface CommandOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  timeoutMs?: number;
  input?: string | Buffer;
}

/** Runs a command to completion (close of its stdio); kills it after `timeoutMs` and reports that. */
export function runCommand(file: string, args: readonly string[], opts: CommandOptions = {}): Promise<CommandResult> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const child = spawn(file, args, { cwd: opts.cwd, env: opts.env, stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    let timedOut = false;
    child.stdout?.on('data', (c: Buffer) => (out += c.toString()));
    child.stderr?.on('data', (c: Buffer) => (err += c.toString()));
    if (opts.input !== undefined) child.stdin?.end(opts.input);
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, opts.timeoutMs ?? 60_000);
    child.once('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      if (timedOut) err += `\n[timed out after ${opts.timeoutMs ?? 60_000} ms: ${file} ${args.join(' ')}]`;
      resolve({ code, signal, out, err, ms: performance.now() - t0 });
    });
  });
}

export async function until(cond: () => boolean | Promise<boolean>, timeoutMs: number, what: string, stepMs = 100): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, stepMs));
  }
}

export function commandExists(bin: string): boolean {
  if (bin.includes('/')) return existsSync(bin);
  return spawnSync('sh', ['-c', 'command -v "$0"', bin]).status === 0;
}

export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

function cmdlineOf(pid: number): string[] {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
  } catch {
    return [];
  }
}

/**
 * Whether a shim server is done with its container: exited, or (one that came from a spare)
 * waiting as a spare again, out of the bundle (src/shim/spare.ts `afterServing`).
 */
export function shimServerDone(pid: number): boolean {
  const cwd = cwdOf(pid);
  return cwd === '' || cwd === '/';
}

/** Pids of live processes whose argv satisfies `match`. */
export function findProcesses(match: (argv: string[]) => boolean): number[] {
  const out: number[] = [];
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    const argv = cmdlineOf(Number(d));
    if (argv.length > 0 && match(argv)) out.push(Number(d));
  }
  return out;
}

/** VmRSS of a process in KiB (undefined when it is gone). */
export function rssKiB(pid: number): number | undefined {
  try {
    const m = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

// ---------------------------------------------------------------- skip reasons

export interface Requirements {
  /** Binaries that must be on PATH (or absolute paths that must exist). */
  bins?: readonly string[];
}

/** Why an integration test cannot run here, or undefined. */
export function integrationSkipReason({ bins = ['containerd', 'ctr', 'runsc', 'tar', 'mount'] }: Requirements = {}): string | undefined {
  if (!process.env.THAW_INTEGRATION) return 'set THAW_INTEGRATION=1 to run';
  if (process.getuid?.() !== 0) return 'needs root';
  for (const bin of bins) if (!commandExists(bin)) return `${bin} not installed`;
  return undefined;
}

// ---------------------------------------------------------------- thaw build

const BUILD_DIR = path.join(repo, 'tmp', 'it-build');
/** bin/ of the integration tests' build (buildThawBinaries). */
export const BUILD_BIN_DIR = path.join(BUILD_DIR, 'bin');
// The page keeper's entry is exec'd by path, not imported: it must be compiled on its own.
const BUILD_ENTRIES = ['src/cli/shim.ts', 'src/cli/thaw.ts', 'src/restore/page-keeper-main.ts'];

function sourceFingerprint(): string {
  const h = createHash('sha256');
  const walk = (dir: string): void => {
    for (const e of readdirSync(dir, { withFileTypes: true }).sort((a, b) => a.name.localeCompare(b.name))) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith('.ts')) {
        const s = statSync(p);
        h.update(`${p}\0${s.size}\0${s.mtimeMs}\n`);
      }
    }
  };
  walk(path.join(repo, 'src'));
  for (const f of ['tsconfig.json', 'package.json', `bin/${SHIM_BINARY}`, 'bin/thaw', 'bin/launch.mjs', `bin/${SHIM_BINARY}.mjs`, 'scripts/bundle.mjs']) {
    const s = statSync(path.join(repo, f));
    h.update(`${f}\0${s.size}\0${s.mtimeMs}\n`);
  }
  return h.digest('hex');
}

async function withBuildLock<T>(fn: () => Promise<T>): Promise<T> {
  const lock = `${BUILD_DIR}.lock`;
  await mkdir(path.dirname(lock), { recursive: true });
  const end = Date.now() + 10 * 60_000;
  for (;;) {
    try {
      closeSync(openSync(lock, 'wx'));
      await writeFile(lock, String(process.pid));
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      const owner = Number(await readFile(lock, 'utf8').catch(() => '0'));
      // A lock left by a dead (or not yet identified) builder: take it over once it is old.
      const age = Date.now() - (await stat(lock).then((s) => s.mtimeMs, () => Date.now()));
      if ((owner > 0 && !alive(owner)) || (owner === 0 && age > 30_000)) await rm(lock, { force: true });
      else if (Date.now() > end) throw new Error(`build lock ${lock} held by pid ${owner} for too long`);
      else await new Promise((r) => setTimeout(r, 250));
    }
  }
  try {
    return await fn();
  } finally {
    await rm(lock, { force: true });
  }
}

/**
 * Compiles the shim and the thaw CLI from this checkout into <repo>/tmp/it-build (git-ignored,
 * inside the repo so node_modules resolve) with copies of bin/'s launchers, unless the sources are
 * unchanged since the last build. Returns the bin directory (put it on containerd's PATH).
 * Concurrent test files share one build through a lock file.
 */
export async function buildThawBinaries(): Promise<string> {
  const bin = BUILD_BIN_DIR;
  const stamp = path.join(BUILD_DIR, 'stamp');
  return withBuildLock(async () => {
    const want = sourceFingerprint();
    if ((await readFile(stamp, 'utf8').catch(() => '')) === want && existsSync(path.join(bin, SHIM_BINARY))) return bin;
    await rm(BUILD_DIR, { recursive: true, force: true });
    await mkdir(bin, { recursive: true });
    await writeFile(
      path.join(BUILD_DIR, 'tsconfig.json'),
      JSON.stringify({
        extends: path.join(repo, 'tsconfig.json'),
        compilerOptions: { outDir: path.join(BUILD_DIR, 'dist'), rootDir: repo, sourceMap: true, noEmit: false },
        include: [],
        files: BUILD_ENTRIES.map((f) => path.join(repo, f)),
      }),
    );
    const tsc = await runCommand(process.execPath, [path.join(repo, 'node_modules/typescript/bin/tsc'), '-p', path.join(BUILD_DIR, 'tsconfig.json')], {
      timeoutMs: 300_000,
    });
    if (tsc.code !== 0) throw new Error(`tsc failed: ${tsc.out}${tsc.err}`);
    // What ships: the launchers load the bundle (bin/launch.mjs).
    const bundle = await runCommand(process.execPath, [path.join(repo, 'scripts/bundle.mjs'), path.join(BUILD_DIR, 'dist')], { timeoutMs: 120_000 });
    if (bundle.code !== 0) throw new Error(`bundling failed: ${bundle.out}${bundle.err}`);
    for (const b of [SHIM_BINARY, 'thaw', 'launch.mjs', `${SHIM_BINARY}.mjs`]) {
      await copyFile(path.join(repo, 'bin', b), path.join(bin, b));
      await chmod(path.join(bin, b), 0o755);
    }
    await writeFile(stamp, want);
    return bin;
  });
}

// ---------------------------------------------------------------- containerd

export interface CriOptions {
  /** Image (already imported into k8s.io by the test) used for pod sandboxes. */
  sandboxImage: string;
  /** Options.ConfigPath of the `thaw` runtime entry; default: the harness's thaw config. */
  thawConfigPath?: string;
}

export interface ContainerdOptions {
  /** containerd binary (default: `containerd` on PATH); e.g. a 1.7 from a private prefix. */
  containerd?: string;
  ctr?: string;
  /** Extra entries for containerd's PATH (the runc shim of a private prefix, …). */
  extraPath?: readonly string[];
  /** Environment for containerd (LD_LIBRARY_PATH of a private prefix, …). */
  env?: NodeJS.ProcessEnv;
  /** Enable the CRI plugin with CNI (bridge + portmap) and a `thaw` runtime entry. */
  cri?: CriOptions;
  /** Merged into the thaw config the shim gets through runtime options ({stateDir, store} are set). */
  thawConfig?: Record<string, unknown>;
  /** Extra TOML appended to containerd's config. */
  extraToml?: string;
  /** Temp dir prefix (under os.tmpdir()). */
  prefix?: string;
  /**
   * Directory holding containerd-shim-thaw-v2 and thaw; default: THAW_TEST_BIN if set (e.g. an
   * installed release), else a build of this checkout (buildThawBinaries).
   */
  bin?: string;
}

interface Tracked {
  ids: Set<string>;
  shimPids: Set<number>;
  sockets: Set<string>;
}

/**
 * One private containerd. `start()` registers its cleanup with `teardown` (tap's t.teardown) so
 * everything is removed even when a test fails.
 */
export class ContainerdHarness {
  /** Everything lives under here. */
  readonly dir: string;
  readonly grpc: string;
  readonly root: string;
  readonly state: string;
  /** The thaw config file passed as `--runtime-config-path` / CRI Options.ConfigPath. */
  readonly thawConfigPath: string;
  readonly thawState: string;
  readonly thawStore: string;
  readonly fifoDir: string;
  readonly logFile: string;
  readonly ctrBin: string;
  readonly runscBin: string;
  bin = '';
  /** containerd's stderr, for failure messages. */
  #containerd: ChildProcess | undefined;
  #log = '';
  readonly #opts: ContainerdOptions;
  readonly #tracked: Tracked = { ids: new Set(), shimPids: new Set(), sockets: new Set() };
  readonly #fifosBefore: Set<string>;
  #cleaned = false;

  private constructor(dir: string, opts: ContainerdOptions) {
    this.dir = dir;
    this.#opts = opts;
    this.grpc = path.join(dir, 'containerd.sock');
    this.root = path.join(dir, 'root');
    this.state = path.join(dir, 'state');
    this.thawState = path.join(dir, 'thaw', 'state');
    this.thawStore = path.join(dir, 'thaw', 'store');
    this.thawConfigPath = path.join(dir, 'thaw', 'config.json');
    this.fifoDir = path.join(dir, 'fifo');
    this.logFile = path.join(dir, 'containerd.log');
    this.ctrBin = opts.ctr ?? 'ctr';
    this.runscBin = ((opts.thawConfig?.runsc as { path?: string } | undefined)?.path ?? 'runsc') as string;
    this.#fifosBefore = new Set(existsSync(GLOBAL_FIFO_DIR) ? readdirSync(GLOBAL_FIFO_DIR) : []);
  }

  /** Starts containerd; `teardown` receives the cleanup (pass tap's `t.teardown.bind(t)`). */
  static async start(teardown: (fn: () => Promise<void>) => void, opts: ContainerdOptions = {}): Promise<ContainerdHarness> {
    const dir = await mkdtemp(path.join(os.tmpdir(), opts.prefix ?? 'thaw-ctd-'));
    const h = new ContainerdHarness(dir, opts);
    teardown(() => h.cleanup());
    await h.#start();
    return h;
  }

  get namespaces(): string[] {
    return this.#opts.cri ? ['default', 'k8s.io'] : ['default'];
  }

  /** containerd's log so far. */
  get log(): string {
    return this.#log;
  }

  async #start(): Promise<void> {
    this.bin = this.#opts.bin ?? process.env.THAW_TEST_BIN ?? (await buildThawBinaries());
    await mkdir(this.fifoDir, { recursive: true });
    await mkdir(path.dirname(this.thawConfigPath), { recursive: true });
    const thawConfig = deepMerge({ stateDir: this.thawState, store: { path: this.thawStore } }, this.#opts.thawConfig ?? {});
    await writeFile(this.thawConfigPath, JSON.stringify(thawConfig, null, 2));
    const config = path.join(this.dir, 'config.toml');
    await writeFile(config, await this.#configToml());
    const env = {
      ...process.env,
      ...this.#opts.env,
      PATH: [this.bin, ...(this.#opts.extraPath ?? []), process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin'].join(':'),
    };
    // At debug level containerd also passes -debug to the shim (runsc argv and phases in the log).
    const level = process.env.THAW_TEST_DEBUG ? 'debug' : 'info';
    // Through `env -u NODE_OPTIONS` (which execs containerd, same pid): tap's process tracking puts
    // its loader into NODE_OPTIONS of every child it sees spawned, whatever env we pass, and shims,
    // spares above all, must not run with it (it costs ~20-30 MB of RSS and writes into tap's dirs).
    const containerd = this.#opts.containerd ?? 'containerd';
    const child = spawn('env', ['-u', 'NODE_OPTIONS', containerd, '--config', config, '--log-level', level], { env, stdio: ['ignore', 'ignore', 'pipe'] });
    this.#containerd = child;
    child.stderr?.on('data', (c: Buffer) => {
      this.#log += c.toString();
      if (this.#log.length > 4_000_000) this.#log = this.#log.slice(-2_000_000);
    });
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    await until(
      async () => {
        if (child.exitCode !== null) throw new Error(`containerd exited with ${child.exitCode}: ${this.#log.slice(-2000)}`);
        return (await this.ctr(['version'], { timeoutMs: 5000 })).code === 0;
      },
      60_000,
      'containerd to serve',
    );
    void exited;
    // containerd starts without a plugin whose config it rejects; say why instead of "unknown service".
    const failed = /failed to load plugin io\.containerd\.grpc\.v1\.cri.*/.exec(this.#log);
    if (this.#opts.cri && failed) throw new Error(`containerd's CRI plugin did not load: ${failed[0]}`);
  }

  async #configToml(): Promise<string> {
    const lines = [
      'version = 2',
      `root = "${this.root}"`,
      `state = "${this.state}"`,
      '[grpc]',
      `  address = "${this.grpc}"`,
      '[ttrpc]',
      `  address = "${this.grpc}.ttrpc"`,
    ];
    const cri = this.#opts.cri;
    if (!cri) {
      lines.splice(3, 0, 'disabled_plugins = ["io.containerd.grpc.v1.cri"]');
    } else {
      const cniConf = path.join(this.dir, 'cni');
      await mkdir(cniConf, { recursive: true });
      await writeFile(path.join(cniConf, '10-thaw-it.conflist'), JSON.stringify(this.cniConflist(), null, 2));
      const P = 'plugins."io.containerd.grpc.v1.cri"';
      lines.push(
        `[${P}]`,
        '  restrict_oom_score_adj = true',
        `  sandbox_image = "${cri.sandboxImage}"`,
        '  netns_mounts_under_state_dir = true',
        '  stream_server_port = "0"',
        `[${P}.cni]`,
        '  bin_dir = "/usr/lib/cni"',
        `  conf_dir = "${cniConf}"`,
        `[${P}.containerd]`,
        '  default_runtime_name = "runc"',
        `[${P}.containerd.runtimes.runc]`,
        '  runtime_type = "io.containerd.runc.v2"',
        `[${P}.containerd.runtimes.thaw]`,
        `  runtime_type = "${THAW_RUNTIME}"`,
        '  pod_annotations = ["thaw.dev/*"]',
        '  container_annotations = ["thaw.dev/*"]',
        `[${P}.containerd.runtimes.thaw.options]`,
        `  ConfigPath = "${cri.thawConfigPath ?? this.thawConfigPath}"`,
      );
    }
    if (this.#opts.extraToml) lines.push(this.#opts.extraToml);
    return `${lines.join('\n')}\n`;
  }

  /** Bridge name: at most 15 characters, unique per harness. */
  get bridgeName(): string {
    return `thaw${createHash('sha256').update(this.dir).digest('hex').slice(0, 8)}`;
  }

  get cniNetworkName(): string {
    return `thaw-it-${path.basename(this.dir)}`;
  }

  cniConflist(): Record<string, unknown> {
    // A subnet per harness (10.<200-249>.<0-255>.0/24) so parallel test files do not collide.
    const n = Number.parseInt(createHash('sha256').update(this.dir).digest('hex').slice(0, 4), 16);
    const subnet = `10.${200 + (n % 50)}.${(n >> 6) % 256}.0/24`;
    return {
      cniVersion: '0.4.0',
      name: this.cniNetworkName,
      plugins: [
        {
          type: 'bridge',
          bridge: this.bridgeName,
          isGateway: true,
          ipMasq: false,
          ipam: { type: 'host-local', ranges: [[{ subnet }]], routes: [{ dst: '0.0.0.0/0' }] },
        },
        { type: 'portmap', capabilities: { portMappings: true } },
      ],
    };
  }

  /** `ctr --address … [-n ns] ARGS`. */
  ctr(args: readonly string[], opts: { namespace?: string; timeoutMs?: number } = {}): Promise<CommandResult> {
    const ns = opts.namespace ? ['-n', opts.namespace] : [];
    return runCommand(this.ctrBin, ['--address', this.grpc, ...ns, ...args], { timeoutMs: opts.timeoutMs ?? 60_000 });
  }

  /** The thaw CLI against this harness's state dir and store, JSON output. */
  thaw(args: readonly string[], opts: { timeoutMs?: number } = {}): Promise<CommandResult> {
    return runCommand(path.join(this.bin, 'thaw'), ['--root', this.thawState, '--store', this.thawStore, ...args], {
      timeoutMs: opts.timeoutMs ?? 120_000,
    });
  }

  /**
   * `ctr run` through thaw's runtime with the harness's thaw config. `logFile` set: detached, the
   * task's stdout+stderr appended to that file; otherwise attached with `--rm` (FIFOs in the
   * harness's fifo dir) and the result carries the task's output and exit code.
   */
  runThaw(o: { id: string; image: string; args?: readonly string[]; logFile?: string; namespace?: string; timeoutMs?: number; extra?: readonly string[] }): Promise<CommandResult> {
    this.track(o.id);
    const mode = o.logFile ? ['-d', '--log-uri', `file://${o.logFile}`] : ['--rm', '--fifo-dir', this.fifoDir];
    return this.ctr(
      ['run', ...mode, '--runtime', THAW_RUNTIME, '--runtime-config-path', this.thawConfigPath, ...(o.extra ?? []), o.image, o.id, ...(o.args ?? [])],
      { namespace: o.namespace, timeoutMs: o.timeoutMs ?? 90_000 },
    );
  }

  /** `ctr image import` of an image tar (into `namespace`, default the harness's default). */
  async importImage(tar: string, namespace?: string): Promise<void> {
    const r = await this.ctr(['images', 'import', tar], { namespace, timeoutMs: 120_000 });
    if (r.code !== 0) throw new Error(`ctr images import failed: ${r.err}`);
  }

  /** The task's status as `ctr tasks ls` prints it (RUNNING, PAUSED, STOPPED, …), or undefined. */
  async taskStatus(id: string, namespace?: string): Promise<string | undefined> {
    const r = await this.ctr(['tasks', 'ls'], { namespace, timeoutMs: 20_000 });
    for (const line of r.out.split('\n').slice(1)) {
      const [task, , status] = line.trim().split(/\s+/);
      if (task === id) return status;
    }
    return undefined;
  }

  async waitForTaskStatus(id: string, status: string, timeoutMs = 30_000, namespace?: string): Promise<void> {
    await until(async () => (await this.taskStatus(id, namespace)) === status, timeoutMs, `task ${id} to be ${status}`, 200);
  }

  /** Registers a container id (so its shim socket and FIFOs are cleaned up) and returns it. */
  track(id: string): string {
    this.#tracked.ids.add(id);
    return id;
  }

  bundleOf(id: string, namespace = 'default'): string {
    return path.join(this.state, TASK_DIR, namespace, id);
  }

  /** The shim server's pid from the bundle (0 when unknown). */
  shimPidOf(id: string, namespace = 'default'): number {
    try {
      const pid = Number(readFileSync(path.join(this.bundleOf(id, namespace), 'shim.pid'), 'utf8'));
      if (pid > 0) this.#tracked.shimPids.add(pid);
      return pid;
    } catch {
      return 0;
    }
  }

  /** Sandboxes runsc still knows under thaw's state dir. */
  async runscSandboxes(): Promise<string[]> {
    const root = path.join(this.thawState, 'runsc');
    if (!existsSync(root)) return [];
    const r = await runCommand(this.runscBin, ['--root', root, 'list', '-quiet'], { timeoutMs: 30_000 });
    return r.out.split('\n').map((l) => l.trim()).filter((l) => l !== '');
  }

  /** Mount points under `dir` (default: this harness's temp dir). */
  mountsUnder(dir: string = this.dir): string[] {
    return readFileSync('/proc/self/mounts', 'utf8')
      .split('\n')
      .map((l) => unescapeMount(l.split(' ')[1] ?? ''))
      .filter((m) => m === dir || m.startsWith(`${dir}/`));
  }

  /** Shim sockets that the given ids' shims would listen on. */
  socketOf(id: string, namespace = 'default'): string {
    return path.join(SOCKET_DIR, createHash('sha256').update(`${this.grpc}/${namespace}/${id}`).digest('hex'));
  }

  #scanBundles(): void {
    for (const ns of safeReaddir(path.join(this.state, TASK_DIR))) {
      for (const id of safeReaddir(path.join(this.state, TASK_DIR, ns))) {
        this.shimPidOf(id, ns);
        try {
          const address = readFileSync(path.join(this.bundleOf(id, ns), 'address'), 'utf8').trim();
          if (address.startsWith('unix://')) this.#tracked.sockets.add(address.slice('unix://'.length));
        } catch {
          // no address file yet
        }
      }
    }
  }

  /** Stops containerd (its shims keep running, as in production). */
  async stopContainerd(): Promise<void> {
    const c = this.#containerd;
    if (!c || c.exitCode !== null || c.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => c.once('exit', () => resolve()));
    c.kill('SIGTERM');
    const timer = setTimeout(() => c.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(timer);
  }

  /** Removes everything; safe to call twice. */
  async cleanup(): Promise<void> {
    if (this.#cleaned) return;
    this.#cleaned = true;
    this.#scanBundles();
    const running = this.#containerd && this.#containerd.exitCode === null && this.#containerd.signalCode === null;
    if (running) {
      for (const ns of this.namespaces) {
        const tasks = (await this.ctr(['tasks', 'ls', '-q'], { namespace: ns, timeoutMs: 20_000 })).out.split('\n').filter(Boolean);
        for (const id of tasks) {
          await this.ctr(['tasks', 'kill', '-a', '-s', 'SIGKILL', id], { namespace: ns, timeoutMs: 20_000 });
          await this.ctr(['tasks', 'rm', '-f', id], { namespace: ns, timeoutMs: 30_000 });
        }
        const containers = (await this.ctr(['containers', 'ls', '-q'], { namespace: ns, timeoutMs: 20_000 })).out.split('\n').filter(Boolean);
        for (const id of containers) await this.ctr(['containers', 'rm', id], { namespace: ns, timeoutMs: 30_000 });
        const images = (await this.ctr(['images', 'ls', '-q'], { namespace: ns, timeoutMs: 20_000 })).out.split('\n').filter(Boolean);
        if (images.length > 0) await this.ctr(['images', 'rm', ...images], { namespace: ns, timeoutMs: 30_000 });
      }
    }
    this.#scanBundles();
    await this.stopContainerd();
    // Shim servers that outlived their tasks (they run in their own session: kill the group). A
    // server that came from a spare may since wait as a spare again or serve another test's
    // container (recycled, src/shim/spare.ts): only one still in a bundle of ours is ours to kill.
    for (const pid of this.#tracked.shimPids) {
      if (!cmdlineOf(pid).some((a) => a.includes(SHIM_BINARY) || a.includes('containerd-shim'))) continue;
      if (!cwdOf(pid).startsWith(`${this.dir}/`)) continue; // a shim server runs in its container's bundle
      try {
        process.kill(-pid, 'SIGKILL');
      } catch {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // gone
        }
      }
    }
    // runsc sandboxes left under thaw's state dir.
    const root = path.join(this.thawState, 'runsc');
    for (const id of await this.runscSandboxes().catch(() => [])) {
      await runCommand(this.runscBin, ['--root', root, 'kill', id, 'KILL'], { timeoutMs: 15_000 }).catch(() => undefined);
      await runCommand(this.runscBin, ['--root', root, 'delete', '-force', id], { timeoutMs: 30_000 }).catch(() => undefined);
    }
    for (const m of this.mountsUnder().reverse()) spawnSync('umount', ['-l', m]);
    for (const ns of this.namespaces) for (const id of this.#tracked.ids) this.#tracked.sockets.add(this.socketOf(id, ns));
    for (const s of this.#tracked.sockets) if (s.startsWith(`${SOCKET_DIR}/`)) await rm(s, { force: true });
    if (existsSync(GLOBAL_FIFO_DIR)) {
      for (const d of readdirSync(GLOBAL_FIFO_DIR)) {
        if (this.#fifosBefore.has(d)) continue;
        const dir = path.join(GLOBAL_FIFO_DIR, d);
        const ours = safeReaddir(dir).some((f) => [...this.#tracked.ids].some((id) => f.startsWith(`${id}-`)));
        if (ours) await rm(dir, { recursive: true, force: true });
      }
    }
    if (this.#opts.cri) {
      spawnSync('ip', ['link', 'del', this.bridgeName], { stdio: 'ignore' });
      await rm(path.join('/var/lib/cni/networks', this.cniNetworkName), { recursive: true, force: true });
      // libcni caches results as <network>-<container>-<ifname> (CRI adds a cni-loopback network).
      for (const f of safeReaddir('/var/lib/cni/results')) {
        const ours = f.startsWith(`${this.cniNetworkName}-`) || (f.startsWith('cni-loopback-') && [...this.#tracked.ids].some((id) => f.includes(id)));
        if (ours) await rm(path.join('/var/lib/cni/results', f), { force: true });
      }
    }
    await this.#keepLog();
    await rm(this.dir, { recursive: true, force: true });
  }

  /**
   * containerd's log (with the shims' JSON lines) goes to <repo>/tmp/it-logs/ for post-mortems;
   * the newest 20 are kept.
   */
  async #keepLog(): Promise<void> {
    const dir = path.join(repo, 'tmp', 'it-logs');
    await mkdir(dir, { recursive: true });
    await writeFile(path.join(dir, `${path.basename(this.dir)}.log`), this.#log);
    const logs = await Promise.all(
      (await readdir(dir)).map(async (f) => ({ f, mtime: (await stat(path.join(dir, f)).catch(() => undefined))?.mtimeMs ?? 0 })),
    );
    for (const { f } of logs.sort((a, b) => b.mtime - a.mtime).slice(20)) await rm(path.join(dir, f), { force: true });
  }
}

function safeReaddir(dir: string): string[] {
  try {
    return readdirSync(dir);
  } catch {
    return [];
  }
}

/** /proc/mounts escapes spaces etc. as octal. */
function unescapeMount(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(Number.parseInt(o, 8)));
}

function deepMerge(base: Record<string, unknown>, over: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = { ...base };
  for (const [k, v] of Object.entries(over)) {
    const b = out[k];
    out[k] =
      typeof v === 'object' && v !== null && !Array.isArray(v) && typeof b === 'object' && b !== null && !Array.isArray(b)
        ? deepMerge(b as Record<string, unknown>, v as Record<string, unknown>)
        : v;
  }
  return out;
}

/** Lines of a file written by ctr's `--log-uri file://` (the task's stdout and stderr). */
export async function readLines(file: string): Promise<string[]> {
  return (await readFile(file, 'utf8').catch(() => '')).split('\n').filter((l) => l !== '');
}

/** Lists files recursively (relative paths) — for checkpoint dirs and stores. */
export async function listFiles(dir: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (d: string, rel: string): Promise<void> => {
    for (const e of await readdir(d, { withFileTypes: true }).catch(() => [])) {
      if (e.isDirectory()) await walk(path.join(d, e.name), path.join(rel, e.name));
      else out.push(path.join(rel, e.name));
    }
  };
  await walk(dir, '');
  return out.sort();
}

// ---------------------------------------------------------------- containerd versions

export interface ContainerdVersion {
  /** Short name for test titles: 1.6, 1.7, 2.x. */
  name: string;
  /** Why it cannot run here, or undefined. */
  skip: string | undefined;
  options: Pick<ContainerdOptions, 'containerd' | 'ctr' | 'extraPath' | 'env'>;
}

/**
 * The containerd releases to test against: the system's (1.6 on bookworm) and, when scripts/setup.sh
 * unpacked them, private prefixes of newer Debian packages (THAW_CONTAINERD17_PREFIX,
 * THAW_CONTAINERD2_PREFIX override the default locations).
 */
export function containerdVersions(): ContainerdVersion[] {
  const prefixed = (name: string, env: string, dflt: string): ContainerdVersion => {
    const prefix = process.env[env] ?? dflt;
    const bin = path.join(prefix, 'usr/bin');
    const containerd = path.join(bin, 'containerd');
    let skip: string | undefined;
    if (!existsSync(containerd)) skip = `containerd ${name} not unpacked at ${prefix} (scripts/setup.sh does it; or set ${env})`;
    else if (spawnSync(containerd, ['--version']).status !== 0) skip = `${containerd} does not run here`;
    return { name, skip, options: { containerd, ctr: path.join(bin, 'ctr'), extraPath: [bin] } };
  };
  return [
    { name: '1.6', skip: undefined, options: {} },
    prefixed('1.7', 'THAW_CONTAINERD17_PREFIX', '/opt/thaw/containerd-1.7'),
    prefixed('2.x', 'THAW_CONTAINERD2_PREFIX', '/opt/thaw/containerd-2'),
  ];
}
