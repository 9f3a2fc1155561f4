import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { create } from '@bufbuild/protobuf';
import { ShimError } from '../../src/errors.js';
import { TaskExitSchema, TaskOOMSchema, TaskStartSchema } from '../../src/gen/containerd/events/task_pb.js';
import { Events } from '../../src/gen/containerd/services/events/ttrpc/v1/events_pb.js';
import type { Envelope } from '../../src/gen/containerd/types/event_pb.js';
import { Publisher, topicOf } from '../../src/task/publisher.js';
import { TtrpcServer, type CallContext } from '../../src/ttrpc/server.js';
import { unpackAny, anyTypeName } from '../../src/wire/any.js';
import { fromTimestamp } from '../../src/wire/timestamp.js';

type Forward = (envelope: Envelope, ctx: CallContext) => Promise<void> | void;

/** A real ttrpc server implementing containerd's Events.Forward. */
async function eventsServer(t: Test, onForward: Forward = () => {}) {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'thaw-pub-'));
  const socketPath = path.join(dir, 'containerd.sock.ttrpc');
  const received: Envelope[] = [];
  let attempts = 0;
  let server: TtrpcServer | undefined;
  const start = async (forward: Forward = onForward) => {
    server = new TtrpcServer({ closeGraceMs: 10 });
    server.registerService(Events, {
      forward: async (req, ctx) => {
        attempts++;
        await forward(req.envelope!, ctx);
        received.push(req.envelope!);
        return {};
      },
    });
    await server.listen(socketPath);
  };
  await start();
  t.teardown(async () => {
    await server?.close();
    await rm(dir, { recursive: true, force: true });
  });
  return {
    socketPath,
    received,
    get attempts() {
      return attempts;
    },
    restart: async (forward?: Forward) => {
      await server?.close();
      await start(forward);
    },
  };
}

async function until(cond: () => boolean, timeoutMs = 5000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 5));
  }
}

t.test('publishes envelopes in order with bare type URLs', async (t) => {
  const srv = await eventsServer(t);
  const pub = new Publisher({ address: srv.socketPath, namespace: 'default', backoffMs: 10 });
  t.teardown(() => pub.close());
  const before = Date.now();
  const start = create(TaskStartSchema, { containerId: 'c1', pid: 10 });
  pub.publish(topicOf(start), start);
  pub.publish('/tasks/exit', create(TaskExitSchema, { containerId: 'c1', id: 'c1', pid: 10, exitStatus: 3 }));
  t.equal(pub.pending, 2, 'publish returns before sending');
  await pub.drain();
  t.same(srv.received.map((e) => e.topic), ['/tasks/start', '/tasks/exit']);
  const exit = srv.received[1]!;
  t.equal(exit.namespace, 'default');
  t.equal(exit.event?.typeUrl, 'containerd.events.TaskExit');
  t.equal(unpackAny(exit.event!, TaskExitSchema)?.exitStatus, 3);
  t.ok(fromTimestamp(exit.timestamp!).getTime() >= before - 1000);
  t.equal(pub.delivered, 2);
});

t.test('namespace travels as ttrpc metadata too', async (t) => {
  let ns: string | undefined;
  const srv = await eventsServer(t, (_e, ctx) => {
    ns = ctx.namespace;
  });
  const pub = new Publisher({ address: srv.socketPath, namespace: 'k8s.io' });
  pub.publish('/tasks/oom', create(TaskOOMSchema, { containerId: 'x' }));
  await pub.drain();
  t.equal(ns, 'k8s.io');
});

t.test('retries failed forwards with linear backoff, then delivers', async (t) => {
  let failures = 2;
  const times: number[] = [];
  const srv = await eventsServer(t, () => {
    times.push(Date.now());
    if (failures-- > 0) throw new ShimError('Unavailable', 'containerd busy');
  });
  const pub = new Publisher({ address: srv.socketPath, namespace: 'default', backoffMs: 40 });
  pub.publish('/tasks/oom', create(TaskOOMSchema, { containerId: 'x' }));
  await pub.drain();
  t.equal(srv.attempts, 3);
  t.equal(srv.received.length, 1);
  t.ok(times[1]! - times[0]! >= 35, `first retry after ~1×backoff (${times[1]! - times[0]!} ms)`);
  t.ok(times[2]! - times[1]! >= 75, `second retry after ~2×backoff (${times[2]! - times[1]!} ms)`);
});

