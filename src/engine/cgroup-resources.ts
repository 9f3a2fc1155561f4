/**
 * Live resource updates (containerd's Task.Update, CRI's UpdateContainerResources) written straight
 * into a sandbox's cgroup. runsc 20240729 has no `update` verb, but it puts the whole sandbox (sentry
 * and gofer) into the cgroup named by the spec's `linux.cgroupsPath`, so the host kernel enforces
 * whatever that cgroup says. The module has three parts:
 *
 * - `parseLinuxResources`: the OCI `LinuxResources` JSON containerd sends, checked field by field
 *   (unknown fields and bad values are InvalidArgument naming the field).
 * - Pure conversions: `planCgroupWrites` (resources + cgroup version + a few current values → the
 *   files to write, in a safe order), `cpuSharesToWeight`, `cgroupOfProcess` (/proc/PID/cgroup +
 *   mountinfo → directories), `refuseUnchangeable` (fields a live sandbox cannot change).
 * - `applyCgroupWrites`: the one place that writes, with an undo per file, so a write the kernel
 *   refuses half-way leaves the cgroup as it was.
 * - `readSandboxCgroup` and `readOomKillCount`: reading a sandbox's cgroup and its OOM kill count
 *   (for TaskOOM events, task/oom.ts).
 *
 * Fields a live sandbox cannot change (devices, block I/O, huge pages, network classes, RDMA,
 * realtime CPU, kernel memory, OOM-killer switch, CPU idle) are accepted only when they equal the
 * container's spec: CRI sends the whole resources block, devices included, on every update.
 */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Cleanup } from '../cleanup.js';
import { ShimError } from '../errors.js';
import { silentLogger, type Logger } from '../log/logger.js';

// ---------------------------------------------------------------- OCI types

/** OCI runtime-spec `LinuxMemory` (bytes; -1 = no limit). */
export interface LinuxMemory {
  limit?: number;
  reservation?: number;
  /** Memory + swap, as in cgroup v1's memsw (not swap alone). */
  swap?: number;
  kernel?: number;
  kernelTCP?: number;
  swappiness?: number;
  disableOOMKiller?: boolean;
  useHierarchy?: boolean;
  /** Refuse a new limit below the memory in use (instead of reclaiming or OOM-killing). */
  checkBeforeUpdate?: boolean;
}

/** OCI runtime-spec `LinuxCPU` (microseconds for quota/period/burst). */
export interface LinuxCpu {
  shares?: number;
  quota?: number;
  burst?: number;
  period?: number;
  realtimeRuntime?: number;
  realtimePeriod?: number;
  cpus?: string;
  mems?: string;
  idle?: number;
}

/** OCI runtime-spec `LinuxResources`, as containerd packs it (JSON) into UpdateTaskRequest.resources. */
export interface LinuxResources {
  memory?: LinuxMemory;
  cpu?: LinuxCpu;
  pids?: { limit: number };
  /** cgroup v2 files by name (`memory.high`, …), written as given. */
  unified?: Record<string, string>;
  /** Not changeable on a live sandbox; accepted when equal to the spec's. */
  devices?: unknown[];
  blockIO?: Record<string, unknown>;
  hugepageLimits?: unknown[];
  network?: Record<string, unknown>;
  rdma?: Record<string, unknown>;
}

type FieldKind = 'int' | 'uint' | 'bool' | 'string';

const MEMORY_FIELDS: Readonly<Record<keyof LinuxMemory, FieldKind>> = {
  limit: 'int',
  reservation: 'int',
  swap: 'int',
  kernel: 'int',
  kernelTCP: 'int',
  swappiness: 'uint',
  disableOOMKiller: 'bool',
  useHierarchy: 'bool',
  checkBeforeUpdate: 'bool',
};

const CPU_FIELDS: Readonly<Record<keyof LinuxCpu, FieldKind>> = {
  shares: 'uint',
  quota: 'int',
  burst: 'uint',
  period: 'uint',
  realtimeRuntime: 'int',
  realtimePeriod: 'uint',
  cpus: 'string',
  mems: 'string',
  idle: 'int',
};

const OPAQUE_FIELDS = ['devices', 'blockIO', 'hugepageLimits', 'network', 'rdma'] as const;

