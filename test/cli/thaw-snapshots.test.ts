import { truncate, stat } from 'node:fs/promises';
import { join } from 'node:path';
import t from 'tap';
import { tryLock } from '../../src/snapshot/lock.js';
import { cliSandbox, flipByte } from '../helpers/fixture-store.js';
import { runThaw } from '../helpers/thaw-cli.js';
import { entries, treeFingerprint } from '../helpers/world.js';

/**
 * `thaw snapshots ls|inspect|verify|rm|gc` against a store holding snapshots committed by the real
 * SnapshotStore: JSON shapes, text output, exit codes, and that failures leave the store alone.
 */
t.test('ls, inspect and verify print one JSON object each', async (t) => {
  const sb = await cliSandbox(t);
  const a = await sb.snapshot(1);
  const b = await sb.snapshot(2, 64 << 10);

  const ls = await runThaw(sb, ['snapshots', 'ls']);
  t.equal(ls.exitCode, 0);
  t.equal(ls.stdout.trim().split('\n').length, 1, 'exactly one line of JSON');
  t.same(ls.json, {
    snapshots: [
      { key: a.key, bytes: a.manifest.totalBytes, engine: 'gvisor', createdAt: a.manifest.createdAt, restoreCount: 0, lastRestoredAt: null },
      { key: b.key, bytes: b.manifest.totalBytes, engine: 'gvisor', createdAt: b.manifest.createdAt, restoreCount: 0, lastRestoredAt: null },
    ],
  });
  const lsText = await runThaw(sb, ['snapshots', 'ls'], { json: false });
  t.match(lsText.stdout, new RegExp(`^${a.key}  gvisor  ${a.manifest.totalBytes}  restored 0×`, 'm'), 'text: one row per snapshot');

  const inspect = await runThaw(sb, ['snapshots', 'inspect', a.key]);
  t.equal(inspect.exitCode, 0);
  t.match(inspect.json, {
    key: a.key,
    dir: a.dir,
    engine: 'gvisor',
    totalBytes: a.manifest.totalBytes,
    restoreCount: 0,
    keyInputs: { process: { args: ['/app', '--replica-1'] } },
    files: [
      { path: 'image/checkpoint.img', bytes: 12, algo: 'xxh64' },
      { path: 'image/pages.img', bytes: 256 << 10, algo: 'xxh64' },
    ],
  });
  const lines = inspect.json?.keyInputLines as { input: string; value: string }[];
  t.ok(Array.isArray(lines) && lines.length > 0 && lines.every((l) => typeof l.input === 'string' && typeof l.value === 'string'), 'keyInputLines lists every input');
  t.ok(lines.some((l) => l.value.includes('--replica-1')), 'the process args are among the key inputs');
  const inspectText = await runThaw(sb, ['snapshots', 'inspect', a.key], { json: false });
  t.match(inspectText.stdout, `snapshot ${a.key}\n`);
  t.match(inspectText.stdout, /key inputs:\n/);

  const verify = await runThaw(sb, ['snapshots', 'verify', a.key]);
  t.equal(verify.exitCode, 0);
  t.match(verify.json, { key: a.key, files: 2, bytes: a.manifest.totalBytes, hashed: true, ok: true, durationMs: Number });
});

t.test('verify of a damaged snapshot exits 6 naming the file; nothing is changed', async (t) => {
  const sb = await cliSandbox(t);
  const s = await sb.snapshot(1);
  const pages = join(s.dir, 'image', 'pages.img');
  await flipByte(pages);
  const before = await treeFingerprint(sb.store);
  const r = await runThaw(sb, ['snapshots', 'verify', s.key]);
  t.equal(r.exitCode, 6, 'DataLoss → 6');
  t.equal(r.stderr.split('\n').length, 2, 'one line on stderr');
  t.match(r.stderr, /^thaw: snapshot [0-9a-f]{64} is damaged: image\/pages\.img xxh64 is [0-9a-f]{16}, manifest says [0-9a-f]{16}\n$/);
  t.match(r.json, { error: { code: 'DataLoss', message: /image\/pages\.img/ } });
  t.equal(await treeFingerprint(sb.store), before, 'verify changes nothing, not even a damaged snapshot');

  const size = (await stat(pages)).size;
  await truncate(pages, size - 4096);
  const cut = await runThaw(sb, ['snapshots', 'verify', s.key]);
  t.equal(cut.exitCode, 6);
  t.match(cut.stderr, `image/pages.img is ${size - 4096} bytes, manifest says ${size}`);
});

