import net from 'node:net';
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
import { RequestSchema, ResponseSchema } from '../gen/ttrpc/request_pb.js';
import { ShimError } from '../errors.js';
import { silentLogger, type Logger } from '../log/logger.js';
import { encodeFrame, FrameDecoder, FrameError, FrameType, type Frame } from './frame.js';
import { errorFromStatus } from './status.js';
import { socketPathOf } from './address.js';
import { NAMESPACE_METADATA_KEY } from './server.js';

/** The connection is gone (peer closed it, or close() was called). Safe to reconnect and retry. */
export class TtrpcClosedError extends ShimError {
  constructor(message = 'ttrpc: connection closed', options: { cause?: unknown } = {}) {
    super('Unavailable', message, options);
  }
}

export interface CallOptions {
  /** Sent as timeout_nano and enforced locally (DeadlineExceeded). */
  timeoutMs?: number;
  signal?: AbortSignal;
  /** Sent as metadata `containerd-namespace-ttrpc`. */
  namespace?: string;
  metadata?: Readonly<Record<string, string | readonly string[]>>;
}

export interface ConnectOptions {
  timeoutMs?: number;
  log?: Logger;
}

/** Typed calls of one service: `client.service(Task).connect({id})`. */
export type ServiceClient<S extends DescService> = {
  [K in keyof S['method']]: S['method'][K] extends { input: infer I extends DescMessage; output: infer O extends DescMessage }
    ? (request: MessageInitShape<I>, options?: CallOptions) => Promise<MessageShape<O>>
    : never;
};

interface PendingCall {
  readonly output: DescMessage;
  readonly resolve: (message: MessageShape<DescMessage>) => void;
  readonly reject: (err: unknown) => void;
}

/**
 * A ttrpc client over one unix-socket connection: unary calls with deadlines, multiplexed on odd,
 * increasing stream ids. Used to forward events to containerd and by `thaw` to talk to a shim.
 */
export class TtrpcClient {
  readonly #socket: net.Socket;
  readonly #decoder = new FrameDecoder();
  readonly #pending = new Map<number, PendingCall>();
  readonly #log: Logger;
  readonly #closed: Promise<void>;
  #nextStreamId = 1;
  #closeError: TtrpcClosedError | undefined;

