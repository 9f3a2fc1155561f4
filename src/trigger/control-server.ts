import { createServer, type Server, type Socket } from 'node:net';
import { unlink } from 'node:fs/promises';
import { ShimError } from '../errors.js';
import { silentLogger, type Logger } from '../log/logger.js';

/**
 * The control socket's HTTP server (one request per connection, JSON answers):
 *   POST /checkpoint         → 202 when a checkpoint was scheduled, 409 when skipped, 403 when the
 *                              container's trigger is not on-request
 *   GET  /checkpoint/status  → 200 with the status document
 *
 * Why not node:http: runsc 20240729 cannot checkpoint a sandbox in which the app still holds a
 * connection to a host unix socket (the encoder panics on the host-connected endpoint, even after
 * EOF), so before a checkpoint thaw must know that the app has *closed* every connection. node:http
 * closes its own end after the answer, which hides that. Here thaw half-closes after answering
 * (the client reads EOF) and keeps the connection until the client's EOF arrives, so
 * `openConnections` counts exactly the connections the app still holds. `pause()` stops listening
 * (new connects fail, so none can appear during the checkpoint) and waits for that count to reach 0.
 */
export interface ControlReply {
  status: number;
  body: unknown;
}

export interface ControlHandler {
  /** GET /checkpoint/status */
  status(): unknown;
  /** POST /checkpoint: decides at once; the checkpoint itself runs later. */
  requestCheckpoint(): ControlReply;
}

export interface ControlServerOptions {
  socketPath: string;
  handler: ControlHandler;
  log?: Logger;
}

const MAX_HEADER_BYTES = 16 * 1024;
const MAX_BODY_BYTES = 64 * 1024;
const MAX_CONNECTIONS = 64;
const REASONS: Readonly<Record<number, string>> = {
  200: 'OK',
  202: 'Accepted',
  400: 'Bad Request',
  403: 'Forbidden',
  404: 'Not Found',
  405: 'Method Not Allowed',
  409: 'Conflict',
  413: 'Payload Too Large',
  500: 'Internal Server Error',
};

export class ControlServer {
  readonly socketPath: string;
  readonly #handler: ControlHandler;
  readonly #log: Logger;
  #server: Server | undefined;
  /** Connections whose client has not closed its end yet. */
  readonly #open = new Set<Socket>();
  #drained: (() => void) | undefined;
  #closed = false;

  constructor({ socketPath, handler, log = silentLogger }: ControlServerOptions) {
    this.socketPath = socketPath;
    this.#handler = handler;
    this.#log = log;
  }

  get listening(): boolean {
    return this.#server !== undefined;
  }

  /** Connections the app still holds open. */
  get openConnections(): number {
    return this.#open.size;
  }

  async listen(): Promise<void> {
    if (this.#closed) throw new ShimError('FailedPrecondition', 'control server closed');
    if (this.#server) return;
    await unlink(this.socketPath).catch(() => undefined);
    const server = createServer({ allowHalfOpen: true }, (s) => this.#accept(s));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(this.socketPath, () => {
        server.off('error', reject);
        resolve();
      });
    });
    server.on('error', (err) => this.#log.warn({ err }, 'control socket error'));
    if (this.#closed) {
      // close() ran while this listen was under way.
      server.close();
      await unlink(this.socketPath).catch(() => undefined);
      return;
    }
    this.#server = server;
  }

  /**
   * Stops accepting (the socket file goes away) and waits until the app has closed every open
   * connection. Rejects with DeadlineExceeded, naming the count, after `drainTimeoutMs`; the server
   * then stays paused until `resume()`.
   */
  async pause(drainTimeoutMs: number): Promise<void> {
    await this.#stopListening();
    if (this.#open.size === 0) return;
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        new Promise<void>((resolve) => (this.#drained = resolve)),
        new Promise<never>((_, reject) => {
          timer = setTimeout(
            () =>
              reject(
                new ShimError(
                  'DeadlineExceeded',
                  `the app still holds ${this.#open.size} connection(s) to ${this.socketPath} after ${drainTimeoutMs} ms; ` +
                    'runsc cannot checkpoint a sandbox holding a host socket: close the connection after reading the reply',
                ),
              ),
            drainTimeoutMs,
          );
        }),
      ]);
    } finally {
      clearTimeout(timer);
      this.#drained = undefined;
    }
  }

