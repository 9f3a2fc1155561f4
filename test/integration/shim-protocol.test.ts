/**
 * The shim binary against a real containerd 1.6: `start` from a bundle prints the address containerd
 * expects (without holding the reply pipe), our ttrpc client Connects to the served socket,
 * `delete` prints a DeleteResponse, events forwarded to TTRPC_ADDRESS show up in `ctr events`, and
 * containerd's own ttrpc client reaches the served Task service (`ctr run` → Create → Unimplemented).
 * Gated by THAW_INTEGRATION=1; needs root, containerd, ctr and tar.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { chmod, copyFile, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';
import t, { type Test } from 'tap';
import { create, fromBinary } from '@bufbuild/protobuf';
import { TaskOOMSchema } from '../../src/gen/containerd/events/task_pb.js';
import { DeleteResponseSchema, Task } from '../../src/gen/containerd/task/v2/shim_pb.js';
import { Publisher } from '../../src/task/publisher.js';
import { TtrpcClient } from '../../src/ttrpc/client.js';
import { cwdOf, pidExists as alive } from '../../src/procfs.js';
import { shimServerDone } from '../helpers/containerd.js';

const repo = fileURLToPath(new URL('../../', import.meta.url));
const SHIM = 'containerd-shim-thaw-v2';
const SOCKET_DIR = '/run/containerd/s';

function missing(): string | undefined {
  if (!process.env.THAW_INTEGRATION) return 'set THAW_INTEGRATION=1 to run';
  if (process.getuid?.() !== 0) return 'needs root';
  for (const bin of ['containerd', 'ctr', 'tar']) {
    if (spawnSync('sh', ['-c', `command -v ${bin}`]).status !== 0) return `${bin} not installed`;
  }
  return undefined;
}

interface Run {
  code: number | null;
  out: string;
  err: string;
}

/** Runs a command to completion (close of all its stdio), with a timeout. */
function run(file: string, args: readonly string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { cwd: opts.cwd, env: opts.env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (c: Buffer) => (out += c.toString('latin1')));
    child.stderr.on('data', (c: Buffer) => (err += c.toString()));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${file} ${args.join(' ')} timed out; out=${out} err=${err}`));
    }, opts.timeoutMs ?? 60_000);
    child.once('error', reject);
    child.once('close', (code) => {
      clearTimeout(timer);
      resolve({ code, out, err });
    });
  });
}

async function until(cond: () => boolean | Promise<boolean>, timeoutMs: number, what: string): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Whether a `containerd-shim-thaw-v2 … -id ID … delete` process is running. */
function deleteRunning(id: string): boolean {
  for (const pid of readdirSync('/proc').filter((d) => /^\d+$/.test(d))) {
    let argv: string[];
    try {
      argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
    } catch {
      continue;
    }
    if (argv.some((a) => a.endsWith(SHIM)) && argv.includes(id) && argv.includes('delete')) return true;
  }
  return false;
}


/** containerd's convention: sha256(filepath.Join(grpcAddress, ns, group)) under /run/containerd/s. */
function expectedAddress(grpcAddress: string, ns: string, group: string): string {
  return `unix://${SOCKET_DIR}/${createHash('sha256').update(`${grpcAddress}/${ns}/${group}`).digest('hex')}`;
}

/**
 * Compiles only the shim entry point (and what it imports) into <repo>/tmp/<dir>/dist — inside
 * the repository so node_modules resolve, and git-ignored —, bundles it, and copies bin/'s real
 * launcher beside it, so `../dist/bundle/shim.js` resolves exactly as in a release.
 */
async function buildShim(work: string): Promise<string> {
  await writeFile(
    path.join(work, 'tsconfig.json'),
    JSON.stringify({
      extends: path.join(repo, 'tsconfig.json'),
      compilerOptions: { outDir: path.join(work, 'dist'), rootDir: repo, sourceMap: false, noEmit: false },
      include: [],
      files: [path.join(repo, 'src/cli/shim.ts')],
    }),
  );
  const tsc = await run(process.execPath, [path.join(repo, 'node_modules/typescript/bin/tsc'), '-p', path.join(work, 'tsconfig.json')], { timeoutMs: 300_000 });
  if (tsc.code !== 0) throw new Error(`tsc failed: ${tsc.out}${tsc.err}`);
  const bundled = await run(process.execPath, [path.join(repo, 'scripts/bundle.mjs'), path.join(work, 'dist')], { timeoutMs: 120_000 });
  if (bundled.code !== 0) throw new Error(`bundling failed: ${bundled.out}${bundled.err}`);
  const bin = path.join(work, 'bin');
  await mkdir(bin);
  for (const f of ['launch.mjs', `${SHIM}.mjs`]) await copyFile(path.join(repo, 'bin', f), path.join(bin, f));
  await copyFile(path.join(repo, 'bin', SHIM), path.join(bin, SHIM));
  await chmod(path.join(bin, SHIM), 0o755);
  return bin;
}

