import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';
import t from 'tap';
import { Runsc } from '../../src/runsc/runsc.js';
import { defaultThawCudaPath } from '../../src/gpu/cuda-checkpoint.js';

/**
 * The gVisor engine's GPU path end to end with the real runsc and a real GPU: a torch workload
 * (bench/gpu/workload.py, 1 GiB of seeded patterns, a cuBLAS matmul and a CUDA graph) in a runsc
 * sandbox with nvproxy, started by `thaw run`, snapshotted by `thaw checkpoint` (thaw-cuda through
 * runsc exec, or runsc's own --cuda-checkpoint-path), restored by a second `thaw run`, then checked
 * bit-exact — through bench/gpu/thaw-e2e.sh with ENGINE=gvisor.
 *
 * It runs only where runsc's nvproxy supports the host's driver; everywhere else it skips and says
 * why (Debian's runsc 20240729 supports drivers up to 550.90.07; our GPU machine runs 580 and has no
 * runsc, so its GPU numbers come from the native engine).
 */
const REPO = fileURLToPath(new URL('../../', import.meta.url));

function driverVersion(): string | null {
  try {
    return /Kernel Module(?: for x86_64)?\s+([0-9.]+)/.exec(readFileSync('/proc/driver/nvidia/version', 'utf8'))?.[1] ?? null;
  } catch {
    return null;
  }
}

async function skipReason(): Promise<string | false> {
  if (!process.env.THAW_INTEGRATION) return 'THAW_INTEGRATION is not set';
  const driver = driverVersion();
  if (driver === null) return 'no NVIDIA GPU on this host (/proc/driver/nvidia/version missing)';
  const runsc = new Runsc({ path: 'runsc', root: join(tmpdir(), 'thaw-gvisor-gpu-probe'), platform: 'systrap', network: 'none', debugLogDir: null, flags: {} });
  const caps = await runsc.capabilities().catch(() => null);
  if (caps === null) return 'runsc is not installed';
  if (!caps.nvproxy) return `runsc ${caps.version} has no nvproxy`;
  const list = await execa('runsc', ['nvproxy', 'list-supported-drivers'], { reject: false, timeout: 30_000 });
  if (list.failed) return `runsc ${caps.version} cannot list its nvproxy drivers (it predates driver ${driver})`;
  if (!String(list.stdout).split(/\s+/).includes(driver)) return `runsc ${caps.version}'s nvproxy does not support driver ${driver}`;
  if (!existsSync(defaultThawCudaPath())) return 'native/cuda/thaw-cuda is not built';
  if ((await execa('python3', ['-c', 'import torch; assert torch.cuda.is_available()'], { reject: false, timeout: 120_000 })).failed) {
    return 'python3 with CUDA-enabled torch is missing';
  }
  return false;
}

t.test('a GPU container under runsc: cold start, checkpoint, restore, bit-exact', { skip: await skipReason() }, async (t) => {
  const out = await mkdtemp(join(tmpdir(), 'thaw-gvisor-gpu-'));
  t.teardown(() => rm(out, { recursive: true, force: true }));
  const r = await execa(
    'bash',
    [join(REPO, 'bench/gpu/thaw-e2e.sh'), process.execPath, join(REPO, 'dist/src/cli/thaw.js'), 'runc', '/opt/thaw/criu/bin/criu', defaultThawCudaPath(), 'python3', '', 'pattern', '1', out],
    { cwd: REPO, env: { ENGINE: 'gvisor' }, reject: false, all: true, timeout: 480_000 },
  );
  const result = /^RESULT .*$/m.exec(String(r.all))?.[0] ?? '';
  t.equal(r.exitCode, 0, String(r.all).slice(-2000));
  t.match(result, /bit_exact=True/, 'restored GPU memory, matmul and graph are bit-exact');
  const restore = JSON.parse(readFileSync(join(out, 'thaw-run-restore.json'), 'utf8')) as { decision: string; engine: string; fallback: string | null };
  t.match(restore, { decision: 'restore', engine: 'gvisor', fallback: null });
});
