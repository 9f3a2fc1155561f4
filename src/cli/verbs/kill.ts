import type { GlobalOptions } from '../context.js';
import type { VerbResult } from '../output.js';
import { containerOf, parseSignal, runtimeFor } from './common.js';

export default async function kill(args: Record<string, unknown>, global: GlobalOptions): Promise<VerbResult> {
  const a = args as { id: string; signal?: string; all: boolean; namespace?: string };
  const signal = parseSignal(a.signal);
  const rt = await runtimeFor(global);
  const { engine } = await containerOf(rt, a.id, a.namespace);
  await engine.kill(a.id, signal, a.all);
  return { json: { id: a.id, signal }, text: '' };
}
