import { once } from 'node:events';
import { closeSync, constants as fsc, fstatSync, openSync } from 'node:fs';
import { mkdir, mkdtemp, open, rm } from 'node:fs/promises';
import { Socket } from 'node:net';
import { join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa } from 'execa';
import type { StdioSlot } from '../../engine/engine.js';
import { tmpDirOf } from '../../engine/runtime.js';
import type { GlobalOptions } from '../context.js';
import type { VerbResult } from '../output.js';
import { runtimeFor } from './common.js';
import { enableChildReaper } from '../../runsc/reaper.js';

interface RunArgs {
  bundle: string;
  id: string;
  detach: boolean;
  output?: string;
  cold: boolean;
}

export default async function run(args: Record<string, unknown>, global: GlobalOptions): Promise<VerbResult> {
  const a = args as unknown as RunArgs;
  const rt = await runtimeFor(global);
  // In the foreground the sandbox becomes this process's child, so its exit status is read exactly
  // and at once (runsc/reaper.ts), not from `runsc wait`. Not with --detach: the pidfds it watches
  // would keep this process alive.
  if (!a.detach) enableChildReaper({ log: rt.log });
  // O_APPEND: a restored app resumes writing at its pre-checkpoint offset otherwise (runsc).
  const output = a.output ? await open(resolve(a.output), 'a') : undefined;
  const devnull = a.detach && !output ? await open('/dev/null', 'a') : undefined;
  const relays: FifoRelay[] = [];
  const own = async (fd: 1 | 2): Promise<StdioSlot> => {
    if (!needsRelay(fd)) return fd;
    const relay = await FifoRelay.open(tmpDirOf(rt.config), fd === 1 ? process.stdout : process.stderr);
    relays.push(relay);
    return relay.writeFd;
  };
  const out: StdioSlot = output?.fd ?? devnull?.fd ?? (await own(1));
  const err: StdioSlot = output?.fd ?? devnull?.fd ?? (await own(2));
  try {
    const started = await rt.lifecycle.run({
      id: a.id,
      namespace: '',
      bundle: resolve(a.bundle),
      stdio: ['ignore', out, err],
      owner: 'cli',
      cold: a.cold,
    });
    const { record } = started;
    const json: Record<string, unknown> = {
      id: record.id,
      decision: record.decision,
      snapshot: record.decision === 'restore' ? record.snapshot : null,
      reason: record.reason,
      fallback: record.fallback,
      engine: record.engine,
      pid: record.pid,
      timings: record.timings,
    };
    const text = `${record.id}: ${record.decision} (${record.reason})`;
    if (a.detach) return { json, text };
    const engine = rt.lifecycle.engineOf(record)!;
    // The sandbox holds its own copies of the relays' write ends: drop ours so they reach EOF.
    for (const r of relays) r.closeWriter();
    const exit = await engine.wait(record.id);
    for (const r of relays) await r.drained();
    return { json: { ...json, exitStatus: exit.exitStatus }, text: '', exitCode: exit.exitStatus };
  } finally {
    await output?.close();
    await devnull?.close();
    for (const r of relays) r.close();
  }
}

/**
 * Whether thaw's own stdout/stderr must not be handed to the sandbox as is:
 * - a socket: gVisor shuts it down when the container exits, so thaw's own later writes fail with
 *   EPIPE (Node parents, journald and others hand out sockets, not pipes);
 * - a regular file: the sandbox writes at offsets of its own, and thaw's result line then
 *   overwrites the app's output (`thaw run > out.log`).
 */
function needsRelay(fd: number): boolean {
  try {
    const st = fstatSync(fd);
    return st.isSocket() || st.isFile();
  } catch {
    return false;
  }
}

/** Gives the container a FIFO instead of one of thaw's stdio fds and copies what arrives across. */
class FifoRelay {
  /** How long to wait for the sandbox to close the FIFO after the app exited. */
  static readonly DRAIN_TIMEOUT_MS = 5_000;

  private constructor(
    private readonly reader: Socket,
    private writeFdOpen: boolean,
    readonly writeFd: number,
    private readonly ended: Promise<unknown>,
  ) {}

  static async open(tmpDir: string, target: NodeJS.WritableStream): Promise<FifoRelay> {
    await mkdir(tmpDir, { recursive: true, mode: 0o700 });
    const dir = await mkdtemp(join(tmpDir, 'thaw-stdio-'));
    try {
      const path = join(dir, 'fifo');
      await execa('mkfifo', ['-m', '600', path], { timeout: 10_000 });
      // Reader first and non-blocking, so opening the write end does not block.
      const reader = new Socket({ fd: openSync(path, fsc.O_RDONLY | fsc.O_NONBLOCK), readable: true, writable: false });
      const writeFd = openSync(path, fsc.O_WRONLY);
      const ended = once(reader, 'end').catch(() => undefined);
      reader.pipe(target, { end: false });
      return new FifoRelay(reader, true, writeFd, ended);
    } finally {
      await rm(dir, { recursive: true, force: true }); // the open ends keep the FIFO alive
    }
  }

  /** Drops thaw's write end (the sandbox holds its own), so the reader sees EOF when the app is gone. */
  closeWriter(): void {
    if (this.writeFdOpen) closeSync(this.writeFd);
    this.writeFdOpen = false;
  }

  /** Resolves once the sandbox has closed its end and everything was copied (or after a timeout). */
  async drained(): Promise<void> {
    await Promise.race([this.ended, sleep(FifoRelay.DRAIN_TIMEOUT_MS)]);
  }

  close(): void {
    this.closeWriter();
    this.reader.destroy();
  }
}
