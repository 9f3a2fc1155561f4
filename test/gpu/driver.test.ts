import t from 'tap';
import { CudaCheckpointError, ShimError } from '../../src/errors.js';
import { CudaCheckpoint } from '../../src/gpu/cuda-checkpoint.js';
import { GpuDriver, planDeviceMap, type GpuSnapshotRecord } from '../../src/gpu/driver.js';
import { FAKE_CUDA, fakeGpuHost, type FakeGpuHost } from './helpers.js';

const UUID_1 = 'GPU-00000000-0000-0000-0000-000000000001';
const UUID_2 = 'GPU-00000000-0000-0000-0000-000000000002';

function driverFor(host: FakeGpuHost, opts: { parallel?: boolean; lockTimeoutMs?: number; mode?: 'auto' | 'off'; path?: string } = {}): GpuDriver {
  return new GpuDriver({
    cuda: new CudaCheckpoint({ path: opts.path ?? FAKE_CUDA }),
    lockTimeoutMs: opts.lockTimeoutMs ?? 1000,
    procRoot: host.procRoot,
    nvidiaProcDir: host.nvidiaProcDir,
    ...(opts.parallel !== undefined ? { parallel: opts.parallel } : {}),
    ...(opts.mode !== undefined ? { mode: opts.mode } : {}),
  });
}

async function threeGpuProcesses(host: FakeGpuHost): Promise<void> {
  for (const pid of [101, 102, 103]) {
    await host.addProcess(pid);
    await host.setState(pid, 'running');
  }
  await host.addProcess(200, { nvidia: false }); // a shell in the container: not a GPU user
}

const actions = async (host: FakeGpuHost, pid: number): Promise<string[]> =>
  (await host.calls()).filter((c) => c.endsWith(`--pid ${pid}`) || c.includes(`--pid ${pid} `)).map((c) => c.replace(/ --pid \d+.*$/, ''));

t.test('happy path: lock + checkpoint every GPU process, then restore + unlock', async (t) => {
  const host = await fakeGpuHost();
  t.teardown(host.cleanup);
  await threeGpuProcesses(host);
  const driver = driverFor(host);

  const record = await driver.beforeCheckpoint([101, 102, 103, 200]);
  t.same(record.pids, [101, 102, 103]);
  t.same(record.skipped, []);
  t.same(record.devices, [UUID_1]);
  t.equal(record.driverVersion, '580.159.04');
  t.equal(record.model, 'NVIDIA H100 80GB HBM3');
  for (const phase of ['gpu.probe', 'gpu.discover', 'gpu.state', 'gpu.lock', 'gpu.checkpoint']) t.type(record.timings[phase], 'number', phase);
  for (const pid of [101, 102, 103]) t.equal(await host.state(pid), 'checkpointed');
  t.same(await actions(host, 101), ['--get-state', '--action lock', '--action checkpoint']);
  t.match((await host.calls()).find((c) => c.includes('lock --pid 101')), /--timeout 1000$/);
  t.same(await actions(host, 200), [], 'the non-GPU process is never asked');

  // Restored pids hold no nvidia fds: the driver finds them by state among all pids.
  const restored = await driver.restoreProcesses(record, [200, 101, 102, 103]);
  t.same(restored.pids, [101, 102, 103]);
  t.same(restored.deviceMap, [], 'same GPUs: no device map');
  for (const phase of ['gpu.discover', 'gpu.restore', 'gpu.unlock']) t.type(restored.timings[phase], 'number', phase);
  for (const pid of [101, 102, 103]) t.equal(await host.state(pid), 'running');
  t.same((await actions(host, 102)).slice(3), ['--get-state', '--action restore', '--action unlock']);
});

t.test('sequential mode gives the same result', async (t) => {
  const host = await fakeGpuHost();
  t.teardown(host.cleanup);
  await threeGpuProcesses(host);
  const driver = driverFor(host, { parallel: false });
  const record = await driver.beforeCheckpoint([101, 102, 103]);
  t.same(record.pids, [101, 102, 103]);
  await driver.afterRestore(record, [101, 102, 103]);
  for (const pid of [101, 102, 103]) t.equal(await host.state(pid), 'running');
});

