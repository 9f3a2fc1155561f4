import { chmod, mkdir, mkdtemp, rm, symlink, unlink, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import {
  canonicalJson,
  collectKeyInputs,
  computeKey,
  cpuIdentity,
  describeKeyInputs,
  fingerprintRootfs,
  isSnapshotKey,
  parseCpuinfo,
  type KeyInputs,
  type KeySpec,
} from '../../src/snapshot/key.js';
import { fixtureKeyInputs } from '../fixtures/snapshot/inputs.js';

const PINNED_FIXTURE_KEY = '27d69f4a85ff081316804c3dbfd2d31683002b396698fdb749cfb11a74e159bb';

/** Every input populated (gpu and rootfs non-null, no empty arrays) so each leaf can be mutated. */
function fullInputs(): KeyInputs {
  const k = fixtureKeyInputs(1);
  k.process.user.additionalGids = [10, 11];
  k.image.labels = { 'org.opencontainers.image.version': '1.2' };
  k.image.rootfs = { fingerprint: 'f'.repeat(64), entries: 10, bytes: 1000 };
  k.gpu = { model: 'NVIDIA H100 80GB HBM3', count: 1, driver: '580.159.04' };
  k.ignoredEnv = ['HOSTNAME'];
  return k;
}

function leafPaths(v: unknown, at: (string | number)[] = []): (string | number)[][] {
  if (Array.isArray(v)) return v.flatMap((x, i) => leafPaths(x, [...at, i]));
  if (v !== null && typeof v === 'object') return Object.entries(v).flatMap(([k, x]) => leafPaths(x, [...at, k]));
  return [at];
}

function mutate(obj: unknown, path: (string | number)[]): void {
  let o = obj as Record<string | number, unknown>;
  for (const p of path.slice(0, -1)) o = o[p] as Record<string | number, unknown>;
  const last = path[path.length - 1]!;
  const v = o[last];
  o[last] = typeof v === 'string' ? `${v}x` : typeof v === 'number' ? v + 1 : typeof v === 'boolean' ? !v : 'was-null';
}

function reverseKeys(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(reverseKeys);
  if (v !== null && typeof v === 'object') {
    return Object.fromEntries(Object.entries(v).reverse().map(([k, x]) => [k, reverseKeys(x)]));
  }
  return v;
}

t.test('the key is a stable sha256 of canonical JSON', async (t) => {
  const k = computeKey(fixtureKeyInputs(0));
  t.ok(isSnapshotKey(k));
  t.equal(computeKey(fixtureKeyInputs(0)), k, 'same inputs, same key');
  // Pinned: a change here orphans every existing snapshot, so it must be deliberate.
  t.equal(k, PINNED_FIXTURE_KEY);
  t.equal(canonicalJson({ b: [2, { d: 1, c: null }], a: 'x' }), '{"a":"x","b":[2,{"c":null,"d":1}]}');
  t.throws(() => canonicalJson({ a: Number.NaN }), { code: 'InvalidArgument' });
  t.throws(() => canonicalJson({ a: undefined }), { code: 'InvalidArgument' });
});

t.test('object key order does not matter', async (t) => {
  const base = fullInputs();
  t.equal(computeKey(reverseKeys(base) as KeyInputs), computeKey(base));
  t.not(JSON.stringify(reverseKeys(base)), JSON.stringify(base), 'the reversal really reordered keys');
});

t.test('changing any single input changes the key', async (t) => {
  const base = fullInputs();
  const baseKey = computeKey(base);
  const paths = leafPaths(base);
  t.ok(paths.length > 25, `${paths.length} leaf inputs`);
  const seen = new Set([baseKey]);
  for (const path of paths) {
    const changed = structuredClone(base);
    mutate(changed, path);
    const k = computeKey(changed);
    t.not(k, baseKey, `changing ${path.join('.')} changes the key`);
    seen.add(k);
  }
  t.equal(seen.size, paths.length + 1, 'every mutation gives a distinct key');
  // Structural changes too: null vs object, array order, an extra element.
  const noGpu = { ...structuredClone(base), gpu: null };
  t.not(computeKey(noGpu), baseKey, 'gpu null vs present');
  const swapped = structuredClone(base);
  swapped.process.env.reverse();
  t.not(computeKey(swapped), baseKey, 'env order');
  const extraArg = structuredClone(base);
  extraArg.process.args.push('--more');
  t.not(computeKey(extraArg), baseKey, 'one more arg');
});

async function makeTree(t: Test): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'thaw-rootfs-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  await mkdir(join(dir, 'bin'));
  await mkdir(join(dir, 'etc'));
  await mkdir(join(dir, 'proc'));
  await mkdir(join(dir, 'usr/lib'), { recursive: true });
  await writeFile(join(dir, 'bin/app'), 'binary-v1');
  await writeFile(join(dir, 'etc/hosts'), '127.0.0.1 localhost\n');
  await writeFile(join(dir, 'usr/lib/libx.so'), 'lib');
  await symlink('/bin/app', join(dir, 'bin/link'));
  await utimes(join(dir, 'bin/app'), 1_000_000, 1_000_000);
  return dir;
}

