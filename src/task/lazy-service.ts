import { Task } from '../gen/containerd/task/v2/shim_pb.js';
import { loadConfig } from '../config/config.js';
import { ShimError } from '../errors.js';
import type { CallContext } from '../ttrpc/server.js';
import type { CreateTaskService, TaskServiceContext, TaskServiceImpl } from '../shim/serve.js';

type Handler = (request: unknown, call: CallContext) => unknown;

/**
 * The Task service as `serve` creates it: the config is read now (a bad one still fails `start`
 * with its message), while the service itself — engines, snapshot store, I/O addon, execa and the
 * rest of what service.ts imports, about half of the server's start-up — is loaded once the server
 * listens, alongside `start` exiting and containerd dialling, instead of before `start` can
 * answer. Calls that arrive earlier wait for it. If it cannot be loaded, every call fails with
 * that error, except Connect and Shutdown, so that containerd can still stop the server.
 */
export const createLazyTaskService: CreateTaskService = async (ctx) => {
  const config = await loadConfig(ctx.configPath);
  let loading: Promise<TaskServiceImpl> | undefined;
  const load = (): Promise<TaskServiceImpl> => {
    if (loading === undefined) {
      loading = import('./service.js').then(({ taskServiceFor }) => taskServiceFor(ctx, config));
      loading.catch((err: unknown) => {
        ctx.log.error({ err }, 'loading the Task service failed');
        loading = undefined; // the next call tries again
      });
    }
    return loading;
  };
  const requestSpare = config.shim.spare ? ctx.requestSpare : undefined;
  void ctx.listening.then(() =>
    load().then(
      () => requestSpare?.('loaded'),
      () => undefined,
    ),
  );

  const handlers: Record<string, Handler> = {};
  for (const method of Task.methods) {
    handlers[method.localName] = async (request, call) => {
      const impl = (await load()) as Record<string, Handler | undefined>;
      const fn = impl[method.localName];
      if (fn === undefined) throw new ShimError('NotImplemented', `${Task.typeName}.${method.name} is not implemented`);
      return fn.call(impl, request, call);
    };
  }
  if (requestSpare !== undefined) {
    // Asked for again once this container's Start (or, after a failed Create, its Delete) was
    // answered: SpareRequests (src/shim/spare.ts) boots the next spare then, not during Create,
    // unless `start`s lately found none waiting.
    const afterAnswer = (): void => void setImmediate(() => requestSpare('answered')); // the answer goes out first
    for (const name of ['start', 'delete'] as const) {
      const handle = handlers[name]!;
      handlers[name] = (request, call) => {
        const answer = Promise.resolve(handle(request, call));
        void answer.then(afterAnswer, afterAnswer);
        return answer;
      };
    }
  }
  handlers.connect = async (request, call) => (await withService(load, ctx)).connect(request, call);
  handlers.shutdown = async (request, call) => (await withService(load, ctx)).shutdown(request, call);
  return handlers as TaskServiceImpl;
};

/** Connect and Shutdown of the loaded service, or of a server whose service failed to load (it has no tasks). */
async function withService(load: () => Promise<TaskServiceImpl>, ctx: TaskServiceContext): Promise<{ connect: Handler; shutdown: Handler }> {
  try {
    const impl = (await load()) as Record<string, Handler | undefined>;
    const connect = impl.connect;
    const shutdown = impl.shutdown;
    if (connect !== undefined && shutdown !== undefined) return { connect: connect.bind(impl), shutdown: shutdown.bind(impl) };
  } catch {
    // fall through: answer for a server without tasks
  }
  return {
    connect: () => ({ shimPid: process.pid, taskPid: 0, version: ctx.version }),
    shutdown: () => {
      setImmediate(() => void ctx.shutdown.shutdown('Shutdown RPC'));
      return {};
    },
  };
}
