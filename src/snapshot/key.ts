import { createHash } from 'node:crypto';
import { lstatSync, readdirSync, readlinkSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { isAbsolute, join, posix } from 'node:path';
import { ShimError } from '../errors.js';
import type { EngineIdentity } from '../engine/engine.js';

/**
 * The compatibility key: sha256 (hex) of the canonical JSON (object keys sorted, arrays in order)
 * of every input that must match between checkpoint and restore. One snapshot per key.
 *
 * Choices worth knowing:
 * - Every env var is part of the key by default: the restored process keeps the environment it had
 *   at checkpoint time, so a replica whose env differs would silently run with the old values.
 *   Callers may name variables that legitimately differ per replica (e.g. HOSTNAME, which CRI sets
 *   to the pod name) in `ignoreEnv`; the exclusion list itself is then part of the key.
 * - The image is identified by digest when one is known (caller-given, or `name@sha256:…` in the
 *   image-name annotation). A bare name is a mutable tag, so without a digest the rootfs itself is
 *   fingerprinted (path, type/mode, size, mtime, symlink target of every non-directory entry).
 * - The rootfs fingerprint changes once a container writes to its rootfs (runc) or mounts appear
 *   in it, so compute the key when the container is created and keep those KeyInputs for the
 *   checkpoint, rather than recomputing from a running container's rootfs.
 */
export const SNAPSHOT_FORMAT_VERSION = 1;

export interface ProcessIdentity {
  args: string[];
  env: string[];
  cwd: string;
  user: { uid: number; gid: number; additionalGids: number[] };
  terminal: boolean;
}

/** Mount points only (sources differ per pod; the set of destinations must match for a restore). */
export interface MountIdentity {
  destination: string;
  type: string;
}

export interface RootfsFingerprint {
  /** sha256 hex over the sorted entry list. */
  fingerprint: string;
  /** Entries hashed (files, symlinks, directories, others). */
  entries: number;
  /** Sum of regular file sizes. */
  bytes: number;
}

export interface ImageIdentity {
  /** From the CRI/containerd image-name annotation, or given by the caller; null when unknown. */
  name: string | null;
  /** Content digest (`sha256:<hex>`) when known. */
  digest: string | null;
  /** The spec's `org.opencontainers.image.*` annotations. */
  labels: Record<string, string>;
  /** Present only when no digest is known. */
  rootfs: RootfsFingerprint | null;
}

export interface CpuIdentity {
  /** Node's process.arch (x64, arm64, …). */
  arch: string;
  /** x86: vendor_id; arm: CPU implementer. */
  vendor: string;
  /** x86: `cpu family/model/model name`; arm: `CPU architecture/variant/part`. */
  model: string;
  /** Feature flags (x86 `flags`, arm `Features`), sorted. */
  flags: string[];
}

/** GPU model, count, driver version… as the GPU module describes them; null when no GPU takes part. */
export type GpuIdentity = Readonly<Record<string, string | number>>;

export interface KeyInputs {
  formatVersion: number;
  engine: { name: string; identity: Record<string, string> };
  process: ProcessIdentity;
  mounts: MountIdentity[];
  image: ImageIdentity;
  cpu: CpuIdentity;
  gpu: GpuIdentity | null;
  /** Env var names left out of `process.env`, sorted. */
  ignoredEnv: string[];
}

/** sha256 hex of the canonical JSON of `inputs`. Manifests re-check their key with this. */
export function computeKey(inputs: KeyInputs): string {
  return createHash('sha256').update(canonicalJson(inputs)).digest('hex');
}

/** A key is 64 lowercase hex chars (sha256). */
export function isSnapshotKey(key: string): boolean {
  return /^[0-9a-f]{64}$/.test(key);
}

/** JSON with object keys sorted at every level; rejects values JSON cannot represent exactly. */
export function canonicalJson(value: unknown): string {
  return canonical(value, '$');
}

function canonical(v: unknown, at: string): string {
  if (v === null || typeof v === 'boolean' || typeof v === 'string') return JSON.stringify(v);
  if (typeof v === 'number') {
    if (!Number.isFinite(v)) throw new ShimError('InvalidArgument', `key input ${at} is not a finite number`);
    return JSON.stringify(v);
  }
  if (Array.isArray(v)) return `[${v.map((x, i) => canonical(x, `${at}[${i}]`)).join(',')}]`;
  if (typeof v === 'object') {
    const obj = v as Record<string, unknown>;
    const keys = Object.keys(obj).sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}:${canonical(obj[k], `${at}.${k}`)}`).join(',')}}`;
  }
  throw new ShimError('InvalidArgument', `key input ${at} has unsupported type ${typeof v}`);
}

