import { spawn } from 'node:child_process';
import { chmodSync, closeSync, constants, existsSync, mkdirSync, openSync, readFileSync, readSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';
import t, { type Test } from 'tap';
import { runtimeIdFor } from '../../src/engine/container-id.js';
import type { GpuCheckpointRecord, GpuHooks } from '../../src/engine/engine.js';
import {
  GPU_RECORD_FILE,
  NATIVE_IMAGE_FILE,
  NativeEngine,
  UNKNOWN_EXIT_STATUS,
  decodeWaitStatus,
  interposeStdio,
  isAnonymousPipe,
  stopRelays,
  type NativeEngineOptions,
  type NativeLazyPagesTuning,
} from '../../src/engine/native.js';
import { procStat } from '../../src/procfs.js';
import { RuncError } from '../../src/errors.js';
import type { Logger } from '../../src/log/logger.js';
import { PagesUnsupportedError } from '../../src/restore/pages-image.js';
import type { UffdBinding } from '../../src/restore/pages-native.js';
import { PageServerError, type LazyPagesOptions, type LazyPagesResult, type LazyRestoreHooks } from '../../src/restore/pages.js';
import { clearCriuVersionCache } from '../../src/runc/criu.js';
import { pino } from 'pino';

const FAKE = fileURLToPath(new URL('../fixtures/bin/fake-runc', import.meta.url));

interface Plan {
  stdout?: string;
  log?: string;
  exit?: number;
  files?: Record<string, string>;
  workfiles?: Record<string, string>;
  capture?: string[];
}

/** Fake GPU hooks recording what the engine asked of them. */
class FakeGpu implements GpuHooks {
  readonly calls: [string, unknown, unknown?][] = [];
  async beforeCheckpoint(pids: readonly number[]): Promise<GpuCheckpointRecord> {
    this.calls.push(['beforeCheckpoint', [...pids]]);
    return { pids: [...pids], timings: { lock: 1 } };
  }
  async resumeAfterCheckpoint(record: GpuCheckpointRecord): Promise<void> {
    this.calls.push(['resumeAfterCheckpoint', record.pids]);
  }
  /** Failures still to come (true: every call). */
  failAfterRestore: boolean | number = false;
  async afterRestore(record: GpuCheckpointRecord, pids: readonly number[]): Promise<void> {
    this.calls.push(['afterRestore', record.pids, [...pids]]);
    if (this.failAfterRestore === true) throw new Error('CUDA restore failed');
    if (typeof this.failAfterRestore === 'number' && this.failAfterRestore > 0) {
      this.failAfterRestore--;
      throw new Error('CUDA restore failed');
    }
  }
}

/** A NativeEngine over fake-runc and a fake CRIU, a source bundle, and helpers. */
function setup(t: Test, extra: Partial<NativeEngineOptions> = {}) {
  const dir = t.testdir();
  const ctl = join(dir, 'fake');
  mkdirSync(ctl);
  process.env.FAKE_RUNC_DIR = ctl;
  const criu = join(dir, 'criu');
  writeFileSync(criu, '#!/bin/sh\n[ "$1" = --version ] && echo "Version: 4.1.1"\n');
  chmodSync(criu, 0o755);
  clearCriuVersionCache();
  const bundle = join(dir, 'bundle');
  mkdirSync(join(bundle, 'rootfs'), { recursive: true });
  const spec = {
    ociVersion: '1.0.2',
    process: { terminal: false, args: ['/bin/app'], cwd: '/' },
    root: { path: 'rootfs', readonly: true },
    mounts: [
      { destination: '/proc', type: 'proc', source: 'proc' },
      { destination: '/data', type: 'bind', source: 'data', options: ['rbind', 'ro'] },
    ],
    annotations: { keep: 'me' },
    linux: { namespaces: [{ type: 'pid' }, { type: 'mount' }] },
  };
  writeFileSync(join(bundle, 'config.json'), JSON.stringify(spec));
  const root = join(dir, 'state');
  const gpu = new FakeGpu();
  const engine = new NativeEngine({ runcPath: FAKE, criuPath: criu, root, gpu, ...extra });
  const plan = (verb: string, p: Plan) => {
    for (const ext of ['stdout', 'log', 'exit', 'capture']) writeOrRemove(join(ctl, `${verb}.${ext}`), undefined);
    for (const ext of ['files', 'workfiles']) writeOrRemove(join(ctl, `${verb}.${ext}`), undefined);
    writeOrRemove(join(ctl, `${verb}.stdout`), p.stdout);
    writeOrRemove(join(ctl, `${verb}.log`), p.log);
    writeOrRemove(join(ctl, `${verb}.exit`), p.exit === undefined ? undefined : String(p.exit));
    writeOrRemove(join(ctl, `${verb}.capture`), p.capture?.map((l) => `${l}\n`).join(''));
    for (const [ext, files] of [
      ['files', p.files],
      ['workfiles', p.workfiles],
    ] as const) {
      if (files === undefined) continue;
      mkdirSync(join(ctl, `${verb}.${ext}`));
      for (const [name, text] of Object.entries(files)) writeFileSync(join(ctl, `${verb}.${ext}`, name), text);
    }
  };
  const calls = (): string[][] => {
    const file = join(ctl, 'calls');
    if (!existsSync(file)) return [];
    return readFileSync(file, 'utf8')
      .split('\x1e')
      .slice(0, -1)
      .map((call) => call.split('\x1f').slice(0, -1))
      .map((argv) => {
        // Drop the global flags: the Runc tests pin those.
        const i = argv.indexOf('--log-format');
        return i >= 0 ? argv.slice(i + 2) : argv;
      });
  };
  const stdioSeen = (): string[] => readFileSync(join(ctl, 'stdio'), 'utf8').trim().split('\n');
  const containerDir = (id: string) => join(root, 'containers', runtimeIdFor(id));
  return { dir, ctl, bundle, root, engine, gpu, plan, calls, stdioSeen, containerDir, criu };
}

function writeOrRemove(path: string, text: string | undefined): void {
  if (text === undefined) rmSync(path, { recursive: true, force: true });
  else writeFileSync(path, text);
}

/** A process that lives for `seconds` (the fake init). */
function liveProcess(t: Test, seconds = 60): number {
  const child = spawn('sleep', [String(seconds)], { stdio: 'ignore' });
  t.teardown(() => {
    child.kill('SIGKILL');
  });
  return child.pid!;
}

async function until<T>(what: string, fn: () => T | undefined, timeoutMs = 10_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = fn();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

function readAvailable(fd: number, max = 4096): string {
  const buf = Buffer.alloc(max);
  const n = readSync(fd, buf, 0, max, null);
  return buf.subarray(0, n).toString('utf8');
}

t.test('create writes a private bundle and gives runc pipes relayed to the caller’s file', async (t) => {
  const { engine, plan, calls, stdioSeen, containerDir, bundle, dir, ctl } = setup(t);
  const pid = liveProcess(t);
  plan('create', { files: { 'pid-file': `${pid}\n` }, stdout: 'hello through the relay\n' });
  const out = openSync(join(dir, 'out.txt'), 'w');
  t.teardown(() => closeSync(out));
  const before = readFileSync(join(bundle, 'config.json'), 'utf8');

  const state = await engine.create({ id: 'app', bundle, stdio: ['ignore', out, out] });
  t.same(state, { id: 'app', status: 'created', pid });
  const rid = runtimeIdFor('app');
  const cdir = containerDir('app');
  t.same(calls(), [['create', '--bundle', join(cdir, 'bundle'), '--pid-file', join(cdir, 'init.pid'), rid]]);
  t.match(stdioSeen()[0], /^create pipe:\[\d+\] pipe:\[\d+\] pipe:\[\d+\]$/, 'runc got anonymous pipes');
  await until('relayed output', () => (readFileSync(join(dir, 'out.txt'), 'utf8').includes('hello through the relay') ? true : undefined));

  const spec = JSON.parse(readFileSync(join(cdir, 'bundle', 'config.json'), 'utf8'));
  t.equal(spec.root.path, join(bundle, 'rootfs'), 'root made absolute');
  t.equal(spec.mounts[1].source, join(bundle, 'data'), 'relative bind source made absolute');
  t.equal(spec.mounts[0].source, 'proc', 'other sources kept');
  t.equal(spec.linux.cgroupsPath, `/thaw/${rid}`, 'a fixed absolute cgroup path');
  t.same(spec.annotations, { keep: 'me', 'org.criu.config': join(cdir, 'criu.conf') });
  t.notOk(existsSync(join(cdir, 'criu.conf')), 'no CRIU config outside a restore');
  t.equal(readFileSync(join(bundle, 'config.json'), 'utf8'), before, 'the caller’s bundle is untouched');

  // The fake runc has exited, so every writer of the output pipes is gone: the relays end by themselves.
  const rec = JSON.parse(readFileSync(join(cdir, 'container.json'), 'utf8'));
  t.equal(rec.relays.length, 3);
  await until('relays to exit', () => (rec.relays.every((r: { pid: number }) => procStat(r.pid) === null || procStat(r.pid)?.state === 'Z') ? true : undefined));

  await t.rejects(engine.create({ id: 'app', bundle, stdio: ['ignore', 'ignore', 'ignore'] }), { code: 'AlreadyExists' });
  await engine.delete('app');
  t.same(calls().at(-1), ['delete', rid]);
  t.notOk(existsSync(cdir), 'state dir removed');
  plan('delete', { exit: 1, log: '{"level":"error","msg":"container does not exist","time":"t"}\n' });
  await t.rejects(engine.delete('app'), { code: 'NotFound' }, 'unknown to runc and to thaw');
  t.ok(existsSync(ctl));
});

t.test('an existing cgroupsPath is kept (made absolute) and the caller’s CRIU config is carried over', async (t) => {
  const { engine, plan, bundle, containerDir, dir } = setup(t);
  const userConf = join(dir, 'user.conf');
  writeFileSync(userConf, 'tcp-close');
  const spec = JSON.parse(readFileSync(join(bundle, 'config.json'), 'utf8'));
  spec.linux.cgroupsPath = 'kubepods/pod1/c1';
  spec.annotations['org.criu.config'] = userConf;
  writeFileSync(join(bundle, 'config.json'), JSON.stringify(spec));
  plan('create', { files: { 'pid-file': `${liveProcess(t)}\n` } });
  await engine.create({ id: 'k', bundle, stdio: ['ignore', 'ignore', 'ignore'] });
  const priv = JSON.parse(readFileSync(join(containerDir('k'), 'bundle', 'config.json'), 'utf8'));
  t.equal(priv.linux.cgroupsPath, '/kubepods/pod1/c1');
  t.equal(readFileSync(join(containerDir('k'), 'criu.conf'), 'utf8'), 'tcp-close\n', 'the caller’s lines stay in effect');
  await engine.delete('k');

  spec.linux.cgroupsPath = '/a b';
  writeFileSync(join(bundle, 'config.json'), JSON.stringify(spec));
  await t.rejects(engine.create({ id: 'w', bundle, stdio: ['ignore', 'ignore', 'ignore'] }), { code: 'InvalidArgument' });
  t.notOk(existsSync(containerDir('w')), 'nothing left after a refused create');
});

t.test('a failed create leaves nothing behind', async (t) => {
  const { engine, plan, bundle, containerDir, dir } = setup(t);
  plan('create', { exit: 1, log: '{"level":"error","msg":"runc create failed: unable to start container process: exec: \\"/bin/app\\": no such file","time":"t"}\n' });
  const out = openSync(join(dir, 'out.txt'), 'w');
  t.teardown(() => closeSync(out));
  const err = await engine.create({ id: 'bad', bundle, stdio: ['ignore', out, out] }).then(
    () => undefined,
    (e: unknown) => e,
  );
  t.type(err, RuncError);
  t.match((err as RuncError).logLine, /no such file/);
  t.notOk(existsSync(containerDir('bad')));
});

t.test('restore: cgroup-root for CRIU only during runc restore, then the GPU gets the new pids', async (t) => {
  const { engine, gpu, plan, calls, bundle, containerDir, dir, ctl } = setup(t);
  const image = join(dir, 'image');
  mkdirSync(image);
  writeFileSync(join(image, 'descriptors.json'), '["pipe:[1]","pipe:[2]","pipe:[2]"]');
  writeFileSync(join(image, NATIVE_IMAGE_FILE), JSON.stringify({ version: 1, runc: '1.1.5', criu: '4.1.1', pids: [7], hostPidNamespace: false, cgroupsPath: '/thaw/old', leaveRunning: false }));
  writeFileSync(join(image, GPU_RECORD_FILE), JSON.stringify({ pids: [7], timings: {}, devices: ['GPU-1'] }));
  const pid = liveProcess(t);
  plan('restore', { files: { 'pid-file': `${pid}\n` }, capture: ['../criu.conf'] });
  plan('ps', { stdout: `[${pid},${pid + 1}]` });
  plan('state', { stdout: JSON.stringify({ id: 'x', pid, status: 'running', bundle: '/b' }) });

  const state = await engine.restore({ id: 'copy', bundle, stdio: ['ignore', 'ignore', 'ignore'], imageDir: image });
  t.same(state, { id: 'copy', status: 'running', pid });
  const rid = runtimeIdFor('copy');
  const cdir = containerDir('copy');
  t.same(calls().slice(0, 1), [
    // --tcp-established always: connections a checkpoint took (runc.tcpEstablished) must come back.
    ['restore', '--detach', '--image-path', image, '--work-path', join(cdir, 'restore-work'), '--bundle', join(cdir, 'bundle'), '--pid-file', join(cdir, 'init.pid'), '--tcp-established', rid],
  ]);
  t.equal(readFileSync(join(ctl, 'captured', 'restore.criu.conf'), 'utf8'), `cgroup-root /thaw/${rid}\n`, 'CRIU restores into the new container’s cgroup');
  t.notOk(existsSync(join(cdir, 'criu.conf')), 'and the config is gone afterwards');
  t.same(gpu.calls, [['afterRestore', [7], [pid, pid + 1]]]);
});

t.test('a failed restore undoes everything; a failed GPU restore deletes the container', async (t) => {
  const { engine, gpu, plan, calls, bundle, containerDir, dir } = setup(t);
  const image = join(dir, 'image');
  mkdirSync(image);
  writeFileSync(join(image, 'descriptors.json'), '[]');
  writeFileSync(join(image, GPU_RECORD_FILE), JSON.stringify({ pids: [7], timings: {} }));
  plan('restore', {
    exit: 1,
    log: '{"level":"error","msg":"criu failed: type NOTIFY errno 0\\nlog file: x","time":"t"}\n',
    workfiles: { 'restore.log': '(00.1) Error (criu/files-reg.c:1): Can\'t open file x\n(00.2) Error (criu/cr-restore.c:2): Restoring FAILED.\n' },
  });
  await t.rejects(engine.restore({ id: 'r1', bundle, stdio: ['ignore', 'ignore', 'ignore'], imageDir: image }), {
    name: 'RuncError',
    message: /criu: Can't open file x/,
  });
  t.notOk(existsSync(containerDir('r1')));
  t.same(gpu.calls, [], 'no GPU step after a failed runc restore');

  plan('restore', { files: { 'pid-file': `${liveProcess(t)}\n` } });
  plan('ps', { stdout: '[1]' });
  gpu.failAfterRestore = true;
  await t.rejects(engine.restore({ id: 'r2', bundle, stdio: ['ignore', 'ignore', 'ignore'], imageDir: image }), { message: 'CUDA restore failed' });
  t.same(calls().at(-1), ['delete', '--force', runtimeIdFor('r2')], 'the restored container is removed');
  t.notOk(existsSync(containerDir('r2')));
});

t.test('restore refuses what it cannot do before touching anything', async (t) => {
  const { bundle, dir, calls, containerDir, criu, root } = setup(t);
  const noGpu = new NativeEngine({ runcPath: FAKE, criuPath: criu, root });
  const quick = new NativeEngine({ runcPath: FAKE, criuPath: criu, root, gpu: new FakeGpu(), pidReleaseTimeoutMs: 200 });
  const image = join(dir, 'image');
  mkdirSync(image);
  writeFileSync(join(image, 'descriptors.json'), '[]');
  writeFileSync(join(image, GPU_RECORD_FILE), JSON.stringify({ pids: [7], timings: {} }));
  await t.rejects(noGpu.restore({ id: 'g', bundle, stdio: ['ignore', 'ignore', 'ignore'], imageDir: image }), {
    code: 'FailedPrecondition',
    message: /CUDA state/,
  });

  const hostPids = join(dir, 'host-pids');
  mkdirSync(hostPids);
  writeFileSync(join(hostPids, 'descriptors.json'), '[]');
  writeFileSync(
    join(hostPids, NATIVE_IMAGE_FILE),
    JSON.stringify({ version: 1, runc: '1.1.5', criu: '4.1.1', pids: [process.pid], hostPidNamespace: true, cgroupsPath: '/x', leaveRunning: true }),
  );
  await t.rejects(quick.restore({ id: 'h', bundle, stdio: ['ignore', 'ignore', 'ignore'], imageDir: hostPids }), {
    code: 'FailedPrecondition',
    message: /still in use \(the source is still running/,
  });

  const empty = join(dir, 'empty');
  mkdirSync(empty);
  await t.rejects(noGpu.restore({ id: 'e', bundle, stdio: ['ignore', 'ignore', 'ignore'], imageDir: empty }), { code: 'DataLoss' });
  t.same(calls(), []);
  t.notOk(existsSync(containerDir('g')));
});

t.test('checkpoint: GPU hooks around runc checkpoint, records next to the image', async (t) => {
  const { engine, gpu, plan, calls, bundle, containerDir, dir } = setup(t);
  plan('create', { files: { 'pid-file': `${liveProcess(t)}\n` } });
  plan('ps', { stdout: '[101,102]' });
  plan('version', { stdout: 'runc version 1.1.5+ds1\ncommit: x\nspec: 1.0.2-dev\n' });
  await engine.create({ id: 'src', bundle, stdio: ['ignore', 'ignore', 'ignore'] });
  const rid = runtimeIdFor('src');
  const cdir = containerDir('src');

  const image = join(dir, 'img1');
  mkdirSync(image);
  await engine.checkpoint('src', { imageDir: image, leaveRunning: false });
  t.same(calls().slice(1), [
    ['ps', '--format', 'json', rid],
    ['checkpoint', '--image-path', image, '--work-path', join(cdir, 'checkpoint-work'), rid],
    ['--version'],
  ]);
  t.same(gpu.calls, [['beforeCheckpoint', [101, 102]]], 'no resume: the container is gone');
  t.same(JSON.parse(readFileSync(join(image, NATIVE_IMAGE_FILE), 'utf8')), {
    version: 1,
    runc: '1.1.5+ds1',
    criu: '4.1.1',
    pids: [101, 102],
    hostPidNamespace: false,
    cgroupsPath: `/thaw/${rid}`,
    leaveRunning: false,
  });
  t.same(JSON.parse(readFileSync(join(image, GPU_RECORD_FILE), 'utf8')), { pids: [101, 102], timings: { lock: 1 } });

  gpu.calls.length = 0;
  const image2 = join(dir, 'img2');
  mkdirSync(image2);
  await engine.checkpoint('src', { imageDir: image2, leaveRunning: true });
  t.same(calls().at(-1), ['checkpoint', '--image-path', image2, '--work-path', join(cdir, 'checkpoint-work'), '--leave-running', rid]);
  t.same(gpu.calls, [['beforeCheckpoint', [101, 102]], ['resumeAfterCheckpoint', [101, 102]]], 'leaveRunning resumes the GPU');

  gpu.calls.length = 0;
  const image3 = join(dir, 'img3');
  mkdirSync(image3);
  plan('checkpoint', {
    exit: 1,
    log: '{"level":"error","msg":"criu failed: type NOTIFY errno 0\\nlog file: x","time":"t"}\n',
    workfiles: { 'dump.log': "(00.06) Error (criu/files-reg.c:1790): Can't lookup mount=27 for fd=1 path=/tmp/out\n(00.07) Error (criu/cr-dump.c:2111): Dumping FAILED.\n" },
  });
  await t.rejects(engine.checkpoint('src', { imageDir: image3, leaveRunning: false }), {
    name: 'RuncError',
    logLine: /criu: Can't lookup mount=27 for fd=1/,
  });
  t.same(gpu.calls, [['beforeCheckpoint', [101, 102]], ['resumeAfterCheckpoint', [101, 102]]], 'a failed dump resumes the GPU');
  t.notOk(existsSync(join(image3, GPU_RECORD_FILE)));
  await t.rejects(engine.checkpoint('nope', { imageDir: image3, leaveRunning: false }), { code: 'NotFound' });
});

t.test('state and delete after runc forgot the container (checkpointed without leaveRunning)', async (t) => {
  const { engine, plan, bundle, containerDir } = setup(t);
  plan('create', { files: { 'pid-file': `${liveProcess(t)}\n` } });
  await engine.create({ id: 'gone', bundle, stdio: ['ignore', 'ignore', 'ignore'] });
  plan('state', { exit: 1, log: '{"level":"error","msg":"container does not exist","time":"t"}\n' });
  plan('delete', { exit: 1, log: '{"level":"error","msg":"container does not exist","time":"t"}\n' });
  t.same(await engine.state('gone'), { id: 'gone', status: 'stopped', pid: 0 });
  await engine.delete('gone');
  t.notOk(existsSync(containerDir('gone')));
  await t.rejects(engine.state('gone'), { code: 'NotFound' });
  plan('delete', { exit: 1, log: '{"level":"error","msg":"cannot delete container that is not stopped: running","time":"t"}\n' });
  plan('create', { files: { 'pid-file': `${liveProcess(t)}\n` } });
  await engine.create({ id: 'busy', bundle, stdio: ['ignore', 'ignore', 'ignore'] });
  await t.rejects(engine.delete('busy'), { code: 'FailedPrecondition' });
  t.ok(existsSync(containerDir('busy')), 'kept when runc refuses');
});

t.test('wait: the zombie’s status when seen, else 137 after SIGKILL, else unknown', async (t) => {
  const { engine, plan, bundle } = setup(t);
  // A zombie nobody reaps for a while: sh forks a child that exits 7 once sh has become `sleep`.
  const holder = spawn('sh', ['-c', '(sleep 0.3; exit 7) & echo $!; exec sleep 5'], { stdio: ['ignore', 'pipe', 'ignore'] });
  t.teardown(() => holder.kill('SIGKILL'));
  const zombie = Number(await new Promise<string>((resolve) => holder.stdout.once('data', (d: Buffer) => resolve(d.toString()))));
  plan('create', { files: { 'pid-file': `${zombie}\n` } });
  await engine.create({ id: 'z', bundle, stdio: ['ignore', 'ignore', 'ignore'] });
  t.equal((await engine.wait('z')).exitStatus, 7);

  const short = spawn('sleep', ['0.3'], { stdio: 'ignore' });
  // Node emits 'exit' once it has reaped the child: looked at any earlier, a loaded machine could
  // show the zombie (status 0) in the moment between its exit and the reap.
  await new Promise((resolve) => short.once('exit', resolve));
  plan('create', { files: { 'pid-file': `${short.pid}\n` } });
  await engine.create({ id: 'reaped', bundle, stdio: ['ignore', 'ignore', 'ignore'] });
  t.equal((await engine.wait('reaped')).exitStatus, UNKNOWN_EXIT_STATUS, 'reaped by its parent before we looked');

  const killed = spawn('sleep', ['30'], { stdio: 'ignore' });
  plan('create', { files: { 'pid-file': `${killed.pid}\n` } });
  await engine.create({ id: 'k', bundle, stdio: ['ignore', 'ignore', 'ignore'] });
  const waiting = engine.wait('k');
  await engine.kill('k', 9);
  killed.kill('SIGKILL'); // the fake runc kill does nothing: do it here
  t.equal((await waiting).exitStatus, 137);

  const ac = new AbortController();
  const forever = liveProcess(t);
  plan('create', { files: { 'pid-file': `${forever}\n` } });
  await engine.create({ id: 'f', bundle, stdio: ['ignore', 'ignore', 'ignore'] });
  const aborted = engine.wait('f', ac.signal);
  setTimeout(() => ac.abort(), 100);
  await t.rejects(aborted, { code: 'Canceled' });
  await t.rejects(engine.wait('none'), { code: 'NotFound' });
});

t.test('exec: pipes, the host pid, exit and kill', async (t) => {
  const { engine, plan, calls, bundle, stdioSeen } = setup(t);
  plan('create', { files: { 'pid-file': `${liveProcess(t)}\n` } });
  await engine.create({ id: 'e', bundle, stdio: ['ignore', 'ignore', 'ignore'] });
  const target = spawn('sh', ['-c', 'exec sleep 30'], { stdio: 'ignore' });
  plan('exec', { files: { 'pid-file': `${target.pid}\n` } });
  const h = await engine.exec('e', { process: { args: ['/bin/sh'], cwd: '/' }, stdio: ['ignore', 'ignore', 'ignore'] });
  t.equal(h.pid, target.pid);
  t.equal(calls().at(-1)![0], 'exec');
  t.match(stdioSeen().at(-1), /^exec pipe:\[\d+\] pipe:\[\d+\] pipe:\[\d+\]$/);
  await h.kill(15);
  t.equal((await h.exited).exitStatus, UNKNOWN_EXIT_STATUS, 'reaped by Node before we looked');
  await t.rejects(h.kill(15), { code: 'NotFound' });
});

t.test('interposeStdio: files, FIFOs and nothing become relayed pipes; pipes pass through', async (t) => {
  const dir = t.testdir();
  const file = join(dir, 'out.txt');
  const out = openSync(file, 'w');
  t.teardown(() => closeSync(out));
  const io = await interposeStdio(['ignore', out, 'ignore']);
  const [inFd, outFd, errFd] = io.fds as [number, number, number];
  t.ok([inFd, outFd, errFd].every(isAnonymousPipe), 'three anonymous pipes');
  t.equal(io.relays.length, 3);
  t.equal(readAvailable(inFd), '', 'stdin "ignore" reads EOF');
  writeSync(outFd, 'to the file\n');
  writeSync(errFd, 'to nowhere\n');

  const again = await interposeStdio([inFd, outFd, errFd]);
  t.same(again.fds, [inFd, outFd, errFd], 'anonymous pipes pass through');
  t.same(again.relays, []);
  io.close();
  await until('relayed file contents', () => (readFileSync(file, 'utf8') === 'to the file\n' ? true : undefined));
  await until('output relays to end at EOF', () => (io.relays.every((r) => procStat(r.pid) === null || procStat(r.pid)!.state === 'Z') ? true : undefined));

  // stdin from a FIFO the shim opened non-blocking (cat would fail on EAGAIN without the reopen).
  const fifo = join(dir, 'in.fifo');
  await execa('mkfifo', [fifo]);
  const reader = openSync(fifo, constants.O_RDONLY | constants.O_NONBLOCK);
  const writer = openSync(fifo, constants.O_WRONLY);
  t.teardown(() => {
    closeSync(reader);
  });
  const fromFifo = await interposeStdio([reader, 'ignore', 'ignore']);
  writeSync(writer, 'typed input\n');
  const got = await until('stdin via the relay', () => {
    const s = readAvailable(fromFifo.fds[0] as number);
    return s === '' ? undefined : s;
  });
  t.equal(got, 'typed input\n');
  // The stdin relay would block on the FIFO forever: stopRelays ends it.
  const stdinRelay = fromFifo.relays.find((r) => r.role === 'stdin')!;
  t.ok(procStat(stdinRelay.pid) !== null, 'stdin relay running');
  await stopRelays(fromFifo.relays, { drainMs: 200 });
  await until('stdin relay killed', () => (procStat(stdinRelay.pid) === null || procStat(stdinRelay.pid)!.state === 'Z' ? true : undefined));
  closeSync(writer);
  fromFifo.close();
});

t.test('/proc parsing and wait statuses', async (t) => {
  const me = procStat(process.pid)!;
  t.ok(me.startTime > 0);
  t.match(me.state, /^[RS]$/);
  t.equal(procStat(0x7ffffff0), null);
  t.equal(decodeWaitStatus(7 << 8), 7);
  t.equal(decodeWaitStatus(9), 137);
  t.equal(decodeWaitStatus(0), 0);
});

t.test('identity names runc and CRIU versions', async (t) => {
  const { engine, plan } = setup(t);
  plan('version', { stdout: 'runc version 1.1.5+ds1\ncommit: x\nspec: 1.0.2-dev\n' });
  t.same(await engine.identity(), { engine: 'native', runtime: 'runc', version: '1.1.5+ds1', criu: '4.1.1' });
});

// ---- lazy pages (thaw's page server; startLazyRestore is faked, runc is fake-runc) ----

/** A stand-in for startLazyRestore driving the engine's hooks the way the real one does. */
interface FakeLazy {
  start: NonNullable<NativeLazyPagesTuning['start']>;
  /** What the engine passed to start(). */
  seen: (LazyPagesOptions & { hooks: LazyRestoreHooks })[];
  /** Settles `done` of the current restore. */
  finish(result: 'ok' | PageServerError): Promise<void>;
  aborted: number;
}

function fakeLazy(opts: { refuse?: Error; failRestore?: PageServerError; afterRestore?: () => void } = {}): FakeLazy {
  const seen: FakeLazy['seen'] = [];
  let settle: ((v: 'ok' | PageServerError) => void) | undefined;
  const fake: FakeLazy = {
    seen,
    aborted: 0,
    async finish(result) {
      for (let i = 0; i < 500 && settle === undefined; i++) await sleep(10);
      settle?.(result);
    },
    async start(o) {
      seen.push(o);
      if (opts.refuse) throw opts.refuse; // prepare() refused: nothing ran
      await o.hooks.restore(new AbortController().signal);
      if (opts.failRestore) {
        await o.hooks.kill([1]);
        throw opts.failRestore;
      }
      opts.afterRestore?.();
      const outcome = new Promise<'ok' | PageServerError>((resolve) => (settle = resolve));
      const done = outcome.then(async (r): Promise<LazyPagesResult> => {
        if (r === 'ok') return { pids: [1], bytes: 4096, fillMs: 1, allPagesMs: 2, totalMs: 3, verified: o.checksums !== undefined, tasks: [] };
        await o.hooks.kill([1]); // the real one kills before it rejects (and before closing the uffds)
        throw r;
      });
      done.catch(() => undefined);
      return {
        pids: [1],
        restoreMs: 5,
        done,
        abort: () => {
          fake.aborted++;
          settle?.(new PageServerError('Canceled', 'task 1: page server fill canceled', { phase: 'fill', pids: [1], killed: true }));
        },
      };
    },
  };
  return fake;
}

function lazyImage(dir: string, gpu: boolean): string {
  const image = join(dir, 'image');
  mkdirSync(image);
  writeFileSync(join(image, 'descriptors.json'), '["pipe:[1]","pipe:[2]","pipe:[2]"]');
  writeFileSync(join(image, NATIVE_IMAGE_FILE), JSON.stringify({ version: 1, runc: '1.1.5', criu: '4.1.1', pids: [7], hostPidNamespace: false, cgroupsPath: '/thaw/old', leaveRunning: false }));
  if (gpu) writeFileSync(join(image, GPU_RECORD_FILE), JSON.stringify({ pids: [7], timings: {} }));
  return image;
}

/** JSON log lines written by a pino logger into an array. */
function captureLog(): { log: Logger; lines: Record<string, unknown>[] } {
  const lines: Record<string, unknown>[] = [];
  return { log: pino({ level: 'debug' }, { write: (s: string) => void lines.push(JSON.parse(s) as Record<string, unknown>) }), lines };
}

const NO_ADDON_NEEDED = { binding: {} as UffdBinding };

t.test('lazy restore: runc restore --lazy-pages in its own work dir, CUDA restore before the fill is awaited', async (t) => {
  const { log, lines } = captureLog();
  const lazy = fakeLazy();
  const { engine, gpu, plan, calls, bundle, containerDir, dir, ctl } = setup(t, { log, lazyPages: 'on', lazyPagesTuning: { ...NO_ADDON_NEEDED, start: lazy.start, threads: 3 } });
  const image = lazyImage(dir, true);
  const pid = liveProcess(t);
  plan('restore', { files: { 'pid-file': `${pid}\n` }, capture: ['../criu.conf'] });
  plan('ps', { stdout: `[${pid}]` });
  plan('state', { stdout: JSON.stringify({ id: 'x', pid, status: 'running', bundle: '/b' }) });
  const checksums = new Map([[join(image, 'pages-1.img'), { bytes: 1, hash: '0000000000000000', algo: 'xxh64' }]]);
  // The fill ends only once the CUDA restore ran: awaiting it first would deadlock.
  const origAfterRestore = gpu.afterRestore.bind(gpu);
  gpu.afterRestore = async (rec, pids) => {
    await origAfterRestore(rec, pids);
    void lazy.finish('ok');
  };
  const restoring = engine.restore({ id: 'lz', bundle, stdio: ['ignore', 'ignore', 'ignore'], imageDir: image, pageChecksums: checksums });
  const state = await Promise.race([restoring, sleep(10_000).then(() => Promise.reject(new Error('the fill was awaited before the CUDA restore')))]);
  t.same(state, { id: 'lz', status: 'running', pid });
  const rid = runtimeIdFor('lz');
  const cdir = containerDir('lz');
  const work = join(cdir, 'restore-work-lazy');
  t.same(calls()[0], ['restore', '--detach', '--image-path', image, '--work-path', work, '--bundle', join(cdir, 'bundle'), '--pid-file', join(cdir, 'init.pid'), '--lazy-pages', '--tcp-established', rid]);
  t.equal(calls().filter((c) => c[0] === 'restore').length, 1, 'one restore');
  t.equal(readFileSync(join(ctl, 'captured', 'restore.criu.conf'), 'utf8'), `cgroup-root /thaw/${rid}\n`, 'CRIU restores into the new cgroup');
  t.notOk(existsSync(join(cdir, 'criu.conf')), 'config gone afterwards');
  const o = lazy.seen[0]!;
  t.equal(o.imageDir, image);
  t.equal(o.workDir, work, 'the page server listens where CRIU looks (--work-path)');
  t.equal(o.checksums, checksums, 'the manifest’s checksums reach the page server');
  t.equal(o.threads, 3, 'tuning passed on');
  t.same(gpu.calls, [['afterRestore', [7], [pid]]]);
  const done = lines.find((l) => l.msg === 'native restore done');
  t.match(done, { id: 'lz', phase: 'restore', mode: 'lazy', timings: { 'runc-restore-lazy': Number, 'gpu-restore': Number, 'lazy-pages': 3 } });
  t.match(lines.find((l) => l.msg === 'anonymous memory restored by the page server'), { id: 'lz', phase: 'lazy-pages', durationMs: 3, verified: true });
});

t.test('a failed fill: the lazy container is killed, the plain restore follows, output still reaches the caller', async (t) => {
  const { log, lines } = captureLog();
  let criu: ReturnType<typeof spawn> | undefined;
  let plan2: (() => void) | undefined;
  const lazy = fakeLazy({
    afterRestore: () => {
      // A CRIU stand-in still holding its log in the work dir, with a child: the kill must get both.
      criu = spawn('sh', ['-c', 'exec 3>>"$0/restore.log"; sleep 60 & echo $!; wait', lazyWork], { stdio: ['ignore', 'pipe', 'ignore'] });
      plan2?.();
    },
  });
  const { engine, gpu, plan, calls, bundle, containerDir, dir } = setup(t, { log, lazyPages: 'on', lazyPagesTuning: { ...NO_ADDON_NEEDED, start: lazy.start } });
  const lazyWork = join(containerDir('fb'), 'restore-work-lazy');
  const image = lazyImage(dir, true);
  const first = liveProcess(t);
  const second = liveProcess(t);
  plan('restore', { files: { 'pid-file': `${first}\n` }, stdout: 'from the lazy restore\n' });
  plan2 = () => plan('restore', { files: { 'pid-file': `${second}\n` }, stdout: 'from the plain restore\n' });
  plan('ps', { stdout: '[1]' });
  plan('state', { stdout: JSON.stringify({ id: 'x', pid: second, status: 'running', bundle: '/b' }) });
  const outFile = join(dir, 'out.txt');
  const out = openSync(outFile, 'w');
  t.teardown(() => closeSync(out));

  const restoring = engine.restore({ id: 'fb', bundle, stdio: ['ignore', out, out], imageDir: image });
  const stub = await until('the lazy restore to run', () => criu);
  t.teardown(() => {
    stub.kill('SIGKILL');
  });
  const child = Number(await new Promise<string>((resolve) => stub.stdout!.once('data', (d: Buffer) => resolve(d.toString()))));
  await until('the CUDA restore during the fill', () => (gpu.calls.length > 0 ? true : undefined));
  await lazy.finish(new PageServerError('DeadlineExceeded', 'task 1: page server fill timed out', { phase: 'fill', pids: [1], killed: true }));
  const state = await restoring;
  t.equal(state.pid, second, 'the plain restore’s init runs');
  const rid = runtimeIdFor('fb');
  const cdir = containerDir('fb');
  t.same(
    calls().map((c) => c.slice(0, 1).concat(c.includes('--lazy-pages') ? ['--lazy-pages'] : [], c.includes('--work-path') ? [c[c.indexOf('--work-path') + 1]!] : [])),
    [['restore', '--lazy-pages', join(cdir, 'restore-work-lazy')], ['ps'], ['delete'], ['restore', join(cdir, 'restore-work')], ['ps'], ['state']],
    'lazy restore, CUDA restore, kill, plain restore, CUDA restore again',
  );
  t.same(calls()[2], ['delete', '--force', rid]);
  t.same(gpu.calls, [['afterRestore', [7], [1]], ['afterRestore', [7], [1]]]);
  t.ok(['Z', undefined].includes(procStat(first)?.state), 'the lazily restored init was killed (its recorded start time matched)');
  await until('the CRIU stand-in and its child to die', () => (['Z', undefined].includes(procStat(criu!.pid!)?.state) && ['Z', undefined].includes(procStat(child)?.state) ? true : undefined));
  t.match(lines.find((l) => l.msg === 'restoring without lazy pages'), { id: 'fb', phase: 'lazy-pages', fallback: 'restore', reason: /fill timed out/, err: { code: 'DeadlineExceeded' } });
  t.match(lines.find((l) => l.msg === 'native restore done'), { mode: 'plain', timings: { 'lazy-kill': Number, 'runc-restore': Number } });
  await until('both restores’ output through the relays', () => {
    const text = readFileSync(outFile, 'utf8');
    return text.includes('from the lazy restore') && text.includes('from the plain restore') ? true : undefined;
  });
  const rec = JSON.parse(readFileSync(join(cdir, 'container.json'), 'utf8'));
  t.equal(rec.init.pid, second, 'the record names the plain restore’s init');
});

t.test('the page server refusing the image (or CRIU without uffd, or off): plain restore, nothing killed', async (t) => {
  const { log, lines } = captureLog();
  const refusing = fakeLazy({ refuse: new PagesUnsupportedError('FailedPrecondition', 'CRIU image x: pre-dump pages (PE_PARENT) are not served', { path: 'x' }) });
  const { engine, plan, calls, bundle, dir, criu, root, containerDir } = setup(t, { log, lazyPages: 'on', lazyPagesTuning: { ...NO_ADDON_NEEDED, start: refusing.start } });
  const image = lazyImage(dir, false);
  const pid = liveProcess(t);
  plan('restore', { files: { 'pid-file': `${pid}\n` } });
  plan('state', { stdout: JSON.stringify({ id: 'x', pid, status: 'running', bundle: '/b' }) });
  await engine.restore({ id: 'r1', bundle, stdio: ['ignore', 'ignore', 'ignore'], imageDir: image });
  t.same(
    calls().map((c) => c[0]),
    ['restore', 'state'],
  );
  t.notOk(calls()[0]!.includes('--lazy-pages'));
  t.equal(calls()[0]![calls()[0]!.indexOf('--work-path') + 1], join(containerDir('r1'), 'restore-work'));
  t.match(lines.find((l) => l.msg === 'restoring without lazy pages'), { fallback: 'restore', reason: /PE_PARENT/ });

  // auto: the fake CRIU does not know `check --feature uffd-noncoop`.
  const never = fakeLazy();
  const auto = new NativeEngine({ runcPath: FAKE, criuPath: criu, root, log, lazyPagesTuning: { ...NO_ADDON_NEEDED, start: never.start } });
  await auto.restore({ id: 'r2', bundle, stdio: ['ignore', 'ignore', 'ignore'], imageDir: image });
  t.same(never.seen, [], 'auto: not tried');
  t.match(lines.find((l) => l.msg === 'lazy pages not used' && l.id === 'r2'), { reason: /cannot restore lazily/ });
  await auto.restore({ id: 'r3', bundle, stdio: ['ignore', 'ignore', 'ignore'], imageDir: image, lazyPages: 'off' });
  t.same(never.seen, [], 'off per restore');
  t.match(lines.find((l) => l.msg === 'lazy pages not used' && l.id === 'r3'), { reason: 'lazy pages are off' });
  t.notOk(calls().some((c) => c[0] === 'delete'), 'nothing to kill');
});

t.test('no plain restore after a lazy failure when it would be wrong: bad checksum, tasks not killed', async (t) => {
  // The pages differ from the manifest: restoring the same bytes again would not help.
  {
    const lazy = fakeLazy();
    const { engine, plan, calls, bundle, dir, containerDir } = setup(t, { lazyPages: 'on', lazyPagesTuning: { ...NO_ADDON_NEEDED, start: lazy.start } });
    const image = lazyImage(dir, false);
    plan('restore', { files: { 'pid-file': `${liveProcess(t)}\n` } });
    const restoring = engine.restore({ id: 'bad', bundle, stdio: ['ignore', 'ignore', 'ignore'], imageDir: image });
    await lazy.finish(new PageServerError('DataLoss', 'pages-1.img: checksum differs', { phase: 'verify', pids: [1], killed: true }));
    await t.rejects(restoring, { name: 'PageServerError', code: 'DataLoss', phase: 'verify' });
    t.equal(calls().filter((c) => c[0] === 'restore').length, 1, 'no second restore');
    t.notOk(existsSync(containerDir('bad')), 'nothing left');
  }
  // The kill hook failed: the half-restored tasks may live, with their uffds open.
  {
    const lazy = fakeLazy({ failRestore: new PageServerError('Unavailable', 'lazy restore failed: CRIU hung up', { phase: 'receive', pids: [1], killed: false }) });
    const { engine, plan, calls, bundle, dir } = setup(t, { lazyPages: 'on', lazyPagesTuning: { ...NO_ADDON_NEEDED, start: lazy.start } });
    const image = lazyImage(dir, false);
    plan('restore', { files: { 'pid-file': `${liveProcess(t)}\n` } });
    await t.rejects(engine.restore({ id: 'alive', bundle, stdio: ['ignore', 'ignore', 'ignore'], imageDir: image }), { code: 'Internal', message: /could not be killed/ });
    t.equal(calls().filter((c) => c[0] === 'restore').length, 1, 'no second restore');
  }
  // The CUDA restore failed during the fill and again after a plain restore: reported, nothing left.
  {
    const lazy = fakeLazy();
    const { engine, gpu, plan, calls, bundle, dir, containerDir } = setup(t, { lazyPages: 'on', lazyPagesTuning: { ...NO_ADDON_NEEDED, start: lazy.start } });
    const image = lazyImage(dir, true);
    plan('restore', { files: { 'pid-file': `${liveProcess(t)}\n` } });
    plan('ps', { stdout: '[1]' });
    gpu.failAfterRestore = true;
    await t.rejects(engine.restore({ id: 'cuda', bundle, stdio: ['ignore', 'ignore', 'ignore'], imageDir: image }), { message: 'CUDA restore failed' });
    t.equal(lazy.aborted, 1, 'the fill was aborted');
    t.same(
      calls().filter((c) => c[0] === 'restore').map((c) => c.includes('--lazy-pages')),
      [true, false],
      'the plain restore was tried once',
    );
    t.equal(gpu.calls.filter((c) => c[0] === 'afterRestore').length, 2);
    t.same(calls().at(-1), ['delete', '--force', runtimeIdFor('cuda')], 'the container is removed');
    t.notOk(existsSync(containerDir('cuda')));
  }
  // A failed runc restore --lazy-pages (the real startLazyRestore kills, then rejects): plain restore.
  {
    const lazy = fakeLazy({ failRestore: new PageServerError('Unknown', 'lazy restore failed: runc restore failed', { phase: 'restore', pids: [], killed: true }) });
    const { engine, plan, calls, bundle, dir } = setup(t, { lazyPages: 'on', lazyPagesTuning: { ...NO_ADDON_NEEDED, start: lazy.start } });
    const image = lazyImage(dir, false);
    const pid = liveProcess(t);
    plan('restore', { files: { 'pid-file': `${pid}\n` } });
    plan('state', { stdout: JSON.stringify({ id: 'x', pid, status: 'running', bundle: '/b' }) });
    t.equal((await engine.restore({ id: 'again', bundle, stdio: ['ignore', 'ignore', 'ignore'], imageDir: image })).pid, pid);
    t.same(
      calls().map((c) => [c[0], c.includes('--lazy-pages')]),
      [
        ['restore', true],
        ['delete', false],
        ['restore', false],
        ['state', false],
      ],
    );
  }
});

t.test('a CUDA restore that fails only while pages arrive: the lazy tasks are killed, the plain restore succeeds', async (t) => {
  const lazy = fakeLazy();
  const { engine, gpu, plan, calls, bundle, dir } = setup(t, { lazyPages: 'on', lazyPagesTuning: { ...NO_ADDON_NEEDED, start: lazy.start } });
  const image = lazyImage(dir, true);
  const pid = liveProcess(t);
  plan('restore', { files: { 'pid-file': `${pid}\n` } });
  plan('ps', { stdout: `[${pid}]` });
  plan('state', { stdout: JSON.stringify({ id: 'x', pid, status: 'running', bundle: '/b' }) });
  gpu.failAfterRestore = 1;
  t.equal((await engine.restore({ id: 'pinned', bundle, stdio: ['ignore', 'ignore', 'ignore'], imageDir: image })).pid, pid);
  t.equal(lazy.aborted, 1, 'the fill was aborted');
  t.same(
    calls().filter((c) => c[0] === 'restore' || c[0] === 'delete').map((c) => [c[0], c.includes('--lazy-pages')]),
    [
      ['restore', true],
      ['delete', false],
      ['restore', false],
    ],
    'lazy attempt killed and deleted, then the plain restore',
  );
  t.equal(gpu.calls.filter((c) => c[0] === 'afterRestore').length, 2, 'the GPU step ran again on the plain restore');
});

t.test('selfVerifiedFiles: the page images when lazy pages will be used, nothing otherwise', async (t) => {
  const files = ['image/pages-1.img', 'image/pages-12.img', 'image/pagemap-1.img', 'image/core-1.img', 'thaw-image.json'].map((path) => ({ path, bytes: 1, hash: '0', algo: 'xxh64' }));
  const on = setup(t, { lazyPages: 'on', lazyPagesTuning: { ...NO_ADDON_NEEDED } });
  t.same((await on.engine.selfVerifiedFiles(files)).map((f) => f.path), ['image/pages-1.img', 'image/pages-12.img']);
  const off = setup(t, { lazyPages: 'off', lazyPagesTuning: { ...NO_ADDON_NEEDED } });
  t.same(await off.engine.selfVerifiedFiles(files), [], 'off: the lifecycle verifies everything itself');
});

t.test('lazyPages auto: an image of several processes restores with lazy pages too (the page server reads its pages)', async (t) => {
  const { log, lines } = captureLog();
  const lazy = fakeLazy();
  const { engine, plan, calls, bundle, dir } = setup(t, { log, lazyPages: 'auto', lazyPagesTuning: { ...NO_ADDON_NEEDED, start: lazy.start } });
  // A CRIU that passes `check --feature uffd-noncoop` (the setup's stand-in does not).
  const criu = join(dir, 'criu-uffd');
  writeFileSync(criu, '#!/bin/sh\n[ "$1" = --version ] && echo "Version: 4.1.1"\nexit 0\n');
  chmodSync(criu, 0o755);
  const auto = new NativeEngine({ runcPath: FAKE, criuPath: criu, root: join(dir, 'state-auto'), log, lazyPages: 'auto', lazyPagesTuning: { ...NO_ADDON_NEEDED, start: lazy.start } });
  const image = lazyImage(dir, false);
  for (const pid of [7, 8]) writeFileSync(join(image, `pagemap-${pid}.img`), '');
  const pid = liveProcess(t);
  plan('restore', { files: { 'pid-file': `${pid}\n` } });
  plan('state', { stdout: JSON.stringify({ id: 'x', pid, status: 'running', bundle: '/b' }) });
  const restoring = auto.restore({ id: 'multi', bundle, stdio: ['ignore', 'ignore', 'ignore'], imageDir: image });
  await lazy.finish('ok');
  t.same(await restoring, { id: 'multi', status: 'running', pid });
  t.equal(lazy.seen.length, 1, 'the page server restored it');
  t.same(
    calls().filter((c) => c[0] === 'restore').map((c) => c.includes('--lazy-pages')),
    [true],
    'one restore, with lazy pages',
  );
  t.notOk(lines.some((l) => l.msg === 'lazy pages not used' && l.id === 'multi'), 'no reason to skip them');
  const files = ['image/pages-1.img', 'image/pagemap-7.img', 'image/pagemap-8.img'].map((path) => ({ path, bytes: 1, hash: '0', algo: 'xxh64' }));
  t.same((await auto.selfVerifiedFiles(files)).map((f) => f.path), ['image/pages-1.img'], 'so the lifecycle leaves the page images to it');
  t.same(await engine.selfVerifiedFiles(files), [], 'a CRIU that cannot restore lazily: the lifecycle checks them');
});

t.test('runc.tcpEstablished: checkpoints take established TCP connections only when configured', async (t) => {
  for (const [tcpEstablished, want] of [
    [undefined, false],
    [true, true],
  ] as const) {
    const { engine, plan, calls, bundle, dir } = setup(t, tcpEstablished === undefined ? {} : { tcpEstablished });
    plan('create', { files: { 'pid-file': `${liveProcess(t)}\n` } });
    plan('ps', { stdout: '[101]' });
    plan('version', { stdout: 'runc version 1.1.5+ds1\ncommit: x\nspec: 1.0.2-dev\n' });
    await engine.create({ id: 'tcp', bundle, stdio: ['ignore', 'ignore', 'ignore'] });
    const image = join(dir, 'img');
    mkdirSync(image);
    await engine.checkpoint('tcp', { imageDir: image, leaveRunning: true });
    const checkpoint = calls().find((c) => c[0] === 'checkpoint');
    t.equal(checkpoint?.includes('--tcp-established'), want, `tcpEstablished ${tcpEstablished}: --tcp-established ${want ? 'passed' : 'not passed'}`);
    await engine.delete('tcp', { force: true });
  }
});
