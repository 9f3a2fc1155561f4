/**
 * Snapshot and restore through containerd with thaw's shim and real runsc: a running task is
 * checkpointed — by the operator's `thaw checkpoint ID`, or by `ctr task checkpoint ID` (containerd
 * then stores a checkpoint image; thaw's store commits too) — and a second `ctr run` of the same
 * image and command restores it: the demo app's tick count carries on instead of starting over,
 * SIGUSR1 verifies its memory (VERIFY OK) and `thaw ps` shows decision "restore". A snapshot
 * whose bytes were damaged makes the next run cold-start, with the reason in `thaw ps`.
 * Runs against containerd 1.6 and, when scripts/setup.sh unpacked them, 1.7 and 2.x.
 * Gated by THAW_INTEGRATION=1; needs root, containerd, ctr, runsc, busybox-static, gcc.
 */
import { open, readdir, stat } from 'node:fs/promises';
import path from 'node:path';
import t, { type Test } from 'tap';
import {
  ContainerdHarness,
  containerdVersions,
  integrationSkipReason,
  readLines,
  runCommand,
  until,
  type ContainerdVersion,
} from '../helpers/containerd.js';
import { buildDemoImage, imageToolsMissing, ticksOf } from '../helpers/oci-image.js';

const IMAGE = 'localhost/thaw-it-restore:1';
/** Each flow uses its own seed: a different command line is a different snapshot key. */
const app = (seed: number): string[] => ['/app', '--init-ms', '0', '--mib', '16', '--tick-ms', '100', '--seed', String(seed)];
const CRIU_TAR = 'application/vnd.containerd.container.criu.checkpoint.criu.tar';

const skip = integrationSkipReason() ?? imageToolsMissing({ demoApp: true });

for (const version of containerdVersions()) {
  t.test(`checkpoint and restore under containerd ${version.name}`, { skip: skip ?? version.skip ?? false }, (t) => restoreFlows(t, version));
}

interface PsRow {
  id: string;
  namespace: string;
  status: string;
  restore: { decision: 'cold' | 'restore'; snapshot: string | null; reason: string; fallback: string | null };
}

