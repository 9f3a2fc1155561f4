/**
 * Resource updates as cgroup writes: parsing containerd's LinuxResources JSON, the v1 and v2 plans
 * (values, order, refusals naming the field), the shares → weight mapping, finding a process's
 * cgroup from /proc text, and the one writer (undo on a refused write) over a fake cgroup tree.
 */
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import t from 'tap';
import {
  applyCgroupWrites,
  cgroupOfProcess,
  cpuMaxValue,
  cpuSharesToWeight,
  decodeLinuxResources,
  parseLimit,
  parseLinuxResources,
  planCgroupWrites,
  refuseUnchangeable,
  updateSandboxCgroup,
  type CgroupWrite,
  type ProcessCgroup,
} from '../../src/engine/cgroup-resources.js';

const MIB = 1024 * 1024;
const files = (ws: CgroupWrite[]): string[] => ws.map((w) => `${w.controller ? `${w.controller}/` : ''}${w.file}=${w.value}`);

t.test('parse: what containerd sends (Go JSON of specs.LinuxResources)', async (t) => {
  // ctr-style and CRI-style requests: pointers omitted when nil, devices carried along.
  const r = decodeLinuxResources(
    Buffer.from(
      JSON.stringify({
        devices: [{ allow: false, access: 'rwm' }],
        memory: { limit: 256 * MIB, swap: 256 * MIB },
        cpu: { shares: 512, quota: 50000, period: 100000, cpus: '0-1' },
        pids: { limit: 64 },
        unified: { 'memory.high': '200000000' },
      }),
    ),
  );
  t.same(r, {
    devices: [{ allow: false, access: 'rwm' }],
    memory: { limit: 256 * MIB, swap: 256 * MIB },
    cpu: { shares: 512, quota: 50000, period: 100000, cpus: '0-1' },
    pids: { limit: 64 },
    unified: { 'memory.high': '200000000' },
  });
  t.same(parseLinuxResources({ memory: { limit: 1024, swap: null }, cpu: null }), { memory: { limit: 1024 } }, 'null is absent');
  t.same(parseLinuxResources({}), {}, 'an empty update parses (it changes nothing)');
});

t.test('parse: bad input is InvalidArgument naming the field', async (t) => {
  const cases: [unknown, RegExp][] = [
    [{ memroy: { limit: 1 } }, /linux\.resources\.memroy: is not a field of OCI LinuxResources/],
    [{ memory: { limt: 1 } }, /linux\.resources\.memory\.limt: is not a field of OCI LinuxMemory/],
    [{ cpu: { quota: '50000' } }, /linux\.resources\.cpu\.quota: "50000" is not an integer/],
    [{ cpu: { shares: -2 } }, /linux\.resources\.cpu\.shares: -2 is negative/],
    [{ memory: { limit: 1.5 } }, /linux\.resources\.memory\.limit: 1\.5 is not an integer/],
    [{ memory: { limit: 9223372036854775807 } }, /memory\.limit: .* is not an integer \(within ±2\^53\)/],
    [{ pids: {} }, /linux\.resources\.pids\.limit: missing/],
    [{ unified: { 'memory.high': 5 } }, /linux\.resources\.unified\.memory\.high: is not a string/],
    [{ memory: { disableOOMKiller: 'yes' } }, /memory\.disableOOMKiller: "yes" is not a boolean/],
    [[1, 2], /not a JSON object/],
  ];
  for (const [value, message] of cases) {
    t.throws(() => parseLinuxResources(value), { code: 'InvalidArgument', message }, JSON.stringify(value));
  }
  t.throws(() => decodeLinuxResources(Buffer.from('{')), { code: 'InvalidArgument', message: /not JSON/ });
  t.throws(() => decodeLinuxResources(new Uint8Array()), { code: 'InvalidArgument', message: /no resources/ });
});

t.test('cpu.shares → cpu.weight: the runc/crun mapping, ends and default', async (t) => {
  t.equal(cpuSharesToWeight(2), 1);
  t.equal(cpuSharesToWeight(1024), 39, 'the default share is weight 39 (runc gives the same)');
  t.equal(cpuSharesToWeight(512), 20);
  t.equal(cpuSharesToWeight(262144), 10000);
});