/** Field names in errors: the place in the OCI spec, as an operator would look it up. */
const F = (path: string): string => `linux.resources.${path}`;

function invalid(field: string, detail: string): ShimError {
  return new ShimError('InvalidArgument', `update ${F(field)}: ${detail}`);
}

// ---------------------------------------------------------------- parsing

/** Decodes the JSON bytes of UpdateTaskRequest.resources. */
export function decodeLinuxResources(bytes: Uint8Array): LinuxResources {
  if (bytes.length === 0) throw new ShimError('InvalidArgument', 'update request carries no resources');
  let value: unknown;
  try {
    value = JSON.parse(Buffer.from(bytes).toString('utf8'));
  } catch (err) {
    throw new ShimError('InvalidArgument', `update resources are not JSON: ${(err as Error).message}`, { cause: err });
  }
  return parseLinuxResources(value);
}

/**
 * Checks an OCI LinuxResources value field by field. `null` counts as absent (Go's encoder writes
 * nil pointers so when a client does not omit them). Unknown fields are InvalidArgument.
 */
export function parseLinuxResources(value: unknown): LinuxResources {
  if (!isRecord(value)) throw new ShimError('InvalidArgument', 'update resources are not a JSON object (OCI LinuxResources)');
  const out: LinuxResources = {};
  for (const [key, v] of Object.entries(value)) {
    if (v === null) continue;
    switch (key) {
      case 'memory':
        out.memory = parseFields(v, 'memory', MEMORY_FIELDS) as LinuxMemory;
        break;
      case 'cpu':
        out.cpu = parseFields(v, 'cpu', CPU_FIELDS) as LinuxCpu;
        break;
      case 'pids': {
        const pids = parseFields(v, 'pids', { limit: 'int' });
        if (typeof pids.limit !== 'number') throw invalid('pids.limit', 'missing (the OCI spec requires it in a pids object)');
        out.pids = { limit: pids.limit };
        break;
      }
      case 'unified': {
        if (!isRecord(v)) throw invalid('unified', 'is not an object of file names to values');
        const unified: Record<string, string> = {};
        for (const [file, content] of Object.entries(v)) {
          if (typeof content !== 'string') throw invalid(`unified.${file}`, 'is not a string');
          unified[file] = content;
        }
        out.unified = unified;
        break;
      }
      case 'devices':
      case 'hugepageLimits':
        if (!Array.isArray(v)) throw invalid(key, 'is not an array');
        out[key] = v as unknown[];
        break;
      case 'blockIO':
      case 'network':
      case 'rdma':
        if (!isRecord(v)) throw invalid(key, 'is not an object');
        out[key] = v;
        break;
      default:
        throw invalid(key, 'is not a field of OCI LinuxResources');
    }
  }
  return out;
}

function parseFields(value: unknown, group: string, fields: Readonly<Record<string, FieldKind>>): Record<string, number | boolean | string> {
  if (!isRecord(value)) throw invalid(group, 'is not an object');
  const out: Record<string, number | boolean | string> = {};
  for (const [key, v] of Object.entries(value)) {
    if (v === null) continue;
    const kind = fields[key];
    const field = `${group}.${key}`;
    if (kind === undefined) throw invalid(field, `is not a field of OCI Linux${group === 'cpu' ? 'CPU' : group[0]!.toUpperCase() + group.slice(1)}`);
    if (kind === 'bool') {
      if (typeof v !== 'boolean') throw invalid(field, `${JSON.stringify(v)} is not a boolean`);
    } else if (kind === 'string') {
      if (typeof v !== 'string') throw invalid(field, `${JSON.stringify(v)} is not a string`);
    } else {
      // JSON numbers above 2^53 have already lost digits: refuse rather than write a rounded value.
      if (typeof v !== 'number' || !Number.isSafeInteger(v)) throw invalid(field, `${JSON.stringify(v)} is not an integer (within ±2^53)`);
      if (kind === 'uint' && v < 0) throw invalid(field, `${v} is negative`);
    }
    out[key] = v;
  }
  return out;
}

// ---------------------------------------------------------------- fields a live sandbox keeps

