import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, openSync, readdirSync, readFileSync, readlinkSync, statSync, writeFileSync } from 'node:fs';
import { cp, mkdtemp, open, readdir, rm, truncate } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { execa } from 'execa';
import { pino } from 'pino';
import t, { type Test } from 'tap';
import { runtimeIdFor } from '../../src/engine/container-id.js';
import { NativeEngine, type NativeEngineOptions, type NativeLazyPagesTuning, type RelayRecord } from '../../src/engine/native.js';
import { procStat } from '../../src/procfs.js';
import { cgroupDirsOf as cgroupDirs, closeQuietly, lines, relaysAlive, verify as verifyApp, waitFor } from '../helpers/native-app.js';
import { loadUffdAddon } from '../../src/restore/pages-native.js';
import { startLazyRestore, type ImageChecksum } from '../../src/restore/pages.js';
import { criuCheck, criuCheckFeature } from '../../src/runc/criu.js';
import { WasmXxh64Hasher } from '../../src/snapshot/hash.js';
import { buildDemoApp, demoAppArgv, demoBundle } from '../helpers/demo-app.js';
import { buildBundle } from '../../src/bundle/bundle.js';
import { REPO, cliEnv, ensureBuilt } from '../helpers/thaw-cli.js';

/**
 * The native engine's parallel anonymous-memory restore with the real runc 1.1.5 + CRIU 4.1.1
 * (`runc restore --lazy-pages`) and thaw's page server. The demo app with THAW_LAZY_TEST_GIB GiB
 * (default 2) of patterned memory is checkpointed once, restored through the lazy path with the
 * image's checksums verified while filling, and proves every byte on SIGUSR1 (VERIFY OK).
 * Fault injection, each ending in a correct app through the plain restore with the stdio relays
 * still carrying its output and nothing of the failed attempt left: the page server gives up right
 * after CRIU's "restore finished" (fill timeout; also in the host pid namespace, where the pids
 * must be reaped first), it gives up before CRIU connected (receive timeout), and runc is
 * SIGKILLed while CRIU restores (its half-made state holds a bind mount of the rootfs, which
 * `runc delete` would delete through). Refused without a second restore of the same bytes: a pages
 * file that differs from the checksums; a truncated pages file (CRIU spins before it hands the
 * task over, then the plain restore hangs too) ends with CRIU and its tasks killed. Afterwards no
 * runc container, cgroup, process, relay, mount or userfaultfd is left.
 * The page keeper (restore/page-keeper.ts): released after a good fill; a keeper that cannot start
 * makes the engine fall back to the plain restore; and a process running the restore (a driver
 * script on the compiled engine, as the shim or the CLI would) SIGKILLed mid-fill leaves no running
 * container — while without the keeper the same kill leaves the app running on zero pages.
 * Needs root, THAW_INTEGRATION=1, /opt/thaw/criu and the addon (npx node-gyp -C native/uffd rebuild
 * --nodedir=/usr). THAW_LAZY_BENCH=1 adds plain vs lazy vs lazy without the keeper timings (5 runs
 * each, medians as comments).
 */
const CRIU = process.env.THAW_CRIU ?? '/opt/thaw/criu/bin/criu';
const GIB = Number(process.env.THAW_LAZY_TEST_GIB ?? 2);

async function skipReason(): Promise<string | false> {
  if (!process.env.THAW_INTEGRATION) return 'THAW_INTEGRATION is not set';
  if (process.getuid?.() !== 0) return 'runc and CRIU need root';
  if (!existsSync('/bin/busybox')) return '/bin/busybox missing (busybox-static)';
  if ((await execa('runc', ['--version'], { reject: false })).failed) return 'runc is not installed';
  if ((await execa('gcc', ['--version'], { reject: false })).failed) return 'gcc is not installed (demo app)';
  if (!existsSync(CRIU)) return `${CRIU} missing (run scripts/setup.sh)`;
  const check = await criuCheck(CRIU).catch(() => null);
  if (!check?.ok) return `criu check failed: ${check?.output.split('\n').at(-1) ?? 'cannot run'}`;
  const uffd = await criuCheckFeature(CRIU, 'uffd-noncoop').catch(() => null);
  if (!uffd?.ok) return `CRIU cannot use userfaultfd here: ${uffd?.output.trim().split('\n').at(-1) ?? 'cannot run'}`;
  const load = loadUffdAddon();
  if (load.binding === null) return `page server addon not built: ${load.error.message}`;
  if (!(GIB > 0)) return `THAW_LAZY_TEST_GIB=${process.env.THAW_LAZY_TEST_GIB} is not a positive number`;
  return false;
}

const skip = await skipReason();

type LogLine = Record<string, unknown> & { msg?: string; phase?: string };

interface Checkpointed {
  bundle: string;
  image: string;
  mib: number;
  checksums: Map<string, ImageChecksum>;
}

