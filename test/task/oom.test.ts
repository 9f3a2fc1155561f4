/**
 * OOM kills → TaskOOM. The counter parsing (v1 memory.oom_control, v2 memory.events), finding a
 * sandbox's own cgroup under a fake /proc, the watcher over a temp dir standing in for the cgroup
 * (baseline, one event per rise, none without one, v1 poll, v2 inotify, stop), and the Task service
 * on a fake engine: TaskOOM before TaskExit when a kill ended the task, none for a normal exit,
 * none after Delete.
 */
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import t, { type Test } from 'tap';
import { oomKillFile, parseOomKillCount, readOomKillCount, readSandboxCgroup, type ProcessCgroup } from '../../src/engine/cgroup-resources.js';
import type { Engine } from '../../src/engine/engine.js';
import type { TaskServiceImpl } from '../../src/shim/serve.js';
import { OomWatcher } from '../../src/task/oom.js';
import { TaskService } from '../../src/task/service.js';
import { until } from '../helpers/wait.js';
import { callContext, fakeShim, settle, type FakeShim } from './fake-runtime.js';

const v1Text = (kills: number): string => `oom_kill_disable 0\nunder_oom 0\noom_kill ${kills}\n`;
const v2Text = (kills: number): string => `low 0\nhigh 0\nmax 7\noom ${kills + 1}\noom_kill ${kills}\noom_group_kill 0\n`;

async function tempDir(t: Test): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'thaw-oom-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** A cgroup whose memory directory is `dir` (v1: the memory hierarchy's; v2: the one directory). */
function cgroupAt(dir: string, mode: 'v1' | 'v2'): ProcessCgroup {
  return { mode, dirs: new Map([[mode === 'v1' ? 'memory' : '', dir]]), path: '/default/c1' };
}

/** Writes the count the way the kernel shows it for `mode`. */
async function setKills(dir: string, mode: 'v1' | 'v2', kills: number): Promise<void> {
  await writeFile(path.join(dir, mode === 'v1' ? 'memory.oom_control' : 'memory.events'), mode === 'v1' ? v1Text(kills) : v2Text(kills));
}

t.test('parseOomKillCount reads the oom_kill line of both formats and nothing else', async (t) => {
  t.equal(parseOomKillCount(v1Text(3)), 3, 'v1 memory.oom_control (kernel ≥ 4.13)');
  t.equal(parseOomKillCount(v2Text(2)), 2, 'v2 memory.events: oom_kill, not oom or oom_group_kill');
  t.equal(parseOomKillCount('oom_kill_disable 1\nunder_oom 0\n'), undefined, 'v1 before 4.13: no count (oom_kill_disable is not it)');
  t.equal(parseOomKillCount('low 0\noom_group_kill 4\n'), undefined, 'oom_group_kill is not it');
  t.equal(parseOomKillCount(''), undefined);
});

t.test('oomKillFile: memory.oom_control on v1, memory.events on v2, none without a memory hierarchy', async (t) => {
  t.equal(oomKillFile(cgroupAt('/sys/fs/cgroup/memory/default/c1', 'v1')), '/sys/fs/cgroup/memory/default/c1/memory.oom_control');
  t.equal(oomKillFile(cgroupAt('/sys/fs/cgroup/default/c1', 'v2')), '/sys/fs/cgroup/default/c1/memory.events');
  t.equal(oomKillFile({ mode: 'v1', dirs: new Map([['cpu', '/sys/fs/cgroup/cpu/x']]), path: '/x' }), undefined);
});

t.test('readOomKillCount: a gone cgroup reads as no count', async (t) => {
  const dir = await tempDir(t);
  t.equal(await readOomKillCount(path.join(dir, 'memory.events')), undefined);
  await setKills(dir, 'v2', 5);
  t.equal(await readOomKillCount(path.join(dir, 'memory.events')), 5);
});

