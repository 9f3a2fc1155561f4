import { mkdir, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa } from 'execa';

/**
 * Running the real `bin/thaw` from tests: the built CLI (rebuilt when src/ is newer than dist/),
 * spawned with `--root`/`--store` (and `--json`), its exit code, stdout, stderr and JSON parsed.
 */
export const REPO = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const THAW_BIN = join(REPO, 'bin', 'thaw');
const BUILT_CLI = join(REPO, 'dist', 'src', 'cli', 'thaw.js');
const BUILD_LOCK = join(REPO, 'dist', '.test-build.lock');

export interface ThawDirs {
  /** `--root`: runtime state (records, runsc root). */
  root: string;
  /** `--store`: snapshot store. */
  store: string;
}

export interface ThawResult {
  exitCode: number;
  stdout: string;
  stderr: string;
  /** The last stdout line parsed as JSON (set when `--json` was passed and stdout held JSON). */
  json: Record<string, unknown> | undefined;
  /** Milliseconds from spawn to exit. */
  wallMs: number;
}

export interface RunThawOptions {
  /** Add `--json` before the verb (default true). */
  json?: boolean;
  timeoutMs?: number;
  /** Extra global flags placed before the verb (e.g. `--log-level`, `--config`). */
  globals?: string[];
  cwd?: string;
}

/** Global flags for a temp root and store (and `--json`). */
export function thawGlobals(dirs: ThawDirs, json = true): string[] {
  return ['--root', dirs.root, '--store', dirs.store, ...(json ? ['--json'] : [])];
}

/** Runs `bin/thaw GLOBALS ARGS…` to completion. Never throws for a non-zero exit. */
export async function runThaw(dirs: ThawDirs, args: readonly string[], opts: RunThawOptions = {}): Promise<ThawResult> {
  await ensureBuilt();
  const argv = [THAW_BIN, ...thawGlobals(dirs, opts.json ?? true), ...(opts.globals ?? []), ...args];
  const t0 = performance.now();
  const r = await execa(process.execPath, argv, {
    reject: false,
    timeout: opts.timeoutMs ?? 180_000,
    stdin: 'ignore',
    env: cliEnv(),
    extendEnv: false,
    encoding: 'utf8',
    stripFinalNewline: false,
    cwd: opts.cwd ?? REPO,
    maxBuffer: 64 << 20,
  });
  const wallMs = performance.now() - t0;
  const stdout = typeof r.stdout === 'string' ? r.stdout : '';
  const stderr = typeof r.stderr === 'string' ? r.stderr : '';
  if (r.timedOut) throw new Error(`thaw ${args.join(' ')} timed out; stderr: ${stderr}`);
  if (r.exitCode === undefined) throw new Error(`thaw ${args.join(' ')} died (${r.signal ?? 'no exit code'}); stderr: ${stderr}`);
  return { exitCode: r.exitCode, stdout, stderr, json: lastJsonLine(stdout), wallMs };
}

/** Like runThaw but fails (throws with stderr) unless thaw exits 0; returns the parsed JSON. */
export async function thawOk(dirs: ThawDirs, args: readonly string[], opts: RunThawOptions = {}): Promise<Record<string, unknown>> {
  const r = await runThaw(dirs, args, opts);
  if (r.exitCode !== 0) throw new Error(`thaw ${args.join(' ')} exited ${r.exitCode}: ${r.stderr.trim()}`);
  if (!r.json) throw new Error(`thaw ${args.join(' ')} printed no JSON: ${JSON.stringify(r.stdout)}`);
  return r.json;
}

/** Starts `bin/thaw …` without waiting; call ensureBuilt() first. */
export function spawnThaw(dirs: ThawDirs, args: readonly string[], opts: RunThawOptions = {}) {
  const argv = [THAW_BIN, ...thawGlobals(dirs, opts.json ?? true), ...(opts.globals ?? []), ...args];
  return execa(process.execPath, argv, {
    reject: false,
    timeout: opts.timeoutMs ?? 180_000,
    stdin: 'ignore',
    env: cliEnv(),
    extendEnv: false,
    encoding: 'utf8',
    stripFinalNewline: false,
    cwd: opts.cwd ?? REPO,
  });
}

/** The environment without tap's NODE_OPTIONS (its loaders would slow every CLI start and change it). */
export function cliEnv(): NodeJS.ProcessEnv {
  const env = { ...process.env };
  delete env.NODE_OPTIONS;
  return env;
}

export function lastJsonLine(stdout: string): Record<string, unknown> | undefined {
  const line = stdout.trim().split('\n').pop();
  if (!line?.startsWith('{')) return undefined;
  try {
    return JSON.parse(line) as Record<string, unknown>;
  } catch {
    return undefined;
  }
}

let built: Promise<void> | undefined;

/**
 * The CLI tests exercise dist/, so dist must reflect src/. Rebuilds (tsc + bundle) when any .ts under src/,
 * demo/ or bench/ is newer than the built CLI; a lock directory keeps parallel test files from
 * running tsc at once (one builds, the others wait and re-check).
 */
export function ensureBuilt(): Promise<void> {
  built ??= buildIfStale();
  return built;
}

async function buildIfStale(): Promise<void> {
  for (let waited = 0; ; waited += 200) {
    if (!(await isStale())) return;
    if (await takeBuildLock()) {
      try {
        if (!(await isStale())) return;
        const r = await execa('npm', ['run', '--silent', 'build:ts'], { cwd: REPO, reject: false, timeout: 300_000, encoding: 'utf8' });
        // Type errors elsewhere in the tree still emit JavaScript; only a missing output is fatal.
        if (!(await mtimeOf(BUILT_CLI))) throw new Error(`tsc produced no ${BUILT_CLI}: ${r.stdout}${r.stderr}`);
        return;
      } finally {
        await rm(BUILD_LOCK, { recursive: true, force: true });
      }
    }
    if (waited > 300_000) throw new Error(`waited 300 s for another test's build (${BUILD_LOCK})`);
    await sleep(200);
  }
}

async function takeBuildLock(): Promise<boolean> {
  await mkdir(dirname(BUILD_LOCK), { recursive: true });
  try {
    await mkdir(BUILD_LOCK);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    // A lock left by a test process that died is stale.
    const pid = Number(await readFile(join(BUILD_LOCK, 'pid'), 'utf8').catch(() => 'NaN'));
    if (Number.isInteger(pid) && !alive(pid)) await rm(BUILD_LOCK, { recursive: true, force: true });
    return false;
  }
  await writeFile(join(BUILD_LOCK, 'pid'), String(process.pid));
  return true;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

async function isStale(): Promise<boolean> {
  const out = await mtimeOf(BUILT_CLI);
  if (out === undefined) return true;
  for (const dir of ['src', 'demo', 'bench']) {
    if ((await newestTs(join(REPO, dir))) > out) return true;
  }
  return false;
}

async function newestTs(dir: string): Promise<number> {
  let newest = 0;
  const entries = await readdir(dir, { withFileTypes: true }).catch(() => []);
  for (const e of entries) {
    const p = join(dir, e.name);
    if (e.isDirectory()) newest = Math.max(newest, await newestTs(p));
    else if (e.name.endsWith('.ts')) newest = Math.max(newest, (await mtimeOf(p)) ?? 0);
  }
  return newest;
}

async function mtimeOf(path: string): Promise<number | undefined> {
  try {
    return (await stat(path)).mtimeMs;
  } catch {
    return undefined;
  }
}
