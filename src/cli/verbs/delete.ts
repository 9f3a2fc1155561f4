import { isShimError } from '../../errors.js';
import type { GlobalOptions } from '../context.js';
import type { VerbResult } from '../output.js';
import { containerOf, runtimeFor } from './common.js';

export default async function del(args: Record<string, unknown>, global: GlobalOptions): Promise<VerbResult> {
  const a = args as { id: string; force: boolean; namespace?: string };
  const rt = await runtimeFor(global);
  const { record, engine } = await containerOf(rt, a.id, a.namespace);
  try {
    await engine.delete(record.id, { force: a.force });
  } catch (err) {
    // Already gone from the runtime: only the record is left to remove.
    if (!isShimError(err, 'NotFound')) throw err;
  }
  await rt.records.remove(record.id, record.namespace);
  return { json: { id: a.id, deleted: true }, text: '' };
}