t.test('a lock timeout leaves that process running and unlocks the others', async (t) => {
  const host = await fakeGpuHost();
  t.teardown(host.cleanup);
  await threeGpuProcesses(host);
  await host.fail('lock', 102, 5, 'CUDA_ERROR_NOT_READY (lock timed out after 1000 ms)');
  const driver = driverFor(host);
  const err = await driver.beforeCheckpoint([101, 102, 103]).catch((e: unknown) => e);
  t.type(err, CudaCheckpointError);
  t.equal((err as CudaCheckpointError).code, 'DeadlineExceeded');
  t.equal((err as CudaCheckpointError).pid, 102);
  for (const pid of [101, 102, 103]) t.equal(await host.state(pid), 'running', `pid ${pid} running`);
  t.same(await actions(host, 101), ['--get-state', '--action lock', '--action unlock']);
  t.same(await actions(host, 102), ['--get-state', '--action lock'], 'the timed-out pid is not touched again');
  t.notOk((await host.calls()).some((c) => c.startsWith('--action checkpoint')), 'no checkpoint after a failed lock');
});

t.test('checkpoint failure on the 2nd of 3 pids rolls back the others', async (t) => {
  const host = await fakeGpuHost();
  t.teardown(host.cleanup);
  await threeGpuProcesses(host);
  await host.fail('checkpoint', 102, 1, 'CUDA_ERROR_OUT_OF_MEMORY (out of memory)');
  const driver = driverFor(host);
  const err = (await driver.beforeCheckpoint([101, 102, 103]).catch((e: unknown) => e)) as CudaCheckpointError;
  t.equal(err.pid, 102);
  t.equal(err.action, 'checkpoint');
  t.match(err.output, /CUDA_ERROR_OUT_OF_MEMORY/);
  for (const pid of [101, 102, 103]) t.equal(await host.state(pid), 'running', `pid ${pid} back to running`);
  t.same(await actions(host, 101), ['--get-state', '--action lock', '--action checkpoint', '--action restore', '--action unlock']);
  t.same(await actions(host, 102), ['--get-state', '--action lock', '--action checkpoint', '--get-state', '--action unlock']);
});

t.test('sequential: a failure on the 2nd pid never touches the 3rd', async (t) => {
  const host = await fakeGpuHost();
  t.teardown(host.cleanup);
  await threeGpuProcesses(host);
  await host.fail('checkpoint', 102, 1, 'CUDA_ERROR_UNKNOWN');
  const driver = driverFor(host, { parallel: false });
  await t.rejects(driver.beforeCheckpoint([101, 102, 103]), { name: 'CudaCheckpointError', action: 'checkpoint', pid: 102 });
  for (const pid of [101, 102, 103]) t.equal(await host.state(pid), 'running');
  t.same(await actions(host, 103), ['--get-state', '--action lock', '--action unlock'], 'locked, then unlocked; never checkpointed');
});

t.test('already locked or checkpointed pids are left as found', async (t) => {
  const host = await fakeGpuHost();
  t.teardown(host.cleanup);
  await threeGpuProcesses(host);
  await host.setState(102, 'checkpointed');
  await host.setState(103, 'locked');
  await host.addProcess(104); // holds /dev/nvidiactl but is no CUDA process (nvidia-smi-like)
  const driver = driverFor(host);
  const record = await driver.beforeCheckpoint([101, 102, 103, 104]);
  t.same(record.pids, [101]);
  t.same(record.skipped, [
    { pid: 102, state: 'checkpointed' },
    { pid: 103, state: 'locked' },
    { pid: 104, state: 'not-cuda' },
  ]);
  t.equal(await host.state(102), 'checkpointed');
  t.equal(await host.state(103), 'locked');
  t.same(await actions(host, 102), ['--get-state']);
  t.same(await actions(host, 103), ['--get-state']);

  await driver.resumeAfterCheckpoint(record);
  t.equal(await host.state(101), 'running');
  t.equal(await host.state(102), 'checkpointed', 'resume touches only what it checkpointed');
  t.equal(await host.state(103), 'locked');
});

