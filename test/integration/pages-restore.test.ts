import { spawn } from 'node:child_process';
import { closeSync, existsSync, openSync, readFileSync, statSync, truncateSync } from 'node:fs';
import { cp, mkdir, mkdtemp, readdir, rm, truncate } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import t, { type Test } from 'tap';
import { loadUffdAddon } from '../../src/restore/pages-native.js';
import { PageServerError, startLazyRestore, type ImageChecksum, type LazyRestoreHooks } from '../../src/restore/pages.js';
import { WasmXxh64Hasher } from '../../src/snapshot/hash.js';

/**
 * CRIU 4.1.1 for real: a process with 1 GiB of patterned memory (demo/app/thaw-demo-app.c) is
 * dumped, then restored with `criu restore --lazy-pages` and thaw's page server, and proves its
 * memory bit-exact on SIGUSR1. Fault injection — a checksum that does not match, the page server
 * stopping mid-fill, a damaged pages file — must kill the half-restored process, after which the
 * plain `criu restore` (the fallback) brings it back intact. Needs root, THAW_INTEGRATION=1,
 * /opt/thaw/criu and the addon (npx node-gyp -C native/uffd rebuild --nodedir=/usr).
 */
const CRIU = process.env.THAW_CRIU ?? '/opt/thaw/criu/bin/criu';
const APP_SOURCE = join(import.meta.dirname, '..', '..', 'demo', 'app', 'thaw-demo-app.c');

async function skipReason(): Promise<string | false> {
  if (!process.env.THAW_INTEGRATION) return 'THAW_INTEGRATION is not set';
  if (process.getuid?.() !== 0) return 'CRIU needs root';
  if (!existsSync(CRIU)) return `${CRIU} missing (scripts/setup.sh unpacks CRIU 4.1.1)`;
  const load = loadUffdAddon();
  if (load.binding === null) return `page server addon not built: ${load.error.message}`;
  const check = await execa(CRIU, ['check', '--feature', 'uffd-noncoop'], { reject: false, all: true });
  if (check.failed) return `CRIU cannot use userfaultfd here: ${String(check.all).slice(-200)}`;
  return false;
}

const skip = await skipReason();

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function gone(pid: number, timeoutMs = 30_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (existsSync(`/proc/${pid}`)) {
    if (Date.now() > end) throw new Error(`pid ${pid} is still there`);
    await sleep(20);
  }
}

async function killHard(pid: number): Promise<void> {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // not there
  }
  await gone(pid);
}

/** A dumped demo app: its image, log and pid (the restore brings the same pid back). */
interface Dumped {
  pid: number;
  imageDir: string;
  log: string;
  /** The log's size at dump time: CRIU refuses to reopen a file whose size changed. */
  logSize: number;
  checksums: Map<string, ImageChecksum>;
  work: (name: string) => Promise<string>;
}

async function dumpApp(t: Test, root: string, app: string, mib: number): Promise<Dumped> {
  const base = join(root, `app-${mib}`);
  const imageDir = join(base, 'image');
  await mkdir(imageDir, { recursive: true });
  const log = join(base, 'app.log');
  closeSync(openSync(log, 'a'));
  const starter = spawn('sh', ['-c', `setsid "$0" --init-ms 0 --mib ${mib} --tick-ms 5 </dev/null >>"$1" 2>&1 & echo $!`, app, log], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const pid = Number(await new Promise<string>((res) => starter.stdout.on('data', (d: Buffer) => res(d.toString().trim()))));
  t.teardown(() => killHard(pid).catch(() => undefined));
  await waitLine(log, 0, /^READY/, 120_000);
  const dump = await execa(CRIU, ['dump', '-t', String(pid), '-D', imageDir, '--shell-job', '-o', 'dump.log'], { reject: false, all: true });
  if (dump.failed) throw new Error(`criu dump failed: ${String(dump.all).slice(-1000)}`);
  await gone(pid);
  await sleep(300);
  const hasher = new WasmXxh64Hasher();
  const checksums = new Map<string, ImageChecksum>();
  for (const name of await readdir(imageDir)) {
    const h = await hasher.hashFile(join(imageDir, name));
    checksums.set(join(imageDir, name), { bytes: h.bytes, hash: h.hash, algo: 'xxh64' });
  }
  let n = 0;
  return {
    pid,
    imageDir,
    log,
    logSize: statSync(log).size,
    checksums,
    work: async (name) => {
      const dir = join(base, `work-${name}-${++n}`);
      await mkdir(dir, { recursive: true });
      return dir;
    },
  };
}

async function waitLine(log: string, from: number, re: RegExp, timeoutMs: number): Promise<string> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const line = readFileSync(log, 'utf8').slice(from).split('\n').find((l) => re.test(l));
    if (line !== undefined) return line;
    if (Date.now() > end) throw new Error(`no ${re} in ${log}`);
    await sleep(20);
  }
}