t.test('readSandboxCgroup tells a cgroup of its own from the shim’s', async (t) => {
  const proc = await tempDir(t);
  const mountinfo = [
    '30 25 0:26 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory',
    '31 25 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw',
  ].join('\n');
  await mkdir(path.join(proc, 'self'));
  await writeFile(path.join(proc, 'self', 'mountinfo'), mountinfo);
  await writeFile(path.join(proc, 'self', 'cgroup'), '4:memory:/shim\n0::/\n');
  for (const [pid, cg] of [['100', '/default/c1'], ['101', '/shim'], ['102', '/']] as const) {
    await mkdir(path.join(proc, pid));
    await writeFile(path.join(proc, pid, 'cgroup'), `4:memory:${cg}\n0::/\n`);
  }
  const own = await readSandboxCgroup(100, proc);
  t.same({ shared: own.shared, mode: own.cgroup.mode, dir: own.cgroup.dirs.get('memory') }, { shared: false, mode: 'v1', dir: '/sys/fs/cgroup/memory/default/c1' });
  t.equal((await readSandboxCgroup(101, proc)).shared, true, 'in the shim’s cgroup');
  t.equal((await readSandboxCgroup(102, proc)).shared, true, 'in the root cgroup');
  await t.rejects(readSandboxCgroup(999, proc, 'oom'), { code: 'FailedPrecondition', message: 'oom: the sandbox process 999 is gone' });
});

for (const mode of ['v1', 'v2'] as const) {
  t.test(`watcher (${mode}): baseline, one event per rise, none without one`, async (t) => {
    const dir = await tempDir(t);
    await setKills(dir, mode, 2);
    const seen: number[] = [];
    const w = await OomWatcher.open({ id: 'c1', cgroup: cgroupAt(dir, mode), onOom: (n) => seen.push(n), pollMs: 0 });
    t.ok(w, 'opened');
    if (!w) return;
    t.teardown(() => w.stop());
    t.equal(w.count, 2, 'baseline: kills before the task started are not reported');
    await w.check();
    t.same(seen, [], 'no rise, no event');
    await setKills(dir, mode, 3);
    await Promise.all([w.check(), w.check(), w.check()]);
    t.same(seen, [3], 'a rise seen by concurrent checks is reported once');
    await w.check();
    t.same(seen, [3], 'and not again');
    await setKills(dir, mode, 5);
    await w.check();
    t.same(seen, [3, 5], 'one event per rise (two kills between checks read as one rise, as containerd’s v2 watcher does)');
    w.stop();
    await setKills(dir, mode, 6);
    await w.check();
    t.same(seen, [3, 5], 'nothing after stop');
  });
}

t.test('watcher: nothing to watch without a count', async (t) => {
  const dir = await tempDir(t);
  t.equal(await OomWatcher.open({ id: 'c1', cgroup: cgroupAt(dir, 'v1'), onOom: () => undefined }), undefined, 'no file');
  await writeFile(path.join(dir, 'memory.oom_control'), 'oom_kill_disable 0\nunder_oom 0\n');
  t.equal(await OomWatcher.open({ id: 'c1', cgroup: cgroupAt(dir, 'v1'), onOom: () => undefined }), undefined, 'v1 kernel < 4.13');
  t.equal(await OomWatcher.open({ id: 'c1', cgroup: { mode: 'v2', dirs: new Map(), path: '/' }, onOom: () => undefined }), undefined, 'no memory hierarchy');
});

t.test('watcher (v1): a poll reports a kill while the task runs; stop ends the poll', async (t) => {
  const dir = await tempDir(t);
  await setKills(dir, 'v1', 0);
  const seen: number[] = [];
  const w = await OomWatcher.open({ id: 'c1', cgroup: cgroupAt(dir, 'v1'), onOom: (n) => seen.push(n), pollMs: 20 });
  if (!w) throw new Error('not opened');
  t.teardown(() => w.stop());
  w.watch();
  t.ok(w.watching);
  await setKills(dir, 'v1', 1);
  await until('the poll to see the kill', () => (seen.length > 0 ? true : undefined), 10_000);
  t.same(seen, [1]);
  w.stop();
  t.notOk(w.watching, 'timer cleared');
  await setKills(dir, 'v1', 2);
  await sleep(150);
  t.same(seen, [1], 'no event after stop');
});

