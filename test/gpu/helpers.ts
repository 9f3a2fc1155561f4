/** Shared set-up for the GPU unit tests: a fake cuda-checkpoint state dir, /proc and NVIDIA proc fixtures. */
import { mkdir, mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { CudaProcessState } from '../../src/gpu/cuda-checkpoint.js';

export const FAKE_CUDA = join(dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'bin', 'fake-cuda-checkpoint');

export interface FakeGpuHost {
  root: string;
  /** FAKE_CUDA_DIR of the fake tool. */
  stateDir: string;
  procRoot: string;
  nvidiaProcDir: string;
  setState(pid: number, state: CudaProcessState): Promise<void>;
  state(pid: number): Promise<string>;
  /** Gives `pid` an fd pointing at /dev/nvidia0 (a GPU user) or at /dev/null. */
  addProcess(pid: number, opts?: { nvidia?: boolean }): Promise<void>;
  fail(action: string, pid: number | 'any', exitCode: number, message: string, times?: number): Promise<void>;
  calls(): Promise<string[]>;
  addGpu(bus: string, model: string, uuid: string, minor: number): Promise<void>;
  cleanup(): Promise<void>;
}

export async function fakeGpuHost(opts: { gpus?: boolean } = {}): Promise<FakeGpuHost> {
  const root = await mkdtemp(join(tmpdir(), 'thaw-gpu-test-'));
  const stateDir = join(root, 'cuda');
  const procRoot = join(root, 'proc');
  const nvidiaProcDir = join(root, 'nvidia');
  await mkdir(stateDir);
  await mkdir(procRoot);
  process.env.FAKE_CUDA_DIR = stateDir;
  const host: FakeGpuHost = {
    root,
    stateDir,
    procRoot,
    nvidiaProcDir,
    setState: (pid, state) => writeFile(join(stateDir, `${pid}.state`), `${state}\n`),
    state: async (pid) => (await readFile(join(stateDir, `${pid}.state`), 'utf8')).trim(),
    async addProcess(pid, { nvidia = true } = {}) {
      const fd = join(procRoot, String(pid), 'fd');
      await mkdir(fd, { recursive: true });
      await symlink('/dev/null', join(fd, '0'));
      if (nvidia) await symlink('/dev/nvidia0', join(fd, '7'));
    },
    async fail(action, pid, exitCode, message, times) {
      const f = join(stateDir, `fail-${action}-${pid}`);
      await writeFile(f, `${exitCode} ${message}\n`);
      if (times !== undefined) await writeFile(`${f}.n`, `${times}\n`);
    },
    calls: async () => (await readFile(join(stateDir, 'argv.log'), 'utf8').catch(() => '')).split('\n').filter((l) => l !== ''),
    async addGpu(bus, model, uuid, minor) {
      const d = join(nvidiaProcDir, 'gpus', bus);
      await mkdir(d, { recursive: true });
      await writeFile(
        join(d, 'information'),
        `Model: \t\t NVIDIA ${model}\nIRQ:   \t\t 0\nGPU UUID: \t ${uuid}\nVideo BIOS: \t ??.??.??.??.??\nBus Type: \t PCIe\nBus Location: \t ${bus}\nDevice Minor: \t ${minor}\nGPU Excluded:\t No\n`,
      );
      await writeFile(
        join(nvidiaProcDir, 'version'),
        'NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  (dvs-builder@U22)  Thu Jan 1 00:00:00 UTC 2026\nGCC version:  gcc version 12.3.0\n',
      );
    },
    cleanup: () => rm(root, { recursive: true, force: true }),
  };
  if (opts.gpus !== false) await host.addGpu('0000:00:07.0', 'H100 80GB HBM3', 'GPU-00000000-0000-0000-0000-000000000001', 0);
  return host;
}
