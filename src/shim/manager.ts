import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, constants as fsConstants, openSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import type { ShimFlags } from '../cli/shim-flags.js';
import { writeFileAtomic } from '../atomic-file.js';
import { ShimError } from '../errors.js';
import { silentLogger, type Logger } from '../log/logger.js';
import { isDebugLevel, mayBeBootstrap, parseStartInput, startReply, type StartInput } from './bootstrap.js';
import { canConnect, DEFAULT_SOCKET_DIR, groupKeyOf, removeSocket, socketAddress, socketPathOf } from './socket.js';
import { RUNTIME_NAME, shimVersion } from './version.js';

/** Files containerd and thaw keep in the bundle. */
export const BUNDLE_FILES = {
  address: 'address',
  shimPid: 'shim.pid',
  log: 'log',
  spec: 'config.json',
  /**
   * The serialized DeleteResponse of the task's own Delete RPC, written by the server once the
   * task is gone: containerd 1.6/1.7 run `delete` after every shim exit, a clean one included, and
   * `ctr run --rm` waits for it; with this file it answers without config, engines or protobuf.
   */
  deleted: 'thaw-deleted.pb',
} as const;
/** Env var telling `serve` which fd to report readiness on (set only by our `start`). */
export const READY_FD_ENV = 'THAW_READY_FD';
/** Env var carrying legacy runtime options (base64) that `start` left to `serve` to decode. */
export const RUNTIME_OPTIONS_ENV = 'THAW_RUNTIME_OPTIONS';

/** How `start` execs `serve`: by default this same program (node + its script). */
export interface ServeCommand {
  readonly file: string;
  readonly args: readonly string[];
}

/**
 * V8 flags of the long-lived server, for its memory (VmRSS with one container on the dev VM: 72 MB
 * without them, 59 MB with them): young-generation semi-spaces of 1 MiB instead of up to 16, and no
 * optimizing or baseline compiler, whose code (and the node binary's pages it touches) the server
 * does not need: its JS work is small requests, while hashing and page I/O run in native code or
 * WebAssembly, which these flags leave alone. Not --lite-mode or --jitless: they turn WebAssembly
 * off, which the xxhash fallback needs.
 */
export const SERVE_NODE_FLAGS: readonly string[] = ['--max-semi-space-size=1', '--no-opt', '--no-sparkplug'];

export function defaultServeCommand(): ServeCommand {
  const script = process.argv[1];
  if (script === undefined) throw new ShimError('Internal', 'cannot locate the shim script to exec serve');
  // A server booting a spare already runs with these flags.
  return { file: process.execPath, args: [...new Set([...process.execArgv, ...SERVE_NODE_FLAGS]), script] };
}

export interface StartOptions {
  readonly flags: Pick<ShimFlags, 'namespace' | 'address' | 'publishBinary' | 'id' | 'debug'>;
  /** Everything containerd wrote to stdin. */
  readonly stdin: Uint8Array;
  /** The bundle (start's working directory). */
  readonly bundle: string;
  readonly env?: NodeJS.ProcessEnv;
  /** Overrides BootstrapParams.socket_dir and the default /run/containerd/s (tests). */
  readonly socketDir?: string;
  readonly serveCommand?: ServeCommand;
  /** fd for serve's stdout+stderr (the bundle's log FIFO); undefined = /dev/null. Never the reply pipe. */
  readonly serveOutputFd?: number;
  readonly readyTimeoutMs?: number;
  readonly log?: Logger;
}

export interface StartResult {
  readonly address: string;
  /** The new server's pid; undefined when an existing server of the group was reused. */
  readonly pid: number | undefined;
  /** What to print on stdout: the address, or a BootstrapResult for containerd 2.3+. */
  readonly reply: Uint8Array;
}

/** What `start` decided before launching anything; a claimed spare acts on the same plan. */
export interface StartPlan {
  readonly address: string;
  /** What to print on stdout: the address, or a BootstrapResult for containerd 2.3+. */
  readonly reply: Uint8Array;
  /** A server of the container's group already answers at the address. */
  readonly running: boolean;
  /** The flags of the `serve` that is to listen at the address. */
  readonly serveFlags: ServeFlags;
  /** Legacy runtime options left undecoded for `serve` (see mayBeBootstrap). */
  readonly runtimeOptions: Uint8Array | undefined;
  /** containerd 2.3+'s ttrpc address, which replaces TTRPC_ADDRESS. */
  readonly ttrpcAddress: string | undefined;
}