/** The parts of an OCI runtime spec the key reads (OciSpec from bundle/ fits). */
export interface KeySpec {
  process: {
    args: string[];
    env?: string[];
    cwd: string;
    terminal?: boolean;
    user?: { uid: number; gid: number; additionalGids?: number[] };
  };
  root: { path: string };
  annotations?: Record<string, string>;
  mounts?: unknown[];
}

export interface CollectKeyInputsOptions {
  spec: KeySpec;
  /** Bundle directory (a relative root.path is resolved against it). */
  bundle: string;
  engine: { name: string; identity: EngineIdentity };
  gpu: GpuIdentity | null;
  /** Image identity the caller knows (e.g. from containerd's image store). */
  image?: { name?: string; digest?: string };
  /** Env var names excluded from the key (values differ per replica, e.g. HOSTNAME). */
  ignoreEnv?: readonly string[];
  /** CPU identity; default read from /proc/cpuinfo. */
  cpu?: CpuIdentity;
  /** How the rootfs is fingerprinted when no digest is known; default fingerprintRootfs (a cache may answer instead). */
  fingerprintRootfs?: (dir: string, opts: FingerprintOptions) => Promise<RootfsFingerprint>;
  signal?: AbortSignal;
}

/** Annotations naming the image, in order of preference. */
export const IMAGE_NAME_ANNOTATIONS = [
  'io.kubernetes.cri.image-name', // containerd CRI
  'io.kubernetes.cri-o.ImageName', // CRI-O
  'io.containerd.image.name', // containerd image index annotation, when propagated
] as const;
const OCI_IMAGE_ANNOTATION_PREFIX = 'org.opencontainers.image.';
/** Top-level rootfs directories whose contents belong to the runtime, not the image. */
const ROOTFS_SKIP = ['proc', 'sys', 'dev'];
/** gVisor's `--overlay2=root:self` keeps its filestore in the rootfs directory. */
const ROOTFS_SKIP_PREFIX = '.gvisor.filestore.';

/**
 * Where the gVisor engine mounts thaw-cuda into GPU containers. thaw adds it on hosts where it can
 * snapshot GPU state; it is not part of the app, so the key leaves it out (a bundle that already has
 * it from an earlier `thaw run` keeps its key).
 */
export const THAW_CUDA_MOUNT_POINT = '/run/thaw-cuda';

