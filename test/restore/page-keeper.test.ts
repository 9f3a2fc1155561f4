import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, readlinkSync, rmdirSync, statSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import t, { type Test } from 'tap';
import { PassThrough } from 'node:stream';
import { pino } from 'pino';
import { PageKeeper, defaultKeeperEntry, killTargets, runPageKeeper } from '../../src/restore/page-keeper.js';
import { loadUffdAddon } from '../../src/restore/pages-native.js';
import { until } from '../helpers/wait.js';
import { buildTarget, spawnTarget, uffdUsable, type Spawned } from './pages-helpers.js';

/**
 * The page keeper (restore/page-keeper.ts) as a real process: released with "done" its shell exits
 * and kills nothing; when the process that spawned it is SIGKILLed it execs node, which kills its
 * targets (pids with their descendants, cgroups) and exits. With a real userfaultfd (the uffd-target fixture standing
 * in for a restored task, a parent holding its uffd and serving nothing): the task blocks on its
 * missing page until the keeper kills it; without a keeper the same task reads zeros (the hazard).
 */
const SRC = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'src');
const KEEPER_MODULE = pathToFileURL(join(SRC, 'restore', 'page-keeper.ts')).href;
const PAGES_NATIVE_MODULE = pathToFileURL(join(SRC, 'restore', 'pages-native.ts')).href;

type LogLine = Record<string, unknown> & { msg?: string };

function logLines(path: string): LogLine[] {
  if (!existsSync(path)) return [];
  return readFileSync(path, 'utf8')
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as LogLine);
}

/** Alive and not a zombie. */
function alive(pid: number | undefined): boolean {
  if (pid === undefined) return false;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !['Z', 'X'].includes(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0] ?? '');
  } catch {
    return false;
  }
}

function exitOf(child: ChildProcess): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve({ code: child.exitCode, signal: child.signalCode });
  return new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
}

/**
 * `sh` with a `sleep` child: a small tree (the keeper must kill descendants too). The shell blocks
 * reading its stdin, so only a signal ends it, not its child's death.
 */
function spawnTree(t: Test): { sh: ChildProcess; sleepPid: () => number | undefined } {
  const sh = spawn('/bin/sh', ['-c', 'sleep 1000 & echo $!; read x'], { stdio: ['pipe', 'pipe', 'ignore'] });
  let out = '';
  sh.stdout?.on('data', (d: Buffer) => (out += d.toString()));
  t.teardown(() => {
    const p = Number(out.trim());
    if (p > 0 && alive(p)) process.kill(p, 'SIGKILL');
    sh.kill('SIGKILL');
  });
  return { sh, sleepPid: () => (Number(out.trim()) > 0 ? Number(out.trim()) : undefined) };
}

