import { randomBytes } from 'node:crypto';
import { open, readFile, rename, unlink } from 'node:fs/promises';
import { posix } from 'node:path';
import { SnapshotError } from '../errors.js';
import type { GpuCheckpointRecord } from '../engine/engine.js';
import { isHashFormat } from './hash.js';
import { computeKey, isSnapshotKey, type KeyInputs } from './key.js';

/**
 * `manifest.json`: what a committed snapshot holds and how it came to be. Parsing is strict: any
 * field of the wrong shape, an unknown field, or keyInputs that do not hash to the key make the
 * snapshot unusable (SnapshotError DataLoss naming the field), never a best-effort restore.
 */
export const MANIFEST_SCHEMA_VERSION = 1;
export const MANIFEST_NAME = 'manifest.json';

export interface ManifestFile {
  /** Relative to the snapshot directory, '/'-separated, e.g. `image/pages.img`. */
  path: string;
  bytes: number;
  hash: string;
  algo: string;
}

export type JsonValue = string | number | boolean | null | JsonValue[] | { [k: string]: JsonValue };

export interface Manifest {
  schemaVersion: typeof MANIFEST_SCHEMA_VERSION;
  key: string;
  keyInputs: KeyInputs;
  /** ISO 8601. */
  createdAt: string;
  files: ManifestFile[];
  totalBytes: number;
  /** Engine name (gvisor | native). */
  engine: string;
  /** Runtime version (runsc / runc + CRIU) as the engine reported it; null if unknown. */
  runtimeVersion: string | null;
  /** Runtime platform (runsc systrap/ptrace/kvm, or the host platform); null if unknown. */
  platform: string | null;
  /** CUDA processes checkpointed with the snapshot, as the GPU driver module recorded them. */
  gpu: GpuCheckpointRecord | null;
  checkpoint: {
    /** Phase timings in ms. */
    timings: Record<string, number>;
    /** The source container kept running after the checkpoint. */
    leaveRunning: boolean;
  };
  restoreCount: number;
  lastRestoredAt: string | null;
  lastRestoreTimings: Record<string, number> | null;
  /** Free-form details from the engine; not interpreted by the store. */
  extra: Record<string, JsonValue>;
}

const TOP_LEVEL_FIELDS = [
  'schemaVersion',
  'key',
  'keyInputs',
  'createdAt',
  'files',
  'totalBytes',
  'engine',
  'runtimeVersion',
  'platform',
  'gpu',
  'checkpoint',
  'restoreCount',
  'lastRestoredAt',
  'lastRestoreTimings',
  'extra',
] as const;

/** Validates a parsed manifest; `source` (a path) names it in errors. */
export function parseManifest(value: unknown, source: string, expectedKey?: string): Manifest {
  const c = new Checker(source, expectedKey);
  const m = c.object(value, '');
  c.onlyFields(m, '', TOP_LEVEL_FIELDS);
  if (m.schemaVersion !== MANIFEST_SCHEMA_VERSION) {
    c.fail('schemaVersion', `is ${JSON.stringify(m.schemaVersion)}, this thaw reads ${MANIFEST_SCHEMA_VERSION}`);
  }
  const key = c.string(m.key, 'key');
  if (!isSnapshotKey(key)) c.fail('key', 'is not 64 lowercase hex chars');
  if (expectedKey !== undefined && key !== expectedKey) c.fail('key', `is ${key}, but the snapshot directory is ${expectedKey}`);
  const keyInputs = checkKeyInputs(c, m.keyInputs);
  let recomputed = '';
  try {
    recomputed = computeKey(keyInputs);
  } catch (err) {
    c.fail('keyInputs', `cannot be hashed: ${(err as Error).message}`);
  }
  if (recomputed !== key) c.fail('keyInputs', `hash to ${recomputed}, not to the key`);
  const createdAt = c.isoDate(m.createdAt, 'createdAt');
  const files = c.array(m.files, 'files').map((f, i) => checkFile(c, f, `files[${i}]`));
  const seen = new Set<string>();
  for (const [i, f] of files.entries()) {
    if (seen.has(f.path)) c.fail(`files[${i}].path`, `${f.path} is listed twice`);
    seen.add(f.path);
  }
  const totalBytes = c.count(m.totalBytes, 'totalBytes');
  const sum = files.reduce((s, f) => s + f.bytes, 0);
  if (totalBytes !== sum) c.fail('totalBytes', `is ${totalBytes}, but the files add up to ${sum}`);
  const checkpoint = c.object(m.checkpoint, 'checkpoint');
  c.onlyFields(checkpoint, 'checkpoint', ['timings', 'leaveRunning']);
  return {
    schemaVersion: MANIFEST_SCHEMA_VERSION,
    key,
    keyInputs,
    createdAt,
    files,
    totalBytes,
    engine: c.string(m.engine, 'engine'),
    runtimeVersion: m.runtimeVersion === null ? null : c.string(m.runtimeVersion, 'runtimeVersion'),
    platform: m.platform === null ? null : c.string(m.platform, 'platform'),
    gpu: m.gpu === null ? null : checkGpu(c, m.gpu),
    checkpoint: {
      timings: c.timings(checkpoint.timings, 'checkpoint.timings'),
      leaveRunning: c.boolean(checkpoint.leaveRunning, 'checkpoint.leaveRunning'),
    },
    restoreCount: c.count(m.restoreCount, 'restoreCount'),
    lastRestoredAt: m.lastRestoredAt === null ? null : c.isoDate(m.lastRestoredAt, 'lastRestoredAt'),
    lastRestoreTimings: m.lastRestoreTimings === null ? null : c.timings(m.lastRestoreTimings, 'lastRestoreTimings'),
    extra: c.json(c.object(m.extra, 'extra'), 'extra') as Record<string, JsonValue>,
  };
}

