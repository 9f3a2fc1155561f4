/**
 * The boot-vs-restore decision, as one pure function: given what the store holds for the
 * container's compatibility key (already looked up and verified by the caller), restore or cold
 * start, with a reason a person can read. No I/O.
 */
export const RESTORE_ANNOTATION = 'thaw.dev/restore';

/** What the caller found in the snapshot store for this key. */
export type SnapshotLookup =
  | { state: 'missing' }
  | { state: 'verified'; key: string; bytes: number }
  | { state: 'invalid'; key: string; reason: string };

export interface DecideInput {
  key: string;
  lookup: SnapshotLookup;
  annotations: Readonly<Record<string, string>>;
  /** A reason restore cannot work here at all (e.g. engine lacks checkpoint support); undefined if fine. */
  unavailable?: string | undefined;
}

export type Decision =
  | { kind: 'cold'; key: string; reason: string }
  | { kind: 'restore'; key: string; snapshot: string; reason: string };

export function decide({ key, lookup, annotations, unavailable }: DecideInput): Decision {
  const mode = annotations[RESTORE_ANNOTATION] ?? 'auto';
  if (mode === 'never' || mode === 'off') {
    return { kind: 'cold', key, reason: `restore disabled by annotation ${RESTORE_ANNOTATION}=${mode}` };
  }
  if (unavailable) return { kind: 'cold', key, reason: unavailable };
  switch (lookup.state) {
    case 'missing':
      return { kind: 'cold', key, reason: 'no snapshot for this key' };
    case 'invalid':
      return { kind: 'cold', key, reason: `snapshot ${lookup.key} unusable: ${lookup.reason}` };
    case 'verified':
      return { kind: 'restore', key, snapshot: lookup.key, reason: `verified snapshot (${lookup.bytes} bytes)` };
  }
}
