/**
 * thaw-cuda (native/cuda) without a GPU: it builds with plain gcc, answers --help, fails cleanly
 * without libcuda, and drives a stand-in libcuda (native/cuda/fake-libcuda.c) correctly through the
 * TypeScript client: argument structs zeroed, device map passed, cuInit before restore.
 */
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';
import t from 'tap';
import { CudaCheckpointError } from '../../src/errors.js';
import { CudaCheckpoint, defaultThawCudaPath, isLockTimeout } from '../../src/gpu/cuda-checkpoint.js';

const CUDA_DIR = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'native', 'cuda');
const BIN = defaultThawCudaPath();

t.before(async () => {
  // Incremental: builds only when missing or stale.
  await execa('make', ['-s', '-C', CUDA_DIR], { timeout: 120_000 });
});

t.test('--help and usage errors', async (t) => {
  const help = await execa(BIN, ['--help']);
  t.match(help.stdout, /--get-state --pid PID/);
  t.match(help.stdout, /--device-map OLD=NEW/);
  const none = await execa(BIN, [], { reject: false });
  t.equal(none.exitCode, 2);
  const bad = await execa(BIN, ['--action', 'explode', '--pid', '1'], { reject: false });
  t.equal(bad.exitCode, 2);
  t.match(bad.stderr, /unknown action 'explode'/);
  const map = await execa(BIN, ['--action', 'lock', '--pid', '1', '--device-map', 'GPU-1=GPU-2'], { reject: false });
  t.equal(map.exitCode, 2);
  t.match(map.stderr, /--device-map applies to restore/);
  const badMap = await execa(BIN, ['--action', 'restore', '--pid', '1', '--device-map', 'nonsense'], { reject: false });
  t.equal(badMap.exitCode, 2);
});

t.test('without libcuda: clear message, exit 3, probe JSON says why', async (t) => {
  const env = { THAW_CUDA_LIBCUDA: '/nonexistent/libcuda.so.1' };
  const probe = await execa(BIN, ['--probe'], { reject: false, env });
  t.equal(probe.exitCode, 3);
  const j = JSON.parse(probe.stdout) as { ok: boolean; libcuda: boolean; error: string };
  t.equal(j.ok, false);
  t.equal(j.libcuda, false);
  t.match(j.error, /cannot load the NVIDIA driver library .*is the NVIDIA driver installed\?/);
  const state = await execa(BIN, ['--get-state', '--pid', '1'], { reject: false, env });
  t.equal(state.exitCode, 3);
  t.match(state.stderr, /get-state: cannot load the NVIDIA driver library/);

  // The client turns it into a disabled probe and an Unavailable error.
  const saved = process.env.THAW_CUDA_LIBCUDA;
  process.env.THAW_CUDA_LIBCUDA = env.THAW_CUDA_LIBCUDA;
  t.teardown(() => {
    if (saved === undefined) delete process.env.THAW_CUDA_LIBCUDA;
    else process.env.THAW_CUDA_LIBCUDA = saved;
  });
  const cuda = new CudaCheckpoint();
  t.equal((await cuda.probe()).ok, false);
  await t.rejects(cuda.getState(1), { code: 'Unavailable', action: 'get-state' });
});

t.test('against a stand-in libcuda', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'thaw-cuda-test-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const lib = join(dir, 'libcuda.so.1');
  await execa('gcc', ['-shared', '-fPIC', '-O1', '-o', lib, join(CUDA_DIR, 'fake-libcuda.c')], { timeout: 60_000 });
  const saved = { lib: process.env.THAW_CUDA_LIBCUDA, dir: process.env.FAKE_CUDA_DIR };
  process.env.THAW_CUDA_LIBCUDA = lib;
  process.env.FAKE_CUDA_DIR = dir;
  t.teardown(() => {
    for (const [k, v] of [['THAW_CUDA_LIBCUDA', saved.lib], ['FAKE_CUDA_DIR', saved.dir]] as const) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  });
  const calls = async () => (await readFile(join(dir, 'calls'), 'utf8')).trim().split('\n');
  const cuda = new CudaCheckpoint();

  const probe = await cuda.probe();
  t.equal(probe.ok, true);
  t.equal(probe.checkpointApi, true);
  t.equal(probe.cudaVersion, '13.0');
  t.same(probe.devices.map((d) => d.uuid), ['GPU-00010203-0405-0607-0809-0a0b0c0d0e0f', 'GPU-10111213-1415-1617-1819-1a1b1c1d1e1f']);
  t.equal(probe.devices[0]?.computeCapability, '9.0');

  await writeFile(join(dir, '42.state'), 'running\n');
  await cuda.lock(42, 500);
  await cuda.checkpoint(42);
  t.equal(await cuda.getState(42), 'checkpointed');
  await cuda.restore(42, {
    deviceMap: [{ from: 'GPU-00010203-0405-0607-0809-0a0b0c0d0e0f', to: 'GPU-10111213-1415-1617-1819-1a1b1c1d1e1f' }],
  });
  await cuda.unlock(42);
  t.equal(await cuda.getState(42), 'running');
  t.equal(await cuda.getRestoreTid(42), 43);
  await cuda.toggle(42);
  t.equal(await cuda.getState(42), 'checkpointed');
  await cuda.toggle(42);
  // The stand-in rejects non-zero reserved fields with INVALID_VALUE, so success shows they were zeroed.
  t.same((await calls()).filter((c) => !c.startsWith('getState')), [
    'lock 42 timeout=500',
    'checkpoint 42',
    'restore 42 pairs=1 00..0f>10..1f init=1',
    'unlock 42',
    'getRestoreThreadId 42',
    'lock 42 timeout=0',
    'checkpoint 42',
    'restore 42 init=1',
    'unlock 42',
  ]);

  const notCuda = (await cuda.getState(77).catch((e: unknown) => e)) as CudaCheckpointError;
  t.equal(notCuda.code, 'NotFound');
  t.match(notCuda.output, /CUDA_ERROR_INVALID_VALUE/);
  const illegal = (await cuda.unlock(42).catch((e: unknown) => e)) as CudaCheckpointError;
  t.equal(illegal.code, 'FailedPrecondition');

  process.env.FAKE_CUDA_LOCK_BUSY = '1';
  t.teardown(() => {
    delete process.env.FAKE_CUDA_LOCK_BUSY;
  });
  const busy = await cuda.lock(42, 5).catch((e: unknown) => e);
  t.ok(isLockTimeout(busy), 'exit 5 is a lock timeout');
  t.equal(await cuda.getState(42), 'running');
});
