import { ShimError } from '../../errors.js';
import type { CheckpointResult, Prepared } from '../../engine/lifecycle.js';
import { illegal, type ProcessStatus } from './process.js';
import type { InitProcess } from './init.js';

/**
 * The init process's states. Each state answers the operations legal in it and names the next
 * state; anything else fails with "cannot <op> task in <state> state". Restore is a state of its
 * own (`CreatedFromSnapshot`), whose start() restores instead of starting.
 */
export abstract class InitState {
  abstract readonly status: ProcessStatus;
  constructor(protected readonly p: InitProcess) {}

  start(): Promise<void> {
    return Promise.reject(illegal('start', this.status));
  }
  pause(): Promise<void> {
    return Promise.reject(illegal('pause', this.status));
  }
  resume(): Promise<void> {
    return Promise.reject(illegal('resume', this.status));
  }
  checkpoint(_leaveRunning: boolean): Promise<CheckpointResult> {
    return Promise.reject(illegal('checkpoint', this.status));
  }
  kill(_signal: number, _all: boolean): Promise<void> {
    return Promise.reject(illegal('kill', this.status));
  }
  delete(): Promise<void> {
    return Promise.reject(illegal('delete', this.status));
  }
  exec(): void {
    throw illegal('exec in', this.status);
  }
  /** The runtime reported the exit. */
  exited(): void {
    this.p.transition(new StoppedState(this.p));
  }
}

/** Sandbox up, app not started (cold start). */
export class CreatedState extends InitState {
  readonly status = 'created' as const;
  constructor(
    p: InitProcess,
    private readonly prepared: Prepared,
  ) {
    super(p);
  }
  override async start(): Promise<void> {
    await this.p.launch(this.prepared);
    this.p.transition(new RunningState(this.p));
  }
  override kill(signal: number, all: boolean): Promise<void> {
    return this.p.engineKill(signal, all);
  }
  override async delete(): Promise<void> {
    await this.p.engineDelete();
    this.p.transition(new DeletedState(this.p));
  }
}

/** Sandbox up, image staging; start() restores the snapshot (or falls back to a cold start). */
export class CreatedFromSnapshotState extends CreatedState {}

export class RunningState extends InitState {
  readonly status = 'running' as const;
  override async pause(): Promise<void> {
    await this.p.engine.pause(this.p.id);
    this.p.transition(new PausedState(this.p));
  }
  override checkpoint(leaveRunning: boolean): Promise<CheckpointResult> {
    return this.p.checkpointInto(leaveRunning);
  }
  override kill(signal: number, all: boolean): Promise<void> {
    return this.p.engineKill(signal, all);
  }
  override exec(): void {}
}

export class PausedState extends InitState {
  readonly status = 'paused' as const;
  override async resume(): Promise<void> {
    await this.p.engine.resume(this.p.id);
    this.p.transition(new RunningState(this.p));
  }
  /** containerd's client pauses a task around Task.Checkpoint (and resumes it afterwards). */
  override checkpoint(leaveRunning: boolean): Promise<CheckpointResult> {
    return this.p.checkpointInto(leaveRunning);
  }
  override kill(signal: number, all: boolean): Promise<void> {
    return this.p.engineKill(signal, all);
  }
}

export class StoppedState extends InitState {
  readonly status = 'stopped' as const;
  override async delete(): Promise<void> {
    await this.p.engineDelete();
    this.p.transition(new DeletedState(this.p));
  }
  override kill(_signal: number, all: boolean): Promise<void> {
    // containerd's kill --all after the exit is routine; a plain kill learns the process is gone.
    return all ? Promise.resolve() : Promise.reject(new ShimError('NotFound', 'process already finished'));
  }
  override exited(): void {}
}

export class DeletedState extends InitState {
  readonly status = 'deleted' as const;
  override exited(): void {}
}
