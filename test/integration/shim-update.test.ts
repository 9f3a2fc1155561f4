/**
 * Task.Update end to end: a sleep container through thaw's runtime under a real containerd and
 * runsc, then containerd's own Tasks.Update RPC (what CRI's UpdateContainerResources calls; none of
 * our ctr builds, 1.6/1.7/2.1, has a `tasks update` command) with OCI LinuxResources JSON. Checks
 * the sandbox's cgroup files (memory limit, CPU quota/period, pids), that bad values and fields a
 * sandbox cannot change are refused with an error naming the field while the task keeps running
 * with its limits untouched, and that nothing is left behind (sandbox, cgroup). Then the kubelet's
 * path: CRI UpdateContainerResources on a pod container (CRI re-sends the spec's whole resources
 * block, device rules included).
 * Gated by THAW_INTEGRATION=1; needs root, containerd, ctr, runsc, busybox-static, @grpc/grpc-js,
 * and for CRI @grpc/proto-loader, CNI plugins in /usr/lib/cni and iproute2.
 */
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { create, toBinary } from '@bufbuild/protobuf';
import { AnySchema } from '@bufbuild/protobuf/wkt';
import t, { type Test } from 'tap';
import { UpdateTaskRequestSchema } from '../../src/gen/containerd/task/v2/shim_pb.js';
import { ContainerdHarness, commandExists, containerdVersions, integrationSkipReason, type ContainerdVersion } from '../helpers/containerd.js';
import { buildOciImage, buildRootfs, imageToolsMissing } from '../helpers/oci-image.js';
import { CRI_NS, criClient, startCriHarness, type Grpc, type ProtoLoader } from '../helpers/cri.js';

const IMAGE = 'localhost/thaw-it-update:1';
const MIB = 1024 * 1024;
/** containerd's type URL for specs.LinuxResources (its client registers it with typeurl). */
const LINUX_RESOURCES = 'types.containerd.io/opencontainers/runtime-spec/1/LinuxResources';

const grpc: Grpc | string = await import('@grpc/grpc-js').catch(() => '@grpc/grpc-js is not installed (npm devDependency)');
const loader: ProtoLoader | string = await import('@grpc/proto-loader').catch(() => '@grpc/proto-loader is not installed (npm devDependency)');
const skip = integrationSkipReason() ?? imageToolsMissing() ?? (typeof grpc === 'string' ? grpc : undefined);
const criSkip =
  skip ??
  (typeof loader === 'string' ? loader : undefined) ??
  (existsSync('/usr/lib/cni/bridge') && existsSync('/usr/lib/cni/portmap') ? undefined : 'CNI plugins not installed in /usr/lib/cni') ??
  (commandExists('ip') ? undefined : 'iproute2 (ip) not installed');

for (const version of containerdVersions()) {
  t.test(`Task.Update under containerd ${version.name}`, { skip: skip ?? version.skip ?? false }, (t) => updates(t, version, grpc as Grpc));
}
t.test('CRI UpdateContainerResources on a thaw pod container', { skip: criSkip ?? false }, (t) => criUpdate(t, grpc as Grpc, loader as ProtoLoader));

interface RpcError extends Error {
  code: number;
  details: string;
}

/** gRPC status codes containerd maps thaw's errors to. */
const INVALID_ARGUMENT = 3;
const FAILED_PRECONDITION = 9;
const UNIMPLEMENTED = 12;

/**
 * containerd.services.tasks.v1.Tasks/Update. Its UpdateTaskRequest has the shim API's field numbers
 * (container_id = 1, resources = 2, annotations = 3), so the generated shim message encodes it.
 */
