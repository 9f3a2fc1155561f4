import { TerminalIo, type ConsoleSize } from '../console.js';
import type { OpenStdio } from '../stdio.js';
import { ShimError } from '../../errors.js';

/** Process statuses, named as containerd names them (containerd.v1.types.Status). */
export type ProcessStatus = 'created' | 'running' | 'paused' | 'stopped' | 'deleted';

export interface ExitInfo {
  status: number;
  at: Date;
}

/** Resolves once, when the process exits; Wait calls share it. */
export class ExitLatch {
  #exit: ExitInfo | undefined;
  #resolve!: (e: ExitInfo) => void;
  readonly promise: Promise<ExitInfo>;

  constructor() {
    this.promise = new Promise((resolve) => (this.#resolve = resolve));
  }

  get exit(): ExitInfo | undefined {
    return this.#exit;
  }

  set(exit: ExitInfo): boolean {
    if (this.#exit) return false;
    this.#exit = exit;
    this.#resolve(exit);
    return true;
  }
}

export function illegal(op: string, status: ProcessStatus): ShimError {
  return new ShimError('FailedPrecondition', `cannot ${op} task in ${status} state`);
}

/** What the Task service needs of any process, init or exec. */
export interface Process {
  readonly id: string;
  /** '' for the init process. */
  readonly execId: string;
  readonly status: ProcessStatus;
  readonly pid: number;
  readonly exit: ExitInfo | undefined;
  readonly stdio: { stdin: string; stdout: string; stderr: string; terminal: boolean };
  start(): Promise<number>;
  kill(signal: number, all: boolean): Promise<void>;
  /** Resolves at exit. */
  wait(): Promise<ExitInfo>;
  delete(): Promise<ExitInfo>;
  closeStdin(): Promise<void>;
  /** ResizePty; FailedPrecondition when the process has no terminal. */
  resizePty(size: ConsoleSize): void;
}

/** ResizePty on a process's stdio: only a terminal can. */
export function resizeIo(io: OpenStdio | TerminalIo, size: ConsoleSize): void {
  if (!(io instanceof TerminalIo)) throw new ShimError('FailedPrecondition', 'the process has no terminal: cannot resize it');
  io.resize(size);
}
