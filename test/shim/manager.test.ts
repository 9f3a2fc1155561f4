import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import t, { type Test } from 'tap';
import { create, fromBinary, toBinary } from '@bufbuild/protobuf';
import { BootstrapParamsSchema, BootstrapResultSchema } from '../../src/gen/containerd/runtime/bootstrap/v1/bootstrap_pb.js';
import { DeleteResponseSchema, Task } from '../../src/gen/containerd/task/v2/shim_pb.js';
import { RuntimeInfoSchema } from '../../src/gen/containerd/types/introspection_pb.js';
import { OptionsSchema } from '../../src/gen/runtimeoptions/v1/api_pb.js';
import { defaultServeCommand, deleteDeadShim, runtimeInfo, SERVE_NODE_FLAGS, start, versionText, type ServeCommand } from '../../src/shim/manager.js';
import { socketPathOf } from '../../src/shim/socket.js';
import { TtrpcClient } from '../../src/ttrpc/client.js';
import { encodeAny, packAny } from '../../src/wire/any.js';
import { fromTimestamp } from '../../src/wire/timestamp.js';
import { pidExists as alive } from '../../src/procfs.js';

const repo = fileURLToPath(new URL('../../', import.meta.url));
// Run `serve` from the TypeScript sources through the same loader tap uses.
const tsLoader = process.execArgv.find((a) => a.includes('@tapjs/typescript'));
const serveCommand: ServeCommand = { file: process.execPath, args: [...(tsLoader ? [tsLoader] : []), path.join(repo, 'src/cli/shim.ts')] };
const env = { ...process.env, TS_NODE_TRANSPILE_ONLY: '1', TTRPC_ADDRESS: '' };
const READY_MS = 60_000;

const flags = { namespace: 'default', address: '/run/containerd/containerd.sock', publishBinary: '/usr/bin/containerd', debug: false };


