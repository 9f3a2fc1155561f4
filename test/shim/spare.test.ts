/**
 * Spare servers (src/shim/spare.ts) and the hand-over with the real sh launcher
 * (bin/containerd-shim-thaw-v2): this test process registers as the spare, the launcher's `start`
 * claims it. The launcher is copied into a temporary bin/ so that its registry is the test's own.
 */
import { spawn } from 'node:child_process';
import { copyFileSync, existsSync, fstatSync, mkdirSync, mkdtempSync, openSync, readdirSync, renameSync, rmSync, symlinkSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import t, { type Test } from 'tap';
import { ShimError } from '../../src/errors.js';
import type { StartPlan } from '../../src/shim/manager.js';
import type { ShimServer } from '../../src/shim/serve.js';
import { SwitchableDestination } from '../../src/log/logger.js';
import {
  adoptEnvironment,
  afterServing,
  binDirOf,
  CodeStamp,
  ensureSpare,
  handleClaim,
  liveSpares,
  RecyclePolicy,
  retireWhenUnneeded,
  SpareRequests,
  SpareSlot,
  sparesInDemand,
  spareRegistry,
  whySpareUnneeded,
  type ClaimDeps,
  type SpareClaim,
  type SpareStatus,
} from '../../src/shim/spare.js';
import { pidExists as isAlive } from '../../src/procfs.js';

const REPO_LAUNCHER = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'bin', 'containerd-shim-thaw-v2');
const START_FLAGS = ['-namespace', 'ns1', '-address', '/run/containerd/containerd.sock', '-publish-binary', '/usr/bin/containerd', '-id', 'c1'];

interface Install {
  launcher: string;
  registry: string;
  /** A PATH whose `node` is a stub printing `node-was-run` and its stdin: the TypeScript start. */
  path: string;
}

function install(t: Test): Install {
  const root = mkdtempSync(join(tmpdir(), 'thaw-spare-'));
  const bin = join(root, 'bin');
  mkdirSync(bin);
  const launcher = join(bin, 'containerd-shim-thaw-v2');
  copyFileSync(REPO_LAUNCHER, launcher);
  const stubs = join(root, 'stubs');
  mkdirSync(stubs);
  writeFileSync(join(stubs, 'node'), '#!/bin/sh\necho node-was-run\ncat\n', { mode: 0o755 });
  const registry = spareRegistry(binDirOf(launcher));
  t.teardown(() => {
    rmSync(root, { recursive: true, force: true });
    rmSync(dirname(registry), { recursive: true, force: true }); // <SPARE_ROOT><root>/bin: <root> is ours
  });
  return { launcher, registry, path: `${stubs}:${process.env.PATH ?? '/usr/bin:/bin'}` };
}

