import { closeSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import t, { type Test } from 'tap';
import { RunscError } from '../../src/errors.js';
import { clearProbeCache } from '../../src/runsc/probe.js';
import { Runsc, type RunscOptions } from '../../src/runsc/runsc.js';

const FAKE = fileURLToPath(new URL('../fixtures/bin/fake-runsc', import.meta.url));
const ID = '0123456789abcdef0123456789abcdef';
const ROOT = '/run/thaw-test/runsc';

interface Plan {
  stdout?: string;
  stderr?: string;
  log?: string;
  exit?: number;
  sleepSeconds?: number;
  holdStdioSeconds?: number;
  /** Written to the path given by `--NAME=PATH`. */
  files?: Record<string, string>;
}

/** A Runsc over fake-runsc, with its control directory and a scratch dir for per-call files. */
function setup(t: Test, extra: Partial<RunscOptions> = {}) {
  const dir = t.testdir();
  const scratch = join(dir, 'scratch');
  mkdirSync(scratch);
  process.env.FAKE_RUNSC_DIR = dir;
  const runsc = new Runsc({
    path: FAKE,
    root: ROOT,
    platform: 'systrap',
    network: 'none',
    debugLogDir: null,
    flags: {},
    scratchDir: scratch,
    ...extra,
  });
  /** Replaces what fake-runsc does for `verb` (see the script's header). */
  const plan = (verb: string, p: Plan) => {
    for (const ext of ['stdout', 'stderr', 'log', 'exit', 'sleep', 'hold']) rmSync(join(dir, `${verb}.${ext}`), { force: true });
    rmSync(join(dir, `${verb}.files`), { recursive: true, force: true });
    const put = (ext: string, v: string | number | undefined) => {
      if (v !== undefined) writeFileSync(join(dir, `${verb}.${ext}`), String(v));
    };
    put('stdout', p.stdout);
    put('stderr', p.stderr);
    put('log', p.log);
    put('exit', p.exit);
    put('sleep', p.sleepSeconds);
    put('hold', p.holdStdioSeconds);
    if (p.files !== undefined) {
      mkdirSync(join(dir, `${verb}.files`));
      for (const [name, text] of Object.entries(p.files)) writeFileSync(join(dir, `${verb}.files`, name), text);
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
      .map((argv) => argv.map((a) => (a.startsWith(`--log=${scratch}/thaw-runsc-`) ? '--log=LOG' : a)));
  };
  return { dir, scratch, runsc, plan, calls };
}

const G = [`--root=${ROOT}`, '--platform=systrap', '--network=none', '--log=LOG', '--log-format=json'];

t.test('each verb runs with global flags before the verb', async (t) => {
  const { runsc, plan, calls, scratch } = setup(t);
  plan('state', { stdout: JSON.stringify({ ociVersion: '1.0.2-dev', id: ID, status: 'running', pid: 42, bundle: '/b' }) });
  plan('wait', { stdout: `{"id":"${ID}","exitStatus":137}\n` });
  plan('ps', { stdout: '[1,6]\n' });
  plan('list', { stdout: 'null\n' });
  plan('events', { stdout: '{"type":"stats","id":"x","data":{"memory":{"usage":{"usage":2600960}},"pids":{"current":2}}}\n' });

  await runsc.create(ID, { bundle: '/b', stdio: ['ignore', 'ignore', 'ignore'] });
  await runsc.start(ID);
  t.same(await runsc.state(ID), { ociVersion: '1.0.2-dev', id: ID, status: 'running', pid: 42, bundle: '/b' });
  t.equal(await runsc.wait(ID, { pid: 3 }), 137);
  await runsc.kill(ID, 'SIGKILL', { all: true });
  t.same(await runsc.ps(ID), [1, 6]);
  await runsc.pause(ID);
  await runsc.resume(ID);
  await runsc.checkpoint(ID, { imagePath: '/img', compression: 'none', direct: true });
  await runsc.restore(ID, { bundle: '/b', imagePath: '/img', direct: true, stdio: ['ignore', 'ignore', 'ignore'] });
  const stats = await runsc.events(ID);
  t.equal(stats.memory?.usage?.usage, 2600960);
  t.equal(stats.pids?.current, 2);
  t.same(await runsc.list(), []);
  await runsc.delete(ID, { force: true });

  t.same(calls(), [
    [...G, 'create', '--bundle=/b', ID],
    [...G, 'start', ID],
    [...G, 'state', ID],
    [...G, 'wait', '--pid=3', ID],
    [...G, 'kill', '--all', ID, '9'],
    [...G, 'ps', '--format=json', ID],
    [...G, 'pause', ID],
    [...G, 'resume', ID],
    [...G, 'checkpoint', '--image-path=/img', '--compression=none', '--direct', ID],
    [...G, 'restore', '--detach', '--bundle=/b', '--image-path=/img', '--direct', ID],
    [...G, 'events', '--stats', ID],
    [...G, 'list', '--format=json'],
    [...G, 'delete', '--force', ID],
  ]);
  t.same(readdirSync(scratch), [], 'per-call log files are removed');
});

t.test('pass-through and debug flags come after thaw’s own, before the verb', async (t) => {
  const { runsc, calls } = setup(t, { debugLogDir: '/var/log/runsc', flags: { 'host-uds': 'open' } });
  await runsc.start(ID);
  t.same(calls(), [[...G, '--debug', '--debug-log=/var/log/runsc/', '--host-uds=open', 'start', ID]]);
  t.throws(() => setup(t, { flags: { root: '/elsewhere' } }), { code: 'InvalidArgument' }, 'refused at construction');
});

t.test('failures quote runsc’s log line and map it to a code', async (t) => {
  const { runsc, plan } = setup(t);
  plan('state', {
    exit: 128,
    stderr: 'loading container: file does not exist\n',
    log: '{"msg":"loading container: file does not exist","level":"error","time":"2026-11-26T21:48:16Z"}',
  });
  const err = await runsc.state(ID).then(
    () => undefined,
    (e: unknown) => e,
  );
  t.type(err, RunscError);
  const r = err as RunscError;
  t.equal(r.code, 'NotFound');
  t.equal(r.logLine, 'loading container: file does not exist');
  t.equal(r.exitCode, 128);
  t.equal(r.message, 'runsc state failed: loading container: file does not exist');
  t.equal(r.argv[0], FAKE);
  t.same(r.argv.slice(-2), ['state', ID]);

  plan('create', { exit: 128, log: '{"msg":"creating container: container with id \\"x\\" already exists","level":"error"}' });
  await t.rejects(runsc.create(ID, { bundle: '/b', stdio: ['ignore', 'ignore', 'ignore'] }), { code: 'AlreadyExists' });
  plan('start', { exit: 128, stderr: 'noise\nstarting container: cannot start container "x" in state running\n' });
  await t.rejects(runsc.start(ID), {
    code: 'FailedPrecondition',
    logLine: 'starting container: cannot start container "x" in state running',
  }, 'stderr fallback when the log is empty');
  plan('kill', { exit: 128, log: '{"msg":"id \\"a\\" is ambiguous and could refer to multiple containers","level":"error"}' });
  await t.rejects(runsc.kill(ID, 9), { code: 'FailedPrecondition' });
  plan('pause', { exit: 1 });
  await t.rejects(runsc.pause(ID), { code: 'Unknown', logLine: '', message: 'runsc pause failed: exit status 1' });
});

t.test('unexpected output is an Internal error', async (t) => {
  const { runsc, plan } = setup(t);
  plan('state', { stdout: 'not json' });
  await t.rejects(runsc.state(ID), { code: 'Internal' });
  plan('state', { stdout: '{"id":"x","status":"exploded","pid":1}' });
  await t.rejects(runsc.state(ID), { code: 'Internal' });
  plan('wait', { stdout: '{"id":"x"}' });
  await t.rejects(runsc.wait(ID), { code: 'Internal' });
  plan('ps', { stdout: '[1,"x"]' });
  await t.rejects(runsc.ps(ID), { code: 'Internal' });
});

t.test('timeouts are DeadlineExceeded and kill the child', async (t) => {
  const { runsc, plan } = setup(t);
  plan('checkpoint', { sleepSeconds: 20 });
  const t0 = Date.now();
  await t.rejects(runsc.checkpoint(ID, { imagePath: '/img', timeoutMs: 300 }), { code: 'DeadlineExceeded' });
  t.ok(Date.now() - t0 < 5_000, `returned after ${Date.now() - t0} ms`);
});

t.test('abort is Canceled, before or during the call', async (t) => {
  const { runsc, plan, calls } = setup(t);
  plan('wait', { sleepSeconds: 20 });
  const ac = new AbortController();
  const t0 = Date.now();
  const pending = runsc.wait(ID, { signal: ac.signal });
  setTimeout(() => ac.abort(new Error('shutting down')), 300);
  await t.rejects(pending, { code: 'Canceled' });
  t.ok(Date.now() - t0 < 5_000, `returned after ${Date.now() - t0} ms`);
  const before = calls().length;
  await t.rejects(runsc.start(ID, { signal: AbortSignal.abort() }), { code: 'Canceled' });
  t.equal(calls().length, before, 'an aborted signal starts nothing');
});

t.test('unsafe ids are refused before anything runs', async (t) => {
  const { runsc, calls } = setup(t);
  for (const id of ['', '-rf', '--all', 'a b', 'a/b', '../x', 'x'.repeat(200)]) {
    await t.rejects(runsc.state(id), { code: 'InvalidArgument' }, JSON.stringify(id));
  }
  await t.rejects(runsc.create('-x', { bundle: '/b', stdio: ['ignore', 'ignore', 'ignore'] }), { code: 'InvalidArgument' });
  t.same(calls(), []);
});

t.test('a missing binary is Unavailable', async (t) => {
  const { runsc } = setup(t, { path: '/nonexistent/runsc' });
  await t.rejects(runsc.start(ID), { code: 'Unavailable' });
});

t.test('create hands its stdio fds to runsc and does not wait for the sandbox to let go', async (t) => {
  const { runsc, plan, dir } = setup(t);
  // Like runsc, leave a process holding create's stdio for 20 s.
  plan('create', { stdout: 'to-stdout\n', stderr: 'to-stderr\n', holdStdioSeconds: 20 });
  t.teardown(() => {
    const held = join(dir, 'held.pids');
    if (!existsSync(held)) return;
    for (const pid of readFileSync(held, 'utf8').trim().split('\n')) {
      try {
        process.kill(Number(pid), 'SIGKILL');
      } catch {
        /* already gone */
      }
    }
  });
  const outFile = join(dir, 'out.txt');
  const errFile = join(dir, 'err.txt');
  const out = openSync(outFile, 'a');
  const errFd = openSync(errFile, 'a');
  try {
    const t0 = Date.now();
    await runsc.create(ID, { bundle: '/b', stdio: ['ignore', out, errFd], timeoutMs: 10_000 });
    t.ok(Date.now() - t0 < 5_000, `create returned after ${Date.now() - t0} ms`);
  } finally {
    closeSync(out);
    closeSync(errFd);
  }
  t.equal(readFileSync(outFile, 'utf8'), 'to-stdout\n');
  t.equal(readFileSync(errFile, 'utf8'), 'to-stderr\n');

  // With fds, the error text can only come from runsc's log file.
  plan('restore', { exit: 128, stderr: 'on the container stderr\n', log: '{"msg":"restoring: bad image","level":"error"}' });
  const fd = openSync(join(dir, 'restore-err.txt'), 'a');
  try {
    await t.rejects(runsc.restore(ID, { bundle: '/b', imagePath: '/img', stdio: ['ignore', 'ignore', fd] }), {
      code: 'Unknown',
      logLine: 'restoring: bad image',
    });
  } finally {
    closeSync(fd);
  }
  t.equal(readFileSync(join(dir, 'restore-err.txt'), 'utf8'), 'on the container stderr\n', 'stderr went to the given fd');
});

t.test('exec writes process.json, reads both pid files and cleans up', async (t) => {
  const { runsc, plan, calls, scratch } = setup(t);
  plan('exec', { files: { 'pid-file': '4242', 'internal-pid-file': '7' } });
  const result = await runsc.exec(ID, { process: { args: ['/bin/sh'], cwd: '/' }, stdio: ['ignore', 'ignore', 'ignore'] });
  t.same(result, { pid: 4242, internalPid: 7 });
  const argv = calls()[0]!;
  const processArg = argv.find((a) => a.startsWith('--process='));
  t.ok(processArg, 'passes --process');
  t.same(argv.slice(G.length, G.length + 2), ['exec', '--detach']);
  t.equal(argv.at(-1), ID);
  t.same(readdirSync(scratch), [], 'process.json, pid files and log removed');

  plan('exec', { files: { 'pid-file': '' } });
  await t.rejects(runsc.exec(ID, { args: ['true'], stdio: ['ignore', 'ignore', 'ignore'] }), { code: 'Internal' });
});

t.test('version and capabilities come from the probe, once', async (t) => {
  clearProbeCache();
  const { runsc, plan, calls } = setup(t);
  const read = (name: string) => readFileSync(new URL(`../fixtures/runsc/20240729/${name}.txt`, import.meta.url), 'utf8');
  plan('version', { stdout: read('version') });
  plan('help-checkpoint', { stdout: read('help-checkpoint') });
  plan('help-restore', { stdout: read('help-restore') });
  plan('flags', { stderr: read('flags') });
  await t.rejects(runsc.capabilities({ signal: AbortSignal.abort() }), { code: 'Canceled' });
  t.equal(await runsc.version(), '0.0~20240729.0');
  const caps = await runsc.capabilities();
  t.equal(caps.restoreBackground, false);
  t.equal(caps.nvproxy, true, 'reads `runsc flags` from stderr');
  t.same(calls().sort(), [['--version'], ['flags'], ['help', 'checkpoint'], ['help', 'restore']].sort(), 'no global flags, probed once');
  clearProbeCache();
});

t.test('create refuses an id that already has runsc state, without running runsc', async (t) => {
  const { dir, calls } = setup(t);
  const root = join(dir, 'root');
  mkdirSync(root);
  writeFileSync(join(root, `${ID}_sandbox:${ID}.state`), '{}');
  const runsc = new Runsc({ path: FAKE, root, platform: 'systrap', network: 'none', debugLogDir: null, flags: {} });
  await t.rejects(runsc.create(ID, { bundle: '/b', stdio: ['ignore', 'ignore', 'ignore'] }), { code: 'AlreadyExists' });
  t.same(calls(), [], 'runsc create would have orphaned the existing sandbox');
  const other = 'fedcba9876543210fedcba9876543210';
  await runsc.create(other, { bundle: '/b', stdio: ['ignore', 'ignore', 'ignore'] });
  t.equal(calls().length, 1, 'other ids are created');
});

t.test('the verbs that leave processes behind run inside the adopter; the others do not', async (t) => {
  const inside: string[] = [];
  let calls = (): string[][] => [];
  const adopter = {
    adopting: async <T>(fn: () => Promise<T>): Promise<T> => {
      const before = calls().length;
      const result = await fn();
      for (const argv of calls().slice(before)) inside.push(argv[G.length] ?? '');
      return result;
    },
  };
  const s = setup(t, { adopter, root: join(t.testdirName, 'root') });
  calls = s.calls;
  const { runsc, plan, dir } = s;
  plan('exec', { files: { 'pid-file': '4242', 'internal-pid-file': '7' } });
  plan('state', { stdout: JSON.stringify({ ociVersion: '1.0.2', id: ID, status: 'running', pid: 42, bundle: '/b' }) });
  plan('wait', { stdout: `{"exitStatus":0}` });
  await runsc.create(ID, { bundle: '/b', stdio: ['ignore', 'ignore', 'ignore'] });
  await runsc.start(ID);
  await runsc.restore(ID, { bundle: '/b', imagePath: dir, stdio: ['ignore', 'ignore', 'ignore'] });
  await runsc.exec(ID, { args: ['true'], stdio: ['ignore', 'ignore', 'ignore'] });
  await runsc.state(ID);
  await runsc.wait(ID);
  t.same(inside, ['create', 'restore', 'exec']);
  t.equal(calls().length, 6);
});

t.test('isSandboxRoot: from the name of runsc state file', async (t) => {
  const { dir } = setup(t);
  const root = join(dir, 'root');
  mkdirSync(root);
  const runsc = new Runsc({ path: FAKE, root, platform: 'systrap', network: 'none', debugLogDir: null, flags: {} });
  const joined = 'fedcba9876543210fedcba9876543210';
  writeFileSync(join(root, `${ID}_sandbox:${ID}.state`), '{}');
  writeFileSync(join(root, `${joined}_sandbox:${ID}.state`), '{}');
  t.equal(await runsc.isSandboxRoot(ID), true);
  t.equal(await runsc.isSandboxRoot(joined), false, 'joined another container’s sandbox');
  t.equal(await runsc.isSandboxRoot('00000000000000000000000000000000'), false, 'no state');
});
