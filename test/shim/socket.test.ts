import { mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { canConnect, groupKeyOf, removeSocket, socketAddress, socketPathOf } from '../../src/shim/socket.js';

// Hashed strings are filepath.Join(grpcAddress, namespace, group) — containerd's shim library
// (pkg/shim/util_unix.go CreateSocketAddress) hashes the grpc address passed with -address, not
// TTRPC_ADDRESS. Digests computed by hand: printf '%s' STRING | sha256sum
const KNOWN = {
  '/run/containerd/containerd.sock/default/abc': '8cb244a719603fe00870d5ce1d8e1f1db43a654cb993d107df1f1ae23ddffa59',
  '/run/containerd/containerd.sock/default/abc/debug': 'adf52f26e9c57ef2b019b108fc4a009a724788780f819bbd014e8cf2a3a9785b',
};

t.test('address matches containerd for a known input', async (t) => {
  t.equal(
    socketAddress({ grpcAddress: '/run/containerd/containerd.sock', namespace: 'default', groupKey: 'abc' }),
    `unix:///run/containerd/s/${KNOWN['/run/containerd/containerd.sock/default/abc']}`,
  );
  t.equal(
    socketAddress({ grpcAddress: '/run/containerd/containerd.sock', namespace: 'default', groupKey: 'abc', debug: true }),
    `unix:///run/containerd/s/${KNOWN['/run/containerd/containerd.sock/default/abc/debug']}`,
  );
});

t.test('the joined path is cleaned like Go filepath.Join', async (t) => {
  const want = socketAddress({ grpcAddress: '/run/containerd/containerd.sock', namespace: 'default', groupKey: 'abc' });
  t.equal(socketAddress({ grpcAddress: '/run/containerd//containerd.sock/', namespace: 'default', groupKey: 'abc' }), want);
  t.equal(socketAddress({ grpcAddress: '/run/containerd/x/../containerd.sock', namespace: 'default', groupKey: 'abc/' }), want);
});

t.test('socket dir override and path limit', async (t) => {
  t.match(socketAddress({ grpcAddress: '/a', namespace: 'n', groupKey: 'g', socketDir: '/tmp/s' }), /^unix:\/\/\/tmp\/s\/[0-9a-f]{64}$/);
  t.throws(() => socketAddress({ grpcAddress: '/a', namespace: 'n', groupKey: 'g', socketDir: `/${'d'.repeat(60)}` }), { code: 'InvalidArgument' });
});

t.test('group key: CRI sandbox id, else the container id', async (t) => {
  t.equal(groupKeyOf({ 'io.kubernetes.cri.sandbox-id': 'pod1' }, 'c1'), 'pod1');
  t.equal(groupKeyOf({ other: 'x' }, 'c1'), 'c1');
  t.equal(groupKeyOf({ 'io.kubernetes.cri.sandbox-id': '' }, 'c1'), 'c1');
  t.equal(groupKeyOf(undefined, 'c1'), 'c1');
});

t.test('canConnect and removeSocket', async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'thaw-sock-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const live = path.join(dir, 'live.sock');
  const server = net.createServer((s) => s.destroy());
  await new Promise<void>((r) => server.listen(live, r));
  t.teardown(() => new Promise<void>((r) => server.close(() => r())));
  t.equal(await canConnect(`unix://${live}`), true);
  const stale = path.join(dir, 'stale.sock');
  await writeFile(stale, '');
  t.equal(await canConnect(`unix://${stale}`), false, 'a plain file is not a live socket');
  t.equal(await canConnect(path.join(dir, 'missing.sock')), false);
  await removeSocket(`unix://${stale}`);
  await t.rejects(stat(stale), { code: 'ENOENT' });
  await t.resolves(removeSocket(`unix://${stale}`), 'missing socket is fine');
  t.equal(socketPathOf('unix:///run/x'), '/run/x');
  t.equal(socketPathOf('/run/x'), '/run/x');
  t.throws(() => socketPathOf('vsock://3:1024'), { code: 'InvalidArgument' });
});
