import { ShimError } from '../errors.js';
import type { CheckpointOptions, CompressionLevel, RestoreOptions } from './options.js';

/**
 * What the installed runsc can do, read from its own help texts (`runsc --version`, `runsc help
 * checkpoint`, `runsc help restore`, `runsc flags`), because checkpoint flags and defaults differ by
 * release: 20240729 compresses by default and has no `restore --background`; upstream writes
 * uncompressed images by default, has `--background` and `--cuda-checkpoint-path`. Probed once per
 * binary path and cached for the process.
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

/** Probes `path` once per process; a failed probe is forgotten so the next call retries. */
export function probeRunsc(path: string, run: ProbeRunner): Promise<RunscCapabilities> {
  let pending = cache.get(path);
  if (pending === undefined) {
    pending = (async () => {
      const [version, helpCheckpoint, helpRestore, flags] = await Promise.all([
        run(['--version']),
        run(['help', 'checkpoint']),
        run(['help', 'restore']),
        run(['flags']),
      ]);
      return parseCapabilities({ version, helpCheckpoint, helpRestore, flags });
    })();
    cache.set(path, pending);
    pending.catch(() => cache.delete(path));
  }
  return pending;
}

/** Forgets cached probes (tests; after the binary was replaced). */
export function clearProbeCache(): void {
  cache.clear();
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
