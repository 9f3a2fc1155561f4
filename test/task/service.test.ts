/**
 * The Task service's handlers on a fake engine: routing, events in containerd's order, NotFound /
 * AlreadyExists / FailedPrecondition / NotImplemented answers, the exec lifecycle, Checkpoint from
 * the paused state containerd's client puts a task in, and the bundle note for `delete`.
 */
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { AnySchema } from '@bufbuild/protobuf/wkt';
import { create, fromBinary } from '@bufbuild/protobuf';
import { TaskService } from '../../src/task/service.js';
import { CONFIG_PATH_FILE } from '../../src/task/dead-task.js';
import { DeleteResponseSchema } from '../../src/gen/containerd/task/v2/shim_pb.js';
import { deletedTaskReply } from '../../src/shim/manager.js';
import { Status } from '../../src/gen/containerd/v1/types/task_pb.js';
import { MetricsSchema } from '../../src/gen/io/containerd/cgroups/v1/metrics_pb.js';
import { unpackAny } from '../../src/wire/any.js';
import type { TaskServiceImpl } from '../../src/shim/serve.js';
import { callContext, fakeShim, settle, type FakeShim } from './fake-runtime.js';

interface Service {
  shim: FakeShim;
  h: Required<TaskServiceImpl>;
  call: <K extends keyof TaskServiceImpl>(method: K, req: Record<string, unknown>) => Promise<unknown>;
}

function service(opts: { configPath?: string } = {}): Service {
  const shim = fakeShim(opts);
  const h = new TaskService(shim.ctx, shim.runtime).handlers() as Required<TaskServiceImpl>;
  const call = async <K extends keyof TaskServiceImpl>(method: K, req: Record<string, unknown>): Promise<unknown> => {
    const fn = h[method] as (r: unknown, c: unknown) => unknown;
    return fn(req, callContext(method));
  };
  return { shim, h, call };
}

const createReq = (id: string, extra: Record<string, unknown> = {}): Record<string, unknown> => ({
  id,
  bundle: '/nonexistent/bundle',
  rootfs: [],
  stdin: '',
  stdout: '',
  stderr: '',
  terminal: false,
  checkpoint: '',
  ...extra,
});

function execSpec(args: string[]): unknown {
  return create(AnySchema, { typeUrl: 'types.containerd.io/opencontainers/runtime-spec/1/Process', value: Buffer.from(JSON.stringify({ args, cwd: '/' })) });
}

t.test('create → start → exit → delete: answers and events in order', async (t) => {
  const { call, shim } = service();
  const created = (await call('create', createReq('c1'))) as { pid: number };
  t.ok(created.pid >= 1000, 'Create returns the sandbox pid');
  t.same(((await call('state', { id: 'c1', execId: '' })) as { status: Status }).status, Status.CREATED);
  const started = (await call('start', { id: 'c1', execId: '' })) as { pid: number };
  t.equal(started.pid, created.pid);
  const state = (await call('state', { id: 'c1', execId: '' })) as { status: Status; pid: number; bundle: string; id: string };
  t.equal(state.status, Status.RUNNING);
  t.equal(state.bundle, '/nonexistent/bundle');
  t.equal(state.id, 'c1');
  const waited = call('wait', { id: 'c1', execId: '' }) as Promise<{ exitStatus: number }>;
  shim.engine.exit('c1', 7);
  t.equal((await waited).exitStatus, 7, 'Wait returns the exit status');
  const stopped = (await call('state', { id: 'c1', execId: '' })) as { status: Status; exitStatus: number; exitedAt?: unknown };
  t.equal(stopped.status, Status.STOPPED);
  t.equal(stopped.exitStatus, 7);
  t.ok(stopped.exitedAt, 'exited_at set');
  const deleted = (await call('delete', { id: 'c1', execId: '' })) as { exitStatus: number; pid: number };
  t.equal(deleted.exitStatus, 7);
  t.same(shim.removedRecords, ['default/c1'], 'container record removed');
  t.same(
    shim.events.map((e) => e.topic),
    ['/tasks/create', '/tasks/start', '/tasks/exit', '/tasks/delete'],
    'containerd sees create → start → exit → delete',
  );
  const exit = shim.events[2]?.event as { containerId: string; id: string; exitStatus: number };
  t.match(exit, { containerId: 'c1', id: 'c1', exitStatus: 7 });
  await t.rejects(call('state', { id: 'c1', execId: '' }), { code: 'NotFound' }, 'gone after Delete');
});

