import { readFile, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import type { ThawConfig } from '../config/config.js';
import { readBundleSpec, specWantsGpu, type OciSpec } from '../bundle/bundle.js';
import { ShimError } from '../errors.js';
import { CudaCheckpoint, defaultThawCudaPath } from '../gpu/cuda-checkpoint.js';
import { GpuDriver, type GpuSnapshotRecord } from '../gpu/driver.js';
import { silentLogger, type Logger } from '../log/logger.js';
import type { RunscCapabilities } from '../runsc/probe.js';
import { THAW_CUDA_MOUNT_POINT } from '../snapshot/key.js';

/**
 * The GPU side of the gVisor engine. Inside a sandbox the CUDA processes are not host processes, so
 * thaw-cuda has to run *inside* the sandbox, where nvproxy hands its driver calls to the host:
 *
 * - a runsc with `checkpoint --cuda-checkpoint-path` (upstream, 2026-06+) does the work itself:
 *   before pausing, the sentry runs the tool for each process holding an nvproxy fd and toggles
 *   them back after restore. thaw only bind-mounts thaw-cuda into the container and passes its path.
 * - an older runsc: thaw runs the tool through `runsc exec` for every sandbox pid — lock + checkpoint
 *   before `runsc checkpoint`, restore + unlock after `runsc restore` — with GpuDriver's undo log,
 *   and records the pids next to the image.
 *
 * Only for containers that ask for a GPU, on a runsc with nvproxy, with gpu.mode auto.
 */

/** Where thaw-cuda appears inside a GPU container (bind-mounted read-only from the host; not in the key). */
export const SANDBOX_THAW_CUDA = THAW_CUDA_MOUNT_POINT;
/** Written next to the runsc image when thaw itself checkpointed the sandbox's CUDA processes. */
export const GPU_RECORD_FILE = 'thaw-gpu.json';

export type GvisorGpuPlan =
  | { kind: 'none'; reason: string }
  /** runsc runs the tool itself (`--cuda-checkpoint-path`). */
  | { kind: 'runsc'; hostTool: string }
  /** thaw runs the tool through `runsc exec`. */
  | { kind: 'exec'; hostTool: string };

/** Decides how (and whether) GPU state is snapshotted for a gVisor container. Pure. */
export function planGvisorGpu(o: { spec: OciSpec; caps: RunscCapabilities; config: ThawConfig; toolExists: (path: string) => boolean }): GvisorGpuPlan {
  if (!specWantsGpu(o.spec)) return { kind: 'none', reason: 'the container asks for no GPU' };
  if (o.config.gpu.mode === 'off') return { kind: 'none', reason: 'gpu.mode is off' };
  if (!o.caps.nvproxy) return { kind: 'none', reason: `runsc ${o.caps.version} has no --nvproxy: it cannot run GPU containers` };
  const hostTool = o.config.gpu.cudaCheckpointPath ?? defaultThawCudaPath();
  if (!o.toolExists(hostTool)) return { kind: 'none', reason: `${hostTool} is missing (build native/cuda)` };
  return o.caps.cudaCheckpointPath ? { kind: 'runsc', hostTool } : { kind: 'exec', hostTool };
}

export interface BindMount {
  destination: string;
  type: 'bind';
  source: string;
  options: string[];
}

export function thawCudaMount(hostTool: string): BindMount {
  return { destination: SANDBOX_THAW_CUDA, type: 'bind', source: hostTool, options: ['rbind', 'ro'] };
}

/** Adds the thaw-cuda bind mount to the bundle's config.json (idempotent: a second `thaw run` of one bundle). */
export async function addThawCudaMount(bundle: string, hostTool: string): Promise<boolean> {
  const path = join(bundle, 'config.json');
  const spec = JSON.parse(await readFile(path, 'utf8')) as OciSpec;
  const mounts = Array.isArray(spec.mounts) ? spec.mounts : [];
  if (mounts.some((m) => (m as { destination?: unknown }).destination === SANDBOX_THAW_CUDA)) return false;
  spec.mounts = [...mounts, thawCudaMount(hostTool)];
  await writeFile(path, JSON.stringify(spec));
  return true;
}

/** Plans from the bundle on disk; a bundle that cannot be read plans nothing (create reports it). */
export async function planForBundle(bundle: string, caps: RunscCapabilities, config: ThawConfig): Promise<GvisorGpuPlan> {
  let spec: OciSpec;
  try {
    spec = await readBundleSpec(bundle);
  } catch {
    return { kind: 'none', reason: 'bundle unreadable' };
  }
  return planGvisorGpu({ spec, caps, config, toolExists: existsSync });
}

export interface SandboxGpuOptions {
  config: ThawConfig;
  /** `runsc <global flags> exec <runtime id>`: thaw-cuda runs under it, inside the sandbox. */
  execPrefix: readonly string[];
  log?: Logger;
  /** /proc/driver/nvidia (tests point it at a fixture). */
  nvidiaProcDir?: string;
}

/** A GpuDriver whose tool runs inside one sandbox and finds CUDA processes by asking the tool. */
export function sandboxGpuDriver(o: SandboxGpuOptions): GpuDriver {
  const log = o.log ?? silentLogger;
  return new GpuDriver({
    cuda: new CudaCheckpoint({ path: SANDBOX_THAW_CUDA, launcher: o.execPrefix, logger: log }),
    mode: o.config.gpu.mode,
    lockTimeoutMs: o.config.gpu.lockTimeoutMs,
    logger: log,
    discovery: 'ask-tool',
    ...(o.nvidiaProcDir !== undefined ? { nvidiaProcDir: o.nvidiaProcDir } : {}),
  });
}

/** What thaw did to the sandbox's CUDA processes, kept with the image for the restore. */
export async function writeGpuRecord(imageDir: string, record: GpuSnapshotRecord): Promise<void> {
  await writeFile(join(imageDir, GPU_RECORD_FILE), JSON.stringify(record));
}

/** The record of an image, or null when thaw did not checkpoint CUDA processes for it. */
export async function readGpuRecord(imageDir: string): Promise<GpuSnapshotRecord | null> {
  let text: string;
  try {
    text = await readFile(join(imageDir, GPU_RECORD_FILE), 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new ShimError('DataLoss', `cannot read ${GPU_RECORD_FILE} in ${imageDir}`, { cause: err });
  }
  try {
    const record = JSON.parse(text) as GpuSnapshotRecord;
    if (!Array.isArray(record.pids) || !record.pids.every((p) => Number.isInteger(p))) throw new Error('pids is not a list of integers');
    return record;
  } catch (err) {
    throw new ShimError('DataLoss', `${GPU_RECORD_FILE} in ${imageDir} is damaged: ${(err as Error).message}`, { cause: err });
  }
}
