/**
 * Kubernetes' path: containerd's CRI plugin with a `thaw` runtime entry (runtime_type
 * io.containerd.thaw.v2, options ConfigPath, pod_annotations thaw.dev/*), CNI bridge + portmap,
 * and a small gRPC client in place of kubelet: RunPodSandbox with runtime handler "thaw",
 * CreateContainer, StartContainer, ContainerStatus, StopContainer, RemovePodSandbox. The pod's
 * sandbox (pause) container runs through thaw too; runsc runs with --network=host inside the
 * pod's network namespace, so a server in the pod answers on the pod IP from the host.
 * Gated by THAW_INTEGRATION=1; needs root, containerd, runsc, CNI plugins in /usr/lib/cni,
 * @grpc/grpc-js and @grpc/proto-loader (devDependencies).
 */
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import http from 'node:http';
import path from 'node:path';
import t from 'tap';
import { ORIGINAL_CRI_ANNOTATION_PREFIX } from '../../src/bundle/cri.js';
import { ContainerdHarness, commandExists, integrationSkipReason, runCommand, until } from '../helpers/containerd.js';
import { buildDemoImage, buildOciImage, buildRootfs, imageToolsMissing, ticksOf } from '../helpers/oci-image.js';
import { CRI_NS, criClient, loadGrpc } from '../helpers/cri.js';

const SANDBOX_IMAGE = 'localhost/thaw-it-pause:1';
const APP_IMAGE = 'localhost/thaw-it-cri:1';
const NS = CRI_NS;

const deps = await loadGrpc();
const skip =
  integrationSkipReason() ??
  imageToolsMissing({ demoApp: true }) ??
  (existsSync('/usr/lib/cni/bridge') && existsSync('/usr/lib/cni/portmap') ? undefined : 'CNI plugins not installed in /usr/lib/cni') ??
  (commandExists('ip') ? undefined : 'iproute2 (ip) not installed') ??
  (typeof deps === 'string' ? deps : undefined);

/** The host pid runsc reports for a container (its sandbox's process): equal pids, one sandbox. */
async function runscPid(h: ContainerdHarness, rid: string): Promise<number> {
  const r = await runCommand(h.runscBin, ['--root', path.join(h.thawState, 'runsc'), 'state', rid], { timeoutMs: 30_000 });
  return (JSON.parse(r.out) as { pid: number }).pid;
}

