import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { cleanStaleLocks, isLocked, isOwnerAlive, ownStartTime, removeIfStale, tryLock } from '../../src/snapshot/lock.js';
import { deadPid, exited, firstLine, spawnFixture } from '../fixtures/snapshot/spawn.js';

async function tempDir(t: { teardown: (fn: () => Promise<void>) => void }): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'thaw-lock-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

t.test('one holder at a time, in one process', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'k.lock');
  const a = await tryLock(path);
  t.ok(a.acquired);
  if (!a.acquired) return;
  const owner = JSON.parse(await readFile(path, 'utf8'));
  t.match(owner, { pid: process.pid, startTime: await ownStartTime(), token: /^[0-9a-f]{24}$/ });
  t.not(owner.startTime, '', 'start time known on Linux');
  const b = await tryLock(path);
  t.notOk(b.acquired, 'second attempt fails while held');
  t.equal(b.acquired ? 0 : b.owner?.pid, process.pid, 'and names the holder');
  t.ok(await isLocked(path));
  await a.lock.release();
  await a.lock.release();
  t.notOk(await isLocked(path));
  t.same(await readdir(dir), [], 'no lock or temp file left');
  const c = await tryLock(path);
  t.ok(c.acquired, 'free again after release');
  if (c.acquired) await c.lock.release();
});

t.test('a release never removes a lock that is no longer ours', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'k.lock');
  const a = await tryLock(path);
  if (!a.acquired) return t.fail('not acquired');
  const foreign = { pid: process.pid, startTime: await ownStartTime(), token: 'f'.repeat(24), createdAt: '' };
  await writeFile(path, JSON.stringify(foreign)); // as if our lock had been broken and re-taken
  await a.lock.release();
  t.same(JSON.parse(await readFile(path, 'utf8')), foreign);
});

t.test('stale locks are broken: dead pid, reused pid, unreadable content', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'k.lock');
  const dead = deadPid();
  t.notOk(await isOwnerAlive({ pid: dead, startTime: '' }), 'an exited pid is dead');
  t.ok(await isOwnerAlive({ pid: process.pid, startTime: await ownStartTime() }));
  t.notOk(await isOwnerAlive({ pid: process.pid, startTime: '1' }), 'same pid, other start time: reused pid');
  t.notOk(await isOwnerAlive({ pid: 0, startTime: '' }));

  const stale = [
    { pid: dead, startTime: '', token: 'a'.repeat(24), createdAt: '' },
    { pid: process.pid, startTime: '1', token: 'b'.repeat(24), createdAt: '' },
  ];
  for (const owner of stale) {
    await writeFile(path, JSON.stringify(owner));
    t.notOk(await isLocked(path));
    const r = await tryLock(path);
    t.ok(r.acquired, `stale lock of pid ${owner.pid} (start ${owner.startTime || '?'}) is broken`);
    if (r.acquired) await r.lock.release();
  }
  await writeFile(path, '');
  const r = await tryLock(path);
  t.ok(r.acquired, 'an empty lock file is stale');
  if (r.acquired) await r.lock.release();
  t.same(await readdir(dir), []);
});

t.test('removeIfStale and cleanStaleLocks keep live locks', async (t) => {
  const dir = await tempDir(t);
  const live = await tryLock(join(dir, 'live.lock'));
  if (!live.acquired) return t.fail('not acquired');
  const dead = deadPid();
  await writeFile(join(dir, 'dead.lock'), JSON.stringify({ pid: dead, startTime: '', token: 'c'.repeat(24), createdAt: '' }));
  await writeFile(join(dir, `.dead.lock.${dead}.abcdef`), 'temp of a crashed tryLock');
  await writeFile(join(dir, `.x.lock.stale.${dead}.abcdef`), 'aside of a crashed break');
  await writeFile(join(dir, `.live.lock.${process.pid}.abcdef`), 'temp of a live tryLock');
  t.notOk(await removeIfStale(join(dir, 'live.lock')));
  const removed = await cleanStaleLocks(dir, await readdir(dir));
  t.same(removed.sort(), [`.dead.lock.${dead}.abcdef`, `.x.lock.stale.${dead}.abcdef`, 'dead.lock'].sort());
  t.same((await readdir(dir)).sort(), [`.live.lock.${process.pid}.abcdef`, 'live.lock'].sort());
  await live.lock.release();
});

t.test('a lock taken by a process that exits is removed by its exit hook', async (t) => {
  const dir = await tempDir(t);
  const path = join(dir, 'k.lock');
  const child = spawnFixture('lock-child.ts', [path]);
  t.teardown(() => void child.kill('SIGKILL'));
  t.same(await firstLine(child), { pid: child.pid, acquired: true });
  await exited(child);
  t.same(await readdir(dir), [], 'the exit hook removed the lock');
});
