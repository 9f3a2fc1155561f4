import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, symlink, truncate, writeFile, open as openFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import t, { type Test } from 'tap';
import { SnapshotError } from '../../src/errors.js';
import { xxh64Hex } from '../../src/snapshot/hash.js';
import { computeKey } from '../../src/snapshot/key.js';
import { ownStartTime, tryLock } from '../../src/snapshot/lock.js';
import { SnapshotStore, type SnapshotInfo } from '../../src/snapshot/store.js';
import { fixtureKeyInputs } from '../fixtures/snapshot/inputs.js';
import { deadPid } from '../fixtures/snapshot/spawn.js';

async function openStore(t: Test): Promise<SnapshotStore> {
  const parent = await mkdtemp(join(tmpdir(), 'thaw-store-'));
  t.teardown(() => rm(parent, { recursive: true, force: true }));
  return SnapshotStore.open({ root: join(parent, 'store') });
}

/** Checkpoints fixture inputs n with the given image files (path under the pending dir → content). */
async function checkpoint(store: SnapshotStore, n: number, files: Record<string, Buffer | string>): Promise<SnapshotInfo> {
  const keyInputs = fixtureKeyInputs(n);
  await using pending = await store.begin(computeKey(keyInputs));
  for (const [rel, data] of Object.entries(files)) {
    await mkdir(join(pending.dir, rel, '..'), { recursive: true });
    await writeFile(join(pending.dir, rel), data);
  }
  return await pending.commit({ keyInputs, engine: 'gvisor', timings: { checkpoint: 12.5 } });
}

t.test('open creates the layout with mode 0700', async (t) => {
  const store = await openStore(t);
  for (const d of [store.root, store.snapshotsDir, store.tmpDir, store.locksDir]) {
    t.equal((await stat(d)).mode & 0o777, 0o700, d);
  }
  t.same(await store.list(), []);
  t.equal(await store.totalBytes(), 0);
  const again = await SnapshotStore.open({ root: store.root });
  t.same(await again.list(), [], 'opening an existing store works');
});

t.test('commit writes a complete, verifiable snapshot', async (t) => {
  const store = await openStore(t);
  const pages = randomBytes(3 << 20);
  const keyInputs = fixtureKeyInputs(0);
  const key = computeKey(keyInputs);
  t.equal(await store.get(key), undefined);
  const pending = await store.begin(key, { leaveRunning: true });
  t.equal(pending.imageDir, join(pending.dir, 'image'));
  t.ok(pending.dir.startsWith(store.tmpDir), 'written under tmp/');
  t.same(await readdir(pending.imageDir), [], 'image dir starts empty');
  await writeFile(join(pending.imageDir, 'pages.img'), pages);
  await writeFile(join(pending.imageDir, 'checkpoint.img'), 'kernel state');
  await mkdir(join(pending.dir, 'gpu'));
  await writeFile(join(pending.dir, 'gpu', 'record.json'), '{}');
  t.equal(await store.get(key), undefined, 'invisible until committed');
  const info = await pending.commit({
    keyInputs,
    engine: 'gvisor',
    timings: { checkpoint: 450 },
    gpu: { pids: [42], timings: { lock: 1 } },
    extra: { compression: 'none' },
  });
  t.equal(pending.state, 'committed');
  t.equal(info.dir, join(store.snapshotsDir, key));
  t.equal(info.imageDir, join(info.dir, 'image'));
  t.equal(info.totalBytes, pages.length + 12 + 2);
  const m = info.manifest;
  t.same(m.files, [
    { path: 'gpu/record.json', bytes: 2, hash: await xxh64Hex(Buffer.from('{}')), algo: 'xxh64' },
    { path: 'image/checkpoint.img', bytes: 12, hash: await xxh64Hex(Buffer.from('kernel state')), algo: 'xxh64' },
    { path: 'image/pages.img', bytes: pages.length, hash: await xxh64Hex(pages), algo: 'xxh64' },
  ]);
  t.match(m, {
    key,
    engine: 'gvisor',
    runtimeVersion: '0.0~20240729',
    platform: 'systrap',
    gpu: { pids: [42] },
    checkpoint: { timings: { checkpoint: 450 }, leaveRunning: true },
    restoreCount: 0,
    lastRestoredAt: null,
    extra: { compression: 'none' },
  });
  t.same(m.keyInputs, keyInputs);
  t.same((await store.get(key))?.manifest, m, 'get reads back the same manifest');
  t.same(await readdir(store.tmpDir), [], 'tmp/ is empty');
  t.same(await readdir(store.locksDir), [], 'lock released');
  t.same((await readdir(info.dir)).sort(), ['gpu', 'image', 'manifest.json']);
  t.same(await readFile(join(info.imageDir, 'pages.img')), pages);
  t.match(await store.verify(key), { key, files: 3, bytes: info.totalBytes, hashed: true });
  t.match(await store.verify(key, { quick: true }), { hashed: false });
  t.same((await store.list()).map((s) => s.key), [key]);
  t.equal(await store.totalBytes(), info.totalBytes);
  await t.rejects(pending.commit({ keyInputs, engine: 'gvisor' }), { code: 'FailedPrecondition' }, 'commit twice');
  await pending.abort(); // no-op once committed
  t.ok(await store.get(key), 'abort after commit keeps the snapshot');
  await t.rejects(store.begin(key), { name: 'SnapshotError', code: 'AlreadyExists', message: /already exists/ }, 'one snapshot per key');
});