t.test('v2 plan: files and values', async (t) => {
  const ws = planCgroupWrites(
    {
      memory: { limit: 256 * MIB, swap: 384 * MIB, reservation: 64 * MIB },
      cpu: { shares: 1024, quota: 50000, period: 100000, burst: 1000, cpus: '0', mems: '0' },
      pids: { limit: 100 },
      unified: { 'memory.high': '200000000' },
    },
    'v2',
  );
  t.same(files(ws), [
    `memory.max=${256 * MIB}`,
    `memory.swap.max=${128 * MIB}`,
    `memory.low=${64 * MIB}`,
    'cpu.weight=39',
    'cpu.max=50000 100000',
    'cpu.max.burst=1000',
    'cpuset.cpus=0',
    'cpuset.mems=0',
    'pids.max=100',
    'memory.high=200000000',
  ]);
  t.same(files(planCgroupWrites({ memory: { limit: -1, swap: -1 }, pids: { limit: -1 }, cpu: { quota: -1 } }, 'v2')), [
    'memory.max=max',
    'memory.swap.max=max',
    'cpu.max=max',
    'pids.max=max',
  ], '-1 is max');
  t.same(files(planCgroupWrites({ memory: { swap: 300 * MIB } }, 'v2', { memoryLimit: 200 * MIB })), [`memory.swap.max=${100 * MIB}`], 'swap alone uses the limit in force');
  t.throws(() => planCgroupWrites({ memory: { swap: 300 * MIB } }, 'v2', { memoryLimit: 'max' }), { code: 'InvalidArgument', message: /memory\.swap: .*needs a memory limit/ });
  t.throws(() => planCgroupWrites({ memory: { swappiness: 10 } }, 'v2'), { code: 'NotImplemented', message: /memory\.swappiness/ });
});

t.test('v2 cpu.max: quota alone keeps the period, period alone keeps the quota', async (t) => {
  t.equal(cpuMaxValue(50000, undefined), '50000');
  t.equal(cpuMaxValue(-1, 20000), 'max 20000');
  t.equal(cpuMaxValue(undefined, 20000, 'max 100000\n'), 'max 20000');
  t.equal(cpuMaxValue(undefined, 20000, '30000 100000'), '30000 20000');
  t.same(files(planCgroupWrites({ cpu: { period: 50000 } }, 'v2', { cpuMax: '25000 100000' })), ['cpu.max=25000 50000']);
});

t.test('v1 plan: files, values and the memory/memsw order', async (t) => {
  const ws = planCgroupWrites(
    { memory: { limit: 256 * MIB, reservation: 64 * MIB, swappiness: 0 }, cpu: { shares: 512, quota: 50000, period: 100000, cpus: '0-1' }, pids: { limit: 64 } },
    'v1',
  );
  t.same(files(ws), [
    `memory/memory.limit_in_bytes=${256 * MIB}`,
    `memory/memory.soft_limit_in_bytes=${64 * MIB}`,
    'memory/memory.swappiness=0',
    'cpu/cpu.shares=512',
    'cpu/cpu.cfs_period_us=100000',
    'cpu/cpu.cfs_quota_us=50000',
    'cpuset/cpuset.cpus=0-1',
    'pids/pids.max=64',
  ]);
  // memsw must stay ≥ the limit after every write.
  const up = planCgroupWrites({ memory: { limit: 512 * MIB, swap: 512 * MIB } }, 'v1', { memoryLimit: 256 * MIB });
  t.same(files(up), [`memory/memory.memsw.limit_in_bytes=${512 * MIB}`, `memory/memory.limit_in_bytes=${512 * MIB}`], 'raising: memsw first');
  const down = planCgroupWrites({ memory: { limit: 128 * MIB, swap: 128 * MIB } }, 'v1', { memoryLimit: 256 * MIB });
  t.same(files(down), [`memory/memory.limit_in_bytes=${128 * MIB}`, `memory/memory.memsw.limit_in_bytes=${128 * MIB}`], 'lowering: limit first');
  const none = planCgroupWrites({ memory: { limit: -1 } }, 'v1', { memoryLimit: 256 * MIB });
  t.same(files(none), ['memory/memory.memsw.limit_in_bytes=-1', 'memory/memory.limit_in_bytes=-1'], 'no limit lifts memsw too');
  t.equal(none[0]?.optional, true, '…where the kernel has memsw');
  t.throws(() => planCgroupWrites({ unified: { 'memory.high': '1' } }, 'v1'), { code: 'NotImplemented', message: /unified: needs cgroup v2/ });
  t.same(planCgroupWrites({ unified: {} }, 'v1'), [], 'an empty unified map is nothing to refuse');
});

