import { constants } from 'node:fs';
import { mkdir, open, stat, type FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { ShimError } from '../errors.js';
import { settledOrFirstError } from '../settled.js';
import type { StdioFds, StdioSlot } from '../engine/engine.js';

/**
 * The stdio URIs containerd passes at Create/Exec, opened as fds handed straight to the runtime
 * (runsc gives the `create` process's stdio to the sandbox, so no copy loop is needed):
 * - "" → nothing;
 * - a FIFO path (ctr's) → stdin opened read-only non-blocking (EOF reaches the app when the client
 *   closes), stdout/stderr opened read-write, which on Linux never blocks and never fails with
 *   EPIPE if the reader goes away;
 * - a plain path or file:///path → opened for appending (created, with its directory for file://);
 * - binary:// loggers are not supported yet and get a clear error.
 */
export interface StdioRequest {
  stdin: string;
  stdout: string;
  stderr: string;
  terminal: boolean;
}

export class OpenStdio {
  private constructor(
    readonly fds: StdioFds,
    private readonly handles: FileHandle[],
    private readonly stdinHandle: FileHandle | undefined,
  ) {}

  static async open(req: StdioRequest): Promise<OpenStdio> {
    if (req.terminal) {
      throw new ShimError('NotImplemented', 'terminal (pty) tasks are not supported by thaw yet: run without -t');
    }
    // The three at once: each is a few fs calls, on the path of every Create.
    const opened: FileHandle[] = [];
    const track = async (handle: Promise<FileHandle> | undefined): Promise<FileHandle | undefined> => {
      const h = await handle;
      if (h) opened.push(h);
      return h;
    };
    let stdin: FileHandle | undefined, out: FileHandle | undefined, separateErr: FileHandle | undefined;
    try {
      [stdin, out, separateErr] = await settledOrFirstError<[FileHandle | undefined, FileHandle | undefined, FileHandle | undefined]>([
        track(req.stdin ? openStdin(req.stdin) : undefined),
        track(req.stdout ? openOutput(req.stdout) : undefined),
        // ctr may give stdout and stderr one target (file://): share the fd then.
        track(req.stderr && req.stderr !== req.stdout ? openOutput(req.stderr) : undefined),
      ]);
    } catch (e) {
      await Promise.all(opened.map((h) => h.close().catch(() => undefined)));
      throw e;
    }
    const err = req.stderr && req.stderr === req.stdout ? out : separateErr;
    const slot = (h: FileHandle | undefined): StdioSlot => h?.fd ?? 'ignore';
    return new OpenStdio([slot(stdin), slot(out), slot(err)], opened, stdin);
  }

  /** CloseIO: drop our copy of stdin (the app sees EOF once the client's end closes too). */
  async closeStdin(): Promise<void> {
    if (this.stdinHandle) await this.stdinHandle.close().catch(() => undefined);
  }

  async close(): Promise<void> {
    await Promise.all(this.handles.map((h) => h.close().catch(() => undefined)));
  }
}

function pathOf(uri: string): string {
  if (uri.startsWith('file://')) return decodeURIComponent(new URL(uri).pathname);
  if (/^[a-z0-9+.-]+:\/\//i.test(uri)) {
    throw new ShimError('NotImplemented', `stdio ${uri}: only FIFOs, paths and file:// are supported`);
  }
  return uri;
}

async function isFifo(path: string): Promise<boolean> {
  try {
    return (await stat(path)).isFIFO();
  } catch {
    return false;
  }
}

async function openStdin(uri: string): Promise<FileHandle> {
  const path = pathOf(uri);
  return wrapOpen(uri, () => open(path, constants.O_RDONLY | constants.O_NONBLOCK));
}

async function openOutput(uri: string): Promise<FileHandle> {
  const path = pathOf(uri);
  if (await isFifo(path)) return wrapOpen(uri, () => open(path, constants.O_RDWR));
  if (uri.startsWith('file://')) await mkdir(dirname(path), { recursive: true });
  return wrapOpen(uri, () => open(path, constants.O_WRONLY | constants.O_APPEND | constants.O_CREAT, 0o640));
}

async function wrapOpen(uri: string, fn: () => Promise<FileHandle>): Promise<FileHandle> {
  try {
    return await fn();
  } catch (err) {
    throw new ShimError('InvalidArgument', `cannot open stdio ${uri}: ${(err as Error).message}`, { cause: err });
  }
}
