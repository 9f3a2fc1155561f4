import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { closeSync, existsSync, openSync, readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa } from 'execa';
import t from 'tap';
import { buildBundle, readBundleSpec } from '../../src/bundle/bundle.js';
import { collectKeyInputs, computeKey } from '../../src/snapshot/key.js';
import { SnapshotStore } from '../../src/snapshot/store.js';

/**
 * End to end with the real runsc: a counting app is checkpointed straight into a pending
 * snapshot's imageDir, committed, fully verified, then restored from the committed directory and
 * seen to count on. Also checks that the key computed before the container ran (rootfs
 * fingerprint) is the key computed after it ran. Needs root, runsc and THAW_INTEGRATION=1.
 */
async function skipReason(): Promise<string | false> {
  if (!process.env.THAW_INTEGRATION) return 'THAW_INTEGRATION is not set';
  if (process.getuid?.() !== 0) return 'runsc needs root';
  if (!existsSync('/bin/busybox')) return '/bin/busybox missing (busybox-static)';
  if ((await execa('runsc', ['--version'], { reject: false })).failed) return 'runsc is not installed';
  return false;
}
const skip = await skipReason();

function numbers(file: string): number[] {
  return readFileSync(file, 'utf8').split('\n').filter((l) => l.trim() !== '').map(Number);
}

async function until<T>(what: string, fn: () => Promise<T | undefined> | T | undefined, timeoutMs = 20_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}

t.test('runsc checkpoints into a pending snapshot; the committed snapshot restores', { skip }, async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'thaw-snap-runsc-'));
  const root = join(dir, 'runsc-root');
  const ids: string[] = [];
  const fds: number[] = [];
  const runsc = (...args: string[]) =>
    execa('runsc', ['--root', root, '--network=none', '--platform=systrap', ...args], { timeout: 60_000 });
  t.teardown(async () => {
    for (const id of ids) await runsc('delete', '--force', id).catch(() => undefined);
    for (const fd of fds) closeSync(fd);
    await rm(dir, { recursive: true, force: true });
  });
  /** `runsc create`: the container's stdio is this process's stdio (an fd execa cannot take). */
  const createWithStdout = async (id: string, fd: number): Promise<void> => {
    const child = spawn('runsc', ['--root', root, '--network=none', '--platform=systrap', 'create', '--bundle', bundle, id], {
      stdio: ['ignore', fd, fd],
      timeout: 60_000,
    });
    const [code] = (await once(child, 'exit')) as [number | null];
    if (code !== 0) throw new Error(`runsc create ${id} exited with ${code}`);
  };
  const output = (name: string) => {
    const file = join(dir, name);
    const fd = openSync(file, 'a'); // O_APPEND: a restored app must not write at an old offset
    fds.push(fd);
    return { file, fd };
  };

  const bundle = await buildBundle({ dir: join(dir, 'bundle'), args: ['/bin/sh', '-c', 'i=0; while :; do echo $i; i=$((i+1)); sleep 0.1; done'] });
  const spec = await readBundleSpec(bundle);
  const { stdout: version } = await execa('runsc', ['--version']);
  const engine = { name: 'gvisor', identity: { runtime: 'runsc', version: version.split('\n')[0] ?? '', platform: 'systrap', compression: 'none' } };
  const keyInputs = await collectKeyInputs({ spec, bundle, engine, gpu: null });
  const key = computeKey(keyInputs);
  t.ok(keyInputs.image.rootfs, 'no digest: the rootfs is fingerprinted');

  const store = await SnapshotStore.open({ root: join(dir, 'store') });
  const src = randomBytes(16).toString('hex');
  ids.push(src);
  const out1 = output('out1.log');
  await createWithStdout(src, out1.fd);
  await runsc('start', src);
  await until('the app to count to 5', () => (numbers(out1.file).length >= 5 ? true : undefined));

  {
    await using pending = await store.begin(key, { leaveRunning: false });
    const t0 = performance.now();
    await runsc('checkpoint', `--image-path=${pending.imageDir}`, '--compression=none', src);
    const checkpointMs = performance.now() - t0;
    const t1 = performance.now();
    const info = await pending.commit({ keyInputs, engine: 'gvisor', timings: { checkpoint: checkpointMs } });
    t.comment(`checkpoint ${checkpointMs.toFixed(0)} ms, commit (hash + fsync + rename) ${(performance.now() - t1).toFixed(0)} ms, ${info.totalBytes} bytes`);
    t.same(
      info.manifest.files.map((f) => f.path),
      ['image/checkpoint.img', 'image/pages.img', 'image/pages_meta.img'],
      'runsc wrote its image into the pending image/ directory',
    );
  }
  await until('the source to stop', async () => {
    const { stdout } = await runsc('state', src);
    return (JSON.parse(stdout) as { status: string }).status === 'stopped' ? true : undefined;
  });
  const lastBefore = numbers(out1.file).at(-1)!;

  // The running container left its rootfs as the image had it: same key after as before.
  const after = await collectKeyInputs({ spec: await readBundleSpec(bundle), bundle, engine, gpu: null });
  t.equal(computeKey(after), key, 'the key does not change once the container has run');

  const verified = await store.verify(key);
  t.match(verified, { files: 3, hashed: true });
  const info = await store.get(key);
  if (!info) return t.fail('snapshot missing');

  const dst = randomBytes(16).toString('hex');
  ids.push(dst);
  const out2 = output('out2.log');
  await createWithStdout(dst, out2.fd);
  await runsc('restore', '--detach', '--bundle', bundle, `--image-path=${info.imageDir}`, dst);
  const counted = await until('the restored app to count on', () => {
    const n = numbers(out2.file);
    return n.length >= 3 ? n : undefined;
  });
  t.equal(counted[0], lastBefore + 1, `the restored app carries on from ${lastBefore}`);
  const m = await store.recordRestore(key, { restore: 1 });
  t.equal(m.restoreCount, 1);
  await store.verify(key);
});
