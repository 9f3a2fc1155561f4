import t from 'tap';
import {
  checkpointArgs,
  createArgs,
  deleteArgs,
  eventsArgs,
  execArgs,
  globalArgs,
  killArgs,
  listArgs,
  psArgs,
  restoreArgs,
  signalNumber,
} from '../../src/runc/options.js';

const STDIO = ['ignore', 'ignore', 'ignore'] as const;

t.test('global flags: root, criu, and the per-call JSON log', async (t) => {
  const g = { path: 'runc', root: '/run/thaw/native/runc', criuPath: '/opt/thaw/criu/bin/criu' };
  t.same(globalArgs(g, '/tmp/l.log'), [
    '--root',
    '/run/thaw/native/runc',
    '--criu',
    '/opt/thaw/criu/bin/criu',
    '--log',
    '/tmp/l.log',
    '--log-format',
    'json',
  ]);
  t.same(globalArgs(g, null), ['--root', '/run/thaw/native/runc', '--criu', '/opt/thaw/criu/bin/criu']);
});

t.test('verb argv ends with the id and never holds global flags', async (t) => {
  t.same(createArgs('c', { bundle: '/b', stdio: STDIO }), ['create', '--bundle', '/b', 'c']);
  t.same(createArgs('c', { bundle: '/b', stdio: STDIO, pidFile: '/p', consoleSocket: '/s', noPivot: true }), [
    'create',
    '--bundle',
    '/b',
    '--console-socket',
    '/s',
    '--pid-file',
    '/p',
    '--no-pivot',
    'c',
  ]);
  t.same(listArgs(), ['list', '--format', 'json']);
  t.same(psArgs('c'), ['ps', '--format', 'json', 'c']);
  t.same(eventsArgs('c'), ['events', '--stats', 'c']);
  t.same(deleteArgs('c'), ['delete', 'c']);
  t.same(deleteArgs('c', { force: true }), ['delete', '--force', 'c']);
  t.same(killArgs('c', 'SIGTERM'), ['kill', 'c', '15']);
  t.same(killArgs('c', 9, { all: true }), ['kill', '--all', 'c', '9']);
  t.same(execArgs('c', { processFile: '/p.json', pidFile: '/pid', stdio: STDIO, consoleSocket: '/s' }), [
    'exec',
    '--detach',
    '--pid-file',
    '/pid',
    '--process',
    '/p.json',
    '--console-socket',
    '/s',
    'c',
  ]);
  t.same(checkpointArgs('c', { imagePath: '/i', workPath: '/w' }), ['checkpoint', '--image-path', '/i', '--work-path', '/w', 'c']);
  t.same(checkpointArgs('c', { imagePath: '/i', workPath: '/w', leaveRunning: true, manageCgroupsMode: 'ignore' }), [
    'checkpoint',
    '--image-path',
    '/i',
    '--work-path',
    '/w',
    '--leave-running',
    '--manage-cgroups-mode',
    'ignore',
    'c',
  ]);
  t.same(restoreArgs('c', { imagePath: '/i', workPath: '/w', bundle: '/b', stdio: STDIO, noPivot: true, shellJob: true }), [
    'restore',
    '--detach',
    '--image-path',
    '/i',
    '--work-path',
    '/w',
    '--bundle',
    '/b',
    '--no-pivot',
    '--shell-job',
    'c',
  ]);
});

t.test('signals', async (t) => {
  t.equal(signalNumber('SIGKILL'), 9);
  t.equal(signalNumber(10), 10);
  t.throws(() => signalNumber('SIGNOPE' as NodeJS.Signals), { code: 'InvalidArgument' });
  t.throws(() => signalNumber(0), { code: 'InvalidArgument' });
  t.throws(() => signalNumber(1.5), { code: 'InvalidArgument' });
});