/** Fields thaw cannot change on a live sandbox, by path below linux.resources. */
const UNCHANGEABLE: readonly { field: string; get: (r: LinuxResources) => unknown; why: string }[] = [
  ...OPAQUE_FIELDS.map((k) => ({ field: k, get: (r: LinuxResources) => r[k], why: 'is fixed when the sandbox is created' })),
  { field: 'memory.kernel', get: (r) => r.memory?.kernel, why: 'kernel memory limits are deprecated and not applied' },
  { field: 'memory.kernelTCP', get: (r) => r.memory?.kernelTCP, why: 'kernel memory limits are deprecated and not applied' },
  { field: 'memory.disableOOMKiller', get: (r) => r.memory?.disableOOMKiller, why: 'is fixed when the sandbox is created' },
  { field: 'memory.useHierarchy', get: (r) => r.memory?.useHierarchy, why: 'is fixed when the sandbox is created' },
  { field: 'cpu.realtimeRuntime', get: (r) => r.cpu?.realtimeRuntime, why: 'realtime scheduling is not available to a gVisor sandbox' },
  { field: 'cpu.realtimePeriod', get: (r) => r.cpu?.realtimePeriod, why: 'realtime scheduling is not available to a gVisor sandbox' },
  { field: 'cpu.idle', get: (r) => r.cpu?.idle, why: 'is fixed when the sandbox is created' },
];

/**
 * NotImplemented, naming the field, for any field thaw cannot change that differs from the
 * container's spec (`spec` = the spec's linux.resources; absent fields compare as absent).
 */
export function refuseUnchangeable(resources: LinuxResources, spec: LinuxResources | undefined): void {
  for (const u of UNCHANGEABLE) {
    const wanted = u.get(resources);
    if (wanted === undefined) continue;
    const current = spec ? u.get(spec) : undefined;
    if (!sameJson(wanted, current)) {
      throw new ShimError('NotImplemented', `update ${F(u.field)}: cannot be changed on a running thaw task (${u.why}); updatable: memory limit/reservation/swap/swappiness, cpu shares/quota/period/burst/cpus/mems, pids.limit, unified`);
    }
  }
}

// ---------------------------------------------------------------- planning (pure)

export type CgroupMode = 'v1' | 'v2';

/** One file to write. `controller` is the v1 hierarchy ('' on v2); `field` is what it serves, for errors. */
export interface CgroupWrite {
  controller: string;
  file: string;
  value: string;
  field: string;
  /** A write the request implies but did not ask for (memsw following memory.limit -1): skipped where the file does not exist. */
  optional?: boolean;
}

/** Current values the plan depends on (read by the caller from the cgroup). */
export interface CgroupNow {
  /** The memory limit in force, 'max' for none. */
  memoryLimit?: number | 'max';
  /** Memory in use, bytes (for memory.checkBeforeUpdate). */
  memoryUsage?: number;
  /** v2 `cpu.max` as read: "<quota|max> <period>". */
  cpuMax?: string;
}

/** OCI cpu.shares (2..262144, cgroup v1) → cgroup v2 cpu.weight (1..10000), the mapping runc and crun use. */
export function cpuSharesToWeight(shares: number): number {
  return 1 + Math.floor(((shares - 2) * 9999) / 262142);
}

/** v1 reports "no limit" as LONG_MAX rounded down to a page; anything this large is no limit. */
const V1_UNLIMITED_FLOOR = 2 ** 62;

/** A limit file's content as a number, or 'max'. */
export function parseLimit(text: string): number | 'max' {
  const t = text.trim();
  if (t === 'max' || t === '-1') return 'max';
  const n = Number(t);
  if (!Number.isFinite(n)) throw new ShimError('Internal', `unexpected cgroup limit ${JSON.stringify(t)}`);
  return n >= V1_UNLIMITED_FLOOR ? 'max' : n;
}

const CPU_LIST = /^\d+(-\d+)?(,\d+(-\d+)?)*$/;
const UNIFIED_KEY = /^[a-z][a-z0-9_]*\.[a-z0-9_.]+$/;

/**
 * The cgroup files to write for `r`, in an order the kernel accepts. Validates values (InvalidArgument
 * naming the field) and refuses what this cgroup version cannot express (NotImplemented).
 */
