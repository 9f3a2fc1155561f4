/**
 * GvisorEngine's exit paths over fake-runsc: exits of root containers and exec'd processes come
 * from the reaper when there is one (their runsc calls run inside its adopting window), from
 * `runsc wait` otherwise. The reaper here is a fake; test/runsc/reaper.test.ts covers the real one.
 */
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import t, { type Test } from 'tap';
import { resolveConfig } from '../../src/config/config.js';
import { runtimeIdFor } from '../../src/engine/container-id.js';
import { GvisorEngine } from '../../src/engine/gvisor.js';
import { ShimError } from '../../src/errors.js';
import { clearProbeCache } from '../../src/runsc/probe.js';
import type { ChildReaper, ReapedExit } from '../../src/runsc/reaper.js';

const FIXTURES = fileURLToPath(new URL('../fixtures/', import.meta.url));
const FAKE_RUNSC = join(FIXTURES, 'bin', 'fake-runsc');
const SANDBOX_PID = 4242;
const WAITER_PID = 5151;

/** A reaper whose exits the test settles; records the pids asked for and the adopting windows. */
function fakeReaper(known: readonly number[]) {
  const asked: number[] = [];
  let windows = 0;
  const exits = new Map<number, { promise: Promise<ReapedExit>; resolve: (status: number) => void }>();
  for (const pid of known) {
    let resolve = (_: number): void => undefined;
    const promise = new Promise<ReapedExit>((r) => (resolve = (status) => r({ pid, status, exitedAt: new Date(0) })));
    exits.set(pid, { promise, resolve });
  }
  const reaper = {
    adopting: async <T>(fn: () => Promise<T>): Promise<T> => {
      windows++;
      return fn();
    },
    exitOf: (pid: number): Promise<ReapedExit> => {
      asked.push(pid);
      return exits.get(pid)?.promise ?? Promise.reject(new ShimError('NotFound', `process ${pid} is not a child`));
    },
  };
  return { reaper: reaper as unknown as ChildReaper, asked, windows: () => windows, exit: (pid: number, status: number) => exits.get(pid)?.resolve(status) };
}

function world(t: Test, reaper: ChildReaper | null, o: { root?: boolean } = {}) {
  const dir = t.testdir({ bundle: { rootfs: {} }, runsc: {}, state: {} });
  const runscDir = join(dir, 'runsc');
  process.env.FAKE_RUNSC_DIR = runscDir;
  const put = (name: string, text: string): void => writeFileSync(join(runscDir, name), text);
  for (const [name, file] of [
    ['version.stdout', 'version.txt'],
    ['help-checkpoint.stdout', 'help-checkpoint.txt'],
    ['help-restore.stdout', 'help-restore.txt'],
    ['flags.stderr', 'flags.txt'],
  ] as const) {
    put(name, readFileSync(join(FIXTURES, 'runsc', '20240729', file), 'utf8'));
  }
  const bundle = join(dir, 'bundle');
  writeFileSync(join(bundle, 'config.json'), JSON.stringify({ ociVersion: '1.0.2', process: { args: ['/bin/true'], cwd: '/' }, root: { path: 'rootfs' } }));
  put('state.stdout', JSON.stringify({ ociVersion: '1.0.2', id: 'x', status: 'running', pid: SANDBOX_PID, bundle }));
  put('wait.stdout', JSON.stringify({ id: 'x', exitStatus: 5 }));
  mkdirSync(join(runscDir, 'exec.files'));
  mkdirSync(join(runscDir, 'create.files'));
  put('create.files/pid-file', String(SANDBOX_PID)); // what runsc writes: the sandbox's pid
  put('exec.files/pid-file', String(WAITER_PID));
  put('exec.files/internal-pid-file', '3');
  const config = resolveConfig({ stateDir: join(dir, 'state'), runsc: { path: FAKE_RUNSC } });
  clearProbeCache();
  const engine = new GvisorEngine({ config, reaper });
  const rid = runtimeIdFor('c1', '');
  // runsc names a root container's state file after itself and its sandbox (fake-runsc writes none).
  const runscRoot = join(dir, 'state', 'runsc');
  const markRoot = (): void => {
    mkdirSync(runscRoot, { recursive: true });
    writeFileSync(join(runscRoot, `${rid}_sandbox:${o.root === false ? 'another' : rid}.state`), '{}');
  };
  const calls = (verb: string): string[][] =>
    (existsSync(join(runscDir, 'calls')) ? readFileSync(join(runscDir, 'calls'), 'utf8') : '')
      .split('\x1e')
      .filter((c) => c !== '')
      .map((c) => c.split('\x1f').filter((a) => a !== ''))
      .filter((argv) => argv.includes(verb) && !argv.includes('help'));
  return { engine, bundle, rid, markRoot, calls };
}

