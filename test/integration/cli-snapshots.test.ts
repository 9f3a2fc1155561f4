import { readdir, stat, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import t from 'tap';
import { flipByte } from '../helpers/fixture-store.js';
import { ensureBuilt, lastJsonLine, spawnThaw } from '../helpers/thaw-cli.js';
import { childPids, isRunning, ticks, until, waitForLine } from '../helpers/wait.js';
import { entries, integrationSkip, thawWorld, type ThawWorld } from '../helpers/world.js';

/**
 * The snapshot store under the real CLI and runsc: damaged snapshots mean a cold start with the
 * reason, concurrent checkpoints of one key give one snapshot, kill -9 mid-checkpoint leaves
 * nothing visible, and gc evicts least recently restored first. Needs THAW_INTEGRATION=1 and root.
 */
const skip = await integrationSkip();

/** Cold-starts `bundle` as `id` (detached), waits for READY; returns the output file. */
async function coldStart(w: ThawWorld, bundle: string, id: string): Promise<string> {
  const out = w.out(id);
  const r = await w.thawOk(['run', '--bundle', bundle, '--id', id, '--detach', '--output', out]);
  if (r.decision !== 'cold') throw new Error(`${id}: expected a cold start, got ${JSON.stringify(r)}`);
  await waitForLine(out, /^READY /);
  return out;
}

/** Cold start, checkpoint (the source stops), delete: returns the snapshot key. */
async function snapshotOf(w: ThawWorld, bundle: string, id: string): Promise<{ key: string; bytes: number }> {
  const out = await coldStart(w, bundle, id);
  await waitForLine(out, /^TICK n=1 /);
  const c = await w.thawOk(['checkpoint', id]);
  await w.thawOk(['delete', '--force', id]);
  return { key: c.snapshot as string, bytes: c.bytes as number };
}

t.test('a corrupted or truncated snapshot gives a cold start with the reason; the container works', { skip }, async (t) => {
  const w = await thawWorld(t);
  const bundle = await w.bundle('app', { mib: 64, initMs: 100, tickMs: 100 });
  const { key } = await snapshotOf(w, bundle, 'src');
  const pages = join(w.store, 'snapshots', key, 'image', 'pages.img');

  const offset = await flipByte(pages);
  const verify = await w.thaw(['snapshots', 'verify', key]);
  t.equal(verify.exitCode, 6, 'verify fails with DataLoss');
  t.match(verify.stderr, new RegExp(`^thaw: snapshot ${key} is damaged: image/pages\\.img xxh64 is \\w+, manifest says \\w+\\n$`));

  const out = w.out('after-flip');
  const r = await w.thawOk(['run', '--bundle', bundle, '--id', 'after-flip', '--detach', '--output', out]);
  t.match(r, { decision: 'cold', snapshot: null, fallback: /image\/pages\.img: checksum \w+ does not match manifest \w+/ });
  t.match(r.reason, /^restore failed: snapshot file image\/pages\.img: checksum/, `reason: ${String(r.reason)}`);
  t.match(r.timings, { stage: Number, 'fallback-create': Number, 'fallback-start': Number }, 'caught while staging, before the app ran');
  await waitForLine(out, /^READY /);
  await w.thawOk(['kill', 'after-flip', 'SIGUSR1']);
  t.match((await waitForLine(out, /^VERIFY /)).line, /^VERIFY OK /, 'the cold-started container works');
  const ps = (await w.thawOk(['ps'])).containers as Record<string, unknown>[];
  t.match(ps, [{ id: 'after-flip', status: 'running', restore: { decision: 'cold', fallback: /checksum/ } }], 'ps shows why');
  await w.thawOk(['delete', '--force', 'after-flip']);

  // Control: with the byte put back the same snapshot restores, so the flip alone caused the fallback.
  await flipByte(pages, offset);
  const ok = await w.thawOk(['run', '--bundle', bundle, '--id', 'after-fix', '--detach', '--output', w.out('after-fix')]);
  t.match(ok, { decision: 'restore', snapshot: key }, 'the repaired snapshot restores');
  await waitForLine(w.out('after-fix'), /^TICK /);
  await w.thawOk(['delete', '--force', 'after-fix']);

  const size = (await stat(pages)).size;
  await truncate(pages, size - 4096);
  const cutOut = w.out('after-cut');
  const cut = await w.thawOk(['run', '--bundle', bundle, '--id', 'after-cut', '--detach', '--output', cutOut]);
  t.match(cut, {
    decision: 'cold',
    snapshot: null,
    fallback: null,
    reason: `snapshot ${key} unusable: snapshot ${key} is damaged: image/pages.img is ${size - 4096} bytes, manifest says ${size}`,
  });
  t.notOk('stage' in (cut.timings as object), 'caught at lookup by the size check, nothing staged');
  await waitForLine(cutOut, /^READY /);
  await waitForLine(cutOut, /^TICK /);
  const cutVerify = await w.thaw(['snapshots', 'verify', key]);
  t.equal(cutVerify.exitCode, 6);
  t.match(cutVerify.stderr, `image/pages.img is ${size - 4096} bytes, manifest says ${size}`);
  await w.thawOk(['delete', '--force', 'after-cut']);
});

t.test('two concurrent checkpoints of one key: one snapshot, AlreadyExists for the other, both keep running', { skip }, async (t) => {
  const w = await thawWorld(t);
  const bundle = await w.bundle('app', { mib: 128, initMs: 100, tickMs: 100 });
  const outs = [await coldStart(w, bundle, 'one'), await coldStart(w, bundle, 'two')];

  await ensureBuilt();
  const runs = await Promise.all(['one', 'two'].map((id) => spawnThaw(w, ['checkpoint', '--leave-running', id])));
  const codes = runs.map((r) => r.exitCode).sort();
  t.same(codes, [0, 4], `one succeeds, the other exits 4 (stderr: ${runs.map((r) => r.stderr.trim()).join(' / ')})`);
  const winner = runs.find((r) => r.exitCode === 0)!;
  const loser = runs.find((r) => r.exitCode !== 0)!;
  const key = lastJsonLine(winner.stdout)?.snapshot as string;
  t.match(key, /^[0-9a-f]{64}$/);
  t.match(loser.stderr, new RegExp(`^thaw: (a checkpoint of snapshot ${key} is in progress by pid \\d+|snapshot ${key} already exists)\\n$`));
  t.match(lastJsonLine(loser.stdout), { error: { code: 'AlreadyExists' } });

  const ls = (await w.thawOk(['snapshots', 'ls'])).snapshots as { key: string }[];
  t.same(ls.map((s) => s.key), [key], 'exactly one snapshot');
  t.same(await entries(join(w.store, 'tmp')), [], 'no leftovers');
  t.same(await entries(join(w.store, 'locks')), [], 'no lock left behind');
  await w.thawOk(['snapshots', 'verify', key]);

  for (const [i, out] of outs.entries()) {
    const last = (await ticks(out)).at(-1)!;
    await waitForLine(out, new RegExp(`^TICK n=${last + 2} `));
    t.pass(`container ${i + 1} keeps ticking after the checkpoints`);
  }
  const ps = (await w.thawOk(['ps'])).containers as { status: string }[];
  t.same(ps.map((c) => c.status), ['running', 'running']);
});

t.test('kill -9 of thaw checkpoint mid-way: no snapshot; the next command cleans tmp/ and the lock', { skip }, async (t) => {
  const w = await thawWorld(t);
  // Large enough that runsc's write plus hashing take well over a second.
  const bundle = await w.bundle('app', { mib: 256, initMs: 0, tickMs: 100 });
  const out = await coldStart(w, bundle, 'victim');
  await ensureBuilt();

  const ckpt = spawnThaw(w, ['checkpoint', '--leave-running', 'victim']);
  const tmp = join(w.store, 'tmp');
  await until('the checkpoint to begin writing into tmp/', async () => ((await entries(tmp)).length > 0 ? true : undefined), 60_000, 5);
  await sleep(300);
  const pid = ckpt.pid!;
  t.ok(await isRunning(pid), 'thaw checkpoint is still running 300 ms into the checkpoint (else use more memory)');
  const orphans = await childPids(pid);
  process.kill(pid, 'SIGKILL');
  const killed = await ckpt;
  t.equal(killed.signal, 'SIGKILL');

  t.same(await entries(join(w.store, 'snapshots')), [], 'no snapshot was committed');
  t.equal((await entries(tmp)).length, 1, 'the half-written checkpoint is left in tmp/');
  t.equal((await entries(join(w.store, 'locks'))).length, 1, 'and the dead process’s lock');

  const ls = await w.thawOk(['snapshots', 'ls']);
  t.same(ls, { snapshots: [] }, 'ls shows no snapshot');
  t.same(await entries(tmp), [], 'the next thaw command removed the tmp/ leftovers');
  t.same(await entries(join(w.store, 'locks')), [], 'and the stale lock');

  // runsc's own checkpoint process survives thaw's death; let it finish before going on.
  for (const p of orphans) await until(`orphaned runsc checkpoint ${p} to exit`, async () => ((await isRunning(p)) ? undefined : true), 120_000, 100);
  t.same(await readdir(tmp), [], 'the orphan did not recreate anything in tmp/');

  const last = (await ticks(out)).at(-1)!;
  await waitForLine(out, new RegExp(`^TICK n=${last + 1} `));
  const again = await w.thawOk(['checkpoint', '--leave-running', 'victim']);
  t.match(again.snapshot, /^[0-9a-f]{64}$/, 'the key is not blocked: a new checkpoint commits');
  await w.thawOk(['snapshots', 'verify', again.snapshot as string]);
  await w.thawOk(['delete', '--force', 'victim']);
});

t.test('gc keeps the store under --max-bytes, evicting the least recently restored first', { skip }, async (t) => {
  const w = await thawWorld(t);
  const snaps: { key: string; bytes: number }[] = [];
  const bundles: string[] = [];
  for (const seed of [1, 2, 3]) {
    const bundle = await w.bundle(`seed-${seed}`, { mib: 64, initMs: 0, tickMs: 100, seed });
    bundles.push(bundle);
    snaps.push(await snapshotOf(w, bundle, `s${seed}`));
  }
  const [s1, s2, s3] = snaps as [(typeof snaps)[0], (typeof snaps)[0], (typeof snaps)[0]];
  t.equal(new Set(snaps.map((s) => s.key)).size, 3, 'different args, different keys');

  // s1 is the oldest; restoring it makes it the most recently used.
  const r = await w.thawOk(['run', '--bundle', bundles[0]!, '--id', 'again', '--detach', '--output', w.out('again')]);
  t.match(r, { decision: 'restore', snapshot: s1.key });
  await waitForLine(w.out('again'), /^TICK /);
  await w.thawOk(['delete', '--force', 'again']);

  const total = s1.bytes + s2.bytes + s3.bytes;
  const gc1 = await w.thawOk(['snapshots', 'gc', '--max-bytes', String(total - 1)]);
  t.same(gc1, { removed: [{ key: s2.key, bytes: s2.bytes, reason: 'least-recently-used' }], totalBytes: s1.bytes + s3.bytes, skippedLocked: [] });
  const limit = s1.bytes + 4096;
  const gc2 = await w.thawOk(['snapshots', 'gc', '--max-bytes', String(limit)]);
  t.same((gc2.removed as { key: string }[]).map((e) => e.key), [s3.key], 'then the never-restored newer one');
  t.ok((gc2.totalBytes as number) <= limit, `store at ${String(gc2.totalBytes)} ≤ ${limit}`);
  const ls = (await w.thawOk(['snapshots', 'ls'])).snapshots as { key: string; bytes: number; restoreCount: number }[];
  t.match(ls, [{ key: s1.key, restoreCount: 1 }], 'the restored snapshot is kept');
  t.ok(ls.reduce((n, s) => n + s.bytes, 0) <= limit, 'ls agrees the store is under the bound');
  t.same(await entries(join(w.store, 'snapshots')), [s1.key], 'evicted directories are gone from disk');
  t.same(await entries(join(w.store, 'tmp')), [], 'and nothing lingers in tmp/');
});
