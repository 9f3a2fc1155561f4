/**
 * Undo steps for world-changing work. Each step that changes the world registers its undo; on
 * scope exit (`await using`) the steps run in reverse order unless the work succeeded and called
 * `release()`. Undo failures are collected, never thrown over the original error.
 */
export type UndoStep = () => unknown | Promise<unknown>;

export interface CleanupFailure {
  name: string;
  err: unknown;
}

export class Cleanup implements AsyncDisposable {
  readonly #steps: { name: string; undo: UndoStep }[] = [];
  #released = false;
  readonly failures: CleanupFailure[] = [];

  constructor(private readonly onFailure?: (f: CleanupFailure) => void) {}

  /** Registers an undo step; returns the same name for logging. */
  add(name: string, undo: UndoStep): void {
    this.#steps.push({ name, undo });
  }

  /** Keeps everything done so far: the undo steps will not run. */
  release(): void {
    this.#released = true;
  }

  get released(): boolean {
    return this.#released;
  }

  /** Runs the undo steps now (reverse order), regardless of release. */
  async run(): Promise<void> {
    while (this.#steps.length > 0) {
      const step = this.#steps.pop()!;
      try {
        await step.undo();
      } catch (err) {
        const failure = { name: step.name, err };
        this.failures.push(failure);
        this.onFailure?.(failure);
      }
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    if (this.#released) {
      this.#steps.length = 0;
      return;
    }
    await this.run();
  }
}
