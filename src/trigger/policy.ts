import { ShimError } from '../errors.js';

/**
 * When thaw snapshots a container and how the app takes part, read from the container's OCI
 * annotations (CRI forwards them when the runtime entry lists `thaw.dev/*` in pod_annotations /
 * container_annotations) over defaults of the same names (from the runtime config). Parsing is
 * pure: every problem becomes a `TriggerConfigError` naming the annotation, its value and what
 * would be accepted, so the shim can log it and run the container without a trigger.
 */
export const TRIGGER_ANNOTATIONS = {
  checkpoint: 'thaw.dev/checkpoint',
  readyExec: 'thaw.dev/ready-exec',
  readyInterval: 'thaw.dev/ready-interval',
  readyTimeout: 'thaw.dev/ready-timeout',
  preCheckpoint: 'thaw.dev/pre-checkpoint',
  postRestore: 'thaw.dev/post-restore',
  hookTimeout: 'thaw.dev/hook-timeout',
  kvCache: 'thaw.dev/kv-cache',
  kvCachePreset: 'thaw.dev/kv-cache-preset',
  kvCacheUrl: 'thaw.dev/kv-cache-url',
  kvCacheDiscard: 'thaw.dev/kv-cache-discard',
  kvCacheRestore: 'thaw.dev/kv-cache-restore',
} as const;

/** CRI marks the pod's sandbox (pause) container; it never takes part in triggers. */
export const CRI_CONTAINER_TYPE_ANNOTATION = 'io.kubernetes.cri.container-type';

export type TriggerKind = 'off' | 'manual' | 'on-request' | 'when-ready' | 'after';

export type TriggerMode =
  | { kind: 'off' }
  /** Only Task.Checkpoint / `thaw checkpoint`. */
  | { kind: 'manual' }
  /** The app asks: POST /checkpoint on /run/thaw/thaw.sock or the file /run/thaw/checkpoint-now. */
  | { kind: 'on-request' }
  /** The readiness probe (`thaw.dev/ready-exec`) succeeds. */
  | { kind: 'when-ready' }
  /** A fixed time after the app started. */
  | { kind: 'after'; delayMs: number };

export type HttpMethod = 'GET' | 'POST' | 'PUT' | 'DELETE';

/** Something run inside the container: a command, or an HTTP call made from inside the sandbox. */
export type Hook =
  | { kind: 'exec'; argv: string[] }
  | { kind: 'http'; method: HttpMethod; url: string; body: string | null };

export type KvCachePreset = 'vllm' | 'sglang' | 'generic';

export type KvCachePolicy =
  | { mode: 'keep' }
  /** `release` runs before the checkpoint, `reacquire` wherever the app carries on after it. */
  | { mode: 'discard'; preset: KvCachePreset; release: Hook; reacquire: Hook };

export interface TriggerPolicy {
  trigger: TriggerMode;
  /** Readiness probe for `when-ready` (exit 0 / HTTP 2xx = ready). */
  ready: Hook | null;
  readyIntervalMs: number;
  /** How long `when-ready` waits for the probe before giving up (no snapshot). */
  readyTimeoutMs: number;
  /** Runs in the source right before the checkpoint (quiesce); a failure means no snapshot. */
  preCheckpoint: Hook | null;
  /** Runs wherever the app carries on from the checkpointed state: every restored copy, and the source after a leave-running checkpoint. */
  postRestore: Hook | null;
  kvCache: KvCachePolicy;
  /** Limit for one hook run (and one readiness probe). */
  hookTimeoutMs: number;
}

export const DEFAULT_HOOK_TIMEOUT_MS = 60_000;
export const DEFAULT_READY_INTERVAL_MS = 1_000;
export const DEFAULT_READY_TIMEOUT_MS = 30 * 60_000;
/** setTimeout's limit (2^31-1 ms, ~24.8 days); longer delays would fire at once. */
const MAX_DURATION_MS = 2_147_483_647;

/** Base URLs the presets use when `thaw.dev/kv-cache-url` is not given (the servers' default ports). */
export const KV_CACHE_PRESET_URLS: Readonly<Record<Exclude<KvCachePreset, 'generic'>, string>> = {
  vllm: 'http://127.0.0.1:8000',
  sglang: 'http://127.0.0.1:30000',
};

/** A bad trigger annotation (or default): names the annotation, its value and what is accepted. */
export class TriggerConfigError extends ShimError {
  readonly annotation: string;
  readonly value: string;
  constructor(annotation: string, value: string, what: string) {
    super('InvalidArgument', `annotation ${annotation}=${JSON.stringify(value)}: ${what}`);
    this.annotation = annotation;
    this.value = value;
  }
}

export type Annotations = Readonly<Record<string, string>>;

/**
 * True when thaw mounts its control directory at /run/thaw for this container: the checkpoint
 * annotation is present and not `off`, whatever its value (an invalid one included), so the mount
 * set, which is part of the snapshot key, depends only on the annotation being there.
 */
