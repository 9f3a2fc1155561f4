import t from 'tap';
import { ShutdownService } from '../../src/shim/shutdown.js';

t.test('callbacks run in parallel, once', async (t) => {
  const sd = new ShutdownService();
  const order: string[] = [];
  let runs = 0;
  sd.register('slow', async () => {
    runs++;
    order.push('slow-start');
    await new Promise((r) => setTimeout(r, 50));
    order.push('slow-end');
  });
  sd.register('fast', () => {
    order.push('fast');
  });
  t.notOk(sd.isShuttingDown);
  const t0 = Date.now();
  await Promise.all([sd.shutdown(), sd.shutdown('again')]);
  t.ok(Date.now() - t0 < 1000);
  t.same(order, ['slow-start', 'fast', 'slow-end'], 'fast ran while slow was pending');
  t.equal(runs, 1);
  t.ok(sd.isShuttingDown);
  t.ok(sd.signal.aborted);
  await t.resolves(sd.done);
});

t.test('a failing callback is recorded and does not stop the others', async (t) => {
  const sd = new ShutdownService();
  let ran = false;
  sd.register('bad', () => {
    throw new Error('boom');
  });
  sd.register('good', () => {
    ran = true;
  });
  await sd.shutdown();
  t.ok(ran);
  t.equal(sd.failures.length, 1);
  t.equal(sd.failures[0]?.name, 'bad');
});

t.test('the timeout bounds shutdown and aborts the callbacks signal', async (t) => {
  const sd = new ShutdownService({ timeoutMs: 100 });
  let aborted = false;
  sd.register('stuck', (signal) => {
    signal.addEventListener('abort', () => (aborted = true));
    return new Promise(() => {});
  });
  const t0 = Date.now();
  await sd.shutdown();
  const took = Date.now() - t0;
  t.ok(took >= 90 && took < 2000, `took ${took} ms`);
  t.ok(aborted);
  t.match(sd.failures, [{ name: 'stuck', err: /timed out after 100 ms/ }], 'a callback still running counts as failed');
});

t.test('a callback registered late still runs', async (t) => {
  const sd = new ShutdownService();
  await sd.shutdown();
  let ran = false;
  sd.register('late', () => {
    ran = true;
  });
  await new Promise((r) => setImmediate(r));
  t.ok(ran);
});