async function until(cond: () => boolean, timeoutMs = 10_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A temp root with a socket dir and bundles; kills every server it saw on teardown. */
async function workspace(t: Test) {
  const root = await mkdtemp(path.join(os.tmpdir(), 'thaw-mgr-'));
  const socketDir = path.join(root, 's');
  const pids: number[] = [];
  t.teardown(async () => {
    for (const pid of pids) {
      try {
        process.kill(-pid, 'SIGKILL'); // detached: the server leads its own process group
      } catch {
        // already gone
      }
    }
    await rm(root, { recursive: true, force: true });
  });
  return {
    root,
    socketDir,
    track: (pid: number | undefined) => pid !== undefined && pids.push(pid),
    bundle: async (id: string, annotations: Record<string, string> = {}) => {
      const dir = path.join(root, 'bundles', id);
      await mkdir(dir, { recursive: true });
      await writeFile(path.join(dir, 'config.json'), JSON.stringify({ ociVersion: '1.0.2', annotations }));
      return dir;
    },
  };
}

t.test('start launches a detached server that answers Connect; the group reuses it', async (t) => {
  const ws = await workspace(t);
  const b1 = await ws.bundle('c1', { 'io.kubernetes.cri.sandbox-id': 'pod1' });
  const configPath = path.join(ws.root, 'thaw.json');
  await writeFile(configPath, JSON.stringify({ stateDir: path.join(ws.root, 'state'), store: { path: path.join(ws.root, 'store') } }));
  const options = encodeAny(packAny(OptionsSchema, create(OptionsSchema, { configPath })));
  const first = await start({ flags: { ...flags, id: 'c1' }, stdin: options, bundle: b1, env, socketDir: ws.socketDir, serveCommand, readyTimeoutMs: READY_MS });
  ws.track(first.pid);
  t.match(first.address, new RegExp(`^unix://${ws.socketDir}/[0-9a-f]{64}$`));
  t.equal(Buffer.from(first.reply).toString(), first.address, 'legacy reply is the plain address');
  t.equal(await readFile(path.join(b1, 'address'), 'utf8'), first.address);
  t.equal(await readFile(path.join(b1, 'shim.pid'), 'utf8'), String(first.pid));

  const pid = first.pid!;
  const stat = (await readFile(`/proc/${pid}/stat`, 'utf8')).split(') ')[1]!.split(' ');
  t.equal(Number(stat[3]), pid, 'server is its own session leader (setsid)');
  const argv = (await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0');
  t.notOk(argv.includes('-config-path'), 'legacy options go to serve undecoded, not as a flag');
  t.equal(argv[argv.indexOf('-socket') + 1], socketPathOf(first.address));

  const client = await TtrpcClient.connect(first.address);
  t.teardown(() => client.close());
  const task = client.service(Task);
  const connected = await task.connect({ id: 'c1' });
  t.equal(connected.shimPid, pid);
  t.ok(existsSync(path.join(ws.root, 'state', 'containers')), "serve decoded the options and opened the runtime in the config's state dir");
  await t.rejects(
    task.create({ id: 'c1', bundle: path.join(ws.root, 'no-such-bundle') }),
    { code: 'NotFound', grpcCode: 5 },
    'Create of a bundle without config.json is NotFound, and the server keeps serving',
  );
  t.equal((await task.connect({ id: 'c1' })).shimPid, pid);

  const b2 = await ws.bundle('c2', { 'io.kubernetes.cri.sandbox-id': 'pod1' });
  const second = await start({ flags: { ...flags, id: 'c2' }, stdin: new Uint8Array(0), bundle: b2, env, socketDir: ws.socketDir, serveCommand, readyTimeoutMs: READY_MS });
  ws.track(second.pid);
  t.equal(second.address, first.address, 'same pod, same socket');
  t.equal(second.pid, undefined, 'no new server');
  t.equal(await readFile(path.join(b2, 'address'), 'utf8'), first.address);
  t.notOk(existsSync(path.join(b2, 'shim.pid')));

  // Shutdown: the reply arrives, then the server exits and removes its socket.
  await task.shutdown({ id: 'c1' });
  await until(() => !alive(pid));
  t.notOk(existsSync(socketPathOf(first.address)), 'socket removed');
});

t.test('containerd 2.3 bootstrap: BootstrapResult reply, socket_dir honoured', async (t) => {
  const ws = await workspace(t);
  const b = await ws.bundle('c3');
  const params = create(BootstrapParamsSchema, {
    instanceId: 'c3',
    namespace: 'default',
    containerdGrpcAddress: '/run/containerd/containerd.sock',
    containerdTtrpcAddress: '',
    socketDir: path.join(ws.root, 's23'),
  });
  const result = await start({ flags: { ...flags, id: 'c3' }, stdin: toBinary(BootstrapParamsSchema, params), bundle: b, env, serveCommand, readyTimeoutMs: READY_MS });
  ws.track(result.pid);
  const reply = fromBinary(BootstrapResultSchema, result.reply);
  t.equal(reply.version, 2);
  t.equal(reply.protocol, 'ttrpc');
  t.equal(reply.address, result.address);
  t.ok(result.address.startsWith(`unix://${path.join(ws.root, 's23')}/`));
  const client = await TtrpcClient.connect(result.address);
  t.teardown(() => client.close());
  t.equal((await client.service(Task).connect({ id: 'c3' })).shimPid, result.pid);
});

t.test('delete after the server died: hook runs, dead socket removed, DeleteResponse printed', async (t) => {
  const ws = await workspace(t);
  const b = await ws.bundle('c4');
  const started = await start({ flags: { ...flags, id: 'c4' }, stdin: new Uint8Array(0), bundle: b, env, socketDir: ws.socketDir, serveCommand, readyTimeoutMs: READY_MS });
  ws.track(started.pid);
  process.kill(started.pid!, 'SIGKILL');
  await until(() => !alive(started.pid!));
  t.ok(existsSync(socketPathOf(started.address)), 'a killed server leaves its socket behind');

  const calls: unknown[] = [];
  const out = await deleteDeadShim({
    flags: { namespace: 'default', id: 'c4', bundle: b },
    bundle: b,
    cleanupDeadTask: async (bundle, id, ctx) => {
      calls.push([bundle, id, ctx.namespace]);
      return { pid: 4242 };
    },
  });
  t.same(calls, [[b, 'c4', 'default']]);
  const response = fromBinary(DeleteResponseSchema, out);
  t.equal(response.pid, 4242);
  t.equal(response.exitStatus, 137);
  t.ok(Math.abs(fromTimestamp(response.exitedAt!).getTime() - Date.now()) < 10_000);
  t.notOk(existsSync(socketPathOf(started.address)), 'dead socket removed');

  const plain = fromBinary(DeleteResponseSchema, await deleteDeadShim({ flags: { namespace: 'default', id: 'c4', bundle: b }, bundle: b }));
  t.equal(plain.pid, 0, 'without a hook: best-effort defaults');
  t.equal(plain.exitStatus, 137);
});

t.test('start reports a server that fails or never listens', async (t) => {
  const ws = await workspace(t);
  const b = await ws.bundle('c5');
  const base = { flags: { ...flags, id: 'c5' }, stdin: new Uint8Array(0), bundle: b, env, socketDir: ws.socketDir };
  await t.rejects(
    start({ ...base, serveCommand: { file: process.execPath, args: ['-e', 'process.exit(3)', '--'] } }),
    { code: 'Unavailable', message: /exited \(code 3\)/ },
  );
  await t.rejects(
    start({ ...base, serveCommand: { file: process.execPath, args: ['-e', "require('fs').writeSync(3, 'error: no runsc\\n')", '--'] } }),
    { code: 'Unavailable', message: /shim server failed: no runsc/ },
  );
  const t0 = Date.now();
  await t.rejects(
    start({ ...base, serveCommand: { file: process.execPath, args: ['-e', 'setTimeout(() => {}, 60000)', '--'] }, readyTimeoutMs: 300 }),
    { code: 'DeadlineExceeded' },
  );
  t.ok(Date.now() - t0 < 5000);
  t.notOk(existsSync(path.join(b, 'address')), 'no address written on failure');
  await t.rejects(start({ ...base, bundle: ws.root, serveCommand }), { code: 'NotFound', message: /config\.json/ });
  await t.rejects(start({ ...base, flags: { ...base.flags, namespace: '' }, serveCommand }), { code: 'InvalidArgument' });
  // Options start leaves to serve: serve's decode error is start's error message.
  await t.rejects(start({ ...base, stdin: Uint8Array.of(0x0a, 0x7f, 0x01), serveCommand, readyTimeoutMs: READY_MS }), {
    code: 'Unavailable',
    message: /shim server failed: decode google.protobuf.Any failed/,
  });
});

t.test('-info and -v', async (t) => {
  const options = packAny(OptionsSchema, create(OptionsSchema, { configPath: '/x' }));
  const info = fromBinary(RuntimeInfoSchema, await runtimeInfo(encodeAny(options)));
  t.equal(info.name, 'io.containerd.thaw.v2');
  t.match(info.version?.version, /^\d+\.\d+\.\d+/);
  t.equal(info.options?.typeUrl, 'runtimeoptions.v1.Options', 'options echoed back');
  t.equal(fromBinary(RuntimeInfoSchema, await runtimeInfo(new Uint8Array(0))).options, undefined);
  t.match(versionText('containerd-shim-thaw-v2'), /^containerd-shim-thaw-v2:\n {2}Version: {2}\d+\.\d+\.\d+\n/);
});

t.test('serve runs with V8 flags for a small footprint that node accepts and that keep WebAssembly', async (t) => {
  const cmd = defaultServeCommand();
  t.equal(cmd.file, process.execPath);
  t.same(cmd.args.slice(-1 - SERVE_NODE_FLAGS.length), [...SERVE_NODE_FLAGS, process.argv[1]], 'flags before the script');
  const probe = spawnSync(process.execPath, [...SERVE_NODE_FLAGS, '-e', 'process.stdout.write(String(WebAssembly.validate(new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0]))))'], { encoding: 'utf8' });
  t.equal(probe.status, 0, probe.stderr);
  t.equal(probe.stdout, 'true', 'the xxhash fallback needs WebAssembly');
  t.notMatch(probe.stderr, /warning/i, 'no flag conflicts');
});
