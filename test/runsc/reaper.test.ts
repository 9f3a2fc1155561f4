import { execFile, spawn } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { promisify } from 'node:util';
import t from 'tap';
import { createLogger } from '../../src/log/logger.js';
import { ChildReaper, childReaper, enableChildReaper } from '../../src/runsc/reaper.js';
import { loadReaperAddon, type ReaperBinding, type WaitExitResult } from '../../src/runsc/reaper-native.js';

const run = promisify(execFile);
const addon = loadReaperAddon();
const noAddon = addon.binding === null ? `reaper addon not built (${addon.error.message}): npm run build:native` : false;

/**
 * Starts `script` in the background of a short-lived `sh` (so the background job is orphaned when
 * `sh` exits) and returns the job's pid. Its stdio goes to /dev/null so that `sh`'s pipe closes.
 */
async function orphan(script: string): Promise<number> {
  const { stdout } = await run('/bin/sh', ['-c', `(${script}) </dev/null >/dev/null 2>&1 & echo $!`]);
  return Number(stdout.trim());
}

/** A binding that records calls; exits are settled by the test. */
function fakeBinding() {
  const calls: string[] = [];
  const pending = new Map<number, (r: WaitExitResult) => void>();
  const binding: ReaperBinding = {
    setChildSubreaper: (on) => {
      calls.push(`subreaper ${on}`);
      return 0;
    },
    pidfdSupport: () => 0,
    waitExit: (pid) => {
      calls.push(`wait ${pid}`);
      return new Promise((resolve) => pending.set(pid, resolve));
    },
  };
  const exit = (pid: number, r: Partial<WaitExitResult>): void => pending.get(pid)?.({ pid, errno: 0, code: 0, signal: 0, ...r });
  return { binding, calls, exit };
}

t.test('adopting: the subreaper flag is on only while calls run, shared by concurrent ones', async (t) => {
  const f = fakeBinding();
  const reaper = new ChildReaper({ binding: f.binding, listChildren: () => [] });
  t.teardown(() => reaper.close());
  let release = (): void => undefined;
  const first = reaper.adopting(() => new Promise<void>((r) => (release = r)));
  const second = reaper.adopting(async () => 'done');
  t.equal(await second, 'done', 'the result of fn');
  t.same(f.calls, ['subreaper true'], 'still on while the first call runs');
  release();
  await first;
  t.same(f.calls, ['subreaper true', 'subreaper false']);
  await t.rejects(
    reaper.adopting(async () => {
      throw new Error('runsc failed');
    }),
    /runsc failed/,
  );
  t.same(f.calls.slice(2), ['subreaper true', 'subreaper false'], 'off again after a failure');
});

t.test('orphans are adopted once; exits map to containerd statuses; libuv children are left alone', async (t) => {
  const f = fakeBinding();
  let children = [101];
  const reaper = new ChildReaper({ binding: f.binding, listChildren: () => children });
  t.teardown(() => reaper.close());
  const libuvChild = spawn('/bin/sleep', ['5']);
  t.teardown(() => libuvChild.kill('SIGKILL'));
  t.same(reaper.adoptOrphans(), [], 'children present before the reaper are not judged');
  children = [libuvChild.pid!, 101, 201, 202, 203];
  t.same(await reaper.adopting(async () => reaper.adoptOrphans()), [201, 202, 203], 'new non-libuv children');
  t.same(reaper.adoptOrphans(), [], 'each waited for once');
  t.same(f.calls.filter((c) => c.startsWith('wait')), ['wait 201', 'wait 202', 'wait 203']);
  const exits = [reaper.exitOf(201), reaper.exitOf(202), reaper.exitOf(203)];
  f.exit(201, { code: 3 });
  f.exit(202, { signal: 9 });
  f.exit(203, { errno: 10 });
  t.match(await exits[0], { pid: 201, status: 3 });
  t.match(await exits[1], { pid: 202, status: 137 }, '128 + SIGKILL');
  await t.rejects(exits[2]!, { code: 'NotFound' }, 'ECHILD: not our child');
  t.match(await reaper.exitOf(201), { status: 3 }, 'a reaped exit stays readable for a late caller');
  await t.rejects(reaper.exitOf(libuvChild.pid!), { code: 'InvalidArgument' }, 'child_process reaps its own');
  await t.rejects(reaper.exitOf(101), { code: 'InvalidArgument' }, 'so does whoever started a child the reaper found');
});