async function restoreFlows(t: Test, version: ContainerdVersion): Promise<void> {
  const h = await ContainerdHarness.start(t.teardown.bind(t), { ...version.options, prefix: 'thaw-restore-' });
  const image = await buildDemoImage({ dir: path.join(h.dir, 'image'), name: IMAGE });
  await h.importImage(image.tar);

  const thawJson = async <T>(args: string[]): Promise<T> => {
    const r = await h.thaw(['--json', ...args]);
    if (r.code !== 0) throw new Error(`thaw ${args.join(' ')} failed (${r.code}): ${r.out}${r.err}`);
    return JSON.parse(r.out) as T;
  };
  const psRow = async (id: string): Promise<PsRow | undefined> =>
    (await thawJson<{ containers: PsRow[] }>(['ps'])).containers.find((c) => c.id === id && c.namespace === 'default');
  const snapshots = async (): Promise<string[]> => (await readdir(path.join(h.thawStore, 'snapshots')).catch(() => [])).sort();

  /** Starts a detached task and waits for `ticks` ticks; returns its log file. */
  const start = async (id: string, seed: number, ticks = 3): Promise<string> => {
    const log = path.join(h.dir, `${id}.log`);
    const r = await h.runThaw({ id, image: IMAGE, args: app(seed), logFile: log });
    if (r.code !== 0) throw new Error(`ctr run ${id} failed: ${r.err}`);
    await until(async () => ticksOf(await readLines(log)).length >= ticks, 30_000, `${id} to tick`);
    return log;
  };
  const remove = async (id: string): Promise<void> => {
    if ((await h.taskStatus(id)) !== undefined) {
      await h.ctr(['tasks', 'kill', '-s', 'SIGKILL', id]);
      await h.waitForTaskStatus(id, 'STOPPED', 20_000).catch(() => undefined);
      await h.ctr(['tasks', 'rm', '-f', id]);
    }
    const r = await h.ctr(['containers', 'rm', id]);
    if (r.code !== 0) throw new Error(`ctr containers rm ${id}: ${r.err}`);
  };
  /** The restored copy: no START line, ticks carry on from `after`, memory verifies. */
  const expectRestored = async (t: Test, id: string, log: string, after: number, snapshot: string): Promise<void> => {
    const lines = await readLines(log);
    t.notOk(lines.some((l) => l.startsWith('START')), 'no START line: the app was not started again');
    const ticks = ticksOf(lines);
    t.ok((ticks[0] ?? 0) > 1, `the tick count carries on (first tick after restore: ${ticks[0]}, checkpointed after ${after})`);
    t.ok((ticks[0] ?? 0) <= after + 2, 'no ticks lost beyond the checkpoint');
    t.same(ticks, ticks.map((_, i) => (ticks[0] ?? 0) + i), 'consecutive ticks');
    const k = await h.ctr(['tasks', 'kill', '-s', 'SIGUSR1', id]);
    t.equal(k.code, 0, k.err);
    await until(async () => (await readLines(log)).some((l) => l.startsWith('VERIFY')), 15_000, 'VERIFY line');
    t.match((await readLines(log)).find((l) => l.startsWith('VERIFY')), /^VERIFY OK .* bad=0$/, "the restored app's 16 MiB are intact");
    const row = await psRow(id);
    t.match(row, { status: 'running', restore: { decision: 'restore', snapshot, fallback: null } }, 'thaw ps shows the restore');
  };

  await t.test('thaw checkpoint ID, then a second ctr run restores', async (t) => {
    const log = await start('rs-thaw-1', 11, 5);
    const before = await snapshots();
    const ck = await thawJson<{ snapshot: string; bytes: number }>(['checkpoint', '--namespace', 'default', 'rs-thaw-1']);
    t.match(ck.snapshot, /^[0-9a-f]{64}$/, 'snapshot key');
    t.ok(ck.bytes > 16 << 20, `the image holds the app's memory (${ck.bytes} bytes)`);
    t.same(await snapshots(), [...before, ck.snapshot].sort(), 'committed to the store');
    await h.waitForTaskStatus('rs-thaw-1', 'STOPPED', 20_000);
    const last = ticksOf(await readLines(log)).at(-1) ?? 0;
    await remove('rs-thaw-1');

    // The key's rootfs fingerprint of rs-thaw-1 (overlay of the image's layers) was kept, and
    // rs-thaw-2's restore found the snapshot with it: the cached fingerprint is the walked one.
    const fingerprints = await readdir(path.join(h.thawState, 'cache', 'rootfs')).catch(() => []);
    t.ok(fingerprints.length > 0, `rootfs fingerprint cached (${fingerprints.join(' ')})`);
    const log2 = await start('rs-thaw-2', 11, 3);
    await expectRestored(t, 'rs-thaw-2', log2, last, ck.snapshot);
    await remove('rs-thaw-2');
  });

  await t.test('ctr task checkpoint: a containerd checkpoint image, a snapshot in thaw store, then a restore', async (t) => {
    const log = await start('rs-ctr-1', 22, 5);
    const before = await snapshots();
    const ck = await h.ctr(['tasks', 'checkpoint', 'rs-ctr-1'], { timeoutMs: 120_000 });
    t.equal(ck.code, 0, `ctr tasks checkpoint: ${ck.err}`);
    const name = ck.out.trim();
    t.match(name, /^containerd\.io\/checkpoint\/rs-ctr-1:/, `checkpoint image ${name}`);
    const after = await snapshots();
    t.equal(after.length, before.length + 1, "thaw's store committed the snapshot too");
    const snapshot = after.find((s) => !before.includes(s)) ?? '';

    // containerd keeps the image it got from Task.Checkpoint: an index naming the runsc image tar.
    const images = await h.ctr(['images', 'ls']);
    const line = images.out.split('\n').find((l) => l.startsWith(`${name} `)) ?? '';
    t.match(line, /containerd\.io\/checkpoint=true/, 'labelled as a checkpoint');
    const digest = /sha256:[0-9a-f]{64}/.exec(line)?.[0] ?? '';
    const index = JSON.parse((await h.ctr(['content', 'get', digest])).out) as { manifests: { mediaType: string; digest: string }[] };
    const tarDesc = index.manifests.find((m) => m.mediaType === CRIU_TAR);
    t.ok(tarDesc, `the index holds the checkpoint tar (${CRIU_TAR})`);
    const tarPath = path.join(h.dir, 'ctr-checkpoint.tar');
    const got = await runCommand('sh', ['-c', 'exec "$0" --address "$1" content get "$2" > "$3"', h.ctrBin, h.grpc, tarDesc?.digest ?? '', tarPath]);
    t.equal(got.code, 0, got.err);
    const listing = await runCommand('tar', ['-tf', tarPath]);
    t.match(listing.out, /checkpoint\.img/, `runsc's image files are in it: ${listing.out.trim().split('\n').join(' ')}`);

    // Task.Checkpoint without options leaves the task running.
    const n = ticksOf(await readLines(log)).length;
    await until(async () => ticksOf(await readLines(log)).length > n + 2, 15_000, 'ticks after the checkpoint');
    t.equal(await h.taskStatus('rs-ctr-1'), 'RUNNING', 'the source keeps running');
    const last = ticksOf(await readLines(log)).at(-1) ?? 0;
    await remove('rs-ctr-1');

    const log2 = await start('rs-ctr-2', 22, 3);
    // The checkpoint was taken while the source kept ticking, so the copy resumes at or before `last`.
    await expectRestored(t, 'rs-ctr-2', log2, last, snapshot);
    await remove('rs-ctr-2');
  });

  // The fallback does not depend on containerd's version: once is enough.
  const fallbackSkip = version.name === '1.6' ? false : 'checked under containerd 1.6';
  await t.test('a damaged snapshot makes the next run cold-start, and thaw ps says why', { skip: fallbackSkip }, async (t) => {
    await start('rs-bad-1', 33, 3);
    const ck = await thawJson<{ snapshot: string }>(['checkpoint', '--namespace', 'default', 'rs-bad-1']);
    await h.waitForTaskStatus('rs-bad-1', 'STOPPED', 20_000);
    await remove('rs-bad-1');
    // Same size, different bytes: only the checksums can tell.
    const imageDir = path.join(h.thawStore, 'snapshots', ck.snapshot, 'image');
    const victim = (await readdir(imageDir)).includes('pages.img') ? 'pages.img' : 'checkpoint.img';
    const file = path.join(imageDir, victim);
    const size = (await stat(file)).size;
    const fh = await open(file, 'r+');
    await fh.write(Buffer.alloc(4096, 0xa5), 0, 4096, Math.floor(size / 2));
    await fh.close();

    const log = await start('rs-bad-2', 33, 3);
    const lines = await readLines(log);
    t.ok(lines[0]?.startsWith('START'), 'the app started from the beginning');
    t.equal(ticksOf(lines)[0], 1, 'ticks start at 1');
    const row = await psRow('rs-bad-2');
    t.equal(row?.restore.decision, 'cold', 'thaw ps: cold');
    t.match(row?.restore.reason ?? '', /restore failed|fallback/, `reason: ${row?.restore.reason}`);
    t.ok(row?.restore.fallback, `fallback recorded: ${row?.restore.fallback}`);
    t.equal(await h.taskStatus('rs-bad-2'), 'RUNNING', 'the cold-started task works');
    await remove('rs-bad-2');
    t.same(await h.runscSandboxes(), [], 'no runsc sandbox left (the failed restore sandbox included)');
  });
}
