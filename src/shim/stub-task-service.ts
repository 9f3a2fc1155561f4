import type { CreateTaskService } from './serve.js';

/**
 * Placeholder Task service until src/task/service.ts exists: answers Connect and Shutdown, every
 * other method Unimplemented (12). Shutdown stops the server once the reply is on its way.
 */
export const createTaskService: CreateTaskService = (ctx) => ({
  connect: () => ({ shimPid: process.pid, taskPid: 0, version: ctx.version }),
  shutdown: () => {
    // No tasks ever exist here, so Shutdown always proceeds.
    setImmediate(() => void ctx.shutdown.shutdown('Shutdown RPC'));
    return {};
  },
});
