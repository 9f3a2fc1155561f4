import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { create, fromBinary, toBinary } from '@bufbuild/protobuf';
import { ShimError, type ErrorCode } from '../../src/errors.js';
import {
  ConnectRequestSchema,
  ConnectResponseSchema,
  Task,
  WaitRequestSchema,
} from '../../src/gen/containerd/task/v2/shim_pb.js';
import { RequestSchema, ResponseSchema, type Response } from '../../src/gen/ttrpc/request_pb.js';
import { TtrpcClient } from '../../src/ttrpc/client.js';
import { encodeFrame, FrameDecoder, FrameType, HEADER_LENGTH } from '../../src/ttrpc/frame.js';
import { TtrpcServer, type CallContext } from '../../src/ttrpc/server.js';
import { Code, TtrpcStatusError } from '../../src/ttrpc/status.js';

/** A raw ttrpc peer for protocol-level assertions. */
class RawPeer {
  readonly responses = new Map<number, Response>();
  readonly #decoder = new FrameDecoder();
  readonly #waiters: (() => void)[] = [];
  closed = false;
  private constructor(readonly socket: net.Socket) {
    socket.on('data', (chunk: Buffer) => {
      for (const f of this.#decoder.push(chunk)) this.responses.set(f.streamId, fromBinary(ResponseSchema, f.payload));
      this.#waiters.splice(0).forEach((w) => w());
    });
    socket.on('close', () => {
      this.closed = true;
      this.#waiters.splice(0).forEach((w) => w());
    });
    socket.on('error', () => {});
  }
  static connect(socketPath: string): Promise<RawPeer> {
    return new Promise((resolve, reject) => {
      const s = net.createConnection(socketPath, () => resolve(new RawPeer(s)));
      s.once('error', reject);
    });
  }
  request(streamId: number, service: string, method: string, payload: Uint8Array = new Uint8Array(0)): void {
    const body = toBinary(RequestSchema, create(RequestSchema, { service, method, payload }));
    this.socket.write(encodeFrame({ streamId, type: FrameType.Request, flags: 0, payload: body }));
  }
  async response(streamId: number): Promise<Response> {
    while (!this.responses.has(streamId)) {
      if (this.closed) throw new Error(`connection closed before a response on stream ${streamId}`);
      await new Promise<void>((resolve) => this.#waiters.push(resolve));
    }
    return this.responses.get(streamId)!;
  }
  async waitClosed(): Promise<void> {
    while (!this.closed) await new Promise<void>((resolve) => this.#waiters.push(resolve));
  }
}

async function setup(t: Test, impl: Parameters<TtrpcServer['registerService']>[1]) {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'thaw-ttrpc-'));
  const socketPath = path.join(dir, 's.sock');
  const server = new TtrpcServer({ closeGraceMs: 100 });
  server.registerService(Task, impl);
  await server.listen(socketPath);
  const clients: TtrpcClient[] = [];
  const peers: RawPeer[] = [];
  t.teardown(async () => {
    await Promise.all(clients.map((c) => c.close()));
    peers.forEach((p) => p.socket.destroy());
    await server.close();
    await rm(dir, { recursive: true, force: true });
  });
  return {
    socketPath,
    server,
    client: async () => {
      const c = await TtrpcClient.connect(socketPath);
      clients.push(c);
      return c;
    },
    peer: async () => {
      const p = await RawPeer.connect(socketPath);
      peers.push(p);
      return p;
    },
  };
}

const connectImpl = { connect: () => ({ shimPid: 42, taskPid: 7, version: 'x' }) };

t.test('unary call round trip', async (t) => {
  const { client } = await setup(t, connectImpl);
  const c = await client();
  const reply = await c.service(Task).connect({ id: 'abc' });
  t.equal(reply.shimPid, 42);
  t.equal(reply.taskPid, 7);
  t.equal(reply.version, 'x');
});

t.test('a blocked call does not hold up other calls on the same connection', async (t) => {
  let release!: () => void;
  const released = new Promise<void>((r) => (release = r));
  const { client } = await setup(t, {
    wait: async () => {
      await released;
      return { exitStatus: 3 };
    },
    connect: () => ({ shimPid: 1 }),
  });
  const c = await client();
  const task = c.service(Task);
  const waiting = task.wait({ id: 'a' });
  let waitDone = false;
  void waiting.then(() => (waitDone = true));
  const connected = await task.connect({ id: 'a' });
  t.equal(connected.shimPid, 1, 'Connect answered while Wait blocks');
  t.equal(waitDone, false, 'Wait still pending');
  release();
  t.equal((await waiting).exitStatus, 3);
});

t.test('unknown service, unknown method and unimplemented method answer Unimplemented (12)', async (t) => {
  const { peer, client } = await setup(t, connectImpl);
  const p = await peer();
  p.request(1, 'containerd.task.v9.Nope', 'Create');
  p.request(3, 'containerd.task.v2.Task', 'Frobnicate');
  p.request(5, 'containerd.task.v2.Task', 'Create');
  for (const id of [1, 3, 5]) t.equal((await p.response(id)).status?.code, Code.Unimplemented, `stream ${id}`);
  const c = await client();
  await t.rejects(c.service(Task).pause({ id: 'x' }), { grpcCode: 12, code: 'NotImplemented' });
});

t.test('stream ids must be odd and increasing', async (t) => {
  const { peer } = await setup(t, connectImpl);
  const p = await peer();
  const payload = toBinary(ConnectRequestSchema, create(ConnectRequestSchema, { id: 'a' }));
  p.request(5, 'containerd.task.v2.Task', 'Connect', payload);
  t.equal((await p.response(5)).status?.code ?? 0, Code.OK);
  p.responses.clear();
  p.request(5, 'containerd.task.v2.Task', 'Connect', payload);
  const reused = await p.response(5);
  t.equal(reused.status?.code, Code.InvalidArgument);
  t.match(reused.status?.message, /re-used/);
  p.responses.clear();
  p.request(3, 'containerd.task.v2.Task', 'Connect', payload);
  t.equal((await p.response(3)).status?.code, Code.InvalidArgument, 'lower id rejected');
  p.request(8, 'containerd.task.v2.Task', 'Connect', payload);
  t.match((await p.response(8)).status?.message, /odd/);
  p.request(7, 'containerd.task.v2.Task', 'Connect', payload);
  const ok = await p.response(7);
  t.equal(ok.status?.code ?? 0, Code.OK, 'the connection keeps serving');
  t.equal(fromBinary(ConnectResponseSchema, ok.payload).shimPid, 42);
});

t.test('malformed payloads get InvalidArgument; broken framing closes only that connection', async (t) => {
  const { peer, client } = await setup(t, connectImpl);
  const p = await peer();
  // Request payload that is not a ttrpc.Request (truncated varint field).
  p.socket.write(encodeFrame({ streamId: 1, type: FrameType.Request, flags: 0, payload: Uint8Array.of(0x0a, 0x05, 0x61) }));
  t.equal((await p.response(1)).status?.code, Code.InvalidArgument);
  // Valid Request whose payload is not a ConnectRequest.
  p.request(3, 'containerd.task.v2.Task', 'Connect', Uint8Array.of(0xff, 0xff, 0xff));
  t.equal((await p.response(3)).status?.code, Code.InvalidArgument);

  const bad = await peer();
  const header = Buffer.alloc(HEADER_LENGTH);
  header.writeUInt32BE(64 << 20, 0); // 64 MiB: over the 4 MiB limit
  header.writeUInt32BE(1, 4);
  header[8] = FrameType.Request;
  bad.socket.write(header);
  await bad.waitClosed();
  t.ok(bad.closed, 'oversized frame closes the connection');

  const c = await client();
  t.equal((await c.service(Task).connect({ id: 'a' })).shimPid, 42, 'a new connection is served');
  p.request(5, 'containerd.task.v2.Task', 'Connect', toBinary(ConnectRequestSchema, create(ConnectRequestSchema, {})));
  t.equal((await p.response(5)).status?.code ?? 0, Code.OK, 'the other open connection is still served');
});

t.test('ShimError classes map to gRPC codes', async (t) => {
  const table: [ErrorCode, number][] = [
    ['NotFound', 5],
    ['AlreadyExists', 6],
    ['FailedPrecondition', 9],
    ['InvalidArgument', 3],
    ['Unavailable', 14],
    ['DeadlineExceeded', 4],
    ['Canceled', 1],
    ['NotImplemented', 12],
    ['DataLoss', 15],
    ['Internal', 13],
    ['Unknown', 2],
  ];
  let next: ErrorCode = 'NotFound';
  const { client } = await setup(t, {
    state: () => {
      throw new ShimError(next, `cannot state task in ${next}`);
    },
    kill: () => {
      throw new TypeError('plain error');
    },
  });
  const task = (await client()).service(Task);
  for (const [code, wire] of table) {
    next = code;
    const err = await task.state({ id: 'a' }).then(
      () => undefined,
      (e: unknown) => e,
    );
    t.ok(err instanceof TtrpcStatusError, code);
    if (err instanceof TtrpcStatusError) {
      t.equal(err.grpcCode, wire, `${code} → ${wire}`);
      t.equal(err.code, code, 'maps back to the same class');
      t.equal(err.message, `cannot state task in ${code}`);
    }
  }
  await t.rejects(task.kill({ id: 'a' }), { grpcCode: Code.Unknown, message: 'plain error' });
});

t.test('namespace and deadline reach the handler; a passed deadline answers DeadlineExceeded', async (t) => {
  let seen: CallContext | undefined;
  let aborted = false;
  const { client, peer } = await setup(t, {
    connect: (_req, ctx) => {
      seen = ctx;
      return {};
    },
    wait: (_req, ctx) =>
      new Promise((_, reject) => {
        ctx.signal.addEventListener('abort', () => {
          aborted = true;
          reject(ctx.signal.reason);
        });
      }),
  });
  const task = (await client()).service(Task);
  const before = Date.now();
  await task.connect({ id: 'a' }, { namespace: 'k8s.io', timeoutMs: 60_000 });
  t.equal(seen?.namespace, 'k8s.io');
  t.equal(seen?.method, 'Connect');
  t.ok(seen?.deadline && Math.abs(seen.deadline.getTime() - (before + 60_000)) < 2000, 'deadline from timeout_nano');
  await task.connect({ id: 'a' });
  t.equal(seen?.namespace, undefined);
  t.equal(seen?.deadline, undefined);

  // Server-side deadline: a raw request with timeout_nano and no client-side timer.
  const raw = await peer();
  const body = toBinary(RequestSchema, create(RequestSchema, {
    service: 'containerd.task.v2.Task',
    method: 'Wait',
    payload: toBinary(WaitRequestSchema, create(WaitRequestSchema, { id: 'a' })),
    timeoutNano: 50_000_000n,
  }));
  raw.socket.write(encodeFrame({ streamId: 1, type: FrameType.Request, flags: 0, payload: body }));
  t.equal((await raw.response(1)).status?.code, Code.DeadlineExceeded);
  t.ok(aborted, 'handler signal aborted at the deadline');
});

t.test('closing the connection aborts in-flight handlers', async (t) => {
  let aborted: unknown;
  const { client } = await setup(t, {
    wait: (_req, ctx) =>
      new Promise((_, reject) => {
        ctx.signal.addEventListener('abort', () => {
          aborted = ctx.signal.reason;
          reject(ctx.signal.reason);
        });
      }),
  });
  const c = await client();
  const pending = c.service(Task).wait({ id: 'a' });
  await new Promise((r) => setTimeout(r, 50));
  await c.close();
  await t.rejects(pending, { code: 'Unavailable' });
  for (let i = 0; i < 100 && aborted === undefined; i++) await new Promise((r) => setTimeout(r, 10));
  t.ok(aborted instanceof ShimError && aborted.code === 'Canceled');
});

t.test('close() lets a call in flight answer before the socket goes away', async (t) => {
  const { client, server } = await setup(t, {
    shutdown: async () => {
      void server.close();
      await new Promise((r) => setTimeout(r, 20));
      return {};
    },
  });
  const c = await client();
  await t.resolves(c.service(Task).shutdown({ id: 'a' }));
  await c.whenClosed();
  t.ok(c.closed);
});