interface World {
  dir: string;
  root: string;
  namespace: string;
  logs: LogLine[];
  engine(extra?: Partial<NativeEngineOptions>): NativeEngine;
  out(name: string): { path: string; fd: number };
  rid(id: string): string;
  relays(id: string): RelayRecord[];
  /** Starts the demo app with `mib` MiB, waits for READY and checkpoints it (the container stops). */
  checkpointApp(name: string, mib: number, opts?: { hostPidNamespace?: boolean }): Promise<Checkpointed>;
}

async function world(t: Test): Promise<World> {
  const dir = await mkdtemp(join(tmpdir(), 'thaw-native-lazy-it-'));
  const root = join(dir, 'state');
  // A random namespace keeps runtime ids (and so cgroup paths) apart from concurrent tests.
  const namespace = randomBytes(6).toString('hex');
  const logs: LogLine[] = [];
  const log = pino({ level: 'debug' }, { write: (s: string) => void logs.push(JSON.parse(s) as LogLine) });
  const engines: NativeEngine[] = [];
  const engine = (extra: Partial<NativeEngineOptions> = {}) => {
    const e = new NativeEngine({ runcPath: 'runc', criuPath: CRIU, root, namespace, log, ...extra });
    engines.push(e);
    return e;
  };
  const app = await buildDemoApp(dir);
  const fds: number[] = [];
  t.teardown(async () => {
    for (const c of await engine().runc.list().catch(() => [])) await engine().runc.delete(c.id, { force: true }).catch(() => undefined);
    for (const fd of fds) closeQuietly(fd);
    for (const m of mountsUnder(dir)) await execa('umount', ['-l', m], { reject: false });
    await rm(dir, { recursive: true, force: true });
  });
  const w: World = {
    dir,
    root,
    namespace,
    logs,
    engine,
    out(name) {
      mkdirSync(join(dir, 'out'), { recursive: true });
      const path = join(dir, 'out', `${name}.log`);
      const fd = openSync(path, 'a');
      fds.push(fd);
      return { path, fd };
    },
    rid: (id) => runtimeIdFor(id, namespace),
    relays(id) {
      const file = join(root, 'containers', runtimeIdFor(id, namespace), 'container.json');
      return (JSON.parse(readFileSync(file, 'utf8')) as { relays: RelayRecord[] }).relays;
    },
    async checkpointApp(name, mib, opts = {}) {
      const bundle = await demoBundle(join(dir, 'bundles', name), app, { mib, initMs: 0, tickMs: 100 });
      if (opts.hostPidNamespace) {
        const file = join(bundle, 'config.json');
        const spec = JSON.parse(readFileSync(file, 'utf8')) as { linux: { namespaces: { type: string }[] } };
        spec.linux.namespaces = spec.linux.namespaces.filter((n) => n.type !== 'pid');
        writeFileSync(file, JSON.stringify(spec));
      }
      const e = engine({ lazyPages: 'off' });
      const out = w.out(`${name}-source`);
      await e.create({ id: name, bundle, stdio: ['ignore', out.fd, out.fd] });
      const relays = w.relays(name);
      await e.start(name);
      await waitFor('READY', () => (lines(out.path).some((l) => l.startsWith('READY')) ? true : undefined), 300_000);
      const image = join(dir, `image-${name}`);
      mkdirSync(image);
      await e.checkpoint(name, { imageDir: image, leaveRunning: false });
      await e.delete(name);
      await waitFor('source relays to exit', () => (relaysAlive(relays).length === 0 ? true : undefined), 5_000).catch(() => undefined);
      return { bundle, image, mib, checksums: await checksumsOf(image) };
    },
  };
  return w;
}

/** Mount points under `dir` (deepest first). */
function mountsUnder(dir: string): string[] {
  return readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .map((l) => l.split(' ')[4] ?? '')
    .filter((m) => m.startsWith(`${dir}/`))
    .sort((a, b) => b.length - a.length);
}

/** xxh64 of every file in the image, as the snapshot manifest records them. */
async function checksumsOf(image: string): Promise<Map<string, ImageChecksum>> {
  const hasher = new WasmXxh64Hasher();
  const out = new Map<string, ImageChecksum>();
  for (const name of await readdir(image)) {
    const h = await hasher.hashFile(join(image, name));
    out.set(join(image, name), { bytes: h.bytes, hash: h.hash, algo: 'xxh64' });
  }
  return out;
}

/** The app's memory check, with room for a multi-GiB image. */
const verify = (pid: number, path: string): Promise<string> => verifyApp(pid, path, 120_000);

/** Pids in the container's cgroups (every hierarchy). */
function cgroupProcs(rid: string): number[] {
  const pids = new Set<number>();
  for (const dir of cgroupDirs(rid)) {
    try {
      for (const l of readFileSync(join(dir, 'cgroup.procs'), 'utf8').split('\n')) if (l !== '') pids.add(Number(l));
    } catch {
      // removed meanwhile
    }
  }
  return [...pids];
}

