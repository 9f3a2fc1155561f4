/**
 * `Runc.update`: `runc update --resources - ID` after the global flags, the OCI LinuxResources JSON on
 * runc's stdin, and runc's error line quoted on failure. A small recording script stands in for runc
 * (test/fixtures/bin/fake-runc does not keep stdin).
 */
import { chmodSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { Runc } from '../../src/runc/runc.js';

const ID = '0123456789abcdef0123456789abcdef';

function recordingRunc(dir: string, { exit = 0, log = '' }: { exit?: number; log?: string } = {}): string {
  const script = join(dir, 'runc');
  // Appends runc's JSON error record to the `--log FILE` it was given, as runc does.
  writeFileSync(
    script,
    `#!/bin/sh
printf '%s\\n' "$@" > "${dir}/argv"
cat > "${dir}/stdin"
prev=
for a in "$@"; do [ "$prev" = --log ] && printf '%s\\n' '${log}' >> "$a"; prev=$a; done
exit ${exit}
`,
  );
  chmodSync(script, 0o755);
  return script;
}

t.test('update passes the resources as JSON on stdin', async (t) => {
  const dir = t.testdir();
  const runc = new Runc({ path: recordingRunc(dir), root: '/run/thaw-test/runc', criuPath: '/bin/false', scratchDir: join(dir, 'scratch') });
  const resources = { memory: { limit: 268435456, swap: 268435456 }, cpu: { quota: 50000, period: 100000 } };
  await runc.update(ID, resources);
  const argv = readFileSync(join(dir, 'argv'), 'utf8').trim().split('\n');
  t.same(argv.slice(-4), ['update', '--resources', '-', ID], 'verb and flags last, after the global flags');
  t.equal(argv[0], '--root');
  t.same(JSON.parse(readFileSync(join(dir, 'stdin'), 'utf8')), resources, 'stdin holds the LinuxResources JSON');
});

t.test('a failed update quotes runc and refuses unsafe ids', async (t) => {
  const dir = t.testdir();
  const log = JSON.stringify({ level: 'error', msg: 'container does not exist', time: 'x' });
  const runc = new Runc({ path: recordingRunc(dir, { exit: 1, log }), root: '/run/thaw-test/runc', criuPath: '/bin/false', scratchDir: join(dir, 'scratch') });
  await t.rejects(runc.update(ID, { pids: { limit: 5 } }), { code: 'NotFound', message: 'runc update failed: container does not exist' });
  await t.rejects(runc.update('-x', {}), { code: 'InvalidArgument' });
});