t.test('verify names the damaged file', async (t) => {
  const store = await openStore(t);
  const info = await checkpoint(store, 0, { 'image/pages.img': randomBytes(1 << 20), 'image/checkpoint.img': 'state' });
  const pages = join(info.imageDir, 'pages.img');
  const key = info.key;

  // Flip one byte: same size, so only a full verify sees it.
  const fh = await openFile(pages, 'r+');
  const b = Buffer.alloc(1);
  await fh.read(b, 0, 1, 777);
  b[0] = b[0]! ^ 0xff;
  await fh.write(b, 0, 1, 777);
  await fh.close();
  await store.verify(key, { quick: true });
  const err = await store.verify(key).then(
    () => undefined,
    (e: unknown) => e,
  );
  t.ok(err instanceof SnapshotError, 'flipped byte detected');
  t.match(err, { code: 'DataLoss', key, path: pages, message: /image\/pages\.img xxh64 is [0-9a-f]{16}, manifest says [0-9a-f]{16}/ });

  await truncate(pages, 1000);
  await t.rejects(store.verify(key, { quick: true }), { code: 'DataLoss', path: pages, message: /image\/pages\.img is 1000 bytes, manifest says 1048576/ }, 'truncation (quick)');
  await t.rejects(store.verify(key), { code: 'DataLoss', message: /pages\.img is 1000 bytes/ }, 'truncation (full)');

  await rm(pages);
  await writeFile(join(info.imageDir, 'stray.img'), 'x');
  await t.rejects(store.verify(key, { quick: true }), {
    code: 'DataLoss',
    message: /image\/pages\.img is missing; image\/stray\.img is not in the manifest/,
  });
  await t.rejects(store.verify('f'.repeat(64)), { code: 'NotFound' });
  await t.rejects(store.verify('../etc'), { code: 'InvalidArgument' });
});

t.test('begin holds the key: a second checkpoint of the key fails until the first ends', async (t) => {
  const store = await openStore(t);
  const keyInputs = fixtureKeyInputs(0);
  const key = computeKey(keyInputs);
  const first = await store.begin(key);
  await t.rejects(store.begin(key), { code: 'AlreadyExists', message: new RegExp(`in progress by pid ${process.pid}`) });
  t.ok(await store.isLocked(key));
  await writeFile(join(first.imageDir, 'x'), 'partial');
  await first.abort();
  t.same(await readdir(store.tmpDir), [], 'abort removes the partial image');
  t.notOk(await store.isLocked(key), 'and releases the lock');
  const second = await store.begin(key);
  await second.commit({ keyInputs, engine: 'gvisor' });
  t.ok(await store.get(key));
});