function httpGet(url: string, timeoutMs = 5000): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { timeout: timeoutMs }, (res) => {
      let body = '';
      res.on('data', (c: Buffer) => (body += c.toString()));
      res.on('end', () => resolve(body));
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${url} timed out`)));
    req.on('error', reject);
  });
}

t.test('CRI: a pod through the thaw runtime handler', { skip: skip ?? false }, async (t) => {
  if (typeof deps === 'string') return;
  const h = await ContainerdHarness.start(t.teardown.bind(t), {
    prefix: 'thaw-cri-',
    cri: { sandboxImage: SANDBOX_IMAGE },
    thawConfig: { runsc: { network: 'host' } },
  });
  const pause = await buildOciImage({
    workDir: path.join(h.dir, 'pause'),
    rootfs: await buildRootfs({ dir: path.join(h.dir, 'pause', 'rootfs') }),
    name: SANDBOX_IMAGE,
    cmd: ['/bin/sleep', '2147483647'],
    out: path.join(h.dir, 'pause.tar'),
  });
  await h.importImage(pause.tar, NS);
  const app = await buildDemoImage({ dir: path.join(h.dir, 'app'), name: APP_IMAGE });
  await h.importImage(app.tar, NS);
  const cri = criClient(deps, h.grpc);
  t.teardown(() => cri.close());

  const version = await cri.call('version', {});
  t.equal(version.runtimeName, 'containerd', `CRI ${String(version.runtimeApiVersion)}`);

  const logDir = path.join(h.dir, 'pods', 'thaw-pod');
  const podConfig = {
    metadata: { name: 'thaw-pod', uid: `uid-${process.pid}`, namespace: 'default', attempt: 0 },
    hostname: 'thaw-pod',
    logDirectory: logDir,
    annotations: { 'thaw.dev/test': 'cri', 'other.dev/dropped': 'x' },
    // As kubelet sends it: the CRI default (enum 0) would be a pod-wide pid namespace.
    linux: { securityContext: { namespaceOptions: { network: 'POD', pid: 'CONTAINER', ipc: 'POD' } } },
  };
  const t0 = Date.now();
  const pod = await cri.call('runPodSandbox', { config: podConfig, runtimeHandler: 'thaw' });
  const podId = String(pod.podSandboxId);
  t.comment(`RunPodSandbox: ${Date.now() - t0} ms`);
  h.track(podId);
  t.match(podId, /^[0-9a-f]{64}$/, 'pod sandbox id');

  const podStatus = (await cri.call('podSandboxStatus', { podSandboxId: podId })).status as {
    state: string;
    network: { ip: string };
    runtimeHandler: string;
    annotations: Record<string, string>;
  };
  t.equal(podStatus.state, 'SANDBOX_READY');
  t.equal(podStatus.runtimeHandler, 'thaw');
  t.match(podStatus.network.ip, /^10\.\d+\.\d+\.\d+$/, `pod IP from CNI: ${podStatus.network.ip}`);
  const sandboxBundle = h.bundleOf(podId, NS);
  t.ok(existsSync(path.join(sandboxBundle, 'thaw-config-path')), 'the pause container was created by thaw');
  const sandboxSpec = JSON.parse(await readFile(path.join(sandboxBundle, 'config.json'), 'utf8')) as {
    annotations: Record<string, string>;
    linux: { namespaces: { type: string; path?: string }[] };
  };
  t.equal(sandboxSpec.annotations['thaw.dev/test'], 'cri', 'pod_annotations passes thaw.dev/* to the sandbox spec');
  t.notOk('other.dev/dropped' in sandboxSpec.annotations, 'other annotations stay out');
  const netns = sandboxSpec.linux.namespaces.find((n) => n.type === 'network')?.path ?? '';
  t.ok(netns.startsWith(h.state), `the pod's netns (${netns}) lives under containerd's state dir`);
  t.equal((await h.runscSandboxes()).length, 1, 'one runsc sandbox: the pause container');

  const containerConfig = (name: string, command: string[]): Record<string, unknown> => ({
    metadata: { name, attempt: 0 },
    image: { image: APP_IMAGE },
    command,
    logPath: `${name}.log`,
    linux: { securityContext: { namespaceOptions: { network: 'POD', pid: 'CONTAINER', ipc: 'POD' } } },
  });
  const status = async (id: string): Promise<{ state: string; exitCode: number; reason: string }> =>
    (await cri.call('containerStatus', { containerId: id })).status as { state: string; exitCode: number; reason: string };

  // runsc treats a spec with io.kubernetes.cri.container-type=container as a member of the sandbox
  // named by io.kubernetes.cri.sandbox-id (thaw's runtime ids are hashes: "cannot load sandbox");
  // the gVisor engine hides those annotations from runsc (bundle/cri.ts), so every container gets
  // a runsc sandbox of its own, started in the pod's network namespace.
  await t.test('containers in the pod: create, start, logs, a server on the pod IP, stop', async (t) => {
    const created = await cri.call('createContainer', {
      podSandboxId: podId,
      config: containerConfig('app', ['/app', '--init-ms', '0', '--mib', '8', '--tick-ms', '100']),
      sandboxConfig: podConfig,
    });
    const appId = String(created.containerId);
    h.track(appId);
    await cri.call('startContainer', { containerId: appId });
    t.equal((await status(appId)).state, 'CONTAINER_RUNNING');
    const appLog = path.join(logDir, 'app.log');
    // CRI log lines: "<RFC3339 time> stdout F <line>".
    const appTicks = async (): Promise<number[]> =>
      ticksOf((await readFile(appLog, 'utf8').catch(() => '')).split('\n').map((l) => l.split(' ').slice(3).join(' ')));
    await until(async () => (await appTicks()).length >= 3, 30_000, 'the app to tick in its CRI log');
    t.pass('the app container writes its CRI log');
    const addressOf = (id: string): Promise<string> => readFile(path.join(h.bundleOf(id, NS), 'address'), 'utf8');
    t.equal(await addressOf(appId), await addressOf(podId), "one shim serves the pod's containers (group = sandbox id)");
    const sandboxPids = await Promise.all((await h.runscSandboxes()).map((rid) => runscPid(h, rid)));
    t.equal(new Set(sandboxPids).size, 2, `the app runs in a runsc sandbox of its own (sandbox pids ${sandboxPids.join(', ')})`);
    const appAnnotations = (JSON.parse(await readFile(path.join(h.bundleOf(appId, NS), 'config.json'), 'utf8')) as { annotations: Record<string, string> }).annotations;
    t.notOk('io.kubernetes.cri.sandbox-id' in appAnnotations, 'runsc reads no sandbox id to join');
    t.equal(appAnnotations[`${ORIGINAL_CRI_ANNOTATION_PREFIX}io.kubernetes.cri.sandbox-id`], podId, 'the original is kept under thaw’s prefix');

    await t.test('a server in the pod answers on the pod IP (runsc --network=host in the pod netns)', async (t) => {
      const web = await cri.call('createContainer', {
        podSandboxId: podId,
        config: containerConfig('web', ['/bin/sh', '-c', 'echo thaw-pod-ok > /tmp/index.html; exec httpd -f -p 8080 -h /tmp']),
        sandboxConfig: podConfig,
      });
      const webId = String(web.containerId);
      h.track(webId);
      await cri.call('startContainer', { containerId: webId });
      t.equal((await status(webId)).state, 'CONTAINER_RUNNING', 'a third container in the pod starts (no hang)');
      let body = '';
      await until(
        async () => {
          body = await httpGet(`http://${podStatus.network.ip}:8080/index.html`).catch(() => '');
          return body !== '';
        },
        20_000,
        'the pod IP to answer',
        250,
      );
      t.equal(body.trim(), 'thaw-pod-ok', 'served from inside the pod');
      await cri.call('stopContainer', { containerId: webId, timeout: 5 });
      await cri.call('removeContainer', { containerId: webId });
    });

    const t1 = Date.now();
    await cri.call('stopContainer', { containerId: appId, timeout: 5 });
    t.comment(`StopContainer: ${Date.now() - t1} ms`);
    const stopped = await status(appId);
    t.equal(stopped.state, 'CONTAINER_EXITED');
    t.equal(stopped.exitCode, 143, 'SIGTERM ended the app (128 + 15)');
    await cri.call('removeContainer', { containerId: appId });
  });

  await cri.call('stopPodSandbox', { podSandboxId: podId });
  await cri.call('removePodSandbox', { podSandboxId: podId });
  const pods = (await cri.call('listPodSandbox', {})).items as unknown[];
  t.same(pods, [], 'no pod left');
  await until(async () => (await h.runscSandboxes()).length === 0, 20_000, 'runsc sandboxes to go');
  t.pass('no runsc sandbox left');
  t.notOk(existsSync(netns), 'the pod netns is gone');
  t.same(h.mountsUnder(path.join(h.state, 'io.containerd.runtime.v2.task')), [], 'no rootfs mount left');
});
