import { mkdtemp, rm } from 'node:fs/promises';
import { constants, tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { ShimError } from '../../src/errors.js';
import { parseSignal } from '../../src/cli/verbs/common.js';
import { runThaw } from '../helpers/thaw-cli.js';

/** `thaw kill ID [SIGNAL]`: names with or without SIG, any case, numbers; bad ones are InvalidArgument. */
t.test('parseSignal accepts names, short names and numbers', async (t) => {
  const table: [string | undefined, number][] = [
    [undefined, constants.signals.SIGTERM],
    ['SIGUSR1', constants.signals.SIGUSR1],
    ['USR1', constants.signals.SIGUSR1],
    ['sigusr1', constants.signals.SIGUSR1],
    ['kill', 9],
    ['SIGKILL', 9],
    ['9', 9],
    ['15', 15],
    ['64', 64],
  ];
  for (const [input, want] of table) t.equal(parseSignal(input), want, `${String(input)} → ${want}`);
  t.equal(parseSignal(undefined, 'SIGINT'), constants.signals.SIGINT, 'fallback when no signal is given');
});

t.test('parseSignal rejects unknown names and numbers outside 1-64', async (t) => {
  for (const bad of ['SIGFOO', 'FOO', '', 'SIG', '0', '65', '99999', '-9', '9x', 'USR1 ']) {
    let caught: unknown;
    try {
      parseSignal(bad);
    } catch (err) {
      caught = err;
    }
    t.ok(caught instanceof ShimError && caught.code === 'InvalidArgument', `${JSON.stringify(bad)} is refused as InvalidArgument`);
    t.match((caught as Error | undefined)?.message, `unknown signal ${JSON.stringify(bad)}`, 'naming the input');
  }
});

t.test('thaw kill with a bad signal exits 2 before looking anything up', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'thaw-cli-signal-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const dirs = { root: join(dir, 'root'), store: join(dir, 'store') };
  const r = await runThaw(dirs, ['kill', 'no-such-container', 'SIGFOO']);
  t.equal(r.exitCode, 2, 'InvalidArgument → exit 2 (not 3: the signal is checked first)');
  t.match(r.stderr, /^thaw: unknown signal "SIGFOO"\n$/);
  t.same(r.json, { error: { code: 'InvalidArgument', message: 'unknown signal "SIGFOO"' } });
  const known = await runThaw(dirs, ['kill', 'no-such-container', 'USR1']);
  t.equal(known.exitCode, 3, 'a valid signal gets as far as the container lookup (NotFound → 3)');
});