export function planCgroupWrites(r: LinuxResources, mode: CgroupMode, now: CgroupNow = {}): CgroupWrite[] {
  const m = r.memory ?? {};
  const c = r.cpu ?? {};
  checkValues(r);
  if (m.checkBeforeUpdate === true && m.limit !== undefined && m.limit > 0 && now.memoryUsage !== undefined && now.memoryUsage > m.limit) {
    throw new ShimError(
      'FailedPrecondition',
      `update ${F('memory.limit')}: ${m.limit} is below the ${now.memoryUsage} bytes in use (memory.checkBeforeUpdate is set)`,
    );
  }
  return mode === 'v1' ? planV1(r, m, c, now) : planV2(r, m, c, now);
}

function checkValues(r: LinuxResources): void {
  const m = r.memory ?? {};
  const c = r.cpu ?? {};
  const limitLike = (field: string, v: number | undefined): void => {
    if (v !== undefined && v !== -1 && v <= 0) throw invalid(field, `${v} is not a limit (bytes > 0, or -1 for none; leave the field out to keep it)`);
  };
  limitLike('memory.limit', m.limit);
  limitLike('memory.swap', m.swap);
  if (m.reservation !== undefined && m.reservation < -1) throw invalid('memory.reservation', `${m.reservation} is below -1`);
  if (m.limit !== undefined && m.swap !== undefined && m.limit > 0 && m.swap > 0 && m.swap < m.limit) {
    throw invalid('memory.swap', `${m.swap} is below memory.limit ${m.limit} (swap is memory + swap)`);
  }
  if (m.swappiness !== undefined && m.swappiness > 100) throw invalid('memory.swappiness', `${m.swappiness} is above 100`);
  if (c.shares !== undefined && (c.shares < 2 || c.shares > 262144)) throw invalid('cpu.shares', `${c.shares} is outside 2..262144`);
  if (c.period !== undefined && (c.period < 1000 || c.period > 1_000_000)) throw invalid('cpu.period', `${c.period} µs is outside 1000..1000000`);
  if (c.quota !== undefined && c.quota !== -1 && c.quota < 1000) throw invalid('cpu.quota', `${c.quota} µs is not a quota (≥ 1000, or -1 for none)`);
  for (const key of ['cpus', 'mems'] as const) {
    const v = c[key];
    if (v !== undefined && !CPU_LIST.test(v)) throw invalid(`cpu.${key}`, `${JSON.stringify(v)} is not a list such as "0-3,6"`);
  }
  if (r.pids !== undefined && r.pids.limit !== -1 && r.pids.limit <= 0) throw invalid('pids.limit', `${r.pids.limit} is not a limit (> 0, or -1 for none)`);
  for (const key of Object.keys(r.unified ?? {})) {
    if (!UNIFIED_KEY.test(key) || key.startsWith('cgroup.')) throw invalid(`unified.${key}`, 'is not a cgroup v2 controller file name');
  }
}

const num = (v: number): string => (v === -1 ? '-1' : String(v));
const max = (v: number): string => (v === -1 ? 'max' : String(v));

