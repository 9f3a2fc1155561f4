import { create } from '@bufbuild/protobuf';
import { TimestampSchema, type Timestamp } from '@bufbuild/protobuf/wkt';

/** Date <-> google.protobuf.Timestamp. Nobody else converts times for the wire. */
export type { Timestamp };

const MS_PER_S = 1000;
const NS_PER_MS = 1_000_000;

/** Millisecond precision (all a Date holds); negative times round toward the past like Go. */
export function toTimestamp(date: Date): Timestamp {
  const ms = date.getTime();
  if (!Number.isFinite(ms)) throw new RangeError('toTimestamp: invalid Date');
  const seconds = Math.floor(ms / MS_PER_S);
  return create(TimestampSchema, { seconds: BigInt(seconds), nanos: (ms - seconds * MS_PER_S) * NS_PER_MS });
}

/** Nanoseconds below a millisecond are dropped; `undefined` stays `undefined` (field not set). */
export function fromTimestamp(ts: Timestamp): Date;
export function fromTimestamp(ts: Timestamp | undefined): Date | undefined;
export function fromTimestamp(ts: Timestamp | undefined): Date | undefined {
  if (ts === undefined) return undefined;
  return new Date(Number(ts.seconds) * MS_PER_S + Math.floor(ts.nanos / NS_PER_MS));
}

/** The current time as a Timestamp. */
export function timestampNow(): Timestamp {
  return toTimestamp(new Date());
}
