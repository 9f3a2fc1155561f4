import t from 'tap';
import { CudaCheckpointError } from '../../src/errors.js';
import { CudaCheckpoint, defaultThawCudaPath, deviceMapArg, isLockTimeout } from '../../src/gpu/cuda-checkpoint.js';
import { FAKE_CUDA, fakeGpuHost } from './helpers.js';

const UUID_A = 'GPU-00000000-0000-0000-0000-000000000001';
const UUID_B = 'GPU-00000000-0000-0000-0000-00000000000b';

t.test('verbs map to cuda-checkpoint argv and follow the state machine', async (t) => {
  const host = await fakeGpuHost();
  t.teardown(host.cleanup);
  const cuda = new CudaCheckpoint({ path: FAKE_CUDA });
  await host.setState(100, 'running');
  t.equal(await cuda.getState(100), 'running');
  await cuda.lock(100, 250);
  t.equal(await cuda.getState(100), 'locked');
  await cuda.checkpoint(100);
  t.equal(await cuda.getState(100), 'checkpointed');
  await cuda.restore(100, { deviceMap: [{ from: UUID_A, to: UUID_B }] });
  t.equal(await cuda.getState(100), 'locked', 'restore leaves the process locked');
  await cuda.unlock(100);
  await cuda.toggle(100);
  t.equal(await host.state(100), 'checkpointed');
  await cuda.toggle(100);
  t.equal(await cuda.getRestoreTid(100), 101);
  await cuda.lock(100, 0);
  t.same(await host.calls(), [
    '--get-state --pid 100',
    '--action lock --pid 100 --timeout 250',
    '--get-state --pid 100',
    '--action checkpoint --pid 100',
    '--get-state --pid 100',
    `--action restore --pid 100 --device-map ${UUID_A}=${UUID_B}`,
    '--get-state --pid 100',
    '--action unlock --pid 100',
    '--toggle --pid 100',
    '--toggle --pid 100',
    '--get-restore-tid --pid 100',
    '--action lock --pid 100',
  ]);
});

t.test('failures carry pid, action, output and a class', async (t) => {
  const host = await fakeGpuHost();
  t.teardown(host.cleanup);
  const cuda = new CudaCheckpoint({ path: FAKE_CUDA });
  await host.setState(7, 'running');

  const notCuda = await cuda.getState(8).catch((e: unknown) => e);
  t.type(notCuda, CudaCheckpointError);
  const e1 = notCuda as CudaCheckpointError;
  t.equal(e1.pid, 8);
  t.equal(e1.action, 'get-state');
  t.equal(e1.code, 'NotFound');
  t.match(e1.output, /CUDA_ERROR_INVALID_VALUE/);
  t.match(e1.message, /cuda-checkpoint get-state of pid 8 failed: .*CUDA_ERROR_INVALID_VALUE/);

  const illegal = (await cuda.checkpoint(7).catch((e: unknown) => e)) as CudaCheckpointError;
  t.equal(illegal.code, 'FailedPrecondition', 'checkpoint of a running process is an illegal state');
  t.notOk(isLockTimeout(illegal));

  await host.fail('lock', 7, 5, 'CUDA_ERROR_NOT_READY (lock timed out after 5 ms)');
  const timeout = (await cuda.lock(7, 5).catch((e: unknown) => e)) as CudaCheckpointError;
  t.equal(timeout.code, 'DeadlineExceeded');
  t.ok(isLockTimeout(timeout), 'an expired lock is recognised');
  t.equal(await host.state(7), 'running', 'the process keeps running');

  await host.fail('checkpoint', 'any', 3, 'cannot load the NVIDIA driver library');
  await host.setState(9, 'locked');
  const nolib = (await cuda.checkpoint(9).catch((e: unknown) => e)) as CudaCheckpointError;
  t.equal(nolib.code, 'Unavailable');
});

t.test('a hung tool is killed at its timeout; the state is then unknown, not a lock timeout', async (t) => {
  const host = await fakeGpuHost();
  t.teardown(host.cleanup);
  const { writeFile } = await import('node:fs/promises');
  await writeFile(`${host.stateDir}/delay-lock`, '1');
  await host.setState(5, 'running');
  const cuda = new CudaCheckpoint({ path: FAKE_CUDA });
  const err = (await cuda.lock(5, 10, { timeoutMs: 300 }).catch((e: unknown) => e)) as CudaCheckpointError;
  t.equal(err.code, 'DeadlineExceeded');
  t.match(err.message, /state unknown/);
  t.notOk(isLockTimeout(err));
});

t.test('an aborted signal cancels the call', async (t) => {
  const host = await fakeGpuHost();
  t.teardown(host.cleanup);
  const cuda = new CudaCheckpoint({ path: FAKE_CUDA });
  const ac = new AbortController();
  ac.abort();
  const err = (await cuda.getState(1, { signal: ac.signal }).catch((e: unknown) => e)) as CudaCheckpointError;
  t.equal(err.code, 'Canceled');
  t.same(await host.calls(), [], 'nothing ran');
});

t.test('a missing binary is Unavailable', async (t) => {
  const cuda = new CudaCheckpoint({ path: '/nonexistent/thaw-cuda' });
  const err = (await cuda.getState(1).catch((e: unknown) => e)) as CudaCheckpointError;
  t.equal(err.code, 'Unavailable');
  t.match(err.message, /cannot run \/nonexistent\/thaw-cuda/);
});

t.test('probe parses thaw-cuda JSON, also the ok:false answer of exit 3', async (t) => {
  const host = await fakeGpuHost();
  t.teardown(host.cleanup);
  const cuda = new CudaCheckpoint({ path: FAKE_CUDA });
  const p = await cuda.probe();
  t.equal(p.ok, true);
  t.equal(p.checkpointApi, true);
  t.equal(p.devices[0]?.uuid, UUID_A);
  const { writeFile } = await import('node:fs/promises');
  await writeFile(`${host.stateDir}/probe.json`, '{"ok":false,"libcuda":false,"kernelDriverVersion":null,"error":"no libcuda"}\n');
  await writeFile(`${host.stateDir}/probe.rc`, '3');
  const q = await cuda.probe();
  t.equal(q.ok, false);
  t.equal(q.error, 'no libcuda');
});

t.test('device maps are validated', async (t) => {
  t.equal(deviceMapArg([{ from: UUID_A, to: UUID_B }, { from: UUID_B, to: UUID_A }]), `${UUID_A}=${UUID_B},${UUID_B}=${UUID_A}`);
  t.throws(() => deviceMapArg([{ from: 'GPU-1', to: UUID_B }]), /invalid GPU UUID/);
});

t.test('the default binary is thaw-cuda in this checkout', async (t) => {
  t.match(defaultThawCudaPath(), /native\/cuda\/thaw-cuda$/);
  t.equal(new CudaCheckpoint().path, defaultThawCudaPath());
});
