/**
 * Task.Update through the Task service on a fake engine: the LinuxResources JSON in containerd's Any
 * reaches engine.update decoded; bad requests are InvalidArgument; an engine without update answers
 * NotImplemented; a stopped task FailedPrecondition; engine errors pass through; no event is queued.
 */
import { create } from '@bufbuild/protobuf';
import { AnySchema } from '@bufbuild/protobuf/wkt';
import t from 'tap';
import type { LinuxResources } from '../../src/engine/cgroup-resources.js';
import type { Engine } from '../../src/engine/engine.js';
import { ShimError } from '../../src/errors.js';
import type { TaskServiceImpl } from '../../src/shim/serve.js';
import { TaskService } from '../../src/task/service.js';
import { callContext, fakeShim, type FakeShim } from './fake-runtime.js';

/** containerd's type URL for specs.LinuxResources (typeurl registration in containerd's client). */
const LINUX_RESOURCES = 'types.containerd.io/opencontainers/runtime-spec/1/LinuxResources';

const resourcesAny = (value: unknown, typeUrl = LINUX_RESOURCES) => create(AnySchema, { typeUrl, value: Buffer.from(JSON.stringify(value)) });

interface Harness {
  shim: FakeShim;
  call: (method: keyof TaskServiceImpl, req: Record<string, unknown>) => Promise<unknown>;
  updates: { id: string; resources: LinuxResources }[];
}

async function running({ withUpdate = true }: { withUpdate?: boolean } = {}): Promise<Harness> {
  const shim = fakeShim();
  const updates: Harness['updates'] = [];
  if (withUpdate) {
    // The shared FakeEngine has no update (like an engine without one); this one gets it.
    const engine: Engine = shim.engine;
    engine.update = async (id: string, resources: LinuxResources) => {
      shim.engine.calls.push(`update ${id}`);
      const err = shim.engine.failNext['update'];
      if (err) {
        delete shim.engine.failNext['update'];
        throw err;
      }
      updates.push({ id, resources });
    };
  }
  const h = new TaskService(shim.ctx, shim.runtime).handlers() as Required<TaskServiceImpl>;
  const call = async (method: keyof TaskServiceImpl, req: Record<string, unknown>): Promise<unknown> =>
    (h[method] as (r: unknown, c: unknown) => unknown)(req, callContext(method));
  await call('create', { id: 'c1', bundle: '/nonexistent/bundle', rootfs: [], stdin: '', stdout: '', stderr: '', terminal: false, checkpoint: '' });
  await call('start', { id: 'c1', execId: '' });
  return { shim, call, updates };
}

t.test('Update decodes the LinuxResources JSON and calls engine.update once; no event', async (t) => {
  const { shim, call, updates } = await running();
  const events = shim.events.length;
  const resources = { memory: { limit: 268435456 }, cpu: { quota: 50000, period: 100000 } };
  t.same(await call('update', { id: 'c1', resources: resourcesAny(resources), annotations: { a: 'b' } }), {});
  t.same(updates, [{ id: 'c1', resources }]);
  t.equal(shim.events.length, events, 'containerd publishes no event for Update, nor does thaw');
  // A bare type name or a prefixed one: both open (only the last path segment counts).
  await call('update', { id: 'c1', resources: resourcesAny({ pids: { limit: 10 } }, 'LinuxResources') });
  t.same(updates[1]?.resources, { pids: { limit: 10 } });
});

t.test('Update of a paused task reaches the engine; of a stopped one is FailedPrecondition', async (t) => {
  const { shim, call, updates } = await running();
  await call('pause', { id: 'c1' });
  await call('update', { id: 'c1', resources: resourcesAny({ memory: { limit: 1 << 28 } }) });
  t.equal(updates.length, 1, 'paused');
  await call('resume', { id: 'c1' });
  shim.engine.exit('c1', 0);
  await call('wait', { id: 'c1', execId: '' });
  await t.rejects(call('update', { id: 'c1', resources: resourcesAny({ memory: { limit: 1 << 28 } }) }), {
    code: 'FailedPrecondition',
    message: 'cannot update task in stopped state',
  });
  t.equal(updates.length, 1, 'the engine was not asked');
});

t.test('bad requests are InvalidArgument before the engine is asked', async (t) => {
  const { call, updates } = await running();
  await t.rejects(call('update', { id: 'c1' }), { code: 'InvalidArgument', message: /no resources/ });
  await t.rejects(call('update', { id: 'c1', resources: create(AnySchema, { typeUrl: LINUX_RESOURCES, value: Buffer.from('{not json') }) }), {
    code: 'InvalidArgument',
    message: /not JSON/,
  });
  await t.rejects(call('update', { id: 'c1', resources: resourcesAny({ cpuShares: 2 }) }), { code: 'InvalidArgument', message: /linux\.resources\.cpuShares/ });
  await t.rejects(call('update', { id: 'c1', resources: resourcesAny({ memory: { limit: '1g' } }) }), { code: 'InvalidArgument', message: /memory\.limit/ });
  await t.rejects(call('update', { id: 'c1', resources: resourcesAny({}, 'types.containerd.io/opencontainers/runtime-spec/1/WindowsResources') }), {
    code: 'InvalidArgument',
    message: /WindowsResources.*only OCI LinuxResources/,
  });
  t.same(updates, []);
});

t.test('unknown id NotFound; an engine without update NotImplemented; engine errors pass through', async (t) => {
  const { shim, call } = await running();
  await t.rejects(call('update', { id: 'nosuch', resources: resourcesAny({}) }), { code: 'NotFound' });
  shim.engine.failNext['update'] = new ShimError('NotImplemented', 'update linux.resources.devices: cannot be changed');
  await t.rejects(call('update', { id: 'c1', resources: resourcesAny({ devices: [] }) }), { code: 'NotImplemented', message: /devices/ });
  t.equal(((await call('state', { id: 'c1', execId: '' })) as { status: number }).status, 2, 'the task keeps running (RUNNING = 2)');

  const bare = await running({ withUpdate: false });
  await t.rejects(bare.call('update', { id: 'c1', resources: resourcesAny({ memory: { limit: 1 << 28 } }) }), {
    code: 'NotImplemented',
    message: /engine cannot update the resources/,
  });
});