t.test('rm removes; rm of a missing or locked snapshot fails clearly', async (t) => {
  const sb = await cliSandbox(t);
  const a = await sb.snapshot(1);
  const b = await sb.snapshot(2);

  const locked = await tryLock(join(sb.store, 'locks', `${b.key}.lock`));
  t.ok(locked.acquired, 'this test holds b’s lock (a checkpoint in progress elsewhere)');
  const busy = await runThaw(sb, ['snapshots', 'rm', b.key]);
  t.equal(busy.exitCode, 5, 'FailedPrecondition → 5');
  t.match(busy.stderr, `thaw: snapshot ${b.key} is locked by pid ${process.pid}`);
  if (locked.acquired) await locked.lock.release();

  const rm = await runThaw(sb, ['snapshots', 'rm', a.key]);
  t.equal(rm.exitCode, 0);
  t.equal(rm.json?.removed, a.key);
  // Bytes on disk: the image files plus manifest.json (which ls's totalBytes leaves out).
  t.ok(Number(rm.json?.bytes) > a.manifest.totalBytes, `rm reports ${String(rm.json?.bytes)} bytes freed`);
  t.same(await entries(join(sb.store, 'snapshots')), [b.key], 'only b is left');
  t.same(await entries(join(sb.store, 'tmp')), [], 'the removal left nothing in tmp/');

  const again = await runThaw(sb, ['snapshots', 'rm', a.key]);
  t.equal(again.exitCode, 3, 'NotFound → 3');
  t.equal(again.stderr, `thaw: snapshot ${a.key} not found\n`);
  const inspect = await runThaw(sb, ['snapshots', 'inspect', a.key]);
  t.equal(inspect.exitCode, 3);
  t.equal(inspect.stderr, `thaw: snapshot ${a.key} not found\n`);
});

t.test('gc evicts the least recently restored first and reports what it removed', async (t) => {
  const sb = await cliSandbox(t);
  const a = await sb.snapshot(1);
  const b = await sb.snapshot(2);
  const c = await sb.snapshot(3);
  // a is the oldest but was restored last: b (then c) must go first.
  await (await sb.openStore()).recordRestore(a.key, { restore: 1 });
  const total = a.manifest.totalBytes + b.manifest.totalBytes + c.manifest.totalBytes;

  const none = await runThaw(sb, ['snapshots', 'gc', '--max-bytes', String(total)]);
  t.same(none.json, { removed: [], totalBytes: total, skippedLocked: [] }, 'nothing to do at the bound');

  const one = await runThaw(sb, ['snapshots', 'gc', '--max-bytes', String(total - 1)]);
  t.equal(one.exitCode, 0);
  t.same(one.json, {
    removed: [{ key: b.key, bytes: b.manifest.totalBytes, reason: 'least-recently-used' }],
    totalBytes: total - b.manifest.totalBytes,
    skippedLocked: [],
  });
  const two = await runThaw(sb, ['snapshots', 'gc', '--max-bytes', String(a.manifest.totalBytes)], { json: false });
  t.equal(two.stdout, `removed 1, store now ${a.manifest.totalBytes} bytes\n`);
  t.same(await entries(join(sb.store, 'snapshots')), [a.key], 'the recently restored snapshot survives');
});

t.test('gc --max-bytes takes digits only; a bad value touches nothing', async (t) => {
  const sb = await cliSandbox(t);
  await sb.snapshot(1);
  const before = await treeFingerprint(sb.store);
  for (const bad of ['', ' ', '1e3', '0x10', '-1', '1.5', '12abc', '99999999999999999999']) {
    const r = await runThaw(sb, ['snapshots', 'gc', '--max-bytes', bad]);
    t.equal(r.exitCode, 2, `${JSON.stringify(bad)} → exit 2`);
    t.equal(r.stderr, `thaw: --max-bytes must be a non-negative integer (got ${JSON.stringify(bad)})\n`);
  }
  t.equal(await treeFingerprint(sb.store), before, 'no snapshot was evicted');
});

t.test('a malformed key is InvalidArgument for every verb that takes one', async (t) => {
  const sb = await cliSandbox(t);
  for (const verb of ['inspect', 'verify', 'rm']) {
    for (const key of ['A'.repeat(64), '../x']) {
      const r = await runThaw(sb, ['snapshots', verb, key]);
      t.equal(r.exitCode, 2, `${verb} ${key} → 2`);
      t.equal(r.stderr, `thaw: invalid snapshot key ${JSON.stringify(key)}\n`);
    }
  }
});