function planV1(r: LinuxResources, m: LinuxMemory, c: LinuxCpu, now: CgroupNow): CgroupWrite[] {
  const out: CgroupWrite[] = [];
  if (r.unified !== undefined && Object.keys(r.unified).length > 0) {
    throw new ShimError('NotImplemented', `update ${F('unified')}: needs cgroup v2; this sandbox's cgroups are v1`);
  }
  const limit: CgroupWrite | undefined = m.limit === undefined ? undefined : { controller: 'memory', file: 'memory.limit_in_bytes', value: num(m.limit), field: 'memory.limit' };
  let swap: CgroupWrite | undefined =
    m.swap === undefined ? undefined : { controller: 'memory', file: 'memory.memsw.limit_in_bytes', value: num(m.swap), field: 'memory.swap' };
  // v1 needs memsw ≥ limit at every step: lifting the limit to none lifts memsw with it, and the
  // order of the two writes follows the direction of the change.
  if (limit && !swap && m.limit === -1) swap = { controller: 'memory', file: 'memory.memsw.limit_in_bytes', value: '-1', field: 'memory.limit', optional: true };
  if (limit && swap) {
    const s = m.swap ?? -1;
    const current = now.memoryLimit ?? 'max';
    const swapFirst = s === -1 || (current !== 'max' && current < s);
    out.push(...(swapFirst ? [swap, limit] : [limit, swap]));
  } else if (limit) out.push(limit);
  else if (swap) out.push(swap);
  if (m.reservation !== undefined) out.push({ controller: 'memory', file: 'memory.soft_limit_in_bytes', value: num(m.reservation), field: 'memory.reservation' });
  if (m.swappiness !== undefined) out.push({ controller: 'memory', file: 'memory.swappiness', value: String(m.swappiness), field: 'memory.swappiness' });
  if (c.shares !== undefined) out.push({ controller: 'cpu', file: 'cpu.shares', value: String(c.shares), field: 'cpu.shares' });
  if (c.period !== undefined) out.push({ controller: 'cpu', file: 'cpu.cfs_period_us', value: String(c.period), field: 'cpu.period' });
  if (c.quota !== undefined) out.push({ controller: 'cpu', file: 'cpu.cfs_quota_us', value: num(c.quota), field: 'cpu.quota' });
  if (c.burst !== undefined) out.push({ controller: 'cpu', file: 'cpu.cfs_burst_us', value: String(c.burst), field: 'cpu.burst' });
  if (c.cpus !== undefined) out.push({ controller: 'cpuset', file: 'cpuset.cpus', value: c.cpus, field: 'cpu.cpus' });
  if (c.mems !== undefined) out.push({ controller: 'cpuset', file: 'cpuset.mems', value: c.mems, field: 'cpu.mems' });
  if (r.pids !== undefined) out.push({ controller: 'pids', file: 'pids.max', value: max(r.pids.limit), field: 'pids.limit' });
  return out;
}

function planV2(r: LinuxResources, m: LinuxMemory, c: LinuxCpu, now: CgroupNow): CgroupWrite[] {
  const out: CgroupWrite[] = [];
  const w = (file: string, value: string, field: string): void => void out.push({ controller: '', file, value, field });
  if (m.swappiness !== undefined) throw new ShimError('NotImplemented', `update ${F('memory.swappiness')}: cgroup v2 has no per-cgroup swappiness`);
  if (m.limit !== undefined) w('memory.max', max(m.limit), 'memory.limit');
  if (m.swap !== undefined) {
    // OCI swap is memory + swap; v2's memory.swap.max is swap alone.
    if (m.swap === -1) w('memory.swap.max', 'max', 'memory.swap');
    else {
      const limit = m.limit ?? now.memoryLimit ?? 'max';
      if (limit === 'max' || limit === -1) throw invalid('memory.swap', 'a memory + swap limit needs a memory limit (memory.limit)');
      if (m.swap < limit) throw invalid('memory.swap', `${m.swap} is below the memory limit ${limit} (swap is memory + swap)`);
      w('memory.swap.max', String(m.swap - limit), 'memory.swap');
    }
  }
  if (m.reservation !== undefined) w('memory.low', max(m.reservation), 'memory.reservation');
  if (c.shares !== undefined) w('cpu.weight', String(cpuSharesToWeight(c.shares)), 'cpu.shares');
  if (c.quota !== undefined || c.period !== undefined) w('cpu.max', cpuMaxValue(c.quota, c.period, now.cpuMax), c.quota !== undefined ? 'cpu.quota' : 'cpu.period');
  if (c.burst !== undefined) w('cpu.max.burst', String(c.burst), 'cpu.burst');
  if (c.cpus !== undefined) w('cpuset.cpus', c.cpus, 'cpu.cpus');
  if (c.mems !== undefined) w('cpuset.mems', c.mems, 'cpu.mems');
  if (r.pids !== undefined) w('pids.max', max(r.pids.limit), 'pids.limit');
  for (const [file, value] of Object.entries(r.unified ?? {})) w(file, value, `unified.${file}`);
  return out;
}

/**
 * v2 `cpu.max` for a quota and/or period: the kernel keeps the period when only a quota is written;
 * a period alone needs the current quota (`current` = cpu.max as read).
 */
export function cpuMaxValue(quota: number | undefined, period: number | undefined, current?: string): string {
  if (quota !== undefined) return period === undefined ? max(quota) : `${max(quota)} ${period}`;
  if (period === undefined) throw new ShimError('Internal', 'cpuMaxValue needs a quota or a period');
  const currentQuota = current?.trim().split(/\s+/)[0];
  if (currentQuota === undefined || currentQuota === '') throw new ShimError('Internal', 'cpu.max could not be read');
  return `${currentQuota} ${period}`;
}

