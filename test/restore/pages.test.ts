import { readlinkSync } from 'node:fs';
import { connect } from 'node:net';
import { mkdtemp, readdir, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { WasmXxh64Hasher } from '../../src/snapshot/hash.js';
import { ShimError } from '../../src/errors.js';
import { PageKeeper, type PageKeeperHandle } from '../../src/restore/page-keeper.js';
import { loadUffdAddon } from '../../src/restore/pages-native.js';
import { PagesUnsupportedError } from '../../src/restore/pages-image.js';
import {
  LAZY_PAGES_SOCKET,
  LazyPageServer,
  PageServerError,
  startLazyRestore,
  verifyImageFiles,
  type ImageChecksum,
  type LazyRestoreHooks,
} from '../../src/restore/pages.js';
import { buildTarget, spawnTarget, uffdUsable, writeFixtureImages, type Spawned } from './pages-helpers.js';

/**
 * The page server's policy (pages.ts) end to end against the uffd-target fixture standing in for
 * `criu restore --lazy-pages`: synthetic CRIU images of the fixture's memory, the restore hook
 * starts the fixture (it connects and hands over its uffd like CRIU), the kill hook kills it.
 * Covers success, holes, and the failures that must kill the app before its uffd is closed.
 */
const load = loadUffdAddon();
const skip = load.binding === null ? `page server addon not built: ${load.error.message}` : uffdUsable();
const PID = 4242;
const PAGES = 8192; // 32 MiB
const SEED = 5;

async function checksums(dir: string): Promise<Map<string, ImageChecksum>> {
  const hasher = new WasmXxh64Hasher();
  const out = new Map<string, ImageChecksum>();
  for (const name of await readdir(dir)) {
    const h = await hasher.hashFile(join(dir, name));
    out.set(join(dir, name), { bytes: h.bytes, hash: h.hash, algo: 'xxh64' });
  }
  return out;
}

if (skip) {
  t.skip(skip);
} else {
  const root = await mkdtemp(join(tmpdir(), 'thaw-pages-'));
  t.teardown(() => rm(root, { recursive: true, force: true }));
  const built = await buildTarget(root);
  if ('skip' in built) {
    t.skip(built.skip);
  } else {
    const target = built.path;
    let n = 0;

    /** A fresh image dir + work dir, and hooks that run the fixture as "CRIU's restored task". */
    const world = async (actions: string[], holes: [number, number][] = []) => {
      const base = join(root, `w${++n}`);
      const imageDir = join(base, 'image');
      const workDir = join(base, 'work');
      await writeFixtureImages(target, imageDir, { pid: PID, pages: PAGES, seed: SEED, holes });
      await import('node:fs/promises').then((fs) => fs.mkdir(workDir, { recursive: true }));
      const holeArgs = holes.map(([a, b]) => `holes:${a}:${b}`);
      let app: Spawned | undefined;
      const killed: number[][] = [];
      const calls: string[] = [];
      const hooks: LazyRestoreHooks = {
        restore: async () => {
          calls.push('restore');
          app = spawnTarget(target, join(workDir, LAZY_PAGES_SOCKET), PAGES, SEED, [`sendpid:${PID}`, ...holeArgs, ...actions]);
          // `criu restore --restore-detached` returns once the task runs: here, once it has sent "finished".
          for (let i = 0; i < 500 && !app.output().includes('SENT'); i++) await new Promise((r) => setTimeout(r, 10));
          if (!app.output().includes('SENT')) throw new Error(`fixture did not start: ${app.output()}`);
        },
        kill: async (pids) => {
          calls.push('kill');
          killed.push([...pids]);
          if (app !== undefined && app.child.exitCode === null && app.child.signalCode === null) {
            app.child.kill('SIGKILL');
            await app.exit;
          }
        },
      };
      t.teardown(() => {
        app?.child.kill('SIGKILL');
      });
      return { imageDir, workDir, hooks, killed, calls, app: () => app! };
    };

    t.test('restores the memory bit-exact, verified against the manifest checksums', async (t) => {
      const w = await world(['verify']);
      const lazy = await startLazyRestore({ imageDir: w.imageDir, workDir: w.workDir, threads: 2, checksums: await checksums(w.imageDir), hooks: w.hooks });
      t.same(lazy.pids, [PID]);
      const result = await lazy.done;
      t.equal(result.verified, true);
      t.equal(result.bytes, PAGES * 4096);
      t.equal(result.tasks[0]?.native.targets[0]?.pagesCopied, PAGES);
      t.same(w.calls, ['restore'], 'nothing killed');
      const exit = await w.app().exit;
      t.equal(exit.code, 0, w.app().output());
      t.match(w.app().output(), /VERIFY OK pages=8192 bad=0/);
      t.same(await readdir(w.workDir), [], 'socket removed');
    });

    t.test('pages missing from the image read as zeros (holes, small-first order, direct reads)', async (t) => {
      // The app stays a while after its verify: on a loaded machine its faults alone could bring in every
      // page before the eager fill ends, and a task that exits mid-fill is (rightly) a failed restore.
      const w = await world(['verify', 'sleep:1000'], [
        [10, 300],
        [5000, 5001],
      ]);
      const lazy = await startLazyRestore({ imageDir: w.imageDir, workDir: w.workDir, threads: 2, order: 'small-first', direct: true, hooks: w.hooks });
      const result = await lazy.done;
      t.equal(result.verified, false);
      t.equal(result.bytes, (PAGES - 291) * 4096);
      t.equal((await w.app().exit).code, 0, w.app().output());
    });

    t.test('a pages file that does not match its checksum: the app is killed, never runs on it', async (t) => {
      const w = await world(['sleep:3000', 'verify']);
      const sums = await checksums(w.imageDir);
      const pages = join(w.imageDir, 'pages-1.img');
      sums.set(pages, { ...sums.get(pages)!, hash: '0123456789abcdef' });
      const lazy = await startLazyRestore({ imageDir: w.imageDir, workDir: w.workDir, threads: 2, checksums: sums, hooks: w.hooks });
      const err = await lazy.done.then(
        () => undefined,
        (e: unknown) => e,
      );
      t.type(err, PageServerError);
      t.match(err, { code: 'DataLoss', phase: 'verify', killed: true, pids: [PID] });
      t.same(w.killed, [[PID]]);
      t.equal((await w.app().exit).signal, 'SIGKILL');
      t.notMatch(w.app().output(), /VERIFY/);
    });

    t.test("verify 'before': a bad pages file is refused before CRIU runs", async (t) => {
      const w = await world(['verify']);
      const sums = await checksums(w.imageDir);
      const pages = join(w.imageDir, 'pages-1.img');
      sums.set(pages, { ...sums.get(pages)!, hash: '0123456789abcdef' });
      await t.rejects(startLazyRestore({ imageDir: w.imageDir, workDir: w.workDir, checksums: sums, verify: 'before', hooks: w.hooks }), {
        code: 'DataLoss',
        phase: 'verify-before',
      });
      t.same(w.calls, [], 'neither restored nor killed');
    });

    t.test('a damaged pagemap is refused at prepare; a missing checksum too', async (t) => {
      const w = await world(['verify']);
      const sums = await checksums(w.imageDir);
      await writeFile(join(w.imageDir, `pagemap-${PID}.img`), Buffer.from('not an image'));
      await t.rejects(LazyPageServer.prepare({ imageDir: w.imageDir, workDir: w.workDir }), { code: 'DataLoss' });
      const w2 = await world(['verify']);
      const partial = await checksums(w2.imageDir);
      partial.delete(join(w2.imageDir, 'pages-1.img'));
      await t.rejects(LazyPageServer.prepare({ imageDir: w2.imageDir, workDir: w2.workDir, checksums: partial }), {
        code: 'FailedPrecondition',
        message: /no xxh64 checksum/,
      });
      t.ok(sums.size > 0);
    });

    t.test('an image dir without pagemaps is unsupported', async (t) => {
      const empty = join(root, 'empty');
      await import('node:fs/promises').then((fs) => fs.mkdir(empty, { recursive: true }));
      await t.rejects(LazyPageServer.prepare({ imageDir: empty, workDir: empty }), PagesUnsupportedError);
    });

    t.test('short read during the fill: the app is killed first, then the uffd closed', async (t) => {
      const w = await world(['sleep:200', 'verify']);
      await truncate(join(w.imageDir, 'pages-1.img'), (PAGES - 10) * 4096);
      const lazy = await startLazyRestore({ imageDir: w.imageDir, workDir: w.workDir, threads: 2, hooks: w.hooks });
      await t.rejects(lazy.done, { phase: 'fill', killed: true, code: 'DataLoss', message: /short read/ });
      t.equal((await w.app().exit).signal, 'SIGKILL');
      t.notMatch(w.app().output(), /VERIFY/, 'the app never read a zero where its data belonged');
    });

    t.test('abort (e.g. the CUDA restore failed): done rejects Canceled after the kill', async (t) => {
      const w = await world(['sleep:3000', 'verify']);
      const lazy = await startLazyRestore({ imageDir: w.imageDir, workDir: w.workDir, threads: 1, chunkBytes: 4096, hooks: w.hooks });
      lazy.abort();
      await t.rejects(lazy.done, { code: 'Canceled', killed: true });
      t.same(w.calls, ['restore', 'kill']);
    });

    t.test('the restore command fails: no fill, kill called, PageServerError phase restore', async (t) => {
      const w = await world(['verify']);
      const hooks: LazyRestoreHooks = {
        restore: async () => {
          throw new Error('criu restore exited 1: Restoring FAILED');
        },
        kill: w.hooks.kill,
      };
      await t.rejects(startLazyRestore({ imageDir: w.imageDir, workDir: w.workDir, hooks }), {
        phase: 'restore',
        killed: true,
        message: /Restoring FAILED/,
      });
      t.same(w.calls, ['kill']);
    });

    t.test('CRIU hangs up before "restore finished": phase receive', async (t) => {
      const w = await world(['verify']);
      const hooks: LazyRestoreHooks = {
        restore: async () => {
          await new Promise<void>((resolve, reject) => {
            const s = connect(join(w.workDir, LAZY_PAGES_SOCKET), () => {
              s.end();
              resolve();
            });
            s.on('error', reject);
          });
          await new Promise((r) => setTimeout(r, 200)); // a real restore would now fail too
        },
        kill: w.hooks.kill,
      };
      await t.rejects(startLazyRestore({ imageDir: w.imageDir, workDir: w.workDir, hooks }), {
        phase: 'receive',
        code: 'Unavailable',
      });
    });

    t.test('a receive timeout while the restore command hangs until its tasks die: killed after the grace, phase receive', async (t) => {
      // As on the H100s: a task faulted on a page nobody served, CRIU waited for it, and the
      // aborted runc's promise could not settle while CRIU held its output. Here the restore hook
      // ends only once the kill hook ran.
      const w = await world(['verify']);
      let killedRestore = (): void => undefined;
      let sock: ReturnType<typeof connect> | undefined;
      const calls: string[] = [];
      const hooks: LazyRestoreHooks = {
        restore: async (signal) => {
          calls.push('restore');
          sock = connect(join(w.workDir, LAZY_PAGES_SOCKET)); // connected, sends nothing
          sock.on('error', () => undefined);
          await new Promise<void>((_, reject) => {
            killedRestore = () => reject(new Error('runc restore: killed'));
          });
          t.ok(signal.aborted, 'the restore was aborted first');
        },
        kill: async () => {
          calls.push('kill');
          sock?.destroy();
          killedRestore();
        },
      };
      const t0 = performance.now();
      await t.rejects(startLazyRestore({ imageDir: w.imageDir, workDir: w.workDir, receiveTimeoutMs: 300, abortGraceMs: 200, hooks }), {
        phase: 'receive',
        code: 'DeadlineExceeded',
        killed: true,
      });
      t.same(calls, ['restore', 'kill'], 'killed although the restore had not ended');
      t.ok(performance.now() - t0 < 5_000, 'no hang');
    });

    t.test('an addon receive that never runs (libuv pool busy): this side stops waiting, phase receive', async (t) => {
      const w = await world(['verify']);
      const stuck = { ...load.binding!, receive: () => new Promise<never>(() => undefined) };
      const t0 = performance.now();
      await t.rejects(startLazyRestore({ imageDir: w.imageDir, workDir: w.workDir, receiveTimeoutMs: 200, abortGraceMs: 200, binding: stuck, hooks: w.hooks }), {
        phase: 'receive',
        code: 'DeadlineExceeded',
        message: /receive did not answer within 5200 ms/,
        killed: true,
      });
      t.ok(performance.now() - t0 < 15_000, 'within the timeout and its margin');
      t.equal((await w.app().exit).signal, 'SIGKILL', 'the task that had connected was killed');
    });

    // ---- the page keeper (page-keeper.ts) ----

    t.test('keeper: started at "restore finished" with every uffd, released once the pages are in', async (t) => {
      const w = await world(['sleep:200', 'verify']);
      const logPath = join(w.workDir, '..', 'keeper.log');
      const held: { uffds: readonly number[]; pids: readonly number[] }[] = [];
      let keeper: PageKeeper | undefined;
      const keeperFds: string[] = [];
      const lazy = await startLazyRestore({
        imageDir: w.imageDir,
        workDir: w.workDir,
        threads: 2,
        hooks: w.hooks,
        keeper: (h) => {
          held.push(h);
          keeper = PageKeeper.spawn({ ...h, id: 'lazy', logPath, targets: { cgroupDirs: [], pids: [{ pid: w.app().child.pid!, startTime: 0 }] } });
          keeperFds.push(readlinkSync(`/proc/${keeper.pid}/fd/3`)); // in place once spawn returned
          return keeper;
        },
      });
      t.equal(held.length, 1, 'one keeper');
      t.equal(held[0]?.uffds.length, 1, 'holding the one task uffd');
      t.same(held[0]?.pids, [PID]);
      await lazy.done;
      t.same(await keeper!.exited, { code: 0, signal: null }, 'released: exits 0');
      t.equal((await w.app().exit).code, 0, w.app().output());
      t.same(w.calls, ['restore'], 'nothing killed');
      t.same(keeperFds, ['anon_inode:[userfaultfd]'], 'the keeper held the userfaultfd');
      const logs = (await readFile(logPath, 'utf8')).trim().split('\n').map((l) => JSON.parse(l) as { msg: string });
      t.match(logs.at(-1)?.msg, /^released/);
    });

    t.test('keeper cannot start (spawn throws): the restore fails, tasks killed, phase keeper', async (t) => {
      const w = await world(['sleep:3000', 'verify']);
      const err = await startLazyRestore({
        imageDir: w.imageDir,
        workDir: w.workDir,
        hooks: w.hooks,
        keeper: () => {
          throw new Error('spawn EMFILE');
        },
      }).then(
        () => undefined,
        (e: unknown) => e,
      );
      t.type(err, PageServerError);
      t.match(err, { phase: 'keeper', killed: true, message: /cannot start the page keeper: spawn EMFILE/ });
      t.same(w.calls, ['restore', 'kill']);
      t.equal((await w.app().exit).signal, 'SIGKILL');
      t.notMatch(w.app().output(), /VERIFY/);
    });

    t.test('keeper dies before it is ready: the fill stops, the app is killed before its uffd closes', async (t) => {
      const w = await world(['sleep:3000', 'verify']);
      const released: string[] = [];
      const stub: PageKeeperHandle = {
        pid: undefined,
        ready: Promise.reject(new ShimError('Unavailable', 'page keeper failed to start: it exited (code 1)')),
        exited: Promise.resolve({ code: 1, signal: null }),
        release: async () => void released.push('release'),
      };
      stub.ready.catch(() => undefined);
      const lazy = await startLazyRestore({ imageDir: w.imageDir, workDir: w.workDir, threads: 1, chunkBytes: 4096, hooks: w.hooks, keeper: () => stub });
      await t.rejects(lazy.done, { name: 'PageServerError', phase: 'keeper', killed: true, code: 'Unavailable', message: /exited \(code 1\)/ });
      t.same(w.calls, ['restore', 'kill']);
      t.same(released, ['release'], 'released after the kill');
      t.equal((await w.app().exit).signal, 'SIGKILL');
      t.notMatch(w.app().output(), /VERIFY/);
    });
  }
}

t.test('verifyImageFiles: the real addon hashes each file; a changed byte is DataLoss', { skip: load.binding === null ? 'page server addon not built' : false }, async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'thaw-verify-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  await writeFile(join(dir, 'pages-1.img'), Buffer.alloc(3 << 20, 9));
  await writeFile(join(dir, 'pages-2.img'), Buffer.alloc(1 << 20, 1));
  const sums = await checksums(dir);
  await verifyImageFiles(sums);
  await writeFile(join(dir, 'pages-2.img'), Buffer.alloc(1 << 20, 2));
  await t.rejects(verifyImageFiles(sums), { code: 'DataLoss', message: /pages-2\.img: checksum .* does not match/ });
  await t.rejects(verifyImageFiles(new Map([[join(dir, 'pages-1.img'), { bytes: 1, hash: '0', algo: 'sha256' }]])), /checksum/, 'another algorithm cannot be checked');
});
