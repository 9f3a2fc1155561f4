/**
 * Spare shim servers end to end (src/shim/spare.ts): under a real containerd and runsc, a
 * container's server boots a spare; the next `ctr run` is served by that spare process (its
 * shim.pid, at normal priority again), with exit codes, output and `ctr task exec` as usual; the
 * server of a short-lived container waits as a spare again once it is gone (recycled, its log FIFO
 * closed) and serves the next one; long-running containers started back to back find spares (in
 * demand, they boot early); in demand a finished server waits beside a booted spare (a pool of
 * two), and the surplus one leaves once the demand ends; containers started back to back all succeed; a spare whose code was
 * rebuilt declines (the start goes the Node way) and leaves; with `shim.spare: false` no spare is
 * booted, and a recycled server that served such a container exits. Each run of this file
 * uses a private copy of the built shim, so that no other test's containers claim its spares.
 * Gated by THAW_INTEGRATION=1; needs root, containerd, ctr, runsc and busybox-static.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import t, { type Test } from 'tap';
import { binDirOf, liveSpares, spareRegistry } from '../../src/shim/spare.js';
import { buildThawBinaries, ContainerdHarness, containerdVersions, integrationSkipReason, SHIM_BINARY, until, type ContainerdVersion } from '../helpers/containerd.js';
import { buildOciImage, buildRootfs, imageToolsMissing } from '../helpers/oci-image.js';
import { fdTarget, pidExists as isAlive } from '../../src/procfs.js';

const IMAGE = 'localhost/thaw-it-spare:1';
const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const skip = integrationSkipReason() ?? imageToolsMissing({});

for (const version of containerdVersions()) {
  t.test(`spare servers under containerd ${version.name}`, { skip: skip ?? version.skip ?? false }, (t) => spares(t, version));
}

/** bin/ and dist/bundle of the test build, copied; native/ linked (addons are found from the module upwards). */
async function privateInstall(t: Test): Promise<string> {
  const built = await buildThawBinaries();
  const root = mkdtempSync(path.join(tmpdir(), 'thaw-spare-install-'));
  t.teardown(() => {
    const registry = registryOf(path.join(root, 'bin'));
    killSpares(registry);
    rmSync(path.dirname(registry), { recursive: true, force: true }); // <SPARE_ROOT><root>/bin: <root> is ours
    rmSync(root, { recursive: true, force: true });
  });
  const cp = spawnSync('sh', ['-c', `mkdir -p "$2/dist" && cp -a "$1/bin" "$2/" && cp -a "$1/dist/bundle" "$2/dist/"`, 'sh', path.dirname(built), root]);
  if (cp.status !== 0) throw new Error(`copying the build failed: ${cp.stderr.toString()}`);
  symlinkSync(path.join(repo, 'native'), path.join(root, 'native'));
  return path.join(root, 'bin');
}

function registryOf(bin: string): string {
  return spareRegistry(binDirOf(path.join(bin, SHIM_BINARY)));
}

function killSpares(registry: string): void {
  for (const name of spawnSync('ls', [registry]).stdout?.toString().split('\n') ?? []) {
    const m = /^(?:spare|claim)\.(\d+)-\d+$/.exec(name);
    if (m) {
      try {
        process.kill(Number(m[1]), 'SIGKILL');
      } catch {
        // gone
      }
    }
  }
  rmSync(registry, { recursive: true, force: true });
}

function niceOf(pid: number): number {
  // Field 19 of /proc/PID/stat; the command name (field 2) may hold spaces, so count from its ')'.
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[16]);
}

