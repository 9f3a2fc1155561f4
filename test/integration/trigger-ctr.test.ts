/**
 * Checkpoint triggers and hooks through containerd with thaw's shim and real runsc. The test image
 * runs fake-llm (test/fixtures/trigger/fake-llm.c), a static stand-in for vLLM/SGLang that serves
 * their sleep/wake endpoints on the sandbox's loopback, holds a "KV cache" buffer, prints every
 * call it gets, asks thaw for checkpoints over /run/thaw and reports what /run/thaw tells it.
 *
 * - on-request over thaw.sock with exec hooks and the vLLM preset; a second container of the same
 *   image and command restores and is told so (/run/thaw/restored, /run/thaw/env, status
 *   "restored"), and the resume hooks run there
 * - on-request through the signal file /run/thaw/checkpoint-now
 * - when-ready with an exec readiness probe; after:DURATION with the SGLang preset
 * - manual: `ctr task checkpoint` runs the hooks around the checkpoint
 * - bad configuration (unknown trigger, bad duration, a failing hook, a hanging hook): a clear
 *   log line, no snapshot, and the container keeps running
 *
 * One containerd (the system's; the trigger does not depend on containerd's version). Hooks write
 * into the container's control dir (/run/thaw/hooks.log), which the test reads on the host.
 * Gated by THAW_INTEGRATION=1; needs root, containerd, ctr, runsc, busybox-static, gcc.
 */
import { existsSync } from 'node:fs';
import { readdir, readFile, rm } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import t, { type Test } from 'tap';
import { ContainerdHarness, integrationSkipReason, readLines, runCommand, until } from '../helpers/containerd.js';
import { buildOciImage, buildRootfs, imageToolsMissing } from '../helpers/oci-image.js';
import { controlDirFor } from '../../src/trigger/control-dir.js';

const IMAGE = 'localhost/thaw-it-trigger:1';
const FAKE_LLM = fileURLToPath(new URL('../fixtures/trigger/fake-llm.c', import.meta.url));
const skip = integrationSkipReason() ?? imageToolsMissing({ demoApp: true });

/** An exec hook that appends a line (with the phase thaw passes) to the control dir. */
const note = (what: string): string => JSON.stringify(['/bin/sh', '-c', `echo "${what} $THAW_PHASE" >> /run/thaw/hooks.log`]);

