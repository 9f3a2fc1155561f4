import { createHash } from 'node:crypto';
import { mkdir, readFile, realpath, stat } from 'node:fs/promises';
import { delimiter, join } from 'node:path';
import { writeFileAtomic } from '../atomic-file.js';
import { ShimError } from '../errors.js';
import type { CheckpointOptions, CompressionLevel, RestoreOptions } from './options.js';

/**
 * What the installed runsc can do, read from its own help texts (`runsc --version`, `runsc help
 * checkpoint`, `runsc help restore`, `runsc flags`), because checkpoint flags and defaults differ by
 * release: 20240729 compresses by default and has no `restore --background`; upstream writes
 * uncompressed images by default, has `--background` and `--cuda-checkpoint-path`. Probed once per
 * binary path and cached for the process; with a cache directory also on disk, keyed by the binary's
 * identity (resolved path, size, mtime, inode), because every new shim process would otherwise run
 * four runsc processes before its first create (0.07 s idle, 0.2 s under load).
 */

export interface RunscCapabilities {
  /** As printed by `runsc --version`: `0.0~20240729.0`, `release-20260608.0`. */
  version: string;
  /** `checkpoint --compression`: accepted values and runsc's default; null = no such flag (always compressed). */
  compression: { values: CompressionLevel[]; default: CompressionLevel | null } | null;
  /** `checkpoint --direct` (O_DIRECT page writes). */
  checkpointDirect: boolean;
  excludeCommittedZeroPages: boolean;
  /** `checkpoint --cuda-checkpoint-path` (sentry runs cuda-checkpoint in the sandbox). */
  cudaCheckpointPath: boolean;
  cudaCheckpointSequential: boolean;
  /** `restore --direct` (O_DIRECT page reads). */
  restoreDirect: boolean;
  /** `restore --background` (pages keep loading after restore returns; uncompressed images). */
  restoreBackground: boolean;
  /** Top-level `--nvproxy` (GPU support). */
  nvproxy: boolean;
}

/** Raw outputs of the probe commands (stdout and stderr together: `runsc flags` prints to stderr). */
export interface RunscHelpTexts {
  version: string;
  helpCheckpoint: string;
  helpRestore: string;
  flags: string;
}

export interface FlagHelp {
  /** Go's type word (`string`, `value`, `int`, `duration`); undefined for booleans. */
  type: string | undefined;
  usage: string;
  /** From Go's `(default X)` suffix; undefined when the default is the zero value. */
  default: string | undefined;
}

