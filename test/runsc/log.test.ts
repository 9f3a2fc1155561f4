import t from 'tap';
import { lastErrorLine, lastNonEmptyLine, parseRunscLog, translateRunscError } from '../../src/runsc/log.js';

// As runsc 20240729 appends them: no newline between records.
const captured =
  '{"msg":"loading container: file does not exist","level":"error","time":"2026-11-26T21:48:22.890990737Z"}' +
  '{"msg":"reading spec: error opening spec file \\"/nonexist/config.json\\": open /nonexist/config.json: no such file or directory","level":"error","time":"2026-11-26T21:49:38.734573634Z"}';

t.test('parses concatenated JSON records, quotes and braces inside strings included', async (t) => {
  const records = parseRunscLog(captured);
  t.equal(records.length, 2);
  t.equal(records[0]?.msg, 'loading container: file does not exist');
  t.equal(records[1]?.msg, 'reading spec: error opening spec file "/nonexist/config.json": open /nonexist/config.json: no such file or directory');
  const tricky = '{"msg":"a } { \\" b","level":"warning"}\n{"log":"sandbox.go:12] k8s style","level":"error"}';
  t.same(parseRunscLog(tricky), [
    { msg: 'a } { " b', level: 'warning' },
    { msg: 'k8s style', level: 'error' },
  ]);
  t.same(parseRunscLog('garbage {not json} {"level":"error"} tail {"msg":'), [], 'skips non-records and truncated tails');
});

t.test('last error line: error records first, then any record, then stderr', async (t) => {
  t.equal(lastErrorLine(captured, 'ignored stderr'), 'reading spec: error opening spec file "/nonexist/config.json": open /nonexist/config.json: no such file or directory');
  const mixed = '{"msg":"first error","level":"error"}{"msg":"later warning","level":"warning"}';
  t.equal(lastErrorLine(mixed), 'first error');
  t.equal(lastErrorLine('{"msg":"FATAL ERROR: boom","level":"warning"}{"msg":"noise","level":"info"}'), 'boom');
  t.equal(lastErrorLine('{"msg":"only a warning","level":"warning"}'), 'only a warning');
  t.equal(lastErrorLine('', 'line one\nthe real error\n\n  \n'), 'the real error');
  t.equal(lastErrorLine('', ''), '');
  t.equal(lastNonEmptyLine('\n\n'), '');
});

t.test('known runsc texts map to error codes', async (t) => {
  const table: [string, string][] = [
    ['loading container: file does not exist', 'NotFound'],
    ['container "x" not found', 'NotFound'],
    ['id "lr" is ambiguous and could refer to multiple containers: "lr-src", "lr"', 'FailedPrecondition'],
    ['creating container: container with id "x" already exists', 'AlreadyExists'],
    ['cannot start container "x" in state running', 'FailedPrecondition'],
    ['cannot pause container "x" in state stopped', 'FailedPrecondition'],
    ['signaling container: sandbox is not running', 'FailedPrecondition'],
    ['waiting on container "x": sandbox no longer running and its exit status is unavailable', 'FailedPrecondition'],
    ['cannot delete container that is not stopped without --force flag', 'FailedPrecondition'],
    ['checkpoint failed: something odd', 'Unknown'],
    ['', 'Unknown'],
  ];
  for (const [line, code] of table) t.equal(translateRunscError(line), code, line);
});