t.test('unknown ids answer NotFound; duplicates AlreadyExists', async (t) => {
  const { call } = service();
  for (const m of ['state', 'start', 'kill', 'delete', 'wait', 'pause', 'resume', 'pids', 'stats', 'checkpoint', 'closeIO', 'exec'] as const) {
    await t.rejects(call(m, { id: 'nosuch', execId: '', signal: 9, path: '/tmp/x', stdin: true }), { code: 'NotFound' }, `${m} of an unknown id`);
  }
  await call('create', createReq('c1'));
  await t.rejects(call('create', createReq('c1')), { code: 'AlreadyExists' }, 'Create twice');
  await t.rejects(call('state', { id: 'c1', execId: 'nosuch' }), { code: 'NotFound' }, 'unknown exec id');
  await t.rejects(call('delete', { id: 'c1', execId: 'nosuch' }), { code: 'NotFound' }, 'Delete of an unknown exec');
});

t.test('illegal operations answer FailedPrecondition "cannot <op> task in <state> state"', async (t) => {
  const { call } = service();
  await call('create', createReq('c1'));
  await t.rejects(call('pause', { id: 'c1' }), { code: 'FailedPrecondition', message: 'cannot pause task in created state' });
  await call('start', { id: 'c1', execId: '' });
  await t.rejects(call('start', { id: 'c1', execId: '' }), { code: 'FailedPrecondition', message: 'cannot start task in running state' });
  await t.rejects(call('delete', { id: 'c1', execId: '' }), { code: 'FailedPrecondition', message: 'cannot delete task in running state' });
  await t.rejects(call('resume', { id: 'c1' }), { code: 'FailedPrecondition', message: 'cannot resume task in running state' });
});

t.test('exec lifecycle: add, start, exit, wait, delete', async (t) => {
  const { call, shim } = service();
  await call('create', createReq('c1'));
  await t.rejects(call('exec', { id: 'c1', execId: 'e1', spec: execSpec(['/bin/true']) }), { code: 'FailedPrecondition', message: 'cannot exec in task in created state' });
  await call('start', { id: 'c1', execId: '' });
  await call('exec', { id: 'c1', execId: 'e1', stdin: '', stdout: '', stderr: '', spec: execSpec(['/bin/sh', '-c', 'exit 5']) });
  await t.rejects(call('exec', { id: 'c1', execId: 'e1', spec: execSpec(['/bin/true']) }), { code: 'AlreadyExists' }, 'exec id taken');
  await t.rejects(call('exec', { id: 'c1', execId: '', spec: execSpec(['/bin/true']) }), { code: 'AlreadyExists' }, "'' is the init process");
  await t.rejects(call('exec', { id: 'c1', execId: 'e2', spec: create(AnySchema, { value: Buffer.from('{"no":"args"}') }) }), { code: 'InvalidArgument' }, 'spec without args');
  await t.rejects(call('exec', { id: 'c1', execId: 'e3' }), { code: 'InvalidArgument' }, 'no spec');
  t.equal(((await call('state', { id: 'c1', execId: 'e1' })) as { status: Status }).status, Status.CREATED, 'added, not started');
  await t.rejects(call('kill', { id: 'c1', execId: 'e1', signal: 15 }), { code: 'FailedPrecondition', message: 'cannot kill task in created state' });
  const started = (await call('start', { id: 'c1', execId: 'e1' })) as { pid: number };
  const fake = shim.engine.execs[0];
  t.equal(started.pid, fake?.pid, 'Start returns the exec pid');
  t.same((fake?.opts.process as { args: string[] }).args, ['/bin/sh', '-c', 'exit 5'], 'the OCI process spec reaches the engine');
  await call('kill', { id: 'c1', execId: 'e1', signal: 15 });
  t.same(fake?.signals, [15], 'Kill of an exec signals that process');
  await t.rejects(call('delete', { id: 'c1', execId: 'e1' }), { code: 'FailedPrecondition' }, 'cannot delete a running exec');
  const waited = call('wait', { id: 'c1', execId: 'e1' }) as Promise<{ exitStatus: number }>;
  fake?.exit.resolve({ exitStatus: 5, exitedAt: new Date() });
  t.equal((await waited).exitStatus, 5);
  const deleted = (await call('delete', { id: 'c1', execId: 'e1' })) as { exitStatus: number; pid: number };
  t.equal(deleted.exitStatus, 5);
  t.equal(deleted.pid, fake?.pid);
  await t.rejects(call('state', { id: 'c1', execId: 'e1' }), { code: 'NotFound' }, 'exec gone after Delete');
  t.same(
    shim.events.map((e) => e.topic),
    ['/tasks/create', '/tasks/start', '/tasks/exec-added', '/tasks/exec-started', '/tasks/exit'],
  );
  t.match(shim.events[4]?.event, { containerId: 'c1', id: 'e1', exitStatus: 5 }, 'TaskExit names the exec');
  t.equal(((await call('state', { id: 'c1', execId: '' })) as { status: Status }).status, Status.RUNNING, 'init unaffected');
});

