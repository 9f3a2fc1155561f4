import type { GlobalOptions } from '../context.js';
import type { VerbResult } from '../output.js';
import { runtimeFor } from './common.js';

export default async function ps(_args: Record<string, unknown>, global: GlobalOptions): Promise<VerbResult> {
  const rt = await runtimeFor(global);
  const rows = [];
  for (const r of await rt.records.list()) {
    const engine = rt.lifecycle.engineOf(r);
    const status = engine ? await engine.state(r.id).then((s) => s.status, () => 'gone') : 'unknown';
    rows.push({
      id: r.id,
      namespace: r.namespace,
      engine: r.engine,
      status,
      owner: r.owner,
      restore: { decision: r.decision, snapshot: r.snapshot, reason: r.reason, fallback: r.fallback },
      createdAt: r.createdAt,
    });
  }
  const text = rows
    .map((r) => `${r.namespace ? `${r.namespace}/` : ''}${r.id}  ${r.engine}  ${r.status}  ${r.restore.decision}  ${r.restore.reason}`)
    .join('\n');
  return { json: { containers: rows }, text: text || '(no containers)' };
}
