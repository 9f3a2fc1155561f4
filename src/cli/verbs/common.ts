import { constants } from 'node:os';
import { ShimError } from '../../errors.js';
import { openRuntime, type Runtime } from '../../engine/runtime.js';
import type { ContainerRecord } from '../../engine/records.js';
import type { Engine } from '../../engine/engine.js';
import { cliConfig, type GlobalOptions } from '../context.js';

export async function runtimeFor(global: GlobalOptions): Promise<Runtime> {
  const { config, log } = await cliConfig(global);
  return openRuntime(config, log);
}

/** The record and engine of a container the CLI or a shim started. */
export async function containerOf(rt: Runtime, id: string, namespace?: string): Promise<{ record: ContainerRecord; engine: Engine }> {
  const record = namespace === undefined ? await rt.records.find(id) : await rt.records.get(id, namespace);
  if (!record) throw new ShimError('NotFound', `container ${id} not found`);
  const engine = rt.lifecycle.engineOf(record);
  if (!engine) throw new ShimError('FailedPrecondition', `container ${id}: engine ${record.engine} is not available here`);
  return { record, engine };
}

/** Linux signal numbers (SIGRTMAX = 64); runsc would refuse others only after a lookup. */
const MAX_SIGNAL = 64;

/** `SIGUSR1`, `USR1`, `10` → 10. */
export function parseSignal(value: string | undefined, fallback = 'SIGTERM'): number {
  const v = (value ?? fallback).toUpperCase();
  if (/^\d+$/.test(v)) {
    const n = Number(v);
    if (n < 1 || n > MAX_SIGNAL) throw new ShimError('InvalidArgument', `unknown signal ${JSON.stringify(value)}: numbers are 1-${MAX_SIGNAL}`);
    return n;
  }
  const name = (v.startsWith('SIG') ? v : `SIG${v}`) as keyof typeof constants.signals;
  const n = constants.signals[name];
  if (n === undefined) throw new ShimError('InvalidArgument', `unknown signal ${JSON.stringify(value)}`);
  return n;
}
