import { connect, type Socket } from 'node:net';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import { ControlServer, parseRequest, type ControlReply } from '../../src/trigger/control-server.js';

/** Sends one raw request; resolves with the whole answer once the server half-closed. Keeps the socket open unless `close`. */
function request(path: string, raw: string, { close = true } = {}): Promise<{ text: string; socket: Socket }> {
  return new Promise((resolve, reject) => {
    const s = connect({ path, allowHalfOpen: true });
    let text = '';
    s.on('data', (c: Buffer) => (text += c.toString()));
    s.on('end', () => {
      if (close) s.end();
      resolve({ text, socket: s });
    });
    s.on('error', reject);
    s.write(raw);
  });
}

const post = 'POST /checkpoint HTTP/1.1\r\nHost: thaw\r\nContent-Length: 2\r\n\r\n{}';
const get = 'GET /checkpoint/status HTTP/1.1\r\nHost: thaw\r\n\r\n';

async function setup(t: Test, reply: ControlReply = { status: 202, body: { state: 'scheduled' } }): Promise<{ server: ControlServer; sock: string; requests: number }> {
  const dir = await mkdtemp(join(tmpdir(), 'thaw-ctl-'));
  const sock = join(dir, 'thaw.sock');
  const state = { requests: 0 };
  const server = new ControlServer({
    socketPath: sock,
    handler: { status: () => ({ state: 'idle' }), requestCheckpoint: () => (state.requests++, reply) },
  });
  t.teardown(async () => {
    await server.close();
    await rm(dir, { recursive: true, force: true });
  });
  await server.listen();
  return Object.assign(state, { server, sock }) as { server: ControlServer; sock: string; requests: number };
}

t.test('POST /checkpoint and GET /checkpoint/status answer JSON and close', async (t) => {
  const s = await setup(t);
  const a = await request(s.sock, post);
  t.match(a.text, /^HTTP\/1\.1 202 Accepted\r\n/);
  t.match(a.text, /\r\nConnection: close\r\n/);
  t.match(a.text, /\r\n\r\n\{"state":"scheduled"\}\n$/);
  t.equal(s.requests, 1);
  const b = await request(s.sock, get);
  t.match(b.text, /^HTTP\/1\.1 200 OK\r\n[\s\S]*\{"state":"idle"\}\n$/);
  const c = await request(s.sock, 'GET /checkpoint HTTP/1.1\r\n\r\n');
  t.match(c.text, /^HTTP\/1\.1 405 /);
  const d = await request(s.sock, 'GET /other HTTP/1.1\r\n\r\n');
  t.match(d.text, /^HTTP\/1\.1 404 [\s\S]*use POST \/checkpoint or GET \/checkpoint\/status/);
  const e = await request(s.sock, 'hello\r\n\r\n');
  t.match(e.text, /^HTTP\/1\.1 400 /);
  t.equal(s.requests, 1, 'only the POST asked for a checkpoint');
});

t.test('a request split over several writes is answered once complete', async (t) => {
  const s = await setup(t);
  const answer = await new Promise<string>((resolve) => {
    const c = connect({ path: s.sock, allowHalfOpen: true });
    let text = '';
    c.on('data', (d: Buffer) => (text += d.toString()));
    c.on('end', () => (c.end(), resolve(text)));
    c.write('POST /checkpoint HTTP/1.1\r\nContent-Le');
    setTimeout(() => c.write('ngth: 5\r\n\r\nab'), 30);
    setTimeout(() => c.write('cde'), 60);
  });
  t.match(answer, /^HTTP\/1\.1 202 /);
});

t.test('pause: stops accepting and waits until the app closed its connections', async (t) => {
  const s = await setup(t);
  const held = await request(s.sock, get, { close: false });
  t.match(held.text, /200 OK/, 'answered; the client read EOF but keeps its end open');
  await new Promise((r) => setTimeout(r, 20));
  t.equal(s.server.openConnections, 1, 'counted until the client closes');
  let paused = false;
  const p = s.server.pause(5_000).then(() => (paused = true));
  await new Promise((r) => setTimeout(r, 100));
  t.notOk(existsSync(s.sock), 'the socket file is gone while paused');
  t.equal(paused, false, 'pause waits for the open connection');
  held.socket.end();
  await p;
  t.equal(s.server.openConnections, 0);
  await s.server.resume();
  t.ok(existsSync(s.sock), 'listening again after resume');
  t.match((await request(s.sock, get)).text, /200 OK/);
});

t.test('pause gives up with a clear error when the app keeps a connection', async (t) => {
  const s = await setup(t);
  const held = await request(s.sock, get, { close: false });
  t.teardown(() => held.socket.destroy());
  await t.rejects(s.server.pause(150), { code: 'DeadlineExceeded', message: /still holds 1 connection\(s\) to .*thaw\.sock after 150 ms; runsc cannot checkpoint a sandbox holding a host socket/ });
});

t.test('parseRequest', async (t) => {
  t.equal(parseRequest(Buffer.from('GET / HTTP/1.1\r\n')), 'incomplete');
  t.same(parseRequest(Buffer.from('GET /x HTTP/1.0\r\n\r\n')), { method: 'GET', path: '/x' });
  t.equal(parseRequest(Buffer.from('POST /x HTTP/1.1\r\ncontent-length: 4\r\n\r\nab')), 'incomplete');
  t.match(parseRequest(Buffer.from('POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n')), { error: 400 });
  t.match(parseRequest(Buffer.from('POST /x HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n')), { error: 413 });
  t.match(parseRequest(Buffer.alloc(20_000, 'a')), { error: 413 });
});