/** A node process (tap's loaders carried over) running `script`; its stdout lines are collected. */
function spawnParent(t: Test, script: string, args: string[]): { child: ChildProcess; out: () => string } {
  const child = spawn(process.execPath, [...process.execArgv, script, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout?.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (out += d.toString()));
  t.teardown(() => child.kill('SIGKILL'));
  return { child, out: () => out };
}

const line = (out: () => string, prefix: string) => () => out().split('\n').find((l) => l.startsWith(prefix));

/** Kills a keeper a failed test left behind. */
function reapKeeper(t: Test, pid: () => number | undefined): void {
  t.teardown(() => {
    const p = pid();
    if (p !== undefined && alive(p)) process.kill(p, 'SIGKILL');
  });
}

const root = await mkdtemp(join(tmpdir(), 'thaw-keeper-'));
t.teardown(() => rm(root, { recursive: true, force: true }));
let n = 0;
const scratch = () => {
  const dir = join(root, `k${++n}`);
  mkdirSync(dir);
  return dir;
};

t.test('"done": the keeper closes its fds and exits 0, nothing is killed', async (t) => {
  const dir = scratch();
  const logPath = join(dir, 'keeper.log');
  const tree = spawnTree(t);
  await until('sleep pid', tree.sleepPid, 10_000);
  const held = openSync('/dev/null', 'r'); // stands in for a userfaultfd: the keeper only holds it
  t.teardown(() => closeSync(held));
  const t0 = performance.now();
  const keeper = PageKeeper.spawn({ uffds: [held], id: 'c1', logPath, targets: { cgroupDirs: [], pids: [{ pid: tree.sh.pid!, startTime: 0 }] } });
  const spawnMs = performance.now() - t0;
  reapKeeper(t, () => keeper.pid);
  await keeper.ready;
  t.comment(`spawn ${spawnMs.toFixed(1)} ms (synchronous), ready after ${(performance.now() - t0).toFixed(0)} ms`);
  t.equal(readlinkSync(`/proc/${keeper.pid}/fd/3`), '/dev/null', 'the keeper holds the fd as its fd 3');
  t.equal(readFileSync(`/proc/${keeper.pid}/stat`, 'utf8').split(') ')[1]?.split(' ')[3], String(keeper.pid), 'own session (sid = its pid)');
  await keeper.release();
  t.same(await keeper.exited, { code: 0, signal: null }, 'exits 0');
  t.ok(alive(tree.sh.pid) && alive(tree.sleepPid()), 'the targets live on');
  const logs = logLines(logPath);
  t.match(logs, [{ msg: /^released/, phase: 'page-keeper', id: 'c1', pid: keeper.pid }], 'one line: released');
  t.ok(Math.abs(Number(logs[0]?.time) - Date.now()) < 60_000, 'with the time thaw sent');
});

t.test('the parent dies (SIGKILL): the keeper kills the targets and their descendants, then exits', async (t) => {
  const dir = scratch();
  const logPath = join(dir, 'keeper.log');
  const tree = spawnTree(t);
  const sleepPid = await until('sleep pid', tree.sleepPid, 10_000);
  const script = join(dir, 'parent.mjs');
  await writeFile(
    script,
    `const { PageKeeper } = await import(${JSON.stringify(KEEPER_MODULE)});
const [logPath, pid] = process.argv.slice(2);
const k = PageKeeper.spawn({ uffds: [0], id: 'c2', logPath, targets: { cgroupDirs: [], pids: [{ pid: Number(pid), startTime: 0 }] } });
await k.ready;
console.log('KEEPER ' + k.pid);
setInterval(() => {}, 1000);
`,
  );
  const parent = spawnParent(t, script, [logPath, String(tree.sh.pid)]);
  const keeperPid = Number((await until('the keeper', line(parent.out, 'KEEPER '), 60_000)).split(' ')[1]);
  reapKeeper(t, () => keeperPid);
  t.ok(alive(tree.sh.pid), 'the target runs while the parent lives');
  parent.child.kill('SIGKILL');
  t.same(await exitOf(tree.sh), { code: null, signal: 'SIGKILL' }, 'the target was SIGKILLed');
  await until('the sleep child to die', () => (alive(sleepPid) ? undefined : true), 10_000);
  t.pass('its descendant too');
  await until('the keeper to exit', () => (alive(keeperPid) ? undefined : true), 30_000);
  t.pass('the keeper exited');
  const logs = logLines(logPath);
  t.ok(logs.some((l) => l.msg === 'thaw went away before every page was in: killing the restored container'), 'the kill is logged');
  const done = logs.find((l) => l.msg === 'restored container killed; userfaultfds closed');
  t.ok(done, 'the outcome is logged');
  t.ok((done?.killed as number[]).includes(tree.sh.pid!) && (done?.killed as number[]).includes(sleepPid), `killed ${JSON.stringify(done?.killed)}`);
});

t.test('the parent dies right after the spawn, before it read "ready": the keeper still kills', async (t) => {
  const dir = scratch();
  const logPath = join(dir, 'keeper.log');
  const tree = spawnTree(t);
  await until('sleep pid', tree.sleepPid, 10_000);
  const script = join(dir, 'parent.mjs');
  await writeFile(
    script,
    `const { PageKeeper } = await import(${JSON.stringify(KEEPER_MODULE)});
const [logPath, pid] = process.argv.slice(2);
const k = PageKeeper.spawn({ uffds: [0], id: 'c6', logPath, targets: { cgroupDirs: [], pids: [{ pid: Number(pid), startTime: 0 }] } });
console.log('KEEPER ' + k.pid);
process.kill(process.pid, 'SIGKILL');
`,
  );
  const parent = spawnParent(t, script, [logPath, String(tree.sh.pid)]);
  const keeperPid = Number((await until('the keeper', line(parent.out, 'KEEPER '), 60_000)).split(' ')[1]);
  reapKeeper(t, () => keeperPid);
  t.same(await exitOf(tree.sh), { code: null, signal: 'SIGKILL' }, 'the target was SIGKILLed');
  await until('the keeper to exit', () => (alive(keeperPid) ? undefined : true), 30_000);
  t.ok(logLines(logPath).some((l) => l.msg === 'restored container killed; userfaultfds closed'), 'the kill is logged');
});

const cgroupSkip = process.getuid?.() !== 0 ? 'needs root (cgroups)' : !existsSync('/sys/fs/cgroup/cgroup.procs') && !existsSync('/sys/fs/cgroup/unified/cgroup.procs') ? 'no cgroup v2 hierarchy' : false;
t.test('killTargets empties cgroups: cgroup.kill on v2, SIGKILL of cgroup.procs on v1', { skip: cgroupSkip }, async (t) => {
  const name = `thaw-keeper-test-${process.pid}`;
  const v2 = existsSync('/sys/fs/cgroup/cgroup.procs') && existsSync('/sys/fs/cgroup/cgroup.kill') ? '/sys/fs/cgroup' : '/sys/fs/cgroup/unified';
  const v1 = ['/sys/fs/cgroup/pids', '/sys/fs/cgroup/freezer'].find((d) => existsSync(join(d, 'cgroup.procs')) && d !== v2);
  const cases: [string, string][] = [['v2', join(v2, name)]];
  if (v1 !== undefined) cases.push(['v1', join(v1, name)]);
  for (const [kind, dir] of cases) {
    mkdirSync(dir);
    t.teardown(() => {
      try {
        rmdirSync(dir);
      } catch {
        // busy or gone
      }
    });
    const tree = spawnTree(t);
    const sleepPid = await until('sleep pid', tree.sleepPid, 10_000);
    writeFileSync(join(dir, 'cgroup.procs'), String(tree.sh.pid));
    writeFileSync(join(dir, 'cgroup.procs'), String(sleepPid));
    const r = await killTargets({ cgroupDirs: [dir] }, 10_000);
    t.same(r.alive, [], `${kind}: nothing left alive`);
    t.same(await exitOf(tree.sh), { code: null, signal: 'SIGKILL' }, `${kind}: the cgroup's processes were SIGKILLed`);
    await until('the sleep child to die', () => (alive(sleepPid) ? undefined : true), 10_000);
    t.equal(readFileSync(join(dir, 'cgroup.procs'), 'utf8').trim(), '', `${kind}: the cgroup is empty`);
  }
});

t.test('runPageKeeper: a cgroup re-created since the keeper was spawned (another container) is left alone', { skip: cgroupSkip }, async (t) => {
  const base = existsSync('/sys/fs/cgroup/cgroup.kill') ? '/sys/fs/cgroup' : '/sys/fs/cgroup/unified';
  const dir = join(base, `thaw-keeper-reuse-${process.pid}`);
  mkdirSync(dir);
  t.teardown(() => {
    try {
      rmdirSync(dir);
    } catch {
      // busy or gone
    }
  });
  const logs: LogLine[] = [];
  const log = pino({ level: 'debug' }, { write: (l: string) => void logs.push(JSON.parse(l) as LogLine) });
  const input = new PassThrough();
  let ready = false;
  // As PageKeeper.spawn records it, when the keeper starts guarding.
  const cgroupInodes = { [dir]: String(statSync(dir, { bigint: true }).ino) };
  rmdirSync(dir); // the guarded container is gone; a new one gets the same path
  mkdirSync(dir);
  const run = runPageKeeper({ id: 'reuse', uffds: [], targets: { cgroupDirs: [dir] }, killTimeoutMs: 5_000, cgroupInodes }, { input, log, ready: () => (ready = true) });
  t.ok(ready, 'ready once it listens');
  const tree = spawnTree(t);
  const sleepPid = await until('sleep pid', tree.sleepPid, 10_000);
  writeFileSync(join(dir, 'cgroup.procs'), String(tree.sh.pid));
  input.end(); // EOF without "done": thaw died
  t.equal(await run, 0);
  t.ok(alive(tree.sh.pid) && alive(sleepPid), 'the new container was not touched');
  t.match(logs.find((l) => l.msg === 'cgroups re-created since: left alone'), { dirs: [dir] });
  process.kill(tree.sh.pid!, 'SIGKILL');
  process.kill(sleepPid, 'SIGKILL');
  await exitOf(tree.sh);
});

t.test('a keeper that cannot start: ready rejects, exited resolves', async (t) => {
  const dir = scratch();
  const k = PageKeeper.spawn({ uffds: [], id: 'c3', logPath: join(dir, 'keeper.log'), targets: { cgroupDirs: [] }, shell: '/bin/false' });
  await t.rejects(k.ready, { name: 'ShimError', code: 'Unavailable', message: /page keeper failed to start: it exited \(code 1/ });
  t.equal((await k.exited).code, 1);
  await k.release(); // nothing to release: resolves
  const gone = PageKeeper.spawn({ uffds: [], id: 'c4', logPath: join(dir, 'keeper.log'), targets: { cgroupDirs: [] }, shell: join(dir, 'no-shell') });
  await t.rejects(gone.ready, { code: 'Unavailable', message: /ENOENT/ });
  t.same(await gone.exited, { code: null, signal: null }, 'never started');
  t.throws(() => PageKeeper.spawn({ uffds: [], id: 'c5', logPath: join(dir, 'no-dir', 'x', 'keeper.log'), targets: { cgroupDirs: [] } }), { code: 'Unavailable', message: /cannot open its log/ });
});

// ---- with a real userfaultfd ----

const load = loadUffdAddon();
const uffdSkip = load.binding === null ? `page server addon not built: ${load.error.message}` : uffdUsable();
const PAGES = 1024;

/**
 * A parent that plays thaw's page server without serving: takes the fixture's uffd over CRIU's
 * protocol, optionally spawns a keeper for it, says HOLDING and waits to be killed.
 */
async function uffdParent(t: Test, withKeeper: boolean): Promise<{ app: Spawned; parent: ReturnType<typeof spawnParent>; logPath: string; keeperPid: number | undefined }> {
  const dir = scratch();
  const built = await buildTarget(dir);
  if ('skip' in built) throw new Error(built.skip);
  const socket = join(dir, 'lazy-pages.socket');
  const logPath = join(dir, 'keeper.log');
  const script = join(dir, 'parent.mjs');
  await writeFile(
    script,
    `const { loadUffdAddon } = await import(${JSON.stringify(PAGES_NATIVE_MODULE)});
const { PageKeeper } = await import(${JSON.stringify(KEEPER_MODULE)});
const [socket, logPath, withKeeper] = process.argv.slice(2);
const b = loadUffdAddon().binding;
const listenFd = b.listen(socket);
const cancelFd = b.createCancel();
console.log('LISTENING');
const client = await b.accept(listenFd, cancelFd, 60000);
let task;
for (;;) {
  const m = await b.receive(client, cancelFd, 60000);
  if (m.kind === 'task') task = m;
  else if (m.kind === 'finished') break;
  else throw new Error('unexpected ' + m.kind);
}
if (withKeeper === 'yes') {
  const k = PageKeeper.spawn({ uffds: [task.uffd], id: 'uffd', logPath, targets: { cgroupDirs: [], pids: [{ pid: task.pid, startTime: 0 }] } });
  await k.ready;
  console.log('KEEPER ' + k.pid);
}
console.log('HOLDING ' + task.pid);
setInterval(() => {}, 1000);
`,
  );
  const parent = spawnParent(t, script, [socket, logPath, withKeeper ? 'yes' : 'no']);
  await until('the parent to listen', line(parent.out, 'LISTENING'), 60_000);
  const app = spawnTarget(built.path, socket, PAGES, 7, ['verify']);
  t.teardown(() => app.child.kill('SIGKILL'));
  await until('the parent to hold the uffd', line(parent.out, 'HOLDING '), 60_000);
  const keeper = line(parent.out, 'KEEPER ')();
  const keeperPid = keeper === undefined ? undefined : Number(keeper.split(' ')[1]);
  reapKeeper(t, () => keeperPid);
  // The app touches its first page right after "finished" and waits for it.
  await until('the app to block on its missing page', () => (readFileSync(`/proc/${app.child.pid}/wchan`, 'utf8').includes('userfault') ? true : undefined), 10_000);
  return { app, parent, logPath, keeperPid };
}

t.test('real uffd, no keeper: the parent dies and the app reads zeros (the hazard the keeper closes)', { skip: uffdSkip }, async (t) => {
  const { app, parent } = await uffdParent(t, false);
  parent.child.kill('SIGKILL');
  const exit = await app.exit;
  t.not(exit.code, 0, 'the app saw wrong memory');
  t.match(app.output(), /BAD page 0 word 0: 0000000000000000/, 'zeros where its memory had not arrived');
});

t.test('real uffd, keeper: the parent dies, the app blocks on its missing page until the keeper kills it', { skip: uffdSkip }, async (t) => {
  const { app, parent, logPath, keeperPid } = await uffdParent(t, true);
  t.ok(keeperPid !== undefined && alive(keeperPid), 'keeper running');
  parent.child.kill('SIGKILL');
  t.same(await app.exit, { code: null, signal: 'SIGKILL' }, 'killed, never ran on zeros');
  t.notMatch(app.output(), /BAD|VERIFY/, 'the app never got past its missing page');
  await until('the keeper to exit', () => (alive(keeperPid) ? undefined : true), 30_000);
  const logs = logLines(logPath);
  t.match(logs[0]?.uffds, [{ fd: 3, file: 'anon_inode:[userfaultfd]' }], 'the keeper held the userfaultfd');
  t.ok(logs.some((l) => l.msg === 'restored container killed; userfaultfds closed'), 'kill logged');
});

t.test('the keeper entry is found beside the module, at the top of a bundle, or spawn is refused', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'thaw-keeper-entry-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  mkdirSync(join(dir, 'bundle', 'chunks'), { recursive: true });
  const chunk = pathToFileURL(join(dir, 'bundle', 'chunks', 'chunk-X.js')).href;
  t.throws(() => defaultKeeperEntry(chunk), { code: 'Unavailable', message: /no entry at/ }, 'nothing to exec: refused');
  writeFileSync(join(dir, 'bundle', 'page-keeper-main.js'), '');
  t.equal(defaultKeeperEntry(chunk), join(dir, 'bundle', 'page-keeper-main.js'), "the bundle's top");
  writeFileSync(join(dir, 'bundle', 'chunks', 'page-keeper-main.js'), '');
  t.equal(defaultKeeperEntry(chunk), join(dir, 'bundle', 'chunks', 'page-keeper-main.js'), 'beside the module first');
  t.ok(existsSync(defaultKeeperEntry()), 'from this checkout');
});
