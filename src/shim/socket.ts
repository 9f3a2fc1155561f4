import { createHash } from 'node:crypto';
import { unlink } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { ShimError } from '../errors.js';
import { socketPathOf } from '../ttrpc/address.js';

/** containerd's shim socket directory (`<defaults.DefaultStateDir>/s`); 2.3+ may pass another. */
export const DEFAULT_SOCKET_DIR = '/run/containerd/s';
/** Usable bytes of sockaddr_un.sun_path on Linux (108 minus NUL, as containerd counts). */
export const SOCKET_PATH_LIMIT = 106;
/** CRI puts this annotation on every container of a pod; one shim then serves the whole pod. */
export const SANDBOX_ID_ANNOTATION = 'io.kubernetes.cri.sandbox-id';

export interface SocketAddressOptions {
  /** containerd's grpc address as passed with `-address` (not the .ttrpc one). */
  grpcAddress: string;
  namespace: string;
  groupKey: string;
  /** containerd appends "/debug" for the debug socket. */
  debug?: boolean;
  socketDir?: string;
}

/**
 * The shim's socket address, the way containerd's shim library derives it:
 * `unix://<socketDir>/<hex sha256(filepath.Join(grpcAddress, namespace, groupKey[, "debug"]))>`.
 * E.g. grpc address "/run/containerd/containerd.sock", namespace "default", group "abc" hashes
 * the string "/run/containerd/containerd.sock/default/abc".
 */
export function socketAddress({ grpcAddress, namespace, groupKey, debug = false, socketDir = DEFAULT_SOCKET_DIR }: SocketAddressOptions): string {
  const elements = [grpcAddress, namespace, groupKey];
  if (debug) elements.push('debug');
  const digest = createHash('sha256').update(goJoin(elements)).digest('hex');
  const socketPath = path.posix.join(socketDir, digest);
  if (Buffer.byteLength(socketPath) > SOCKET_PATH_LIMIT) {
    throw new ShimError('InvalidArgument', `socket path ${socketPath} is longer than ${SOCKET_PATH_LIMIT} bytes`);
  }
  return `unix://${socketPath}`;
}

/** The group a container's shim serves: its CRI sandbox when it has one, else itself. */
export function groupKeyOf(annotations: Readonly<Record<string, string>> | undefined, id: string): string {
  const sandbox = annotations?.[SANDBOX_ID_ANNOTATION];
  return sandbox !== undefined && sandbox !== '' ? sandbox : id;
}

/** Whether something accepts connections at the address (containerd's CanConnect, 100 ms). */
export function canConnect(address: string, timeoutMs = 100): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.createConnection({ path: socketPathOf(address) });
    const done = (ok: boolean): void => {
      clearTimeout(timer);
      socket.destroy();
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), timeoutMs);
    socket.once('connect', () => done(true));
    socket.once('error', () => done(false));
  });
}

/** Removes the socket file of an address; a missing file is fine. */
export async function removeSocket(address: string): Promise<void> {
  try {
    await unlink(socketPathOf(address));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
}

export { socketPathOf };

/** Go's filepath.Join: empty elements are skipped and the result is Clean()ed (no trailing slash). */
function goJoin(elements: readonly string[]): string {
  const joined = elements.filter((e) => e !== '').join('/');
  if (joined === '') return '';
  const cleaned = path.posix.normalize(joined);
  return cleaned.length > 1 && cleaned.endsWith('/') ? cleaned.slice(0, -1) : cleaned;
}
