import { readFile, writeFile, mkdir } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import t, { type Test } from 'tap';
import { resolveConfig, type ThawConfig } from '../../src/config/config.js';
import { GvisorEngine } from '../../src/engine/gvisor.js';
import { runtimeIdFor } from '../../src/engine/container-id.js';
import { addThawCudaMount, GPU_RECORD_FILE, planGvisorGpu, SANDBOX_THAW_CUDA } from '../../src/engine/gvisor-gpu.js';
import type { OciSpec } from '../../src/bundle/bundle.js';
import type { StdioFds } from '../../src/engine/engine.js';

const NO_STDIO: StdioFds = ['ignore', 'ignore', 'ignore'];
import { Runsc } from '../../src/runsc/runsc.js';
import { clearProbeCache, type RunscCapabilities } from '../../src/runsc/probe.js';
import { collectKeyInputs, computeKey } from '../../src/snapshot/key.js';
import { FAKE_CUDA, fakeGpuHost } from '../gpu/helpers.js';

const FIXTURES = fileURLToPath(new URL('../fixtures/', import.meta.url));
const FAKE_RUNSC = join(FIXTURES, 'bin', 'fake-runsc-sandbox');

const gpuSpec = (extra: Partial<OciSpec> = {}): OciSpec => ({
  ociVersion: '1.0.2',
  process: { args: ['python3', 'serve.py'], cwd: '/', env: ['NVIDIA_VISIBLE_DEVICES=all'] },
  root: { path: 'rootfs' },
  mounts: [],
  annotations: { 'io.kubernetes.cri.image-name': 'example/llm@sha256:' + 'a'.repeat(64) },
  ...extra,
});

const caps = (over: Partial<RunscCapabilities> = {}): RunscCapabilities =>
  ({ version: '0.0~20240729.0', nvproxy: true, cudaCheckpointPath: false, cudaCheckpointSequential: false, ...over }) as RunscCapabilities;

t.test('planGvisorGpu: only GPU containers on a runsc with nvproxy; runsc does the work when it can', async (t) => {
  const config = resolveConfig({ gpu: { cudaCheckpointPath: '/opt/thaw-cuda' } });
  const exists = () => true;
  t.match(planGvisorGpu({ spec: gpuSpec({ process: { args: ['x'], cwd: '/' } }), caps: caps(), config, toolExists: exists }), { kind: 'none', reason: /no GPU/ });
  t.match(planGvisorGpu({ spec: gpuSpec({ process: { args: ['x'], cwd: '/', env: ['NVIDIA_VISIBLE_DEVICES=void'] } }), caps: caps(), config, toolExists: exists }), { kind: 'none' });
  t.match(planGvisorGpu({ spec: gpuSpec(), caps: caps({ nvproxy: false }), config, toolExists: exists }), { kind: 'none', reason: /nvproxy/ });
  t.match(planGvisorGpu({ spec: gpuSpec(), caps: caps(), config: resolveConfig({ gpu: { mode: 'off' } }), toolExists: exists }), { kind: 'none', reason: /gpu.mode/ });
  t.match(planGvisorGpu({ spec: gpuSpec(), caps: caps(), config, toolExists: () => false }), { kind: 'none', reason: /\/opt\/thaw-cuda is missing/ });
  t.same(planGvisorGpu({ spec: gpuSpec(), caps: caps(), config, toolExists: exists }), { kind: 'exec', hostTool: '/opt/thaw-cuda' });
  t.same(planGvisorGpu({ spec: gpuSpec(), caps: caps({ cudaCheckpointPath: true }), config, toolExists: exists }), { kind: 'runsc', hostTool: '/opt/thaw-cuda' });
  const devices = gpuSpec({ process: { args: ['x'], cwd: '/' }, linux: { devices: [{ path: '/dev/nvidia0', type: 'c', major: 195, minor: 0 }] } });
  t.equal(planGvisorGpu({ spec: devices, caps: caps(), config, toolExists: exists }).kind, 'exec', 'NVIDIA device nodes count too');
});