t.test('rootfs fingerprint follows file changes and ignores what is not the image', async (t) => {
  const dir = await makeTree(t);
  const fp = async (exclude: string[] = []) => (await fingerprintRootfs(dir, { exclude })).fingerprint;
  const first = await fingerprintRootfs(dir);
  t.equal(first.entries, 8, 'bin, bin/app, bin/link, etc, etc/hosts, usr, usr/lib, usr/lib/libx.so (proc skipped)');
  t.equal(first.bytes, 9 + 20 + 3);
  t.equal(await fp(), first.fingerprint, 'stable');

  // Not part of the image: /proc contents, mount destinations, gVisor's filestore, directory mtimes.
  await writeFile(join(dir, 'proc/cpuinfo'), 'x');
  await writeFile(join(dir, '.gvisor.filestore.abc'), 'overlay');
  await writeFile(join(dir, 'etc/tmpfile'), 'x');
  await unlink(join(dir, 'etc/tmpfile')); // bumps etc's mtime only
  t.equal(await fp(), first.fingerprint, 'proc, filestore and directory mtimes are ignored');
  await writeFile(join(dir, 'etc/hosts'), '10.0.0.1 pod\n');
  const withHosts = await fp();
  t.not(withHosts, first.fingerprint, 'a changed file changes the fingerprint');
  t.equal(await fp(['/etc/hosts']), await fp(['etc/hosts/']), 'exclusions are normalised');

  const steps: [string, () => Promise<unknown>][] = [
    ['content and size', () => writeFile(join(dir, 'bin/app'), 'binary-v2-longer')],
    ['mtime', () => utimes(join(dir, 'bin/app'), 2_000_000, 2_000_000)],
    ['mode', () => chmod(join(dir, 'bin/app'), 0o755)],
    ['symlink target', async () => {
      await unlink(join(dir, 'bin/link'));
      await symlink('/bin/other', join(dir, 'bin/link'));
    }],
    ['new file', () => writeFile(join(dir, 'usr/lib/liby.so'), '')],
    ['new empty directory', () => mkdir(join(dir, 'opt'))],
    ['renamed file', async () => {
      await unlink(join(dir, 'usr/lib/liby.so'));
      await writeFile(join(dir, 'usr/lib/libz.so'), '');
    }],
  ];
  let prev = withHosts;
  for (const [what, change] of steps) {
    await change();
    const now = await fp();
    t.not(now, prev, `${what} changes the fingerprint`);
    prev = now;
  }
});

