/**
 * One error taxonomy for thaw. Codes follow containerd's errdefs classes; only ttrpc/status.ts maps
 * them to wire statuses, and the CLI maps them to exit codes. Always pass `cause` when wrapping.
 */
export type ErrorCode =
  | 'NotFound'
  | 'AlreadyExists'
  | 'FailedPrecondition'
  | 'InvalidArgument'
  | 'Unavailable'
  | 'DeadlineExceeded'
  | 'Canceled'
  | 'NotImplemented'
  | 'DataLoss'
  | 'Internal'
  | 'Unknown';

export interface ShimErrorOptions {
  cause?: unknown;
}

export class ShimError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options: ShimErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.code = code;
  }
}

/** A runsc invocation failed; `logLine` is runsc's own last error line (from its JSON log or stderr). */
export class RunscError extends ShimError {
  readonly argv: readonly string[];
  readonly exitCode: number | undefined;
  readonly logLine: string;
  constructor(
    code: ErrorCode,
    message: string,
    fields: { argv: readonly string[]; exitCode: number | undefined; logLine: string },
    options: ShimErrorOptions = {},
  ) {
    super(code, message, options);
    this.argv = fields.argv;
    this.exitCode = fields.exitCode;
    this.logLine = fields.logLine;
  }
}

/** A runc or CRIU invocation failed (native engine). */
export class RuncError extends ShimError {
  readonly argv: readonly string[];
  readonly exitCode: number | undefined;
  readonly logLine: string;
  constructor(
    code: ErrorCode,
    message: string,
    fields: { argv: readonly string[]; exitCode: number | undefined; logLine: string },
    options: ShimErrorOptions = {},
  ) {
    super(code, message, options);
    this.argv = fields.argv;
    this.exitCode = fields.exitCode;
    this.logLine = fields.logLine;
  }
}

export class CudaCheckpointError extends ShimError {
  readonly pid: number;
  readonly action: string;
  readonly output: string;
  constructor(
    code: ErrorCode,
    message: string,
    fields: { pid: number; action: string; output: string },
    options: ShimErrorOptions = {},
  ) {
    super(code, message, options);
    this.pid = fields.pid;
    this.action = fields.action;
    this.output = fields.output;
  }
}

export class SnapshotError extends ShimError {
  readonly key: string | undefined;
  readonly path: string | undefined;
  constructor(
    code: ErrorCode,
    message: string,
    fields: { key?: string; path?: string },
    options: ShimErrorOptions = {},
  ) {
    super(code, message, options);
    this.key = fields.key;
    this.path = fields.path;
  }
}

export class NativeIoError extends ShimError {
  readonly op: string;
  readonly errno: number;
  constructor(code: ErrorCode, message: string, fields: { op: string; errno: number }, options: ShimErrorOptions = {}) {
    super(code, message, options);
    this.op = fields.op;
    this.errno = fields.errno;
  }
}

export function isShimError(err: unknown, code?: ErrorCode): err is ShimError {
  return err instanceof ShimError && (code === undefined || err.code === code);
}

/** Wraps anything thrown into a ShimError, keeping an existing one as it is. */
export function asShimError(err: unknown, code: ErrorCode = 'Unknown', context?: string): ShimError {
  if (err instanceof ShimError) return err;
  const detail = err instanceof Error ? err.message : String(err);
  return new ShimError(code, context ? `${context}: ${detail}` : detail, { cause: err });
}