t.test('await using aborts unless committed', async (t) => {
  const store = await openStore(t);
  const keyInputs = fixtureKeyInputs(0);
  const key = computeKey(keyInputs);
  await t.rejects(
    (async () => {
      await using pending = await store.begin(key);
      await writeFile(join(pending.imageDir, 'pages.img'), 'half');
      throw new Error('checkpoint failed');
    })(),
    /checkpoint failed/,
  );
  t.same(await readdir(store.tmpDir), []);
  t.same(await readdir(store.locksDir), []);
  t.equal(await store.get(key), undefined);

  // A commit that fails leaves the pending snapshot open; disposal then aborts it.
  await t.rejects(
    (async () => {
      await using pending = await store.begin(key);
      await pending.commit({ keyInputs: fixtureKeyInputs(1), engine: 'gvisor' });
    })(),
    { code: 'InvalidArgument', message: /keyInputs hash to/ },
  );
  await t.rejects(
    (async () => {
      await using pending = await store.begin(key);
      await symlink('/etc/passwd', join(pending.imageDir, 'link'));
      await pending.commit({ keyInputs, engine: 'gvisor' });
    })(),
    { code: 'FailedPrecondition', message: /image\/link is not a regular file/ },
  );
  await t.rejects(
    (async () => {
      await using pending = await store.begin(key);
      await writeFile(join(pending.dir, 'manifest.json'), '{}');
      await pending.commit({ keyInputs, engine: 'gvisor' });
    })(),
    { code: 'InvalidArgument', message: /manifest\.json is reserved/ },
  );
  t.same(await readdir(store.tmpDir), []);
  t.same(await readdir(store.locksDir), []);
  t.same(await store.list(), []);
});

t.test('disposal waits for a commit still running (return without await inside await using)', async (t) => {
  const store = await openStore(t);
  const keyInputs = fixtureKeyInputs(0);
  const commitUnawaited = async (): Promise<SnapshotInfo> => {
    await using pending = await store.begin(computeKey(keyInputs));
    await writeFile(join(pending.imageDir, 'pages.img'), randomBytes(1 << 20));
    return pending.commit({ keyInputs, engine: 'gvisor' });
  };
  const info = await commitUnawaited();
  await store.verify(info.key);
  t.same(await readdir(store.tmpDir), []);
});

t.test('recordRestore counts restores atomically', async (t) => {
  const store = await openStore(t);
  const info = await checkpoint(store, 0, { 'image/pages.img': 'p' });
  const before = Date.now();
  const m = await store.recordRestore(info.key, { restore: 700, stage: 120 });
  t.equal(m.restoreCount, 1);
  t.ok(Date.parse(m.lastRestoredAt ?? '') >= before - 1000);
  t.same(m.lastRestoreTimings, { restore: 700, stage: 120 });
  t.same((await store.get(info.key))?.manifest, m, 'persisted');
  await Promise.all(Array.from({ length: 5 }, () => store.recordRestore(info.key, { restore: 1 })));
  t.equal((await store.get(info.key))?.manifest.restoreCount, 6, 'concurrent updates are serialised, none lost');
  t.same((await store.get(info.key))?.manifest.files, info.manifest.files, 'files untouched');
  await store.verify(info.key);
  t.same(await readdir(store.tmpDir), [], 'no temp manifest left');
  t.same(await readdir(store.locksDir), []);
  await t.rejects(store.recordRestore('e'.repeat(64), {}), { code: 'NotFound' });
});

