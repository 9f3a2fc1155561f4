import { mkdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import t from 'tap';
import { buildBundle } from '../../src/bundle/bundle.js';
import { tryLock } from '../../src/snapshot/lock.js';
import { cliSandbox } from '../helpers/fixture-store.js';
import { runThaw } from '../helpers/thaw-cli.js';
import { entries, treeFingerprint } from '../helpers/world.js';

/**
 * Bad input and error classes through the real CLI, no runtime needed: each failure is one line on
 * stderr naming what was wrong, `{"error":{code,message}}` with --json, an exit code per class
 * (InvalidArgument 2, NotFound 3, AlreadyExists 4, FailedPrecondition 5, DataLoss 6), and the
 * store is left exactly as it was.
 */
const ONE_LINE = /^thaw: [^\n]+\n$/;

t.test('bad bundles and unsafe ids: exit code, one line naming the problem, store untouched', async (t) => {
  const sb = await cliSandbox(t);
  await sb.snapshot(1);
  const good = await buildBundle({ dir: join(sb.dir, 'good'), args: ['/bin/true'], busybox: false });
  const badJson = join(sb.dir, 'bad-json');
  await mkdir(join(badJson, 'rootfs'), { recursive: true });
  await writeFile(join(badJson, 'config.json'), '{"process": {"args": ["/x"]');
  const noArgs = join(sb.dir, 'no-args');
  await mkdir(join(noArgs, 'rootfs'), { recursive: true });
  await writeFile(join(noArgs, 'config.json'), JSON.stringify({ ociVersion: '1.0.2', process: { args: [], cwd: '/' }, root: { path: 'rootfs' } }));
  const noRootfs = await buildBundle({ dir: join(sb.dir, 'no-rootfs'), args: ['/bin/true'], busybox: false });
  await rm(join(noRootfs, 'rootfs'), { recursive: true });
  const missing = join(sb.dir, 'does-not-exist');

  const cases: { name: string; args: string[]; exit: number; code: string; stderr: RegExp }[] = [
    { name: 'missing bundle dir', args: ['--bundle', missing, '--id', 'c1'], exit: 3, code: 'NotFound', stderr: new RegExp(`bundle ${missing}: no config\\.json`) },
    { name: 'config.json not JSON', args: ['--bundle', badJson, '--id', 'c1'], exit: 2, code: 'InvalidArgument', stderr: /bad-json: config\.json is not valid JSON/ },
    { name: 'config.json without args', args: ['--bundle', noArgs, '--id', 'c1'], exit: 2, code: 'InvalidArgument', stderr: /no-args: config\.json process\.args must be a non-empty array/ },
    { name: 'rootfs missing', args: ['--bundle', noRootfs, '--id', 'c1'], exit: 2, code: 'InvalidArgument', stderr: /no-rootfs: root \S+\/no-rootfs\/rootfs is not a directory/ },
    { name: 'id ../x', args: ['--bundle', good, '--id', '../x'], exit: 2, code: 'InvalidArgument', stderr: /invalid container id "\.\.\/x"/ },
    { name: 'id a/b', args: ['--bundle', good, '--id', 'a/b'], exit: 2, code: 'InvalidArgument', stderr: /invalid container id "a\/b"/ },
    { name: 'id starting with -', args: ['--bundle', good, '--id=-rf'], exit: 2, code: 'InvalidArgument', stderr: /invalid container id "-rf"/ },
    { name: 'id with ..', args: ['--bundle', good, '--id', 'a..b'], exit: 2, code: 'InvalidArgument', stderr: /invalid container id "a\.\.b"/ },
    { name: 'id too long', args: ['--bundle', good, '--id', 'x'.repeat(129)], exit: 2, code: 'InvalidArgument', stderr: /invalid container id/ },
  ];
  const before = await treeFingerprint(sb.store);
  for (const c of cases) {
    const r = await runThaw(sb, ['run', ...c.args, '--detach', '--output', join(sb.dir, 'out.log')]);
    t.equal(r.exitCode, c.exit, `${c.name}: exit ${c.exit}`);
    t.match(r.stderr, ONE_LINE, `${c.name}: one line on stderr`);
    t.match(r.stderr, c.stderr, `${c.name}: names the problem`);
    t.same(Object.keys(r.json ?? {}), ['error'], `${c.name}: JSON is only the error`);
    t.match(r.json, { error: { code: c.code, message: String } });
  }
  t.equal(await treeFingerprint(sb.store), before, 'the store is untouched');
  t.same(await entries(join(sb.root, 'containers')), [], 'no container record was written');
});

t.test('verbs on an unknown container exit 3 naming it', async (t) => {
  const sb = await cliSandbox(t);
  await sb.snapshot(1);
  const before = await treeFingerprint(sb.store);
  for (const args of [['kill', 'ghost'], ['kill', 'ghost', 'SIGUSR1'], ['delete', 'ghost'], ['delete', '--force', 'ghost'], ['checkpoint', 'ghost'], ['wait', 'ghost']]) {
    const r = await runThaw(sb, args);
    t.equal(r.exitCode, 3, `${args.join(' ')} → 3`);
    t.equal(r.stderr, 'thaw: container ghost not found\n');
    t.same(r.json, { error: { code: 'NotFound', message: 'container ghost not found' } });
  }
  t.equal(await treeFingerprint(sb.store), before, 'the store is untouched');
});

t.test('checkpoint of a key that has a snapshot, or one being written, is AlreadyExists (exit 4)', async (t) => {
  const sb = await cliSandbox(t);
  const existing = await sb.snapshot(1);
  await sb.record('has-snapshot', 1);
  const before = await treeFingerprint(sb.store);
  const dup = await runThaw(sb, ['checkpoint', 'has-snapshot']);
  t.equal(dup.exitCode, 4);
  t.equal(dup.stderr, `thaw: snapshot ${existing.key} already exists\n`);
  t.match(dup.json, { error: { code: 'AlreadyExists' } });
  t.equal(await treeFingerprint(sb.store), before, 'the existing snapshot is untouched');

  const rec = await sb.record('in-progress', 2);
  const lock = await tryLock(join(sb.store, 'locks', `${rec.key}.lock`));
  t.ok(lock.acquired, 'this test plays the other checkpoint, holding the key lock');
  t.teardown(() => (lock.acquired ? lock.lock.release() : undefined));
  const busy = await runThaw(sb, ['checkpoint', '--leave-running', 'in-progress']);
  t.equal(busy.exitCode, 4);
  t.equal(busy.stderr, `thaw: a checkpoint of snapshot ${rec.key} is in progress by pid ${process.pid}\n`);
  t.same(await entries(join(sb.store, 'tmp')), [], 'the refused checkpoint left nothing in tmp/');
});

t.test('a checkpoint whose runtime call fails leaves no snapshot, tmp entry or lock', async (t) => {
  const sb = await cliSandbox(t);
  // A record whose container runsc has never seen (or no runsc at all): the checkpoint call fails.
  await sb.record('not-running', 3);
  const r = await runThaw(sb, ['checkpoint', 'not-running']);
  t.not(r.exitCode, 0);
  t.match(r.stderr, ONE_LINE);
  t.match(r.stderr, /runsc/, 'the error names the runtime');
  t.same(await entries(join(sb.store, 'snapshots')), []);
  t.same(await entries(join(sb.store, 'tmp')), []);
  t.same(await entries(join(sb.store, 'locks')), []);
});

t.test('usage errors exit non-zero with commander’s message', async (t) => {
  const sb = await cliSandbox(t);
  const cases: [string[], RegExp][] = [
    [['run', '--bundle', '/x'], /required option '--id <id>' not specified/],
    [['frobnicate'], /unknown command 'frobnicate'/],
    [['snapshots', 'gc'], /required option '--max-bytes <n>' not specified/],
    [['--engine', 'qemu', 'ps'], /argument 'qemu' is invalid/],
  ];
  for (const [args, msg] of cases) {
    const r = await runThaw(sb, args);
    t.not(r.exitCode, 0, `${args.join(' ')} fails`);
    t.match(r.stderr, msg);
  }
});

t.test('ps --json shows each container’s restore decision and reason', async (t) => {
  const sb = await cliSandbox(t);
  const key = (await sb.record('cold-one', 1)).key;
  await sb.record('restored-one', 2, { decision: 'restore', snapshot: key, reason: 'verified snapshot (123 bytes)' });
  await sb.record('fell-back', 3, { decision: 'cold', snapshot: key, reason: 'restore failed: boom', fallback: 'boom' });
  const r = await runThaw(sb, ['ps']);
  t.equal(r.exitCode, 0);
  const rows = (r.json?.containers ?? []) as Record<string, unknown>[];
  t.equal(rows.length, 3);
  const byId = Object.fromEntries(rows.map((row) => [row.id, row]));
  t.match(byId['cold-one'], { namespace: '', engine: 'gvisor', owner: 'cli', restore: { decision: 'cold', snapshot: null, reason: 'no snapshot for this key', fallback: null } });
  t.match(byId['restored-one'], { restore: { decision: 'restore', snapshot: key, reason: 'verified snapshot (123 bytes)', fallback: null } });
  t.match(byId['fell-back'], { restore: { decision: 'cold', reason: 'restore failed: boom', fallback: 'boom' } });
  for (const row of rows) t.equal(row.status, 'gone', `${String(row.id)}: no sandbox behind the record`);
  const text = await runThaw(sb, ['ps'], { json: false });
  t.match(text.stdout, /^restored-one {2}gvisor {2}gone {2}restore {2}verified snapshot \(123 bytes\)$/m);
});