function tasksUpdate(g: Grpc, socket: string, id: string, resources: unknown, typeUrl = LINUX_RESOURCES): Promise<void> {
  const client = new g.Client(`unix://${socket}`, g.credentials.createInsecure());
  const meta = new g.Metadata();
  meta.set('containerd-namespace', 'default');
  const any = create(AnySchema, { typeUrl, value: Buffer.from(JSON.stringify(resources)) });
  const request = create(UpdateTaskRequestSchema, { id, resources: any });
  return new Promise<void>((resolve, reject) => {
    client.makeUnaryRequest(
      '/containerd.services.tasks.v1.Tasks/Update',
      (r: typeof request) => Buffer.from(toBinary(UpdateTaskRequestSchema, r)),
      (b: Buffer) => b,
      request,
      meta,
      { deadline: new Date(Date.now() + 60_000) },
      (err) => {
        client.close();
        if (err) reject(err);
        else resolve();
      },
    );
  });
}

/** The file of `controller` in process `pid`'s cgroup: v1 hierarchy (this VM) or the unified one. */
function cgroupFile(pid: number, controller: string, v1File: string, v2File: string): string {
  const lines = readFileSync(`/proc/${pid}/cgroup`, 'utf8').split('\n');
  const v1 = lines.map((l) => l.split(':')).find((f) => f[1]?.split(',').includes(controller));
  if (v1) {
    const mount = readdirSync('/sys/fs/cgroup').find((d) => d.split(',').includes(controller));
    if (mount === undefined) throw new Error(`no v1 mount for ${controller}`);
    return path.join('/sys/fs/cgroup', mount, v1[2] ?? '', v1File);
  }
  const v2 = lines.find((l) => l.startsWith('0::'));
  if (v2 === undefined) throw new Error(`process ${pid} has no cgroup line for ${controller}`);
  return path.join('/sys/fs/cgroup', v2.slice(3), v2File);
}

