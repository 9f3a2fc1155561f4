import { closeSync, fstatSync, openSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { createLogger, SwitchableDestination } from '../../src/log/logger.js';

t.test('SwitchableDestination: lines go to the current descriptor; a switch flushes and closes the previous one', async (t) => {
  const dir = t.testdir();
  const [a, b] = ['a.log', 'b.log'].map((f) => join(dir, f));
  const fdA = openSync(a!, 'a');
  const fdB = openSync(b!, 'a');
  t.teardown(() => {
    for (const fd of [fdA, fdB]) {
      try {
        closeSync(fd);
      } catch {
        // closed by the destination, as it should be
      }
    }
  });
  const dest = new SwitchableDestination();
  const log = createLogger({ destination: dest });
  log.info('dropped: no descriptor yet');
  dest.switchTo(fdA);
  log.info('first container');
  dest.switchTo(fdB);
  t.throws(() => fstatSync(fdA), { code: 'EBADF' }, "the first container's descriptor is closed");
  log.info('second container');
  dest.switchTo(undefined);
  t.throws(() => fstatSync(fdB), { code: 'EBADF' }, 'switched off: closed too');
  log.info('dropped: switched off');
  t.match(readFileSync(a!, 'utf8'), /"msg":"first container"/);
  t.notMatch(readFileSync(a!, 'utf8'), /second container|dropped/);
  t.match(readFileSync(b!, 'utf8'), /"msg":"second container"/);
  t.notMatch(readFileSync(b!, 'utf8'), /dropped/);
  dest.switchTo(2);
  dest.switchTo(undefined);
  t.doesNotThrow(() => fstatSync(2), 'stderr is never closed');
});