t.test('watcher (v2): inotify reports a kill while the task runs; stop closes the watch', async (t) => {
  const dir = await tempDir(t);
  await setKills(dir, 'v2', 0);
  const seen: number[] = [];
  // pollMs 0: only inotify can report this one.
  const w = await OomWatcher.open({ id: 'c1', cgroup: cgroupAt(dir, 'v2'), onOom: (n) => seen.push(n), pollMs: 0 });
  if (!w) throw new Error('not opened');
  t.teardown(() => w.stop());
  w.watch();
  t.ok(w.watching);
  await setKills(dir, 'v2', 1);
  await until('inotify to report the kill', () => (seen.length > 0 ? true : undefined), 10_000);
  t.same(seen, [1]);
  w.stop();
  t.notOk(w.watching, 'watch closed');
  await setKills(dir, 'v2', 2);
  await sleep(150);
  t.same(seen, [1], 'no event after stop');
});

t.test('watcher (v2): a burst of notifications (limit hits) costs few reads; a kill in it is reported once', async (t) => {
  const dir = await tempDir(t);
  await setKills(dir, 'v2', 0);
  const actual = await import('../../src/engine/cgroup-resources.js');
  let reads = 0;
  const { OomWatcher: Counted } = await t.mockImport<typeof import('../../src/task/oom.js')>('../../src/task/oom.js', {
    '../../src/engine/cgroup-resources.js': {
      ...actual,
      readOomKillCount: (file: string) => {
        reads++;
        return actual.readOomKillCount(file);
      },
    },
  });
  const seen: number[] = [];
  const w = await Counted.open({ id: 'c1', cgroup: cgroupAt(dir, 'v2'), onOom: (n) => seen.push(n), pollMs: 0 });
  if (!w) throw new Error('not opened');
  t.teardown(() => w.stop());
  w.watch();
  const baselineReads = reads;
  const file = path.join(dir, 'memory.events');
  const t0 = performance.now();
  // ~300 ms of memory.max hits, each rewriting the file (what cgroup_file_notify reports), a kill at the end.
  for (let i = 0; performance.now() - t0 < 300; i++) {
    await writeFile(file, `low 0\nhigh 0\nmax ${i}\noom 0\noom_kill 0\noom_group_kill 0\n`);
    await sleep(2);
  }
  await setKills(dir, 'v2', 1);
  await until('the kill after the burst', () => (seen.length > 0 ? true : undefined), 10_000);
  await sleep(250);
  const burstReads = reads - baselineReads;
  t.same(seen, [1], 'one event');
  t.ok(burstReads >= 2 && burstReads <= 8, `reads throttled to ~1 per 100 ms: ${burstReads} over ~300 ms of notifications`);
});

// ---------------------------------------------------------------- through the Task service

interface Harness {
  shim: FakeShim;
  dir: string;
  call: (method: keyof TaskServiceImpl, req: Record<string, unknown>) => Promise<unknown>;
  topics: () => string[];
}

/** A started task on the fake engine whose cgroup is a temp dir (`mode` format), `kills` at start. */
async function started(
  t: Test,
  mode: 'v1' | 'v2',
  {
    withCgroup = true,
    restore = false,
    kills = 0,
    cgroupFromStart = false,
  }: { withCgroup?: boolean; restore?: boolean; kills?: number; cgroupFromStart?: boolean } = {},
): Promise<Harness> {
  const dir = await tempDir(t);
  await setKills(dir, mode, kills);
  const shim = fakeShim();
  if (restore) shim.lifecycle.restoreFor.add('c1');
  if (withCgroup) {
    // The shared FakeEngine has no cgroupOf; this one gets it. cgroupFromStart: only once started or
    // restored, as the native engine's restore creates the container at Start.
    const engine: Engine = shim.engine;
    const exists = (): boolean => !cgroupFromStart || shim.engine.calls.some((c) => c === 'start c1' || c === 'restore c1');
    engine.cgroupOf = async (id: string) => (id === 'c1' && exists() ? cgroupAt(dir, mode) : undefined);
  }
  const h = new TaskService(shim.ctx, shim.runtime).handlers() as Required<TaskServiceImpl>;
  const call = async (method: keyof TaskServiceImpl, req: Record<string, unknown>): Promise<unknown> =>
    (h[method] as (r: unknown, c: unknown) => unknown)(req, callContext(method));
  await call('create', { id: 'c1', bundle: '/nonexistent/bundle', rootfs: [], stdin: '', stdout: '', stderr: '', terminal: false, checkpoint: '' });
  await call('start', { id: 'c1', execId: '' });
  return { shim, dir, call, topics: () => shim.events.map((e) => e.topic) };
}

