import { ShimError, type ErrorCode } from '../errors.js';
import type { GlobalOptions } from './context.js';

/** Exit codes per error class, so scripts can tell bad input from a missing thing from a failure. */
const EXIT_CODES: Partial<Record<ErrorCode, number>> = {
  InvalidArgument: 2,
  NotFound: 3,
  AlreadyExists: 4,
  FailedPrecondition: 5,
  DataLoss: 6,
  DeadlineExceeded: 7,
};

/** A verb's result may ask for a specific exit code (e.g. `thaw wait` exits with the container's status). */
export interface VerbResult {
  json: Record<string, unknown>;
  text: string;
  exitCode?: number;
}

export async function reportAndExit(result: unknown, global: GlobalOptions): Promise<never> {
  if (result instanceof Error) {
    const code: ErrorCode = result instanceof ShimError ? result.code : 'Unknown';
    if (global.json) {
      process.stdout.write(`${JSON.stringify({ error: { code, message: result.message } })}\n`);
    }
    process.stderr.write(`thaw: ${oneLine(result.message)}\n`);
    if (process.env.THAW_DEBUG && result.stack) process.stderr.write(`${result.stack}\n`);
    return exit(EXIT_CODES[code] ?? 1);
  }
  const r = result as VerbResult;
  if (global.json) process.stdout.write(`${JSON.stringify(r.json)}\n`);
  else if (r.text) process.stdout.write(r.text.endsWith('\n') ? r.text : `${r.text}\n`);
  return exit(r.exitCode ?? 0);
}

function oneLine(s: string): string {
  return s.replace(/\s*\n\s*/g, ' | ');
}

async function exit(code: number): Promise<never> {
  // Let stdout drain before exiting (pipes to scripts).
  await new Promise<void>((resolve) => process.stdout.write('', () => resolve()));
  process.exit(code);
}