t.test('gc evicts least recently used first, never a locked one, until the bound holds', async (t) => {
  const store = await openStore(t);
  const snap: SnapshotInfo[] = [];
  for (const [n, size] of [[0, 100], [1, 200], [2, 300], [3, 400]] as const) {
    snap.push(await checkpoint(store, n, { 'image/pages.img': Buffer.alloc(size, n) }));
    await sleep(5); // distinct createdAt
  }
  const [a, b, c, d] = snap as [SnapshotInfo, SnapshotInfo, SnapshotInfo, SnapshotInfo];
  await store.recordRestore(a.key, {});
  await sleep(5);
  await store.recordRestore(c.key, {});
  t.equal(await store.totalBytes(), 1000);
  // Last used: b (created), d (created), a (restored), c (restored most recently).
  t.same(await store.gc({ maxBytes: 1000 }), { removed: [], totalBytes: 1000, skippedLocked: [] }, 'within bound: nothing');
  const first = await store.gc({ maxBytes: 500 });
  t.same(first.removed.map((r) => r.key), [b.key, d.key]);
  t.same(first.removed.map((r) => r.bytes), [200, 400]);
  t.equal(first.totalBytes, 400);
  t.same((await store.list()).map((s) => s.key), [a.key, c.key]);

  const held = await tryLock(store.lockPath(a.key));
  if (!held.acquired) return t.fail('lock');
  const second = await store.gc({ maxBytes: 0 });
  t.same(second.removed.map((r) => r.key), [c.key], 'the locked one is skipped');
  t.same(second.skippedLocked, [a.key]);
  t.equal(second.totalBytes, 100, 'bound not reachable while locked');
  t.ok(await store.get(a.key));
  await t.rejects(store.remove(a.key), { code: 'FailedPrecondition', message: /is locked by pid/ });
  await held.lock.release();
  t.same((await store.gc({ maxBytes: 0 })).removed.map((r) => r.key), [a.key]);
  t.same(await store.list(), []);
  t.same(await readdir(store.tmpDir), []);
});

t.test('broken snapshots are listed apart and evicted first', async (t) => {
  const store = await openStore(t);
  const good = await checkpoint(store, 0, { 'image/pages.img': Buffer.alloc(100) });
  const bad = await checkpoint(store, 1, { 'image/pages.img': Buffer.alloc(50) });
  await writeFile(join(bad.dir, 'manifest.json'), '{"schemaVersion": 1}');
  await t.rejects(store.get(bad.key), { code: 'DataLoss', key: bad.key });
  t.same((await store.list()).map((s) => s.key), [good.key]);
  const broken = await store.broken();
  t.match(broken, [{ key: bad.key, problem: /key is missing/ }]);
  t.equal(broken[0]?.bytes, 50 + '{"schemaVersion": 1}'.length);
  await mkdir(join(store.snapshotsDir, 'not-a-key'));
  t.same((await store.list()).length, 1, 'foreign entries are ignored');
  const r = await store.gc({ maxBytes: 100 });
  t.same(r.removed, [{ key: bad.key, bytes: 50 + 20, reason: 'broken' }]);
  t.equal(r.totalBytes, 100);
  t.same(await store.broken(), []);
});

t.test('remove', async (t) => {
  const store = await openStore(t);
  const info = await checkpoint(store, 0, { 'image/pages.img': Buffer.alloc(10) });
  const manifestBytes = (await stat(join(info.dir, 'manifest.json'))).size;
  t.same(await store.remove(info.key), { key: info.key, bytes: 10 + manifestBytes });
  t.equal(await store.get(info.key), undefined);
  await t.rejects(store.remove(info.key), { code: 'NotFound' });
  await t.rejects(store.remove('../../etc'), { code: 'InvalidArgument' });
  t.same(await readdir(store.tmpDir), []);
  t.same(await readdir(store.locksDir), []);
  // The key is free again.
  await checkpoint(store, 0, { 'image/pages.img': 'again' });
});

t.test("open removes dead processes' leftovers and keeps live ones", async (t) => {
  const store = await openStore(t);
  const dead = deadPid();
  const mine = `${process.pid}-${await ownStartTime()}-abcdef`;
  await mkdir(join(store.tmpDir, `${dead}-1-abcdef`, 'image'), { recursive: true });
  await writeFile(join(store.tmpDir, `${dead}-1-abcdef`, 'image', 'pages.img'), 'partial');
  await mkdir(join(store.tmpDir, 'garbage'));
  await mkdir(join(store.tmpDir, mine));
  await writeFile(join(store.locksDir, `${'d'.repeat(64)}.lock`), JSON.stringify({ pid: dead, startTime: '', token: 'x', createdAt: '' }));
  const live = await tryLock(store.lockPath('e'.repeat(64)));
  await SnapshotStore.open({ root: store.root });
  t.same(await readdir(store.tmpDir), [mine], "a live process's checkpoint is left alone");
  t.same(await readdir(store.locksDir), [`${'e'.repeat(64)}.lock`]);
  if (live.acquired) await live.lock.release();
});