async function spares(t: Test, version: ContainerdVersion): Promise<void> {
  const bin = await privateInstall(t);
  const registry = registryOf(bin);
  const h = await ContainerdHarness.start(t.teardown.bind(t), { ...version.options, bin, prefix: 'thaw-spare-' });
  const rootfs = await buildRootfs({ dir: path.join(h.dir, 'rootfs') });
  const image = await buildOciImage({ workDir: h.dir, rootfs, name: IMAGE, cmd: ['/bin/true'], out: path.join(h.dir, 'image.tar') });
  await h.importImage(image.tar);
  const waitingSpare = async (): Promise<number> => {
    let pid = 0;
    await until(async () => ((pid = (await liveSpares(registry))[0] ?? 0), pid > 0), 60_000, 'a spare to wait in the registry', 50);
    return pid;
  };
  /** The one spare waiting, once spares are not in demand: of two (a pool left by a miss), one leaves within 5 s. */
  const onlySpare = async (): Promise<number> => {
    rmSync(path.join(registry, 'missed'), { force: true });
    let live: number[] = [];
    await until(async () => ((live = await liveSpares(registry)), live.length === 1), 60_000, 'one spare to wait in the registry', 50);
    return live[0]!;
  };
  const killAndRemove = async (t: Test, id: string): Promise<void> => {
    await h.ctr(['tasks', 'kill', '-s', 'SIGKILL', id]);
    await h.waitForTaskStatus(id, 'STOPPED');
    t.equal((await h.ctr(['tasks', 'rm', id])).code, 0, `${id}: task removed`);
    t.equal((await h.ctr(['containers', 'rm', id])).code, 0, `${id}: container removed`);
  };

  await t.test('shim.spare false: containers run, and no spare is booted', async (t) => {
    const config = path.join(h.dir, 'no-spare.json');
    writeFileSync(config, JSON.stringify({ ...JSON.parse(readFileSync(h.thawConfigPath, 'utf8')), shim: { spare: false } }));
    for (const id of ['it-nospare-1', 'it-nospare-2']) {
      h.track(id);
      const r = await h.ctr(['run', '--rm', '--fifo-dir', h.fifoDir, '--runtime', 'io.containerd.thaw.v2', '--runtime-config-path', config, IMAGE, id, '/bin/sh', '-c', 'echo hello; exit 4'], {
        timeoutMs: 90_000,
      });
      t.equal(r.code, 4, r.err);
      t.match(r.out, /hello/);
    }
    await new Promise((r) => setTimeout(r, 1000)); // a spare would have registered by now
    t.same(await liveSpares(registry), [], 'no spare');
  });

  await t.test('the next container is served by the spare the previous one booted', async (t) => {
    const first = await h.runThaw({ id: 'it-spare-1', image: IMAGE, args: ['/bin/sh', '-c', 'echo one; exit 3'] });
    t.equal(first.code, 3, first.err);
    t.match(first.out, /one/);
    const spare = await waitingSpare();
    t.equal(niceOf(spare), 19, 'the spare waits at nice 19');
    const log = path.join(h.dir, 'it-spare-2.log');
    const run = await h.runThaw({ id: 'it-spare-2', image: IMAGE, args: ['/bin/sleep', '600'], logFile: log });
    t.equal(run.code, 0, run.err);
    t.equal(h.shimPidOf('it-spare-2'), spare, 'its shim server is the spare process');
    t.equal(niceOf(spare), 0, 'claimed: normal priority again');
    const exec = await h.ctr(['tasks', 'exec', '--exec-id', 'e1', 'it-spare-2', '/bin/sh', '-c', 'echo from-exec; exit 5']);
    t.equal(exec.code, 5, exec.err);
    t.match(exec.out, /from-exec/);
    await killAndRemove(t, 'it-spare-2');
    t.same(await h.runscSandboxes(), [], 'no sandbox left');
  });

  await t.test("a short-lived container's server waits as a spare again and serves the next container", async (t) => {
    const spare = await onlySpare(); // and no earlier miss: spares are not in demand
    const first = await h.runThaw({ id: 'it-recycle-1', image: IMAGE, args: ['/bin/sh', '-c', 'echo one; exit 3'] });
    t.equal(first.code, 3, first.err);
    t.match(first.out, /one/);
    await until(async () => (await liveSpares(registry)).includes(spare), 30_000, 'the server to wait as a spare again');
    const held = readdirSync(`/proc/${spare}/fd`)
      .map((fd) => fdTarget(fd, spare))
      .filter((target) => target.includes('it-recycle-1'));
    t.same(held, [], "nothing of the finished container held open (its log FIFO closed)");
    const log = path.join(h.dir, 'it-recycle-2.log');
    const second = await h.runThaw({ id: 'it-recycle-2', image: IMAGE, args: ['/bin/sleep', '600'], logFile: log });
    t.equal(second.code, 0, second.err);
    t.equal(h.shimPidOf('it-recycle-2'), spare, 'the same process serves the next container');
    const exec = await h.ctr(['tasks', 'exec', '--exec-id', 'e2', 'it-recycle-2', '/bin/sh', '-c', 'echo again; exit 4']);
    t.equal(exec.code, 4, exec.err);
    t.match(exec.out, /again/);
    await killAndRemove(t, 'it-recycle-2');
    t.same(await h.runscSandboxes(), [], 'no sandbox left');
  });

  await t.test('long-running containers started back to back: spares are in demand and boot early enough', async (t) => {
    await waitingSpare();
    const ids = ['it-burst-1', 'it-burst-2', 'it-burst-3', 'it-burst-4'];
    for (const id of ids) {
      const r = await h.runThaw({ id, image: IMAGE, args: ['/bin/sleep', '600'], logFile: path.join(h.dir, `${id}.log`) });
      t.equal(r.code, 0, r.err);
    }
    // A container whose start found no spare logs "shim server started" (the Node start); without
    // demand mode every second one would (the next spare boots a second after Start).
    const nodeStarted = ids.filter((id) => new RegExp(`"id":"${id}"[^\\n]*"msg":"shim server started"`).test(h.log));
    t.ok(nodeStarted.length <= 1, `at most the first miss starts Node (did: ${nodeStarted.join(', ') || 'none'})`);
    for (const id of ids) await killAndRemove(t, id);
    t.same(await h.runscSandboxes(), [], 'no sandbox left');
  });

  await t.test('in demand, a finished server waits beside the booted spare; once demand ends, the surplus one leaves', async (t) => {
    const missed = path.join(registry, 'missed');
    const markMiss = (): void => writeFileSync(missed, ''); // what the launcher's start does when it finds no spare
    const first = await onlySpare();
    markMiss();
    const run = await h.runThaw({ id: 'it-pool-1', image: IMAGE, args: ['/bin/sleep', '600'], logFile: path.join(h.dir, 'it-pool-1.log') });
    t.equal(run.code, 0, run.err);
    t.equal(h.shimPidOf('it-pool-1'), first, 'served by the waiting spare');
    let booted = 0;
    await until(async () => ((booted = (await liveSpares(registry)).find((pid) => pid !== first) ?? 0), booted > 0), 60_000, 'in demand: the next spare boots at once', 50);
    markMiss();
    await killAndRemove(t, 'it-pool-1');
    const pool = [first, booted].sort((a, b) => a - b);
    await until(async () => (await liveSpares(registry)).length === 2, 30_000, 'the server to wait beside the booted spare', 50);
    t.same((await liveSpares(registry)).sort((a, b) => a - b), pool, 'two spares wait: the recycled server and the booted one');
    markMiss();
    const short = await h.runThaw({ id: 'it-pool-2', image: IMAGE, args: ['/bin/sh', '-c', 'echo pooled; exit 7'] });
    t.equal(short.code, 7, short.err);
    t.match(short.out, /pooled/);
    await until(async () => (await liveSpares(registry)).length === 2, 30_000, 'its server to wait again', 50);
    t.same((await liveSpares(registry)).sort((a, b) => a - b), pool, 'served from the pool: no spare booted');
    const past = new Date(Date.now() - 60_000);
    utimesSync(missed, past, past); // the demand window has passed
    await until(async () => (await liveSpares(registry)).length === 1, 45_000, 'the surplus spare to leave (checked every 5 s)', 200);
    t.same(await liveSpares(registry), [pool[0]], 'the lower pid stays');
    await until(() => !isAlive(pool[1]!), 10_000, 'the surplus spare to exit');
  });

  await t.test('a container whose config turns spares off: the recycled server that took it exits after it', async (t) => {
    const spare = await onlySpare();
    const config = path.join(h.dir, 'no-spare-2.json');
    writeFileSync(config, JSON.stringify({ ...JSON.parse(readFileSync(h.thawConfigPath, 'utf8')), shim: { spare: false } }));
    h.track('it-spare-off');
    const r = await h.ctr(['run', '--rm', '--fifo-dir', h.fifoDir, '--runtime', 'io.containerd.thaw.v2', '--runtime-config-path', config, IMAGE, 'it-spare-off', '/bin/sh', '-c', 'exit 2'], {
      timeoutMs: 90_000,
    });
    t.equal(r.code, 2, r.err);
    await until(() => !isAlive(spare), 30_000, 'the server to exit with its container');
    await new Promise((r) => setTimeout(r, 1500)); // a spare would have registered by now
    t.same(await liveSpares(registry), [], 'no spare left or booted');
  });

  await t.test('back to back: every container runs and exits as asked', async (t) => {
    for (let i = 0; i < 5; i++) {
      const r = await h.runThaw({ id: `it-spare-b${i}`, image: IMAGE, args: ['/bin/sh', '-c', `echo run-${i}; exit ${i}`] });
      t.equal(r.code, i, `run ${i}: ${r.err}`);
      t.match(r.out, new RegExp(`run-${i}`));
    }
    t.same(await h.runscSandboxes(), [], 'no sandbox left');
  });

  await t.test('a spare of rebuilt code declines, leaves, and the container still starts', async (t) => {
    const stale = await onlySpare();
    const bundle = path.join(bin, '..', 'dist', 'bundle', 'shim.js');
    const later = new Date(Date.now() + 5000);
    utimesSync(bundle, later, later);
    const r = await h.runThaw({ id: 'it-spare-stale', image: IMAGE, args: ['/bin/sh', '-c', 'echo fresh; exit 6'] });
    t.equal(r.code, 6, r.err);
    t.match(r.out, /fresh/);
    // Claimed, it declines at once; left waiting (another spare took the start), its code watch (every 5 s) retires it.
    await until(() => !isAlive(stale), 45_000, 'the stale spare to exit');
    t.pass('the stale spare exited');
  });
}