export type ServeFlags = Pick<ShimFlags, 'namespace' | 'id' | 'address' | 'publishBinary' | 'socket' | 'configPath' | 'debug'>;

/** Decides where this container's server listens and whether one already does there. */
export async function planStart(opts: Pick<StartOptions, 'flags' | 'stdin' | 'bundle' | 'socketDir'>): Promise<StartPlan> {
  const { flags, bundle } = opts;
  requireFlag(flags.namespace, 'namespace');
  requireFlag(flags.id, 'id');
  // Legacy runtime options go to serve undecoded: serve loads protobuf anyway, start would only for this.
  const undecoded = opts.stdin.byteLength > 0 && !mayBeBootstrap(opts.stdin, flags.id) ? opts.stdin : undefined;
  const input: StartInput = undecoded
    ? { protocol: 'legacy', options: { configPath: '', raw: undefined, options: undefined } }
    : await parseStartInput(opts.stdin, { id: flags.id, namespace: flags.namespace });
  const params = input.protocol === 'bootstrap' ? input.params : undefined;
  const grpcAddress = params?.containerdGrpcAddress || flags.address;
  requireFlag(grpcAddress, 'address');
  const annotations = await readAnnotations(bundle);
  const address = socketAddress({
    grpcAddress,
    namespace: flags.namespace,
    groupKey: groupKeyOf(annotations, flags.id),
    socketDir: opts.socketDir ?? params?.socketDir ?? DEFAULT_SOCKET_DIR,
  });
  const reply = await startReply(input, address);
  const running = await canConnect(address);
  if (!running) await removeSocket(address); // stale socket of a dead server
  return {
    address,
    reply,
    running,
    serveFlags: {
      namespace: flags.namespace,
      id: flags.id,
      address: grpcAddress,
      publishBinary: params?.containerdBinary || flags.publishBinary,
      socket: socketPathOf(address),
      configPath: input.options.configPath,
      debug: flags.debug || (params !== undefined && isDebugLevel(params.logLevel)),
    },
    runtimeOptions: undecoded,
    ttrpcAddress: params?.containerdTtrpcAddress || undefined,
  };
}

/** `serve`'s argv for the flags of a plan. */
export function serveArgs(flags: ServeFlags): string[] {
  return [
    '-namespace', flags.namespace,
    '-id', flags.id,
    '-address', flags.address,
    '-publish-binary', flags.publishBinary,
    '-socket', flags.socket,
    ...(flags.configPath ? ['-config-path', flags.configPath] : []),
    ...(flags.debug ? ['-debug'] : []),
    'serve',
  ];
}

/** The bundle files `start` leaves for containerd: the address, and the server's pid when it launched one. */
export async function writeStartFiles(bundle: string, address: string, pid: number | undefined): Promise<void> {
  await Promise.all([
    writeFileAtomic(path.join(bundle, BUNDLE_FILES.address), address),
    pid === undefined ? undefined : writeFileAtomic(path.join(bundle, BUNDLE_FILES.shimPid), String(pid)),
  ]);
}

/**
 * `start`: find or launch the server for this container's group and return its address.
 * containerd reads everything on stdout+stderr as the reply and waits for the pipe to close,
 * so the server is detached (own session) and gets the log FIFO or /dev/null as its stdio.
 */
