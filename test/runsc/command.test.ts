import { closeSync, openSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import { runCommand, type CommandOptions } from '../../src/runsc/command.js';

const base: CommandOptions = { stdio: ['ignore', 'pipe', 'pipe'], timeoutMs: 10_000, forceKillAfterMs: 2_000, maxBufferBytes: 1 << 20 };
const sh = (script: string, o: Partial<CommandOptions> = {}) => runCommand('/bin/sh', ['-c', script], { ...base, ...o });

/** Kills, at the end of the test, the background job whose pid a script wrote to `file`. */
function killListedAtEnd(t: Test, file: string): void {
  const pid = Number(readFileSync(file, 'utf8').trim());
  t.teardown(() => {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  });
}

t.test('captures stdout and stderr and reports the exit code', async (t) => {
  t.match(await sh('printf out; printf err >&2'), { ok: true, stdout: 'out', stderr: 'err', exitCode: 0, signal: undefined });
  t.match(await sh('echo nope; exit 3'), { ok: false, stdout: 'nope\n', exitCode: 3, timedOut: false, canceled: false });
  t.match(await sh('kill -KILL $$'), { ok: false, exitCode: undefined, signal: 'SIGKILL' });
});

t.test('fds are handed through and not waited for', async (t) => {
  const dir = t.testdir();
  const file = join(dir, 'out');
  const pids = join(dir, 'pids');
  const fd = openSync(file, 'a');
  try {
    const t0 = Date.now();
    // A background job keeps the fd for 20 s, as runsc's sandbox keeps create's stdio.
    const r = await sh(`echo to-fd; sleep 20 & echo $! >${pids}; exit 0`, { stdio: ['ignore', fd, 'ignore'] });
    killListedAtEnd(t, pids);
    t.ok(r.ok);
    t.ok(Date.now() - t0 < 5_000, 'returned when the command exited');
  } finally {
    closeSync(fd);
  }
  t.equal(readFileSync(file, 'utf8'), 'to-fd\n');
});

t.test('a timeout sends SIGTERM, then SIGKILL to a child that ignores it', async (t) => {
  let t0 = Date.now();
  t.match(await sh('exec sleep 20', { timeoutMs: 200 }), { ok: false, timedOut: true, signal: 'SIGTERM' });
  t.ok(Date.now() - t0 < 5_000, 'returned at the timeout');
  const stubborn = await sh("trap '' TERM; while :; do sleep 0.1; done", { timeoutMs: 200, forceKillAfterMs: 300 });
  t.match(stubborn, { ok: false, timedOut: true, signal: 'SIGKILL' });
  // The shell dies, its `sleep` keeps the pipes: the result does not wait for it.
  const pids = join(t.testdir(), 'pids');
  t0 = Date.now();
  t.match(await sh(`sleep 5 & echo $! >${pids}; wait`, { timeoutMs: 200 }), { ok: false, timedOut: true });
  killListedAtEnd(t, pids);
  t.ok(Date.now() - t0 < 4_000, `not held by a grandchild (${Date.now() - t0} ms)`);
});

t.test('abort kills the child and says canceled', async (t) => {
  const ac = new AbortController();
  setTimeout(() => ac.abort(), 200);
  t.match(await sh('exec sleep 20', { signal: ac.signal }), { ok: false, canceled: true, signal: 'SIGTERM' });
});

t.test('a command that cannot start has a spawn error, not an exit code', async (t) => {
  const r = await runCommand('/nonexistent/runsc', [], base);
  t.equal(r.ok, false);
  t.equal(r.exitCode, undefined);
  t.match(r.spawnError, { code: 'ENOENT' });
});

t.test('output beyond the limit kills the child', async (t) => {
  const r = await sh('exec yes', { maxBufferBytes: 64 * 1024 });
  t.equal(r.ok, false);
  t.equal(r.overflow, true);
  t.ok(r.stdout.length <= 64 * 1024);
});