t.test('the thaw-cuda mount is added once and leaves the snapshot key alone', async (t) => {
  const bundle = t.testdir({ rootfs: {} });
  await writeFile(join(bundle, 'config.json'), JSON.stringify(gpuSpec()));
  const key = async () => {
    const spec = JSON.parse(await readFile(join(bundle, 'config.json'), 'utf8')) as OciSpec;
    return computeKey(await collectKeyInputs({ spec, bundle, engine: { name: 'gvisor', identity: { runtime: 'runsc' } }, gpu: null }));
  };
  const before = await key();
  t.equal(await addThawCudaMount(bundle, '/opt/thaw-cuda'), true);
  t.equal(await addThawCudaMount(bundle, '/opt/thaw-cuda'), false, 'idempotent');
  const spec = JSON.parse(await readFile(join(bundle, 'config.json'), 'utf8')) as OciSpec;
  t.same(spec.mounts, [{ destination: SANDBOX_THAW_CUDA, type: 'bind', source: '/opt/thaw-cuda', options: ['rbind', 'ro'] }]);
  t.equal(await key(), before, 'same key with and without the mount');
});

/** A GvisorEngine over fake-runsc-sandbox: thaw-cuda "inside the sandbox" is fake-cuda-checkpoint. */
async function world(t: Test, o: { upstream?: boolean } = {}) {
  const host = await fakeGpuHost();
  t.teardown(() => host.cleanup());
  const dir = t.testdir({ rootfs: {}, runsc: {}, scratch: {}, state: {} });
  const runscDir = join(dir, 'runsc');
  process.env.FAKE_RUNSC_DIR = runscDir;
  const fixtures = join(FIXTURES, 'runsc', o.upstream ? 'upstream' : '20240729');
  const put = (name: string, text: string) => writeFile(join(runscDir, name), text);
  await put('version.stdout', readFileSync(join(FIXTURES, 'runsc', '20240729', 'version.txt'), 'utf8'));
  await put('help-checkpoint.stdout', readFileSync(join(fixtures, 'help-checkpoint.txt'), 'utf8'));
  await put('help-restore.stdout', readFileSync(join(fixtures, 'help-restore.txt'), 'utf8'));
  await put('flags.stderr', readFileSync(join(fixtures, 'flags.txt'), 'utf8'));
  const bundle = join(dir, 'bundle');
  await mkdir(join(bundle, 'rootfs'), { recursive: true });
  await writeFile(join(bundle, 'config.json'), JSON.stringify(gpuSpec()));
  await put('state.stdout', JSON.stringify({ ociVersion: '1.0.2', id: 'x', status: 'running', pid: 4242, bundle }));
  await mkdir(join(runscDir, 'create.files'));
  await put('create.files/pid-file', '4242'); // runsc create --pid-file: the sandbox's pid
  await put('ps.stdout', JSON.stringify([1, 7, 9]));
  // pid 7 is a CUDA process; 1 and 9 are not (the tool fails for them).
  await host.setState(7, 'running');
  const config: ThawConfig = resolveConfig({ stateDir: join(dir, 'state'), gpu: { cudaCheckpointPath: FAKE_CUDA } });
  clearProbeCache();
  const runsc = new Runsc({ path: FAKE_RUNSC, root: join(dir, 'state', 'runsc'), platform: 'systrap', network: 'none', debugLogDir: null, flags: {}, scratchDir: join(dir, 'scratch') });
  const engine = new GvisorEngine({ config, runsc, nvidiaProcDir: host.nvidiaProcDir });
  const calls = (): string[][] =>
    readFileSync(join(runscDir, 'calls'), 'utf8')
      .split('\x1e')
      .filter((c) => c !== '')
      .map((c) => c.split('\x1f').filter((a) => a !== ''));
  /** Calls of one runsc verb (not the `help <verb>` probes). */
  const verbCalls = (verb: string) => calls().filter((c) => c.includes(verb) && !c.includes('help'));
  const imageDir = join(dir, 'image');
  await mkdir(imageDir);
  return { host, engine, bundle, runscDir, imageDir, calls, verbCalls, rid: runtimeIdFor('c1', '') };
}

