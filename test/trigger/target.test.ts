import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import t from 'tap';
import { resolveConfig } from '../../src/config/config.js';
import type { ContainerRecord } from '../../src/engine/records.js';
import { SnapshotStore } from '../../src/snapshot/store.js';
import { tryLock } from '../../src/snapshot/lock.js';
import { prepareTrigger, triggerTarget, type TriggerInit } from '../../src/trigger/target.js';
import type { TriggerController } from '../../src/trigger/controller.js';

const KEY = 'b'.repeat(64);

t.test('launched(): restored only for a restore without fallback; snapshotState reads the store and its locks', async (t) => {
  const dir = t.testdir();
  const store = await SnapshotStore.open({ root: join(dir, 'store') });
  const config = resolveConfig({ stateDir: join(dir, 'state') });
  let record: ContainerRecord | undefined;
  const calls: string[] = [];
  const init = {
    id: 'c',
    namespace: 'n',
    engine: { name: 'native' } as unknown as TriggerInit['engine'],
    status: 'running',
    get record() {
      return record;
    },
    checkpoint: async (leaveRunning: boolean) => (calls.push(`checkpoint ${leaveRunning}`), { snapshot: KEY, bytes: 1, timings: {} }),
    pause: async () => void calls.push('pause'),
    resume: async () => void calls.push('resume'),
  };
  const target = triggerTarget({ controller: { process: {} } as TriggerController, init, config, store });
  t.equal(target.launched(), undefined, 'nothing before Start');
  const base = { key: KEY, snapshot: KEY, fallback: null, timings: { restore: 321 } } as unknown as ContainerRecord;
  record = { ...base, decision: 'restore' };
  t.same(target.launched(), { key: KEY, restored: { snapshot: KEY, restoreMs: 321 } });
  record = { ...base, decision: 'cold', snapshot: null };
  t.same(target.launched(), { key: KEY, restored: null });
  record = { ...base, decision: 'cold', fallback: 'restore failed: x' };
  t.same(target.launched(), { key: KEY, restored: null }, 'a cold fallback is not a restore');
  await target.checkpoint();
  t.same(calls, ['checkpoint true'], 'always leave-running');
  t.ok(target.running());
  t.notOk(target.paused());

  t.equal(await target.snapshotState(KEY), 'none');
  const lock = await tryLock(store.lockPath(KEY));
  t.ok(lock.acquired);
  t.equal(await target.snapshotState(KEY), 'in-progress', 'a held key lock');
  if (lock.acquired) await lock.lock.release();
  await mkdir(join(store.snapshotDir(KEY), 'image'), { recursive: true });
  await writeFile(join(store.snapshotDir(KEY), 'manifest.json'), '{broken');
  t.equal(await target.snapshotState(KEY), 'committed', 'a damaged snapshot still blocks the key');
});

t.test('prepareTrigger: the runtime config supplies thaw.dev/* defaults, the container annotation wins', async (t) => {
  const dir = t.testdir({ rootfs: {} });
  const writeSpec = (annotations: Record<string, string>) =>
    writeFile(join(dir, 'config.json'), JSON.stringify({ ociVersion: '1.0.2', process: { args: ['/app'], cwd: '/' }, root: { path: 'rootfs' }, annotations }));
  const log = pino({ level: 'silent' });
  const state = await mkdtemp(join(tmpdir(), 'thaw-t-')); // socket paths must stay under 108 bytes
  t.teardown(() => rm(state, { recursive: true, force: true }));
  const plain = resolveConfig({ stateDir: state });
  await writeSpec({});
  t.equal(await prepareTrigger({ bundle: dir, id: 'a', namespace: 'n', config: plain, log }), undefined, 'no annotation, no default: no trigger');

  const config = resolveConfig({ stateDir: state, annotations: { 'thaw.dev/checkpoint': 'after:1h' } });
  const c = await prepareTrigger({ bundle: dir, id: 'b', namespace: 'n', config, log });
  t.teardown(() => c?.dispose());
  t.match(c?.policy, { trigger: { kind: 'after', delayMs: 3_600_000 } }, 'the default trigger applies');
  await writeSpec({ 'thaw.dev/checkpoint': 'manual' });
  const d = await prepareTrigger({ bundle: dir, id: 'c', namespace: 'n', config, log });
  t.teardown(() => d?.dispose());
  t.match(d?.policy, { trigger: { kind: 'manual' } }, "the container's annotation wins");
});