async function updates(t: Test, version: ContainerdVersion, g: Grpc): Promise<void> {
  const h = await ContainerdHarness.start(t.teardown.bind(t), { ...version.options, prefix: 'thaw-upd-' });
  const rootfs = await buildRootfs({ dir: path.join(h.dir, 'rootfs') });
  const image = await buildOciImage({ workDir: h.dir, rootfs, name: IMAGE, cmd: ['/bin/sleep', '100000'], out: path.join(h.dir, 'image.tar') });
  await h.importImage(image.tar);

  const id = 'it-update';
  const run = await h.runThaw({ id, image: IMAGE, logFile: path.join(h.dir, `${id}.log`) });
  t.equal(run.code, 0, run.err);
  await h.waitForTaskStatus(id, 'RUNNING', 60_000);
  const ls = await h.ctr(['tasks', 'ls']);
  const pid = Number(ls.out.split('\n').find((l) => l.startsWith(`${id} `))?.trim().split(/\s+/)[1]);
  t.ok(pid > 0, `sandbox pid from ctr tasks ls: ${ls.out}`);

  const v2 = !readFileSync(`/proc/${pid}/cgroup`, 'utf8').split('\n').some((l) => /^\d+:[^:]*\bmemory\b/.test(l));
  const memFile = cgroupFile(pid, 'memory', 'memory.limit_in_bytes', 'memory.max');
  const read = (f: string): string => readFileSync(f, 'utf8').trim();
  t.match(memFile, new RegExp(`/default/${id}/`), `the sandbox has its own cgroup, from the spec's cgroupsPath: ${memFile}`);

  await t.test('memory limit', async (t) => {
    await tasksUpdate(g, h.grpc, id, { memory: { limit: 256 * MIB } });
    t.equal(read(memFile), String(256 * MIB), memFile);
    t.equal(await h.taskStatus(id), 'RUNNING');
  });

  const cpuFiles = v2
    ? { max: cgroupFile(pid, 'cpu', '', 'cpu.max') }
    : { quota: cgroupFile(pid, 'cpu', 'cpu.cfs_quota_us', ''), period: cgroupFile(pid, 'cpu', 'cpu.cfs_period_us', '') };
  const cpuNow = (): string => (cpuFiles.max ? read(cpuFiles.max) : `${read(cpuFiles.quota!)} ${read(cpuFiles.period!)}`);

  await t.test('CPU quota and period', async (t) => {
    await tasksUpdate(g, h.grpc, id, { cpu: { quota: 50000, period: 200000 } });
    t.equal(cpuNow(), '50000 200000');
    await tasksUpdate(g, h.grpc, id, { cpu: { quota: 30000 } });
    t.equal(cpuNow(), '30000 200000', 'a quota alone keeps the period');
  });

  await t.test('pids limit', async (t) => {
    await tasksUpdate(g, h.grpc, id, { pids: { limit: 64 } });
    t.equal(read(cgroupFile(pid, 'pids', 'pids.max', 'pids.max')), '64');
  });

  await t.test('refused updates name the field; the task runs on with its limits as they were', async (t) => {
    const before = { mem: read(memFile), cpu: cpuNow() };
    const refused = async (resources: unknown, code: number, message: RegExp, what: string, typeUrl?: string): Promise<void> => {
      const err = await tasksUpdate(g, h.grpc, id, resources, typeUrl).then(
        () => undefined,
        (e: unknown) => e as RpcError,
      );
      t.ok(err, `${what}: refused`);
      t.equal(err?.code, code, `${what}: gRPC code (${err?.details})`);
      t.match(err?.details ?? '', message, what);
    };
    await refused({ memory: { limit: 0 } }, INVALID_ARGUMENT, /linux\.resources\.memory\.limit: 0 is not a limit/, 'memory limit 0');
    // Values are checked before anything is written: the valid limit beside the bad period is not applied.
    await refused({ memory: { limit: 128 * MIB }, cpu: { period: 5 } }, INVALID_ARGUMENT, /linux\.resources\.cpu\.period: 5 µs/, 'CPU period 5 µs');
    await refused({ memory: { limti: 1 } }, INVALID_ARGUMENT, /linux\.resources\.memory\.limti: is not a field/, 'a misspelt field');
    await refused({ devices: [{ allow: true, access: 'rwm' }] }, UNIMPLEMENTED, /linux\.resources\.devices: cannot be changed/, 'a device rule');
    await refused({}, INVALID_ARGUMENT, /WindowsResources/, 'Windows resources', 'types.containerd.io/opencontainers/runtime-spec/1/WindowsResources');
    if (!v2) {
      // v1 answers EBUSY when it cannot reclaim down to the new limit (v2 would OOM-kill instead).
      await refused({ memory: { limit: MIB, swap: -1 }, cpu: { quota: 40000 } }, FAILED_PRECONDITION, /memory\.limit: .*uses more than that/, 'memory limit below usage (v1)');
    }
    t.same({ mem: read(memFile), cpu: cpuNow() }, before, 'limits unchanged, nothing half-applied');
    t.equal(await h.taskStatus(id), 'RUNNING', 'the task keeps running');
    const exec = await h.ctr(['tasks', 'exec', '--fifo-dir', h.fifoDir, '--exec-id', 'after', id, '/bin/sh', '-c', 'echo alive']);
    t.equal(exec.out, 'alive\n', `the sandbox still serves execs (${exec.err.trim()})`);
  });

  await t.test('delete leaves no sandbox and no cgroup', async (t) => {
    const dir = path.dirname(memFile);
    await h.ctr(['tasks', 'kill', '-s', 'SIGKILL', id]);
    await h.waitForTaskStatus(id, 'STOPPED', 30_000);
    const rm = await h.ctr(['tasks', 'rm', id]);
    t.equal(rm.code, 0, rm.err);
    t.same(await h.runscSandboxes(), [], 'no runsc sandbox left');
    t.notOk(existsSync(dir), `cgroup ${dir} removed`);
  });
}

