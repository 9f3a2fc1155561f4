/**
 * The host's NVIDIA GPUs as the kernel module describes them (/proc/driver/nvidia), read without
 * libcuda so it is cheap and works for any cuda-checkpoint binary:
 *
 *   /proc/driver/nvidia/version                  "NVRM version: NVIDIA UNIX ... Kernel Module ... 580.159.04  Release Build ..."
 *   /proc/driver/nvidia/gpus/<bus>/information   "Model: \t NVIDIA H100 80GB HBM3", "GPU UUID: \t GPU-…", "Device Minor: \t 0", …
 *
 * `gpuKeyIdentity` is what goes into the snapshot key: model, count and driver version, but not
 * the UUIDs, because a snapshot restores onto other GPUs of the same model through a device map
 * (driver.ts). The UUIDs travel in the GPU checkpoint record instead.
 */
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { GpuIdentity } from '../snapshot/key.js';

export const NVIDIA_PROC_DIR = '/proc/driver/nvidia';

export interface GpuInfo {
  /** PCI bus location, e.g. `0000:00:07.0` (the directory name under gpus/). */
  busLocation: string;
  model: string;
  /** `GPU-xxxxxxxx-…` as nvidia-smi prints it; '' if the module does not say. */
  uuid: string;
  /** N of /dev/nvidiaN, null if unknown. */
  minor: number | null;
}

export interface GpuInventory {
  /** Kernel module version, e.g. `580.159.04` ('' if unreadable). */
  driverVersion: string;
  /** Sorted by bus location, the order nvidia-smi and CUDA (PCI_BUS_ID order) use. */
  gpus: GpuInfo[];
}

export interface GpuProbeOptions {
  /** Root of the driver's proc tree (tests point it at a fixture). */
  readonly procDir?: string;
}

/** Reads the GPU inventory; null when the NVIDIA module is not loaded or lists no GPU. */
export async function readGpuInventory({ procDir = NVIDIA_PROC_DIR }: GpuProbeOptions = {}): Promise<GpuInventory | null> {
  let buses: string[];
  try {
    buses = (await readdir(join(procDir, 'gpus'))).sort();
  } catch {
    return null;
  }
  if (buses.length === 0) return null;
  const gpus = await Promise.all(buses.map((bus) => readGpu(procDir, bus)));
  const driverVersion = parseDriverVersion(await readFile(join(procDir, 'version'), 'utf8').catch(() => ''));
  return { driverVersion, gpus };
}

/** The snapshot-key part: `{model, count, driverVersion}`; null without GPUs. */
export function gpuKeyIdentity(inventory: GpuInventory | null): GpuIdentity | null {
  if (inventory === null || inventory.gpus.length === 0) return null;
  const models = [...new Set(inventory.gpus.map((g) => g.model))].sort();
  return { model: models.join(' + '), count: inventory.gpus.length, driverVersion: inventory.driverVersion };
}

/** `readGpuInventory` + `gpuKeyIdentity`. */
export async function probeGpuIdentity(opts: GpuProbeOptions = {}): Promise<GpuIdentity | null> {
  return gpuKeyIdentity(await readGpuInventory(opts));
}

/** First token shaped like a version number (`580.159.04`) on the NVRM line. */
export function parseDriverVersion(versionFile: string): string {
  const line = versionFile.split('\n').find((l) => l.startsWith('NVRM')) ?? '';
  return line.split(/\s+/).find((tok) => /^\d+\.\d+(\.\d+)*$/.test(tok)) ?? '';
}

/** `Key: value` lines (tabs and spaces around the colon) into a map. */
export function parseGpuInformation(text: string): Map<string, string> {
  const fields = new Map<string, string>();
  for (const line of text.split('\n')) {
    const i = line.indexOf(':');
    if (i <= 0) continue;
    fields.set(line.slice(0, i).trim(), line.slice(i + 1).trim());
  }
  return fields;
}

async function readGpu(procDir: string, bus: string): Promise<GpuInfo> {
  const text = await readFile(join(procDir, 'gpus', bus, 'information'), 'utf8').catch(() => '');
  const f = parseGpuInformation(text);
  const minor = Number(f.get('Device Minor'));
  return {
    busLocation: bus,
    model: f.get('Model') ?? 'unknown',
    uuid: f.get('GPU UUID') ?? '',
    minor: f.has('Device Minor') && Number.isInteger(minor) ? minor : null,
  };
}