// ---------------------------------------------------------------- finding the cgroup (pure parsing)

/** Where one process's cgroup lives on this host. */
export interface ProcessCgroup {
  mode: CgroupMode;
  /** v1: directory per controller (memory, cpu, cpuset, pids, …); v2: '' → the one directory. */
  dirs: ReadonlyMap<string, string>;
  /** The cgroup path relative to the hierarchy root (v1: the memory hierarchy's, else the first). */
  path: string;
}

interface HierarchyLine {
  id: number;
  controllers: string[];
  path: string;
}

/** `/proc/PID/cgroup` lines: `ID:controllers:path` (v2's line has ID 0 and no controllers). */
export function parseProcCgroup(text: string): HierarchyLine[] {
  const out: HierarchyLine[] = [];
  for (const line of text.split('\n')) {
    const m = /^(\d+):([^:]*):(.*)$/.exec(line);
    if (m) out.push({ id: Number(m[1]), controllers: m[2] === '' ? [] : m[2]!.split(','), path: m[3]! });
  }
  return out;
}

interface CgroupMounts {
  /** v1 controller → mount point. */
  v1: Map<string, string>;
  v2: string | undefined;
}

/** Cgroup mount points from `/proc/self/mountinfo`. */
export function parseCgroupMounts(mountinfo: string): CgroupMounts {
  const out: CgroupMounts = { v1: new Map(), v2: undefined };
  for (const line of mountinfo.split('\n')) {
    const dash = line.indexOf(' - ');
    if (dash < 0) continue;
    const mountPoint = unescapeMount(line.slice(0, dash).split(' ')[4] ?? '');
    const [fsType, , superOptions = ''] = line.slice(dash + 3).split(' ');
    if (fsType === 'cgroup2' && out.v2 === undefined) out.v2 = mountPoint;
    else if (fsType === 'cgroup') {
      for (const opt of superOptions.split(',')) if (!out.v1.has(opt)) out.v1.set(opt, mountPoint);
    }
  }
  return out;
}

const V1_CONTROLLERS = ['memory', 'cpu', 'cpuset', 'pids'];

/**
 * The cgroup directories of a process from its /proc/PID/cgroup and this process's mountinfo. v1
 * when the memory or cpu controller is on a v1 hierarchy (our development VM: v1 with an empty v2
 * beside it); otherwise the unified hierarchy.
 */
export function cgroupOfProcess(procCgroup: string, mountinfo: string): ProcessCgroup {
  const lines = parseProcCgroup(procCgroup);
  const mounts = parseCgroupMounts(mountinfo);
  const v1 = lines.filter((l) => l.controllers.some((c) => V1_CONTROLLERS.includes(c)));
  if (v1.length > 0) {
    const dirs = new Map<string, string>();
    for (const l of v1) {
      for (const c of l.controllers) {
        const mount = mounts.v1.get(c);
        if (mount !== undefined) dirs.set(c, join(mount, l.path));
      }
    }
    const path = (v1.find((l) => l.controllers.includes('memory')) ?? v1[0]!).path;
    return { mode: 'v1', dirs, path };
  }
  const unified = lines.find((l) => l.id === 0 && l.controllers.length === 0);
  if (unified === undefined || mounts.v2 === undefined) {
    throw new ShimError('FailedPrecondition', 'no cgroup v1 or v2 hierarchy with memory/cpu controllers found for the sandbox');
  }
  return { mode: 'v2', dirs: new Map([['', join(mounts.v2, unified.path)]]), path: unified.path };
}

// ---------------------------------------------------------------- writing

export interface ApplyOptions {
  log?: Logger;
  /** For logs and errors. */
  id?: string;
}

/**
 * The one place that writes cgroup files: each write first reads the old value and registers an undo,
 * so when the kernel refuses a later write the files written before are put back. Errors name the
 * request field and the file; EINVAL/ERANGE → InvalidArgument, EBUSY (a memory limit below what the
 * sandbox uses and cannot reclaim) → FailedPrecondition, a missing file → NotImplemented.
 */