/** Parses Go `flag.PrintDefaults` output: `  -name type` then `    \tusage` lines. */
export function parseFlagHelp(text: string): Map<string, FlagHelp> {
  const flags = new Map<string, FlagHelp>();
  let current: { name: string; type: string | undefined; usage: string[] } | undefined;
  const finish = (): void => {
    if (current === undefined) return;
    const usage = current.usage.join('\n').trim();
    const m = /\(default ("?)(.*)\1\)\s*$/.exec(usage);
    flags.set(current.name, { type: current.type, usage, default: m?.[2] });
    current = undefined;
  };
  for (const line of text.split('\n')) {
    const head = /^ {1,2}-([A-Za-z0-9][\w.-]*)(?:[ \t]+(.*))?$/.exec(line);
    if (head !== null) {
      finish();
      const name = head[1]!;
      const rest = head[2]?.trim();
      // Go puts a one-letter flag's usage on the same line after a tab; longer names get a type word.
      if (name.length === 1 && line.includes('\t')) current = { name, type: undefined, usage: [rest ?? ''] };
      else current = { name, type: rest === '' ? undefined : rest, usage: [] };
    } else if (current !== undefined && /^\s{3,}/.test(line)) {
      current.usage.push(line.trim());
    } else {
      finish();
    }
  }
  finish();
  return flags;
}

export function parseVersion(text: string): string {
  const m = /runsc version (\S+)/.exec(text);
  if (m === null) {
    throw new ShimError('Unavailable', `cannot read runsc version from ${JSON.stringify(text.slice(0, 200))}`);
  }
  return m[1]!;
}

export function parseCapabilities(texts: RunscHelpTexts): RunscCapabilities {
  const checkpoint = parseFlagHelp(texts.helpCheckpoint);
  const restore = parseFlagHelp(texts.helpRestore);
  const top = parseFlagHelp(texts.flags);
  const compressionFlag = checkpoint.get('compression');
  return {
    version: parseVersion(texts.version),
    compression: compressionFlag === undefined ? null : parseCompression(compressionFlag),
    checkpointDirect: checkpoint.has('direct'),
    excludeCommittedZeroPages: checkpoint.has('exclude-committed-zero-pages'),
    cudaCheckpointPath: checkpoint.has('cuda-checkpoint-path'),
    cudaCheckpointSequential: checkpoint.has('cuda-checkpoint-sequential'),
    restoreDirect: restore.has('direct'),
    restoreBackground: restore.has('background'),
    nvproxy: top.has('nvproxy'),
  };
}

function parseCompression(f: FlagHelp): { values: CompressionLevel[]; default: CompressionLevel | null } {
  const listed = /Values: ([\w|-]+)/.exec(f.usage)?.[1]?.split('|') ?? [];
  const values = listed.filter(isCompressionLevel);
  const def = f.default !== undefined && isCompressionLevel(f.default) ? f.default : null;
  return { values: values.length > 0 ? values : ['none', 'flate-best-speed'], default: def };
}

function isCompressionLevel(s: string): s is CompressionLevel {
  return s === 'none' || s === 'flate-best-speed';
}

/** Runs one probe command (no global flags) and returns stdout + stderr. */
export type ProbeRunner = (args: readonly string[]) => Promise<string>;

const cache = new Map<string, Promise<RunscCapabilities>>();

/**
 * Probes `path` once per process; a failed probe is forgotten so the next call retries. With
 * `cacheDir`, the help texts are also kept there for the next process, and reused while the
 * binary that `path` resolves to is unchanged (same real path, size, mtime and inode).
 */
export function probeRunsc(path: string, run: ProbeRunner, cacheDir?: string): Promise<RunscCapabilities> {
  let pending = cache.get(path);
  if (pending === undefined) {
    pending = (async () => {
      const binary = cacheDir === undefined ? null : await binaryIdentity(path);
      const file = binary === null || cacheDir === undefined ? null : join(cacheDir, `runsc-probe-${sha256(binary.path).slice(0, 16)}.json`);
      const cached = file === null ? null : await readProbeCache(file, binary);
      if (cached !== null) return parseCapabilities(cached);
      const [version, helpCheckpoint, helpRestore, flags] = await Promise.all([
        run(['--version']),
        run(['help', 'checkpoint']),
        run(['help', 'restore']),
        run(['flags']),
      ]);
      const texts = { version, helpCheckpoint, helpRestore, flags };
      const caps = parseCapabilities(texts);
      if (file !== null && cacheDir !== undefined) await writeProbeCache(cacheDir, file, { binary, texts }).catch(() => undefined);
      return caps;
    })();
    cache.set(path, pending);
    pending.catch(() => cache.delete(path));
  }
  return pending;
}

/** Forgets cached probes (tests; after the binary was replaced). The on-disk cache checks itself. */
export function clearProbeCache(): void {
  cache.clear();
}

/** What identifies an installed runsc binary: a replaced or upgraded one differs in one of these. */
export interface BinaryIdentity {
  path: string;
  size: number;
  mtimeMs: number;
  ino: number;
}

interface ProbeCacheFile {
  binary: BinaryIdentity | null;
  texts: RunscHelpTexts;
}

/** `path` as exec would find it (PATH lookup for a bare name), resolved; null when not found. */
export async function binaryIdentity(path: string): Promise<BinaryIdentity | null> {
  const candidates = path.includes('/') ? [path] : (process.env.PATH ?? '').split(delimiter).filter((d) => d !== '').map((d) => join(d, path));
  for (const candidate of candidates) {
    try {
      const real = await realpath(candidate);
      const st = await stat(real);
      if (st.isFile()) return { path: real, size: st.size, mtimeMs: st.mtimeMs, ino: st.ino };
    } catch {
      // not in this directory
    }
  }
  return null;
}

async function readProbeCache(file: string, binary: BinaryIdentity | null): Promise<RunscHelpTexts | null> {
  if (binary === null) return null;
  try {
    const c = JSON.parse(await readFile(file, 'utf8')) as Partial<ProbeCacheFile>;
    const b = c.binary;
    const t = c.texts;
    const same = b !== null && b !== undefined && b.path === binary.path && b.size === binary.size && b.mtimeMs === binary.mtimeMs && b.ino === binary.ino;
    const complete = t !== undefined && [t.version, t.helpCheckpoint, t.helpRestore, t.flags].every((x) => typeof x === 'string');
    return same && complete ? t : null;
  } catch {
    return null; // absent or unreadable: probe again
  }
}

async function writeProbeCache(dir: string, file: string, content: ProbeCacheFile): Promise<void> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await writeFileAtomic(file, JSON.stringify(content), 0o600);
}

function sha256(text: string): string {
  return createHash('sha256').update(text).digest('hex');
}

export interface CheckpointPreferences {
  /** `auto` = none where runsc has it (raw page-aligned pages.img, fastest), else runsc's default. */
  compression: 'auto' | CompressionLevel;
  /** O_DIRECT writes where runsc has them (7–10x faster checkpoints measured). */
  direct: boolean;
  excludeCommittedZeroPages?: boolean;
}

export type CheckpointFlags = Pick<CheckpointOptions, 'compression' | 'direct' | 'excludeCommittedZeroPages'>;

/**
 * Flags for the best checkpoint this runsc can write. Compression is always explicit when runsc
 * has the flag, so the image format does not depend on the version's default.
 */
export function bestCheckpointFlags(caps: RunscCapabilities, prefs: CheckpointPreferences): CheckpointFlags {
  let compression: CompressionLevel | undefined;
  if (caps.compression !== null) {
    if (prefs.compression === 'auto') {
      compression = caps.compression.values.includes('none') ? 'none' : (caps.compression.default ?? undefined);
    } else if (caps.compression.values.includes(prefs.compression)) {
      compression = prefs.compression;
    }
  }
  // A runsc without the flag always compresses, so asking for flate there is already satisfied.
  const satisfied =
    compression === prefs.compression || (caps.compression === null && prefs.compression === 'flate-best-speed');
  if (prefs.compression !== 'auto' && !satisfied) {
    throw new ShimError(
      'FailedPrecondition',
      `runsc ${caps.version} cannot write checkpoints with compression ${prefs.compression}`,
    );
  }
  return {
    compression,
    direct: prefs.direct && caps.checkpointDirect,
    excludeCommittedZeroPages: (prefs.excludeCommittedZeroPages ?? false) && caps.excludeCommittedZeroPages,
  };
}

/** How an image was written, as recorded at checkpoint time. */
export interface ImageFormat {
  /** Undefined when written without the flag (runsc's default then: compressed on 20240729). */
  compression: CompressionLevel | undefined;
  direct: boolean;
}

export interface RestorePreferences {
  /** Let pages keep loading after restore returns where runsc can (default true). */
  background?: boolean;
}

export type RestoreFlags = Pick<RestoreOptions, 'direct' | 'background'>;

/** `--direct` when the image was written direct; `--background` when available and uncompressed. */
export function bestRestoreFlags(
  caps: RunscCapabilities,
  image: ImageFormat,
  prefs: RestorePreferences = {},
): RestoreFlags {
  return {
    direct: image.direct && caps.restoreDirect,
    background: (prefs.background ?? true) && caps.restoreBackground && image.compression === 'none',
  };
}