/** A one-layer OCI image (busybox or any small file) as `ctr images import` takes it. */
async function buildImage(dir: string, name: string): Promise<string> {
  const rootfs = path.join(dir, 'rootfs');
  await mkdir(path.join(rootfs, 'bin'), { recursive: true });
  const busybox = ['/bin/busybox', '/usr/bin/busybox'].find((p) => existsSync(p));
  if (busybox) await copyFile(busybox, path.join(rootfs, 'bin/busybox'));
  else await writeFile(path.join(rootfs, 'bin/busybox'), '#!/bin/sh\n');
  const layerTar = path.join(dir, 'layer.tar');
  const tar = await run('tar', ['--sort=name', '--owner=0', '--group=0', '--numeric-owner', '--mtime=@0', '-C', rootfs, '-cf', layerTar, '.']);
  if (tar.code !== 0) throw new Error(`tar failed: ${tar.err}`);
  const layer = await readFile(layerTar);
  const sha = (b: Buffer | string): string => `sha256:${createHash('sha256').update(b).digest('hex')}`;
  const blobs = path.join(dir, 'oci', 'blobs', 'sha256');
  await mkdir(blobs, { recursive: true });
  const put = async (data: Buffer | string): Promise<{ digest: string; size: number }> => {
    const digest = sha(data);
    await writeFile(path.join(blobs, digest.slice('sha256:'.length)), data);
    return { digest, size: Buffer.byteLength(data) };
  };
  const gz = await put(gzipSync(layer));
  const config = await put(
    JSON.stringify({
      architecture: 'amd64',
      os: 'linux',
      config: { Cmd: ['/bin/busybox', 'true'] },
      rootfs: { type: 'layers', diff_ids: [sha(layer)] },
    }),
  );
  const manifest = await put(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', ...config },
      layers: [{ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', ...gz }],
    }),
  );
  const oci = path.join(dir, 'oci');
  await writeFile(path.join(oci, 'oci-layout'), '{"imageLayoutVersion":"1.0.0"}');
  await writeFile(
    path.join(oci, 'index.json'),
    JSON.stringify({
      schemaVersion: 2,
      manifests: [
        {
          mediaType: 'application/vnd.oci.image.manifest.v1+json',
          ...manifest,
          annotations: { 'io.containerd.image.name': name, 'org.opencontainers.image.ref.name': '1' },
        },
      ],
    }),
  );
  const imageTar = path.join(dir, 'image.tar');
  const pack = await run('tar', ['-C', oci, '-cf', imageTar, 'oci-layout', 'index.json', 'blobs']);
  if (pack.code !== 0) throw new Error(`tar failed: ${pack.err}`);
  return imageTar;
}

t.test('shim protocol against containerd', { skip: missing() ?? false }, main);

