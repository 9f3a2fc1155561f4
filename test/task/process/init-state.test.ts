/**
 * The init process's state machine as a table: for every state and operation, either the next
 * state (and the engine calls made) or the error "cannot <op> task in <state> state". Runs on a
 * FakeEngine; a restore is a state of its own whose start() restores.
 */
import t from 'tap';
import type { ShimError } from '../../../src/errors.js';
import { InitProcess } from '../../../src/task/process/init.js';
import type { ExitInfo, ProcessStatus } from '../../../src/task/process/process.js';
import type { OpenStdio } from '../../../src/task/stdio.js';
import { silentLogger } from '../../../src/log/logger.js';
import { FakeEngine, FakeLifecycle, asLifecycle, settle } from '../fake-runtime.js';

type Op = 'start' | 'pause' | 'resume' | 'checkpoint' | 'kill' | 'killAll' | 'delete' | 'exec';
type Setup = 'created' | 'running' | 'paused' | 'stopped' | 'deleted';

interface Fixture {
  init: InitProcess;
  engine: FakeEngine;
  lifecycle: FakeLifecycle;
  exits: ExitInfo[];
  closed: { io: number; stdin: number };
}

async function fixture(setup: Setup, { restore = false } = {}): Promise<Fixture> {
  const engine = new FakeEngine();
  const lifecycle = new FakeLifecycle(engine);
  if (restore) lifecycle.restoreFor.add('c1');
  const closed = { io: 0, stdin: 0 };
  const io = {
    fds: ['ignore', 'ignore', 'ignore'],
    close: async () => {
      closed.io++;
    },
    closeStdin: async () => {
      closed.stdin++;
    },
  } as unknown as OpenStdio;
  const plan = await lifecycle.plan({ id: 'c1', namespace: 'default', bundle: '/b', stdio: io.fds, owner: 'shim' });
  const prepared = await lifecycle.create(plan);
  const exits: ExitInfo[] = [];
  const init = new InitProcess({
    id: 'c1',
    namespace: 'default',
    bundle: '/b',
    prepared,
    engine,
    lifecycle: asLifecycle(lifecycle),
    io,
    stdio: { stdin: '', stdout: '', stderr: '', terminal: false },
    log: silentLogger,
    onExit: (_p, exit) => exits.push(exit),
  });
  if (setup !== 'created') await init.start();
  if (setup === 'paused') await init.pause();
  if (setup === 'stopped' || setup === 'deleted') {
    engine.exit('c1', 3);
    await settle();
  }
  if (setup === 'deleted') await init.delete();
  engine.calls.length = 0;
  return { init, engine, lifecycle, exits, closed };
}

function run(init: InitProcess, op: Op): Promise<unknown> {
  switch (op) {
    case 'start':
      return init.start();
    case 'pause':
      return init.pause();
    case 'resume':
      return init.resume();
    case 'checkpoint':
      return init.checkpoint(true);
    case 'kill':
      return init.kill(15, false);
    case 'killAll':
      return init.kill(9, true);
    case 'delete':
      return init.delete();
    case 'exec':
      return Promise.resolve().then(() => init.assertCanExec());
  }
}

/** ok: [status after, engine calls]; an error: its code and message. */
type Expect = { ok: [ProcessStatus, string[]] } | { code: ShimError['code']; message: string };
const ok = (status: ProcessStatus, calls: string[] = []): Expect => ({ ok: [status, calls] });
const illegal = (op: string, state: string): Expect => ({ code: 'FailedPrecondition', message: `cannot ${op} task in ${state} state` });