/** This process's `runc … restore … RID` children. */
function runcRestoresOf(rid: string): number[] {
  const out: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const argv = readFileSync(`/proc/${name}/cmdline`, 'utf8').split('\0');
      const stat = readFileSync(`/proc/${name}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (ppid === process.pid && argv.includes('restore') && argv.includes(rid)) out.push(Number(name));
    } catch {
      // gone
    }
  }
  return out;
}

/** Processes holding a file under `dir` open (a CRIU writing its log there). */
function criuProcessesUnder(dir: string): number[] {
  const out: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name) || Number(name) === process.pid) continue;
    try {
      if (readdirSync(`/proc/${name}/fd`).some((fd) => readlinkSync(`/proc/${name}/fd/${fd}`).startsWith(`${dir}/`))) out.push(Number(name));
    } catch {
      // gone
    }
  }
  return out;
}

/** Processes whose cgroup names `rid` (a half-restored task would be one). */
function processesOf(rid: string): number[] {
  const out: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      if (procStat(Number(name))?.state === 'Z') continue; // dead, not yet reaped by pid 1
      if (readFileSync(`/proc/${name}/cgroup`, 'utf8').includes(`/thaw/${rid}`)) out.push(Number(name));
    } catch {
      // gone
    }
  }
  return out;
}

/** Userfaultfds this process holds (the page server's, if any were left open). */
function uffdsHeld(): number {
  let n = 0;
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      if (readlinkSync(`/proc/self/fd/${fd}`).includes('userfaultfd')) n++;
    } catch {
      // closed meanwhile
    }
  }
  return n;
}

/** Page keeper processes of container `id` (their config argument names it). */
function keepersOf(id: string): number[] {
  const out: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const argv = readFileSync(`/proc/${name}/cmdline`, 'utf8').split('\0');
      if (procStat(Number(name))?.state === 'Z') continue;
      if (argv.some((a) => /page-keeper-main\.(js|ts)$/.test(a)) && argv.some((a) => a.includes(`"id":${JSON.stringify(id)}`))) out.push(Number(name));
    } catch {
      // gone
    }
  }
  return out;
}

/** The page keeper's log lines of container `id` (in its state dir, gone after delete). */
function keeperLog(w: World, id: string): LogLine[] {
  const path = join(w.root, 'containers', w.rid(id), 'page-keeper.log');
  if (!existsSync(path)) return [];
  return lines(path)
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as LogLine);
}

async function assertNothingLeft(t: Test, w: World, ids: readonly string[], relays: readonly RelayRecord[]): Promise<void> {
  t.same(await w.engine().runc.list(), [], 'runc list is empty');
  for (const id of ids) {
    t.same(cgroupDirs(w.rid(id)), [], `no cgroup left for ${id}`);
    t.same(processesOf(w.rid(id)), [], `no process left in ${id}'s cgroup`);
    t.notOk(existsSync(join(w.root, 'containers', w.rid(id))), `no state left for ${id}`);
  }
  await waitFor('relays to exit', () => (relaysAlive(relays).length === 0 ? true : undefined), 5_000).catch(() => undefined);
  t.same(relaysAlive(relays), [], 'no stdio relay left');
  t.equal(uffdsHeld(), 0, 'no userfaultfd left open in this process');
  t.same(mountsUnder(w.dir), [], 'no mounts left');
  for (const id of ids) t.same(keepersOf(id), [], `no page keeper left for ${id}`);
}

function logsOf(w: World, id: string, from: number): LogLine[] {
  return w.logs.slice(from).filter((l) => l.id === id);
}