export async function collectKeyInputs(opts: CollectKeyInputsOptions): Promise<KeyInputs> {
  const { spec, bundle } = opts;
  const ignored = [...new Set(opts.ignoreEnv ?? [])].sort();
  const env = (spec.process.env ?? []).filter((e) => !ignored.includes(envName(e)));
  const user = spec.process.user;
  const allMounts = (spec.mounts ?? []).flatMap((m): MountIdentity[] => {
    const mm = m as { destination?: unknown; type?: unknown };
    return typeof mm.destination === 'string' ? [{ destination: mm.destination, type: typeof mm.type === 'string' ? mm.type : '' }] : [];
  });
  const mounts = allMounts.filter((m) => m.destination !== THAW_CUDA_MOUNT_POINT);
  const annotations = spec.annotations ?? {};
  const name = opts.image?.name ?? IMAGE_NAME_ANNOTATIONS.map((a) => annotations[a]).find((v) => v !== undefined && v !== '') ?? null;
  const digest = opts.image?.digest ?? digestOf(name);
  const labels: Record<string, string> = {};
  for (const [k, v] of Object.entries(annotations)) if (k.startsWith(OCI_IMAGE_ANNOTATION_PREFIX)) labels[k] = v;
  const rootfsDir = isAbsolute(spec.root.path) ? spec.root.path : join(bundle, spec.root.path);
  const rootfs =
    digest === null
      ? await (opts.fingerprintRootfs ?? fingerprintRootfs)(rootfsDir, { exclude: allMounts.map((m) => m.destination), signal: opts.signal })
      : null;
  return {
    formatVersion: SNAPSHOT_FORMAT_VERSION,
    engine: { name: opts.engine.name, identity: { ...opts.engine.identity } },
    process: {
      args: [...spec.process.args],
      env,
      cwd: spec.process.cwd,
      user: { uid: user?.uid ?? 0, gid: user?.gid ?? 0, additionalGids: [...(user?.additionalGids ?? [])] },
      terminal: spec.process.terminal ?? false,
    },
    mounts,
    image: { name, digest, labels, rootfs },
    cpu: opts.cpu ?? (await hostCpuIdentity()),
    gpu: opts.gpu === null ? null : { ...opts.gpu },
    ignoredEnv: ignored,
  };
}

function envName(entry: string): string {
  const eq = entry.indexOf('=');
  return eq < 0 ? entry : entry.slice(0, eq);
}

function digestOf(ref: string | null): string | null {
  const m = ref === null ? null : /@(sha256:[0-9a-f]{64})$/.exec(ref);
  return m?.[1] ?? null;
}

export interface FingerprintOptions {
  /** Paths (relative to the rootfs or absolute inside it, e.g. mount destinations) left out. */
  exclude?: readonly string[];
  signal?: AbortSignal;
}

/**
 * The walk uses synchronous lstat in slices: through fs/promises each call costs ~30 us of thread
 * pool round trip versus ~8 us inline (a 138k-entry /usr took 4.2-4.9 s vs 1.0-1.3 s). Yielding to
 * the event loop every 1024 entries (~8 ms) keeps the process responsive.
 */
const ENTRIES_PER_SLICE = 1024;

/**
 * Hashes the sorted list of (relative path, file type + mode, size, mtime, symlink target) of every
 * entry under `dir`, walking one directory at a time (memory stays bounded by the widest
 * directory). Skips /proc, /sys, /dev and `exclude`. Directories contribute path and mode only:
 * their size and mtime depend on the filesystem and on mount points created in them.
 */
export async function fingerprintRootfs(dir: string, opts: FingerprintOptions = {}): Promise<RootfsFingerprint> {
  const excluded = new Set([...ROOTFS_SKIP, ...(opts.exclude ?? []).map(relativeInRoot)].filter((p) => p !== ''));
  const hash = createHash('sha256');
  let entries = 0;
  let bytes = 0;
  let sliceLeft = ENTRIES_PER_SLICE;
  let lines = ''; // hashed in ~64 KiB pieces: one update per entry costs more than the lstat
  const walk = async (rel: string): Promise<void> => {
    opts.signal?.throwIfAborted();
    const names = readdirSync(rel === '' ? dir : join(dir, rel)).sort();
    for (const n of names) {
      const p = rel === '' ? n : `${rel}/${n}`;
      if (excluded.has(p) || (rel === '' && n.startsWith(ROOTFS_SKIP_PREFIX))) continue;
      const abs = join(dir, p);
      const st = lstatSync(abs, { bigint: true });
      const isDir = st.isDirectory();
      const target = st.isSymbolicLink() ? readlinkSync(abs) : '';
      if (st.isFile()) bytes += Number(st.size);
      const size = isDir ? '' : st.size.toString();
      const mtime = isDir ? '' : st.mtimeNs.toString();
      lines += `${p}\0${st.mode.toString(8)}\0${size}\0${mtime}\0${target}\n`;
      if (lines.length >= 65_536) {
        hash.update(lines);
        lines = '';
      }
      entries++;
      if (--sliceLeft === 0) {
        sliceLeft = ENTRIES_PER_SLICE;
        await new Promise<void>((resolve) => setImmediate(resolve));
        opts.signal?.throwIfAborted();
      }
      if (isDir) await walk(p);
    }
  };
  await walk('');
  hash.update(lines);
  return { fingerprint: hash.digest('hex'), entries, bytes };
}

