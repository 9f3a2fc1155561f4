import { chmod, mkdir } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import {
  create,
  fromBinary,
  toBinary,
  type DescMessage,
  type DescMethod,
  type DescService,
  type MessageInitShape,
  type MessageShape,
} from '@bufbuild/protobuf';
import { RequestSchema, ResponseSchema, type Request } from '../gen/ttrpc/request_pb.js';
import type { Status } from '../gen/google/rpc/status_pb.js';
import { ShimError } from '../errors.js';
import { silentLogger, type Logger } from '../log/logger.js';
import { encodeFrame, FrameDecoder, FrameError, FrameType, type Frame } from './frame.js';
import { Code, makeStatus, statusFromError } from './status.js';

/** Metadata key carrying the containerd namespace of a call. */
export const NAMESPACE_METADATA_KEY = 'containerd-namespace-ttrpc';

/** What a handler learns about its call besides the request message. */
export interface CallContext {
  /** Full service name, e.g. "containerd.task.v2.Task". */
  readonly service: string;
  /** Bare method name, e.g. "Create". */
  readonly method: string;
  /** From metadata `containerd-namespace-ttrpc`; undefined when the caller sent none. */
  readonly namespace: string | undefined;
  /** From the request's timeout_nano; undefined = no deadline. */
  readonly deadline: Date | undefined;
  /** Aborted when the deadline passes, the connection closes or the server shuts down. */
  readonly signal: AbortSignal;
  readonly metadata: ReadonlyMap<string, readonly string[]>;
}

export type UnaryHandler<I extends DescMessage, O extends DescMessage> = (
  request: MessageShape<I>,
  ctx: CallContext,
) => MessageInitShape<O> | Promise<MessageInitShape<O>>;

/** An implementation of a generated service: one handler per method, keyed by local name. */
export type ServiceImpl<S extends DescService> = {
  [K in keyof S['method']]: S['method'][K] extends { input: infer I extends DescMessage; output: infer O extends DescMessage }
    ? UnaryHandler<I, O>
    : never;
};

interface Route {
  readonly method: DescMethod;
  /** Bound handler; undefined when the implementation leaves the method out (→ Unimplemented). */
  readonly handler: ((request: MessageShape<DescMessage>, ctx: CallContext) => unknown) | undefined;
}

export interface TtrpcServerOptions {
  log?: Logger;
  /** How long close() lets in-flight calls finish before aborting them. */
  closeGraceMs?: number;
}

/**
 * A ttrpc server on a unix socket. Every call runs concurrently (Wait blocks for as long as the
 * task lives), so one connection never serializes its streams. Protocol errors are answered on
 * the offending stream where the stream id is known and close only that connection where the
 * framing itself is broken; other connections keep being served.
 */
export class TtrpcServer {
  readonly #routes = new Map<string, Map<string, Route>>();
  readonly #connections = new Set<ServerConnection>();
  readonly #log: Logger;
  readonly #closeGraceMs: number;
  #server: net.Server | undefined;
  #closing: Promise<void> | undefined;

  constructor({ log = silentLogger, closeGraceMs = 2000 }: TtrpcServerOptions = {}) {
    this.#log = log;
    this.#closeGraceMs = closeGraceMs;
  }

  /**
   * Routes calls of `desc` to `impl`. Methods the implementation leaves out answer
   * Unimplemented (12), as containerd expects for unsupported RPCs.
   */
  registerService<S extends DescService>(desc: S, impl: Partial<ServiceImpl<S>>): void {
    if (this.#routes.has(desc.typeName)) {
      throw new ShimError('AlreadyExists', `service ${desc.typeName} is already registered`);
    }
    const methods = new Map<string, Route>();
    const handlers = impl as Partial<Record<string, (request: MessageShape<DescMessage>, ctx: CallContext) => unknown>>;
    for (const method of desc.methods) {
      if (method.methodKind !== 'unary') {
        throw new ShimError('InvalidArgument', `${desc.typeName}.${method.name}: only unary methods are supported`);
      }
      const fn = handlers[method.localName];
      methods.set(method.name, { method, handler: typeof fn === 'function' ? fn.bind(impl) : undefined });
    }
    this.#routes.set(desc.typeName, methods);
  }