async function main(t: Test): Promise<void> {
  await mkdir(path.join(repo, 'tmp'), { recursive: true });
  const work = await mkdtemp(path.join(repo, 'tmp', 'shim-it-'));
  const ctd = await mkdtemp(path.join(os.tmpdir(), 'thaw-ctd-'));
  const grpc = path.join(ctd, 'containerd.sock');
  const ttrpc = `${grpc}.ttrpc`;
  const fifosBefore = new Set(existsSync('/run/containerd/fifo') ? readdirSync('/run/containerd/fifo') : []);
  const shimPids = new Set<number>();
  const sockets = new Set<string>();
  const children: ChildProcess[] = [];
  let containerd: ChildProcess | undefined;

  t.teardown(async () => {
    for (const child of children) child.kill('SIGKILL');
    for (const pid of shimPids) {
      // A server recycled as a spare may serve another test's container by now: ours only in our bundles.
      if (!cwdOf(pid).startsWith(`${ctd}/`)) continue;
      try {
        process.kill(-pid, 'SIGKILL');
      } catch {
        // gone already
      }
    }
    if (containerd && containerd.exitCode === null) {
      containerd.kill('SIGTERM');
      await new Promise((r) => {
        const timer = setTimeout(() => {
          containerd?.kill('SIGKILL');
          r(undefined);
        }, 10_000);
        containerd?.once('exit', () => {
          clearTimeout(timer);
          r(undefined);
        });
      });
    }
    // Snapshot mounts under our private root, newest first.
    const mounts = (await readFile('/proc/self/mounts', 'utf8'))
      .split('\n')
      .map((l) => l.split(' ')[1] ?? '')
      .filter((m) => m.startsWith(ctd))
      .reverse();
    for (const m of mounts) spawnSync('umount', ['-l', m]);
    for (const s of sockets) await rm(s, { force: true });
    // ctr's stdio FIFOs (global dir): only new ones named after our containers.
    if (existsSync('/run/containerd/fifo')) {
      for (const d of readdirSync('/run/containerd/fifo')) {
        const dir = path.join('/run/containerd/fifo', d);
        if (!fifosBefore.has(d) && readdirSync(dir).some((f) => f.startsWith('thaw-it-'))) await rm(dir, { recursive: true, force: true });
      }
    }
    await rm(ctd, { recursive: true, force: true });
    await rm(work, { recursive: true, force: true });
  });

  const bin = await buildShim(work);
  const config = path.join(ctd, 'config.toml');
  await writeFile(
    config,
    [
      'version = 2',
      `root = "${ctd}/root"`,
      `state = "${ctd}/state"`,
      'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
      '[grpc]',
      `  address = "${grpc}"`,
      '',
    ].join('\n'),
  );
  const ctdLog: string[] = [];
  containerd = spawn('containerd', ['--config', config], {
    env: { ...process.env, PATH: `${bin}:${process.env.PATH ?? ''}` },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  containerd.stderr?.on('data', (c: Buffer) => ctdLog.push(c.toString()));
  const ctr = (args: string[], timeoutMs = 60_000): Promise<Run> => run('ctr', ['--address', grpc, ...args], { timeoutMs });
  await until(async () => (await ctr(['version'], 5000)).code === 0, 30_000, 'containerd to serve');

  const shimEnv = { ...process.env, TTRPC_ADDRESS: ttrpc, GOMAXPROCS: '2' };

  t.test('start prints the address, a ttrpc client connects, delete answers after death', async (t) => {
    const id = `thaw-it-${process.pid}`;
    const bundle = path.join(ctd, 'bundle', id);
    await mkdir(bundle, { recursive: true });
    await writeFile(path.join(bundle, 'config.json'), JSON.stringify({ ociVersion: '1.0.2', annotations: {} }));
    const want = expectedAddress(grpc, 'default', id);
    sockets.add(want.slice('unix://'.length));
    // containerd reads stdout+stderr as one pipe and waits for it to close.
    const t0 = Date.now();
    const started = await run(
      'sh',
      ['-c', 'exec "$0" "$@" 2>&1 </dev/null', path.join(bin, SHIM), '-namespace', 'default', '-address', grpc, '-publish-binary', '/usr/bin/containerd', '-id', id, 'start'],
      { cwd: bundle, env: shimEnv, timeoutMs: 30_000 },
    );
    const startMs = Date.now() - t0;
    t.equal(started.code, 0, started.out);
    t.equal(started.out, want, 'reply is exactly the address containerd derives');
    t.comment(`start returned (reply pipe closed) after ${startMs} ms`);
    const pid = Number(await readFile(path.join(bundle, 'shim.pid'), 'utf8'));
    shimPids.add(pid);
    t.equal(await readFile(path.join(bundle, 'address'), 'utf8'), want);

    const client = await TtrpcClient.connect(want);
    const task = client.service(Task);
    const connected = await task.connect({ id }, { namespace: 'default', timeoutMs: 5000 });
    t.equal(connected.shimPid, pid);
    await t.rejects(task.state({ id }, { timeoutMs: 5000 }), { code: 'NotFound' }, 'State of a task never created is NotFound');

    const again = await run('sh', ['-c', 'exec "$0" "$@" 2>&1 </dev/null', path.join(bin, SHIM), '-namespace', 'default', '-address', grpc, '-publish-binary', '/usr/bin/containerd', '-id', id, 'start'], { cwd: bundle, env: shimEnv });
    t.equal(again.out, want, 'a second start of the group reuses the live socket');
    t.equal(Number(await readFile(path.join(bundle, 'shim.pid'), 'utf8')), pid, 'same server');

    process.kill(pid, 'SIGKILL');
    await until(() => !alive(pid), 10_000, 'shim to die');
    await client.whenClosed();
    const deleted = await run(path.join(bin, SHIM), ['-namespace', 'default', '-address', grpc, '-publish-binary', '/usr/bin/containerd', '-id', id, '-bundle', bundle, 'delete'], { env: shimEnv });
    t.equal(deleted.code, 0, deleted.err);
    const response = fromBinary(DeleteResponseSchema, Buffer.from(deleted.out, 'latin1'));
    t.equal(response.exitStatus, 137);
    t.ok(response.exitedAt, 'exited_at set');
    t.notOk(existsSync(want.slice('unix://'.length)), 'delete removed the dead socket');
  });

  t.test('events forwarded to TTRPC_ADDRESS reach containerd subscribers', async (t) => {
    const events = spawn('ctr', ['--address', grpc, 'events'], { stdio: ['ignore', 'pipe', 'pipe'] });
    children.push(events);
    let seen = '';
    events.stdout.on('data', (c: Buffer) => (seen += c.toString()));
    const marker = `thaw-oom-${process.pid}`;
    const publisher = new Publisher({ address: ttrpc, namespace: 'default', backoffMs: 100 });
    // `ctr events` has no readiness signal: publish until its subscription shows the event.
    await until(
      () => {
        if (seen.includes(marker)) return true;
        publisher.publish('/tasks/oom', create(TaskOOMSchema, { containerId: marker }));
        return false;
      },
      20_000,
      'the event in ctr events',
    );
    await publisher.drain(5000);
    events.kill('SIGTERM');
    const line = seen.split('\n').find((l) => l.includes(marker)) ?? '';
    t.comment(`ctr events: ${line}`);
    t.match(line, /default \/tasks\/oom/, line);
    t.match(line, new RegExp(`"?container_id"?:\\s*"${marker}"|ContainerID.*${marker}`), 'decoded by containerd as containerd.events.TaskOOM');
    t.equal(publisher.dropped, 0);
  });

  t.test('containerd itself starts the shim and calls its Task service', async (t) => {
    const image = 'localhost/thaw-shim-it:1';
    const imported = await ctr(['images', 'import', await buildImage(path.join(ctd, 'image'), image)]);
    t.equal(imported.code, 0, imported.err);
    const id = `thaw-it-run-${process.pid}`;
    const address = expectedAddress(grpc, 'default', id);
    sockets.add(address.slice('unix://'.length));
    const result = await ctr(['run', '--rm', '--runtime', 'io.containerd.thaw.v2', image, id, '/bin/busybox', 'true'], 60_000);
    // containerd dialled our socket and ran the task through our Task service (busybox true → 0).
    t.comment(`ctr run: ${result.err.trim()}`);
    // A task that exits at once: its status comes from the reaped sandbox (runsc wait would say 255).
    t.equal(result.code, 0, 'busybox true exits 0');
    const shimPid = Number(await readFile(path.join(ctd, 'state/io.containerd.runtime.v2.task/default', id, 'shim.pid'), 'utf8').catch(() => '0'));
    if (shimPid > 0) shimPids.add(shimPid);
    const lingering = existsSync(address.slice('unix://'.length));
    t.comment(`server still up after ctr gave up: ${lingering}`);
    if (lingering) {
      // containerd gave up on the task; stop the server through the protocol.
      const client = await TtrpcClient.connect(address);
      await client.service(Task).shutdown({ id }, { timeoutMs: 5000 }).catch(() => undefined);
      await client.whenClosed();
    }
    if (shimPid > 0) await until(() => shimServerDone(shimPid), 10_000, 'the shim server to exit or wait as a spare again');
    t.notOk(existsSync(address.slice('unix://'.length)), 'socket removed on shutdown');
    t.ok(ctdLog.join('').includes('"msg":"shim serving"'), "the server's log reached containerd through the bundle's log FIFO");
    // Once the server is gone containerd treats the shim as dead and runs our `delete` verb. The
    // task never existed, so containerd publishes no TaskExit; a failure would be logged as
    // "failed to delete" (exec or exit status) or "failed to clean up after shim disconnected"
    // (e.g. stdout not a DeleteResponse).
    await until(() => ctdLog.join('').includes('cleaning up dead shim'), 20_000, 'containerd to clean up the dead shim');
    await new Promise((r) => setTimeout(r, 3000));
    await until(() => !deleteRunning(id), 20_000, 'our delete verb to finish');
    const cleanupErrors = ctdLog.join('').split('\n').filter((l) => /failed to delete|failed to clean up after shim/.test(l));
    t.same(cleanupErrors, [], 'containerd ran our delete verb without error');
    await ctr(['containers', 'rm', id]);
  });
}