/** Parses manifest text (JSON); bad JSON is DataLoss like any other defect. */
export function parseManifestText(text: string, source: string, expectedKey?: string): Manifest {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new SnapshotError('DataLoss', `manifest ${source} is not valid JSON: ${(err as Error).message}`, { key: expectedKey, path: source }, { cause: err });
  }
  return parseManifest(value, source, expectedKey);
}

export function serializeManifest(m: Manifest): string {
  return `${JSON.stringify(m, null, 2)}\n`;
}

/** Reads and validates `path`; a missing file is DataLoss too (a committed snapshot always has one). */
export async function readManifest(path: string, expectedKey?: string): Promise<Manifest> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    const missing = (err as NodeJS.ErrnoException).code === 'ENOENT';
    throw new SnapshotError(
      'DataLoss',
      missing ? `manifest ${path} is missing` : `manifest ${path} is unreadable: ${(err as Error).message}`,
      { key: expectedKey, path },
      { cause: err },
    );
  }
  return parseManifestText(text, path, expectedKey);
}

/**
 * Writes `m` to `path` atomically: the text goes to `tmpDir` (same filesystem), is fsynced and
 * renamed over `path`. The caller fsyncs the directory holding `path` when that matters.
 */
export async function writeManifest(path: string, m: Manifest, tmpPath = `${path}.${randomBytes(6).toString('hex')}.tmp`): Promise<void> {
  parseManifest(JSON.parse(serializeManifest(m)) as unknown, path, m.key); // never write what we would refuse to read
  const fh = await open(tmpPath, 'wx', 0o600);
  try {
    await fh.writeFile(serializeManifest(m));
    await fh.sync();
  } catch (err) {
    await fh.close().catch(() => undefined);
    await unlink(tmpPath).catch(() => undefined);
    throw err;
  }
  await fh.close();
  try {
    await rename(tmpPath, path);
  } catch (err) {
    await unlink(tmpPath).catch(() => undefined);
    throw err;
  }
}

/** A safe relative file path: no absolute paths, `..`, empty or `.` segments, nor the manifest itself. */
export function isSafeRelativePath(p: string): boolean {
  if (p === '' || p.startsWith('/') || p.includes('\\') || p.includes('\0')) return false;
  if (posix.normalize(p) !== p) return false;
  if (p.split('/').some((s) => s === '' || s === '.' || s === '..')) return false;
  return p !== MANIFEST_NAME;
}