t.test('a root container: the exit is the reaped sandbox status, and runsc wait never runs', async (t) => {
  const f = fakeReaper([SANDBOX_PID]);
  const w = world(t, f.reaper);
  const created = await w.engine.create({ id: 'c1', bundle: w.bundle, stdio: ['ignore', 'ignore', 'ignore'] });
  t.equal(created.pid, SANDBOX_PID);
  t.equal(f.windows(), 1, 'runsc create ran inside the reaper window');
  w.markRoot();
  await w.engine.start('c1');
  const waited = w.engine.wait('c1');
  f.exit(SANDBOX_PID, 3);
  t.same(await waited, { exitStatus: 3, exitedAt: new Date(0) });
  t.same(f.asked, [SANDBOX_PID]);
  t.same(w.calls('wait'), [], 'no runsc wait');
});

t.test('create and start report the sandbox pid from runsc create --pid-file, without runsc state', async (t) => {
  const f = fakeReaper([SANDBOX_PID]);
  const w = world(t, f.reaper);
  t.same(await w.engine.create({ id: 'c1', bundle: w.bundle, stdio: ['ignore', 'ignore', 'ignore'] }), { id: 'c1', status: 'created', pid: SANDBOX_PID });
  const [createArgv] = w.calls('create');
  t.ok(createArgv?.some((a) => a.startsWith('--pid-file=')), 'create is asked for a pid file');
  t.same(w.calls('state'), [], 'no runsc state after create');
  w.markRoot();
  // Once the app exited and its sandbox was reaped, runsc state could only say -1.
  writeFileSync(join(process.env.FAKE_RUNSC_DIR!, 'state.stdout'), JSON.stringify({ ociVersion: '1.0.2', id: 'x', status: 'stopped', pid: -1, bundle: w.bundle }));
  const states = w.calls('state').length;
  t.same(await w.engine.start('c1'), { id: 'c1', status: 'running', pid: SANDBOX_PID });
  t.equal(w.calls('state').length, states, 'no runsc state after start');
});

t.test('runsc wait reports the exit without a reaper, for a joined sandbox, or a sandbox that is not our child', async (t) => {
  for (const [name, reaper, root] of [
    ['no reaper', null, true],
    ['not the sandbox root', fakeReaper([SANDBOX_PID]).reaper, false],
    ['not our child', fakeReaper([]).reaper, true],
  ] as const) {
    await t.test(name, async (t) => {
      const w = world(t, reaper, { root });
      await w.engine.create({ id: 'c1', bundle: w.bundle, stdio: ['ignore', 'ignore', 'ignore'] });
      w.markRoot();
      await w.engine.start('c1');
      t.equal((await w.engine.wait('c1')).exitStatus, 5);
      t.equal(w.calls('wait').length, 1, 'runsc wait ran');
    });
  }
});

t.test('exec: the reaped waiter process gives the status; runsc wait --pid is the fallback', async (t) => {
  const spec = { process: { args: ['/bin/sh', '-c', 'exit 4'] }, stdio: ['ignore', 'ignore', 'ignore'] } as const;
  await t.test('reaped', async (t) => {
    const f = fakeReaper([WAITER_PID]);
    const w = world(t, f.reaper);
    await w.engine.create({ id: 'c1', bundle: w.bundle, stdio: ['ignore', 'ignore', 'ignore'] });
    const h = await w.engine.exec('c1', spec);
    t.equal(h.pid, WAITER_PID);
    t.equal(f.windows(), 2, 'runsc create and exec ran inside the reaper window');
    f.exit(WAITER_PID, 4);
    t.equal((await h.exited).exitStatus, 4);
    t.same(w.calls('wait'), []);
  });
  await t.test('the waiter is not our child', async (t) => {
    const w = world(t, fakeReaper([]).reaper);
    await w.engine.create({ id: 'c1', bundle: w.bundle, stdio: ['ignore', 'ignore', 'ignore'] });
    const h = await w.engine.exec('c1', spec);
    t.equal((await h.exited).exitStatus, 5);
    t.ok(w.calls('wait')[0]?.includes('--pid=3'), 'runsc wait --pid for the exec’d process');
  });
});
