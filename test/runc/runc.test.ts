import { closeSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import t, { type Test } from 'tap';
import { RuncError } from '../../src/errors.js';
import { Runc, lastRuncErrorLine, parseRuncVersion, translateRuncError, type RuncOptions } from '../../src/runc/runc.js';

const FAKE = fileURLToPath(new URL('../fixtures/bin/fake-runc', import.meta.url));
const ID = '0123456789abcdef0123456789abcdef';
const ROOT = '/run/thaw-test/runc';
const CRIU = '/opt/thaw/criu/bin/criu';

interface Plan {
  stdout?: string;
  stderr?: string;
  log?: string;
  exit?: number;
  sleepSeconds?: number;
  /** Written to the path given by `--NAME PATH`. */
  files?: Record<string, string>;
  /** Written into the `--work-path` directory. */
  workfiles?: Record<string, string>;
}

/** A Runc over fake-runc, with its control directory and a scratch dir for per-call files. */
function setup(t: Test, extra: Partial<RuncOptions> = {}) {
  const dir = t.testdir();
  const scratch = join(dir, 'scratch');
  process.env.FAKE_RUNC_DIR = dir;
  const runc = new Runc({ path: FAKE, root: ROOT, criuPath: CRIU, scratchDir: scratch, ...extra });
  /** Replaces what fake-runc does for `verb` (see the script's header). */
  const plan = (verb: string, p: Plan) => {
    for (const ext of ['stdout', 'stderr', 'log', 'exit', 'sleep']) rmSync(join(dir, `${verb}.${ext}`), { force: true });
    for (const ext of ['files', 'workfiles']) rmSync(join(dir, `${verb}.${ext}`), { recursive: true, force: true });
    const put = (ext: string, v: string | number | undefined) => {
      if (v !== undefined) writeFileSync(join(dir, `${verb}.${ext}`), String(v));
    };
    put('stdout', p.stdout);
    put('stderr', p.stderr);
    put('log', p.log);
    put('exit', p.exit);
    put('sleep', p.sleepSeconds);
    for (const [ext, files] of [
      ['files', p.files],
      ['workfiles', p.workfiles],
    ] as const) {
      if (files === undefined) continue;
      mkdirSync(join(dir, `${verb}.${ext}`));
      for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, `${verb}.${ext}`, name), text);
    }
  };
  /** argv of each call so far, with the random per-call log path replaced by LOG. */
  const calls = (): string[][] => {
    const file = join(dir, 'calls');
    if (!existsSync(file)) return [];
    return readFileSync(file, 'utf8')
      .split('\x1e')
      .slice(0, -1)
      .map((call) => call.split('\x1f').slice(0, -1))
      .map((argv) => argv.map((a) => (a.startsWith(`${scratch}/thaw-runc-`) && a.endsWith('.log') ? 'LOG' : a)));
  };
  return { dir, scratch, runc, plan, calls };
}

const G = ['--root', ROOT, '--criu', CRIU, '--log', 'LOG', '--log-format', 'json'];
const STATE = {
  ociVersion: '1.0.2-dev',
  id: ID,
  pid: 42,
  status: 'running',
  bundle: '/b',
  rootfs: '/b/rootfs',
  created: '2026-11-26T21:48:32.940813374Z',
  owner: '',
};