async function criUpdate(t: Test, g: Grpc, protoLoader: ProtoLoader): Promise<void> {
  const image = 'localhost/thaw-it-update-cri:1';
  const h = await startCriHarness(t, { prefix: 'thaw-upd-cri-', image });
  const cri = criClient({ grpc: g, loader: protoLoader }, h.grpc);
  t.teardown(() => cri.close());

  const podConfig = {
    metadata: { name: 'upd-pod', uid: `uid-${process.pid}`, namespace: 'default', attempt: 0 },
    hostname: 'upd-pod',
    logDirectory: path.join(h.dir, 'pods'),
    linux: { securityContext: { namespaceOptions: { network: 'POD', pid: 'CONTAINER', ipc: 'POD' } } },
  };
  const podId = String((await cri.call('runPodSandbox', { config: podConfig, runtimeHandler: 'thaw' })).podSandboxId);
  h.track(podId);
  const created = await cri.call('createContainer', {
    podSandboxId: podId,
    config: {
      metadata: { name: 'limited', attempt: 0 },
      image: { image },
      command: ['/bin/sleep', '100000'],
      logPath: 'limited.log',
      linux: {
        resources: { cpuPeriod: 100000, cpuQuota: 50000, cpuShares: 512, memoryLimitInBytes: String(256 * MIB) },
        securityContext: { namespaceOptions: { network: 'POD', pid: 'CONTAINER', ipc: 'POD' } },
      },
    },
    sandboxConfig: podConfig,
  });
  const id = h.track(String(created.containerId));
  await cri.call('startContainer', { containerId: id });
  const ls = await h.ctr(['tasks', 'ls'], { namespace: CRI_NS });
  const pid = Number(ls.out.split('\n').find((l) => l.startsWith(`${id} `))?.trim().split(/\s+/)[1]);
  t.ok(pid > 0, `the container's sandbox pid: ${ls.out}`);
  const spec = JSON.parse(readFileSync(path.join(h.bundleOf(id, CRI_NS), 'config.json'), 'utf8')) as { linux: { resources: { devices?: unknown[] } } };
  t.ok((spec.linux.resources.devices ?? []).length > 0, 'the spec carries device rules, which CRI re-sends with every update');

  const v2 = !readFileSync(`/proc/${pid}/cgroup`, 'utf8').split('\n').some((l) => /^\d+:[^:]*\bmemory\b/.test(l));
  const memFile = cgroupFile(pid, 'memory', 'memory.limit_in_bytes', 'memory.max');
  t.match(memFile, new RegExp(id), `the container's own cgroup: ${memFile}`);
  const read = (f: string): string => readFileSync(f, 'utf8').trim();
  const cpu = (): string =>
    v2
      ? `${read(cgroupFile(pid, 'cpu', '', 'cpu.max'))} w${read(cgroupFile(pid, 'cpu', '', 'cpu.weight'))}`
      : `${read(cgroupFile(pid, 'cpu', 'cpu.cfs_quota_us', ''))} ${read(cgroupFile(pid, 'cpu', 'cpu.cfs_period_us', ''))} s${read(cgroupFile(pid, 'cpu', 'cpu.shares', ''))}`;
  t.equal(read(memFile), String(256 * MIB), 'the limit from create');

  await cri.call('updateContainerResources', {
    containerId: id,
    linux: { cpuPeriod: 100000, cpuQuota: 20000, cpuShares: 256, memoryLimitInBytes: String(512 * MIB) },
  });
  t.equal(read(memFile), String(512 * MIB), 'memory limit raised through CRI');
  t.equal(cpu(), v2 ? '20000 100000 w10' : '20000 100000 s256', 'CPU quota, period and shares through CRI');

  const err = await cri.call('updateContainerResources', { containerId: id, linux: { cpuPeriod: 5, cpuQuota: 20000, memoryLimitInBytes: String(128 * MIB) } }).then(
    () => undefined,
    (e: unknown) => e as RpcError,
  );
  t.match(err?.details ?? '', /linux\.resources\.cpu\.period: 5 µs/, `a bad period is refused, naming the field: ${err?.details}`);
  t.equal(read(memFile), String(512 * MIB), 'and nothing of that update is applied');
  const status = (await cri.call('containerStatus', { containerId: id })).status as { state: string };
  t.equal(status.state, 'CONTAINER_RUNNING', 'the container keeps running');

  await cri.call('stopContainer', { containerId: id, timeout: 5 });
  await cri.call('removeContainer', { containerId: id });
  await cri.call('stopPodSandbox', { podSandboxId: podId });
  await cri.call('removePodSandbox', { podSandboxId: podId });
  t.same(await h.runscSandboxes(), [], 'no runsc sandbox left');
  t.notOk(existsSync(path.dirname(memFile)), 'the container cgroup is gone');
}
