import { createHash, randomBytes } from 'node:crypto';
import { chmod, mkdir, readFile, rename, rm, stat, unlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ShimError } from '../errors.js';

/**
 * The per-container control directory: a host directory bind-mounted into the container at
 * /run/thaw. It holds the control socket (thaw.sock), the signal file the app creates
 * (checkpoint-now), and the files thaw writes for the app (status, restored, env).
 *
 * The mount is added to the bundle's config.json before the container is planned, identically
 * every time (same destination, type and options; only the per-container source differs), because
 * mount destinations and types are part of the snapshot key and a restore needs the same mounts.
 * The app must not keep files here open across a checkpoint: gVisor reopens open files by path on
 * restore, and a restored copy has a fresh directory.
 */
export const CONTROL_MOUNT_POINT = '/run/thaw';

export const CONTROL_FILES = {
  /** HTTP on a unix socket: POST /checkpoint, GET /checkpoint/status. */
  socket: 'thaw.sock',
  /** Created by the app to ask for a checkpoint (on-request); thaw removes it. */
  signal: 'checkpoint-now',
  /** JSON, the same document as GET /checkpoint/status; rewritten atomically. */
  status: 'status',
  /** JSON `{restoredAt, snapshot, restoreMs}`, only in restored copies. */
  restored: 'restored',
  /** NAME=value lines: restore-time values of the env vars left out of the snapshot key. */
  env: 'env',
} as const;

/** sun_path holds 108 bytes including the NUL. */
const MAX_SOCKET_PATH = 107;

/** `<stateDir>/ctl/<16 hex of sha256(namespace, id)>`: short, so the socket path fits sun_path. */
export function controlDirFor(stateDir: string, namespace: string, id: string): string {
  const h = createHash('sha256').update(`${namespace}\0${id}`).digest('hex').slice(0, 16);
  return join(stateDir, 'ctl', h);
}

/** The mount thaw adds; a function so every caller builds the very same entry. */
export function controlMount(hostDir: string): { destination: string; type: string; source: string; options: string[] } {
  return { destination: CONTROL_MOUNT_POINT, type: 'bind', source: hostDir, options: ['rbind', 'rw'] };
}

/**
 * Adds the /run/thaw bind mount of `hostDir` to `<bundle>/config.json` (atomic rewrite). Idempotent
 * for the same `hostDir`; a spec that already mounts something else at /run/thaw is refused.
 */
export async function addControlMount(bundle: string, hostDir: string): Promise<void> {
  const path = join(bundle, 'config.json');
  const spec = JSON.parse(await readFile(path, 'utf8')) as { mounts?: unknown[] };
  const mounts = Array.isArray(spec.mounts) ? spec.mounts : [];
  const existing = mounts.find((m) => (m as { destination?: unknown }).destination === CONTROL_MOUNT_POINT) as { source?: unknown } | undefined;
  if (existing) {
    if (existing.source === hostDir) return;
    throw new ShimError('InvalidArgument', `bundle ${bundle}: the spec already mounts ${CONTROL_MOUNT_POINT} (${String(existing.source)}), which thaw needs for its control directory`);
  }
  spec.mounts = [...mounts, controlMount(hostDir)];
  const tmp = `${path}.thaw-${randomBytes(4).toString('hex')}.tmp`;
  await writeFile(tmp, JSON.stringify(spec, null, 2));
  await rename(tmp, path);
}

/** Files in one control directory (host side). */
export class ControlDir {
  constructor(readonly path: string) {}

  get socketPath(): string {
    return join(this.path, CONTROL_FILES.socket);
  }

  get signalPath(): string {
    return join(this.path, CONTROL_FILES.signal);
  }

  /** Creates the directory (world-readable: the app may run as any user) with no files in it. */
  async create(): Promise<void> {
    if (Buffer.byteLength(this.socketPath) > MAX_SOCKET_PATH) {
      throw new ShimError('InvalidArgument', `control socket path ${this.socketPath} is longer than ${MAX_SOCKET_PATH} bytes: use a shorter stateDir`);
    }
    await rm(this.path, { recursive: true, force: true });
    await mkdir(this.path, { recursive: true, mode: 0o755 });
    // The app may run as any uid and must be able to create the signal file.
    await chmod(this.path, 0o1777);
  }

  /** Writes `name` atomically (temp file + rename), so the app never reads half a file. */
  async write(name: string, text: string): Promise<void> {
    const tmp = join(this.path, `.${name}.${randomBytes(4).toString('hex')}.tmp`);
    await writeFile(tmp, text, { mode: 0o644 });
    await rename(tmp, join(this.path, name));
  }

  async writeJson(name: string, value: unknown): Promise<void> {
    await this.write(name, `${JSON.stringify(value)}\n`);
  }

  /** Removes the signal file; true when it was there. */
  async takeSignal(): Promise<boolean> {
    try {
      await unlink(this.signalPath);
      return true;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
      throw err;
    }
  }

  async hasSignal(): Promise<boolean> {
    return stat(this.signalPath).then(
      () => true,
      () => false,
    );
  }

  async remove(): Promise<void> {
    await rm(this.path, { recursive: true, force: true });
  }
}