t.test('a failed exec wait reports 255', async (t) => {
  const { call, shim } = service();
  await call('create', createReq('c1'));
  await call('start', { id: 'c1', execId: '' });
  await call('exec', { id: 'c1', execId: 'e1', spec: execSpec(['/bin/true']) });
  await call('start', { id: 'c1', execId: 'e1' });
  shim.engine.execs[0]?.exit.reject(new Error('runsc wait failed'));
  const w = (await call('wait', { id: 'c1', execId: 'e1' })) as { exitStatus: number };
  t.equal(w.exitStatus, 255);
});

t.test('pause → checkpoint → resume, as ctr task checkpoint does it', async (t) => {
  const { call, shim } = service();
  await call('create', createReq('c1'));
  await call('start', { id: 'c1', execId: '' });
  await call('pause', { id: 'c1' });
  t.equal(((await call('state', { id: 'c1', execId: '' })) as { status: Status }).status, Status.PAUSED);
  const dir = await mkdtemp(path.join(os.tmpdir(), 'thaw-svc-ckpt-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  await call('checkpoint', { id: 'c1', path: path.join(dir, 'image') });
  t.same(shim.lifecycle.checkpoints, [{ id: 'c1', namespace: 'default', leaveRunning: true }], 'no options: the task keeps running');
  await call('resume', { id: 'c1' });
  t.same(
    shim.events.map((e) => e.topic),
    ['/tasks/create', '/tasks/start', '/tasks/paused', '/tasks/checkpointed', '/tasks/resumed'],
  );
  t.match(shim.events[3]?.event, { containerId: 'c1', checkpoint: path.join(dir, 'image') });
});

t.test('checkpoint when the key already has a snapshot writes the image for containerd only', async (t) => {
  const { call, shim } = service();
  await call('create', createReq('c1'));
  await call('start', { id: 'c1', execId: '' });
  const dir = await mkdtemp(path.join(os.tmpdir(), 'thaw-svc-ckpt-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const { ShimError } = await import('../../src/errors.js');
  shim.lifecycle.checkpointError = new ShimError('AlreadyExists', 'snapshot exists');
  shim.engine.calls.length = 0;
  await call('checkpoint', { id: 'c1', path: dir });
  t.same(shim.engine.calls, ['checkpoint c1 leaveRunning=true'], 'the engine wrote the image directly');
});

t.test('pids, stats, connect, shutdown; ResizePty and Update are not implemented', async (t) => {
  const { call, shim } = service();
  await call('create', createReq('c1'));
  await call('start', { id: 'c1', execId: '' });
  t.same(((await call('pids', { id: 'c1' })) as { processes: { pid: number }[] }).processes.map((p) => p.pid), [1]);
  const stats = (await call('stats', { id: 'c1' })) as { stats: Parameters<typeof unpackAny>[0] };
  const m = unpackAny(stats.stats, MetricsSchema);
  t.equal(m?.memory?.usage?.usage, 4096n);
  t.equal(m?.memory?.usage?.limit, 8192n);
  t.equal(m?.cpu?.usage?.total, 1234n);
  t.equal(m?.pids?.current, 2n);
  const connected = (await call('connect', { id: 'c1' })) as { shimPid: number; taskPid: number; version: string };
  t.equal(connected.shimPid, process.pid);
  t.ok(connected.taskPid >= 1000);
  t.equal(connected.version, '0.0.0-test');
  await t.rejects(call('resizePty', { id: 'c1', execId: '', width: 80, height: 24 }), { code: 'FailedPrecondition', message: /no terminal/ }, 'a task without a terminal cannot be resized');
  await t.rejects(call('update', { id: 'c1' }), { code: 'NotImplemented' });
  await call('shutdown', { id: 'c1' });
  await settle();
  t.same(shim.shutdownReasons, [], 'no shutdown while a task exists');
  await call('kill', { id: 'c1', execId: '', signal: 9 });
  shim.engine.exit('c1', 137);
  await settle();
  await call('delete', { id: 'c1', execId: '' });
  await call('shutdown', { id: 'c1' });
  await settle();
  t.same(shim.shutdownReasons, ['Shutdown RPC'], 'shuts down once empty');
});

t.test('a terminal task whose runtime never sends its console fails Create with the reason and leaves nothing behind', async (t) => {
  const { call, shim } = service();
  await t.rejects(call('create', createReq('c1', { terminal: true })), { message: /console/ });
  t.notOk(shim.engine.calls.some((c) => String(c).startsWith('create')) && !shim.engine.calls.some((c) => String(c).startsWith('delete')), 'a created sandbox was deleted again');
  await t.rejects(call('state', { id: 'c1', execId: '' }), { code: 'NotFound' });
  t.same(shim.events, []);
});

t.test('a failed create undoes the sandbox and keeps no container', async (t) => {
  const { call, shim } = service();
  const { ShimError } = await import('../../src/errors.js');
  shim.engine.failNext.create = new ShimError('Internal', 'runsc create failed: boom');
  await t.rejects(call('create', createReq('c1')), { message: 'runsc create failed: boom' });
  await t.rejects(call('state', { id: 'c1', execId: '' }), { code: 'NotFound' });
  await call('create', createReq('c1'));
  t.pass('the id can be created again');
});

t.test("Create notes the shim's config path in the bundle for `delete`", async (t) => {
  const bundle = await mkdtemp(path.join(os.tmpdir(), 'thaw-svc-bundle-'));
  t.teardown(() => rm(bundle, { recursive: true, force: true }));
  const { call } = service({ configPath: '/etc/thaw/test-config.json' });
  await call('create', createReq('c1', { bundle }));
  t.equal(await readFile(path.join(bundle, CONFIG_PATH_FILE), 'utf8'), '/etc/thaw/test-config.json');
});

t.test('Delete leaves its answer in the bundle for the delete verb, and only once the task is gone', async (t) => {
  const bundle = await mkdtemp(path.join(os.tmpdir(), 'thaw-svc-bundle-'));
  t.teardown(() => rm(bundle, { recursive: true, force: true }));
  const { call, shim } = service();
  await call('create', createReq('c1', { bundle }));
  await call('start', { id: 'c1', execId: '' });
  t.equal(await deletedTaskReply(bundle), undefined, 'nothing while the task lives');
  shim.engine.exit('c1', 3);
  await settle();
  const deleted = (await call('delete', { id: 'c1', execId: '' })) as { exitStatus: number; pid: number };
  const recorded = await deletedTaskReply(bundle);
  t.ok(recorded, 'written at Delete');
  const decoded = fromBinary(DeleteResponseSchema, recorded!);
  t.equal(decoded.exitStatus, 3);
  t.equal(decoded.pid, deleted.pid);
  t.ok(decoded.exitedAt, 'exited_at kept');
});
