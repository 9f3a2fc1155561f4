import { ShimError, asShimError } from '../errors.js';
import type { ContainerExec } from './container-exec.js';
import { describeHook, type Hook } from './policy.js';

/**
 * Runs hooks and readiness probes inside the container. A command hook runs as given; an HTTP hook
 * runs a small shell script in the container that makes the call with whatever client the image
 * has (curl, wget, busybox wget, python3): with `--network=none` the sandbox's loopback, where the
 * app listens, is reachable only from inside. Success = exit 0 (HTTP: a 2xx answer).
 */
export type HookName = 'ready' | 'pre-checkpoint' | 'post-restore' | 'kv-cache-discard' | 'kv-cache-restore';

/** A hook that failed, timed out or could not run; `output` is the tail of what it printed. */
export class HookError extends ShimError {
  readonly hook: HookName;
  readonly exitCode: number | null;
  readonly output: string;
  constructor(hook: HookName, h: Hook, detail: string, fields: { exitCode: number | null; output: string; code?: ShimError['code'] }, cause?: unknown) {
    super(fields.code ?? 'FailedPrecondition', `${hook} hook ${describeHook(h)} ${detail}`, { cause });
    this.hook = hook;
    this.exitCode = fields.exitCode;
    this.output = fields.output;
  }
}

export interface HookRunOptions {
  timeoutMs: number;
  /** Extra env for command hooks (THAW_HOOK, THAW_PHASE, …). */
  env?: readonly string[];
  signal?: AbortSignal;
}

export interface HookResult {
  durationMs: number;
  output: string;
}

/**
 * The script behind HTTP hooks: `sh -c SCRIPT thaw-http METHOD URL BODY TIMEOUT_S`. Exit 0 on a 2xx
 * answer; 127 when the image has no HTTP client. busybox wget only does GET and POST, and gets no
 * `-T` (busybox 1.35's wget crashes with it); the exec's own timeout bounds it.
 */
export const HTTP_HOOK_SCRIPT = [
  'm=$1; u=$2; b=$3; t=$4',
  'if command -v curl >/dev/null 2>&1; then',
  '  if [ -n "$b" ]; then exec curl -fsS -m "$t" -X "$m" -H "Content-Type: application/json" --data-binary "$b" "$u"; fi',
  '  exec curl -fsS -m "$t" -X "$m" "$u"',
  'fi',
  'if command -v python3 >/dev/null 2>&1; then',
  '  exec python3 -c \'import sys, urllib.request as r',
  'm, u, b, t = sys.argv[1:5]',
  'data = b.encode() if b else (b"" if m != "GET" else None)',
  'req = r.Request(u, data=data, method=m, headers={"Content-Type": "application/json"} if b else {})',
  'sys.stdout.write(r.urlopen(req, timeout=float(t)).read().decode(errors="replace"))\' "$m" "$u" "$b" "$t"',
  'fi',
  'w=',
  'if command -v wget >/dev/null 2>&1; then w=wget; elif [ -x /bin/busybox ]; then w="/bin/busybox wget"; fi',
  'if [ -n "$w" ]; then',
  '  case "$m" in',
  '    GET) exec $w -q -O - "$u" ;;',
  '    POST) if [ -n "$b" ]; then exec $w -q -O - --header "Content-Type: application/json" --post-data "$b" "$u"; fi',
  '          exec $w -q -O - --post-data "" "$u" ;;',
  '  esac',
  '  echo "thaw: wget cannot send $m; the image needs curl or python3" >&2; exit 127',
  'fi',
  'echo "thaw: no HTTP client in the container (curl, wget, busybox or python3)" >&2; exit 127',
].join('\n');

/** The command that performs `hook` inside the container. */
export function hookArgv(hook: Hook, timeoutMs: number): string[] {
  if (hook.kind === 'exec') return [...hook.argv];
  const seconds = String(Math.max(1, Math.ceil(timeoutMs / 1000)));
  return ['/bin/sh', '-c', HTTP_HOOK_SCRIPT, 'thaw-http', hook.method, hook.url, hook.body ?? '', seconds];
}

export class HookRunner {
  constructor(private readonly exec: ContainerExec) {}

  /** Runs `hook`; resolves on success, rejects with HookError otherwise. */
  async run(name: HookName, hook: Hook, o: HookRunOptions): Promise<HookResult> {
    let outcome;
    try {
      outcome = await this.exec.run({
        argv: hookArgv(hook, o.timeoutMs),
        env: [`THAW_HOOK=${name}`, ...(o.env ?? [])],
        timeoutMs: o.timeoutMs,
        signal: o.signal,
      });
    } catch (err) {
      const e = asShimError(err);
      const detail = e.code === 'DeadlineExceeded' ? `hung: ${e.message}` : `could not run: ${e.message}`;
      throw new HookError(name, hook, detail, { exitCode: null, output: '', code: e.code === 'Canceled' ? 'Canceled' : e.code === 'DeadlineExceeded' ? 'DeadlineExceeded' : 'FailedPrecondition' }, err);
    }
    if (outcome.exitCode !== 0) {
      const why = hook.kind === 'http' && outcome.exitCode === 127 ? 'found no HTTP client in the container' : `exited with ${outcome.exitCode}`;
      throw new HookError(name, hook, `${why}${outcome.output ? `: ${outcome.output}` : ''}`, { exitCode: outcome.exitCode, output: outcome.output });
    }
    return { durationMs: outcome.durationMs, output: outcome.output };
  }
}
