import type { GlobalOptions } from '../context.js';
import type { VerbResult } from '../output.js';
import { containerOf, runtimeFor } from './common.js';

export default async function wait(args: Record<string, unknown>, global: GlobalOptions): Promise<VerbResult> {
  const a = args as { id: string; namespace?: string };
  const rt = await runtimeFor(global);
  const { engine } = await containerOf(rt, a.id, a.namespace);
  const r = await engine.wait(a.id);
  return { json: { id: a.id, exitStatus: r.exitStatus }, text: '', exitCode: r.exitStatus };
}
