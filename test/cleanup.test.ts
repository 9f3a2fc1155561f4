import t from 'tap';
import { Cleanup } from '../src/cleanup.js';

t.test('undo steps run in reverse order on failure', async (t) => {
  const order: string[] = [];
  await t.rejects(
    (async () => {
      await using cleanup = new Cleanup();
      cleanup.add('a', () => order.push('a'));
      cleanup.add('b', () => order.push('b'));
      throw new Error('boom');
    })(),
    /boom/,
  );
  t.same(order, ['b', 'a']);
});

t.test('release keeps the work', async (t) => {
  const order: string[] = [];
  {
    await using cleanup = new Cleanup();
    cleanup.add('a', () => order.push('a'));
    cleanup.release();
  }
  t.same(order, []);
});

t.test('undo failures are collected, not thrown', async (t) => {
  const cleanup = new Cleanup();
  const order: string[] = [];
  cleanup.add('first', () => order.push('first'));
  cleanup.add('bad', () => {
    throw new Error('undo broke');
  });
  await cleanup[Symbol.asyncDispose]();
  t.same(order, ['first']);
  t.equal(cleanup.failures.length, 1);
  t.equal(cleanup.failures[0]?.name, 'bad');
});
