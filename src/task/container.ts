import { ShimError } from '../errors.js';
import type { InitProcess } from './process/init.js';
import type { ExecProcess } from './process/exec.js';
import type { Process } from './process/process.js';

/**
 * One container served by this shim: its init process, its exec'd processes, and what Create set
 * up for it (the mounted rootfs). Invariant: `execs` keys are unique exec ids, never ''.
 */
export class Container {
  readonly execs = new Map<string, ExecProcess>();

  constructor(
    readonly id: string,
    readonly namespace: string,
    readonly bundle: string,
    readonly init: InitProcess,
    /** Mount target to unmount at Delete; undefined when containerd passed no rootfs mounts. */
    readonly rootfsTarget: string | undefined,
  ) {}

  /** The process an RPC's exec_id names ('' = init). */
  process(execId: string): Process {
    if (execId === '') return this.init;
    const p = this.execs.get(execId);
    if (!p) throw new ShimError('NotFound', `process ${execId} does not exist in container ${this.id}`);
    return p;
  }

  exec(execId: string): ExecProcess {
    const p = this.execs.get(execId);
    if (!p) throw new ShimError('NotFound', `process ${execId} does not exist in container ${this.id}`);
    return p;
  }
}