export function wantsControlDir(annotations: Annotations, defaults: Annotations = {}): boolean {
  if (annotations[CRI_CONTAINER_TYPE_ANNOTATION] === 'sandbox') return false;
  const value = annotations[TRIGGER_ANNOTATIONS.checkpoint] ?? defaults[TRIGGER_ANNOTATIONS.checkpoint];
  return value !== undefined && value.trim() !== 'off';
}

/** Parses the trigger annotations (over `defaults`); throws TriggerConfigError on the first problem. */
export function parseTriggerPolicy(annotations: Annotations, defaults: Annotations = {}): TriggerPolicy {
  const A = TRIGGER_ANNOTATIONS;
  const get = (name: string): string | undefined => {
    const v = annotations[name] ?? defaults[name];
    return v === undefined ? undefined : v.trim();
  };
  const trigger = annotations[CRI_CONTAINER_TYPE_ANNOTATION] === 'sandbox' ? ({ kind: 'off' } as const) : parseTrigger(get(A.checkpoint));
  const durationOf = (name: string, dflt: number): number => {
    const v = get(name);
    return v === undefined ? dflt : parseDurationFor(name, v);
  };
  const hookOf = (name: string, defaultMethod: HttpMethod): Hook | null => {
    const v = get(name);
    return v === undefined ? null : parseHook(name, v, defaultMethod);
  };
  const policy: TriggerPolicy = {
    trigger,
    ready: hookOf(A.readyExec, 'GET'),
    readyIntervalMs: durationOf(A.readyInterval, DEFAULT_READY_INTERVAL_MS),
    readyTimeoutMs: durationOf(A.readyTimeout, DEFAULT_READY_TIMEOUT_MS),
    preCheckpoint: hookOf(A.preCheckpoint, 'POST'),
    postRestore: hookOf(A.postRestore, 'POST'),
    kvCache: parseKvCache(get),
    hookTimeoutMs: durationOf(A.hookTimeout, DEFAULT_HOOK_TIMEOUT_MS),
  };
  if (trigger.kind === 'when-ready' && policy.ready === null) {
    throw new TriggerConfigError(A.checkpoint, 'when-ready', `needs a readiness probe in ${A.readyExec} (a JSON array command or an http:// URL)`);
  }
  return policy;
}

function parseTrigger(value: string | undefined): TriggerMode {
  const name = TRIGGER_ANNOTATIONS.checkpoint;
  if (value === undefined || value === 'off') return { kind: 'off' };
  if (value === 'manual' || value === 'on-request' || value === 'when-ready') return { kind: value };
  if (value.startsWith('after:')) return { kind: 'after', delayMs: parseDurationFor(name, value.slice('after:'.length).trim(), value) };
  throw new TriggerConfigError(name, value, 'unknown trigger: use off, manual, on-request, when-ready or after:DURATION (e.g. after:90s)');
}

const DURATION_UNITS_MS: Readonly<Record<string, number>> = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000 };

/**
 * Go-style durations: one or more `<number><unit>` with units ms, s, m, h (`500ms`, `90s`, `1m30s`,
 * `1.5h`). Must be positive and at most ~24.8 days. Returns milliseconds (rounded).
 */
export function parseDuration(text: string): number {
  const s = text.trim();
  const part = /(\d+(?:\.\d+)?)(ms|s|m|h)/y;
  let total = 0;
  let i = 0;
  while (i < s.length) {
    part.lastIndex = i;
    const m = part.exec(s);
    if (!m) throw new RangeError(`${JSON.stringify(text)} is not a duration: use e.g. 500ms, 90s, 5m, 1h30m`);
    total += Number(m[1]) * DURATION_UNITS_MS[m[2]!]!;
    i = part.lastIndex;
  }
  if (s.length === 0) throw new RangeError('empty duration: use e.g. 500ms, 90s, 5m, 1h30m');
  const ms = Math.round(total);
  if (ms <= 0) throw new RangeError(`duration ${JSON.stringify(text)} must be positive`);
  if (ms > MAX_DURATION_MS) throw new RangeError(`duration ${JSON.stringify(text)} is longer than 24 days`);
  return ms;
}

function parseDurationFor(annotation: string, text: string, whole: string = text): number {
  try {
    return parseDuration(text);
  } catch (err) {
    throw new TriggerConfigError(annotation, whole, (err as Error).message);
  }
}

/**
 * A hook: a JSON array of strings runs as a command in the container (`["/bin/sh","-c","…"]`);
 * `[METHOD ]http://HOST[:PORT]/PATH[ BODY]` is an HTTP call made from inside the sandbox (the
 * container has no network the host could reach), METHOD defaulting to `defaultMethod`, BODY sent
 * as application/json.
 */
