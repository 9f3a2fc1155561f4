import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, openSync, closeSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { allPids, cgroupProcs, fdTarget, holdersOf, procStat, procTable, processTree } from '../src/procfs.js';

t.test('procStat: this process, its parent, a missing pid', async (t) => {
  const me = procStat(process.pid)!;
  t.ok(['R', 'S'].includes(me.state), `state ${me.state}`);
  t.equal(me.ppid, process.ppid);
  t.ok(me.startTime > 0);
  t.equal(procStat(2 ** 22 + 1), null, 'beyond pid_max: null');
  t.ok(allPids().includes(process.pid));
  t.equal(procTable().get(process.pid)?.ppid, process.ppid);
});

t.test('processTree follows parents; holdersOf finds who holds a file; fdTarget reads a link', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'thaw-procfs-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  // sh holds the file open on fd 3 and has a sleeping child.
  const held = join(dir, 'held.log');
  writeFileSync(held, '');
  const fd = openSync(held, 'a');
  const sh = spawn('sh', ['-c', 'sleep 30 & wait'], { stdio: ['ignore', 'ignore', 'ignore', fd] });
  closeSync(fd);
  t.teardown(() => {
    sh.kill('SIGKILL');
  });
  let tree: number[] = [];
  for (let i = 0; i < 100 && tree.length < 2; i++) {
    tree = processTree([sh.pid!]);
    await new Promise((r) => setTimeout(r, 20));
  }
  t.equal(tree[0], sh.pid, 'the root first');
  t.equal(tree.length, 2, 'sh and its sleep');
  const holders = holdersOf([`${dir}/`]);
  t.ok(holders.includes(sh.pid!), `sh holds the file (holders ${holders.join(',')})`);
  t.notOk(holders.includes(process.pid), 'never this process');
  t.equal(fdTarget(3, sh.pid!), held);
  t.equal(fdTarget(9999), '', 'no such fd');
  for (const pid of tree) process.kill(pid, 'SIGKILL');
  await once(sh, 'exit');
});

t.test('cgroupProcs reads cgroup.procs of each directory; a missing one is skipped', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'thaw-procfs-cg-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  mkdirSync(join(dir, 'a'));
  mkdirSync(join(dir, 'b'));
  writeFileSync(join(dir, 'a', 'cgroup.procs'), '10\n11\n');
  writeFileSync(join(dir, 'b', 'cgroup.procs'), '11\n12\n\n');
  t.same(cgroupProcs([join(dir, 'a'), join(dir, 'b'), join(dir, 'missing')]).sort(), [10, 11, 12]);
});
