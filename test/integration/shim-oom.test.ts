/**
 * TaskOOM end to end: under a real containerd and runsc, a container whose app (the demo app)
 * fills more memory than `ctr run --memory-limit` allows is OOM-killed by the host kernel (the
 * sentry dies, so the whole sandbox: exit 137). `ctr events` must show /tasks/oom for it, once,
 * before its /tasks/exit; a container that exits normally under the same limit gets no /tasks/oom.
 * Nothing is left behind (sandboxes, the containers' cgroups). Then the kubelet's view: CRI's
 * ContainerStatus of such a pod container says reason "OOMKilled" (containerd's CRI sets it on TaskOOM).
 * Gated by THAW_INTEGRATION=1; needs root, containerd, ctr, runsc, busybox-static and gcc (the demo
 * app is built static); for CRI also @grpc/grpc-js, @grpc/proto-loader, CNI plugins in /usr/lib/cni
 * and iproute2.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import t, { type Test } from 'tap';
import { ContainerdHarness, commandExists, containerdVersions, integrationSkipReason, until, type ContainerdVersion } from '../helpers/containerd.js';
import { buildOciImage, buildRootfs, imageToolsMissing } from '../helpers/oci-image.js';
import { criClient, startCriHarness, type Grpc, type ProtoLoader } from '../helpers/cri.js';

const IMAGE = 'localhost/thaw-it-oom:1';
const MIB = 1024 * 1024;
/** Room for the sentry and the gofer (~40 MiB here) but not for the app's fill. */
const LIMIT = 128 * MIB;

const skip = integrationSkipReason() ?? imageToolsMissing({ demoApp: true });
const grpc: Grpc | string = await import('@grpc/grpc-js').catch(() => '@grpc/grpc-js is not installed (npm devDependency)');
const loader: ProtoLoader | string = await import('@grpc/proto-loader').catch(() => '@grpc/proto-loader is not installed (npm devDependency)');
const criSkip =
  skip ??
  (typeof grpc === 'string' ? grpc : undefined) ??
  (typeof loader === 'string' ? loader : undefined) ??
  (existsSync('/usr/lib/cni/bridge') && existsSync('/usr/lib/cni/portmap') ? undefined : 'CNI plugins not installed in /usr/lib/cni') ??
  (commandExists('ip') ? undefined : 'iproute2 (ip) not installed');

for (const version of containerdVersions()) {
  t.test(`TaskOOM under containerd ${version.name}`, { skip: skip ?? version.skip ?? false }, (t) => oom(t, version));
}
t.test('CRI: an OOM-killed thaw pod container has reason OOMKilled', { skip: criSkip ?? false }, (t) => criOom(t, grpc as Grpc, loader as ProtoLoader));

interface SeenEvent {
  topic: string;
  /** The event as ctr prints it (JSON). */
  body: string;
}

/** `ctr events`, collected: containerd's whole event stream from the moment it is subscribed. */
class EventLog {
  readonly events: SeenEvent[] = [];
  readonly #child: ChildProcess;
  #buffer = '';

  constructor(h: ContainerdHarness) {
    this.#child = spawn(h.ctrBin, ['--address', h.grpc, 'events'], { stdio: ['ignore', 'pipe', 'ignore'] });
    this.#child.stdout?.on('data', (c: Buffer) => {
      this.#buffer += c.toString();
      const lines = this.#buffer.split('\n');
      this.#buffer = lines.pop() ?? '';
      for (const line of lines) {
        // "<date> <time> <zone> UTC <namespace> <topic> <json>"
        const m = / (\/[a-z-]+\/[a-z-]+) (\{.*)$/.exec(line);
        if (m) this.events.push({ topic: m[1]!, body: m[2]! });
      }
    });
  }

  /** Resolves once the subscription delivers: ctr prints nothing when it has subscribed. */
  async ready(h: ContainerdHarness): Promise<void> {
    let n = 0;
    await until(
      async () => {
        // Each label change publishes /namespaces/update.
        await h.ctr(['namespaces', 'label', 'default', `thaw-oom-probe=${++n}`]);
        return this.events.some((e) => e.topic === '/namespaces/update');
      },
      30_000,
      'ctr events to subscribe',
      300,
    );
  }

  /** Topics of the task events of container `id`, in the order containerd delivered them. */
  topicsOf(id: string): string[] {
    return this.events.filter((e) => e.topic.startsWith('/tasks/') && e.body.includes(`"container_id":"${id}"`)).map((e) => e.topic);
  }

  stop(): void {
    if (this.#child.exitCode === null && this.#child.signalCode === null) this.#child.kill('SIGKILL');
  }
}

/** The cgroup directories `ctr run` gives container `id` (cgroupsPath /default/<id>), v1 memory or v2. */
function cgroupDirs(id: string): string[] {
  return [path.join('/sys/fs/cgroup/memory/default', id), path.join('/sys/fs/cgroup/default', id)];
}