t.test(`lazy restore of ${GIB} GiB: bit-exact, verified while filling; fault injection falls back to the plain restore`, { skip }, async (t) => {
  const w = await world(t);
  const big = await w.checkpointApp('big', Math.round(GIB * 1024));
  const relays: RelayRecord[] = [];

  // 1. The parallel path, checksums verified while the pages arrive.
  {
    const id = 'lazy';
    const out = w.out(id);
    const from = w.logs.length;
    const t0 = performance.now();
    const st = await w.engine({ lazyPages: 'on' }).restore({ id, bundle: big.bundle, stdio: ['ignore', out.fd, out.fd], imageDir: big.image, pageChecksums: big.checksums });
    const secs = (performance.now() - t0) / 1000;
    relays.push(...w.relays(id));
    const logs = logsOf(w, id, from);
    const done = logs.find((l) => l.msg === 'native restore done');
    t.equal(done?.mode, 'lazy', 'restored through the page server');
    const filled = logs.find((l) => l.msg === 'anonymous memory restored by the page server');
    t.ok(filled, 'the page server reported its fill');
    t.equal(filled?.verified, true, 'pages checked against the checksums');
    t.ok(Number(filled?.bytes) >= big.mib * 2 ** 20, `${filled?.bytes} bytes installed through userfaultfd`);
    t.notOk(logs.some((l) => l.msg === 'restoring without lazy pages'), 'no fallback');
    t.comment(`lazy restore of ${big.mib} MiB: ${secs.toFixed(2)} s until every page was in (runc returned after ${filled?.restoreMs} ms)`);
    t.match(await verify(st.pid, out.path), /^VERIFY OK .* bad=0$/, `${big.mib} MiB intact`);
    await waitFor('ticks after restore', () => (lines(out.path).some((l) => l.startsWith('TICK')) ? true : undefined));
    const released = await waitFor('the page keeper to be released', () => keeperLog(w, id).find((l) => /^released/.test(l.msg ?? '')), 60_000);
    t.ok(released, 'the page keeper guarded the fill and was released');
    await waitFor('the keeper to exit', () => (keepersOf(id).length === 0 ? true : undefined), 10_000);
    t.ok(processesOf(w.rid(id)).includes(st.pid), 'the app lives on after the keeper let go');
    await w.engine().delete(id, { force: true });
  }

  // 2. The page server gives up right after "restore finished": the app it started is killed
  //    before its uffd closes, the plain restore brings it back, output still flows.
  {
    const id = 'fill-fails';
    const out = w.out(id);
    const from = w.logs.length;
    const st = await w.engine({ lazyPages: 'on', lazyPagesTuning: { fillTimeoutMs: 1 } }).restore({
      id,
      bundle: big.bundle,
      stdio: ['ignore', out.fd, out.fd],
      imageDir: big.image,
    });
    relays.push(...w.relays(id));
    const logs = logsOf(w, id, from);
    const fallback = logs.find((l) => l.msg === 'restoring without lazy pages');
    t.match(fallback, { fallback: 'restore', phase: 'lazy-pages', reason: /timed out/ }, 'the failed fill is logged with the fallback');
    t.equal(logs.find((l) => l.msg === 'native restore done')?.mode, 'plain');
    const lazyInit = logs.filter((l) => l.msg === 'restored init').map((l) => Number(l.pid));
    t.equal(lazyInit.length, 2, 'two restores ran');
    t.ok(['Z', undefined].includes(procStat(lazyInit[0]!)?.state), 'the half-restored init is gone');
    t.equal(lazyInit[1], st.pid, 'the plain restore runs the app');
    t.match(await verify(st.pid, out.path), /^VERIFY OK .* bad=0$/, 'the fallback restored every byte');
    await w.engine().delete(id, { force: true });
  }

  // 3. The page keeper cannot start (its shell exits at once): the lazy attempt is given up before
  //    the fill ends, its app killed, and the plain restore brings the container back.
  {
    const id = 'keeper-fails';
    const out = w.out(id);
    const from = w.logs.length;
    const st = await w.engine({ lazyPages: 'on', lazyPagesTuning: { keeper: { shell: '/bin/false' } } }).restore({
      id,
      bundle: big.bundle,
      stdio: ['ignore', out.fd, out.fd],
      imageDir: big.image,
    });
    relays.push(...w.relays(id));
    const logs = logsOf(w, id, from);
    t.match(logs.find((l) => l.msg === 'restoring without lazy pages'), { fallback: 'restore', reason: /page keeper failed to start/ }, 'the keeper failure is logged with the fallback');
    t.equal(logs.find((l) => l.msg === 'native restore done')?.mode, 'plain');
    t.equal(logs.filter((l) => l.msg === 'restored init').length, 2, 'two restores ran');
    t.match(await verify(st.pid, out.path), /^VERIFY OK .* bad=0$/, 'the fallback restored every byte');
    await w.engine().delete(id, { force: true });
  }

  await assertNothingLeft(t, w, ['lazy', 'fill-fails', 'keeper-fails'], relays);
});