export function parseHook(annotation: string, value: string, defaultMethod: HttpMethod = 'POST'): Hook {
  const v = value.trim();
  if (v.startsWith('[')) {
    let argv: unknown;
    try {
      argv = JSON.parse(v);
    } catch (err) {
      throw new TriggerConfigError(annotation, value, `not a valid JSON array: ${(err as Error).message}`);
    }
    if (!Array.isArray(argv) || argv.length === 0 || !argv.every((a) => typeof a === 'string') || argv[0] === '') {
      throw new TriggerConfigError(annotation, value, 'a command must be a non-empty JSON array of strings, e.g. ["/bin/sh","-c","…"]');
    }
    return { kind: 'exec', argv: argv as string[] };
  }
  const m = /^(?:(GET|POST|PUT|DELETE)\s+)?(\S+)(?:\s+([\s\S]+))?$/.exec(v);
  const target = m?.[2];
  if (!m || target === undefined || !/^[a-z][a-z0-9+.-]*:\/\//i.test(target)) {
    throw new TriggerConfigError(annotation, value, 'use a JSON array (a command run in the container) or [METHOD ]http://HOST:PORT/PATH[ JSON-BODY]');
  }
  let url: URL;
  try {
    url = new URL(target);
  } catch {
    throw new TriggerConfigError(annotation, value, `${JSON.stringify(target)} is not a valid URL`);
  }
  if (url.protocol !== 'http:') {
    throw new TriggerConfigError(annotation, value, `only http:// is supported (the call is made inside the sandbox), not ${url.protocol}//`);
  }
  const body = m[3]?.trim() ?? null;
  if (body !== null) {
    try {
      JSON.parse(body);
    } catch (err) {
      throw new TriggerConfigError(annotation, value, `the body after the URL must be JSON: ${(err as Error).message}`);
    }
  }
  return { kind: 'http', method: (m[1] as HttpMethod | undefined) ?? defaultMethod, url: url.href, body };
}

function parseKvCache(get: (name: string) => string | undefined): KvCachePolicy {
  const A = TRIGGER_ANNOTATIONS;
  const mode = get(A.kvCache) ?? 'keep';
  if (mode === 'keep') return { mode: 'keep' };
  if (mode !== 'discard') throw new TriggerConfigError(A.kvCache, mode, 'use keep or discard');
  const preset = get(A.kvCachePreset) ?? (get(A.kvCacheDiscard) !== undefined ? 'generic' : 'vllm');
  if (preset === 'generic') {
    const release = get(A.kvCacheDiscard);
    const reacquire = get(A.kvCacheRestore);
    if (release === undefined || reacquire === undefined) {
      throw new TriggerConfigError(A.kvCachePreset, preset, `generic needs both ${A.kvCacheDiscard} and ${A.kvCacheRestore} (hooks: a JSON array command or [METHOD ]http://…)`);
    }
    return { mode: 'discard', preset, release: parseHook(A.kvCacheDiscard, release), reacquire: parseHook(A.kvCacheRestore, reacquire) };
  }
  if (preset !== 'vllm' && preset !== 'sglang') throw new TriggerConfigError(A.kvCachePreset, preset, 'use vllm, sglang or generic');
  const baseText = get(A.kvCacheUrl) ?? KV_CACHE_PRESET_URLS[preset];
  const base = parseHook(A.kvCacheUrl, baseText);
  if (base.kind !== 'http' || base.body !== null || baseText.includes(' ')) {
    throw new TriggerConfigError(A.kvCacheUrl, baseText, 'must be a base URL such as http://127.0.0.1:8000');
  }
  const at = (path: string): string => new URL(path, base.url.endsWith('/') ? base.url : `${base.url}/`).href;
  if (preset === 'vllm') {
    // vLLM (--enable-sleep-mode, VLLM_SERVER_DEV_MODE=1): level 1 moves weights to CPU RAM and drops the KV cache.
    return {
      mode: 'discard',
      preset,
      release: { kind: 'http', method: 'POST', url: at('sleep?level=1'), body: null },
      reacquire: { kind: 'http', method: 'POST', url: at('wake_up'), body: null },
    };
  }
  // SGLang (--enable-memory-saver): releasing only the kv_cache tag keeps the weights on the GPU.
  const tags = JSON.stringify({ tags: ['kv_cache'] });
  return {
    mode: 'discard',
    preset,
    release: { kind: 'http', method: 'POST', url: at('release_memory_occupation'), body: tags },
    reacquire: { kind: 'http', method: 'POST', url: at('resume_memory_occupation'), body: tags },
  };
}

/** One line for logs and the status file: `after:90s`, `on-request`, … */
export function describeTrigger(t: TriggerMode): string {
  return t.kind === 'after' ? `after:${t.delayMs}ms` : t.kind;
}

/** A hook as a person reads it in a log line. */
export function describeHook(h: Hook): string {
  return h.kind === 'exec' ? JSON.stringify(h.argv) : `${h.method} ${h.url}${h.body === null ? '' : ` ${h.body}`}`;
}