async function criuRestore(d: Dumped, workDir: string, lazy: boolean, signal?: AbortSignal): Promise<void> {
  const argv = ['restore', '-D', d.imageDir, '-W', workDir, '--shell-job', '--restore-detached', '-o', 'restore.log'];
  if (lazy) argv.push('--lazy-pages');
  const r = await execa(CRIU, argv, { reject: false, all: true, timeout: 120_000, ...(signal ? { cancelSignal: signal } : {}) });
  if (r.failed) {
    const tail = readFileSync(join(workDir, 'restore.log'), 'utf8').split('\n').slice(-5).join('\n');
    throw new Error(`criu restore exited ${r.exitCode}: ${tail}`);
  }
}

/** SIGUSR1 → the app checks every byte; resolves with its VERIFY line. */
async function verifyApp(d: Dumped): Promise<string> {
  const from = statSync(d.log).size;
  process.kill(d.pid, 'SIGUSR1');
  return waitLine(d.log, from, /^VERIFY/, 120_000);
}

function hooks(d: Dumped, workDir: string, calls: string[]): LazyRestoreHooks {
  return {
    restore: async (signal) => {
      calls.push('restore');
      await criuRestore(d, workDir, true, signal);
    },
    // CRIU restores the task under its dump-time pid; kill that one too, in case CRIU failed before
    // it reported the task (a restore stopped mid-way leaves it running).
    kill: async (pids) => {
      calls.push(`kill ${pids.join(',')}`);
      for (const pid of new Set([...pids, d.pid])) await killHard(pid);
    },
  };
}

/** The fallback: plain CRIU restore of the same image, memory checked, then stopped. */
async function plainRestoreWorks(t: Test, d: Dumped): Promise<void> {
  truncateSync(d.log, d.logSize);
  await criuRestore(d, await d.work('plain'), false);
  t.match(await verifyApp(d), /^VERIFY OK .*bad=0/, 'the plain restore (fallback) brings the app back intact');
  await killHard(d.pid);
}