t.test('failures around CRIU: receive timeout, runc killed mid-restore, host pids: plain restore; damaged or truncated pages: refused; nothing left', { skip }, async (t) => {
  const w = await world(t);
  const small = await w.checkpointApp('small', 64);
  const relays: RelayRecord[] = [];

  // The page server stops waiting before CRIU connects: runc is stopped, the plain restore follows.
  {
    const id = 'receive-fails';
    const out = w.out(id);
    const from = w.logs.length;
    const st = await w.engine({ lazyPages: 'on', lazyPagesTuning: { receiveTimeoutMs: 1 } }).restore({
      id,
      bundle: small.bundle,
      stdio: ['ignore', out.fd, out.fd],
      imageDir: small.image,
    });
    relays.push(...w.relays(id));
    const logs = logsOf(w, id, from);
    t.match(logs.find((l) => l.msg === 'restoring without lazy pages'), { fallback: 'restore', phase: 'lazy-pages', reason: /lazy restore failed/ }, 'logged with the fallback');
    t.equal(logs.find((l) => l.msg === 'native restore done')?.mode, 'plain');
    t.match(await verify(st.pid, out.path), /^VERIFY OK .* bad=0$/, 'the fallback restored every byte');
    t.same(processesOf(w.rid(id)), [st.pid], 'only the plain restore’s app runs in the container');
    await w.engine().delete(id, { force: true });
  }

  // runc is cut off (SIGTERM, then SIGKILL) as soon as CRIU has put a restored task into the
  // container's cgroup: whatever runc and CRIU leave mid-restore must be killed before the plain
  // restore runs (same cgroup, same pipes).
  {
    const id = 'cut-off';
    const out = w.out(id);
    const from = w.logs.length;
    let cut = false;
    const start: NativeLazyPagesTuning['start'] = (opts) =>
      startLazyRestore({
        ...opts,
        hooks: {
          ...opts.hooks,
          restore: async (signal) => {
            const running = opts.hooks.restore(signal);
            let settled = false;
            running.then(
              () => (settled = true),
              () => (settled = true),
            );
            await waitFor('a restored task', () => (settled || cgroupProcs(w.rid(id)).length > 0 ? true : undefined), 60_000);
            if (!settled) {
              cut = true;
              // As if runc crashed: no chance to clean up after itself.
              for (const pid of runcRestoresOf(w.rid(id))) process.kill(pid, 'SIGKILL');
            }
            await running;
          },
        },
      });
    const st = await w.engine({ lazyPages: 'on', lazyPagesTuning: { start } }).restore({ id, bundle: small.bundle, stdio: ['ignore', out.fd, out.fd], imageDir: small.image });
    relays.push(...w.relays(id));
    t.ok(cut, 'runc was cut off while CRIU was restoring');
    t.ok(existsSync(join(small.bundle, 'rootfs', 'app')), 'the rootfs CRIU had mounted is intact');
    t.ok(
      w.logs.slice(from).some((l) => l.msg === 'removed the state of an interrupted runc restore' && l.id === w.rid(id)),
      'the half-made runc state was removed',
    );
    const logs = logsOf(w, id, from);
    // Which side notices first is a race: runc's exit, or CRIU (its child) closing the socket.
    t.match(
      logs.find((l) => l.msg === 'restoring without lazy pages'),
      { fallback: 'restore', phase: 'lazy-pages', reason: /runc restore failed|CRIU closed the lazy-pages socket before the restore finished/ },
      'logged with the fallback',
    );
    t.equal(logs.find((l) => l.msg === 'native restore done')?.mode, 'plain');
    t.match(await verify(st.pid, out.path), /^VERIFY OK .* bad=0$/, 'the fallback restored every byte');
    t.same(processesOf(w.rid(id)), [st.pid], 'only the plain restore’s app runs in the container');
    await w.engine().delete(id, { force: true });
  }

  // A pages file whose bytes differ from the manifest: the lazy restore kills what it started and
  // throws; the bad bytes are not restored again (the lifecycle cold-starts instead).
  {
    const id = 'damaged';
    const bad = join(w.dir, 'image-damaged');
    await cp(small.image, bad, { recursive: true });
    const pages = readdirSync(bad).find((n) => /^pages-\d+\.img$/.test(n))!;
    const size = statSync(join(bad, pages)).size;
    const fh = await open(join(bad, pages), 'r+');
    await fh.write(Buffer.from('not the app memory'), 0, 18, Math.floor(size / 2));
    await fh.close();
    const sums = new Map([...small.checksums].map(([k, v]) => [k.replace(small.image, bad), v]));
    const from = w.logs.length;
    await t.rejects(
      w.engine({ lazyPages: 'on' }).restore({ id, bundle: small.bundle, stdio: ['ignore', 'ignore', 'ignore'], imageDir: bad, pageChecksums: sums }),
      { name: 'PageServerError', code: 'DataLoss', phase: 'verify', killed: true },
    );
    const logs = logsOf(w, id, from);
    t.equal(logs.filter((l) => l.msg === 'restored init').length, 1, 'one restore ran, no second one of the bad bytes');
    t.notOk(logs.some((l) => l.msg === 'restoring without lazy pages'), 'no fallback logged');
  }

  // A truncated pages file: CRIU 4.1.1 spins in the restorer before it hands the task over, so
  // the page server's receive times out with CRIU and the task alive; the plain restore of the
  // same file hangs the same way until runc's timeout. Both must kill CRIU and what it restored.
  {
    const id = 'truncated';
    const short = join(w.dir, 'image-truncated');
    await cp(small.image, short, { recursive: true });
    const pages = readdirSync(short).find((n) => /^pages-\d+\.img$/.test(n))!;
    await truncate(join(short, pages), statSync(join(short, pages)).size - 64 * 4096);
    const from = w.logs.length;
    const engine = w.engine({ lazyPages: 'on', lazyPagesTuning: { receiveTimeoutMs: 2_000 }, timeoutsMs: { restore: 3_000 } });
    await t.rejects(engine.restore({ id, bundle: small.bundle, stdio: ['ignore', 'ignore', 'ignore'], imageDir: short }), { name: 'RuncError', code: 'DeadlineExceeded' });
    const logs = logsOf(w, id, from);
    t.match(logs.find((l) => l.msg === 'restoring without lazy pages'), { reason: /timed out/ }, 'the lazy attempt gave up waiting for CRIU');
    const killed = logs.filter((l) => l.msg === 'killed what the failed restore left');
    t.ok(killed.length > 0, `CRIU and its tasks were killed (${JSON.stringify(killed.map((l) => l.pids))})`);
    t.ok(existsSync(join(small.bundle, 'rootfs', 'app')), 'the rootfs is intact');
    t.same(criuProcessesUnder(w.dir), [], 'no CRIU left');
  }

  // In the host pid namespace CRIU restores the recorded pids: the plain restore after a failed
  // fill must wait until the killed copy's pids are reaped, then gets them back.
  {
    const host = await w.checkpointApp('hostpid', 64, { hostPidNamespace: true });
    const id = 'hostpid-fill-fails';
    const out = w.out(id);
    const from = w.logs.length;
    const st = await w.engine({ lazyPages: 'on', lazyPagesTuning: { fillTimeoutMs: 1 } }).restore({ id, bundle: host.bundle, stdio: ['ignore', out.fd, out.fd], imageDir: host.image });
    relays.push(...w.relays(id));
    const logs = logsOf(w, id, from);
    t.equal(logs.find((l) => l.msg === 'native restore done')?.mode, 'plain', 'fell back');
    const inits = logs.filter((l) => l.msg === 'restored init').map((l) => Number(l.pid));
    t.same(inits, [st.pid, st.pid], 'both restores gave the init its recorded host pid');
    t.match(await verify(st.pid, out.path), /^VERIFY OK .* bad=0$/, 'intact');
    await w.engine().delete(id, { force: true });
  }

  await assertNothingLeft(t, w, ['receive-fails', 'cut-off', 'damaged', 'truncated', 'hostpid-fill-fails'], relays);
});