  private constructor(socket: net.Socket, log: Logger) {
    this.#socket = socket;
    this.#log = log;
    socket.on('data', (chunk: Buffer) => this.#onData(chunk));
    socket.on('error', (err) => {
      this.#closeError ??= new TtrpcClosedError(`ttrpc: connection failed: ${err.message}`, { cause: err });
    });
    this.#closed = new Promise((resolve) => socket.once('close', () => {
      this.#closeError ??= new TtrpcClosedError();
      for (const call of this.#pending.values()) call.reject(this.#closeError);
      this.#pending.clear();
      resolve();
    }));
  }

  /** Connects to `unix:///path` or `/path`. Fails with Unavailable (or DeadlineExceeded). */
  static connect(address: string, { timeoutMs = 5000, log = silentLogger }: ConnectOptions = {}): Promise<TtrpcClient> {
    const socketPath = socketPathOf(address);
    return new Promise((resolve, reject) => {
      const socket = net.createConnection({ path: socketPath });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new ShimError('DeadlineExceeded', `connect to ${address} timed out after ${timeoutMs} ms`));
      }, timeoutMs);
      socket.once('error', (err) => {
        clearTimeout(timer);
        reject(new ShimError('Unavailable', `connect to ${address} failed: ${err.message}`, { cause: err }));
      });
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        resolve(new TtrpcClient(socket, log));
      });
    });
  }

  get closed(): boolean {
    return this.#closeError !== undefined || this.#socket.destroyed;
  }

  /** Resolves once the connection is gone. */
  whenClosed(): Promise<void> {
    return this.#closed;
  }

  close(): Promise<void> {
    this.#closeError ??= new TtrpcClosedError('ttrpc: client closed');
    this.#socket.destroy();
    return this.#closed;
  }

  /** Typed view of one service's methods. */
  service<S extends DescService>(desc: S): ServiceClient<S> {
    const methods: Record<string, (request: MessageInitShape<DescMessage>, options?: CallOptions) => Promise<unknown>> = {};
    for (const method of desc.methods) {
      methods[method.localName] = (request, options) => this.call(method, request, options);
    }
    return methods as ServiceClient<S>;
  }

  /** One unary call. Rejects with TtrpcStatusError (non-OK status), TtrpcClosedError, or a ShimError. */
  call<I extends DescMessage, O extends DescMessage>(
    method: DescMethod & { input: I; output: O },
    request: MessageInitShape<I>,
    options: CallOptions = {},
  ): Promise<MessageShape<O>> {
    if (this.closed) return Promise.reject(this.#closeError ?? new TtrpcClosedError());
    const { timeoutMs, signal, namespace } = options;
    if (signal?.aborted) return Promise.reject(new ShimError('Canceled', 'ttrpc call canceled', { cause: signal.reason }));
    const metadata: { key: string; value: string }[] = [];
    if (namespace !== undefined) metadata.push({ key: NAMESPACE_METADATA_KEY, value: namespace });
    for (const [key, value] of Object.entries(options.metadata ?? {})) {
      for (const v of typeof value === 'string' ? [value] : value) metadata.push({ key, value: v });
    }
    const streamId = this.#nextStreamId;
    if (streamId > 0xffffffff) return Promise.reject(new ShimError('Unavailable', 'ttrpc: stream ids exhausted'));
    this.#nextStreamId += 2;

    let frame: Buffer;
    try {
      const payload = toBinary(method.input, create(method.input, request));
      const body = create(RequestSchema, {
        service: method.parent.typeName,
        method: method.name,
        payload,
        timeoutNano: timeoutMs !== undefined && timeoutMs > 0 ? BigInt(Math.round(timeoutMs * 1e6)) : 0n,
        metadata,
      });
      frame = encodeFrame({ streamId, type: FrameType.Request, flags: 0, payload: toBinary(RequestSchema, body) });
    } catch (err) {
      const code = err instanceof FrameError ? 'InvalidArgument' : 'Internal';
      return Promise.reject(new ShimError(code, `encode ${method.parent.typeName}.${method.name}: ${errorText(err)}`, { cause: err }));
    }

    return new Promise<MessageShape<O>>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const cleanup = (): void => {
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
        this.#pending.delete(streamId);
      };
      const onAbort = (): void => {
        cleanup();
        reject(new ShimError('Canceled', `${method.name}: canceled`, { cause: signal?.reason }));
      };
      this.#pending.set(streamId, {
        output: method.output,
        resolve: (message) => {
          cleanup();
          resolve(message as MessageShape<O>);
        },
        reject: (err) => {
          cleanup();
          reject(err);
        },
      });
      if (timeoutMs !== undefined && timeoutMs > 0) {
        timer = setTimeout(() => {
          cleanup();
          reject(new ShimError('DeadlineExceeded', `${method.parent.typeName}.${method.name}: no reply within ${timeoutMs} ms`));
        }, timeoutMs);
      }
      signal?.addEventListener('abort', onAbort, { once: true });
      this.#socket.write(frame);
    });
  }

  #onData(chunk: Buffer): void {
    let frames: Frame[];
    try {
      frames = this.#decoder.push(chunk);
    } catch (err) {
      this.#closeError ??= new TtrpcClosedError(`ttrpc: bad frame from server: ${errorText(err)}`, { cause: err });
      this.#log.warn({ err }, 'closing ttrpc client connection: bad frame');
      this.#socket.destroy();
      return;
    }
    for (const frame of frames) this.#onFrame(frame);
  }

  #onFrame(frame: Frame): void {
    const call = this.#pending.get(frame.streamId);
    if (!call) {
      this.#log.debug({ streamId: frame.streamId }, 'ttrpc reply for an unknown or expired stream');
      return;
    }
    if (frame.type !== FrameType.Response) return; // unary only: data frames carry nothing we await
    try {
      const response = fromBinary(ResponseSchema, frame.payload);
      if (response.status && response.status.code !== 0) {
        call.reject(errorFromStatus(response.status));
        return;
      }
      call.resolve(fromBinary(call.output, response.payload));
    } catch (err) {
      call.reject(new ShimError('DataLoss', `decode ttrpc response: ${errorText(err)}`, { cause: err }));
    }
  }
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