function checkFile(c: Checker, v: unknown, at: string): ManifestFile {
  const f = c.object(v, at);
  c.onlyFields(f, at, ['path', 'bytes', 'hash', 'algo']);
  const path = c.string(f.path, `${at}.path`);
  if (!isSafeRelativePath(path)) c.fail(`${at}.path`, `${JSON.stringify(path)} is not a safe relative path`);
  const algo = c.string(f.algo, `${at}.algo`);
  const hash = c.string(f.hash, `${at}.hash`);
  if (!isHashFormat(algo, hash)) c.fail(`${at}.hash`, `${JSON.stringify(hash)} is not a ${algo} hash`);
  return { path, bytes: c.count(f.bytes, `${at}.bytes`), hash, algo };
}

function checkGpu(c: Checker, v: unknown): GpuCheckpointRecord {
  const g = c.object(v, 'gpu');
  const pids = c.array(g.pids, 'gpu.pids').map((p, i) => c.count(p, `gpu.pids[${i}]`));
  const timings = c.timings(g.timings, 'gpu.timings');
  // Other fields the GPU module records are kept as they are.
  return { ...(c.json(g, 'gpu') as Record<string, JsonValue>), pids, timings } as GpuCheckpointRecord;
}

function checkKeyInputs(c: Checker, v: unknown): KeyInputs {
  const k = c.object(v, 'keyInputs');
  c.onlyFields(k, 'keyInputs', ['formatVersion', 'engine', 'process', 'mounts', 'image', 'cpu', 'gpu', 'ignoredEnv']);
  const engine = c.object(k.engine, 'keyInputs.engine');
  c.onlyFields(engine, 'keyInputs.engine', ['name', 'identity']);
  const proc = c.object(k.process, 'keyInputs.process');
  c.onlyFields(proc, 'keyInputs.process', ['args', 'env', 'cwd', 'user', 'terminal']);
  const user = c.object(proc.user, 'keyInputs.process.user');
  c.onlyFields(user, 'keyInputs.process.user', ['uid', 'gid', 'additionalGids']);
  const image = c.object(k.image, 'keyInputs.image');
  c.onlyFields(image, 'keyInputs.image', ['name', 'digest', 'labels', 'rootfs']);
  const cpu = c.object(k.cpu, 'keyInputs.cpu');
  c.onlyFields(cpu, 'keyInputs.cpu', ['arch', 'vendor', 'model', 'flags']);
  const rootfs = image.rootfs === null ? null : c.object(image.rootfs, 'keyInputs.image.rootfs');
  if (rootfs !== null) c.onlyFields(rootfs, 'keyInputs.image.rootfs', ['fingerprint', 'entries', 'bytes']);
  return {
    formatVersion: c.count(k.formatVersion, 'keyInputs.formatVersion'),
    engine: { name: c.string(engine.name, 'keyInputs.engine.name'), identity: c.stringRecord(engine.identity, 'keyInputs.engine.identity') },
    process: {
      args: c.strings(proc.args, 'keyInputs.process.args'),
      env: c.strings(proc.env, 'keyInputs.process.env'),
      cwd: c.string(proc.cwd, 'keyInputs.process.cwd'),
      user: {
        uid: c.count(user.uid, 'keyInputs.process.user.uid'),
        gid: c.count(user.gid, 'keyInputs.process.user.gid'),
        additionalGids: c.array(user.additionalGids, 'keyInputs.process.user.additionalGids').map((g, i) =>
          c.count(g, `keyInputs.process.user.additionalGids[${i}]`),
        ),
      },
      terminal: c.boolean(proc.terminal, 'keyInputs.process.terminal'),
    },
    mounts: c.array(k.mounts, 'keyInputs.mounts').map((m, i) => {
      const mm = c.object(m, `keyInputs.mounts[${i}]`);
      c.onlyFields(mm, `keyInputs.mounts[${i}]`, ['destination', 'type']);
      return { destination: c.string(mm.destination, `keyInputs.mounts[${i}].destination`), type: c.string(mm.type, `keyInputs.mounts[${i}].type`) };
    }),
    image: {
      name: image.name === null ? null : c.string(image.name, 'keyInputs.image.name'),
      digest: image.digest === null ? null : c.string(image.digest, 'keyInputs.image.digest'),
      labels: c.stringRecord(image.labels, 'keyInputs.image.labels'),
      rootfs:
        rootfs === null
          ? null
          : {
              fingerprint: c.string(rootfs.fingerprint, 'keyInputs.image.rootfs.fingerprint'),
              entries: c.count(rootfs.entries, 'keyInputs.image.rootfs.entries'),
              bytes: c.count(rootfs.bytes, 'keyInputs.image.rootfs.bytes'),
            },
    },
    cpu: {
      arch: c.string(cpu.arch, 'keyInputs.cpu.arch'),
      vendor: c.string(cpu.vendor, 'keyInputs.cpu.vendor'),
      model: c.string(cpu.model, 'keyInputs.cpu.model'),
      flags: c.strings(cpu.flags, 'keyInputs.cpu.flags'),
    },
    gpu: k.gpu === null ? null : c.scalarRecord(k.gpu, 'keyInputs.gpu'),
    ignoredEnv: c.strings(k.ignoredEnv, 'keyInputs.ignoredEnv'),
  };
}