/**
 * A container of five processes — a shell and four apps, as one NCCL rank per GPU plus a launcher —
 * restored with `lazyPages: auto` through the page server: five tasks' fills at once, each on its
 * own thread (with fills on libuv's four pool threads the fifth task's userfaultfd was never
 * received and the restore hung: seen on the H100s). Every app's memory bit-exact.
 */
t.test('a container of five processes restores through the page server (lazyPages auto), every byte intact', { skip }, async (t) => {
  const w = await world(t);
  const app = join(w.dir, 'thaw-demo-app');
  const mib = 64;
  const apps = [1, 2, 3, 4].map((seed) => demoAppArgv({ mib, initMs: 0, tickMs: 200, seed }).join(' '));
  const bundle = await buildBundle({ dir: join(w.dir, 'bundles', 'five'), args: ['/bin/sh', '-c', `${apps.map((a) => `${a} &`).join(' ')} wait`], files: { [app]: '/app' } });
  const source = w.engine({ lazyPages: 'off' });
  const src = w.out('five-source');
  await source.create({ id: 'five-src', bundle, stdio: ['ignore', src.fd, src.fd] });
  const relays = [...w.relays('five-src')];
  await source.start('five-src');
  await waitFor('four READY lines', () => (lines(src.path).filter((l) => l.startsWith('READY')).length === 4 ? true : undefined), 120_000);
  const image = join(w.dir, 'image-five');
  mkdirSync(image);
  await source.checkpoint('five-src', { imageDir: image, leaveRunning: false });
  await source.delete('five-src');
  t.equal(readdirSync(image).filter((f) => /^pagemap-\d+\.img$/.test(f)).length, 5, 'five processes in the image');

  const id = 'five';
  const out = w.out(id);
  const from = w.logs.length;
  const st = await w.engine({ lazyPages: 'auto' }).restore({ id, bundle, stdio: ['ignore', out.fd, out.fd], imageDir: image, pageChecksums: await checksumsOf(image) });
  relays.push(...w.relays(id));
  const logs = logsOf(w, id, from);
  t.equal(logs.find((l) => l.msg === 'native restore done')?.mode, 'lazy', 'restored through the page server');
  t.equal(logs.filter((l) => l.msg === 'lazy-pages message' && l.kind === 'task').length, 5, "every task's userfaultfd received");
  t.equal(logs.find((l) => l.msg === 'anonymous memory restored by the page server')?.verified, true, 'pages checked against the checksums');
  const appPids = cgroupProcs(w.rid(id)).filter((pid) => pid !== st.pid);
  t.equal(appPids.length, 4, 'the four apps run under the restored shell');
  for (const pid of appPids) t.match(await verify(pid, out.path), /^VERIFY OK .* bad=0$/, `app ${pid}: ${mib} MiB intact`);
  await w.engine().delete(id, { force: true });
  await assertNothingLeft(t, w, ['five-src', id], relays);
});