t.test('an event failing 1 + 5 times is dropped and the next one still goes out', async (t) => {
  const srv = await eventsServer(t, (e) => {
    if (e.topic === '/tasks/oom') throw new ShimError('Internal', 'nope');
  });
  const pub = new Publisher({ address: srv.socketPath, namespace: 'default', backoffMs: 1 });
  pub.publish('/tasks/oom', create(TaskOOMSchema, { containerId: 'x' }));
  pub.publish('/tasks/start', create(TaskStartSchema, { containerId: 'x', pid: 1 }));
  await pub.drain();
  t.equal(srv.attempts, 7, '6 tries of the failing event + 1 of the next');
  t.equal(pub.dropped, 1);
  t.same(srv.received.map((e) => e.topic), ['/tasks/start']);
});

t.test('queue is bounded at 128; publish never blocks', async (t) => {
  let open!: () => void;
  const gate = new Promise<void>((r) => (open = r));
  const srv = await eventsServer(t, () => gate);
  const pub = new Publisher({ address: srv.socketPath, namespace: 'default' });
  const t0 = performance.now();
  for (let i = 0; i < 200; i++) pub.publish('/tasks/start', create(TaskStartSchema, { containerId: 'c', pid: i }));
  t.ok(performance.now() - t0 < 2000, 'publishing 200 events does not wait for containerd');
  t.equal(pub.pending, 128);
  t.equal(pub.dropped, 72);
  open();
  await pub.drain();
  t.equal(srv.received.length, 128);
  t.same(
    srv.received.slice(0, 3).map((e) => unpackAny(e.event!, TaskStartSchema)?.pid),
    [0, 1, 2],
    'the oldest events are kept, in order',
  );
});

t.test('a closed connection is reconnected at once, not after a backoff', async (t) => {
  const srv = await eventsServer(t);
  const pub = new Publisher({ address: srv.socketPath, namespace: 'default', backoffMs: 60_000 });
  t.teardown(() => pub.close());
  pub.publish('/tasks/oom', create(TaskOOMSchema, { containerId: 'a' }));
  await until(() => srv.received.length === 1);
  await srv.restart(); // containerd restarted: the old connection is closed
  const t0 = Date.now();
  pub.publish('/tasks/oom', create(TaskOOMSchema, { containerId: 'b' }));
  await until(() => srv.received.length === 2, 5000);
  t.ok(Date.now() - t0 < 5000, 'delivered without waiting a backoff');
  t.equal(anyTypeName(srv.received[1]!.event!), 'containerd.events.TaskOOM');
});

t.test('drain waits for queued events; later events are dropped', async (t) => {
  const srv = await eventsServer(t, () => new Promise((r) => setTimeout(r, 20)));
  const pub = new Publisher({ address: srv.socketPath, namespace: 'default' });
  for (let i = 0; i < 5; i++) pub.publish('/tasks/start', create(TaskStartSchema, { containerId: 'c', pid: i }));
  await pub.drain();
  t.equal(srv.received.length, 5);
  pub.publish('/tasks/start', create(TaskStartSchema, { containerId: 'c', pid: 9 }));
  t.equal(pub.pending, 0);
  t.equal(pub.dropped, 1);
});

t.test('drain gives up after its timeout when containerd is unreachable', async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'thaw-pub-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const pub = new Publisher({ address: path.join(dir, 'nobody.sock'), namespace: 'default', backoffMs: 10 });
  pub.publish('/tasks/oom', create(TaskOOMSchema, { containerId: 'x' }));
  const t0 = Date.now();
  await pub.drain(300);
  t.ok(Date.now() - t0 < 2000);
  t.equal(pub.delivered, 0);
  t.equal(pub.pending, 0);
  t.equal(pub.dropped, 1);
});

t.test('without TTRPC_ADDRESS events are logged and dropped', async (t) => {
  const pub = new Publisher({ address: undefined, namespace: 'default' });
  pub.publish('/tasks/oom', create(TaskOOMSchema, { containerId: 'x' }));
  t.equal(pub.pending, 0);
  t.equal(pub.dropped, 1);
  await pub.drain();
});
