/**
 * CRIU as the native engine sees it: reading its logs, probing its version, `criu check`.
 *
 * runc drives CRIU itself (`runc --criu PATH checkpoint|restore`); thaw only runs CRIU directly to
 * probe it. On our machines CRIU 4.1.1 is trixie's binary in a private prefix, started through the
 * prefix's own loader by a wrapper script (scripts/setup.sh, docs/native-engine.md): bookworm's 3.17
 * fails on kernel 6.18 and trixie's needs glibc 2.38.
 *
 * CRIU logs one line per record: `(00.068201) Error (criu/files-reg.c:1790): Can't lookup mount=27 …`.
 * A failed dump or restore ends in a cascade (`Dump files (pid: N) failed with -1`, `Dumping FAILED.`),
 * so the line worth quoting is the first Error that is neither one of those summaries nor one of the
 * errors CRIU logs on every run here (no CAP_SYS_RESOURCE: `rlimit: Can't setup RLIMIT_NOFILE`).
 */
import { open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { ShimError } from '../errors.js';

export type CriuLogLevel = 'Error' | 'Warn' | 'Info' | 'Debug' | 'Other';

export interface CriuLogRecord {
  /** Seconds since CRIU started, as logged. */
  time: number;
  level: CriuLogLevel;
  /** `criu/files-reg.c:1790`, when the line names one. */
  source: string;
  message: string;
}

const LINE = /^\((\d+\.\d+)\)\s+(?:(Error|Warn)\s+\(([^)]*)\):\s*)?(.*)$/;

/** Parses CRIU's log text; lines that are not CRIU records are skipped. */
export function parseCriuLog(text: string): CriuLogRecord[] {
  const out: CriuLogRecord[] = [];
  for (const raw of text.split('\n')) {
    const m = LINE.exec(raw.trimEnd());
    if (!m) continue;
    const level = (m[2] as CriuLogLevel | undefined) ?? 'Other';
    out.push({ time: Number(m[1]), level, source: m[3] ?? '', message: (m[4] ?? '').trim() });
  }
  return out;
}

/** Errors CRIU logs on every run on our machines; they never explain a failure. */
const HARMLESS: readonly RegExp[] = [
  /rlimit: Can't setup RLIMIT_NOFILE for self/,
  /Can't keep kdat cache on non-tempfs/,
  /restore late stage hook for external plugin failed/,
];

/** Consequences that follow the real cause. */
const SUMMARIES: readonly RegExp[] = [
  /^Dumping FAILED\.?$/,
  /^Restoring FAILED\.?$/,
  /^Pre-dumping FAILED\.?$/,
  /^Dump files \(pid: \d+\) failed with -?\d+$/,
  /^Dumping \w+ failed/,
  /cgroupd: recv req error/,
  /^Unable to (?:kill|resume) tasks?/,
];

/** The line to quote from a CRIU log: the first real Error (see the header), or ''. */
export function criuErrorLine(text: string): string {
  const errors = parseCriuLog(text).filter((r) => r.level === 'Error' && !HARMLESS.some((p) => p.test(r.message)));
  const cause = errors.find((r) => !SUMMARIES.some((p) => p.test(r.message))) ?? errors[0];
  if (cause === undefined) return '';
  return cause.source ? `${cause.message} (${cause.source})` : cause.message;
}

export type CriuAction = 'dump' | 'restore';

/** CRIU's log file for `action` in runc's `--work-path` directory. */
export function criuLogPath(workDir: string, action: CriuAction): string {
  return join(workDir, `${action}.log`);
}

/** How much of a CRIU log is read from each end when it is larger than twice this. */
const LOG_END_BYTES = 2 << 20;

/**
 * The quotable error of `<workDir>/<action>.log`, or '' when there is none (or no log). A log can
 * be huge — CRIU 4.1.1's restorer spinning on a truncated pages file logs ~50 MB/s — so only its
 * first and last 2 MiB are read (the cause is near the start, the cascade at the end).
 */
export async function readCriuError(workDir: string, action: CriuAction): Promise<string> {
  let handle;
  try {
    handle = await open(criuLogPath(workDir, action), 'r');
  } catch {
    return '';
  }
  try {
    const { size } = await handle.stat();
    if (size <= 2 * LOG_END_BYTES) return criuErrorLine(await handle.readFile('utf8'));
    const head = Buffer.alloc(LOG_END_BYTES);
    const tail = Buffer.alloc(LOG_END_BYTES);
    await handle.read(head, 0, LOG_END_BYTES, 0);
    await handle.read(tail, 0, LOG_END_BYTES, size - LOG_END_BYTES);
    // Drop the lines cut in half at the seams.
    const headText = head.toString('utf8').replace(/[^\n]*$/, '');
    const tailText = tail.toString('utf8').replace(/^[^\n]*\n/, '');
    return criuErrorLine(`${headText}\n${tailText}`);
  } catch {
    return '';
  } finally {
    await handle.close();
  }
}

/**
 * Unmounts every mount point at or below `dir` (deepest first; lazily, as a dying CRIU may hold one
 * for a moment) and resolves once none is left. What a CRIU or runc killed mid-restore leaves:
 * runc's `criu-root` (a recursive bind of the container's rootfs — deleting through it deletes the
 * rootfs) and CRIU's cgroup yard `.criu.cgyard.XXXXXX` (a tmpfs with every cgroup hierarchy) in
 * its work dir. Returns the mount points it found.
 */
