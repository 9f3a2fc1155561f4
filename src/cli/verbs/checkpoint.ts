import type { GlobalOptions } from '../context.js';
import type { VerbResult } from '../output.js';
import { containerOf, runtimeFor } from './common.js';

export default async function checkpoint(args: Record<string, unknown>, global: GlobalOptions): Promise<VerbResult> {
  const { id, leaveRunning, namespace } = args as { id: string; leaveRunning: boolean; namespace?: string };
  const rt = await runtimeFor(global);
  const { record } = await containerOf(rt, id, namespace);
  const r = await rt.lifecycle.checkpoint(record.id, record.namespace, { leaveRunning });
  return {
    json: { id, snapshot: r.snapshot, bytes: r.bytes, timings: r.timings },
    text: `${id}: snapshot ${r.snapshot} (${r.bytes} bytes)`,
  };
}
