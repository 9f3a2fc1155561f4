import { create } from '@bufbuild/protobuf';
import { StatusSchema, type Status } from '../gen/google/rpc/status_pb.js';
import { ShimError, type ErrorCode } from '../errors.js';

/**
 * gRPC status codes as ttrpc carries them in Response.status, and the one mapping between them
 * and thaw's ErrorCode. containerd maps the codes back to its errdefs classes (NotFound →
 * ErrNotFound, Unimplemented → ErrNotImplemented, …), so the code matters more than the text.
 */
export const Code = {
  OK: 0,
  Canceled: 1,
  Unknown: 2,
  InvalidArgument: 3,
  DeadlineExceeded: 4,
  NotFound: 5,
  AlreadyExists: 6,
  PermissionDenied: 7,
  ResourceExhausted: 8,
  FailedPrecondition: 9,
  Aborted: 10,
  OutOfRange: 11,
  Unimplemented: 12,
  Internal: 13,
  Unavailable: 14,
  DataLoss: 15,
  Unauthenticated: 16,
} as const;
export type Code = (typeof Code)[keyof typeof Code];

const wireCodes: Readonly<Record<ErrorCode, Code>> = {
  NotFound: Code.NotFound,
  AlreadyExists: Code.AlreadyExists,
  FailedPrecondition: Code.FailedPrecondition,
  InvalidArgument: Code.InvalidArgument,
  Unavailable: Code.Unavailable,
  DeadlineExceeded: Code.DeadlineExceeded,
  Canceled: Code.Canceled,
  NotImplemented: Code.Unimplemented,
  DataLoss: Code.DataLoss,
  Internal: Code.Internal,
  Unknown: Code.Unknown,
};

/** Reverse of wireCodes; codes thaw has no class for come back as Unknown (grpcCode keeps them). */
const errorCodes: ReadonlyMap<number, ErrorCode> = new Map(
  Object.entries(wireCodes).map(([errorCode, code]) => [code, errorCode as ErrorCode]),
);

/** The gRPC code for one of thaw's error classes. */
export function wireCode(code: ErrorCode): Code {
  return wireCodes[code];
}

/** A status a ttrpc peer answered with, as a ShimError of the matching class. */
export class TtrpcStatusError extends ShimError {
  readonly grpcCode: number;
  constructor(grpcCode: number, message: string) {
    super(errorCodes.get(grpcCode) ?? 'Unknown', message);
    this.grpcCode = grpcCode;
  }
}

export function makeStatus(code: Code, message: string): Status {
  return create(StatusSchema, { code, message });
}

/**
 * The wire status for anything a handler threw: a ShimError keeps its class; an aborted
 * AbortSignal becomes Canceled (DeadlineExceeded for a timeout); anything else is Unknown.
 */
export function statusFromError(err: unknown): Status {
  if (err instanceof TtrpcStatusError) return makeStatus(err.grpcCode as Code, err.message);
  if (err instanceof ShimError) return makeStatus(wireCode(err.code), err.message);
  if (err instanceof Error && err.name === 'TimeoutError') return makeStatus(Code.DeadlineExceeded, err.message);
  if (err instanceof Error && err.name === 'AbortError') return makeStatus(Code.Canceled, err.message);
  return makeStatus(Code.Unknown, err instanceof Error ? err.message : String(err));
}

/** The error a client raises for a non-OK status. */
export function errorFromStatus(status: Status): TtrpcStatusError {
  return new TtrpcStatusError(status.code, status.message);
}
