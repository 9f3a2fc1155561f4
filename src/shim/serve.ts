import { closeSync, writeSync } from 'node:fs';
import { Task } from '../gen/containerd/task/v2/shim_pb.js';
import type { ShimFlags } from '../cli/shim-flags.js';
import { isShimError, ShimError } from '../errors.js';
import { silentLogger, type Logger } from '../log/logger.js';
import { Publisher } from '../task/publisher.js';
import { TtrpcServer, type ServiceImpl } from '../ttrpc/server.js';
import { configPathOfOptions } from './bootstrap.js';
import { canConnect, removeSocket, socketAddress, socketPathOf } from './socket.js';
import { ShutdownService } from './shutdown.js';
import { shimVersion } from './version.js';

/** Everything the Task service gets from the shim binary. */
export interface TaskServiceContext {
  readonly id: string;
  readonly namespace: string;
  /** The bundle of the container whose `start` launched this server (the working directory). */
  readonly bundle: string;
  readonly grpcAddress: string;
  /** containerd's ttrpc address (TTRPC_ADDRESS); undefined when containerd did not set it. */
  readonly ttrpcAddress: string | undefined;
  readonly publishBinary: string;
  readonly debug: boolean;
  /** runtimeoptions.v1.Options.config_path from `start`; undefined = thaw's default location. */
  readonly configPath: string | undefined;
  /** thaw's version (for ConnectResponse.version). */
  readonly version: string;
  /** Queue task events here; it never blocks. */
  readonly publisher: Publisher;
  /** Register undo callbacks; call shutdown() from Shutdown once no task is left. */
  readonly shutdown: ShutdownService;
  readonly log: Logger;
  /**
   * Resolves once the server listens and `start` was told so: work deferred to here (loading the
   * runtime) runs while `start` exits and containerd dials, not before `start` can answer.
   */
  readonly listening: Promise<void>;
  /**
   * Ask for a spare server for the next container (src/shim/spare.ts), if this binary can; the Task
   * service calls it once loaded and once a Start or Delete was answered, when the config's
   * `shim.spare` is on (SpareRequests decides when a spare boots).
   */
  readonly requestSpare?: (moment: SpareMoment) => void;
}

/** When the Task service asks for a spare: its service has loaded, or a Start or Delete was answered. */
export type SpareMoment = 'loaded' | 'answered';

/** A Task service implementation; methods left out answer Unimplemented (12). */
export type TaskServiceImpl = Partial<ServiceImpl<typeof Task>>;
export type CreateTaskService = (ctx: TaskServiceContext) => TaskServiceImpl | Promise<TaskServiceImpl>;

export interface ServeDeps {
  readonly createTaskService: CreateTaskService;
}

export interface ServeOptions {
  readonly flags: Pick<ShimFlags, 'namespace' | 'id' | 'address' | 'publishBinary' | 'socket' | 'configPath' | 'debug'>;
  readonly bundle: string;
  readonly env?: NodeJS.ProcessEnv;
  readonly log?: Logger;
  /** fd on which `start` waits for "ready" / "exists" / "error: …" (env THAW_READY_FD). */
  readonly readyFd?: number;
  /** Legacy runtime options `start` did not decode (env THAW_RUNTIME_OPTIONS); their config path wins. */
  readonly runtimeOptions?: Uint8Array;
  /** Turn SIGTERM/SIGINT into a shutdown (the CLI does; tests don't). */
  readonly handleSignals?: boolean;
  readonly shutdownTimeoutMs?: number;
  /** See TaskServiceContext.requestSpare. */
  readonly requestSpare?: (moment: SpareMoment) => void;
}

export interface ShimServer {
  readonly address: string;
  readonly server: TtrpcServer;
  readonly publisher: Publisher;
  readonly shutdown: ShutdownService;
  /** Resolves when shutdown finished; the caller then exits (or, a recycled spare, waits again). */
  readonly done: Promise<void>;
  /** The thaw config file this server's Task service read (runtime options or -config), if any. */
  readonly configPath: string | undefined;
}

/**
 * `serve`: the long-lived shim server. Listens on the group's socket, serves the Task service the
 * factory builds, forwards events, and shuts down through ShutdownService (Shutdown RPC or signal).
 */
export async function serve(options: ServeOptions, deps: ServeDeps): Promise<ShimServer> {
  const { flags, bundle, env = process.env, log = silentLogger } = options;
  try {
    if (flags.namespace === '') throw new ShimError('InvalidArgument', 'shim namespace cannot be empty');
    const socketPath =
      flags.socket !== ''
        ? flags.socket
        : socketPathOf(socketAddress({ grpcAddress: flags.address, namespace: flags.namespace, groupKey: flags.id }));
    const address = `unix://${socketPath}`;
    const shutdown = new ShutdownService({ log, timeoutMs: options.shutdownTimeoutMs });
    const ttrpcAddress = env.TTRPC_ADDRESS || undefined;
    const publisher = new Publisher({ address: ttrpcAddress, namespace: flags.namespace, log });
    let listened = (): void => undefined;
    const listening = new Promise<void>((resolve) => (listened = resolve));
    const configPath = (options.runtimeOptions ? await configPathOfOptions(options.runtimeOptions) : flags.configPath) || undefined;
    const impl = await deps.createTaskService({
      id: flags.id,
      namespace: flags.namespace,
      bundle,
      grpcAddress: flags.address,
      ttrpcAddress,
      publishBinary: flags.publishBinary,
      debug: flags.debug,
      configPath,
      version: shimVersion(),
      publisher,
      shutdown,
      log,
      listening,
      requestSpare: options.requestSpare,
    });
    const server = new TtrpcServer({ log });
    server.registerService(Task, impl);
    await listenReplacingStale(server, socketPath);
    shutdown.register('ttrpc server', async () => {
      await server.close();
      await removeSocket(address);
    });
    shutdown.register('event publisher', () => publisher.drain());
    if (options.handleSignals) watchSignals(shutdown);
    report(options.readyFd, 'ready');
    log.info({ address }, 'shim serving');
    listened();
    return { address, server, publisher, shutdown, done: shutdown.done, configPath };
  } catch (err) {
    report(options.readyFd, isShimError(err, 'AlreadyExists') ? 'exists' : `error: ${(err as Error).message}`);
    throw err;
  }
}

/** Binds the socket; a leftover file nobody answers on is removed, a live one means another server. */
async function listenReplacingStale(server: TtrpcServer, socketPath: string): Promise<void> {
  try {
    await server.listen(socketPath);
  } catch (err) {
    if (!isShimError(err, 'AlreadyExists')) throw err;
    if (await canConnect(socketPath)) throw new ShimError('AlreadyExists', `a shim server already listens on ${socketPath}`, { cause: err });
    await removeSocket(socketPath);
    await server.listen(socketPath);
  }
}

function watchSignals(shutdown: ShutdownService): void {
  const onSignal = (signal: NodeJS.Signals): void => void shutdown.shutdown(`received ${signal}`);
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  void shutdown.done.then(() => {
    process.off('SIGTERM', onSignal);
    process.off('SIGINT', onSignal);
  });
}

function report(fd: number | undefined, line: string): void {
  if (fd === undefined) return;
  try {
    writeSync(fd, `${line.replace(/\n/g, ' ')}\n`);
    closeSync(fd);
  } catch {
    // start gave up waiting, or we were not started by start
  }
}