export async function start(opts: StartOptions): Promise<StartResult> {
  const { bundle, log = silentLogger } = opts;
  const plan = await planStart(opts);
  const { address, reply } = plan;
  const logged = log.child({ id: opts.flags.id });
  if (plan.running) {
    logged.info({ address }, 'reusing the running shim of this group');
    await writeStartFiles(bundle, address, undefined);
    return { address, pid: undefined, reply };
  }

  const env = opts.env ?? process.env;
  const command = opts.serveCommand ?? defaultServeCommand();
  const childEnv: NodeJS.ProcessEnv = { ...env, [READY_FD_ENV]: '3' };
  if (plan.runtimeOptions) childEnv[RUNTIME_OPTIONS_ENV] = Buffer.from(plan.runtimeOptions).toString('base64');
  if (plan.ttrpcAddress) childEnv.TTRPC_ADDRESS = plan.ttrpcAddress;
  const output = opts.serveOutputFd ?? 'ignore';
  const child = spawn(command.file, [...command.args, ...serveArgs(plan.serveFlags)], {
    cwd: bundle,
    env: childEnv,
    detached: true, // setsid: containerd's process group signals must not reach the server
    stdio: ['ignore', output, output, 'pipe'],
  });
  const outcome = await waitReady(child, opts.readyTimeoutMs ?? 30_000);
  child.unref();
  if (outcome === 'exists') {
    // Another start of the same group won the race for the socket.
    logged.info({ address }, 'group server started concurrently; reusing it');
    await writeStartFiles(bundle, address, undefined);
    return { address, pid: undefined, reply };
  }
  const pid = child.pid!;
  await writeStartFiles(bundle, address, pid);
  logged.info({ address, shimPid: pid }, 'shim server started');
  return { address, pid, reply };
}

/** Called by `delete` for a task whose shim died; the Task owner cleans sandbox and mounts. */
export type CleanupDeadTask = (
  bundle: string,
  id: string,
  ctx: { readonly namespace: string; readonly log: Logger },
) => Promise<DeadTaskStatus | void>;

export interface DeadTaskStatus {
  readonly pid?: number;
  readonly exitStatus?: number;
  readonly exitedAt?: Date;
}

export interface DeleteOptions {
  readonly flags: Pick<ShimFlags, 'namespace' | 'id' | 'bundle'>;
  /** -bundle, else the working directory. */
  readonly bundle: string;
  readonly cleanupDeadTask?: CleanupDeadTask;
  readonly log?: Logger;
}

/** What containerd's runc shim reports for a task whose shim died: killed (128 + SIGKILL). */
export const DEAD_TASK_EXIT_STATUS = 137;

/**
 * `delete`: containerd lost the shim (it died); clean up after it and return the serialized
 * DeleteResponse to print on stdout. The task-specific part is the injected cleanupDeadTask; here
 * only the group's socket is removed, and only if nothing answers on it any more.
 */
export async function deleteDeadShim(opts: DeleteOptions): Promise<Uint8Array> {
  const { flags, bundle, log = silentLogger } = opts;
  requireFlag(flags.namespace, 'namespace');
  requireFlag(flags.id, 'id');
  const logged = log.child({ id: flags.id });
  const status = (await opts.cleanupDeadTask?.(bundle, flags.id, { namespace: flags.namespace, log: logged })) ?? {};
  const address = await readFile(path.join(bundle, BUNDLE_FILES.address), 'utf8').then(
    (text) => text.trim(),
    () => '',
  );
  if (address !== '' && !(await canConnect(address))) {
    await removeSocket(address).catch((err: unknown) => logged.warn({ err, address }, 'remove dead shim socket failed'));
  }
  // Protobuf is loaded on demand (see bootstrap.ts); delete and -info are rare, short-lived verbs.
  const [{ create, toBinary }, { DeleteResponseSchema }, { toTimestamp }] = await Promise.all([
    import('@bufbuild/protobuf'),
    import('../gen/containerd/task/v2/shim_pb.js'),
    import('../wire/timestamp.js'),
  ]);
  return toBinary(
    DeleteResponseSchema,
    create(DeleteResponseSchema, {
      pid: status.pid ?? 0,
      exitStatus: status.exitStatus ?? DEAD_TASK_EXIT_STATUS,
      exitedAt: toTimestamp(status.exitedAt ?? new Date()),
    }),
  );
}

/**
 * `delete` of a task whose server already deleted it (BUNDLE_FILES.deleted): that Delete's answer;
 * undefined when the task may have left something behind (then deleteDeadShim).
 */
