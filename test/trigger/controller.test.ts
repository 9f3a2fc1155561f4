import { connect } from 'node:net';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import t, { type Test } from 'tap';
import { ShimError } from '../../src/errors.js';
import { TriggerController, type LaunchInfo, type TriggerTarget } from '../../src/trigger/controller.js';
import type { ContainerExec, ExecRequest } from '../../src/trigger/container-exec.js';

const KEY = 'a'.repeat(64);

interface World {
  c: TriggerController;
  bundle: string;
  /** What ran, in order: hook names (THAW_HOOK), `checkpoint`. */
  events: string[];
  logs: Record<string, unknown>[];
  target: TriggerTarget;
  /** Exit code per hook name (default 0); 'hang' rejects like a timed-out exec. */
  hookResult: Map<string, number | 'hang'>;
  snapshotState: 'none' | 'committed' | 'in-progress';
  checkpointError: Error | undefined;
  launch: LaunchInfo | undefined;
  env: string[][];
  paused: boolean;
}

async function world(t: Test, annotations: Record<string, string>, o: { env?: string[]; launch?: LaunchInfo } = {}): Promise<World> {
  const dir = await mkdtemp(join(tmpdir(), 'thaw-trigger-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const bundle = join(dir, 'bundle');
  await mkdir(join(bundle, 'rootfs'), { recursive: true });
  await writeFile(
    join(bundle, 'config.json'),
    JSON.stringify({ ociVersion: '1.0.2', process: { args: ['/app'], env: o.env ?? ['PATH=/bin'], cwd: '/' }, root: { path: 'rootfs' }, mounts: [{ destination: '/proc', type: 'proc', source: 'proc' }], annotations }),
  );
  const logs: Record<string, unknown>[] = [];
  const log = pino(
    { level: 'debug' },
    new Writable({
      write(chunk: Buffer, _enc, cb) {
        logs.push(JSON.parse(chunk.toString()) as Record<string, unknown>);
        cb();
      },
    }),
  );
  const w = { events: [] as string[], logs, hookResult: new Map(), snapshotState: 'none', checkpointError: undefined, env: [] as string[][], bundle, paused: false } as unknown as World;
  w.launch = o.launch ?? { key: KEY, restored: null };
  const exec: ContainerExec = {
    run: async (req: ExecRequest) => {
      const name = (req.env ?? []).find((e) => e.startsWith('THAW_HOOK='))?.slice('THAW_HOOK='.length) ?? '?';
      w.events.push(name);
      w.env.push([...(req.env ?? [])]);
      const r = w.hookResult.get(name) ?? 0;
      if (r === 'hang') throw new ShimError('DeadlineExceeded', `timed out after ${req.timeoutMs} ms (killed)`);
      return { exitCode: r, output: r === 0 ? '' : 'it broke', durationMs: 1 };
    },
  };
  w.target = {
    exec,
    checkpoint: async () => {
      w.events.push('checkpoint');
      if (w.checkpointError) throw w.checkpointError;
      return { snapshot: KEY, bytes: 1234, timings: {} };
    },
    launched: () => w.launch,
    running: () => !w.paused,
    paused: () => w.paused,
    pause: async () => {
      w.events.push('pause');
      w.paused = true;
    },
    resume: async () => {
      w.events.push('resume');
      w.paused = false;
    },
    snapshotState: async () => w.snapshotState,
  };
  const c = await TriggerController.prepare(
    { bundle, id: 'c1', namespace: 'default', stateDir: join(dir, 'state'), ignoreEnv: ['HOSTNAME'], hostUds: 'open', log },
    { drainMs: 2_000, signalPollMs: 50 },
  );
  if (!c) throw new Error('no controller');
  t.teardown(() => c.dispose());
  w.c = c;
  return w;
}

async function statusFile(w: World): Promise<Record<string, unknown>> {
  return JSON.parse(await readFile(join(w.c.dir.path, 'status'), 'utf8')) as Record<string, unknown>;
}

async function until(what: string, cond: () => boolean | Promise<boolean>, ms = 5_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

/** One HTTP request over the control socket; closes after the answer. */
function http(sock: string, raw: string): Promise<{ status: number; body: Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    const s = connect({ path: sock, allowHalfOpen: true });
    let text = '';
    s.on('data', (d: Buffer) => (text += d.toString()));
    s.on('end', () => {
      s.end();
      const status = Number(/^HTTP\/1\.1 (\d+)/.exec(text)?.[1]);
      resolve({ status, body: JSON.parse(text.slice(text.indexOf('\r\n\r\n') + 4)) as Record<string, unknown> });
    });
    s.on('error', reject);
    s.write(raw);
  });
}
const POST = 'POST /checkpoint HTTP/1.1\r\nContent-Length: 0\r\n\r\n';
const STATUS = 'GET /checkpoint/status HTTP/1.1\r\n\r\n';

const FULL = {
  'thaw.dev/pre-checkpoint': '["/bin/quiesce"]',
  'thaw.dev/post-restore': '["/bin/resume"]',
  'thaw.dev/kv-cache': 'discard',
};

t.test('prepare adds the /run/thaw bind mount once, identically', async (t) => {
  const w = await world(t, { 'thaw.dev/checkpoint': 'manual' });
  const spec = JSON.parse(await readFile(join(w.bundle, 'config.json'), 'utf8')) as { mounts: unknown[] };
  t.same(spec.mounts.at(-1), { destination: '/run/thaw', type: 'bind', source: w.c.dir.path, options: ['rbind', 'rw'] });
  t.equal(spec.mounts.length, 2, 'the existing mounts are kept');
  t.match(await statusFile(w), { state: 'idle', trigger: 'manual', snapshot: null });
});

t.test('containers without a trigger annotation get no controller and no mount', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'thaw-trigger-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  await mkdir(join(dir, 'rootfs'));
  const spec = JSON.stringify({ ociVersion: '1.0.2', process: { args: ['/app'], cwd: '/' }, root: { path: 'rootfs' }, annotations: { 'thaw.dev/checkpoint': 'off' } });
  await writeFile(join(dir, 'config.json'), spec);
  const c = await TriggerController.prepare({ bundle: dir, id: 'x', namespace: 'n', stateDir: join(dir, 's'), ignoreEnv: [], hostUds: undefined, log: pino({ level: 'silent' }) });
  t.equal(c, undefined);
  t.equal(await readFile(join(dir, 'config.json'), 'utf8'), spec, 'config.json untouched');
});