t.test('a process in the failed state stops the checkpoint before anything is touched', async (t) => {
  const host = await fakeGpuHost();
  t.teardown(host.cleanup);
  await threeGpuProcesses(host);
  await host.setState(103, 'failed');
  await t.rejects(driverFor(host).beforeCheckpoint([101, 102, 103]), { code: 'FailedPrecondition', pid: 103 });
  t.notOk((await host.calls()).some((c) => c.startsWith('--action')), 'no action ran');
});

t.test('resumeAfterCheckpoint puts each pid back from whatever step it reached', async (t) => {
  const host = await fakeGpuHost();
  t.teardown(host.cleanup);
  await threeGpuProcesses(host);
  await host.setState(101, 'checkpointed');
  await host.setState(102, 'locked');
  const record: GpuSnapshotRecord = { pids: [101, 102, 103], timings: {}, skipped: [], devices: [UUID_1], driverVersion: '', model: '' };
  await driverFor(host).resumeAfterCheckpoint(record);
  for (const pid of [101, 102, 103]) t.equal(await host.state(pid), 'running');
  t.same(await actions(host, 103), ['--get-state']);
});

t.test('disabled when no driver: no GPU, probe failure, mode off', async (t) => {
  t.test('no /proc/driver/nvidia/gpus', async (t) => {
    const host = await fakeGpuHost({ gpus: false });
    t.teardown(host.cleanup);
    const driver = driverFor(host);
    const avail = await driver.probe();
    t.equal(avail.enabled, false);
    t.match(avail.enabled ? '' : avail.reason, /no NVIDIA GPU/);
    await host.addProcess(300, { nvidia: false });
    const record = (await driver.beforeCheckpoint([300])) as GpuSnapshotRecord;
    t.same(record.pids, []);
    t.match(record.disabledReason, /no NVIDIA GPU/);
    t.same(await host.calls(), [], 'the tool never ran');
  });
  t.test('libcuda missing', async (t) => {
    const host = await fakeGpuHost();
    t.teardown(host.cleanup);
    const { writeFile } = await import('node:fs/promises');
    await writeFile(`${host.stateDir}/probe.json`, '{"ok":false,"libcuda":false,"error":"cannot load the NVIDIA driver library"}\n');
    await writeFile(`${host.stateDir}/probe.rc`, '3');
    const avail = await driverFor(host).probe();
    t.same(avail, { enabled: false, reason: 'cannot load the NVIDIA driver library' });
  });
  t.test('checkpoint API missing', async (t) => {
    const host = await fakeGpuHost();
    t.teardown(host.cleanup);
    const { writeFile } = await import('node:fs/promises');
    await writeFile(`${host.stateDir}/probe.json`, '{"ok":true,"libcuda":true,"checkpointApi":false,"missingSymbols":["cuCheckpointProcessLock"],"devices":[]}\n');
    const avail = await driverFor(host).probe();
    t.match(avail.enabled ? '' : avail.reason, /lacks the checkpoint API \(cuCheckpointProcessLock\)/);
  });
  t.test('tool missing', async (t) => {
    const host = await fakeGpuHost();
    t.teardown(host.cleanup);
    const avail = await driverFor(host, { path: '/nonexistent/thaw-cuda' }).probe();
    t.match(avail.enabled ? '' : avail.reason, /cannot run \/nonexistent\/thaw-cuda/);
  });
  t.test('mode off, and a GPU process makes the checkpoint fail with the reason', async (t) => {
    const host = await fakeGpuHost();
    t.teardown(host.cleanup);
    await threeGpuProcesses(host);
    const driver = driverFor(host, { mode: 'off' });
    t.same(await driver.probe(), { enabled: false, reason: 'gpu.mode is off' });
    const err = await driver.beforeCheckpoint([101, 200]).catch((e: unknown) => e);
    t.type(err, ShimError);
    t.match((err as ShimError).message, /pids 101 hold \/dev\/nvidia\* open; gpu.mode is off/);
    t.same(await host.calls(), []);
  });
  t.test('NVIDIA binary without --probe is accepted', async (t) => {
    const host = await fakeGpuHost();
    t.teardown(host.cleanup);
    const { writeFile } = await import('node:fs/promises');
    await writeFile(`${host.stateDir}/probe.json`, "cuda-checkpoint: unrecognized option '--probe'\n");
    await writeFile(`${host.stateDir}/probe.rc`, '2');
    const avail = await driverFor(host).probe();
    t.equal(avail.enabled, true);
  });
});