t.test('plan: values the kernel would refuse are InvalidArgument naming the field', async (t) => {
  const cases: [Parameters<typeof planCgroupWrites>[0], RegExp][] = [
    [{ memory: { limit: 0 } }, /memory\.limit: 0 is not a limit/],
    [{ memory: { limit: -5 } }, /memory\.limit: -5 is not a limit/],
    [{ memory: { limit: 256 * MIB, swap: 128 * MIB } }, /memory\.swap: .* is below memory\.limit/],
    [{ memory: { reservation: -2 } }, /memory\.reservation/],
    [{ memory: { swappiness: 101 } }, /memory\.swappiness: 101 is above 100/],
    [{ cpu: { shares: 1 } }, /cpu\.shares: 1 is outside 2\.\.262144/],
    [{ cpu: { period: 999 } }, /cpu\.period: 999 µs is outside/],
    [{ cpu: { quota: 0 } }, /cpu\.quota: 0 µs is not a quota/],
    [{ cpu: { quota: -7 } }, /cpu\.quota: -7 µs is not a quota/],
    [{ cpu: { cpus: 'all' } }, /cpu\.cpus: "all" is not a list/],
    [{ cpu: { mems: '' } }, /cpu\.mems: "" is not a list/],
    [{ pids: { limit: 0 } }, /pids\.limit: 0 is not a limit/],
    [{ unified: { 'cgroup.procs': '1' } }, /unified\.cgroup\.procs: is not a cgroup v2 controller file/],
    [{ unified: { '../memory.max': '1' } }, /unified\.\.\.\/memory\.max/],
  ];
  for (const [r, message] of cases) {
    for (const mode of ['v1', 'v2'] as const) t.throws(() => planCgroupWrites(r, mode), { code: 'InvalidArgument', message }, `${mode} ${JSON.stringify(r)}`);
  }
});

t.test('plan: checkBeforeUpdate refuses a limit below the memory in use', async (t) => {
  t.throws(() => planCgroupWrites({ memory: { limit: 100 * MIB, checkBeforeUpdate: true } }, 'v2', { memoryUsage: 150 * MIB }), {
    code: 'FailedPrecondition',
    message: /memory\.limit: .* is below the .* bytes in use/,
  });
  t.same(files(planCgroupWrites({ memory: { limit: 200 * MIB, checkBeforeUpdate: true } }, 'v2', { memoryUsage: 150 * MIB })), [`memory.max=${200 * MIB}`]);
  t.same(files(planCgroupWrites({ memory: { limit: 100 * MIB } }, 'v2', { memoryUsage: 150 * MIB })), [`memory.max=${100 * MIB}`], 'without it the kernel decides');
});