t.test('each verb runs with the global flags before the verb', async (t) => {
  const { runc, plan, calls, scratch, dir } = setup(t);
  plan('state', { stdout: JSON.stringify(STATE) });
  plan('ps', { stdout: '[1234,1240]\n' });
  plan('list', { stdout: 'null\n' });
  plan('events', {
    stdout: '{"type":"stats","id":"x","data":{"cpu":{"usage":{"total":5}},"memory":{"usage":{"usage":2600960,"limit":9}},"pids":{"current":2}}}\n',
  });
  plan('exec', { files: { 'pid-file': '4321\n' } });

  await runc.create(ID, { bundle: '/b', stdio: ['ignore', 'ignore', 'ignore'], pidFile: '/s/init.pid' });
  await runc.create(ID, { bundle: '/b', stdio: ['ignore', 'ignore', 'ignore'], consoleSocket: '/s/console.sock', noPivot: true });
  await runc.start(ID);
  t.same(await runc.state(ID), { ...(({ owner: _o, ...s }) => s)(STATE) });
  await runc.kill(ID, 'SIGKILL', { all: true });
  await runc.kill(ID, 15);
  t.same(await runc.ps(ID), [1234, 1240]);
  t.equal(await runc.exec(ID, { process: { args: ['/bin/true'], cwd: '/' }, stdio: ['ignore', 'ignore', 'ignore'] }), 4321);
  await runc.pause(ID);
  await runc.resume(ID);
  const stats = await runc.events(ID);
  t.equal(stats.memory?.usage?.usage, 2600960);
  t.equal(stats.cpu?.usage?.total, 5);
  t.equal(stats.pids?.current, 2);
  await runc.checkpoint(ID, { imagePath: '/img', workPath: join(dir, 'w1') });
  await runc.checkpoint(ID, {
    imagePath: '/img',
    workPath: join(dir, 'w2'),
    leaveRunning: true,
    tcpEstablished: true,
    extUnixSk: true,
    shellJob: true,
    fileLocks: true,
    manageCgroupsMode: 'soft',
  });
  await runc.restore(ID, { imagePath: '/img', workPath: join(dir, 'w3'), bundle: '/b', stdio: ['ignore', 'ignore', 'ignore'] });
  await runc.restore(ID, {
    imagePath: '/img',
    workPath: join(dir, 'w4'),
    bundle: '/b',
    stdio: ['ignore', 'ignore', 'ignore'],
    pidFile: '/s/init.pid',
    consoleSocket: '/s/c.sock',
  });
  t.same(await runc.list(), []);
  await runc.delete(ID);
  await runc.delete(ID, { force: true });

  const all = calls();
  const execCall = all[7]!;
  const processFile = execCall[execCall.indexOf('--process') + 1]!;
  const pidFile = execCall[execCall.indexOf('--pid-file') + 1]!;
  t.same(all, [
    [...G, 'create', '--bundle', '/b', '--pid-file', '/s/init.pid', ID],
    [...G, 'create', '--bundle', '/b', '--console-socket', '/s/console.sock', '--no-pivot', ID],
    [...G, 'start', ID],
    [...G, 'state', ID],
    [...G, 'kill', '--all', ID, '9'],
    [...G, 'kill', ID, '15'],
    [...G, 'ps', '--format', 'json', ID],
    [...G, 'exec', '--detach', '--pid-file', pidFile, '--process', processFile, ID],
    [...G, 'pause', ID],
    [...G, 'resume', ID],
    [...G, 'events', '--stats', ID],
    [...G, 'checkpoint', '--image-path', '/img', '--work-path', join(dir, 'w1'), ID],
    [
      ...G,
      'checkpoint',
      '--image-path',
      '/img',
      '--work-path',
      join(dir, 'w2'),
      '--leave-running',
      '--tcp-established',
      '--ext-unix-sk',
      '--shell-job',
      '--file-locks',
      '--manage-cgroups-mode',
      'soft',
      ID,
    ],
    [...G, 'restore', '--detach', '--image-path', '/img', '--work-path', join(dir, 'w3'), '--bundle', '/b', ID],
    [
      ...G,
      'restore',
      '--detach',
      '--image-path',
      '/img',
      '--work-path',
      join(dir, 'w4'),
      '--bundle',
      '/b',
      '--pid-file',
      '/s/init.pid',
      '--console-socket',
      '/s/c.sock',
      ID,
    ],
    [...G, 'list', '--format', 'json'],
    [...G, 'delete', ID],
    [...G, 'delete', '--force', ID],
  ]);
  t.ok(processFile.startsWith(join(scratch, 'thaw-runc-exec-')), 'exec gets a private process file');
  t.same(readdirSync(scratch), [], 'per-call log files and exec files are removed');
  t.ok(existsSync(join(dir, 'w1')), 'checkpoint creates its work path');
});

t.test('version takes no global flags and is parsed once', async (t) => {
  const { runc, plan, calls } = setup(t);
  plan('version', { stdout: 'runc version 1.1.5+ds1\ncommit: 1.1.5+ds1-1+deb12u1\nspec: 1.0.2-dev\ngo: go1.19.8\nlibseccomp: 2.5.4\n' });
  t.same(await runc.version(), { version: '1.1.5+ds1', commit: '1.1.5+ds1-1+deb12u1', spec: '1.0.2-dev' });
  await runc.version();
  t.same(calls(), [['--version']]);
  t.throws(() => parseRuncVersion('something else'), { code: 'Internal' });
});