const oomEvents = (h: Harness): unknown[] => h.shim.events.filter((e) => e.topic === '/tasks/oom').map((e) => e.event);

t.test('service: a kill that ended the task → TaskOOM{container_id} before TaskExit (137)', async (t) => {
  const h = await started(t, 'v1');
  await setKills(h.dir, 'v1', 1);
  h.shim.engine.exit('c1', 137);
  const exit = (await h.call('wait', { id: 'c1', execId: '' })) as { exitStatus: number };
  t.equal(exit.exitStatus, 137);
  t.same(h.topics(), ['/tasks/create', '/tasks/start', '/tasks/oom', '/tasks/exit'], 'TaskOOM precedes TaskExit');
  t.match(oomEvents(h), [{ $typeName: 'containerd.events.TaskOOM', containerId: 'c1' }]);
  await h.call('delete', { id: 'c1', execId: '' });
  t.equal(oomEvents(h).length, 1, 'one event for one kill');
});

t.test('service: a restored task is watched too; kills counted before its start are not reported', async (t) => {
  const h = await started(t, 'v1', { restore: true, kills: 4 });
  t.ok(h.shim.engine.calls.includes('restore c1'), 'started by a restore');
  await setKills(h.dir, 'v1', 5);
  h.shim.engine.exit('c1', 137);
  await h.call('wait', { id: 'c1', execId: '' });
  t.same(h.topics(), ['/tasks/create', '/tasks/start', '/tasks/oom', '/tasks/exit']);
});

t.test('service: a normal exit publishes no TaskOOM', async (t) => {
  const h = await started(t, 'v2', { kills: 2 });
  h.shim.engine.exit('c1', 0);
  await h.call('wait', { id: 'c1', execId: '' });
  await h.call('delete', { id: 'c1', execId: '' });
  t.same(h.topics(), ['/tasks/create', '/tasks/start', '/tasks/exit', '/tasks/delete']);
});

t.test('service: a kill while the task runs (v2 inotify) → TaskOOM at once; none after Delete', async (t) => {
  const h = await started(t, 'v2');
  await setKills(h.dir, 'v2', 1);
  await until('TaskOOM while running', () => (oomEvents(h).length > 0 ? true : undefined), 10_000);
  t.same(h.topics(), ['/tasks/create', '/tasks/start', '/tasks/oom'], 'the task still runs');
  await h.call('kill', { id: 'c1', execId: '', signal: 9, all: false });
  h.shim.engine.exit('c1', 137);
  await h.call('wait', { id: 'c1', execId: '' });
  await h.call('delete', { id: 'c1', execId: '' });
  await setKills(h.dir, 'v2', 2);
  await sleep(150);
  await settle();
  t.same(h.topics(), ['/tasks/create', '/tasks/start', '/tasks/oom', '/tasks/exit', '/tasks/delete'], 'one TaskOOM, nothing after Delete');
});

t.test('service: a cgroup that exists only from the start (native restore) is watched from then on', async (t) => {
  const h = await started(t, 'v1', { restore: true, cgroupFromStart: true });
  await setKills(h.dir, 'v1', 1);
  h.shim.engine.exit('c1', 137);
  await h.call('wait', { id: 'c1', execId: '' });
  t.same(h.topics(), ['/tasks/create', '/tasks/start', '/tasks/oom', '/tasks/exit']);
});

t.test('service: an engine without cgroupOf publishes no TaskOOM', async (t) => {
  const h = await started(t, 'v1', { withCgroup: false });
  await setKills(h.dir, 'v1', 1);
  h.shim.engine.exit('c1', 137);
  await h.call('wait', { id: 'c1', execId: '' });
  t.same(h.topics(), ['/tasks/create', '/tasks/start', '/tasks/exit']);
});