  async resume(): Promise<void> {
    if (!this.#closed) await this.listen();
  }

  async close(): Promise<void> {
    this.#closed = true;
    await this.#stopListening();
    for (const s of this.#open) s.destroy();
    this.#open.clear();
  }

  async #stopListening(): Promise<void> {
    const server = this.#server;
    if (!server) return;
    this.#server = undefined;
    // The listening handle closes at once (its 'close' event waits for the open connections, so
    // it is not awaited); libuv unlinks the path then, so connects fail with ENOENT.
    server.close();
    await unlink(this.socketPath).catch(() => undefined);
  }

  #accept(s: Socket): void {
    if (this.#open.size >= MAX_CONNECTIONS) {
      s.destroy();
      return;
    }
    this.#open.add(s);
    const forget = (): void => {
      if (!this.#open.delete(s)) return;
      if (this.#open.size === 0) this.#drained?.();
    };
    s.on('close', forget);
    // The client's EOF: it closed (or shut down) its end; ours is done by then.
    s.on('end', () => {
      s.destroy();
      forget();
    });
    s.on('error', () => {
      s.destroy();
      forget();
    });
    let buf = Buffer.alloc(0);
    let answered = false;
    const onData = (chunk: Buffer): void => {
      if (answered) return;
      buf = Buffer.concat([buf, chunk]);
      const req = parseRequest(buf);
      if (req === 'incomplete') return;
      answered = true;
      s.off('data', onData);
      s.resume(); // keep draining whatever else the client sends until its EOF
      this.#answer(s, req);
    };
    s.on('data', onData);
  }

  #answer(s: Socket, req: ParsedRequest | { error: number; message: string }): void {
    let reply: ControlReply;
    if ('error' in req) {
      reply = { status: req.error, body: { error: req.message } };
    } else {
      try {
        reply = this.#route(req);
      } catch (err) {
        this.#log.warn({ err }, 'control request failed');
        reply = { status: 500, body: { error: (err as Error).message } };
      }
      this.#log.debug({ method: req.method, path: req.path, status: reply.status }, 'control request');
    }
    const body = `${JSON.stringify(reply.body)}\n`;
    const head =
      `HTTP/1.1 ${reply.status} ${REASONS[reply.status] ?? 'Unknown'}\r\n` +
      `Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n`;
    // Half-close: the client reads EOF; the connection counts as open until the client closes too.
    s.end(head + body);
  }

  #route(req: ParsedRequest): ControlReply {
    const path = req.path.split('?')[0];
    if (path === '/checkpoint') {
      if (req.method !== 'POST') return { status: 405, body: { error: 'use POST /checkpoint' } };
      return this.#handler.requestCheckpoint();
    }
    if (path === '/checkpoint/status') {
      if (req.method !== 'GET') return { status: 405, body: { error: 'use GET /checkpoint/status' } };
      return { status: 200, body: this.#handler.status() };
    }
    return { status: 404, body: { error: `no such endpoint ${req.method} ${path}: use POST /checkpoint or GET /checkpoint/status` } };
  }
}

interface ParsedRequest {
  method: string;
  path: string;
}

/** One HTTP/1.x request from the start of `buf`: 'incomplete' until headers and body are in. */
export function parseRequest(buf: Buffer): ParsedRequest | 'incomplete' | { error: number; message: string } {
  const end = buf.indexOf('\r\n\r\n');
  if (end < 0) return buf.length > MAX_HEADER_BYTES ? { error: 413, message: 'request headers too large' } : 'incomplete';
  const lines = buf.subarray(0, end).toString('latin1').split('\r\n');
  const m = /^([A-Z]+) (\S+) HTTP\/1\.[01]$/.exec(lines[0] ?? '');
  if (!m) return { error: 400, message: 'not an HTTP/1.x request line' };
  let length = 0;
  for (const line of lines.slice(1)) {
    const h = /^content-length:\s*(\d+)\s*$/i.exec(line);
    if (h) length = Number(h[1]);
    if (/^transfer-encoding:/i.test(line)) return { error: 400, message: 'chunked bodies are not accepted; send Content-Length' };
  }
  if (length > MAX_BODY_BYTES) return { error: 413, message: 'request body too large' };
  if (buf.length < end + 4 + length) return 'incomplete';
  return { method: m[1]!, path: m[2]! };
}
