import { join } from 'node:path';
import type { Logger } from '../log/logger.js';
import type { ThawConfig } from '../config/config.js';
import { SnapshotStore } from '../snapshot/store.js';
import { RootfsFingerprints } from '../snapshot/rootfs-cache.js';
import { RestoreStager } from '../restore/engine.js';
import { ioFileHasher, ioStageReader, openIo } from '../restore/io.js';
import { ContainerRecords } from './records.js';
import { GvisorEngine } from './gvisor.js';
import { NativeEngine } from './native.js';
import { gpuDriverFromConfig, type GpuDriver } from '../gpu/driver.js';
import { Lifecycle } from './lifecycle.js';
import { probeGpuIdentity } from '../gpu/probe.js';
import type { Engine, EngineName } from './engine.js';

/**
 * Assembles thaw's parts from one config: store, records, engines and the lifecycle. Used by the
 * CLI (per command) and by the shim's `serve` (once). Only wiring here.
 */
export interface Runtime {
  config: ThawConfig;
  log: Logger;
  store: SnapshotStore;
  records: ContainerRecords;
  engine: (name: EngineName, namespace: string) => Engine | undefined;
  lifecycle: Lifecycle;
}

export async function openRuntime(config: ThawConfig, log: Logger): Promise<Runtime> {
  // One I/O backend (io_uring → AIO → pread → TypeScript) hashes commits and stages restores.
  const io = openIo({ backend: config.restore.ioBackend, log });
  const store = await SnapshotStore.open({ root: config.store.path, log, hasher: ioFileHasher(io) });
  const records = await ContainerRecords.open(config.stateDir);
  const cache = new Map<string, Engine>();
  // GPU hooks for the native engine; probing is lazy (no driver → hooks report GPU snapshots off).
  let gpuDriver: GpuDriver | undefined;
  const gpu = (): GpuDriver => (gpuDriver ??= gpuDriverFromConfig(config, log));
  const engine = (name: EngineName, namespace: string): Engine | undefined => {
    const k = `${name}\0${namespace}`;
    let e = cache.get(k);
    if (!e && name === 'gvisor') e = new GvisorEngine({ config, log, namespace });
    if (!e && name === 'native') {
      e = new NativeEngine({
        runcPath: config.runc.path,
        criuPath: config.runc.criuPath,
        root: join(config.stateDir, 'native'),
        log,
        namespace,
        gpu: gpu(),
        lazyPages: config.restore.lazyPages,
        tcpEstablished: config.runc.tcpEstablished,
      });
    }
    if (e) cache.set(k, e);
    return e;
  };
  const stager = new RestoreStager(ioStageReader(io), log);
  const lifecycle = new Lifecycle({
    config,
    log,
    store,
    records,
    engine,
    stager,
    gpuIdentity: once(() => (config.gpu.mode === 'off' ? Promise.resolve(null) : probeGpuIdentity())),
    rootfsFingerprints: new RootfsFingerprints(join(config.stateDir, 'cache', 'rootfs')),
  });
  return { config, log, store, records, engine, lifecycle };
}

export function tmpDirOf(config: ThawConfig): string {
  return join(config.stateDir, 'tmp');
}

/** Caches a probe for the life of the runtime (the GPU inventory does not change under a shim). */
function once<T>(fn: () => Promise<T>): () => Promise<T> {
  let p: Promise<T> | undefined;
  return () => (p ??= fn());
}