t.test('enableChildReaper: null without the addon or pidfds; one reaper per process, logging through the latest logger', async (t) => {
  const f = fakeBinding();
  t.equal(enableChildReaper({ binding: null }), null, 'no addon');
  t.equal(enableChildReaper({ binding: { ...f.binding, pidfdSupport: () => 38 } }), null, 'ENOSYS from pidfd_open');
  t.equal(enableChildReaper({ binding: { ...f.binding, setChildSubreaper: () => 1 } }), null, 'prctl refused');
  t.equal(childReaper(), null);
  const lines: Record<string, string[]> = { first: [], second: [] };
  const loggerFor = (name: string) => createLogger({ level: 'debug', destination: { write: (line: string) => void lines[name]!.push(line) } });
  let prctlErrno = 0;
  const reaper = enableChildReaper({ binding: { ...f.binding, setChildSubreaper: () => prctlErrno }, log: loggerFor('first') });
  t.ok(reaper);
  t.equal(childReaper(), reaper);
  // A recycled server enables it again for its next container: the same reaper, that container's logger.
  t.equal(enableChildReaper({ binding: null, log: loggerFor('second') }), reaper, 'kept');
  prctlErrno = 1; // the subreaper window's prctl fails: the reaper warns
  await reaper!.adopting(async () => undefined);
  t.equal(lines.first!.length, 0, "nothing through the first container's logger");
  t.match(lines.second!.join(''), /PR_SET_CHILD_SUBREAPER/, 'the warning went through the latest one');
  reaper?.close();
});

t.test('with the addon: real orphans, statuses and the subreaper window', { skip: noAddon }, async (t) => {
  const reaper = new ChildReaper({ binding: addon.binding! });
  t.teardown(() => reaper.close());

  const [exited, killed] = await reaper.adopting(() => Promise.all([orphan('sleep 0.3; exit 7'), orphan('exec sleep 30')]));
  const t0 = performance.now();
  setTimeout(() => process.kill(killed, 'SIGTERM'), 100);
  t.match(await reaper.exitOf(killed), { pid: killed, status: 143 }, 'SIGTERM: 128 + 15');
  t.match(await reaper.exitOf(exited), { pid: exited, status: 7 }, 'exit code');
  t.ok(performance.now() - t0 < 5_000, 'exits arrive at once');
  await t.rejects(readFile(`/proc/${exited}/stat`), { code: 'ENOENT' }, 'reaped: no zombie left');

  const outside = await orphan('sleep 0.2');
  await t.rejects(reaper.exitOf(outside), { code: 'NotFound' }, 'outside adopting() an orphan goes to init');
  await t.rejects(reaper.exitOf(1), { code: 'NotFound' });

  // More waits than libuv has pool threads: file I/O still runs (the waits poll pidfds in the loop).
  const many = await reaper.adopting(() => Promise.all(Array.from({ length: 8 }, (_, i) => orphan(`sleep 1; exit ${i}`))));
  const io = performance.now();
  await readFile('/proc/self/status');
  t.ok(performance.now() - io < 500, 'fs not starved by pending waits');
  t.same((await Promise.all(many.map((pid) => reaper.exitOf(pid)))).map((e) => e.status), [0, 1, 2, 3, 4, 5, 6, 7]);

  // A child_process child started inside a window stays libuv's: its 'exit' still arrives.
  const child = await reaper.adopting(async () => spawn('/bin/sh', ['-c', 'sleep 0.2; exit 9']));
  t.same(reaper.adoptOrphans(), [], 'not adopted');
  const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
  t.equal(code, 9);
});

t.test('a missing addon build is reported, not thrown', async (t) => {
  const missing = loadReaperAddon('/nonexistent/thaw_reaper.node');
  t.equal(missing.binding, null);
  t.match(missing, { path: '/nonexistent/thaw_reaper.node', error: Error });
});
