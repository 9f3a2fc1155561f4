import { randomBytes } from 'node:crypto';
import { closeSync, copyFileSync, existsSync, mkdirSync, openSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import t, { type Test } from 'tap';
import { RunscError } from '../../src/errors.js';
import { bestCheckpointFlags, bestRestoreFlags } from '../../src/runsc/probe.js';
import { Runsc } from '../../src/runsc/runsc.js';

/**
 * The real runsc (0.0~20240729 here): create + start a counting app, checkpoint it uncompressed and
 * direct, restore it under a new runtime id (create + restore) and see the count carry on, then
 * exec, pause/resume, wait/kill/delete and leave nothing behind. Needs root and THAW_INTEGRATION=1.
 */
const BUSYBOX = '/bin/busybox';

async function skipReason(): Promise<string | false> {
  if (!process.env.THAW_INTEGRATION) return 'THAW_INTEGRATION is not set';
  if (process.getuid?.() !== 0) return 'runsc needs root';
  if (!existsSync(BUSYBOX)) return `${BUSYBOX} missing (busybox-static)`;
  const probe = await execa('runsc', ['--version'], { reject: false });
  if (probe.failed) return 'runsc is not installed';
  return false;
}

const skip = await skipReason();

/** A fixed-length hex runtime id, as engine/container-id.ts makes them. */
const newId = () => randomBytes(16).toString('hex');

/** Polls `fn` until it returns a value other than undefined. */
async function until<T>(what: string, fn: () => Promise<T | undefined> | T | undefined, timeoutMs = 20_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await fn();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

function numbers(file: string): number[] {
  return readFileSync(file, 'utf8')
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map(Number);
}

/** A temp dir holding a busybox bundle, a runsc root and a Runsc over it; removed at teardown. */
async function sandboxWorld(t: Test) {
  const dir = await mkdtemp(join(tmpdir(), 'thaw-runsc-it-'));
  const ids = new Set<string>();
  const fds: number[] = [];
  const runsc = new Runsc({
    path: 'runsc',
    root: join(dir, 'root'),
    platform: 'systrap',
    network: 'none',
    debugLogDir: null,
    flags: {},
  });
  t.teardown(async () => {
    for (const id of ids) await runsc.delete(id, { force: true }).catch(() => undefined);
    for (const fd of fds) closeSync(fd);
    await rm(dir, { recursive: true, force: true });
  });

  const bundle = join(dir, 'bundle');
  mkdirSync(join(bundle, 'rootfs', 'bin'), { recursive: true });
  copyFileSync(BUSYBOX, join(bundle, 'rootfs', 'bin', 'busybox'));
  for (const name of ['sh', 'sleep', 'cat', 'echo']) symlinkSync('busybox', join(bundle, 'rootfs', 'bin', name));
  await execa('runsc', ['spec', '--', '/bin/sh', '-c', 'i=0; while :; do echo $i; i=$((i+1)); sleep 0.1; done'], { cwd: bundle });
  const spec = JSON.parse(readFileSync(join(bundle, 'config.json'), 'utf8')) as { process: { terminal?: boolean } };
  spec.process.terminal = false;
  writeFileSync(join(bundle, 'config.json'), JSON.stringify(spec, null, 2));

  /** An O_APPEND file as a container's stdout/stderr (a restored app must not write at an old offset). */
  const output = (name: string) => {
    const file = join(dir, name);
    const fd = openSync(file, 'a');
    fds.push(fd);
    return { file, fd };
  };
  return { dir, bundle, runsc, ids, output };
}

t.test('create, checkpoint, restore under a new id, exec, wait, delete', { skip }, async (t) => {
  const { dir, bundle, runsc, ids, output } = await sandboxWorld(t);
  const caps = await runsc.capabilities();
  t.comment(`runsc ${caps.version}`);

  const src = newId();
  ids.add(src);
  const out1 = output('out1.log');
  await runsc.create(src, { bundle, stdio: ['ignore', out1.fd, out1.fd] });
  t.equal((await runsc.state(src)).status, 'created');
  await runsc.start(src);
  t.equal((await runsc.state(src)).status, 'running');
  await until('the app to count to 5', () => (numbers(out1.file).length >= 5 ? true : undefined));

  const ckptFlags = bestCheckpointFlags(caps, { compression: 'auto', direct: true });
  t.same(ckptFlags, { compression: 'none', direct: true, excludeCommittedZeroPages: false });
  const image = join(dir, 'image');
  let t0 = performance.now();
  await runsc.checkpoint(src, { imagePath: image, ...ckptFlags });
  t.comment(`checkpoint ${(performance.now() - t0).toFixed(0)} ms`);
  for (const f of ['checkpoint.img', 'pages.img', 'pages_meta.img']) t.ok(existsSync(join(image, f)), `image has ${f}`);
  // The source stops asynchronously after checkpoint returns.
  await until('the source to stop', async () => ((await runsc.state(src)).status === 'stopped' ? true : undefined));
  const before = numbers(out1.file);
  const lastBefore = before.at(-1)!;
  t.same(before, before.map((_, i) => i), 'the source counted without gaps');

  const dst = newId();
  ids.add(dst);
  const out2 = output('out2.log');
  t0 = performance.now();
  await runsc.create(dst, { bundle, stdio: ['ignore', out2.fd, out2.fd] });
  const created = performance.now();
  const restoreFlags = bestRestoreFlags(caps, { compression: ckptFlags.compression, direct: ckptFlags.direct ?? false });
  await runsc.restore(dst, { bundle, imagePath: image, stdio: ['ignore', 'ignore', 'ignore'], ...restoreFlags });
  t.comment(`create ${(created - t0).toFixed(0)} ms, restore ${(performance.now() - created).toFixed(0)} ms`);
  t.equal((await runsc.state(dst)).status, 'running');
  const after = await until('the restored app to count on', () => {
    const n = numbers(out2.file);
    return n.length >= 3 ? n : undefined;
  });
  t.equal(after[0], lastBefore + 1, `the restored app carries on from ${lastBefore}`);
  t.same(after, after.map((_, i) => lastBefore + 1 + i), 'and keeps counting without gaps');

  const pids = await runsc.ps(dst);
  t.ok(pids.length >= 1 && pids.every((p) => Number.isInteger(p) && p > 0), `ps: ${JSON.stringify(pids)}`);
  const stats = await runsc.events(dst);
  t.ok((stats.memory?.usage?.usage ?? 0) > 0, `events: memory usage ${stats.memory?.usage?.usage}`);
  t.ok((stats.pids?.current ?? 0) >= 1, `events: ${stats.pids?.current} pids`);

  const execOut = output('exec.log');
  const exec = await runsc.exec(dst, { args: ['/bin/echo', 'exec-ok'], stdio: ['ignore', execOut.fd, execOut.fd] });
  t.ok(exec.pid > 0 && exec.internalPid > 0, `exec pids ${JSON.stringify(exec)}`);
  await until('exec output', () => (readFileSync(execOut.file, 'utf8').includes('exec-ok') ? true : undefined));

  await runsc.pause(dst);
  t.equal((await runsc.state(dst)).status, 'paused');
  await runsc.resume(dst);
  t.equal((await runsc.state(dst)).status, 'running');

  // wait must be running before the exit: a gone sandbox has no exit status to report.
  const waiting = runsc.wait(dst);
  await new Promise((r) => setTimeout(r, 1_000));
  await runsc.kill(dst, 'SIGKILL');
  t.equal(await waiting, 137, 'SIGKILL → 128 + 9');
  await until('the restored container to stop', async () => ((await runsc.state(dst)).status === 'stopped' ? true : undefined));

  await runsc.delete(dst);
  await runsc.delete(src);
  ids.clear();
  t.same(await runsc.list(), [], 'nothing left under the root');
});

t.test('errors carry runsc’s own line and a code', { skip }, async (t) => {
  const { bundle, runsc, ids, output } = await sandboxWorld(t);
  const unknown = newId();
  const err = await runsc.state(unknown).then(
    () => undefined,
    (e: unknown) => e,
  );
  t.type(err, RunscError);
  t.equal((err as RunscError).code, 'NotFound');
  t.match((err as RunscError).logLine, /does not exist/);
  t.equal((err as RunscError).exitCode, 128);

  const id = newId();
  ids.add(id);
  const out = output('out.log');
  await runsc.create(id, { bundle, stdio: ['ignore', out.fd, out.fd] });
  await t.rejects(runsc.create(id, { bundle, stdio: ['ignore', out.fd, out.fd] }), { code: 'AlreadyExists' });
  t.equal((await runsc.state(id)).status, 'created', 'a refused duplicate create leaves the original alone');
  await t.rejects(runsc.resume(id), { code: 'FailedPrecondition' }, 'resume of a created container');
  await runsc.delete(id, { force: true });
  ids.clear();
  await t.rejects(runsc.delete(id), { code: 'NotFound' });
  t.same(await runsc.list(), []);
});