export async function applyCgroupWrites(cgroup: ProcessCgroup, writes: readonly CgroupWrite[], opts: ApplyOptions = {}): Promise<CgroupWrite[]> {
  const log = opts.log ?? silentLogger;
  await using undo = new Cleanup((f) => log.warn({ id: opts.id, err: f.err, step: f.name }, 'cgroup undo failed'));
  const applied: CgroupWrite[] = [];
  for (const w of writes) {
    const dir = cgroup.dirs.get(w.controller);
    if (dir === undefined) {
      if (w.optional) continue;
      throw new ShimError('NotImplemented', `update ${F(w.field)}: no ${w.controller || 'cgroup v2'} hierarchy holds the sandbox`);
    }
    const file = join(dir, w.file);
    let old: string;
    try {
      old = (await readFile(file, 'utf8')).trim();
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
        if (w.optional) continue;
        throw new ShimError('NotImplemented', `update ${F(w.field)}: ${file} does not exist (controller not enabled or not supported by this kernel)`, { cause: err });
      }
      throw writeError(w, file, err);
    }
    try {
      await writeFile(file, w.value);
    } catch (err) {
      throw writeError(w, file, err);
    }
    // Putting back an empty cpuset would fail; the kernel keeps what it had then anyway.
    if (old !== '') undo.add(`restore ${file}`, () => writeFile(file, old));
    applied.push(w);
    log.debug({ id: opts.id, file, value: w.value, old }, 'cgroup write');
  }
  undo.release();
  return applied;
}

function writeError(w: CgroupWrite, file: string, err: unknown): ShimError {
  const code = (err as NodeJS.ErrnoException).code;
  const text = `update ${F(w.field)}: writing ${JSON.stringify(w.value)} to ${file} failed: ${code ?? (err as Error).message}`;
  if (code === 'EINVAL' || code === 'ERANGE') return new ShimError('InvalidArgument', `${text} (the kernel refused the value)`, { cause: err });
  if (code === 'EBUSY') return new ShimError('FailedPrecondition', `${text} (the sandbox uses more than that and the kernel could not reclaim it)`, { cause: err });
  if (code === 'ENOENT') return new ShimError('FailedPrecondition', `${text} (the cgroup is gone)`, { cause: err });
  return new ShimError('Internal', text, { cause: err });
}

// ---------------------------------------------------------------- the whole update

export interface UpdateSandboxCgroupOptions {
  /** Host pid of a process in the sandbox's cgroup (runsc's sandbox process). */
  pid: number;
  resources: LinuxResources;
  /** The container spec's linux.resources (to tell unchanged fields from changes). */
  specResources?: LinuxResources;
  id?: string;
  log?: Logger;
  /** For tests: where /proc is. */
  procRoot?: string;
}

/**
 * Applies `resources` to the cgroup of process `pid` (a sandbox). Refuses when that process has no
 * cgroup of its own — the spec set no linux.cgroupsPath and it shares this shim's cgroup — so that
 * limits never land on the shim or on everything else in its cgroup. Returns the writes made.
 */
export async function updateSandboxCgroup(o: UpdateSandboxCgroupOptions): Promise<CgroupWrite[]> {
  refuseUnchangeable(o.resources, o.specResources);
  const { cgroup, shared } = await readSandboxCgroup(o.pid, o.procRoot, 'update');
  if (shared) {
    throw new ShimError(
      'FailedPrecondition',
      `update: the sandbox has no cgroup of its own (it is in ${JSON.stringify(cgroup.path)}, like the shim); give the container a linux.cgroupsPath`,
    );
  }
  const writes = planCgroupWrites(o.resources, cgroup.mode, await readNow(cgroup, o.resources));
  const applied = await applyCgroupWrites(cgroup, writes, { log: o.log, id: o.id });
  (o.log ?? silentLogger).info({ id: o.id, phase: 'update', cgroup: cgroup.path, mode: cgroup.mode, writes: applied.map((w) => `${w.file}=${w.value}`) }, 'resources updated');
  return applied;
}

/**
 * The cgroup of process `pid` (a sandbox) from /proc. `shared`: it has no cgroup of its own (the
 * root, or this process's cgroup: the spec set no linux.cgroupsPath), so its files also count and
 * limit processes that are not the sandbox's. FailedPrecondition, naming `op`, when the process is gone.
 */