const table: Record<Setup, Record<Op, Expect>> = {
  created: {
    start: ok('running', ['start c1']),
    pause: illegal('pause', 'created'),
    resume: illegal('resume', 'created'),
    checkpoint: illegal('checkpoint', 'created'),
    kill: ok('created', ['kill c1 15']),
    killAll: ok('created', ['kill c1 9 all']),
    delete: ok('deleted', ['delete c1 force']),
    exec: illegal('exec in', 'created'),
  },
  running: {
    start: illegal('start', 'running'),
    pause: ok('paused', ['pause c1']),
    resume: illegal('resume', 'running'),
    checkpoint: ok('running', ['checkpoint c1 leaveRunning=true']),
    kill: ok('running', ['kill c1 15']),
    killAll: ok('running', ['kill c1 9 all']),
    delete: illegal('delete', 'running'),
    exec: ok('running'),
  },
  paused: {
    start: illegal('start', 'paused'),
    pause: illegal('pause', 'paused'),
    resume: ok('running', ['resume c1']),
    // containerd's client pauses a task around Task.Checkpoint.
    checkpoint: ok('paused', ['checkpoint c1 leaveRunning=true']),
    kill: ok('paused', ['kill c1 15']),
    killAll: ok('paused', ['kill c1 9 all']),
    delete: illegal('delete', 'paused'),
    exec: illegal('exec in', 'paused'),
  },
  stopped: {
    start: illegal('start', 'stopped'),
    pause: illegal('pause', 'stopped'),
    resume: illegal('resume', 'stopped'),
    checkpoint: illegal('checkpoint', 'stopped'),
    kill: { code: 'NotFound', message: 'process already finished' },
    killAll: ok('stopped'),
    delete: ok('deleted', ['delete c1 force']),
    exec: illegal('exec in', 'stopped'),
  },
  deleted: {
    start: illegal('start', 'deleted'),
    pause: illegal('pause', 'deleted'),
    resume: illegal('resume', 'deleted'),
    checkpoint: illegal('checkpoint', 'deleted'),
    kill: illegal('kill', 'deleted'),
    killAll: illegal('kill', 'deleted'),
    delete: illegal('delete', 'deleted'),
    exec: illegal('exec in', 'deleted'),
  },
};

for (const [setup, row] of Object.entries(table) as [Setup, Record<Op, Expect>][]) {
  t.test(`init in ${setup} state`, async (t) => {
    for (const [op, expect] of Object.entries(row) as [Op, Expect][]) {
      const f = await fixture(setup);
      t.equal(f.init.status, setup, `${op}: set up`);
      if ('ok' in expect) {
        await run(f.init, op);
        t.equal(f.init.status, expect.ok[0], `${setup} --${op}--> ${expect.ok[0]}`);
        t.same(f.engine.calls, expect.ok[1], `${setup} ${op}: engine calls`);
      } else {
        await t.rejects(run(f.init, op), { code: expect.code, message: expect.message }, `${setup} ${op}: ${expect.message}`);
        t.equal(f.init.status, setup, `${setup} ${op}: state unchanged`);
        t.same(f.engine.calls, [], `${setup} ${op}: no engine call`);
      }
    }
  });
}

t.test('a restore is its own created state: start restores instead of starting', async (t) => {
  const f = await fixture('created', { restore: true });
  t.equal(f.init.status, 'created');
  t.equal(f.init.decision, 'restore');
  t.equal(f.init.pid, 0, 'no pid before the restore');
  await f.init.start();
  t.same(f.engine.calls, ['restore c1'], 'restore, not start');
  t.equal(f.init.status, 'running');
  t.ok(f.init.pid >= 1000, 'pid of the restored sandbox');
  t.equal(f.init.record?.decision, 'restore');
});

t.test('the exit moves running to stopped once, reports it to onExit and to every Wait', async (t) => {
  const f = await fixture('running');
  const waits = [f.init.wait(), f.init.wait()];
  f.engine.exit('c1', 42);
  const [a, b] = await Promise.all(waits);
  t.equal(a?.status, 42);
  t.equal(b, a, 'all waiters share the exit');
  t.equal(f.init.status, 'stopped');
  t.equal(f.exits.length, 1, 'onExit called once');
  t.equal(f.init.exit?.status, 42);
  const deleted = await f.init.delete();
  t.equal(deleted.status, 42, 'Delete reports the exit status');
  t.equal(f.closed.io, 1, 'stdio closed at delete');
});

t.test('an exit while paused moves to stopped', async (t) => {
  const f = await fixture('paused');
  f.engine.exit('c1', 137);
  await settle();
  t.equal(f.init.status, 'stopped');
  t.equal(f.exits[0]?.status, 137);
});

t.test('deleting a created task reports 255 and releases Wait', async (t) => {
  const f = await fixture('created');
  const waited = f.init.wait();
  const exit = await f.init.delete();
  t.equal(exit.status, 255);
  t.equal((await waited).status, 255);
});

t.test('a failed engine call leaves the state as it was', async (t) => {
  const f = await fixture('running');
  f.engine.failNext.pause = new (await import('../../../src/errors.js')).ShimError('Internal', 'runsc pause failed');
  await t.rejects(f.init.pause(), { message: 'runsc pause failed' });
  t.equal(f.init.status, 'running');
  const g = await fixture('running');
  g.lifecycle.checkpointError = new (await import('../../../src/errors.js')).ShimError('AlreadyExists', 'snapshot exists');
  await t.rejects(g.init.checkpoint(false), { code: 'AlreadyExists' });
  t.equal(g.init.status, 'running');
});

t.test('closeStdin reaches the stdio', async (t) => {
  const f = await fixture('running');
  await f.init.closeStdin();
  t.equal(f.closed.stdin, 1);
});