t.test('after: hooks run around the leave-running checkpoint, in order', async (t) => {
  const w = await world(t, { 'thaw.dev/checkpoint': 'after:50ms', ...FULL });
  w.c.started(w.target);
  await until('committed', () => w.c.status.state === 'committed');
  await until('resume hooks', () => w.events.length === 5);
  t.same(w.events, ['pre-checkpoint', 'kv-cache-discard', 'checkpoint', 'kv-cache-restore', 'post-restore']);
  t.match(w.env[0], ['THAW_HOOK=pre-checkpoint', 'THAW_PHASE=checkpoint', `THAW_SNAPSHOT=${KEY}`]);
  t.match(w.env[2], ['THAW_HOOK=kv-cache-restore', 'THAW_PHASE=checkpointed']);
  t.match(w.c.status, { state: 'committed', snapshot: KEY, bytes: 1234, trigger: 'after:50ms' });
  await until('status file', async () => (await statusFile(w)).state === 'committed');
  await sleep(100);
  t.equal(w.events.filter((e) => e === 'checkpoint').length, 1, 'fires once');
  t.ok(w.logs.some((l) => l.msg === 'triggered checkpoint committed' && l.snapshot === KEY));
});

t.test('skips with a logged reason when the key has a snapshot or its lock is held', async (t) => {
  for (const [state, reason] of [
    ['committed', /snapshot a{64} exists/],
    ['in-progress', /another checkpoint of snapshot a{64} holds its lock/],
  ] as const) {
    const w = await world(t, { 'thaw.dev/checkpoint': 'after:10ms', ...FULL });
    w.snapshotState = state;
    w.c.started(w.target);
    await until('skipped', () => w.c.status.state === 'skipped');
    t.match(w.c.status.reason, reason);
    t.same(w.events, [], 'no hook, no checkpoint');
    t.ok(w.logs.some((l) => typeof l.msg === 'string' && /^checkpoint skipped: /.test(l.msg) && reason.test(l.msg)), 'logged');
  }
});

t.test('a failing or hanging pre-checkpoint hook: no snapshot, clear log', async (t) => {
  for (const result of [3, 'hang'] as const) {
    const w = await world(t, { 'thaw.dev/checkpoint': 'after:10ms', ...FULL });
    w.hookResult.set('pre-checkpoint', result);
    w.c.started(w.target);
    await until('failed', () => w.c.status.state === 'failed');
    t.same(w.events, ['pre-checkpoint'], 'no checkpoint; nothing to resume (the quiesce did not complete)');
    t.match(w.c.status.reason, result === 3 ? /pre-checkpoint hook \["\/bin\/quiesce"\] exited with 3: it broke/ : /pre-checkpoint hook \["\/bin\/quiesce"\] hung: timed out/);
    const line = w.logs.find((l) => l.level === 50);
    t.match(line?.msg, /^triggered checkpoint failed, no snapshot; the container keeps running: pre-checkpoint hook/);
  }
});