export async function readSandboxCgroup(pid: number, procRoot = '/proc', op = 'cgroup'): Promise<{ cgroup: ProcessCgroup; shared: boolean }> {
  let procCgroup: string;
  try {
    procCgroup = await readFile(join(procRoot, String(pid), 'cgroup'), 'utf8');
  } catch (err) {
    throw new ShimError('FailedPrecondition', `${op}: the sandbox process ${pid} is gone`, { cause: err });
  }
  const mountinfo = await readFile(join(procRoot, 'self', 'mountinfo'), 'utf8');
  const cgroup = cgroupOfProcess(procCgroup, mountinfo);
  const own = cgroupOfProcess(await readFile(join(procRoot, 'self', 'cgroup'), 'utf8'), mountinfo);
  return { cgroup, shared: cgroup.path === '/' || cgroup.path === own.path };
}

// ---------------------------------------------------------------- OOM kills (reading)

/**
 * The file that counts a cgroup's OOM kills: v1 `memory.oom_control` (its `oom_kill` line, kernel
 * ≥ 4.13), v2 `memory.events`. Both count processes of this cgroup that the kernel OOM-killed,
 * whichever limit (this cgroup's, a parent's, the host's) ran out; v2 also counts its descendants.
 * undefined when no memory hierarchy holds the cgroup.
 */
export function oomKillFile(cgroup: ProcessCgroup): string | undefined {
  const v1 = cgroup.mode === 'v1';
  const dir = cgroup.dirs.get(v1 ? 'memory' : '');
  return dir === undefined ? undefined : join(dir, v1 ? 'memory.oom_control' : 'memory.events');
}

/** The `oom_kill N` count of memory.oom_control (v1) or memory.events (v2); undefined without that line (v1 before 4.13). */
export function parseOomKillCount(text: string): number | undefined {
  const m = /^oom_kill (\d+)$/m.exec(text);
  return m ? Number(m[1]) : undefined;
}

/** Reads a cgroup's OOM kill count (`file` from oomKillFile); undefined when the cgroup is gone or the kernel keeps no count. */
export async function readOomKillCount(file: string): Promise<number | undefined> {
  const text = await readFile(file, 'utf8').catch((err: unknown) => {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT' || (err as NodeJS.ErrnoException).code === 'ENODEV') return '';
    throw err;
  });
  return parseOomKillCount(text);
}

/** Reads the few current values planCgroupWrites needs for this request (nothing else). */
async function readNow(cgroup: ProcessCgroup, r: LinuxResources): Promise<CgroupNow> {
  const v1 = cgroup.mode === 'v1';
  const read = async (controller: string, file: string): Promise<string | undefined> => {
    const dir = cgroup.dirs.get(v1 ? controller : '');
    return dir === undefined ? undefined : readFile(join(dir, file), 'utf8').catch(() => undefined);
  };
  const now: CgroupNow = {};
  const m = r.memory;
  if (m?.limit !== undefined || m?.swap !== undefined) {
    const text = await read('memory', v1 ? 'memory.limit_in_bytes' : 'memory.max');
    if (text !== undefined) now.memoryLimit = parseLimit(text);
  }
  if (m?.checkBeforeUpdate === true && m.limit !== undefined) {
    const text = await read('memory', v1 ? 'memory.usage_in_bytes' : 'memory.current');
    if (text !== undefined) now.memoryUsage = Number(text.trim());
  }
  if (!v1 && r.cpu?.period !== undefined && r.cpu.quota === undefined) now.cpuMax = await read('cpu', 'cpu.max');
  return now;
}

// ---------------------------------------------------------------- helpers

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Equality of JSON values with object keys in any order and null as absent. */
export function sameJson(a: unknown, b: unknown): boolean {
  return canonical(a) === canonical(b);
}

function canonical(v: unknown): string {
  if (v === null || v === undefined) return 'null';
  if (Array.isArray(v)) return `[${v.map(canonical).join(',')}]`;
  if (isRecord(v)) {
    const keys = Object.keys(v)
      .filter((k) => v[k] !== null && v[k] !== undefined)
      .sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}:${canonical(v[k])}`).join(',')}}`;
  }
  return JSON.stringify(v);
}

/** /proc mountinfo escapes spaces etc. as octal. */
function unescapeMount(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(Number.parseInt(o, 8)));
}