t.test('runsc without --cuda-checkpoint-path: thaw-cuda through runsc exec around checkpoint and restore', async (t) => {
  const w = await world(t);
  await w.engine.create({ id: 'c1', bundle: w.bundle, stdio: NO_STDIO });
  const spec = JSON.parse(await readFile(join(w.bundle, 'config.json'), 'utf8')) as OciSpec;
  t.match(spec.mounts, [{ destination: SANDBOX_THAW_CUDA, source: FAKE_CUDA, options: ['rbind', 'ro'] }], 'create mounts thaw-cuda');

  await w.engine.checkpoint('c1', { imageDir: w.imageDir, leaveRunning: false });
  t.equal(await w.host.state(7), 'checkpointed', 'the CUDA process was locked and checkpointed');
  const execs = w.verbCalls('exec');
  t.ok(execs.length > 0 && execs.every((c) => c.includes(w.rid) && c.includes(SANDBOX_THAW_CUDA)), 'the tool ran inside the sandbox');
  const all = w.calls().filter((c) => !c.includes('help')).map((c) => c.find((a) => ['exec', 'checkpoint'].includes(a)));
  t.ok(all.lastIndexOf('exec') < all.indexOf('checkpoint'), 'GPU first, then runsc checkpoint');
  t.notOk(w.verbCalls('checkpoint')[0]!.some((a) => a.startsWith('--cuda-checkpoint-path')));
  const record = JSON.parse(await readFile(join(w.imageDir, GPU_RECORD_FILE), 'utf8')) as { pids: number[] };
  t.same(record.pids, [7], 'only the CUDA process is recorded');

  await w.engine.restore({ id: 'c1', bundle: w.bundle, stdio: NO_STDIO, imageDir: w.imageDir });
  t.equal(await w.host.state(7), 'running', 'restored and unlocked after runsc restore');
  const tool = await w.host.calls();
  t.ok(tool.some((l) => l.includes('--action restore --pid 7')) && tool.some((l) => l.includes('--action unlock --pid 7')));
});

t.test('a failed runsc checkpoint puts the CUDA processes back to running and writes no record', async (t) => {
  const w = await world(t);
  await writeFile(join(w.runscDir, 'checkpoint.exit'), '1');
  await writeFile(join(w.runscDir, 'checkpoint.stderr'), 'checkpoint failed: boom\n');
  await t.rejects(w.engine.checkpoint('c1', { imageDir: w.imageDir, leaveRunning: false }));
  t.equal(await w.host.state(7), 'running');
  await t.rejects(readFile(join(w.imageDir, GPU_RECORD_FILE)), { code: 'ENOENT' });
});

t.test('--leave-running: the source keeps its GPU state running after the checkpoint', async (t) => {
  const w = await world(t);
  await w.engine.checkpoint('c1', { imageDir: w.imageDir, leaveRunning: true });
  t.equal(await w.host.state(7), 'running');
  t.ok(await readFile(join(w.imageDir, GPU_RECORD_FILE), 'utf8'), 'the image still records the CUDA process for its restores');
});

t.test('a lock that times out leaves the process running and fails the checkpoint before runsc runs', async (t) => {
  const w = await world(t);
  await w.host.fail('lock', 7, 5, 'CUDA_ERROR_TIMEOUT lock timed out');
  await t.rejects(w.engine.checkpoint('c1', { imageDir: w.imageDir, leaveRunning: false }), /lock/);
  t.equal(await w.host.state(7), 'running');
  t.equal(w.verbCalls('checkpoint').length, 0, 'runsc checkpoint never ran');
});

t.test('runsc with --cuda-checkpoint-path: thaw passes the in-sandbox path and runs no tool itself', async (t) => {
  const w = await world(t, { upstream: true });
  await w.engine.create({ id: 'c1', bundle: w.bundle, stdio: NO_STDIO });
  await w.engine.checkpoint('c1', { imageDir: w.imageDir, leaveRunning: false });
  t.ok(w.verbCalls('checkpoint')[0]!.includes(`--cuda-checkpoint-path=${SANDBOX_THAW_CUDA}`));
  t.equal(w.verbCalls('exec').length, 0);
  t.equal(await w.host.state(7), 'running', 'untouched by thaw');
  await t.rejects(readFile(join(w.imageDir, GPU_RECORD_FILE)), { code: 'ENOENT' });
});
