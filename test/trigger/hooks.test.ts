import { createServer } from 'node:http';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, symlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { AddressInfo } from 'node:net';
import { execa } from 'execa';
import t from 'tap';
import { HookError, HookRunner, hookArgv } from '../../src/trigger/hooks.js';
import type { ContainerExec, ExecRequest } from '../../src/trigger/container-exec.js';
import { ShimError } from '../../src/errors.js';

t.test('a command hook runs as given, with THAW_HOOK and the extra env', async (t) => {
  const seen: ExecRequest[] = [];
  const exec: ContainerExec = { run: async (req) => (seen.push(req), { exitCode: 0, output: 'ok', durationMs: 3 }) };
  const r = await new HookRunner(exec).run('pre-checkpoint', { kind: 'exec', argv: ['/bin/quiesce', '--now'] }, { timeoutMs: 1234, env: ['THAW_PHASE=checkpoint'] });
  t.same(r, { durationMs: 3, output: 'ok' });
  t.same(seen[0]?.argv, ['/bin/quiesce', '--now']);
  t.same(seen[0]?.env, ['THAW_HOOK=pre-checkpoint', 'THAW_PHASE=checkpoint']);
  t.equal(seen[0]?.timeoutMs, 1234);
});

t.test('failures name the hook, the command and the exit or the timeout', async (t) => {
  const failing: ContainerExec = { run: async () => ({ exitCode: 3, output: 'model busy', durationMs: 1 }) };
  await t.rejects(new HookRunner(failing).run('pre-checkpoint', { kind: 'exec', argv: ['/bin/false'] }, { timeoutMs: 10 }), {
    name: 'HookError',
    hook: 'pre-checkpoint',
    exitCode: 3,
    message: 'pre-checkpoint hook ["/bin/false"] exited with 3: model busy',
  });
  const hanging: ContainerExec = { run: async () => Promise.reject(new ShimError('DeadlineExceeded', 'timed out after 10 ms (killed)')) };
  const err = await new HookRunner(hanging).run('post-restore', { kind: 'exec', argv: ['/bin/sleep', '60'] }, { timeoutMs: 10 }).catch((e: unknown) => e);
  t.type(err, HookError);
  t.equal((err as HookError).code, 'DeadlineExceeded');
  t.match((err as HookError).message, /^post-restore hook \["\/bin\/sleep","60"\] hung: timed out after 10 ms/);
  const noClient: ContainerExec = { run: async () => ({ exitCode: 127, output: 'thaw: no HTTP client', durationMs: 1 }) };
  await t.rejects(new HookRunner(noClient).run('kv-cache-discard', { kind: 'http', method: 'POST', url: 'http://127.0.0.1:1/x', body: null }, { timeoutMs: 10 }), {
    message: /found no HTTP client in the container/,
  });
});

/**
 * The HTTP hook's shell script, run on this host against a local server: the busybox-wget branch
 * (PATH without curl, wget and python3, as in the test image) and, when present, python3 and curl.
 */
t.test('the HTTP hook script calls the URL with each client', { skip: existsSync('/bin/busybox') ? false : 'busybox not installed' }, async (t) => {
  const calls: string[] = [];
  const server = createServer((req, res) => {
    let body = '';
    req.on('data', (c: Buffer) => (body += c.toString()));
    req.on('end', () => {
      calls.push(`${req.method} ${req.url} ${req.headers['content-type'] ?? '-'} ${body}`);
      res.statusCode = req.url?.startsWith('/fail') ? 500 : 200;
      res.end('done');
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  t.teardown(() => server.close());
  const base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  const run = async (path: string, hook: Parameters<typeof hookArgv>[0]): Promise<number | undefined> => {
    const argv = hookArgv(hook, 5_000);
    t.equal(argv[0], '/bin/sh');
    const r = await execa('/bin/busybox', ['sh', ...argv.slice(1)], { reject: false, env: { PATH: path }, extendEnv: false });
    return r.exitCode;
  };
  const clients: [string, string][] = [['busybox wget', '/nonexistent']];
  const pythonDir = ['/usr/bin', '/usr/local/bin'].find((d) => existsSync(`${d}/python3`));
  if (pythonDir) {
    // A PATH holding only python3, and one with curl (which the script prefers).
    const only = await mkdtemp(join(tmpdir(), 'thaw-hook-py-'));
    t.teardown(() => rm(only, { recursive: true, force: true }));
    await symlink(`${pythonDir}/python3`, join(only, 'python3'));
    clients.push(['python3', only]);
  }
  const curlDir = ['/usr/bin', '/usr/local/bin'].find((d) => existsSync(`${d}/curl`));
  if (curlDir) clients.push(['curl', curlDir]);
  for (const [name, path] of clients) {
    calls.length = 0;
    t.equal(await run(path, { kind: 'http', method: 'POST', url: `${base}/sleep?level=1`, body: null }), 0, `${name}: POST`);
    t.equal(await run(path, { kind: 'http', method: 'POST', url: `${base}/release`, body: '{"tags":["kv_cache"]}' }), 0, `${name}: POST with a body`);
    t.equal(await run(path, { kind: 'http', method: 'GET', url: `${base}/health`, body: null }), 0, `${name}: GET`);
    t.not(await run(path, { kind: 'http', method: 'POST', url: `${base}/fail`, body: null }), 0, `${name}: a 500 fails the hook`);
    t.match(calls, [/^POST \/sleep\?level=1 \S+ $/, /^POST \/release application\/json \{"tags":\["kv_cache"\]\}$/, /^GET \/health - $/, /^POST \/fail/], `${name}: the calls as the server saw them`);
  }
  t.equal(await run('/nonexistent', { kind: 'http', method: 'PUT', url: `${base}/x`, body: null }), 127, 'busybox wget cannot PUT: exit 127');
});