t.test('a failing kv-cache release or checkpoint resumes what had run', async (t) => {
  const a = await world(t, { 'thaw.dev/checkpoint': 'after:10ms', ...FULL });
  a.hookResult.set('kv-cache-discard', 1);
  a.c.started(a.target);
  await until('failed', () => a.c.status.state === 'failed');
  await until('undo', () => a.events.length === 3);
  t.same(a.events, ['pre-checkpoint', 'kv-cache-discard', 'post-restore']);
  t.match(a.env[2], ['THAW_HOOK=post-restore', 'THAW_PHASE=checkpoint-failed']);

  const b = await world(t, { 'thaw.dev/checkpoint': 'after:10ms', ...FULL });
  b.checkpointError = new ShimError('Internal', 'runsc checkpoint failed: boom');
  b.c.started(b.target);
  await until('failed', () => b.c.status.state === 'failed');
  await until('undo', () => b.events.length === 5);
  t.same(b.events, ['pre-checkpoint', 'kv-cache-discard', 'checkpoint', 'kv-cache-restore', 'post-restore']);
  t.equal(b.c.status.reason, 'runsc checkpoint failed: boom');

  const c = await world(t, { 'thaw.dev/checkpoint': 'after:10ms' });
  c.checkpointError = new ShimError('AlreadyExists', 'a checkpoint of snapshot x is in progress by pid 7');
  c.c.started(c.target);
  await until('skipped', () => c.c.status.state === 'skipped');
  t.equal(c.c.status.reason, 'a checkpoint of snapshot x is in progress by pid 7', 'a lost race is a skip');
});