function relativeInRoot(p: string): string {
  return posix.normalize(`/${p}`).slice(1).replace(/\/+$/, '');
}

/** CPU vendor, model and feature flags of the first processor in /proc/cpuinfo. */
/** The host's CPU identity, read once per process: it is on the path of every Create and restore. */
let hostCpu: Promise<CpuIdentity> | undefined;
function hostCpuIdentity(): Promise<CpuIdentity> {
  hostCpu ??= cpuIdentity();
  hostCpu.catch(() => (hostCpu = undefined)); // a failed read is tried again next time
  return hostCpu;
}

export async function cpuIdentity(cpuinfoPath = '/proc/cpuinfo'): Promise<CpuIdentity> {
  let text = '';
  try {
    text = await readFile(cpuinfoPath, 'utf8');
  } catch (err) {
    throw new ShimError('Internal', `cannot read ${cpuinfoPath}: ${(err as Error).message}`, { cause: err });
  }
  return parseCpuinfo(text);
}

export function parseCpuinfo(text: string, arch: string = process.arch): CpuIdentity {
  const first = text.split(/\n\s*\n/)[0] ?? '';
  const fields = new Map<string, string>();
  for (const line of first.split('\n')) {
    const colon = line.indexOf(':');
    if (colon < 0) continue;
    fields.set(line.slice(0, colon).trim(), line.slice(colon + 1).trim());
  }
  const get = (k: string): string => fields.get(k) ?? '';
  const x86 = fields.has('vendor_id');
  const vendor = x86 ? get('vendor_id') : get('CPU implementer');
  const model = x86
    ? [get('cpu family'), get('model'), get('model name')].join('/')
    : [get('CPU architecture'), get('CPU variant'), get('CPU part')].join('/');
  const flags = (x86 ? get('flags') : get('Features')).split(/\s+/).filter((f) => f !== '');
  return { arch, vendor, model, flags: [...new Set(flags)].sort() };
}

export interface KeyInputLine {
  /** Dotted path of the input, e.g. `process.env[2]`, `engine.identity.version`. */
  input: string;
  value: string;
}

/** Every key input as one line each, for `thaw snapshots inspect`. */
export function describeKeyInputs(inputs: KeyInputs): KeyInputLine[] {
  const lines: KeyInputLine[] = [];
  const visit = (v: unknown, at: string): void => {
    if (at === 'cpu.flags' && Array.isArray(v)) {
      lines.push({ input: at, value: v.join(' ') });
    } else if (Array.isArray(v)) {
      if (v.length === 0) lines.push({ input: at, value: '[]' });
      v.forEach((x, i) => visit(x, `${at}[${i}]`));
    } else if (v !== null && typeof v === 'object') {
      const keys = Object.keys(v).sort();
      if (keys.length === 0) lines.push({ input: at, value: '{}' });
      for (const k of keys) visit((v as Record<string, unknown>)[k], at === '' ? k : `${at}.${k}`);
    } else {
      lines.push({ input: at, value: typeof v === 'string' ? v : JSON.stringify(v) });
    }
  };
  visit(inputs, '');
  return lines;
}
