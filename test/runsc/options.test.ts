import t from 'tap';
import { isShimError } from '../../src/errors.js';
import {
  checkpointArgs,
  createArgs,
  deleteArgs,
  eventsArgs,
  execArgs,
  globalArgs,
  killArgs,
  listArgs,
  pauseArgs,
  psArgs,
  restoreArgs,
  resumeArgs,
  startArgs,
  stateArgs,
  waitArgs,
  type RunscGlobalOptions,
} from '../../src/runsc/options.js';

const global: RunscGlobalOptions = {
  path: 'runsc',
  root: '/run/thaw/runsc',
  platform: 'systrap',
  network: 'none',
  debugLogDir: null,
  flags: {},
};
const ID = '0123456789abcdef0123456789abcdef';
const stdio = ['ignore', 1, 2] as const;

t.test('global flags: thaw’s own first, then pass-through as --k=v', async (t) => {
  t.same(globalArgs(global, '/tmp/l.log'), [
    '--root=/run/thaw/runsc',
    '--platform=systrap',
    '--network=none',
    '--log=/tmp/l.log',
    '--log-format=json',
  ]);
  t.same(globalArgs({ ...global, debugLogDir: '/var/log/runsc', flags: { 'host-uds': 'open', nvproxy: 'true' }, logFormat: 'json-k8s' }, null), [
    '--root=/run/thaw/runsc',
    '--platform=systrap',
    '--network=none',
    '--debug',
    '--debug-log=/var/log/runsc/',
    '--host-uds=open',
    '--nvproxy=true',
  ]);
  t.same(globalArgs({ ...global, debugLogDir: '/d/' }, 'L').slice(-2), ['--debug', '--debug-log=/d/']);
  t.same(globalArgs({ ...global, logFormat: 'json-k8s' }, 'L').slice(3), ['--log=L', '--log-format=json-k8s']);
});

t.test('pass-through flags may not replace thaw’s own or smuggle arguments', async (t) => {
  for (const bad of ['root', 'log', 'log-format', 'platform', 'network', 'debug-log', '-x', 'a b', '']) {
    t.throws(() => globalArgs({ ...global, flags: { [bad]: 'v' } }, null), { code: 'InvalidArgument' }, bad);
  }
});

t.test('argv per verb', async (t) => {
  t.same(createArgs(ID, { bundle: '/b', stdio }), ['create', '--bundle=/b', ID]);
  t.same(createArgs(ID, { bundle: '/b', stdio, consoleSocket: '/s.sock', pidFile: '/p', userLog: '/u' }), [
    'create',
    '--bundle=/b',
    '--console-socket=/s.sock',
    '--pid-file=/p',
    '--user-log=/u',
    ID,
  ]);
  t.same(startArgs(ID), ['start', ID]);
  t.same(stateArgs(ID), ['state', ID]);
  t.same(listArgs(), ['list', '--format=json']);
  t.same(waitArgs(ID), ['wait', ID]);
  t.same(waitArgs(ID, { pid: 7 }), ['wait', '--pid=7', ID]);
  t.same(waitArgs(ID, { rootPid: 9 }), ['wait', '--rootpid=9', ID]);
  t.same(killArgs(ID, 9), ['kill', ID, '9']);
  t.same(killArgs(ID, 'SIGTERM', { all: true }), ['kill', '--all', ID, '15']);
  t.same(killArgs(ID, 'SIGKILL', { pid: 12 }), ['kill', '--pid=12', ID, '9']);
  t.same(deleteArgs(ID), ['delete', ID]);
  t.same(deleteArgs(ID, { force: true }), ['delete', '--force', ID]);
  t.same(psArgs(ID), ['ps', '--format=json', ID]);
  t.same(pauseArgs(ID), ['pause', ID]);
  t.same(resumeArgs(ID), ['resume', ID]);
  t.same(eventsArgs(ID), ['events', '--stats', ID]);
});

t.test('exec argv: always detached with both pid files', async (t) => {
  const files = { pidFile: '/t/pid', internalPidFile: '/t/ipid' };
  t.same(execArgs(ID, { args: ['/bin/echo', '-n', 'hi'], stdio }, files), [
    'exec',
    '--detach',
    '--pid-file=/t/pid',
    '--internal-pid-file=/t/ipid',
    ID,
    '/bin/echo',
    '-n',
    'hi',
  ]);
  t.same(
    execArgs(
      ID,
      { process: { args: ['sh'] }, stdio, cwd: '/w', env: ['A=1', 'B=2'], user: '1000:1000', consoleSocket: '/c' },
      { ...files, processFile: '/t/process.json' },
    ),
    [
      'exec',
      '--detach',
      '--pid-file=/t/pid',
      '--internal-pid-file=/t/ipid',
      '--console-socket=/c',
      '--cwd=/w',
      '--env=A=1',
      '--env=B=2',
      '--user=1000:1000',
      '--process=/t/process.json',
      ID,
    ],
  );
  t.throws(() => execArgs(ID, { stdio }, files), { code: 'InvalidArgument' }, 'neither process nor args');
  t.throws(() => execArgs(ID, { stdio, args: ['x'], process: {} }, files), { code: 'InvalidArgument' }, 'both');
  t.throws(() => execArgs(ID, { stdio, process: {} }, files), { code: 'InvalidArgument' }, 'no process file');
});

t.test('checkpoint and restore argv', async (t) => {
  t.same(checkpointArgs(ID, { imagePath: '/img' }), ['checkpoint', '--image-path=/img', ID]);
  t.same(
    checkpointArgs(ID, {
      imagePath: '/img',
      leaveRunning: true,
      compression: 'none',
      direct: true,
      excludeCommittedZeroPages: true,
      cudaCheckpointPath: '/usr/bin/cuda-checkpoint',
      cudaCheckpointSequential: true,
    }),
    [
      'checkpoint',
      '--image-path=/img',
      '--leave-running',
      '--compression=none',
      '--direct',
      '--exclude-committed-zero-pages',
      '--cuda-checkpoint-path=/usr/bin/cuda-checkpoint',
      '--cuda-checkpoint-sequential',
      ID,
    ],
  );
  t.same(checkpointArgs(ID, { imagePath: '/img', direct: false, leaveRunning: false }), ['checkpoint', '--image-path=/img', ID]);
  t.same(restoreArgs(ID, { bundle: '/b', imagePath: '/img', stdio }), [
    'restore',
    '--detach',
    '--bundle=/b',
    '--image-path=/img',
    ID,
  ]);
  t.same(restoreArgs(ID, { bundle: '/b', imagePath: '/img', stdio, direct: true, background: true, pidFile: '/p' }), [
    'restore',
    '--detach',
    '--bundle=/b',
    '--image-path=/img',
    '--direct',
    '--background',
    '--pid-file=/p',
    ID,
  ]);
});

t.test('bad numbers and signals are refused', async (t) => {
  t.throws(() => killArgs(ID, 0), { code: 'InvalidArgument' });
  t.throws(() => killArgs(ID, 'SIGNOPE' as NodeJS.Signals), { code: 'InvalidArgument' });
  t.throws(() => waitArgs(ID, { pid: 1, rootPid: 1 }), { code: 'InvalidArgument' });
  t.throws(() => waitArgs(ID, { pid: 1.5 }), { code: 'InvalidArgument' });
  try {
    killArgs(ID, -1);
    t.fail('negative signal accepted');
  } catch (err) {
    t.ok(isShimError(err, 'InvalidArgument'));
  }
});
