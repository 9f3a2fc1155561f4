import { chmodSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import {
  clearCriuVersionCache,
  criuCheck,
  criuErrorLine,
  criuVersion,
  parseCriuLog,
  parseCriuVersion,
  readCriuError,
} from '../../src/runc/criu.js';

const DUMP_FAILED = `(00.000000) Version: 4.1.1 (gitid 0)
(00.046402) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.050000) Warn  (criu/kerndat.c:1285): Can't keep kdat cache on non-tempfs
(00.060112) Error (criu/files-reg.c:1790): Can't lookup mount=27 for fd=1 path=/tmp/nx/f.out
(00.060136) Error (criu/cr-dump.c:1681): Dump files (pid: 7866) failed with -1
(00.079135) Error (criu/cr-dump.c:2111): Dumping FAILED.
`;

t.test('parses CRIU log records', async (t) => {
  const recs = parseCriuLog(DUMP_FAILED + 'not a record\n');
  t.equal(recs.length, 6);
  t.same(recs[3], { time: 0.060112, level: 'Error', source: 'criu/files-reg.c:1790', message: "Can't lookup mount=27 for fd=1 path=/tmp/nx/f.out" });
  t.equal(recs[2]!.level, 'Warn');
  t.equal(recs[0]!.level, 'Other');
});

t.test('quotes the cause, not the harmless lines or the summaries', async (t) => {
  t.equal(criuErrorLine(DUMP_FAILED), "Can't lookup mount=27 for fd=1 path=/tmp/nx/f.out (criu/files-reg.c:1790)");
  t.equal(
    criuErrorLine(`(00.043480) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.060727) Error (criu/cr-restore.c:1230): Can't fork for 8567: File exists
(00.061273) Error (criu/cr-restore.c:2320): Restoring FAILED.
(00.063003) Error (criu/cgroup.c:1998): cg: cgroupd: recv req error: No such file or directory
`),
    "Can't fork for 8567: File exists (criu/cr-restore.c:1230)",
  );
  t.equal(criuErrorLine('(00.079135) Error (criu/cr-dump.c:2111): Dumping FAILED.\n'), 'Dumping FAILED. (criu/cr-dump.c:2111)', 'a summary beats nothing');
  t.equal(criuErrorLine("(00.04) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: x\n"), '', 'harmless only');
  t.equal(criuErrorLine(''), '');
});

t.test('reads the log of an action from the work dir', async (t) => {
  const dir = t.testdir({ 'dump.log': DUMP_FAILED });
  t.match(await readCriuError(dir, 'dump'), /Can't lookup mount=27/);
  t.equal(await readCriuError(dir, 'restore'), '', 'no log, no line');
});

t.test('version and check probe the binary', async (t) => {
  const dir = t.testdir();
  const good = join(dir, 'criu');
  writeFileSync(
    good,
    '#!/bin/sh\ncase $1 in\n--version) printf "Version: 4.1.1\\n";;\ncheck) echo "Warn  (criu/kerndat.c:1285): Can\'t keep kdat cache on non-tempfs" >&2; echo "Looks good.";;\nesac\n',
  );
  chmodSync(good, 0o755);
  const bad = join(dir, 'bad');
  writeFileSync(bad, '#!/bin/sh\necho "Error (criu/kerndat.c:1): vdso: Unexpected rt vDSO area bounds" >&2\nexit 1\n');
  chmodSync(bad, 0o755);
  clearCriuVersionCache();
  t.equal(await criuVersion(good), '4.1.1');
  const fine = await criuCheck(good);
  t.equal(fine.ok, true);
  t.match(fine.output, /kdat cache/, 'warnings are kept');
  const checked = await criuCheck(bad);
  t.equal(checked.ok, false);
  t.match(checked.output, /vDSO/);
  await t.rejects(criuVersion(bad), { code: 'Unavailable' });
  await t.rejects(criuVersion(join(dir, 'missing')), { code: 'Unavailable' });
  await t.rejects(criuCheck(join(dir, 'missing')), { code: 'Unavailable' });
  t.equal(parseCriuVersion('Version: 4.1.1\nGitID: v4.1.1\n'), '4.1.1');
  t.equal(parseCriuVersion('nope'), null);
});
