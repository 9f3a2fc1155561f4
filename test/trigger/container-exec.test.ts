import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import t, { type Test } from 'tap';
import { resolveConfig } from '../../src/config/config.js';
import { GvisorEngine } from '../../src/engine/gvisor.js';
import { runtimeIdFor } from '../../src/engine/container-id.js';
import { containerExecFor } from '../../src/trigger/container-exec.js';

const FAKE = fileURLToPath(new URL('../fixtures/bin/fake-runsc', import.meta.url));
const RID = runtimeIdFor('c1', 'ns');

/** containerExecFor over a GvisorEngine whose runsc is fake-runsc (see its header). */
function setup(t: Test) {
  const dir = t.testdir();
  const state = join(dir, 'state');
  mkdirSync(join(state, 'tmp'), { recursive: true });
  process.env.FAKE_RUNSC_DIR = dir;
  const config = resolveConfig({ stateDir: state, runsc: { path: FAKE, flags: { 'host-uds': 'open' } } });
  const engine = new GvisorEngine({ config, namespace: 'ns' });
  const exec = containerExecFor({ config, engine, id: 'c1', namespace: 'ns', process: { args: ['/app'], env: ['PATH=/bin'], cwd: '/srv', user: { uid: 7, gid: 7 }, terminal: true } });
  const put = (name: string, text: string | number): void => writeFileSync(join(dir, name), String(text));
  const calls = (): string[][] =>
    existsSync(join(dir, 'calls'))
      ? readFileSync(join(dir, 'calls'), 'utf8')
          .split('\x1e')
          .slice(0, -1)
          .map((c) => c.split('\x1f').slice(0, -1))
      : [];
  return { dir, state, exec, put, calls };
}

t.test('gVisor: a foreground runsc exec with the container settings; its exit code is the process exit code', async (t) => {
  const s = setup(t);
  s.put('exec.exit', 3);
  s.put('exec.stdout', 'out line\n');
  const r = await s.exec.run({ argv: ['/bin/probe', '-x'], env: ['THAW_HOOK=ready'], timeoutMs: 5_000 });
  t.equal(r.exitCode, 3);
  t.equal(r.output, 'out line');
  const [argv] = s.calls();
  t.match(argv, [`--root=${join(s.state, 'runsc')}`, '--platform=systrap', '--network=none', /^--log=/, '--log-format=json', '--host-uds=open', 'exec', /^--process=/, /^--internal-pid-file=/, RID]);
  t.notOk(argv?.includes('--detach'), 'not detached: runsc waits and exits with the status');
  t.same(await import('node:fs/promises').then((f) => f.readdir(join(s.state, 'tmp'))), [], 'its scratch files are removed');
});

t.test('the process spec is the container process with the hook argv, extra env, no terminal', async (t) => {
  const s = setup(t);
  // A runsc that prints the process file it was given (thaw deletes it afterwards).
  const fake = join(s.dir, 'runsc-cat');
  writeFileSync(fake, `#!/bin/sh\nfor a in "$@"; do case $a in --process=*) cat "\${a#--process=}";; esac; done\n`, { mode: 0o755 });
  const config = resolveConfig({ stateDir: s.state, runsc: { path: fake } });
  const engine = new GvisorEngine({ config, namespace: 'ns' });
  const exec = containerExecFor({ config, engine, id: 'c1', namespace: 'ns', process: { args: ['/app'], env: ['PATH=/bin'], cwd: '/srv', user: { uid: 7, gid: 7 }, terminal: true } });
  const r = await exec.run({ argv: ['/bin/probe'], env: ['THAW_HOOK=ready'], timeoutMs: 5_000 });
  t.same(JSON.parse(r.output), { args: ['/bin/probe'], env: ['PATH=/bin', 'THAW_HOOK=ready'], cwd: '/srv', user: { uid: 7, gid: 7 }, terminal: false });
});

t.test("runsc's own failure (exit 128 with an error record) is not a hook exit code", async (t) => {
  const s = setup(t);
  s.put('exec.exit', 128);
  s.put('exec.log', '{"msg":"cannot exec in container: failed to load /bin/probe: no such file or directory","level":"error","time":"x"}');
  await t.rejects(s.exec.run({ argv: ['/bin/probe'], timeoutMs: 5_000 }), {
    code: 'FailedPrecondition',
    message: 'runsc exec failed: cannot exec in container: failed to load /bin/probe: no such file or directory',
  });
});

t.test('a hook past its timeout is killed inside the sandbox by pid', async (t) => {
  const s = setup(t);
  // Like runsc: the internal pid file is written when the process starts, then it runs (3 s here).
  const slow = join(s.dir, 'runsc-slow');
  writeFileSync(slow, `#!/bin/sh\nfor a in "$@"; do case $a in --internal-pid-file=*) echo 42 > "\${a#--internal-pid-file=}";; esac; done\nexec "${FAKE}" "$@"\n`, {
    mode: 0o755,
  });
  const config = resolveConfig({ stateDir: s.state, runsc: { path: slow } });
  const engine = new GvisorEngine({ config, namespace: 'ns' });
  const exec = containerExecFor({ config, engine, id: 'c1', namespace: 'ns', process: { args: ['/app'] } });
  s.put('exec.sleep', 3);
  const t0 = Date.now();
  await t.rejects(exec.run({ argv: ['/bin/sleep', '600'], timeoutMs: 300 }), { code: 'DeadlineExceeded', message: /^timed out after 300 ms \(killed\)/ });
  t.ok(Date.now() - t0 < 6_000, 'returns soon after the timeout');
  const kill = s.calls().find((c) => c.includes('kill'));
  t.match(kill?.slice(-4), ['kill', '--pid=42', RID, '9'], 'runsc kill --pid of the hook process');
});