/**
 * A restore run by another process (the compiled engine in a driver script, as the shim's serve or
 * the thaw CLI run it), SIGKILLed mid-fill. With the keeper: the container is killed and the keeper
 * exits. Without it (the control): the app keeps running and reads zeros where its memory had not
 * arrived. Then the engine's delete (what containerd runs for a dead shim) leaves nothing behind.
 */
t.test(`the process running a lazy restore of ${GIB} GiB is SIGKILLed mid-fill: the keeper kills the container`, { skip }, async (t) => {
  await ensureBuilt();
  const w = await world(t);
  const big = await w.checkpointApp('killed', Math.round(GIB * 1024));
  const relays: RelayRecord[] = [];
  const driver = join(w.dir, 'restore-driver.mjs');
  writeFileSync(
    driver,
    `import { openSync } from 'node:fs';
const c = JSON.parse(process.argv[2]);
const { NativeEngine } = await import(c.engineModule);
const { createLogger } = await import(c.loggerModule);
const out = openSync(c.out, 'a');
const log = createLogger({ level: 'debug', destination: c.logPath });
const engine = new NativeEngine({ runcPath: 'runc', criuPath: c.criu, root: c.root, namespace: c.namespace, log, lazyPages: 'on', lazyPagesTuning: c.tuning });
const st = await engine.restore({ id: c.id, bundle: c.bundle, stdio: ['ignore', out, out], imageDir: c.image });
console.log('RESTORED ' + st.pid);
`,
  );
  const ids: string[] = [];
  for (const withKeeper of [true, false]) {
    const id = withKeeper ? 'driver-killed' : 'driver-killed-no-keeper';
    ids.push(id);
    const out = join(w.dir, 'out', `${id}.log`);
    const logPath = join(w.dir, `${id}-driver.log`);
    // One slow fill thread, so that the kill lands mid-fill even on a fast machine.
    const tuning = { threads: 1, chunkBytes: 64 << 10, ...(withKeeper ? {} : { keeper: false }) };
    const config = {
      engineModule: pathToFileURL(join(REPO, 'dist', 'src', 'engine', 'native.js')).href,
      loggerModule: pathToFileURL(join(REPO, 'dist', 'src', 'log', 'logger.js')).href,
      criu: CRIU,
      root: w.root,
      namespace: w.namespace,
      id,
      bundle: big.bundle,
      image: big.image,
      out,
      logPath,
      tuning,
    };
    const child = spawn(process.execPath, [driver, JSON.stringify(config)], { env: cliEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
    let said = '';
    child.stdout.on('data', (d: Buffer) => (said += d.toString()));
    child.stderr.on('data', (d: Buffer) => (said += d.toString()));
    const exited = new Promise<NodeJS.Signals | null>((resolve) => child.once('exit', (_code, signal) => resolve(signal)));
    t.teardown(() => child.kill('SIGKILL'));
    const driverLog = (): LogLine[] =>
      existsSync(logPath)
        ? lines(logPath)
            .filter((l) => l.startsWith('{'))
            .map((l) => JSON.parse(l) as LogLine)
        : [];
    const ready = withKeeper ? 'page keeper ready' : 'restore returned, pages arriving';
    await waitFor(`${id}: the restore to run with pages arriving${withKeeper ? ' and the keeper ready' : ''}`, () => {
      if (said.includes('RESTORED') || child.exitCode !== null) throw new Error(`the driver finished before the kill: ${said}`);
      const l = driverLog();
      return l.some((x) => x.msg === 'restored init') && l.some((x) => x.msg === ready) ? true : undefined;
    }, 120_000);
    const logs = driverLog();
    t.notOk(logs.some((l) => l.msg === 'anonymous memory restored by the page server'), `${id}: the fill is still running`);
    const init = Number(logs.find((l) => l.msg === 'restored init')?.pid);
    relays.push(...w.relays(id));
    t.ok(processesOf(w.rid(id)).includes(init), `${id}: the restored app runs while its pages arrive`);
    const killedAt = performance.now();
    child.kill('SIGKILL');
    t.equal(await exited, 'SIGKILL', `${id}: the process running the restore was SIGKILLed`);
    if (withKeeper) {
      await waitFor('the container to be killed', () => (processesOf(w.rid(id)).length === 0 ? true : undefined), 60_000);
      t.pass(`the keeper killed every process of the container (${Math.round(performance.now() - killedAt)} ms after the SIGKILL)`);
      t.ok(['Z', undefined].includes(procStat(init)?.state), 'the restored app is dead');
      await waitFor('the keeper to exit', () => (keepersOf(id).length === 0 ? true : undefined), 60_000);
      const klog = keeperLog(w, id);
      t.match(klog[0]?.uffds, [{ file: 'anon_inode:[userfaultfd]' }], 'the keeper held the task’s userfaultfd');
      t.ok(klog.some((l) => l.msg === 'thaw went away before every page was in: killing the restored container'), 'the keeper logged why');
      const killed = klog.find((l) => l.msg === 'restored container killed; userfaultfds closed');
      t.ok((killed?.killed as number[] | undefined)?.includes(init), `the keeper killed the app (${JSON.stringify(killed?.killed)})`);
      t.notOk(lines(out).some((l) => l.startsWith('VERIFY')), 'the app never ran a check on partial memory');
      t.same(mountsUnder(w.dir), [], 'no mount left by the cut-off restore');
      const runcState = (await w.engine().runc.list()).filter((c) => c.id === w.rid(id)).map((c) => c.status);
      t.comment(`before the engine's delete: runc state ${JSON.stringify(runcState)}; keeper killed ${JSON.stringify(killed?.killed)} in ${killed?.durationMs} ms`);
    } else {
      // The hazard: the app runs on, zeros where its memory had not arrived.
      t.ok(processesOf(w.rid(id)).includes(init), 'without the keeper the app keeps running');
      const verdict = await verify(init, out);
      t.match(verdict, /^VERIFY FAIL .* bad=[1-9]/, 'and its memory is partly zeros');
      t.comment(`without the keeper: ${verdict}`);
    }
    // What containerd runs after a shim died: the engine's delete.
    await w.engine().delete(id, { force: true });
  }
  await assertNothingLeft(t, w, ids, relays);
});

const bench = process.env.THAW_LAZY_BENCH;
const REPS = 5;
t.test(`timings: plain vs lazy vs lazy without the page keeper, ${GIB} GiB, medians of ${REPS}`, { skip: skip || (bench ? false : 'THAW_LAZY_BENCH is not set') }, async (t) => {
  await ensureBuilt();
  const w = await world(t);
  const app = await w.checkpointApp('bench', Math.round(GIB * 1024));
  type Mode = 'plain' | 'lazy' | 'lazy-no-keeper';
  const modes: Mode[] = ['plain', 'lazy', 'lazy-no-keeper'];
  const runs: Record<Mode, { restore: number; verified: number; running: number; fill: number; spawnMs: number; readyMs: number }[]> = { plain: [], lazy: [], 'lazy-no-keeper': [] };
  // The keeper as in production: the compiled entry, no test loaders.
  const keeper = { entry: join(REPO, 'dist', 'src', 'restore', 'page-keeper-main.js'), node: { file: process.execPath, args: [], env: cliEnv() } };
  for (let i = 0; i < REPS; i++) {
    for (const mode of modes) {
      const id = `${mode}-${i}`;
      const out = w.out(id);
      const from = w.logs.length;
      const engine = w.engine({ lazyPages: mode === 'plain' ? 'off' : 'on', lazyPagesTuning: { keeper: mode === 'lazy' ? keeper : false } });
      const t0 = performance.now();
      const st = await engine.restore({ id, bundle: app.bundle, stdio: ['ignore', out.fd, out.fd], imageDir: app.image });
      const restore = (performance.now() - t0) / 1000;
      t.match(await verify(st.pid, out.path), /^VERIFY OK .* bad=0$/);
      const verified = (performance.now() - t0) / 1000;
      const logs = logsOf(w, id, from);
      t.equal(logs.find((l) => l.msg === 'native restore done')?.mode, mode === 'plain' ? 'plain' : 'lazy');
      const timings = logs.find((l) => l.msg === 'native restore done')?.timings as Record<string, number>;
      const running = (mode === 'plain' ? timings['runc-restore']! : timings['runc-restore-lazy']!) / 1000;
      const ready = logs.find((l) => l.msg === 'page keeper ready');
      runs[mode].push({ restore, verified, running, fill: (timings['lazy-fill'] ?? NaN) / 1000, spawnMs: Number(ready?.spawnMs ?? NaN), readyMs: Number(ready?.durationMs ?? NaN) });
      if (mode === 'lazy') await waitFor('the keeper to exit', () => (keepersOf(id).length === 0 ? true : undefined), 10_000);
      await w.engine().delete(id, { force: true });
    }
  }
  const med = (xs: number[], digits = 2) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!.toFixed(digits);
  for (const mode of modes) {
    const r = runs[mode];
    t.comment(
      `${mode} ${app.mib} MiB (warm): app running after ${med(r.map((x) => x.running))} s (${r.map((x) => x.running.toFixed(2)).join('/')}); ` +
        `restore() ${med(r.map((x) => x.restore))} s (${r.map((x) => x.restore.toFixed(2)).join('/')}); ` +
        `→ VERIFY OK ${med(r.map((x) => x.verified))} s (${r.map((x) => x.verified.toFixed(2)).join('/')})` +
        (mode === 'plain' ? '' : `; fill ${med(r.map((x) => x.fill))} s (${r.map((x) => x.fill.toFixed(2)).join('/')})`) +
        (mode === 'lazy' ? `; keeper spawn (synchronous) ${med(r.map((x) => x.spawnMs), 1)} ms (${r.map((x) => x.spawnMs.toFixed(1)).join('/')}), ready after ${med(r.map((x) => x.readyMs), 0)} ms` : ''),
    );
  }
});
