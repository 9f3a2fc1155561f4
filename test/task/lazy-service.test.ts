import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import type { CreateTaskService, TaskServiceContext, TaskServiceImpl } from '../../src/shim/serve.js';
import type { CallContext } from '../../src/ttrpc/server.js';
import { fakeShim } from './fake-runtime.js';

const call = {} as CallContext;

/** lazy-service.ts with service.js replaced: `taskServiceFor` is the test's. */
async function lazyWith(t: Test, taskServiceFor: (ctx: TaskServiceContext) => Promise<TaskServiceImpl>): Promise<CreateTaskService> {
  const mod = await t.mockImport<typeof import('../../src/task/lazy-service.js')>('../../src/task/lazy-service.js', {
    '../../src/task/service.js': { taskServiceFor },
  });
  return mod.createLazyTaskService;
}

function context(t: Test, configText = '{}') {
  const dir = t.testdir();
  const configPath = join(dir, 'thaw.json');
  writeFileSync(configPath, configText);
  const shim = fakeShim({ configPath });
  let listened = (): void => undefined;
  const listening = new Promise<void>((resolve) => (listened = resolve));
  return { ctx: { ...shim.ctx, listening }, listened, shutdownReasons: shim.shutdownReasons };
}

t.test('the service loads once the server listens; earlier calls wait for it', async (t) => {
  let loads = 0;
  const lazy = await lazyWith(t, async () => {
    loads++;
    return { state: async () => ({ id: 'c1' }) } as unknown as TaskServiceImpl;
  });
  const { ctx, listened } = context(t);
  const impl = await lazy(ctx);
  t.equal(loads, 0, 'nothing heavy before listen');
  const early = impl.state!({ id: 'c1' } as never, call);
  listened();
  t.match(await early, { id: 'c1' }, 'delegated to the loaded service');
  await impl.state!({ id: 'c1' } as never, call);
  t.equal(loads, 1, 'loaded once');
  await t.rejects(Promise.resolve(impl.update!({} as never, call)), { code: 'NotImplemented' }, 'methods the service leaves out');
});

t.test('a service that fails to load: calls fail with its error; Connect and Shutdown still answer', async (t) => {
  let attempts = 0;
  const lazy = await lazyWith(t, async () => {
    attempts++;
    throw new Error('runtime did not open');
  });
  const { ctx, listened, shutdownReasons } = context(t);
  const impl = await lazy(ctx);
  listened();
  await t.rejects(Promise.resolve(impl.create!({} as never, call)), /runtime did not open/);
  const before = attempts;
  await t.rejects(Promise.resolve(impl.start!({} as never, call)), /runtime did not open/);
  t.equal(attempts, before + 1, 'the next call tries again');
  t.match(await impl.connect!({ id: 'c1' } as never, call), { shimPid: process.pid, taskPid: 0 });
  t.same(await impl.shutdown!({ id: 'c1' } as never, call), {});
  await new Promise((r) => setImmediate(r));
  t.same(shutdownReasons, ['Shutdown RPC'], 'the server shuts down');
});

t.test('a bad config fails at once (start reports it), before anything loads', async (t) => {
  let loads = 0;
  const lazy = await lazyWith(t, async () => {
    loads++;
    return {};
  });
  const { ctx } = context(t, '{"engine": "nope"}');
  await t.rejects(Promise.resolve(lazy(ctx)), /engine/);
  t.equal(loads, 0);
});

t.test('a spare for the next container is asked for once the service loaded and once a Start or Delete was answered, unless shim.spare is off', async (t) => {
  for (const [configText, on] of [
    ['{}', true],
    ['{"shim":{"spare":false}}', false],
  ] as const) {
    let releaseLoad = (): void => undefined;
    const loaded = new Promise<void>((r) => (releaseLoad = r));
    let releaseStart = (): void => undefined;
    const startAnswered = new Promise<void>((r) => (releaseStart = r));
    const lazy = await lazyWith(t, async () => {
      await loaded;
      return {
        create: async () => ({ pid: 1 }),
        start: async () => {
          await startAnswered;
          return { pid: 1 };
        },
        delete: async () => {
          throw new Error('no such task');
        },
      } as unknown as TaskServiceImpl;
    });
    const { ctx, listened } = context(t, configText);
    const asked: string[] = [];
    const impl = await lazy({ ...ctx, requestSpare: (moment) => asked.push(moment) });
    listened();
    await new Promise((r) => setTimeout(r, 20));
    t.same(asked, [], `${configText}: not before the service loaded`);
    releaseLoad();
    await impl.create!({} as never, call);
    t.same(asked, on ? ['loaded'] : [], `${configText}: once loaded`);
    const started = impl.start!({} as never, call);
    await new Promise((r) => setTimeout(r, 20));
    t.same(asked, on ? ['loaded'] : [], `${configText}: not while Start is pending`);
    releaseStart();
    t.match(await started, { pid: 1 }, "the answer is the service's");
    await new Promise((r) => setImmediate(r));
    t.same(asked, on ? ['loaded', 'answered'] : [], `${configText}: once Start was answered`);
    await t.rejects(Promise.resolve(impl.delete!({} as never, call)), /no such task/, 'a failing Delete still fails');
    await new Promise((r) => setImmediate(r));
    t.same(asked, on ? ['loaded', 'answered', 'answered'] : [], `${configText}: after a Delete too, also a failed one`);
  }
});