t.test('fingerprint walks a wide tree and stops on abort', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'thaw-rootfs-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  for (let d = 0; d < 5; d++) {
    await mkdir(join(dir, `d${d}`));
    await Promise.all(Array.from({ length: 150 }, (_, i) => writeFile(join(dir, `d${d}`, `f${i}`), String(i))));
  }
  const r = await fingerprintRootfs(dir);
  t.equal(r.entries, 5 + 750);
  await t.rejects(fingerprintRootfs(dir, { signal: AbortSignal.abort() }), { name: 'AbortError' });
});

function spec(over: Partial<KeySpec> = {}): KeySpec {
  return {
    process: { args: ['/bin/app'], env: ['PATH=/bin', 'HOSTNAME=pod-a'], cwd: '/', user: { uid: 1000, gid: 1000 } },
    root: { path: 'rootfs' },
    mounts: [{ destination: '/proc', type: 'proc', source: 'proc' }, { destination: '/etc/hosts', type: 'bind', source: '/var/lib/x/hosts' }],
    ...over,
  };
}

const CPU = parseCpuinfo('vendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\nmodel name\t: Test\nflags\t\t: sse avx\n', 'x64');

t.test('collectKeyInputs reads the spec, the image identity and the rootfs', async (t) => {
  const bundle = await mkdtemp(join(tmpdir(), 'thaw-bundle-'));
  t.teardown(() => rm(bundle, { recursive: true, force: true }));
  await mkdir(join(bundle, 'rootfs/etc'), { recursive: true });
  await writeFile(join(bundle, 'rootfs/app'), 'v1');
  await writeFile(join(bundle, 'rootfs/etc/hosts'), 'a');
  const engine = { name: 'gvisor', identity: { version: 'v1', platform: 'systrap' } };
  const collect = (s: KeySpec, extra: Partial<Parameters<typeof collectKeyInputs>[0]> = {}) =>
    collectKeyInputs({ spec: s, bundle, engine, gpu: null, cpu: CPU, ...extra });

  const byRootfs = await collect(spec());
  t.same(byRootfs.process, { args: ['/bin/app'], env: ['PATH=/bin', 'HOSTNAME=pod-a'], cwd: '/', user: { uid: 1000, gid: 1000, additionalGids: [] }, terminal: false });
  t.same(byRootfs.mounts, [{ destination: '/proc', type: 'proc' }, { destination: '/etc/hosts', type: 'bind' }], 'mount sources are not inputs');
  t.equal(byRootfs.image.digest, null);
  t.equal(byRootfs.image.rootfs?.entries, 2, 'app, etc (etc/hosts is a mount destination)');
  t.same(byRootfs.engine, engine);

  // A mount destination's file in the rootfs is not the image's: changing it keeps the key.
  await writeFile(join(bundle, 'rootfs/etc/hosts'), 'bbbb');
  t.equal(computeKey(await collect(spec())), computeKey(byRootfs), 'mount destinations are excluded');
  await writeFile(join(bundle, 'rootfs/app'), 'v2-bigger');
  t.not(computeKey(await collect(spec())), computeKey(byRootfs), 'an image file change changes the key');

  // A digest in the image-name annotation identifies the image: no rootfs walk.
  const digest = `sha256:${'c'.repeat(64)}`;
  const annotated = await collect(
    spec({ annotations: { 'io.kubernetes.cri.image-name': `docker.io/x/app@${digest}`, 'org.opencontainers.image.version': '3', other: 'x' } }),
  );
  t.equal(annotated.image.digest, digest);
  t.equal(annotated.image.rootfs, null);
  t.same(annotated.image.labels, { 'org.opencontainers.image.version': '3' });
  await writeFile(join(bundle, 'rootfs/app'), 'v3');
  const annotatedAgain = await collect(spec({ annotations: { 'io.kubernetes.cri.image-name': `docker.io/x/app@${digest}`, 'org.opencontainers.image.version': '3' } }));
  t.equal(computeKey(annotatedAgain), computeKey(annotated), 'with a digest the rootfs is not read');

  // A tag is mutable: the rootfs is still fingerprinted and the name recorded.
  const tagged = await collect(spec({ annotations: { 'io.kubernetes.cri.image-name': 'docker.io/x/app:latest' } }));
  t.equal(tagged.image.name, 'docker.io/x/app:latest');
  t.equal(tagged.image.digest, null);
  t.ok(tagged.image.rootfs);

  const given = await collect(spec(), { image: { digest, name: 'app' } });
  t.same([given.image.name, given.image.digest, given.image.rootfs], ['app', digest, null], 'caller-given digest');

  // Env is part of the key unless excluded by name.
  const podB = spec({ process: { ...spec().process, env: ['PATH=/bin', 'HOSTNAME=pod-b'] } });
  t.not(computeKey(await collect(podB, { image: { digest } })), computeKey(await collect(spec(), { image: { digest } })), 'HOSTNAME counts by default');
  const ignoreA = await collect(spec(), { image: { digest }, ignoreEnv: ['HOSTNAME'] });
  const ignoreB = await collect(podB, { image: { digest }, ignoreEnv: ['HOSTNAME'] });
  t.equal(computeKey(ignoreA), computeKey(ignoreB), 'ignored env vars do not count');
  t.same(ignoreA.process.env, ['PATH=/bin']);
  t.same(ignoreA.ignoredEnv, ['HOSTNAME']);

  const gpu = await collect(spec(), { image: { digest }, gpu: { model: 'H100', count: 1, driver: '580' } });
  t.not(computeKey(gpu), computeKey(await collect(spec(), { image: { digest } })), 'gpu identity counts');

  const abs = await collect(spec({ root: { path: join(bundle, 'rootfs') } }));
  t.equal(abs.image.rootfs?.fingerprint, (await collect(spec())).image.rootfs?.fingerprint, 'absolute and relative root agree');
});