export async function unmountAllUnder(dir: string): Promise<string[]> {
  const found: string[] = [];
  for (let round = 0; ; round++) {
    const mounts = await mountPointsUnder(dir);
    if (mounts.length === 0) return found;
    if (round === 5) throw new ShimError('Internal', `cannot unmount ${mounts.join(', ')}`);
    found.push(...mounts);
    for (const m of mounts) {
      // Node has no umount(2).
      const r = await execa('umount', ['-l', m], { reject: false, timeout: PROBE_TIMEOUT_MS, stdin: 'ignore', encoding: 'utf8' });
      if (r.exitCode !== 0 && !/not mounted|no mount point/.test(String(r.stderr))) {
        throw new ShimError('Internal', `cannot unmount ${m}: ${String(r.stderr).trim().split('\n').at(-1) ?? ''}`);
      }
    }
  }
}

/** Mount points at or below `dir` in this mount namespace, deepest first. */
async function mountPointsUnder(dir: string): Promise<string[]> {
  const text = await readFile('/proc/self/mountinfo', 'utf8');
  // Field 5 is the mount point, with space, tab, newline and backslash escaped as \ooo.
  const points = text
    .split('\n')
    .map((l) => (l.split(' ')[4] ?? '').replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))))
    .filter((m) => m === dir || m.startsWith(`${dir}/`));
  return [...new Set(points)].sort((a, b) => b.length - a.length);
}

/** How long a probe of the CRIU binary may take. */
const PROBE_TIMEOUT_MS = 30_000;

interface CriuRun {
  exitCode: number | undefined;
  output: string;
  failed: boolean;
  shortMessage: string;
}

/** The one place that execs CRIU (probes only: runc execs it for checkpoint and restore). */
async function runCriu(path: string, args: readonly string[], signal?: AbortSignal): Promise<CriuRun> {
  const r = await execa(path, args, {
    reject: false,
    timeout: PROBE_TIMEOUT_MS,
    cancelSignal: signal,
    forceKillAfterDelay: 2_000,
    stdin: 'ignore',
    all: true,
    encoding: 'utf8',
  });
  return { exitCode: r.exitCode, output: typeof r.all === "string" ? r.all : "", failed: r.failed, shortMessage: r.shortMessage ?? "" };
}

const versions = new Map<string, Promise<string>>();

/** `criu --version` → `4.1.1` (probed once per binary path). */
export function criuVersion(path: string, signal?: AbortSignal): Promise<string> {
  let p = versions.get(path);
  if (p === undefined) {
    p = probeVersion(path, signal);
    versions.set(path, p);
    p.catch(() => versions.delete(path));
  }
  return p;
}

async function probeVersion(path: string, signal?: AbortSignal): Promise<string> {
  const r = await runCriu(path, ['--version'], signal);
  const v = parseCriuVersion(r.output);
  if (r.failed || v === null) {
    throw new ShimError('Unavailable', `cannot probe CRIU at ${path}: ${r.failed ? r.shortMessage : 'no version in its output'}`, {
      cause: r.output,
    });
  }
  return v;
}

/** `Version: 4.1.1` (and `GitID: …` lines) → `4.1.1`; null when absent. */
export function parseCriuVersion(text: string): string | null {
  const m = /^Version:\s*(\S+)/m.exec(text);
  return m?.[1] ?? null;
}

export interface CriuCheck {
  ok: boolean;
  /** CRIU's output (warnings included). */
  output: string;
}

/** `criu check`: ok when CRIU says `Looks good.` (a warning about the kdat cache is normal here). */
export async function criuCheck(path: string, signal?: AbortSignal): Promise<CriuCheck> {
  const r = await runCriu(path, ['check'], signal);
  if (r.exitCode === undefined) {
    throw new ShimError('Unavailable', `cannot run CRIU at ${path}: ${r.shortMessage}`, { cause: r.output });
  }
  return { ok: r.exitCode === 0 && /Looks good\./.test(r.output), output: r.output };
}

const features = new Map<string, Promise<CriuCheck>>();

/**
 * `criu check --feature NAME` (e.g. `uffd-noncoop`, which lazy restores need): ok when CRIU exits 0
 * (it prints `NAME is supported`). Probed once per binary path and feature; a probe that could not
 * run at all is not cached.
 */
export function criuCheckFeature(path: string, feature: string, signal?: AbortSignal): Promise<CriuCheck> {
  const key = `${path}\0${feature}`;
  let p = features.get(key);
  if (p === undefined) {
    p = runCriu(path, ['check', '--feature', feature], signal).then((r) => {
      if (r.exitCode === undefined) {
        throw new ShimError('Unavailable', `cannot run CRIU at ${path}: ${r.shortMessage}`, { cause: r.output });
      }
      return { ok: r.exitCode === 0, output: r.output };
    });
    features.set(key, p);
    p.catch(() => features.delete(key));
  }
  return p;
}

/** For tests: forget probed versions and features. */
export function clearCriuVersionCache(): void {
  versions.clear();
  features.clear();
}
