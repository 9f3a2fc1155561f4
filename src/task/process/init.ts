import type { Logger } from '../../log/logger.js';
import type { Engine } from '../../engine/engine.js';
import type { CheckpointResult, Lifecycle, Prepared, Started } from '../../engine/lifecycle.js';
import type { ContainerRecord } from '../../engine/records.js';
import type { OpenStdio, StdioRequest } from '../stdio.js';
import { TerminalIo, type ConsoleSize } from '../console.js';
import { CreatedFromSnapshotState, CreatedState, type InitState } from './init-state.js';
import { ExitLatch, resizeIo, type ExitInfo, type Process, type ProcessStatus } from './process.js';
import { OomWatcher } from '../oom.js';

export interface InitProcessOptions {
  id: string;
  namespace: string;
  bundle: string;
  prepared: Prepared;
  engine: Engine;
  lifecycle: Lifecycle;
  io: OpenStdio | TerminalIo;
  stdio: StdioRequest;
  log: Logger;
  /** Called once with the exit, after the state moved to stopped (the service publishes TaskExit). */
  onExit: (p: InitProcess, exit: ExitInfo) => void;
  /**
   * Called once per OOM kill the kernel counted in the container's cgroup (the service publishes
   * TaskOOM); a kill that ended the task is reported before onExit. Needs Engine.cgroupOf.
   */
  onOom?: (p: InitProcess) => void;
}

/**
 * The container's init process. Operations go to the current state object; the runtime's own
 * wait (started right after the app starts) moves it to stopped.
 */
export class InitProcess implements Process {
  readonly execId = '';
  readonly id: string;
  readonly namespace: string;
  readonly bundle: string;
  readonly engine: Engine;
  readonly stdio: StdioRequest;
  #state: InitState;
  #pid: number;
  #record: ContainerRecord | undefined;
  /** From launch until the exit's check or Delete. */
  #oom: OomWatcher | undefined;
  readonly #latch = new ExitLatch();
  readonly #o: InitProcessOptions;

  constructor(o: InitProcessOptions) {
    this.#o = o;
    this.id = o.id;
    this.namespace = o.namespace;
    this.bundle = o.bundle;
    this.engine = o.engine;
    this.stdio = o.stdio;
    this.#pid = o.prepared.kind === 'cold' ? o.prepared.state.pid : 0;
    this.#state = o.prepared.kind === 'restore' ? new CreatedFromSnapshotState(this, o.prepared) : new CreatedState(this, o.prepared);
  }

  get status(): ProcessStatus {
    return this.#state.status;
  }
  get pid(): number {
    return this.#pid;
  }
  get exit(): ExitInfo | undefined {
    return this.#latch.exit;
  }
  get record(): ContainerRecord | undefined {
    return this.#record;
  }
  /** What Create decided (shown in logs and `thaw ps`). */
  get decision(): Prepared['kind'] {
    return this.#o.prepared.kind;
  }

  transition(next: InitState): void {
    this.#o.log.debug({ id: this.id, from: this.#state.status, to: next.status }, 'init state');
    this.#state = next;
  }

  async start(): Promise<number> {
    await this.#state.start();
    return this.#pid;
  }
  pause(): Promise<void> {
    return this.#state.pause();
  }
  resume(): Promise<void> {
    return this.#state.resume();
  }
  kill(signal: number, all: boolean): Promise<void> {
    return this.#state.kill(signal, all);
  }
  checkpoint(leaveRunning: boolean): Promise<CheckpointResult> {
    return this.#state.checkpoint(leaveRunning);
  }
  assertCanExec(): void {
    this.#state.exec();
  }
  wait(): Promise<ExitInfo> {
    return this.#latch.promise;
  }
  async delete(): Promise<ExitInfo> {
    await this.#state.delete();
    await this.#o.io.close();
    return this.#latch.exit ?? { status: 0, at: new Date() };
  }
  closeStdin(): Promise<void> {
    return this.#o.io.closeStdin();
  }
  resizePty(size: ConsoleSize): void {
    resizeIo(this.#o.io, size);
  }

  // ---- used by the states ----

  /** Starts or restores the app (lifecycle decides by the prepared kind), then watches for its exit. */
  async launch(prepared: Prepared): Promise<void> {
    // The baseline before the app runs where the cgroup exists since Create (gVisor), so an early kill
    // counts; else (a native restore creates the container at Start) from right after the start.
    const early = await this.#openOomWatcher();
    let started: Started;
    try {
      started = await this.#o.lifecycle.start(prepared);
    } catch (err) {
      early?.stop();
      throw err;
    }
    const oom = early ?? (await this.#openOomWatcher());
    // A restored terminal task gets its pty from the restore (a cold one attached at Create).
    if (this.#o.io instanceof TerminalIo && !this.#o.io.attached) await this.#o.io.attach();
    this.#record = started.record;
    this.#pid = started.state.pid;
    this.#oom = oom;
    oom?.watch();
    this.#watchExit();
  }

  /** An OOM watcher on the container's cgroup, when the engine can name one; never fails the start. */
  async #openOomWatcher(): Promise<OomWatcher | undefined> {
    const onOom = this.#o.onOom;
    if (!this.engine.cgroupOf || !onOom) return undefined;
    try {
      const cgroup = await this.engine.cgroupOf(this.id);
      if (cgroup === undefined) {
        this.#o.log.debug({ id: this.id }, 'the container has no cgroup of its own: no OOM events');
        return undefined;
      }
      return await OomWatcher.open({ id: this.id, cgroup, onOom: () => onOom(this), log: this.#o.log });
    } catch (err) {
      this.#o.log.warn({ id: this.id, err }, 'cannot watch the container cgroup for OOM kills');
      return undefined;
    }
  }

  #watchExit(): void {
    this.engine.wait(this.id).then(
      (r) => this.#exitedAfterOomCheck({ status: r.exitStatus, at: r.exitedAt }),
      (err: unknown) => {
        // runsc cannot report the status once the sandbox is gone (e.g. after a checkpoint).
        this.#o.log.warn({ id: this.id, err }, 'wait failed; reporting exit 255');
        void this.#exitedAfterOomCheck({ status: 255, at: new Date() });
      },
    );
  }

  /** A kill that ended the sandbox is counted by now (its cgroup lives until Delete): TaskOOM goes first. */
  async #exitedAfterOomCheck(exit: ExitInfo): Promise<void> {
    const oom = this.#oom;
    if (oom) {
      await oom.check();
      oom.stop();
    }
    this.#exited(exit);
  }

  #exited(exit: ExitInfo): void {
    if (!this.#latch.set(exit)) return;
    // ctr waits for the output to end before it sends Delete; gVisor's pty may stay open until the
    // sandbox goes, so end the terminal's output now (after a short drain) rather than at Delete.
    if (this.#o.io instanceof TerminalIo) void this.#o.io.close();
    this.#state.exited();
    this.#o.onExit(this, exit);
  }

  engineKill(signal: number, all: boolean): Promise<void> {
    return this.engine.kill(this.id, signal, all);
  }

  async engineDelete(): Promise<void> {
    this.#oom?.stop();
    await this.engine.delete(this.id, { force: true });
    if (!this.#latch.exit) this.#latch.set({ status: 255, at: new Date() });
  }

  checkpointInto(leaveRunning: boolean): Promise<CheckpointResult> {
    return this.#o.lifecycle.checkpoint(this.id, this.namespace, { leaveRunning });
  }
}