t.test('cpu identity from /proc/cpuinfo', async (t) => {
  const x86 = parseCpuinfo(
    'processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: sse2 avx fpu avx\nbugs\t\t: spectre\n\nprocessor\t: 1\nvendor_id\t: Other\n',
    'x64',
  );
  t.same(x86, { arch: 'x64', vendor: 'AuthenticAMD', model: '25/1/AMD EPYC', flags: ['avx', 'fpu', 'sse2'] });
  const arm = parseCpuinfo('processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\n', 'arm64');
  t.same(arm, { arch: 'arm64', vendor: '0x41', model: '8/0x3/0xd0c', flags: ['asimd', 'fp'] });
  const here = await cpuIdentity();
  t.equal(here.arch, process.arch);
  t.ok(here.flags.length > 0, `this machine: ${here.vendor} ${here.model}, ${here.flags.length} flags`);
  await t.rejects(cpuIdentity('/nonexistent/cpuinfo'), { code: 'Internal' });
});

t.test('describeKeyInputs shows every input', async (t) => {
  const inputs = fullInputs();
  const lines = describeKeyInputs(inputs);
  const names = lines.map((l) => l.input);
  for (const path of leafPaths(inputs)) {
    if (path[0] === 'cpu' && path[1] === 'flags') continue;
    const dotted = path.reduce<string>((s, p) => (typeof p === 'number' ? `${s}[${p}]` : s ? `${s}.${p}` : p), '');
    t.ok(names.includes(dotted), `${dotted} is shown`);
  }
  t.same(lines.find((l) => l.input === 'cpu.flags'), { input: 'cpu.flags', value: 'avx2 sse4_2' });
  t.same(lines.find((l) => l.input === 'process.env[1]'), { input: 'process.env[1]', value: 'MODEL=small' });
  t.same(lines.find((l) => l.input === 'gpu.count'), { input: 'gpu.count', value: '1' });
  const empty = describeKeyInputs({ ...inputs, gpu: null, mounts: [] });
  t.same(empty.find((l) => l.input === 'gpu'), { input: 'gpu', value: 'null' });
  t.same(empty.find((l) => l.input === 'mounts'), { input: 'mounts', value: '[]' });
});
