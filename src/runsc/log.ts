import type { ErrorCode } from '../errors.js';

/**
 * Reading runsc's own words on failure. runsc appends one JSON record per error to its `--log`
 * file, with no newline between records (`{"msg":"loading container: file does not exist",
 * "level":"error","time":"…"}{…}`); the k8s format uses `log` instead of `msg`, and sentry-style
 * messages carry a `file.go:123] ` prefix. The same text also goes to stderr as a plain line.
 */

export interface RunscLogRecord {
  msg: string;
  level: string;
}

/** Parses concatenated or newline-separated JSON records; skips anything that is not one. */
export function parseRunscLog(text: string): RunscLogRecord[] {
  const records: RunscLogRecord[] = [];
  for (const chunk of splitJsonObjects(text)) {
    let value: unknown;
    try {
      value = JSON.parse(chunk);
    } catch {
      continue;
    }
    if (typeof value !== 'object' || value === null) continue;
    const o = value as Record<string, unknown>;
    const msg = typeof o.msg === 'string' ? o.msg : typeof o.log === 'string' ? o.log : undefined;
    if (msg === undefined) continue;
    records.push({ msg: stripSourcePrefix(msg.trim()), level: typeof o.level === 'string' ? o.level : '' });
  }
  return records;
}

/**
 * The line to quote when a call failed: the last error record of the log, else the last
 * non-empty stderr line, else ''.
 */
export function lastErrorLine(logText: string, stderr = ''): string {
  const records = parseRunscLog(logText).filter((r) => r.msg !== '');
  const errors = records.filter((r) => r.level === 'error' || r.level === 'fatal' || r.msg.startsWith('FATAL ERROR: '));
  const last = errors.at(-1) ?? records.at(-1);
  if (last !== undefined) return last.msg.replace(/^FATAL ERROR: /, '');
  return lastNonEmptyLine(stderr);
}

export function lastNonEmptyLine(text: string): string {
  const lines = text.split('\n');
  for (let i = lines.length - 1; i >= 0; i--) {
    const line = lines[i]!.trim();
    if (line !== '') return line;
  }
  return '';
}

/**
 * Known runsc error texts → thaw error classes. Order matters: "ambiguous" ids also "exist".
 * Unknown texts are `Unknown`; timeouts and aborts are classified by the caller, not by text.
 */
const TRANSLATIONS: readonly (readonly [RegExp, ErrorCode])[] = [
  [/\bis ambiguous\b/i, 'FailedPrecondition'],
  [/\balready exists\b/i, 'AlreadyExists'],
  [/\bdoes not exist\b|\bnot found\b|\bno such container\b/i, 'NotFound'],
  [
    /\bis not running\b|\bno longer running\b|\bcannot \w+ container .* in state\b|\bthat is not stopped\b|\bstill running\b/i,
    'FailedPrecondition',
  ],
];

export function translateRunscError(line: string): ErrorCode {
  for (const [pattern, code] of TRANSLATIONS) {
    if (pattern.test(line)) return code;
  }
  return 'Unknown';
}

/** Splits `{…}{…}\n{…}` into top-level object texts, honouring strings and escapes. */
function splitJsonObjects(text: string): string[] {
  const out: string[] = [];
  let depth = 0;
  let start = -1;
  let inString = false;
  let escaped = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (inString) {
      if (escaped) escaped = false;
      else if (c === '\\') escaped = true;
      else if (c === '"') inString = false;
      continue;
    }
    if (c === '"') {
      if (depth > 0) inString = true;
    } else if (c === '{') {
      if (depth === 0) start = i;
      depth++;
    } else if (c === '}' && depth > 0) {
      depth--;
      if (depth === 0) out.push(text.slice(start, i + 1));
    }
  }
  return out;
}

function stripSourcePrefix(msg: string): string {
  return msg.replace(/^[\w.-]+\.go:\d+\] /, '');
}
