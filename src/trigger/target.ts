import type { ThawConfig } from '../config/config.js';
import type { Engine } from '../engine/engine.js';
import type { CheckpointResult } from '../engine/lifecycle.js';
import type { ContainerRecord } from '../engine/records.js';
import type { Logger } from '../log/logger.js';
import { isLocked } from '../snapshot/lock.js';
import type { SnapshotStore } from '../snapshot/store.js';
import { containerExecFor } from './container-exec.js';
import { TriggerController, type TriggerTarget } from './controller.js';

/**
 * The Task service's two calls into the trigger module: `prepareTrigger` at Create (before the
 * container is planned, so the /run/thaw mount is in the spec the key and runsc see) and
 * `triggerTarget` at Start (what the controller may do to the container).
 */
export async function prepareTrigger(o: { bundle: string; id: string; namespace: string; config: ThawConfig; log: Logger }): Promise<TriggerController | undefined> {
  return TriggerController.prepare({
    bundle: o.bundle,
    id: o.id,
    namespace: o.namespace,
    stateDir: o.config.stateDir,
    ignoreEnv: o.config.snapshot.ignoreEnv,
    hostUds: o.config.runsc.flags['host-uds'],
    defaults: o.config.annotations,
    log: o.log,
  });
}

/** The parts of the init process the controller uses (task/process/init.ts's InitProcess fits). */
export interface TriggerInit {
  readonly id: string;
  readonly namespace: string;
  readonly engine: Engine;
  readonly status: string;
  readonly record: ContainerRecord | undefined;
  checkpoint(leaveRunning: boolean): Promise<CheckpointResult>;
  pause(): Promise<void>;
  resume(): Promise<void>;
}

export function triggerTarget(o: { controller: TriggerController; init: TriggerInit; config: ThawConfig; store: SnapshotStore }): TriggerTarget {
  const { init, store } = o;
  return {
    exec: containerExecFor({ config: o.config, engine: init.engine, id: init.id, namespace: init.namespace, process: o.controller.process }),
    checkpoint: () => init.checkpoint(true),
    launched: () => {
      const r = init.record;
      if (!r) return undefined;
      const restored = r.decision === 'restore' && r.fallback === null && r.snapshot !== null;
      return { key: r.key, restored: restored ? { snapshot: r.snapshot!, restoreMs: r.timings.restore ?? null } : null };
    },
    running: () => init.status === 'running',
    paused: () => init.status === 'paused',
    pause: () => init.pause(),
    resume: () => init.resume(),
    snapshotState: async (key) => {
      // A snapshot dir whose manifest is damaged still blocks a new checkpoint of the key.
      const committed = await store.get(key).then(
        (s) => s !== undefined,
        () => true,
      );
      if (committed) return 'committed';
      return (await isLocked(store.lockPath(key))) ? 'in-progress' : 'none';
    },
  };
}