interface Started {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs the launcher's `start` in `cwd` with `stdin`, as containerd does. */
function start(inst: Install, o: { cwd: string; stdin?: string; env?: Record<string, string> }): Promise<Started> {
  return new Promise((resolve, reject) => {
    const child = spawn(inst.launcher, [...START_FLAGS, 'start'], {
      cwd: o.cwd,
      env: { PATH: inst.path, TTRPC_ADDRESS: '/run/containerd/containerd.sock.ttrpc', ...o.env },
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
    child.stdin.end(o.stdin ?? '');
  });
}

function bundleDir(t: Test): string {
  const dir = mkdtempSync(join(tmpdir(), 'thaw-spare-bundle-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

t.test('a waiting spare gets the start: argv, cwd, env and stdin; its answer is what start prints', async (t) => {
  const inst = install(t);
  const slot = await SpareSlot.register(inst.registry);
  t.ok(slot, 'registered');
  t.same(await liveSpares(inst.registry), [process.pid], 'listed as waiting');
  const cwd = bundleDir(t);
  const claimed = slot!.waitForClaim();
  const started = start(inst, { cwd, stdin: 'options\0bytes', env: { GRPC_ADDRESS: '/run/containerd/containerd.sock' } });
  const claim = (await claimed) as SpareClaim;
  t.same(claim.request.argv, [...START_FLAGS, 'start']);
  t.equal(claim.request.cwd, cwd);
  t.equal(claim.request.env.TTRPC_ADDRESS, '/run/containerd/containerd.sock.ttrpc');
  t.equal(claim.request.env.GRPC_ADDRESS, '/run/containerd/containerd.sock');
  t.equal(Buffer.from(claim.request.stdin).toString(), 'options\0bytes', 'stdin byte for byte');
  t.same(await liveSpares(inst.registry), [], 'claimed: no longer waiting');
  await claim.answer('ok', 'unix:///run/containerd/s/abc');
  const r = await started;
  t.equal(r.code, 0, r.stderr);
  t.equal(r.stdout, 'unix:///run/containerd/s/abc', 'printed exactly, no node run');
  t.equal(r.stderr, '', 'nothing else in containerd-visible output');
  await waitFor(() => readdirSync(inst.registry).length === 0); // removed in the background
  t.pass('the claim directory is removed');

  // The group had a server already: the spare stays one, under a new name.
  await slot!.reregister();
  t.same(await liveSpares(inst.registry), [process.pid], 'waiting again');
  const again = slot!.waitForClaim();
  const second = start(inst, { cwd });
  const claim2 = (await again) as SpareClaim;
  await claim2.answer('error', 'containerd-shim-thaw-v2: shim id cannot be empty\n');
  const r2 = await second;
  t.equal(r2.code, 1, 'an error answer fails start');
  t.equal(r2.stdout, '');
  t.equal(r2.stderr, 'containerd-shim-thaw-v2: shim id cannot be empty\n', 'with the message on stderr');
});

t.test('a spare that declines: the TypeScript start runs, with the same stdin', async (t) => {
  const inst = install(t);
  const slot = await SpareSlot.register(inst.registry);
  const claimed = slot!.waitForClaim();
  const started = start(inst, { cwd: bundleDir(t), stdin: 'the-options' });
  await ((await claimed) as SpareClaim).answer('declined', '');
  const r = await started;
  t.equal(r.code, 0, r.stderr);
  t.equal(r.stdout, 'node-was-run\nthe-options', 'node got containerd stdin that the spare had read');
});

t.test('no spare, or only a dead one: straight to the TypeScript start', async (t) => {
  const inst = install(t);
  const none = await start(inst, { cwd: bundleDir(t), stdin: 'x' });
  t.equal(none.stdout, 'node-was-run\nx', 'no registry at all');
  // A spare directory whose process is gone (a pid that cannot exist) is skipped.
  mkdirSync(join(inst.registry, 'spare.2147483646-1'), { recursive: true });
  const dead = await start(inst, { cwd: bundleDir(t), stdin: 'y' });
  t.equal(dead.stdout, 'node-was-run\ny');
  t.equal(dead.stderr, '');
  t.same(await liveSpares(inst.registry), [], 'liveSpares removes the dead one');
  t.notOk(existsSync(join(inst.registry, 'spare.2147483646-1')));
});

t.test('a spare still booting is waited for rather than starting Node', async (t) => {
  const inst = install(t);
  mkdirSync(inst.registry, { recursive: true });
  writeFileSync(join(inst.registry, 'booting'), `${process.pid}\n`);
  const started = start(inst, { cwd: bundleDir(t) });
  await new Promise((r) => setTimeout(r, 300)); // the launcher polls meanwhile
  const slot = await SpareSlot.register(inst.registry);
  t.notOk(existsSync(join(inst.registry, 'booting')), 'registering clears the marker it was booted under');
  const claim = (await slot!.waitForClaim()) as SpareClaim;
  await claim.answer('ok', 'unix:///late');
  const r = await started;
  t.equal(r.stdout, 'unix:///late', 'the late spare served it');
});

t.test('retire: out of the registry, and a pending wait ends without a claim', async (t) => {
  const inst = install(t);
  const slot = await SpareSlot.register(inst.registry);
  const waiting = slot!.waitForClaim();
  t.equal(await slot!.retire(), true);
  t.equal(await waiting, undefined);
  t.same(readdirSync(inst.registry), [], 'nothing left behind');
  t.equal(await slot!.retire(), false, 'a second retire finds nothing (as if claimed)');
});

t.test('one spare is enough: a second one does not register', async (t) => {
  const inst = install(t);
  const first = await SpareSlot.register(inst.registry);
  t.ok(first);
  t.equal(await SpareSlot.register(inst.registry), undefined, 'same process counts as the waiting spare');
});

t.test('recycle: a server whose container is gone waits again under a new name, unless another spare waits', async (t) => {
  const inst = install(t);
  const slot = await SpareSlot.register(inst.registry);
  const claim = (): void => {
    // What the launcher's `mv -T` does to the waiting directory.
    const name = readdirSync(inst.registry).find((n) => n.startsWith('spare.'))!;
    renameSync(join(inst.registry, name), join(inst.registry, name.replace('spare.', 'claim.')));
  };
  claim();
  t.same(await liveSpares(inst.registry), [], 'claimed: none waits');
  t.equal(await slot!.recycle(), true, 'waits again');
  t.same(await liveSpares(inst.registry), [process.pid]);
  t.ok(existsSync(join(inst.registry, `spare.${process.pid}-2`)), 'under its next generation');
  claim();
  mkdirSync(join(inst.registry, 'spare.1-1')); // another live process (init) waits as a spare
  t.equal(await slot!.recycle(), false, 'one spare is enough: this one is to exit');
  t.same(await liveSpares(inst.registry), [1]);
  t.equal(await slot!.recycle(2), true, 'room for two (spares in demand): it waits beside the other');
  t.same((await liveSpares(inst.registry)).sort((a, b) => a - b), [1, process.pid]);
  claim();
  mkdirSync(join(inst.registry, `spare.${process.ppid}-1`));
  t.equal(await slot!.recycle(2), false, 'two wait already: no room');
});

t.test('afterServing: closes the container log, then waits as a spare again, or exits leaving a spare behind', async (t) => {
  const inst = install(t);
  const dir = mkdtempSync(join(tmpdir(), 'thaw-after-'));
  const cwd = process.cwd();
  t.teardown(() => {
    process.chdir(cwd);
    rmSync(dir, { recursive: true, force: true });
  });
  const config = (spare: boolean): string => {
    const file = join(dir, `config-${spare}.json`);
    writeFileSync(file, JSON.stringify({ shim: { spare } }));
    return file;
  };
  let shutDown = (): void => undefined;
  const server = (configPath: string, done: Promise<void> = Promise.resolve()): ShimServer =>
    ({ shutdown: { failures: [] }, configPath, done }) as unknown as ShimServer;
  const slot = (await SpareSlot.register(inst.registry))!;
  const claim = (): void => {
    const name = readdirSync(inst.registry).find((n) => n.startsWith('spare.'))!;
    renameSync(join(inst.registry, name), join(inst.registry, name.replace('spare.', 'claim.')));
  };
  const policy = new RecyclePolicy({ maxContainers: 100, maxRssBytes: 2 ** 40 });
  const serverLog = new SwitchableDestination();

  claim();
  let logFd = openSync(join(dir, 'log-1'), 'a');
  serverLog.switchTo(logFd);
  let boots = 0;
  const requests = new SpareRequests(async () => 1000 + ++boots, () => false, 60_000);
  requests.request('answered');
  let settled = false;
  const running = afterServing({
    server: server(config(true), new Promise<void>((r) => (shutDown = r))),
    policy,
    slot,
    codeUnchanged: true,
    serverLog,
    spareRequests: requests,
  }).finally(() => (settled = true));
  await new Promise((r) => setTimeout(r, 50));
  t.notOk(settled, 'nothing happens while the server still serves its container');
  t.doesNotThrow(() => fstatSync(logFd), 'its log stays open meanwhile');
  shutDown();
  const first = await running;
  t.same(first, { kind: 'recycled' });
  t.throws(() => fstatSync(logFd), { code: 'EBADF' }, "the container's log is closed");
  t.same(await liveSpares(inst.registry), [process.pid], 'waiting in the registry again');
  t.equal(process.cwd(), '/', 'out of the bundle');
  await requests.settle();
  t.equal(boots, 0, 'the pending request was dropped: this process is the spare');

  claim();
  logFd = openSync(join(dir, 'log-2'), 'a');
  serverLog.switchTo(logFd);
  const requests2 = new SpareRequests(async () => 1000 + ++boots, () => false, 60_000);
  requests2.request('answered');
  const second = await afterServing({ server: server(config(false)), policy, slot, codeUnchanged: true, serverLog, spareRequests: requests2 });
  t.same(second, { kind: 'exit', code: 0 }, 'shim.spare off for its container: exit');
  t.throws(() => fstatSync(logFd), { code: 'EBADF' }, 'its log closed too');
  t.equal(boots, 1, 'the requested spare booted before exiting');
  t.same(await liveSpares(inst.registry), [], 'not in the registry');

  // Another spare waits (booted while this container ran): in demand there is room for both.
  mkdirSync(join(inst.registry, 'spare.1-1')); // init stands in for it
  const beside = (inDemand: boolean): Promise<unknown> =>
    afterServing({ server: server(config(true)), policy: new RecyclePolicy({ maxContainers: 100, maxRssBytes: 2 ** 40 }), slot, codeUnchanged: true, inDemand: () => inDemand });
  t.same(await beside(false), { kind: 'exit', code: 0 }, 'calm: one spare is enough, this server exits');
  t.same(await liveSpares(inst.registry), [1]);
  t.same(await beside(true), { kind: 'recycled' }, 'in demand: it waits beside the other spare');
  t.same((await liveSpares(inst.registry)).sort((a, b) => a - b), [1, process.pid]);
});

t.test('RecyclePolicy: only a clean server within its limits waits again', async (t) => {
  const clean = { shutdownFailures: 0, sparesOn: true, codeUnchanged: true, rssBytes: 50 * 2 ** 20, openFds: 20, children: 0 };
  const policy = new RecyclePolicy({ maxContainers: 4, maxRssBytes: 60 * 2 ** 20 });
  t.equal(policy.judge(clean), undefined, 'the first container: recycled, its descriptors the baseline');
  t.equal(policy.served, 1);
  t.equal(policy.judge({ ...clean, openFds: 19 }), undefined, 'fewer descriptors: fine');
  t.match(policy.judge({ ...clean, openFds: 22 }), /2 more open descriptors/, 'a leak shows as growth');
  t.match(policy.judge(clean), /served 4 containers/, 'at most maxContainers');
  const fresh = (): RecyclePolicy => new RecyclePolicy({ maxContainers: 4, maxRssBytes: 60 * 2 ** 20 });
  t.match(fresh().judge({ ...clean, shutdownFailures: 1 }), /1 shutdown step/);
  t.match(fresh().judge({ ...clean, sparesOn: false }), /shim.spare is off/);
  t.match(fresh().judge({ ...clean, codeUnchanged: false }), /code changed/);
  t.match(fresh().judge({ ...clean, rssBytes: 61 * 2 ** 20 }), /RSS 61 MiB/);
  t.match(fresh().judge({ ...clean, children: 2 }), /2 child process/);
});

t.test('whySpareUnneeded: of two spares waiting outside demand, the higher pid leaves', async (t) => {
  const inst = install(t);
  const root = dirname(dirname(inst.launcher));
  mkdirSync(join(root, 'dist', 'bundle'), { recursive: true });
  writeFileSync(join(root, 'dist', 'bundle', 'shim.js'), '// v1');
  const code = new CodeStamp(dirname(inst.launcher));
  mkdirSync(inst.registry, { recursive: true });
  t.equal(await whySpareUnneeded({ code, registry: inst.registry }), undefined, 'alone: needed');
  mkdirSync(join(inst.registry, 'spare.1-1')); // init stands in for a spare with a lower pid
  t.equal(await whySpareUnneeded({ code, registry: inst.registry }), 'another spare waits and none are in demand');
  t.equal(await whySpareUnneeded({ code, registry: inst.registry, pid: 1 }), undefined, 'the lower pid stays');
  writeFileSync(join(inst.registry, 'missed'), '');
  t.equal(await whySpareUnneeded({ code, registry: inst.registry }), undefined, 'in demand (a miss just now): both stay');
  t.equal(
    await whySpareUnneeded({ code, registry: inst.registry, now: Date.now() + 11_000 }),
    'another spare waits and none are in demand',
    'once the demand window passed, the surplus one leaves',
  );
});

t.test('SpareRequests: calm, one boot a while after Start; in demand, at once from load; settle boots a pending one', async (t) => {
  let boots = 0;
  const boot = async (): Promise<number> => 1000 + ++boots;
  let demand = false;
  const inDemand = (): boolean => demand;
  const later = new SpareRequests(boot, inDemand, 40);
  later.request('loaded');
  later.request('answered');
  later.request('answered');
  t.equal(boots, 0, 'calm: nothing at load, nothing at once after Start');
  await new Promise((r) => setTimeout(r, 80));
  t.equal(boots, 1, 'one boot for both requests, after the delay');
  const exiting = new SpareRequests(boot, inDemand, 10_000);
  exiting.request('answered');
  await exiting.settle();
  t.equal(boots, 2, 'settle boots a pending request now');
  await exiting.settle();
  t.equal(boots, 2, 'and only that one');
  const recycled = new SpareRequests(boot, inDemand, 20);
  recycled.request('answered');
  recycled.cancel();
  await recycled.settle();
  await new Promise((r) => setTimeout(r, 40));
  t.equal(boots, 2, 'cancelled (the server waits as the spare itself): no boot');
  demand = true;
  const busy = new SpareRequests(boot, inDemand, 10_000);
  busy.request('loaded');
  await busy.settle();
  t.equal(boots, 3, 'in demand: a boot as soon as the service loaded');
  t.same([...busy.booted], [1003], 'the pid of the spare it booted (a child that is not a leftover)');
  const failing = new SpareRequests(async () => {
    throw new Error('spawn failed');
  }, inDemand, 10_000);
  failing.request('answered');
  await t.resolves(failing.settle(), 'a failed boot does not fail the exit');
});

t.test('a start that finds no spare waiting marks spares in demand for a while', async (t) => {
  const inst = install(t);
  mkdirSync(inst.registry, { recursive: true });
  t.equal(sparesInDemand(inst.registry), false, 'no miss yet');
  const r = await start(inst, { cwd: bundleDir(t), stdin: 'z' });
  t.equal(r.stdout, 'node-was-run\nz', 'the TypeScript start ran, and the mark printed nothing');
  t.equal(r.stderr, '');
  t.equal(sparesInDemand(inst.registry), true, 'missed just now');
  t.equal(sparesInDemand(inst.registry, 10_000, Date.now() + 11_000), false, 'no longer once the window passed');
});

t.test('ensureSpare boots one spare at a time, niced, and not while one waits', async (t) => {
  const inst = install(t);
  const dir = mkdtempSync(join(tmpdir(), 'thaw-spare-boot-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  // A "node" that records its argv and priority, then stays alive like a booting spare.
  const fakeNode = join(dir, 'fake-node');
  writeFileSync(fakeNode, `#!/bin/sh\necho "$(cut -d' ' -f19 /proc/$$/stat) $*" >"${dir}/booted"\nexec sleep 30\n`, { mode: 0o755 });
  const command = { file: fakeNode, args: ['--flag', '/x/bin/containerd-shim-thaw-v2.mjs'] };
  const pid = await ensureSpare({ registry: inst.registry, command });
  t.ok(pid, 'booted one');
  t.teardown(() => {
    try {
      process.kill(pid!, 'SIGKILL');
    } catch {
      // gone
    }
  });
  t.equal(await ensureSpare({ registry: inst.registry, command }), undefined, 'not a second while it boots');
  await t.resolves(waitFor(() => existsSync(join(dir, 'booted'))));
  const { readFileSync } = await import('node:fs');
  t.equal(readFileSync(join(dir, 'booted'), 'utf8').trim(), '19 --flag /x/bin/containerd-shim-thaw-v2.mjs spare', 'nice 19, the `spare` verb');
  process.kill(pid!, 'SIGKILL');
  await waitFor(() => !isAlive(pid!));
  const next = await ensureSpare({ registry: inst.registry, command });
  t.ok(next && next !== pid, 'a booting marker of a dead process is replaced');
  process.kill(next!, 'SIGKILL');
});

t.test('adoptEnvironment replaces the environment in place', async (t) => {
  const saved = { ...process.env };
  t.teardown(() => adoptEnvironment(saved as Record<string, string>));
  process.env.THAW_SPARE_OLD = '1';
  adoptEnvironment({ PATH: '/bin', THAW_SPARE_NEW: 'x' });
  t.same({ ...process.env }, { PATH: '/bin', THAW_SPARE_NEW: 'x' });
});

t.test('the launcher reached through a symlink uses the registry of the real bin/', async (t) => {
  const inst = install(t);
  const links = mkdtempSync(join(tmpdir(), 'thaw-spare-link-'));
  t.teardown(() => rmSync(links, { recursive: true, force: true }));
  const link = join(links, 'containerd-shim-thaw-v2');
  symlinkSync(inst.launcher, link);
  const slot = await SpareSlot.register(inst.registry);
  const claimed = slot!.waitForClaim();
  const started = start({ ...inst, launcher: link }, { cwd: bundleDir(t) });
  await ((await claimed) as SpareClaim).answer('ok', 'unix:///via-link');
  t.equal((await started).stdout, 'unix:///via-link');
});

async function waitFor(cond: () => boolean, timeoutMs = 10_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 20));
  }
}


t.test('handleClaim: what a claim makes of the spare', async (t) => {
  const savedEnv = { ...process.env } as Record<string, string>;
  const savedCwd = process.cwd();
  t.teardown(() => {
    adoptEnvironment(savedEnv);
    process.chdir(savedCwd);
  });
  const cwd = bundleDir(t);
  const plan = (o: Partial<StartPlan> = {}): StartPlan =>
    ({ address: 'unix:///s/x', reply: Buffer.from('unix:///s/x'), running: false, serveFlags: {}, runtimeOptions: undefined, ttrpcAddress: undefined, ...o }) as StartPlan;
  const server = { done: Promise.resolve() } as unknown as ShimServer;
  const run = async (argv: string[], deps: Partial<ClaimDeps>) => {
    const answers: [SpareStatus, string][] = [];
    const files: [string, number | undefined][] = [];
    const claim: SpareClaim = {
      request: { argv, cwd, env: { ...savedEnv, FROM_CONTAINERD: '1' }, stdin: Buffer.from('opts') },
      answer: async (status, output) => void answers.push([status, Buffer.from(output).toString()]),
    };
    const outcome = await handleClaim(claim, {
      codeUnchanged: () => true,
      planStart: async () => plan(),
      writeStartFiles: async (_bundle, address, pid) => void files.push([address, pid]),
      serve: async () => server,
      binary: 'containerd-shim-thaw-v2',
      ...deps,
    });
    return { outcome, answers, files };
  };
  const start = [...START_FLAGS, 'start'];

  const other = await run([...START_FLAGS, 'delete'], {});
  t.same([other.outcome, other.answers], [{ kind: 'exit', code: 0 }, [['declined', '']]], 'another verb: declined');
  const stale = await run(start, { codeUnchanged: () => false });
  t.same([stale.outcome, stale.answers], [{ kind: 'exit', code: 0 }, [['declined', '']]], 'rebuilt code: declined');

  let stdinSeen = '';
  const served = await run(start, { planStart: async (o) => ((stdinSeen = Buffer.from(o.stdin).toString()), plan()) });
  t.same(served.outcome, { kind: 'serving', server });
  t.same(served.answers, [['ok', 'unix:///s/x']]);
  t.same(served.files, [['unix:///s/x', process.pid]], 'address and this pid as shim.pid');
  t.equal(stdinSeen, 'opts');
  t.equal(process.env.FROM_CONTAINERD, '1', "containerd's environment adopted");
  t.equal(process.cwd(), cwd, 'in the bundle');

  const joined = await run(start, { planStart: async () => plan({ running: true }) });
  t.same([joined.outcome, joined.answers, joined.files], [{ kind: 'spare' }, [['ok', 'unix:///s/x']], [['unix:///s/x', undefined]]], "the group's server: stays a spare");

  const failed = await run(start, { planStart: async () => Promise.reject(new ShimError('NotFound', 'read config.json failed')) });
  t.same([failed.outcome, failed.answers], [{ kind: 'exit', code: 1 }, [['error', 'containerd-shim-thaw-v2: read config.json failed\n']]]);

  const raced = await run(start, { serve: async () => Promise.reject(new ShimError('AlreadyExists', 'a shim server already listens')) });
  t.same([raced.outcome, raced.answers, raced.files], [{ kind: 'exit', code: 0 }, [['ok', 'unix:///s/x']], [['unix:///s/x', undefined]]], 'lost the race for the socket: the winner serves');
});

t.test('a waiting spare whose code is rebuilt retires itself', async (t) => {
  const inst = install(t);
  const root = dirname(dirname(inst.launcher));
  mkdirSync(join(root, 'dist', 'bundle'), { recursive: true });
  const bundleFile = join(root, 'dist', 'bundle', 'shim.js');
  writeFileSync(bundleFile, '// v1');
  const code = new CodeStamp(dirname(inst.launcher));
  t.ok(code.unchanged());
  const slot = await SpareSlot.register(inst.registry);
  const waiting = slot!.waitForClaim();
  let gone = false;
  let reason: string | undefined;
  const stop = retireWhenUnneeded(
    slot!,
    () => whySpareUnneeded({ code, registry: inst.registry }),
    (why) => {
      gone = true;
      reason = why;
    },
    20,
  );
  await new Promise((r) => setTimeout(r, 100));
  t.notOk(gone, 'nothing happens while the code stays');
  const later = new Date(Date.now() + 5000);
  utimesSync(bundleFile, later, later);
  t.notOk(code.unchanged(), 'a rebuilt bundle is another stamp');
  await waitFor(() => gone);
  t.equal(reason, 'the installed code changed');
  t.equal(await waiting, undefined, 'the pending wait ends without a claim');
  t.same(await liveSpares(inst.registry), [], 'out of the registry');
  stop();
});
