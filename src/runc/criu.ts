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
import { readFile } from 'node:fs/promises';
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

/** The quotable error of `<workDir>/<action>.log`, or '' when there is none (or no log). */
export async function readCriuError(workDir: string, action: CriuAction): Promise<string> {
  const text = await readFile(criuLogPath(workDir, action), 'utf8').catch(() => '');
  return criuErrorLine(text);
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

/** For tests: forget probed versions. */
export function clearCriuVersionCache(): void {
  versions.clear();
}