t.test('fields a live sandbox cannot change: fine when equal to the spec, NotImplemented naming the field otherwise', async (t) => {
  const spec = { devices: [{ allow: false, access: 'rwm' }], memory: { limit: 64 * MIB, kernel: 10 } };
  // CRI sends the whole block again, devices included; key order and nulls may differ.
  t.doesNotThrow(() => refuseUnchangeable({ devices: [{ access: 'rwm', allow: false }], memory: { limit: 128 * MIB, kernel: 10 } }, spec));
  t.doesNotThrow(() => refuseUnchangeable({ memory: { limit: 1 } }, undefined), 'nothing unchangeable asked for');
  const cases: [Parameters<typeof refuseUnchangeable>[0], RegExp][] = [
    [{ devices: [{ allow: true, access: 'rwm' }] }, /linux\.resources\.devices: cannot be changed/],
    [{ hugepageLimits: [{ pageSize: '2MB', limit: 1 }] }, /hugepageLimits/],
    [{ blockIO: { weight: 100 } }, /blockIO/],
    [{ network: { classID: 1 } }, /network/],
    [{ rdma: { mlx: { hcaHandles: 1 } } }, /rdma/],
    [{ memory: { kernel: 20 } }, /memory\.kernel: .*deprecated/],
    [{ memory: { kernelTCP: 20 } }, /memory\.kernelTCP/],
    [{ memory: { disableOOMKiller: true } }, /memory\.disableOOMKiller/],
    [{ memory: { useHierarchy: true } }, /memory\.useHierarchy/],
    [{ cpu: { realtimeRuntime: 1 } }, /cpu\.realtimeRuntime: .*realtime/],
    [{ cpu: { realtimePeriod: 1 } }, /cpu\.realtimePeriod/],
    [{ cpu: { idle: 1 } }, /cpu\.idle/],
  ];
  for (const [r, message] of cases) t.throws(() => refuseUnchangeable(r, spec), { code: 'NotImplemented', message }, JSON.stringify(r));
});

const MOUNTINFO_V1 = [
  '25 1 0:22 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755',
  '26 25 0:23 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu',
  '27 25 0:24 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory',
  '28 25 0:25 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset',
  '29 25 0:26 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids',
  '30 25 0:27 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd',
  '31 25 0:28 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw',
].join('\n');

t.test('finding the cgroup: v1 hybrid (our VM) and pure v2 (the GPU host)', async (t) => {
  const v1 = cgroupOfProcess(
    ['9:name=systemd:/default/c1', '8:pids:/default/c1', '4:memory:/default/c1', '3:cpuset:/default/c1', '1:cpu:/default/c1', '0::/'].join('\n'),
    MOUNTINFO_V1,
  );
  t.equal(v1.mode, 'v1');
  t.equal(v1.path, '/default/c1');
  t.same(Object.fromEntries(v1.dirs), {
    pids: '/sys/fs/cgroup/pids/default/c1',
    memory: '/sys/fs/cgroup/memory/default/c1',
    cpuset: '/sys/fs/cgroup/cpuset/default/c1',
    cpu: '/sys/fs/cgroup/cpu/default/c1',
  });
  const combined = cgroupOfProcess('2:cpu,cpuacct:/k8s.io/x\n3:memory:/k8s.io/x\n', '26 25 0:23 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n27 25 0:24 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory');
  t.equal(combined.dirs.get('cpu'), '/sys/fs/cgroup/cpu,cpuacct/k8s.io/x', 'a co-mounted hierarchy');
  const v2 = cgroupOfProcess('0::/default/c1\n', '31 25 0:28 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate');
  t.same({ mode: v2.mode, path: v2.path, dir: v2.dirs.get('') }, { mode: 'v2', path: '/default/c1', dir: '/sys/fs/cgroup/default/c1' });
  t.throws(() => cgroupOfProcess('0::/x\n', ''), { code: 'FailedPrecondition' }, 'no cgroup mount at all');
});

t.test('parseLimit: v1 and v2 spellings of "no limit"', async (t) => {
  t.equal(parseLimit('max\n'), 'max');
  t.equal(parseLimit('9223372036854771712\n'), 'max');
  t.equal(parseLimit('268435456\n'), 268435456);
});

/** A fake cgroup: one dir per controller (v1) holding the given files. */
async function fakeCgroup(root: string, content: Record<string, Record<string, string>>): Promise<ProcessCgroup> {
  const dirs = new Map<string, string>();
  for (const [controller, fileMap] of Object.entries(content)) {
    const dir = join(root, controller || 'unified', 'c1');
    await mkdir(dir, { recursive: true });
    for (const [f, v] of Object.entries(fileMap)) await writeFile(join(dir, f), v);
    dirs.set(controller, dir);
  }
  return { mode: 'v1', dirs, path: '/c1' };
}