t.test('create, restore and exec hand the given fds to runc and capture nothing', async (t) => {
  const { runc, dir } = setup(t);
  const out = openSync(join(dir, 'out.txt'), 'w');
  t.teardown(() => closeSync(out));
  await runc.create(ID, { bundle: '/b', stdio: ['ignore', out, out] });
  await runc.restore(ID, { imagePath: '/img', workPath: join(dir, 'w'), bundle: '/b', stdio: ['ignore', out, 'ignore'] });
  const lines = readFileSync(join(dir, 'stdio'), 'utf8').trim().split('\n');
  t.match(lines[0], new RegExp(`^create /dev/null ${dir}/out.txt ${dir}/out.txt$`));
  t.match(lines[1], new RegExp(`^restore /dev/null ${dir}/out.txt /dev/null$`));
});

t.test('failures quote runc’s last JSON log error and map it to a code', async (t) => {
  const { runc, plan } = setup(t);
  plan('state', {
    exit: 1,
    stderr: 'container does not exist\n',
    log: '{"level":"warning","msg":"noise","time":"t"}\n{"level":"error","msg":"container does not exist","time":"2026-11-26T21:48:47Z"}\n',
  });
  const err = await runc.state(ID).then(
    () => undefined,
    (e: unknown) => e,
  );
  t.type(err, RuncError);
  const r = err as RuncError;
  t.equal(r.code, 'NotFound');
  t.equal(r.logLine, 'container does not exist');
  t.equal(r.exitCode, 1);
  t.equal(r.message, 'runc state failed: container does not exist');
  t.equal(r.argv[0], FAKE);
  t.same(r.argv.slice(-2), ['state', ID]);

  plan('create', { exit: 1, log: '{"level":"error","msg":"container with id exists: abc","time":"t"}\n' });
  await t.rejects(runc.create(ID, { bundle: '/b', stdio: ['ignore', 'ignore', 'ignore'] }), { code: 'AlreadyExists' });
  plan('start', { exit: 1, stderr: 'time="2026-11-26T21:48:47Z" level=error msg="cannot start a container that has stopped"\n' });
  await t.rejects(runc.start(ID), {
    code: 'FailedPrecondition',
    logLine: 'cannot start a container that has stopped',
  }, 'stderr fallback (text format) when the log is empty');
  plan('kill', { exit: 1, log: '{"level":"error","msg":"container not running","time":"t"}\n' });
  await t.rejects(runc.kill(ID, 9), { code: 'FailedPrecondition' });
  plan('pause', { exit: 1 });
  await t.rejects(runc.pause(ID), { code: 'Unknown', logLine: '', message: 'runc pause failed: exit status 1' });
});