async function oom(t: Test, version: ContainerdVersion): Promise<void> {
  const h = await ContainerdHarness.start(t.teardown.bind(t), { ...version.options, prefix: 'thaw-oom-' });
  const rootfs = await buildRootfs({ dir: path.join(h.dir, 'rootfs'), demoApp: true });
  const image = await buildOciImage({ workDir: h.dir, rootfs, name: IMAGE, cmd: ['/bin/sleep', '2147483647'], out: path.join(h.dir, 'image.tar') });
  await h.importImage(image.tar);
  const log = new EventLog(h);
  t.teardown(() => log.stop());
  await log.ready(h);

  await t.test('an app filling more than the limit: exit 137, /tasks/oom once, before /tasks/exit', async (t) => {
    const id = 'it-oom';
    const run = await h.runThaw({
      id,
      image: IMAGE,
      args: ['/app', '--init-ms', '0', '--mib', '512', '--tick-ms', '50'],
      extra: ['--memory-limit', String(LIMIT)],
      timeoutMs: 180_000,
    });
    t.equal(run.code, 137, `killed by the kernel (SIGKILL): ${run.err.trim()} ${run.out.slice(-300)}`);
    t.notMatch(run.out, /READY/, 'the app never finished its fill');
    await until(() => log.topicsOf(id).includes('/tasks/delete'), 60_000, `/tasks/delete of ${id}`);
    const topics = log.topicsOf(id);
    t.equal(topics.filter((x) => x === '/tasks/oom').length, 1, `one /tasks/oom: ${topics.join(' ')}`);
    const oomAt = topics.indexOf('/tasks/oom');
    t.ok(oomAt >= 0 && oomAt < topics.indexOf('/tasks/exit'), `/tasks/oom before /tasks/exit: ${topics.join(' ')}`);
    t.ok(oomAt > topics.indexOf('/tasks/start'), 'and after /tasks/start');
    t.match(log.events.find((e) => e.topic === '/tasks/oom')?.body ?? '', `"container_id":"${id}"`);
    for (const dir of cgroupDirs(id)) t.notOk(existsSync(dir), `cgroup ${dir} removed`);
  });

  await t.test('an app exiting normally under the same limit: no /tasks/oom', async (t) => {
    const id = 'it-no-oom';
    const run = await h.runThaw({
      id,
      image: IMAGE,
      args: ['/app', '--init-ms', '0', '--mib', '16', '--tick-ms', '20', '--exit-after-ticks', '2'],
      extra: ['--memory-limit', String(LIMIT)],
      timeoutMs: 180_000,
    });
    t.equal(run.code, 0, run.err);
    t.match(run.out, /READY/);
    await until(() => log.topicsOf(id).includes('/tasks/delete'), 60_000, `/tasks/delete of ${id}`);
    const topics = log.topicsOf(id);
    t.same(topics.filter((x) => x === '/tasks/oom'), [], `no /tasks/oom: ${topics.join(' ')}`);
    t.ok(topics.includes('/tasks/exit'), 'its exit was seen');
  });

  await t.test('nothing left behind', async (t) => {
    t.same(await h.runscSandboxes(), [], 'no runsc sandbox left');
  });
}

async function criOom(t: Test, g: Grpc, protoLoader: ProtoLoader): Promise<void> {
  const image = 'localhost/thaw-it-oom-cri:1';
  const h = await startCriHarness(t, { prefix: 'thaw-oom-cri-', image, demoApp: true });
  const cri = criClient({ grpc: g, loader: protoLoader }, h.grpc);
  t.teardown(() => cri.close());

  const podConfig = {
    metadata: { name: 'oom-pod', uid: `uid-oom-${process.pid}`, namespace: 'default', attempt: 0 },
    hostname: 'oom-pod',
    logDirectory: path.join(h.dir, 'pods'),
    linux: { securityContext: { namespaceOptions: { network: 'POD', pid: 'CONTAINER', ipc: 'POD' } } },
  };
  const podId = h.track(String((await cri.call('runPodSandbox', { config: podConfig, runtimeHandler: 'thaw' })).podSandboxId));
  const container = async (name: string, command: string[]): Promise<string> => {
    const created = await cri.call('createContainer', {
      podSandboxId: podId,
      config: {
        metadata: { name, attempt: 0 },
        image: { image },
        command,
        logPath: `${name}.log`,
        linux: {
          resources: { memoryLimitInBytes: String(LIMIT) },
          securityContext: { namespaceOptions: { network: 'POD', pid: 'CONTAINER', ipc: 'POD' } },
        },
      },
      sandboxConfig: podConfig,
    });
    const id = h.track(String(created.containerId));
    await cri.call('startContainer', { containerId: id });
    return id;
  };
  const exited = async (id: string): Promise<{ exitCode: number; reason: string }> => {
    let status: { state: string; exitCode: number; reason: string } | undefined;
    await until(
      async () => {
        status = (await cri.call('containerStatus', { containerId: id })).status as typeof status;
        return status?.state === 'CONTAINER_EXITED';
      },
      120_000,
      `container ${id} to exit`,
      300,
    );
    return { exitCode: status!.exitCode, reason: status!.reason };
  };

  const hog = await container('hog', ['/app', '--init-ms', '0', '--mib', '512', '--tick-ms', '50']);
  t.same(await exited(hog), { exitCode: 137, reason: 'OOMKilled' }, 'the kubelet sees OOMKilled');
  const fine = await container('fine', ['/app', '--init-ms', '0', '--mib', '16', '--tick-ms', '20', '--exit-after-ticks', '2']);
  t.same(await exited(fine), { exitCode: 0, reason: 'Completed' }, 'a normal exit stays Completed');

  for (const id of [hog, fine]) await cri.call('removeContainer', { containerId: id });
  await cri.call('stopPodSandbox', { podSandboxId: podId });
  await cri.call('removePodSandbox', { podSandboxId: podId });
  t.same(await h.runscSandboxes(), [], 'no runsc sandbox left');
}