t.test('the writer: writes in order, undoes every write when a later one fails', async (t) => {
  const root = t.testdir();
  const cg = await fakeCgroup(root, { memory: { 'memory.limit_in_bytes': '100\n' }, cpu: { 'cpu.shares': '1024\n', 'cpu.cfs_quota_us': '-1\n' } });
  const applied = await applyCgroupWrites(cg, planCgroupWrites({ memory: { limit: 4096 }, cpu: { shares: 512 } }, 'v1'));
  t.equal(applied.length, 2);
  t.equal(await readFile(join(root, 'memory/c1/memory.limit_in_bytes'), 'utf8'), '4096');
  t.equal(await readFile(join(root, 'cpu/c1/cpu.shares'), 'utf8'), '512');

  // cpu.cfs_period_us is missing here: the request fails after the limit and shares were written.
  await t.rejects(applyCgroupWrites(cg, planCgroupWrites({ memory: { limit: 8192 }, cpu: { shares: 256, period: 50000 } }, 'v1')), {
    code: 'NotImplemented',
    message: /linux\.resources\.cpu\.period: .*cpu\.cfs_period_us does not exist/,
  });
  t.equal(await readFile(join(root, 'memory/c1/memory.limit_in_bytes'), 'utf8'), '4096', 'memory limit put back');
  t.equal(await readFile(join(root, 'cpu/c1/cpu.shares'), 'utf8'), '512', 'shares put back');

  await t.rejects(applyCgroupWrites(cg, planCgroupWrites({ pids: { limit: 5 } }, 'v1')), { code: 'NotImplemented', message: /pids\.limit: no pids hierarchy/ });
  t.same(await applyCgroupWrites(cg, [{ controller: 'memory', file: 'memory.memsw.limit_in_bytes', value: '-1', field: 'memory.limit', optional: true }]), [], 'an implied write skips a missing file');
});

t.test('the writer: a refused write (EISDIR here, EINVAL from a kernel) names field and file', async (t) => {
  const root = t.testdir();
  const cg = await fakeCgroup(root, { memory: { 'memory.limit_in_bytes': '100' } });
  await mkdir(join(root, 'memory/c1/memory.soft_limit_in_bytes'));
  await t.rejects(applyCgroupWrites(cg, planCgroupWrites({ memory: { limit: 4096, reservation: 10 } }, 'v1')), {
    message: /memory\.reservation: .*memory\.soft_limit_in_bytes/,
  });
  t.equal(await readFile(join(root, 'memory/c1/memory.limit_in_bytes'), 'utf8'), '100', 'the limit written before is put back');
});

t.test('updateSandboxCgroup: refuses a sandbox that shares the shim cgroup, or is gone', async (t) => {
  const proc = t.testdir({
    self: { cgroup: '4:memory:/shim\n1:cpu:/shim\n0::/\n', mountinfo: MOUNTINFO_V1 },
    '42': { cgroup: '4:memory:/shim\n1:cpu:/shim\n0::/\n' },
    '43': { cgroup: '4:memory:/\n1:cpu:/\n0::/\n' },
  });
  await t.rejects(updateSandboxCgroup({ pid: 42, resources: { memory: { limit: 1 << 20 } }, procRoot: proc }), {
    code: 'FailedPrecondition',
    message: /no cgroup of its own .*linux\.cgroupsPath/,
  });
  await t.rejects(updateSandboxCgroup({ pid: 43, resources: { memory: { limit: 1 << 20 } }, procRoot: proc }), { code: 'FailedPrecondition', message: /no cgroup of its own/ });
  await t.rejects(updateSandboxCgroup({ pid: 44, resources: { memory: { limit: 1 << 20 } }, procRoot: proc }), { code: 'FailedPrecondition', message: /sandbox process 44 is gone/ });
  await t.rejects(updateSandboxCgroup({ pid: 42, resources: { devices: [] }, specResources: {}, procRoot: proc }), { code: 'NotImplemented', message: /devices/ }, 'unchangeable fields are refused first');
});