t.test('checkpoint and restore failures also quote CRIU’s own error line', async (t) => {
  const { runc, plan, dir } = setup(t);
  plan('checkpoint', {
    exit: 1,
    log:
      '{"level":"error","msg":"container still running","time":"t"}\n' +
      '{"level":"error","msg":"criu failed: type NOTIFY errno 0\\nlog file: /w/dump.log","time":"t"}\n',
    workfiles: {
      'dump.log':
        "(00.035827) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n" +
        '(00.060112) Error (criu/files-reg.c:1790): Can\'t lookup mount=27 for fd=1 path=/tmp/nx/t1.out\n' +
        '(00.060136) Error (criu/cr-dump.c:1681): Dump files (pid: 7866) failed with -1\n' +
        '(00.079135) Error (criu/cr-dump.c:2111): Dumping FAILED.\n',
    },
  });
  await t.rejects(runc.checkpoint(ID, { imagePath: '/img', workPath: join(dir, 'cw') }), {
    code: 'Unknown',
    logLine:
      "criu failed: type NOTIFY errno 0; log file: /w/dump.log; criu: Can't lookup mount=27 for fd=1 path=/tmp/nx/t1.out (criu/files-reg.c:1790)",
  });
  plan('restore', {
    exit: 1,
    log: '{"level":"error","msg":"criu failed: type NOTIFY errno 17\\nlog file: /w/restore.log","time":"t"}\n',
    workfiles: {
      'restore.log':
        "(00.060727) Error (criu/cr-restore.c:1230): Can't fork for 8567: File exists\n" +
        '(00.061273) Error (criu/cr-restore.c:2320): Restoring FAILED.\n' +
        '(00.063003) Error (criu/cgroup.c:1998): cg: cgroupd: recv req error: No such file or directory\n',
    },
  });
  await t.rejects(
    runc.restore(ID, { imagePath: '/img', workPath: join(dir, 'rw'), bundle: '/b', stdio: ['ignore', 'ignore', 'ignore'] }),
    { code: 'FailedPrecondition', message: /Can't fork for 8567: File exists/ },
    'a pid still in use is a precondition failure',
  );
});

t.test('unexpected output is an Internal error', async (t) => {
  const { runc, plan } = setup(t);
  plan('state', { stdout: 'not json' });
  await t.rejects(runc.state(ID), { code: 'Internal' });
  plan('state', { stdout: '{"id":"x","status":"exploded","pid":1}' });
  await t.rejects(runc.state(ID), { code: 'Internal' });
  plan('ps', { stdout: '[1,"x"]' });
  await t.rejects(runc.ps(ID), { code: 'Internal' });
  plan('events', { stdout: '{"type":"oom"}' });
  await t.rejects(runc.events(ID), { code: 'Internal' });
  plan('exec', {});
  await t.rejects(runc.exec(ID, { process: {}, stdio: ['ignore', 'ignore', 'ignore'] }), { code: 'Internal' }, 'no pid written');
});

t.test('timeouts are DeadlineExceeded and kill the child', async (t) => {
  const { runc, plan, dir } = setup(t);
  plan('checkpoint', { sleepSeconds: 20 });
  const t0 = Date.now();
  await t.rejects(runc.checkpoint(ID, { imagePath: '/img', workPath: join(dir, 'w'), timeoutMs: 300 }), { code: 'DeadlineExceeded' });
  t.ok(Date.now() - t0 < 5_000, `returned after ${Date.now() - t0} ms`);
  const slow = setup(t, { timeoutsMs: { start: 300 } });
  slow.plan('start', { sleepSeconds: 20 });
  await t.rejects(slow.runc.start(ID), { code: 'DeadlineExceeded' }, 'per-verb default from the options');
});

t.test('abort is Canceled, before or during the call', async (t) => {
  const { runc, plan, calls, dir } = setup(t);
  plan('restore', { sleepSeconds: 20 });
  const ac = new AbortController();
  const t0 = Date.now();
  const pending = runc.restore(ID, {
    imagePath: '/img',
    workPath: join(dir, 'w'),
    bundle: '/b',
    stdio: ['ignore', 'ignore', 'ignore'],
    signal: ac.signal,
  });
  setTimeout(() => ac.abort(new Error('shutting down')), 300);
  await t.rejects(pending, { code: 'Canceled' });
  t.ok(Date.now() - t0 < 5_000, `returned after ${Date.now() - t0} ms`);
  const before = calls().length;
  await t.rejects(runc.start(ID, { signal: AbortSignal.abort() }), { code: 'Canceled' });
  t.equal(calls().length, before, 'an aborted signal starts nothing');
});

t.test('unsafe ids are refused before anything runs', async (t) => {
  const { runc, calls } = setup(t);
  for (const id of ['', '-rf', '--all', 'a b', 'a/b', '../x', 'x'.repeat(200)]) {
    await t.rejects(runc.state(id), { code: 'InvalidArgument' }, JSON.stringify(id));
  }
  await t.rejects(runc.create('-x', { bundle: '/b', stdio: ['ignore', 'ignore', 'ignore'] }), { code: 'InvalidArgument' });
  t.same(calls(), []);
});

t.test('a missing binary is Unavailable', async (t) => {
  const { runc } = setup(t, { path: '/nonexistent/runc' });
  await t.rejects(runc.start(ID), { code: 'Unavailable' });
});

t.test('log parsing and error translation', async (t) => {
  t.equal(lastRuncErrorLine(''), '');
  t.equal(lastRuncErrorLine('garbage\n{"level":"info","msg":"x"}\n'), '');
  t.equal(lastRuncErrorLine('{"level":"error","msg":"a"}\n{"level":"error","msg":"b\\nlog file: c"}\n'), 'b; log file: c');
  t.equal(lastRuncErrorLine('', 'first\nlast line\n\n'), 'last line');
  t.equal(translateRuncError('container with id exists: x'), 'AlreadyExists');
  t.equal(translateRuncError('container does not exist'), 'NotFound');
  t.equal(translateRuncError('cannot delete container that is not stopped: running'), 'FailedPrecondition');
  t.equal(translateRuncError('container not running'), 'FailedPrecondition');
  t.equal(translateRuncError('criu: Can\'t fork for 12: File exists'), 'FailedPrecondition');
  t.equal(translateRuncError('something odd'), 'Unknown');
});
