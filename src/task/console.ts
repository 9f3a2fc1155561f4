import {
  close as fsClose,
  closeSync,
  constants,
  createReadStream,
  createWriteStream,
  open as fsOpen,
  openSync,
  readSync,
  statSync,
  writeSync,
} from 'node:fs';
import { mkdir, mkdtemp, rm, stat } from 'node:fs/promises';
import { Socket } from 'node:net';
import { constants as osConstants, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import type { Readable, Writable } from 'node:stream';
import { ReadStream as TtyReadStream } from 'node:tty';
import { promisify } from 'node:util';
import { NativeIoError, ShimError } from '../errors.js';
import type { StdioFds } from '../engine/engine.js';
import { silentLogger, type Logger } from '../log/logger.js';
import type { StdioRequest } from './stdio.js';
import { addonLoader, addonPath, hasFunctions, type AddonLoad } from '../native-addon.js';

/**
 * Terminal (pty) tasks. The runtime (runsc or runc, given `--console-socket PATH`) creates the pty,
 * keeps the slave for the container and sends the master over PATH with SCM_RIGHTS, which Node
 * cannot receive: the small `native/console` addon does that and the TIOCSWINSZ ioctl; everything
 * else — where the socket lives, timeouts, copying between the pty and containerd's stdio FIFOs,
 * when to stop — is here.
 *
 * Data paths: pty master → stdout target (a tty.ReadStream, so reads wait on epoll, not on a
 * thread; EIO once the last slave holder is gone is the pty's end of file); stdin FIFO → master
 * (the master is non-blocking and written with writeSync, retried on a timer while the pty's input
 * buffer is full, so a container that never reads its terminal cannot stall the event loop or a
 * threadpool thread). stderr is unused: a terminal merges it into the one stream.
 *
 * Ending: once the process exited, close() does not wait for the pty's end of file, which may never
 * come — under gVisor a background process of an exec, or the sandbox itself, can keep the slave
 * open. It waits until the output goes quiet (or ends), reads whatever is still in the pty without
 * waiting, and closes the stdout target: containerd's client waits for that close before it deletes
 * the task (`ctr run -t` / `ctr task exec -t` return only then). runc's shim likewise drops the
 * console at the exit instead of waiting for a hangup.
 */

// ---- the addon's typed facade ----

/** The exports of `native/console` (thaw_console.node). */
export interface ConsoleBinding {
  /** A listening AF_UNIX stream socket at path (a stale socket file there is replaced); path < 108 bytes. */
  listen(path: string): number;
  /** Accepts one connection and resolves with the first fd it carries; rejects with {op, errno} (ETIMEDOUT, ECANCELED, EPROTO). */
  receive(listenFd: number, cancelFd: number, timeoutMs: number): Promise<number>;
  setWindowSize(fd: number, rows: number, cols: number): void;
  getWindowSize(fd: number): { rows: number; cols: number };
  setNonBlocking(fd: number, on: boolean): void;
  /** An eventfd; cancel(fd) makes every receive waiting on it fail with ECANCELED. */
  createCancel(): number;
  cancel(fd: number): void;
  close(fd: number): void;
}

const BINDING_FUNCTIONS = ['listen', 'receive', 'setWindowSize', 'getWindowSize', 'setNonBlocking', 'createCancel', 'cancel', 'close'];

function isBinding(mod: unknown): mod is ConsoleBinding {
  return hasFunctions(mod, BINDING_FUNCTIONS);
}

/** `<repo>/native/console/build/Release/thaw_console.node`. */
export function defaultConsoleAddonPath(): string {
  return addonPath('console', 'thaw_console.node');
}

export type ConsoleAddonLoad = AddonLoad<ConsoleBinding>;

const loadThawConsole = addonLoader('thaw_console', isBinding);

/** Loads the addon once per process; a missing or broken build is reported, not thrown. */
export function loadConsoleAddon(path = defaultConsoleAddonPath()): ConsoleAddonLoad {
  return loadThawConsole(path);
}

/** The addon, or a FailedPrecondition saying how to get it. */
export function requireConsoleBinding(): ConsoleBinding {
  const load = loadConsoleAddon();
  if (load.binding) return load.binding;
  throw new ShimError(
    'FailedPrecondition',
    `terminal (pty) tasks need the console addon ${load.path} (build it with npm run build:native): ${load.error.message}`,
    { cause: load.error },
  );
}

const errnoNames = new Map<number, string>(Object.entries(osConstants.errno).map(([name, n]) => [n, name]));

function fromAddonError(err: unknown, op: string): NativeIoError {
  const raw = err as { errno?: unknown; op?: unknown; message?: unknown };
  const errno = typeof raw?.errno === 'number' ? raw.errno : osConstants.errno.EINVAL;
  const name = errnoNames.get(errno);
  const code = name === 'ETIMEDOUT' ? 'DeadlineExceeded' : name === 'ECANCELED' ? 'Canceled' : name === 'EPROTO' ? 'DataLoss' : 'Internal';
  const detail = typeof raw?.message === 'string' ? raw.message : String(err);
  return new NativeIoError(code, `${op} failed: ${detail}`, { op: typeof raw?.op === 'string' ? raw.op : op, errno }, { cause: err });
}

// ---- the console socket ----

export interface ConsoleSocketOptions {
  /** Parent of the private directory holding the socket (default: os.tmpdir(); the path must stay < 108 bytes). */
  dir?: string;
  binding?: ConsoleBinding;
}

/** A listening `--console-socket` in a private directory; receives one pty master. */
export class ConsoleSocket {
  #listenFd: number;
  readonly #cancelFd: number;
  #pending: Promise<unknown> | undefined;
  #closed = false;

  private constructor(
    readonly path: string,
    private readonly dir: string,
    private readonly binding: ConsoleBinding,
    listenFd: number,
    cancelFd: number,
  ) {
    this.#listenFd = listenFd;
    this.#cancelFd = cancelFd;
  }

  static async create({ dir = tmpdir(), binding = requireConsoleBinding() }: ConsoleSocketOptions = {}): Promise<ConsoleSocket> {
    await mkdir(dir, { recursive: true });
    const own = await mkdtemp(join(dir, 'thaw-console-'));
    const path = join(own, 'console.sock');
    let listenFd = -1;
    try {
      listenFd = binding.listen(path);
      const cancelFd = binding.createCancel();
      return new ConsoleSocket(path, own, binding, listenFd, cancelFd);
    } catch (err) {
      if (listenFd >= 0) binding.close(listenFd);
      await rm(own, { recursive: true, force: true });
      throw fromAddonError(err, 'console socket');
    }
  }

  /** The pty master the runtime sent (close-on-exec; the caller owns it). */
  async receive({ timeoutMs }: { timeoutMs: number }): Promise<number> {
    if (this.#closed) throw new ShimError('FailedPrecondition', 'console socket is closed');
    if (this.#pending) throw new ShimError('FailedPrecondition', 'console socket is already receiving');
    const p = this.binding.receive(this.#listenFd, this.#cancelFd, timeoutMs);
    this.#pending = p.catch(() => undefined);
    try {
      return await p;
    } catch (err) {
      throw fromAddonError(err, `receive pty master on ${this.path}`);
    } finally {
      this.#pending = undefined;
    }
  }

  /** Cancels a pending receive, then closes the socket and removes its directory. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.binding.cancel(this.#cancelFd);
    // The worker polls the listening fd: close it only once the worker is done with it.
    await this.#pending;
    this.binding.close(this.#listenFd);
    this.binding.close(this.#cancelFd);
    this.#listenFd = -1;
    await rm(this.dir, { recursive: true, force: true });
  }
}

// ---- the relay ----

/** containerd's ResizePty: width = columns, height = rows. */
export interface ConsoleSize {
  width: number;
  height: number;
}

export interface TerminalIoOptions {
  log?: Logger;
  /** Where the console socket's private directory goes (default os.tmpdir()). */
  socketDir?: string;
  /** How long attach() waits for the runtime's pty master (it is sent before the runtime's create/exec returns). */
  receiveTimeoutMs?: number;
  /** The longest close() waits for the pty's remaining output (a background writer can keep it busy forever). */
  drainTimeoutMs?: number;
  /** close() stops waiting once no output came for this long (the pty may never reach end of file). */
  quietMs?: number;
  binding?: ConsoleBinding;
}

/** At most this much is read from the pty at the final drain, so a writer that never stops cannot hold close(). */
const FINAL_DRAIN_BYTES = 1 << 20;

const promiseOpen = promisify(fsOpen);
const promiseClose = promisify(fsClose);

/**
 * A terminal task's stdio: the console socket the runtime sends the pty master to, and the copy
 * loops between the master and containerd's stdio targets once attached. It has OpenStdio's shape
 * (fds, closeStdin, close) so process code treats both alike; `fds` are all 'ignore' because the
 * runtime gives the container the pty slave instead.
 */
export class TerminalIo {
  readonly fds: StdioFds = ['ignore', 'ignore', 'ignore'];
  #master = -1;
  #reader: TtyReadStream | undefined;
  #stdin: StdinSource | undefined;
  #input: Readable | undefined;
  #queue: Buffer[] = [];
  #retry: NodeJS.Timeout | undefined;
  #inputDead = false;
  #size: ConsoleSize | undefined;
  #outputEnded: Promise<void> | undefined;
  #outputDone = false;
  /** When the pty last gave output (or close() began), for close()'s quiet window. */
  #lastOutputAt = 0;
  /** The stdout target is full, so the reader is paused: output pending, not quiet. */
  #outputBlocked = false;
  #closing: Promise<void> | undefined;

  private constructor(
    private readonly socket: ConsoleSocket,
    private readonly output: Writable | undefined,
    stdin: StdinSource | undefined,
    private readonly binding: ConsoleBinding,
    private readonly o: Required<Pick<TerminalIoOptions, 'receiveTimeoutMs' | 'drainTimeoutMs' | 'quietMs'>> & { log: Logger },
  ) {
    this.#stdin = stdin;
  }

  /** Opens the console socket and the stdio targets (stdout first: a bad URI fails Create, not later). */
  static async open(req: StdioRequest, opts: TerminalIoOptions = {}): Promise<TerminalIo> {
    const binding = opts.binding ?? requireConsoleBinding();
    const log = opts.log ?? silentLogger;
    const output = req.stdout ? await openOutput(req.stdout) : undefined;
    let socket: ConsoleSocket;
    try {
      socket = await ConsoleSocket.create({ dir: opts.socketDir, binding });
    } catch (err) {
      output?.destroy();
      throw err;
    }
    const stdin = req.stdin ? StdinSource.open(req.stdin, log) : undefined;
    return new TerminalIo(socket, output, stdin, binding, {
      log,
      receiveTimeoutMs: opts.receiveTimeoutMs ?? 10_000,
      drainTimeoutMs: opts.drainTimeoutMs ?? 2_000,
      quietMs: opts.quietMs ?? 100,
    });
  }

  /** The path to pass as the runtime's `--console-socket`. */
  get consoleSocket(): string {
    return this.socket.path;
  }

  /** Whether attach() took the master (a restored task gets its pty at restore, i.e. at Start). */
  get attached(): boolean {
    return this.#master >= 0;
  }

  /** After the runtime's create/exec/restore returned: takes the pty master and starts copying. */
  async attach(): Promise<void> {
    if (this.#master >= 0 || this.#closing) throw new ShimError('FailedPrecondition', 'terminal is already attached or closed');
    const master = await this.socket.receive({ timeoutMs: this.o.receiveTimeoutMs });
    await this.socket.close(); // one pty per socket; nothing else may connect
    try {
      this.binding.setNonBlocking(master, true);
      if (this.#size) this.binding.setWindowSize(master, this.#size.height, this.#size.width);
    } catch (err) {
      this.binding.close(master);
      throw fromAddonError(err, 'set up pty master');
    }
    this.#master = master;
    this.#startOutput(master);
    void this.#startInput();
  }

  /** ResizePty. Before attach the size is kept and applied once the master arrives. */
  resize(size: ConsoleSize): void {
    if (!Number.isInteger(size.width) || !Number.isInteger(size.height) || size.width < 0 || size.height < 0 || size.width > 0xffff || size.height > 0xffff) {
      throw new ShimError('InvalidArgument', `invalid console size ${size.width}x${size.height}`);
    }
    this.#size = { width: size.width, height: size.height };
    if (this.#master < 0 || this.#closing) return;
    try {
      this.binding.setWindowSize(this.#master, size.height, size.width);
    } catch (err) {
      throw fromAddonError(err, 'resize pty');
    }
  }

  /** Resolves when the pty's output has reached its end and the stdout target is closed (the app and every slave holder are gone). */
  outputEnded(): Promise<void> {
    return this.#outputEnded ?? Promise.resolve();
  }

  /** CloseIO: stop copying stdin (the terminal itself stays open). */
  async closeStdin(): Promise<void> {
    this.#stopInput();
    await this.#stdin?.close();
  }

  /**
   * Stops input; lets the output reach its end or go quiet (bounded by drainTimeoutMs); reads what
   * the pty still holds; then closes the master and the stdout target. Idempotent. Call it once the
   * process exited: containerd's client waits for the stdout target to close.
   */
  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async #close(): Promise<void> {
    this.#stopInput();
    await this.#stdin?.close();
    if (this.#outputEnded) {
      const settled = await this.#settleOutput(this.#outputEnded);
      if (settled === 'busy') this.o.log.warn({ durationMs: this.o.drainTimeoutMs }, 'pty output did not stop; closing the terminal anyway');
      if (settled !== 'ended') this.#drainMaster();
    }
    this.#reader?.destroy(); // closes the master
    this.#master = -1;
    await closeWritable(this.output);
    await this.socket.close();
  }

  /** Waits until the output ended, or gave nothing for quietMs, or drainTimeoutMs passed ('busy'). */
  async #settleOutput(ended: Promise<void>): Promise<'ended' | 'quiet' | 'busy'> {
    const started = Date.now();
    const deadline = started + this.o.drainTimeoutMs;
    this.#lastOutputAt = Math.max(this.#lastOutputAt, started); // output still in flight at the exit gets one window
    for (;;) {
      if (this.#outputDone) return 'ended';
      const now = Date.now();
      const idle = now - this.#lastOutputAt;
      const blocked = this.#outputBlocked && !this.output?.destroyed;
      if (!blocked && idle >= this.o.quietMs) return 'quiet';
      if (now >= deadline) return 'busy';
      const step = Math.min(deadline - now, blocked ? this.o.quietMs : this.o.quietMs - idle);
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([ended, new Promise<void>((r) => (timer = setTimeout(r, step)))]);
      clearTimeout(timer);
    }
  }

  /**
   * Moves what is left to the stdout target without waiting: the reader's buffered chunks, then
   * non-blocking reads of the master until it is empty (EAGAIN) or hung up (EIO). A timer may fire
   * before the event loop polls the pty, so "quiet" alone could leave output behind.
   */
  #drainMaster(): void {
    const reader = this.#reader;
    const out = this.output;
    if (!reader || reader.destroyed || this.#outputDone || this.#master < 0) return; // the master is closed already
    reader.removeAllListeners('data');
    reader.pause();
    const chunks: Buffer[] = [];
    for (let c: unknown = reader.read(); c !== null; c = reader.read()) if (Buffer.isBuffer(c)) chunks.push(c);
    const buf = Buffer.allocUnsafe(64 * 1024);
    for (let total = 0; total < FINAL_DRAIN_BYTES; ) {
      let n: number;
      try {
        n = readSync(this.#master, buf, 0, buf.length, null);
      } catch {
        break; // EAGAIN: nothing left; EIO: every slave holder is gone
      }
      if (n <= 0) break;
      chunks.push(Buffer.from(buf.subarray(0, n)));
      total += n;
    }
    if (out && !out.destroyed) for (const c of chunks) out.write(c);
  }

  #startOutput(master: number): void {
    const reader = new TtyReadStream(master);
    this.#reader = reader;
    const out = this.output;
    this.#outputEnded = new Promise<void>((resolve) => {
      let done = false;
      const finish = (err?: NodeJS.ErrnoException): void => {
        if (done) return;
        done = true;
        this.#outputDone = true;
        // EIO: the last slave holder closed it — the pty's end of file.
        if (err && err.code !== 'EIO') this.o.log.warn({ err }, 'reading the pty failed');
        this.#stopInput();
        void closeWritable(out).then(resolve);
      };
      reader.on('data', (chunk: Buffer) => {
        this.#lastOutputAt = Date.now();
        if (!out || out.destroyed) return;
        if (!out.write(chunk)) {
          this.#outputBlocked = true;
          reader.pause();
          out.once('drain', () => {
            this.#outputBlocked = false;
            reader.resume();
          });
        }
      });
      reader.once('end', () => finish());
      reader.once('close', () => finish());
      reader.on('error', (err: NodeJS.ErrnoException) => finish(err));
    });
    out?.on('error', (err) => this.o.log.warn({ err }, 'writing terminal output failed'));
  }

  async #startInput(): Promise<void> {
    const input = await this.#stdin?.readable();
    if (!input || this.#inputDead) {
      input?.destroy();
      return;
    }
    this.#input = input;
    input.on('data', (chunk: Buffer) => {
      this.#queue.push(chunk);
      this.#pump();
    });
    input.on('error', (err) => this.o.log.warn({ err }, 'reading terminal input failed'));
  }

  /** Writes queued input to the non-blocking master; a full pty pauses stdin and retries shortly. */
  #pump(): void {
    this.#retry = undefined;
    while (this.#queue.length > 0 && !this.#inputDead && this.#master >= 0) {
      const buf = this.#queue[0]!;
      let n: number;
      try {
        n = writeSync(this.#master, buf);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'EAGAIN') {
          this.#input?.pause();
          this.#retry = setTimeout(() => this.#pump(), 10);
          return;
        }
        // EIO: the app is gone; its input goes nowhere.
        this.#stopInput();
        return;
      }
      if (n < buf.length) this.#queue[0] = buf.subarray(n);
      else this.#queue.shift();
    }
    this.#input?.resume();
  }

  #stopInput(): void {
    this.#inputDead = true;
    this.#queue = [];
    if (this.#retry) clearTimeout(this.#retry);
    this.#retry = undefined;
    this.#input?.destroy();
  }
}

/**
 * The stdin FIFO, opened for reading without O_NONBLOCK on a threadpool thread: the open returns once
 * the client has its end open, so the stream sees EOF only when the client really closes (a
 * non-blocking open would read EOF at once while no writer is there). close() unblocks a pending
 * open by briefly opening the write end itself.
 */
class StdinSource {
  #fd: Promise<number | undefined>;
  #stream: Readable | undefined;
  #closed = false;

  private constructor(
    private readonly path: string,
    private readonly fifo: boolean,
    log: Logger,
  ) {
    this.#fd = promiseOpen(path, constants.O_RDONLY).then(
      (fd) => fd,
      (err: unknown) => {
        if (!this.#closed) log.warn({ err, path }, 'cannot open terminal stdin');
        return undefined;
      },
    );
  }

  static open(uri: string, log: Logger): StdinSource {
    const path = pathOf(uri);
    return new StdinSource(path, statIsFifo(path), log);
  }

  /** The stream once the client is connected; undefined if closed first. */
  async readable(): Promise<Readable | undefined> {
    const fd = await this.#fd;
    if (fd === undefined) return undefined;
    if (this.#closed) {
      await promiseClose(fd).catch(() => undefined);
      return undefined;
    }
    this.#stream = this.fifo ? new Socket({ fd, readable: true, writable: false }) : createReadStream('', { fd });
    return this.#stream;
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#stream?.destroy();
    if (this.fifo) {
      // Wake a reader still blocked in open(2); ENXIO means it is not in open yet, so try again.
      for (let i = 0; i < 50; i++) {
        const settled = await Promise.race([this.#fd.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 0))]);
        if (settled) break;
        try {
          closeSync(openSync(this.path, constants.O_WRONLY | constants.O_NONBLOCK));
        } catch {
          await new Promise((r) => setTimeout(r, 10));
        }
      }
    }
    const fd = await this.#fd;
    if (fd !== undefined && !this.#stream) await promiseClose(fd).catch(() => undefined);
  }
}

/** Synchronous on purpose: called once at open, and a FIFO's stat does not block. */
function statIsFifo(path: string): boolean {
  try {
    return statSync(path).isFIFO();
  } catch {
    return false;
  }
}

function pathOf(uri: string): string {
  if (uri.startsWith('file://')) return decodeURIComponent(new URL(uri).pathname);
  if (/^[a-z0-9+.-]+:\/\//i.test(uri)) {
    throw new ShimError('NotImplemented', `stdio ${uri}: only FIFOs, paths and file:// are supported`);
  }
  return uri;
}

/** stdout target: a FIFO opened read-write (never blocks, no EPIPE when the reader goes) as a pipe socket, else a file appended to. */
async function openOutput(uri: string): Promise<Writable> {
  const path = pathOf(uri);
  try {
    if ((await stat(path).catch(() => undefined))?.isFIFO()) {
      const fd = await promiseOpen(path, constants.O_RDWR);
      return new Socket({ fd, readable: false, writable: true });
    }
    if (uri.startsWith('file://')) await mkdir(dirname(path), { recursive: true });
    const fd = await promiseOpen(path, constants.O_WRONLY | constants.O_APPEND | constants.O_CREAT, 0o640);
    return createWriteStream('', { fd });
  } catch (err) {
    throw new ShimError('InvalidArgument', `cannot open stdio ${uri}: ${(err as Error).message}`, { cause: err });
  }
}

/** Flushes what was written, then closes (end() would shutdown(2) a FIFO, which is not a socket). */
async function closeWritable(out: Writable | undefined): Promise<void> {
  if (!out || out.destroyed) return;
  await new Promise<void>((resolve) => {
    const timer = setTimeout(resolve, 2_000); // a reader that never reads must not hold the close
    out.write(Buffer.alloc(0), () => {
      clearTimeout(timer);
      resolve();
    });
  });
  out.destroy();
}