/** Field checks that throw SnapshotError DataLoss naming the manifest and the field. */
class Checker {
  constructor(
    private readonly source: string,
    private readonly key: string | undefined,
  ) {}

  fail(field: string, what: string): never {
    throw new SnapshotError('DataLoss', `manifest ${this.source}: ${field || 'document'} ${what}`, { key: this.key, path: this.source });
  }

  object(v: unknown, at: string): Record<string, unknown> {
    if (typeof v !== 'object' || v === null || Array.isArray(v)) this.fail(at, 'must be an object');
    return v as Record<string, unknown>;
  }

  onlyFields(o: Record<string, unknown>, at: string, allowed: readonly string[]): void {
    for (const k of allowed) if (!(k in o)) this.fail(at ? `${at}.${k}` : k, 'is missing');
    for (const k of Object.keys(o)) if (!allowed.includes(k)) this.fail(at ? `${at}.${k}` : k, 'is not a known field');
  }

  array(v: unknown, at: string): unknown[] {
    if (!Array.isArray(v)) this.fail(at, 'must be an array');
    return v;
  }

  string(v: unknown, at: string): string {
    if (typeof v !== 'string') this.fail(at, 'must be a string');
    return v;
  }

  strings(v: unknown, at: string): string[] {
    return this.array(v, at).map((s, i) => this.string(s, `${at}[${i}]`));
  }

  boolean(v: unknown, at: string): boolean {
    if (typeof v !== 'boolean') this.fail(at, 'must be a boolean');
    return v;
  }

  /** A non-negative safe integer. */
  count(v: unknown, at: string): number {
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) this.fail(at, 'must be a non-negative integer');
    return v;
  }

  isoDate(v: unknown, at: string): string {
    const s = this.string(v, at);
    if (!/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/.test(s) || Number.isNaN(Date.parse(s))) this.fail(at, `${JSON.stringify(s)} is not an ISO 8601 UTC time`);
    return s;
  }

  timings(v: unknown, at: string): Record<string, number> {
    const o = this.object(v, at);
    for (const [k, x] of Object.entries(o)) {
      if (typeof x !== 'number' || !Number.isFinite(x) || x < 0) this.fail(`${at}.${k}`, 'must be a non-negative number of ms');
    }
    return { ...(o as Record<string, number>) };
  }

  stringRecord(v: unknown, at: string): Record<string, string> {
    const o = this.object(v, at);
    for (const [k, x] of Object.entries(o)) this.string(x, `${at}.${k}`);
    return { ...(o as Record<string, string>) };
  }

  scalarRecord(v: unknown, at: string): Record<string, string | number> {
    const o = this.object(v, at);
    for (const [k, x] of Object.entries(o)) {
      if (typeof x !== 'string' && (typeof x !== 'number' || !Number.isFinite(x))) this.fail(`${at}.${k}`, 'must be a string or number');
    }
    return { ...(o as Record<string, string | number>) };
  }

  json(v: unknown, at: string): JsonValue {
    if (v === null || typeof v === 'string' || typeof v === 'boolean') return v;
    if (typeof v === 'number') {
      if (!Number.isFinite(v)) this.fail(at, 'must be a finite number');
      return v;
    }
    if (Array.isArray(v)) return v.map((x, i) => this.json(x, `${at}[${i}]`));
    const o = this.object(v, at);
    const out: Record<string, JsonValue> = {};
    for (const [k, x] of Object.entries(o)) out[k] = this.json(x, `${at}.${k}`);
    return out;
  }
}