  /** Listens on a unix socket path (directory created 0700, socket chmod 0600). */
  async listen(socketPath: string): Promise<void> {
    if (this.#server) throw new ShimError('FailedPrecondition', 'ttrpc server is already listening');
    await mkdir(path.dirname(socketPath), { recursive: true, mode: 0o700 });
    const server = net.createServer((socket) => this.handleConnection(socket));
    await new Promise<void>((resolve, reject) => {
      const onError = (err: NodeJS.ErrnoException): void => {
        const code = err.code === 'EADDRINUSE' ? 'AlreadyExists' : 'Unavailable';
        reject(new ShimError(code, `listen on ${socketPath} failed: ${err.message}`, { cause: err }));
      };
      server.once('error', onError);
      server.listen(socketPath, () => {
        server.off('error', onError);
        resolve();
      });
    });
    server.on('error', (err) => this.#log.error({ err }, 'ttrpc listener error'));
    this.#server = server;
    await chmod(socketPath, 0o600);
    this.#log.debug({ socket: socketPath }, 'ttrpc server listening');
  }

  /** Serves one already-connected socket (listen() calls this for each accepted connection). */
  handleConnection(socket: net.Socket): void {
    const conn = new ServerConnection(socket, this.#routes, this.#log);
    this.#connections.add(conn);
    socket.once('close', () => this.#connections.delete(conn));
  }

  get connectionCount(): number {
    return this.#connections.size;
  }

  /**
   * Stops accepting connections (the socket file goes away), lets in-flight calls finish for up
   * to closeGraceMs — so the reply to a Shutdown call still goes out — then aborts the rest and
   * closes every connection. Idempotent.
   */
  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async #close(): Promise<void> {
    const server = this.#server;
    const listenerClosed = server
      ? new Promise<void>((resolve) => server.close(() => resolve()))
      : Promise.resolve();
    const deadline = Date.now() + this.#closeGraceMs;
    while (Date.now() < deadline && [...this.#connections].some((c) => c.activeCount > 0)) {
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    await Promise.all([...this.#connections].map((c) => c.close('server shutting down')));
    await listenerClosed;
  }
}

/** Per-connection state: frame decoding, stream-id rules and the calls in flight. */
class ServerConnection {
  readonly #decoder = new FrameDecoder();
  readonly #active = new Map<number, AbortController>();
  #lastStreamId = 0;
  #closed = false;

  constructor(
    private readonly socket: net.Socket,
    private readonly routes: ReadonlyMap<string, ReadonlyMap<string, Route>>,
    private readonly log: Logger,
  ) {
    socket.on('data', (chunk: Buffer) => this.#onData(chunk));
    socket.on('error', (err) => this.log.debug({ err }, 'ttrpc connection error'));
    socket.once('close', () => this.#onClose());
  }

  get activeCount(): number {
    return this.#active.size;
  }

  /** Ends the connection after pending writes flush; destroys it if the peer lingers. */
  close(reason: string): Promise<void> {
    this.#abortAll(reason);
    if (this.socket.destroyed) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(() => this.socket.destroy(), 500);
      this.socket.once('close', () => {
        clearTimeout(timer);
        resolve();
      });
      this.socket.end();
    });
  }

  #onData(chunk: Buffer): void {
    let frames: Frame[];
    try {
      frames = this.#decoder.push(chunk);
    } catch (err) {
      if (!(err instanceof FrameError)) throw err;
      // Oversized or garbled framing: the byte stream can't be resynchronized.
      this.log.warn({ err, reason: err.message }, 'closing ttrpc connection: bad frame');
      this.socket.destroy();
      return;
    }
    try {
      for (const frame of frames) this.#onFrame(frame);
    } catch (err) {
      // A bug here must cost this connection only, never the whole shim.
      this.log.error({ err }, 'closing ttrpc connection: unexpected error handling a frame');
      this.socket.destroy();
    }
  }

  #onFrame(frame: Frame): void {
    const id = frame.streamId;
    if (frame.type !== FrameType.Request && frame.type !== FrameType.Data) {
      // Unknown types are ignored for forward compatibility, as ttrpc does.
      this.log.debug({ streamId: id, type: frame.type }, 'ignoring ttrpc frame of unknown type');
      return;
    }
    if (id % 2 !== 1) {
      this.#respond(id, makeStatus(Code.InvalidArgument, 'StreamID must be odd for client initiated streams'));
      return;
    }
    if (frame.type === FrameType.Data) {
      const message = this.#active.has(id)
        ? 'data frames are not supported on unary streams'
        : 'StreamID is no longer active';
      this.#respond(id, makeStatus(Code.InvalidArgument, message));
      return;
    }
    if (id <= this.#lastStreamId) {
      this.#respond(id, makeStatus(Code.InvalidArgument, 'StreamID cannot be re-used and must increment'));
      return;
    }
    this.#lastStreamId = id;
    let request: Request;
    try {
      request = fromBinary(RequestSchema, frame.payload);
    } catch (err) {
      this.#respond(id, makeStatus(Code.InvalidArgument, `unmarshal request error: ${errorText(err)}`));
      return;
    }
    this.#dispatch(id, request);
  }

  #dispatch(id: number, request: Request): void {
    const methods = this.routes.get(request.service);
    if (!methods) {
      this.#respond(id, makeStatus(Code.Unimplemented, `service ${request.service}`));
      return;
    }
    const route = methods.get(request.method);
    if (!route) {
      this.#respond(id, makeStatus(Code.Unimplemented, `method ${request.method}`));
      return;
    }
    const { method, handler } = route;
    if (!handler) {
      this.#respond(id, makeStatus(Code.Unimplemented, `${request.service}.${request.method} is not implemented`));
      return;
    }
    let input: MessageShape<DescMessage>;
    try {
      input = fromBinary(method.input, request.payload);
    } catch (err) {
      this.#respond(id, makeStatus(Code.InvalidArgument, `unmarshal ${method.input.typeName}: ${errorText(err)}`));
      return;
    }

    const metadata = new Map<string, string[]>();
    for (const { key, value } of request.metadata) {
      const values = metadata.get(key);
      if (values) values.push(value);
      else metadata.set(key, [value]);
    }
    const timeoutMs = Number(request.timeoutNano) / 1e6;
    const controller = new AbortController();
    this.#active.set(id, controller);
    const ctx: CallContext = {
      service: request.service,
      method: request.method,
      namespace: metadata.get(NAMESPACE_METADATA_KEY)?.[0],
      deadline: timeoutMs > 0 ? new Date(Date.now() + timeoutMs) : undefined,
      signal: controller.signal,
      metadata,
    };

    let settled = false;
    let timer: NodeJS.Timeout | undefined;
    const finish = (status: Status, payload?: Uint8Array): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      this.#active.delete(id);
      this.#respond(id, status, payload);
    };
    if (timeoutMs > 0) {
      // The caller stops waiting at its deadline; answer then and tell the handler to stop.
      timer = setTimeout(() => {
        const err = new ShimError('DeadlineExceeded', `${request.service}.${request.method}: deadline exceeded`);
        controller.abort(err);
        finish(statusFromError(err));
      }, Math.min(timeoutMs, 2 ** 31 - 1));
    }
    Promise.resolve()
      .then(() => handler(input, ctx))
      .then(
        (output) => finish(makeStatus(Code.OK, ''), toBinary(method.output, create(method.output, output as MessageInitShape<DescMessage>))),
        (err: unknown) => {
          this.log.debug({ err, method: `${request.service}.${request.method}` }, 'ttrpc call failed');
          finish(statusFromError(err));
        },
      )
      .catch((err: unknown) => finish(makeStatus(Code.Internal, `encode response: ${errorText(err)}`)));
  }

  /** Sends the final Response of a stream; a closed connection swallows it. */
  #respond(id: number, status: Status, payload: Uint8Array = new Uint8Array(0)): void {
    if (this.#closed || this.socket.destroyed || !this.socket.writable) return;
    let bytes: Buffer;
    try {
      bytes = encodeFrame({
        streamId: id,
        type: FrameType.Response,
        flags: 0,
        payload: toBinary(ResponseSchema, create(ResponseSchema, { status, payload })),
      });
    } catch (err) {
      if (!(err instanceof FrameError)) throw err;
      this.log.error({ err, streamId: id }, 'ttrpc response too large');
      this.#respond(id, makeStatus(Code.ResourceExhausted, err.message));
      return;
    }
    this.socket.write(bytes);
  }

  #abortAll(reason: string): void {
    for (const controller of this.#active.values()) {
      controller.abort(new ShimError('Canceled', reason));
    }
  }

  #onClose(): void {
    this.#closed = true;
    this.#abortAll('ttrpc connection closed');
    this.#active.clear();
  }
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