t.test('restore onto other GPUs of the same model uses a device map', async (t) => {
  const host = await fakeGpuHost({ gpus: false });
  t.teardown(host.cleanup);
  await host.addGpu('0000:00:07.0', 'H100 80GB HBM3', UUID_2, 0);
  await threeGpuProcesses(host);
  for (const pid of [101, 102, 103]) await host.setState(pid, 'checkpointed');
  const record: GpuSnapshotRecord = { pids: [101, 102, 103], timings: {}, skipped: [], devices: [UUID_1], driverVersion: '580.159.04', model: 'NVIDIA H100 80GB HBM3' };
  const result = await driverFor(host).restoreProcesses(record, [101, 102, 103]);
  t.same(result.deviceMap, [{ from: UUID_1, to: UUID_2 }]);
  t.ok((await host.calls()).includes(`--action restore --pid 101 --device-map ${UUID_1}=${UUID_2}`));
});

t.test('a failed restore re-checkpoints what it restored; missing processes fail before any restore', async (t) => {
  const host = await fakeGpuHost();
  t.teardown(host.cleanup);
  await threeGpuProcesses(host);
  for (const pid of [101, 102, 103]) await host.setState(pid, 'checkpointed');
  const record: GpuSnapshotRecord = { pids: [101, 102, 103], timings: {}, skipped: [], devices: [UUID_1], driverVersion: '', model: '' };
  const driver = driverFor(host);

  await t.rejects(driver.restoreProcesses(record, [101, 102]), { code: 'FailedPrecondition', message: /expected 3 .* found 2/ });
  t.notOk((await host.calls()).some((c) => c.startsWith('--action')));

  await host.fail('restore', 103, 1, 'CUDA_ERROR_OUT_OF_MEMORY');
  await t.rejects(driver.restoreProcesses(record, [101, 102, 103]), { name: 'CudaCheckpointError', action: 'restore', pid: 103 });
  for (const pid of [101, 102, 103]) t.equal(await host.state(pid), 'checkpointed', `pid ${pid} as found`);
  t.notOk((await host.calls()).some((c) => c.startsWith('--action unlock')), 'nothing unlocked');
});

t.test('a record without pids restores nothing and needs no GPU', async (t) => {
  const host = await fakeGpuHost({ gpus: false });
  t.teardown(host.cleanup);
  const result = await driverFor(host).restoreProcesses({ pids: [], timings: {} }, [1, 2]);
  t.same(result.pids, []);
  t.same(await host.calls(), []);
});

t.test('planDeviceMap', async (t) => {
  const inv = (uuids: string[]) => ({ driverVersion: 'x', gpus: uuids.map((uuid, i) => ({ busLocation: `b${i}`, model: 'M', uuid, minor: i })) });
  t.same(planDeviceMap([UUID_1], inv([UUID_1])), []);
  t.same(planDeviceMap([], inv([UUID_1])), []);
  t.same(planDeviceMap([UUID_1, UUID_2], inv([UUID_2, UUID_1])), [
    { from: UUID_1, to: UUID_2 },
    { from: UUID_2, to: UUID_1 },
  ]);
  t.throws(() => planDeviceMap([UUID_1, UUID_2], inv([UUID_1])), /2 GPU\(s\), this host has 1/);
});
