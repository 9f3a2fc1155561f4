import { mkdtemp, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { computeKey } from '../../src/snapshot/key.js';
import { SnapshotStore } from '../../src/snapshot/store.js';
import { fixtureKeyInputs } from '../fixtures/snapshot/inputs.js';
import { exited, firstLine, spawnFixture } from '../fixtures/snapshot/spawn.js';

/** Cross-process behaviour with real child processes (test/fixtures/snapshot/checkpoint-child.ts). */

const key = computeKey(fixtureKeyInputs(0));

t.test('two processes checkpoint one key at once: exactly one snapshot', async (t) => {
  const root = join(await mkdtemp(join(tmpdir(), 'thaw-store-')), 'store');
  t.teardown(() => rm(join(root, '..'), { recursive: true, force: true }));
  await SnapshotStore.open({ root });
  // Both children sleep until the same moment, then begin; the winner holds the lock 400 ms.
  const startAt = String(Date.now() + 4000);
  const children = [spawnFixture('checkpoint-child.ts', [root, 'commit', startAt]), spawnFixture('checkpoint-child.ts', [root, 'commit', startAt])];
  t.teardown(() => children.forEach((c) => c.kill('SIGKILL')));
  const reports = await Promise.all(children.map(firstLine));
  const exits = await Promise.all(children.map(exited));
  t.same(exits, [{ code: 0, signal: null }, { code: 0, signal: null }]);
  t.comment(JSON.stringify(reports));
  const results = reports.map((r) => r.result).sort();
  t.same(results, ['already-exists', 'committed'], JSON.stringify(reports));
  const loser = reports.find((r) => r.result === 'already-exists');
  t.match(String(loser?.message), /in progress by pid \d+|already exists/);

  const store = await SnapshotStore.open({ root });
  t.same((await store.list()).map((s) => s.key), [key]);
  await store.verify(key);
  t.same(await readdir(store.tmpDir), []);
  t.same(await readdir(store.locksDir), []);
});

t.test('a checkpoint killed with SIGKILL mid-write leaves nothing visible', async (t) => {
  const root = join(await mkdtemp(join(tmpdir(), 'thaw-store-')), 'store');
  t.teardown(() => rm(join(root, '..'), { recursive: true, force: true }));
  const child = spawnFixture('checkpoint-child.ts', [root, 'hang']);
  t.teardown(() => void child.kill('SIGKILL'));
  const begun = await firstLine(child);
  t.match(begun, { result: 'begun', key, pid: child.pid });
  const pendingDir = String(begun.dir);
  t.equal((await stat(join(pendingDir, 'image', 'pages.img'))).size, 1 << 20, 'the child wrote part of an image');

  // While the child lives, another process's open() must not touch its checkpoint.
  const live = await SnapshotStore.open({ root });
  t.same(await readdir(live.tmpDir), [pendingDir.split('/').pop()]);
  t.same(await readdir(live.locksDir), [`${key}.lock`]);
  await t.rejects(live.begin(key), { code: 'AlreadyExists', message: new RegExp(`in progress by pid ${child.pid}`) });
  t.same(await live.list(), [], 'an in-progress checkpoint is invisible');

  child.kill('SIGKILL');
  t.same(await exited(child), { code: null, signal: 'SIGKILL' });
  t.same(await readdir(live.tmpDir), [pendingDir.split('/').pop()], 'the leftovers are there until someone opens the store');

  const store = await SnapshotStore.open({ root });
  t.same(await store.list(), []);
  t.same(await store.broken(), []);
  t.same(await readdir(store.tmpDir), [], 'tmp/ cleaned');
  t.same(await readdir(store.locksDir), [], 'stale lock removed');
  await using again = await store.begin(key);
  t.ok(again.dir, 'the key can be checkpointed again');
});