if (skip) {
  t.skip(skip);
} else {
  const root = await mkdtemp(join(tmpdir(), 'thaw-pages-it-'));
  t.teardown(() => rm(root, { recursive: true, force: true }));
  const app = join(root, 'thaw-demo-app');
  await execa('gcc', ['-O2', '-o', app, APP_SOURCE]);
  const big = await dumpApp(t, root, app, 1024);

  t.test('lazy restore through thaw page server: 1 GiB bit-exact, every lazy page once, verified', async (t) => {
    truncateSync(big.log, big.logSize);
    const work = await big.work('lazy');
    const calls: string[] = [];
    const lazy = await startLazyRestore({ imageDir: big.imageDir, workDir: work, threads: 2, checksums: big.checksums, hooks: hooks(big, work, calls) });
    t.same(lazy.pids, [big.pid], 'CRIU handed over the one task');
    t.ok(existsSync(`/proc/${big.pid}`), 'the app runs while its pages arrive');
    const verify = verifyApp(big); // the app reads all its memory while it is being filled
    const result = await lazy.done;
    t.match(await verify, /^VERIFY OK .*bad=0/);
    t.equal(result.verified, true);
    const task = result.tasks[0]!;
    const main = task.native.targets[0]!;
    t.ok(result.bytes >= 1024 * 1024 * 1024, `${result.bytes} bytes installed`);
    t.equal(main.pagesCopied + main.pagesDropped + main.pagesVanished, main.totalPages, 'every lazy page accounted for');
    t.equal(main.pagesExisting, 0, 'none installed twice');
    t.equal(main.pagesLeft, 0);
    t.same(calls, ['restore']);
    t.same(await readdir(work).then((f) => f.filter((n) => n.endsWith('.socket'))), [], 'socket removed');
    await killHard(big.pid);
  });

  t.test('checksum mismatch: the restored app is killed, the plain restore takes over', async (t) => {
    truncateSync(big.log, big.logSize);
    const work = await big.work('badsum');
    const calls: string[] = [];
    const sums = new Map(big.checksums);
    const pages = [...sums.keys()].find((p) => /pages-\d+\.img$/.test(p))!;
    sums.set(pages, { ...sums.get(pages)!, hash: 'ffffffffffffffff' });
    const lazy = await startLazyRestore({ imageDir: big.imageDir, workDir: work, threads: 2, checksums: sums, hooks: hooks(big, work, calls) });
    const err = await lazy.done.then(
      () => undefined,
      (e: unknown) => e,
    );
    t.type(err, PageServerError);
    t.match(err, { code: 'DataLoss', phase: 'verify', killed: true });
    t.same(calls, ['restore', `kill ${big.pid}`]);
    t.notOk(existsSync(`/proc/${big.pid}`), 'nothing half-restored is left');
    await plainRestoreWorks(t, big);
  });

  t.test('the page server stops mid-fill: the app is killed before it can see a missing page', async (t) => {
    truncateSync(big.log, big.logSize);
    const work = await big.work('abort');
    const calls: string[] = [];
    // One thread and 64 KiB chunks keep the fill going long enough to stop it in the middle.
    const lazy = await startLazyRestore({ imageDir: big.imageDir, workDir: work, threads: 1, chunkBytes: 64 << 10, hooks: hooks(big, work, calls) });
    await sleep(200);
    lazy.abort();
    await t.rejects(lazy.done, { code: 'Canceled', killed: true });
    const copied = calls.length;
    t.equal(copied, 2, 'restored, then killed');
    t.notOk(existsSync(`/proc/${big.pid}`));
    t.notMatch(readFileSync(big.log, 'utf8').slice(big.logSize), /VERIFY/, 'the app never got to check (or read) its memory');
    await plainRestoreWorks(t, big);
  });

  t.test('a truncated pages file: CRIU stalls, the page server gives up, kills, the intact image restores', async (t) => {
    const small = await dumpApp(t, root, app, 64);
    const broken = join(root, 'broken-image');
    await cp(small.imageDir, broken, { recursive: true });
    const pagesFile = (await readdir(broken)).find((n) => /^pages-\d+\.img$/.test(n))!;
    await truncate(join(broken, pagesFile), statSync(join(broken, pagesFile)).size - 64 * 4096);
    truncateSync(small.log, small.logSize);
    const work = await small.work('short');
    const calls: string[] = [];
    const damaged: Dumped = { ...small, imageDir: broken };
    // CRIU 4.1.1 spins on the short file while restoring the non-lazy pages (its restorer's read
    // loop does not stop at EOF), before it hands over the task: only the receive timeout ends it.
    const err = await startLazyRestore({ imageDir: broken, workDir: work, threads: 2, receiveTimeoutMs: 5000, hooks: hooks(damaged, work, calls) })
      .then((l) => l.done)
      .then(
        () => undefined,
        (e: unknown) => e,
      );
    t.type(err, PageServerError, 'the lazy restore failed');
    t.match(err, { killed: true, phase: 'receive', code: 'DeadlineExceeded' });
    t.same(calls, ['restore', 'kill ']);
    t.notOk(existsSync(`/proc/${small.pid}`), 'nothing half-restored is left');
    await plainRestoreWorks(t, small);
  });
}