export async function deletedTaskReply(bundle: string): Promise<Uint8Array | undefined> {
  return readFile(path.join(bundle, BUNDLE_FILES.deleted)).catch(() => undefined);
}

/**
 * `-info` (containerd 2.x introspection): runtime options Any on stdin, RuntimeInfo on stdout.
 * thaw has no `features` document (runc's comes from `runc features`), so that field stays unset.
 */
export async function runtimeInfo(stdin: Uint8Array): Promise<Uint8Array> {
  const [{ create, toBinary }, { RuntimeInfoSchema }, { decodeAny }] = await Promise.all([
    import('@bufbuild/protobuf'),
    import('../gen/containerd/types/introspection_pb.js'),
    import('../wire/any.js'),
  ]);
  const options = stdin.byteLength > 0 ? decodeAny(stdin) : undefined;
  return toBinary(
    RuntimeInfoSchema,
    create(RuntimeInfoSchema, { name: RUNTIME_NAME, version: { version: shimVersion(), revision: '' }, options }),
  );
}

/** `-v`, in the layout of containerd's shims. */
export function versionText(binaryName: string): string {
  return `${binaryName}:\n  Version:  ${shimVersion()}\n  Revision: \n  Node version: ${process.version}\n\n`;
}

/**
 * Opens the bundle's `log` FIFO for writing without blocking (containerd holds its read end);
 * undefined when there is no FIFO or no reader.
 */
export function openShimLog(bundle: string): number | undefined {
  try {
    return openSync(path.join(bundle, BUNDLE_FILES.log), fsConstants.O_WRONLY | fsConstants.O_NONBLOCK);
  } catch {
    return undefined;
  }
}

export function closeFd(fd: number | undefined): void {
  if (fd !== undefined) {
    try {
      closeSync(fd);
    } catch {
      // already closed
    }
  }
}

async function readAnnotations(bundle: string): Promise<Record<string, string> | undefined> {
  const file = path.join(bundle, BUNDLE_FILES.spec);
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw new ShimError('NotFound', `read ${file} failed: ${(err as Error).message}`, { cause: err });
  }
  try {
    const spec = JSON.parse(text) as { annotations?: Record<string, string> };
    return spec.annotations;
  } catch (err) {
    throw new ShimError('InvalidArgument', `parse ${file} failed: ${(err as Error).message}`, { cause: err });
  }
}

/**
 * Waits for serve's first line on fd 3: "ready", "exists" (another server holds the socket) or
 * "error: <message>". The child is killed if it says nothing within timeoutMs.
 */
function waitReady(child: ChildProcess, timeoutMs: number): Promise<'ready' | 'exists'> {
  const pipe = child.stdio[3];
  return new Promise((resolve, reject) => {
    let text = '';
    let settled = false;
    const settle = (fn: () => void): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      child.off('exit', onExit);
      child.off('error', onError);
      pipe?.removeAllListeners('data');
      pipe?.destroy();
      fn();
    };
    const onExit = (code: number | null, signal: NodeJS.Signals | null): void =>
      settle(() => reject(new ShimError('Unavailable', `shim server exited (${signal ?? `code ${code}`}) before listening${text ? `: ${text.trim()}` : ''}`)));
    const onError = (err: Error): void =>
      settle(() => reject(new ShimError('Unavailable', `exec shim server failed: ${err.message}`, { cause: err })));
    const timer = setTimeout(() => {
      settle(() => {
        child.kill('SIGKILL');
        reject(new ShimError('DeadlineExceeded', `shim server did not listen within ${timeoutMs} ms`));
      });
    }, timeoutMs);
    child.once('exit', onExit);
    child.once('error', onError);
    pipe?.on('data', (chunk: Buffer) => {
      text += chunk.toString();
      const nl = text.indexOf('\n');
      if (nl < 0) return;
      const line = text.slice(0, nl);
      if (line === 'ready' || line === 'exists') settle(() => resolve(line));
      else settle(() => reject(new ShimError('Unavailable', `shim server failed: ${line.replace(/^error: /, '')}`)));
    });
  });
}

function requireFlag(value: string, name: string): void {
  if (value === '') throw new ShimError('InvalidArgument', `shim ${name} cannot be empty`);
}
