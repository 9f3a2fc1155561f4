import { ShimError } from '../../errors.js';
import { SnapshotStore } from '../../snapshot/store.js';
import { describeKeyInputs, isSnapshotKey } from '../../snapshot/key.js';
import { cliConfig, type GlobalOptions } from '../context.js';
import type { VerbResult } from '../output.js';

type Args = { op: 'ls' | 'inspect' | 'verify' | 'rm' | 'gc'; key?: string; maxBytes?: string };

/** `thaw snapshots …`: the store only; no runtime is touched. */
export default async function snapshots(args: Record<string, unknown>, global: GlobalOptions): Promise<VerbResult> {
  const a = args as Args;
  const { config, log } = await cliConfig(global);
  const store = await SnapshotStore.open({ root: config.store.path, log });
  const key = (): string => {
    if (!a.key || !isSnapshotKey(a.key)) throw new ShimError('InvalidArgument', `invalid snapshot key ${JSON.stringify(a.key)}`);
    return a.key;
  };
  switch (a.op) {
    case 'ls': {
      const list = await store.list();
      const rows = list.map((s) => ({
        key: s.key,
        bytes: s.manifest.totalBytes,
        engine: s.manifest.engine,
        createdAt: s.manifest.createdAt,
        restoreCount: s.manifest.restoreCount,
        lastRestoredAt: s.manifest.lastRestoredAt,
      }));
      const text = rows.map((r) => `${r.key}  ${r.engine}  ${r.bytes}  restored ${r.restoreCount}×  ${r.createdAt}`).join('\n');
      return { json: { snapshots: rows }, text: text || '(no snapshots)' };
    }
    case 'inspect': {
      const s = await store.get(key());
      if (!s) throw new ShimError('NotFound', `snapshot ${a.key} not found`);
      const inputs = describeKeyInputs(s.manifest.keyInputs);
      const text = [
        `snapshot ${s.key}`,
        `  dir ${s.dir}`,
        `  engine ${s.manifest.engine} ${s.manifest.runtimeVersion ?? ''} ${s.manifest.platform ?? ''}`,
        `  bytes ${s.manifest.totalBytes} in ${s.manifest.files.length} files`,
        `  created ${s.manifest.createdAt}, restored ${s.manifest.restoreCount}×`,
        '  key inputs:',
        ...inputs.map((l) => `    ${l.input} = ${l.value}`),
      ].join('\n');
      return { json: { ...s.manifest, dir: s.dir, keyInputLines: inputs }, text };
    }
    case 'verify': {
      const r = await store.verify(key());
      return { json: { ...r, ok: true }, text: `${r.key}: ok (${r.files} files, ${r.bytes} bytes)` };
    }
    case 'rm': {
      const r = await store.remove(key());
      return { json: { removed: r.key, bytes: r.bytes }, text: `removed ${r.key}` };
    }
    case 'gc': {
      // Digits only: Number() would read '' or ' ' as 0 (evicting everything) and accept 1e3 or 0x10.
      const maxBytes = /^\d+$/.test(a.maxBytes ?? '') ? Number(a.maxBytes) : NaN;
      if (!Number.isSafeInteger(maxBytes)) {
        throw new ShimError('InvalidArgument', `--max-bytes must be a non-negative integer (got ${JSON.stringify(a.maxBytes)})`);
      }
      const r = await store.gc({ maxBytes });
      return { json: { ...r }, text: `removed ${r.removed.length}, store now ${r.totalBytes} bytes` };
    }
  }
}
