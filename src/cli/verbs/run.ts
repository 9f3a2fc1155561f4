import { open } from 'node:fs/promises';
import { resolve } from 'node:path';
import type { StdioSlot } from '../../engine/engine.js';
import type { GlobalOptions } from '../context.js';
import type { VerbResult } from '../output.js';
import { runtimeFor } from './common.js';

interface RunArgs {
  bundle: string;
  id: string;
  detach: boolean;
  output?: string;
  cold: boolean;
}

export default async function run(args: Record<string, unknown>, global: GlobalOptions): Promise<VerbResult> {
  const a = args as unknown as RunArgs;
  const rt = await runtimeFor(global);
  // O_APPEND: a restored app resumes writing at its pre-checkpoint offset otherwise (runsc).
  const output = a.output ? await open(resolve(a.output), 'a') : undefined;
  const devnull = a.detach && !output ? await open('/dev/null', 'a') : undefined;
  const out: StdioSlot = output?.fd ?? devnull?.fd ?? 1;
  const err: StdioSlot = output?.fd ?? devnull?.fd ?? 2;
  try {
    const started = await rt.lifecycle.run({
      id: a.id,
      namespace: '',
      bundle: resolve(a.bundle),
      stdio: ['ignore', out, err],
      owner: 'cli',
      cold: a.cold,
    });
    const { record } = started;
    const json: Record<string, unknown> = {
      id: record.id,
      decision: record.decision,
      snapshot: record.decision === 'restore' ? record.snapshot : null,
      reason: record.reason,
      fallback: record.fallback,
      engine: record.engine,
      pid: record.pid,
      timings: record.timings,
    };
    const text = `${record.id}: ${record.decision} (${record.reason})`;
    if (a.detach) return { json, text };
    const engine = rt.lifecycle.engineOf(record)!;
    const exit = await engine.wait(record.id);
    return { json: { ...json, exitStatus: exit.exitStatus }, text: '', exitCode: exit.exitStatus };
  } finally {
    await output?.close();
    await devnull?.close();
  }
}