t.test('checkpoint triggers and hooks under containerd', { skip: skip ?? false }, async (t) => {
  const h = await ContainerdHarness.start(t.teardown.bind(t), {
    prefix: 'thaw-trig-',
    // The app reaches /run/thaw/thaw.sock only with --host-uds=open (see docs/triggers.md).
    thawConfig: { runsc: { flags: { 'host-uds': 'open' } } },
  });
  const work = path.join(h.dir, 'image');
  const rootfs = await buildRootfs({ dir: path.join(work, 'rootfs') });
  const cc = await runCommand('gcc', ['-O2', '-static', '-o', path.join(rootfs, 'fake-llm'), FAKE_LLM]);
  if (cc.code !== 0) throw new Error(`gcc fake-llm: ${cc.err}`);
  const image = await buildOciImage({ workDir: work, rootfs, name: IMAGE, cmd: ['/fake-llm'], out: path.join(work, 'image.tar') });
  await rm(rootfs, { recursive: true, force: true });
  await h.importImage(image.tar);

  const snapshots = async (): Promise<string[]> => (await readdir(path.join(h.thawStore, 'snapshots')).catch(() => [])).sort();
  const ctlDir = (id: string): string => controlDirFor(h.thawState, 'default', id);
  const hooksLog = async (id: string): Promise<string[]> => (await readFile(path.join(ctlDir(id), 'hooks.log'), 'utf8').catch(() => '')).split('\n').filter(Boolean);
  const logOf = (id: string): string => path.join(h.dir, `${id}.log`);
  const lines = (id: string): Promise<string[]> => readLines(logOf(id));
  const waitLine = async (id: string, re: RegExp, ms = 30_000): Promise<string> => {
    let found = '';
    await until(async () => ((found = (await lines(id)).find((l) => re.test(l)) ?? ''), found !== ''), ms, `${re} in ${id}'s output`);
    return found;
  };
  const run = async (id: string, args: string[], annotations: Record<string, string>, env: string[] = []): Promise<void> => {
    const extra = [...Object.entries(annotations).flatMap(([k, v]) => ['--annotation', `${k}=${v}`]), ...env.flatMap((e) => ['--env', e])];
    const r = await h.runThaw({ id, image: IMAGE, args: ['/fake-llm', ...args], logFile: logOf(id), extra });
    if (r.code !== 0) throw new Error(`ctr run ${id} failed: ${r.err}`);
    await waitLine(id, /^(LISTENING|TICK|RESTORED)/);
  };
  const remove = async (id: string): Promise<void> => {
    if ((await h.taskStatus(id)) !== undefined) {
      await h.ctr(['tasks', 'kill', '-s', 'SIGKILL', id]);
      await h.waitForTaskStatus(id, 'STOPPED', 20_000).catch(() => undefined);
      await h.ctr(['tasks', 'rm', '-f', id]);
    }
    await h.ctr(['containers', 'rm', id]);
  };
  /** The task is running and its app still ticks. */
  const keepsRunning = async (t: Test, id: string): Promise<void> => {
    const n = (await lines(id)).filter((l) => l.startsWith('TICK')).length;
    await until(async () => (await lines(id)).filter((l) => l.startsWith('TICK')).length > n + 1, 15_000, `${id} to keep ticking`);
    t.equal(await h.taskStatus(id), 'RUNNING', `${id} keeps running`);
  };
  /** The shim's log lines (through containerd's stderr) about container `id`. */
  const shimLog = (id: string): Record<string, unknown>[] =>
    h.log
      .split('\n')
      .filter((l) => l.startsWith('{') && l.includes(`"id":"${id}"`))
      .flatMap((l) => {
        try {
          return [JSON.parse(l) as Record<string, unknown>];
        } catch {
          return [];
        }
      });

  await t.test('on-request over thaw.sock, exec hooks, vLLM preset; a second container restores and is told', async (t) => {
    const annotations = {
      'thaw.dev/checkpoint': 'on-request',
      'thaw.dev/pre-checkpoint': note('pre'),
      'thaw.dev/post-restore': note('post'),
      'thaw.dev/kv-cache': 'discard',
    };
    const args = ['--request-after-ms', '300', '--kv-mib', '32', '--seed', '1'];
    const before = await snapshots();
    await run('or-a', args, annotations, ['HOSTNAME=replica-a']);
    t.match(await waitLine('or-a', /^REQUEST /), /^REQUEST 202 \{"state":"scheduled"/, 'POST /checkpoint answered 202 at once');
    const status = await waitLine('or-a', /^STATUS /, 60_000);
    t.match(status, /^STATUS committed \{"state":"committed".*"snapshot":"[0-9a-f]{64}"/, 'GET /checkpoint/status reports the commit');
    const key = /"snapshot":"([0-9a-f]{64})"/.exec(status)?.[1] ?? '';
    t.same(await snapshots(), [...before, key].sort(), 'one snapshot committed under the key');
    const a = await lines('or-a');
    const asked = a.findIndex((l) => l.startsWith('REQUEST'));
    const order = ['CALL POST /sleep?level=1', 'KV freed', 'CALL POST /wake_up', 'KV allocated'].map((p) => a.findIndex((l, i) => i > asked && l.startsWith(p)));
    t.ok(order.every((i) => i > 0) && order.every((v, i) => i === 0 || v > order[i - 1]!), `vLLM sleep before, wake_up after (lines ${order.join(', ')})`);
    await until(async () => (await hooksLog('or-a')).length >= 2, 10_000, 'hooks in the source');
    t.same(await hooksLog('or-a'), ['pre checkpoint', 'post checkpointed'], 'pre-checkpoint, then post-restore in the source (it carries on from the quiesced state)');
    await keepsRunning(t, 'or-a');
    const manifest = JSON.parse(await readFile(path.join(h.thawStore, 'snapshots', key, 'manifest.json'), 'utf8')) as { checkpoint: { leaveRunning: boolean }; totalBytes: number };
    t.ok(manifest.totalBytes < 32 << 20, `the KV buffer was freed before the checkpoint: snapshot ${manifest.totalBytes} bytes < 32 MiB`);

    await run('or-b', args, annotations, ['HOSTNAME=replica-b']);
    const restored = await waitLine('or-b', /^RESTORED /);
    t.match(restored, new RegExp(`^RESTORED \\{"restoredAt":"[^"]+","snapshot":"${key}","restoreMs":`), '/run/thaw/restored names the snapshot');
    t.equal(await waitLine('or-b', /^ENV /), 'ENV HOSTNAME=replica-b;', '/run/thaw/env holds the fresh HOSTNAME');
    t.match(await waitLine('or-b', /^STATUS /), /^STATUS restored /, 'the in-flight poll, restored, learns it was restored');
    const b = await lines('or-b');
    t.notOk(b.some((l) => l.startsWith('LISTENING')), 'the app was not started again');
    t.ok(b.some((l) => l.startsWith('CALL POST /wake_up')), 'the KV cache was re-acquired in the restored copy');
    await until(async () => (await hooksLog('or-b')).length >= 1, 10_000, 'hooks in the restored copy');
    t.same(await hooksLog('or-b'), ['post restored'], 'post-restore ran in the restored copy');
    await keepsRunning(t, 'or-b');
    // runsc implements leave-running as an immediate restore in place: the shim's `runsc wait`,
    // attached before the checkpoint, must still report the real exit afterwards (not 255).
    const k = await h.ctr(['tasks', 'kill', '-s', 'SIGKILL', 'or-a']);
    t.equal(k.code, 0, k.err);
    await h.waitForTaskStatus('or-a', 'STOPPED', 20_000);
    const rm = await h.ctr(['tasks', 'rm', 'or-a']);
    t.match(rm.err, /exit code 137/, `SIGKILL after the checkpoint reports 137: ${rm.err.trim()}`);
    await Promise.all([remove('or-a'), remove('or-b')]);
    t.notOk(existsSync(ctlDir('or-a')), 'control dir removed at Delete');
  });

  await t.test('on-request through the signal file /run/thaw/checkpoint-now', async (t) => {
    const before = await snapshots();
    await run('sig', ['--signal-after-ms', '300', '--seed', '2'], { 'thaw.dev/checkpoint': 'on-request' });
    t.match(await waitLine('sig', /^STATUS /, 60_000), /^STATUS committed /, 'the status file reports the commit');
    t.equal((await snapshots()).length, before.length + 1);
    t.notOk(existsSync(path.join(ctlDir('sig'), 'checkpoint-now')), 'thaw removed the signal file');
    await keepsRunning(t, 'sig');
    await remove('sig');
  });

  await t.test('when-ready: the readiness command succeeds, then the checkpoint', async (t) => {
    const before = await snapshots();
    await run('ready', ['--ready-after-ms', '1000', '--seed', '3'], {
      'thaw.dev/checkpoint': 'when-ready',
      'thaw.dev/ready-exec': JSON.stringify(['/bin/sh', '-c', 'test -e /tmp/ready']),
      'thaw.dev/ready-interval': '300ms',
    });
    await until(async () => (await snapshots()).length > before.length, 60_000, 'a snapshot');
    const readyAt = (await lines('ready')).indexOf('READY');
    t.ok(readyAt >= 0, 'the app became ready');
    const probes = shimLog('ready').filter((l) => l.msg === 'readiness probe succeeded');
    t.equal(probes.length, 1, 'the probe succeeded once');
    t.ok(Number(probes[0]?.attempts) > 1, `it failed before the app was ready (${probes[0]?.attempts} probes)`);
    await keepsRunning(t, 'ready');
    await remove('ready');
  });

  await t.test('after:DURATION with the SGLang preset', async (t) => {
    const before = await snapshots();
    await run('after', ['--port', '30000', '--seed', '4'], { 'thaw.dev/checkpoint': 'after:1s', 'thaw.dev/kv-cache': 'discard', 'thaw.dev/kv-cache-preset': 'sglang' });
    await until(async () => (await snapshots()).length > before.length, 60_000, 'a snapshot');
    await waitLine('after', /^CALL POST \/resume_memory_occupation \{"tags":\["kv_cache"\]\}/);
    t.ok((await lines('after')).some((l) => l === 'CALL POST /release_memory_occupation {"tags":["kv_cache"]}'), 'released with the kv_cache tag');
    await keepsRunning(t, 'after');
    await remove('after');
  });

  await t.test('manual: ctr task checkpoint runs the hooks around the checkpoint', async (t) => {
    await run('man', ['--seed', '5'], { 'thaw.dev/checkpoint': 'manual', 'thaw.dev/pre-checkpoint': note('pre'), 'thaw.dev/post-restore': note('post') });
    const ck = await h.ctr(['tasks', 'checkpoint', 'man'], { timeoutMs: 120_000 });
    t.equal(ck.code, 0, ck.err);
    await until(async () => (await hooksLog('man')).length >= 2, 10_000, 'hooks');
    t.same(await hooksLog('man'), ['pre checkpoint', 'post checkpointed']);
    await keepsRunning(t, 'man');
    await remove('man');
    const images = (await h.ctr(['images', 'ls', '-q'])).out.split('\n').filter((l) => l.startsWith('containerd.io/checkpoint/man'));
    if (images.length > 0) await h.ctr(['images', 'rm', ...images]);
  });

  await t.test('bad configuration: a clear log line, no snapshot, the container keeps running', async (t) => {
    const rows: [string, Record<string, string>, RegExp][] = [
      ['bad-kind', { 'thaw.dev/checkpoint': 'sometimes' }, /^bad trigger configuration, no automatic snapshot: annotation thaw\.dev\/checkpoint="sometimes": unknown trigger/],
      ['bad-dur', { 'thaw.dev/checkpoint': 'after:5x' }, /^bad trigger configuration, no automatic snapshot: annotation thaw\.dev\/checkpoint="after:5x": .*not a duration/],
      [
        'bad-hook',
        { 'thaw.dev/checkpoint': 'after:300ms', 'thaw.dev/pre-checkpoint': JSON.stringify(['/bin/sh', '-c', 'echo model busy; exit 3']) },
        /^triggered checkpoint failed, no snapshot; the container keeps running: pre-checkpoint hook \["\/bin\/sh","-c","echo model busy; exit 3"\] exited with 3: model busy/,
      ],
      [
        'hang-hook',
        { 'thaw.dev/checkpoint': 'after:300ms', 'thaw.dev/pre-checkpoint': JSON.stringify(['/bin/sleep', '600']), 'thaw.dev/hook-timeout': '1s' },
        /^triggered checkpoint failed, no snapshot; the container keeps running: pre-checkpoint hook \["\/bin\/sleep","600"\] hung: timed out after 1000 ms/,
      ],
    ];
    const before = await snapshots();
    let seed = 10;
    await Promise.all(rows.map(([id, annotations]) => run(id, ['--seed', String(seed++)], annotations)));
    for (const [id, , msg] of rows) {
      await until(() => shimLog(id).some((l) => typeof l.msg === 'string' && msg.test(l.msg)), 30_000, `${id}: ${msg}`).catch(() => undefined);
      const line = shimLog(id).find((l) => typeof l.msg === 'string' && msg.test(l.msg));
      t.ok(line, `${id}: logged ${msg}`);
      t.equal(line?.level, 50, `${id}: at error level`);
      const status = JSON.parse(await readFile(path.join(ctlDir(id), 'status'), 'utf8')) as { state: string; reason: string };
      t.equal(status.state, 'failed', `${id}: /run/thaw/status says failed: ${status.reason}`);
      await keepsRunning(t, id);
    }
    const ps = await h.ctr(['tasks', 'exec', '--fifo-dir', h.fifoDir, '--exec-id', 'ps', 'hang-hook', '/bin/ps']);
    t.match(ps.out, /fake-llm/, `ps ran: ${ps.out}`);
    t.notMatch(ps.out, /sleep 600/, 'the hung hook was killed');
    t.same(await snapshots(), before, 'no snapshot');
    await Promise.all(rows.map(([id]) => remove(id)));
  });
});
