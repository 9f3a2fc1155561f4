import { copyFile, mkdir, readFile, symlink, writeFile, chmod, lstat } from 'node:fs/promises';
import { join } from 'node:path';
import { ShimError } from '../errors.js';

/**
 * OCI bundles: reading a bundle's config.json with clear errors, and building small bundles
 * (busybox-static + given static programs) for the demo, tests and benchmarks.
 */
export interface OciProcess {
  args: string[];
  env?: string[];
  cwd: string;
  terminal?: boolean;
  user?: { uid: number; gid: number; additionalGids?: number[] };
  [k: string]: unknown;
}

export interface OciSpec {
  ociVersion: string;
  process: OciProcess;
  root: { path: string; readonly?: boolean };
  annotations?: Record<string, string>;
  linux?: Record<string, unknown>;
  mounts?: unknown[];
  [k: string]: unknown;
}

/** True when the spec asks for NVIDIA devices (device nodes, or the NVIDIA container toolkit's env var). */
export function specWantsGpu(spec: OciSpec): boolean {
  const devices = Array.isArray(spec.linux?.['devices']) ? (spec.linux['devices'] as { path?: unknown }[]) : [];
  if (devices.some((d) => typeof d.path === 'string' && d.path.startsWith('/dev/nvidia'))) return true;
  const env = spec.process.env ?? [];
  return env.some((e) => e.startsWith('NVIDIA_VISIBLE_DEVICES=') && !/=(void|none|)$/.test(e));
}

/** Reads and minimally validates `<bundle>/config.json`; errors name the bundle and what is wrong. */
export async function readBundleSpec(bundle: string): Promise<OciSpec> {
  const path = join(bundle, 'config.json');
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new ShimError(
      code === 'ENOENT' ? 'NotFound' : 'InvalidArgument',
      code === 'ENOENT' ? `bundle ${bundle}: no config.json` : `bundle ${bundle}: cannot read config.json: ${(err as Error).message}`,
      { cause: err },
    );
  }
  let spec: unknown;
  try {
    spec = JSON.parse(text);
  } catch (err) {
    throw new ShimError('InvalidArgument', `bundle ${bundle}: config.json is not valid JSON: ${(err as Error).message}`, {
      cause: err,
    });
  }
  const s = spec as Partial<OciSpec>;
  if (typeof spec !== 'object' || spec === null) throw badSpec(bundle, 'is not an object');
  if (typeof s.process !== 'object' || s.process === null) throw badSpec(bundle, 'has no process');
  if (!Array.isArray(s.process.args) || s.process.args.length === 0 || !s.process.args.every((a) => typeof a === 'string')) {
    throw badSpec(bundle, 'process.args must be a non-empty array of strings');
  }
  if (typeof s.root?.path !== 'string') throw badSpec(bundle, 'has no root.path');
  const rootfs = s.root.path.startsWith('/') ? s.root.path : join(bundle, s.root.path);
  try {
    if (!(await lstat(rootfs)).isDirectory()) throw new Error('not a directory');
  } catch (err) {
    throw new ShimError('InvalidArgument', `bundle ${bundle}: root ${rootfs} is not a directory`, { cause: err });
  }
  return spec as OciSpec;
}

function badSpec(bundle: string, what: string): ShimError {
  return new ShimError('InvalidArgument', `bundle ${bundle}: config.json ${what}`);
}

export interface BuildBundleOptions {
  dir: string;
  args: string[];
  env?: string[];
  cwd?: string;
  /** Static host binaries to copy into the rootfs: host path → path in the container. */
  files?: Record<string, string>;
  annotations?: Record<string, string>;
  /** Install /bin/busybox (busybox-static) with sh, sleep, cat, echo, ls links. */
  busybox?: boolean;
}

const BUSYBOX = '/bin/busybox';
const BUSYBOX_LINKS = ['sh', 'sleep', 'cat', 'echo', 'ls', 'true', 'false', 'kill', 'touch', 'test', 'wc', 'date'];

/** Builds a runnable OCI bundle with a runc/runsc-compatible config.json. */
export async function buildBundle(opts: BuildBundleOptions): Promise<string> {
  const rootfs = join(opts.dir, 'rootfs');
  for (const d of ['bin', 'proc', 'dev', 'sys', 'tmp', 'etc', 'run']) await mkdir(join(rootfs, d), { recursive: true });
  await chmod(join(rootfs, 'tmp'), 0o1777);
  if (opts.busybox !== false) {
    await copyFile(BUSYBOX, join(rootfs, 'bin/busybox'));
    await chmod(join(rootfs, 'bin/busybox'), 0o755);
    for (const l of BUSYBOX_LINKS) await symlink('busybox', join(rootfs, 'bin', l)).catch(ignoreExists);
  }
  for (const [host, inContainer] of Object.entries(opts.files ?? {})) {
    const dest = join(rootfs, inContainer);
    await mkdir(join(dest, '..'), { recursive: true });
    await copyFile(host, dest);
    await chmod(dest, 0o755);
  }
  await writeFile(join(rootfs, 'etc/passwd'), 'root:x:0:0:root:/root:/bin/sh\n');
  const spec = defaultSpec({
    args: opts.args,
    env: opts.env ?? ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'],
    cwd: opts.cwd ?? '/',
    annotations: opts.annotations ?? {},
  });
  await writeFile(join(opts.dir, 'config.json'), JSON.stringify(spec, null, 2));
  return opts.dir;
}

function ignoreExists(err: NodeJS.ErrnoException): void {
  if (err.code !== 'EEXIST') throw err;
}

export function defaultSpec(p: { args: string[]; env: string[]; cwd: string; annotations: Record<string, string> }): OciSpec {
  const caps = ['CAP_AUDIT_WRITE', 'CAP_KILL', 'CAP_NET_BIND_SERVICE'];
  return {
    ociVersion: '1.0.2',
    process: {
      terminal: false,
      user: { uid: 0, gid: 0 },
      args: p.args,
      env: p.env,
      cwd: p.cwd,
      capabilities: { bounding: caps, effective: caps, permitted: caps },
      rlimits: [{ type: 'RLIMIT_NOFILE', hard: 1024, soft: 1024 }],
      noNewPrivileges: true,
    },
    root: { path: 'rootfs', readonly: true },
    hostname: 'thaw',
    mounts: [
      { destination: '/proc', type: 'proc', source: 'proc' },
      { destination: '/dev', type: 'tmpfs', source: 'tmpfs', options: ['nosuid', 'strictatime', 'mode=755', 'size=65536k'] },
      { destination: '/dev/pts', type: 'devpts', source: 'devpts', options: ['nosuid', 'noexec', 'newinstance', 'ptmxmode=0666', 'mode=0620'] },
      { destination: '/dev/shm', type: 'tmpfs', source: 'shm', options: ['nosuid', 'noexec', 'nodev', 'mode=1777', 'size=65536k'] },
      { destination: '/sys', type: 'sysfs', source: 'sysfs', options: ['nosuid', 'noexec', 'nodev', 'ro'] },
      { destination: '/tmp', type: 'tmpfs', source: 'tmpfs', options: ['nosuid', 'nodev', 'mode=1777'] },
    ],
    annotations: p.annotations,
    linux: {
      namespaces: [{ type: 'pid' }, { type: 'ipc' }, { type: 'uts' }, { type: 'mount' }],
      maskedPaths: ['/proc/kcore', '/proc/keys', '/proc/timer_list', '/sys/firmware'],
      readonlyPaths: ['/proc/bus', '/proc/fs', '/proc/irq', '/proc/sys', '/proc/sysrq-trigger'],
    },
  };
}