t.test('when-ready probes until ready, then checkpoints; gives up after the timeout', async (t) => {
  const w = await world(t, { 'thaw.dev/checkpoint': 'when-ready', 'thaw.dev/ready-exec': '["/bin/test","-e","/tmp/ready"]', 'thaw.dev/ready-interval': '20ms' });
  w.hookResult.set('ready', 1);
  w.c.started(w.target);
  await until('probes', () => w.events.length >= 3);
  t.equal(w.c.status.state, 'idle');
  w.hookResult.set('ready', 0);
  await until('committed', () => w.c.status.state === 'committed');
  t.equal(w.events.at(-1), 'checkpoint');
  t.ok(w.events.filter((e) => e === 'ready').length >= 4);

  const never = await world(t, { 'thaw.dev/checkpoint': 'when-ready', 'thaw.dev/ready-exec': 'http://127.0.0.1:8000/health', 'thaw.dev/ready-interval': '20ms', 'thaw.dev/ready-timeout': '150ms' });
  never.hookResult.set('ready', 8);
  never.c.started(never.target);
  await until('failed', () => never.c.status.state === 'failed');
  t.match(never.c.status.reason, /^not ready after 150 ms \(\d+ probes; last: ready hook GET http:\/\/127\.0\.0\.1:8000\/health exited with 8/);
  t.notOk(never.events.includes('checkpoint'));
});

t.test('on-request through the socket: 202, checkpoint once the app closed, then 409', async (t) => {
  const w = await world(t, { 'thaw.dev/checkpoint': 'on-request', ...FULL });
  w.c.started(w.target);
  await until('socket', () => existsSync(w.c.dir.socketPath));
  t.match(await http(w.c.dir.socketPath, STATUS), { status: 200, body: { state: 'idle', trigger: 'on-request' } });
  const r = await http(w.c.dir.socketPath, POST);
  t.match(r, { status: 202, body: { state: 'scheduled' } });
  await until('committed', () => w.c.status.state === 'committed');
  await until('socket back', () => existsSync(w.c.dir.socketPath));
  const s = await http(w.c.dir.socketPath, STATUS);
  t.match(s, { status: 200, body: { state: 'committed', snapshot: KEY, bytes: 1234 } });
  const again = await http(w.c.dir.socketPath, POST);
  t.match(again, { status: 409, body: { state: 'committed', reason: `snapshot ${KEY} exists` } });
  t.equal(w.events.filter((e) => e === 'checkpoint').length, 1);
});

t.test('on-request through the signal file', async (t) => {
  const w = await world(t, { 'thaw.dev/checkpoint': 'on-request' });
  w.c.started(w.target);
  await writeFile(join(w.c.dir.path, 'checkpoint-now'), '');
  await until('committed', () => w.c.status.state === 'committed');
  t.notOk(existsSync(join(w.c.dir.path, 'checkpoint-now')), 'thaw removed the signal file');
  t.same(w.events, ['checkpoint']);
});

t.test('POST /checkpoint is refused when the trigger is not on-request or the config is bad', async (t) => {
  const w = await world(t, { 'thaw.dev/checkpoint': 'manual' });
  w.c.started(w.target);
  await until('socket', () => existsSync(w.c.dir.socketPath));
  t.match(await http(w.c.dir.socketPath, POST), { status: 403, body: { reason: "this container's trigger is manual, not on-request" } });

  const bad = await world(t, { 'thaw.dev/checkpoint': 'after:5x' });
  t.match(bad.c.configError?.message, /annotation thaw.dev\/checkpoint="after:5x"/);
  const line = bad.logs.find((l) => l.level === 50);
  t.match(line, { annotation: 'thaw.dev/checkpoint', msg: /^bad trigger configuration, no automatic snapshot: annotation thaw\.dev\/checkpoint="after:5x"/ });
  t.match(await statusFile(bad), { state: 'failed', trigger: 'invalid', reason: /after:5x/ });
  bad.c.started(bad.target);
  await until('socket', () => existsSync(bad.c.dir.socketPath));
  t.match(await http(bad.c.dir.socketPath, POST), { status: 409, body: { state: 'failed' } });
  await sleep(50);
  t.same(bad.events, []);
});

t.test('a restored copy is told so and runs the resume hooks; no trigger is armed', async (t) => {
  const w = await world(t, { 'thaw.dev/checkpoint': 'after:10ms', ...FULL }, {
    env: ['PATH=/bin', 'HOSTNAME=pod-b', 'MODEL=x'],
    launch: { key: KEY, restored: { snapshot: KEY, restoreMs: 420 } },
  });
  w.c.started(w.target);
  await until('restored', () => w.c.status.state === 'restored');
  t.same(w.events, ['kv-cache-restore', 'post-restore']);
  t.match(w.env[1], ['THAW_HOOK=post-restore', 'THAW_PHASE=restored']);
  const restored = JSON.parse(await readFile(join(w.c.dir.path, 'restored'), 'utf8')) as Record<string, unknown>;
  t.match(restored, { snapshot: KEY, restoreMs: 420, restoredAt: /^\d{4}-\d\d-\d\dT/ });
  t.equal(await readFile(join(w.c.dir.path, 'env'), 'utf8'), 'HOSTNAME=pod-b\n', 'the env vars left out of the key');
  await sleep(100);
  t.notOk(w.events.includes('checkpoint'), 'no trigger armed');
  t.match(await http(w.c.dir.socketPath, STATUS), { body: { state: 'restored', snapshot: KEY } });
});

t.test('manual checkpoints (Task.Checkpoint) run the hooks too', async (t) => {
  const w = await world(t, { 'thaw.dev/checkpoint': 'manual', ...FULL });
  w.c.started(w.target);
  const r = await w.c.manual(true, async () => (w.events.push('task-checkpoint'), 'done'));
  t.equal(r, 'done');
  t.same(w.events, ['pre-checkpoint', 'kv-cache-discard', 'task-checkpoint', 'kv-cache-restore', 'post-restore']);
  t.equal(w.c.status.state, 'committed');
  w.events.length = 0;
  await w.c.manual(false, async () => w.events.push('exit-checkpoint'));
  t.same(w.events, ['pre-checkpoint', 'kv-cache-discard', 'exit-checkpoint'], 'no resume hooks when the container stops');
  w.events.length = 0;
  w.paused = true;
  await w.c.manual(true, async () => w.events.push(`checkpoint-paused=${w.paused}`));
  t.same(
    w.events,
    ['resume', 'pre-checkpoint', 'kv-cache-discard', 'pause', 'checkpoint-paused=true', 'resume', 'kv-cache-restore', 'post-restore', 'pause'],
    'a task containerd paused is resumed for the hooks only',
  );
  t.equal(w.paused, true, 'left paused for containerd to resume');
});

t.test('stop ends a waiting trigger', async (t) => {
  const w = await world(t, { 'thaw.dev/checkpoint': 'when-ready', 'thaw.dev/ready-exec': '["/bin/false"]', 'thaw.dev/ready-interval': '20ms' });
  w.hookResult.set('ready', 1);
  w.c.started(w.target);
  await until('a probe', () => w.events.length >= 1);
  await w.c.stop();
  const n = w.events.length;
  await sleep(100);
  t.equal(w.events.length, n, 'no probe after stop');
  await w.c.dispose();
  t.notOk(existsSync(w.c.dir.path), 'control dir removed');
});
