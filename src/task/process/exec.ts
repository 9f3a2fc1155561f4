import type { Engine, ExecHandle } from '../../engine/engine.js';
import type { Logger } from '../../log/logger.js';
import type { OpenStdio, StdioRequest } from '../stdio.js';
import { TerminalIo, type ConsoleSize } from '../console.js';
import { ExitLatch, illegal, resizeIo, type ExitInfo, type Process, type ProcessStatus } from './process.js';

export interface ExecProcessOptions {
  id: string;
  execId: string;
  engine: Engine;
  /** OCI process spec from ExecProcessRequest.spec. */
  spec: Record<string, unknown>;
  io: OpenStdio | TerminalIo;
  stdio: StdioRequest;
  log: Logger;
  onExit: (p: ExecProcess, exit: ExitInfo) => void;
}

/**
 * An exec'd process: created (recorded, not running) → running → stopped → deleted. Small enough
 * that its states are a literal union with the legal moves checked in each method.
 */
export class ExecProcess implements Process {
  readonly id: string;
  readonly execId: string;
  readonly stdio: StdioRequest;
  #status: ProcessStatus = 'created';
  #handle: ExecHandle | undefined;
  readonly #latch = new ExitLatch();
  readonly #o: ExecProcessOptions;

  constructor(o: ExecProcessOptions) {
    this.#o = o;
    this.id = o.id;
    this.execId = o.execId;
    this.stdio = o.stdio;
  }

  get status(): ProcessStatus {
    return this.#status;
  }
  get pid(): number {
    return this.#handle?.pid ?? 0;
  }
  get exit(): ExitInfo | undefined {
    return this.#latch.exit;
  }

  async start(): Promise<number> {
    if (this.#status !== 'created') throw illegal('start', this.#status);
    const io = this.#o.io;
    const consoleSocket = io instanceof TerminalIo ? { consoleSocket: io.consoleSocket } : {};
    this.#handle = await this.#o.engine.exec(this.id, { process: this.#o.spec, stdio: io.fds, ...consoleSocket });
    if (io instanceof TerminalIo) await io.attach();
    this.#status = 'running';
    this.#handle.exited.then(
      (r) => this.#exited({ status: r.exitStatus, at: r.exitedAt }),
      (err: unknown) => {
        this.#o.log.warn({ id: this.id, execId: this.execId, err }, 'exec wait failed; reporting exit 255');
        this.#exited({ status: 255, at: new Date() });
      },
    );
    return this.#handle.pid;
  }

  #exited(exit: ExitInfo): void {
    if (!this.#latch.set(exit)) return;
    this.#status = 'stopped';
    void this.#o.io.close();
    this.#o.onExit(this, exit);
  }

  async kill(signal: number, _all: boolean): Promise<void> {
    if (this.#status !== 'running' || !this.#handle) throw illegal('kill', this.#status);
    await this.#handle.kill(signal);
  }

  wait(): Promise<ExitInfo> {
    return this.#latch.promise;
  }

  async delete(): Promise<ExitInfo> {
    if (this.#status === 'running') throw illegal('delete', this.#status);
    this.#status = 'deleted';
    await this.#o.io.close();
    return this.#latch.exit ?? { status: 0, at: new Date() };
  }

  closeStdin(): Promise<void> {
    return this.#o.io.closeStdin();
  }

  resizePty(size: ConsoleSize): void {
    resizeIo(this.#o.io, size);
  }
}
