import t from 'tap';
import {
  describeHook,
  parseDuration,
  parseHook,
  parseTriggerPolicy,
  TriggerConfigError,
  wantsControlDir,
} from '../../src/trigger/policy.js';

t.test('trigger kinds', async (t) => {
  t.same(parseTriggerPolicy({}).trigger, { kind: 'off' }, 'no annotation: off');
  for (const kind of ['off', 'manual', 'on-request'] as const) {
    t.same(parseTriggerPolicy({ 'thaw.dev/checkpoint': kind }).trigger, { kind });
  }
  t.same(parseTriggerPolicy({ 'thaw.dev/checkpoint': ' after:1m30s ' }).trigger, { kind: 'after', delayMs: 90_000 });
  t.same(parseTriggerPolicy({ 'thaw.dev/checkpoint': 'after: 250ms' }).trigger, { kind: 'after', delayMs: 250 });
  const ready = parseTriggerPolicy({ 'thaw.dev/checkpoint': 'when-ready', 'thaw.dev/ready-exec': '["/bin/test","-e","/tmp/ready"]' });
  t.same(ready.trigger, { kind: 'when-ready' });
  t.same(ready.ready, { kind: 'exec', argv: ['/bin/test', '-e', '/tmp/ready'] });
  const httpReady = parseTriggerPolicy({ 'thaw.dev/checkpoint': 'when-ready', 'thaw.dev/ready-exec': 'http://127.0.0.1:8000/health' });
  t.same(httpReady.ready, { kind: 'http', method: 'GET', url: 'http://127.0.0.1:8000/health', body: null }, 'an HTTP probe defaults to GET');
});

t.test('annotations win over config defaults', async (t) => {
  const defaults = { 'thaw.dev/checkpoint': 'after:10s', 'thaw.dev/hook-timeout': '5s' };
  const p = parseTriggerPolicy({ 'thaw.dev/checkpoint': 'on-request' }, defaults);
  t.same(p.trigger, { kind: 'on-request' });
  t.equal(p.hookTimeoutMs, 5_000);
  t.same(parseTriggerPolicy({}, defaults).trigger, { kind: 'after', delayMs: 10_000 });
});

t.test('bad configuration names the annotation, the value and what is accepted', async (t) => {
  const rows: [Record<string, string>, string, RegExp][] = [
    [{ 'thaw.dev/checkpoint': 'sometimes' }, 'thaw.dev/checkpoint', /unknown trigger: use off, manual, on-request, when-ready or after:DURATION/],
    [{ 'thaw.dev/checkpoint': 'after:5x' }, 'thaw.dev/checkpoint', /"after:5x".*not a duration/],
    [{ 'thaw.dev/checkpoint': 'after:' }, 'thaw.dev/checkpoint', /empty duration/],
    [{ 'thaw.dev/checkpoint': 'after:0s' }, 'thaw.dev/checkpoint', /must be positive/],
    [{ 'thaw.dev/checkpoint': 'after:30d' }, 'thaw.dev/checkpoint', /not a duration/],
    [{ 'thaw.dev/checkpoint': 'after:1000h' }, 'thaw.dev/checkpoint', /longer than 24 days/],
    [{ 'thaw.dev/checkpoint': 'when-ready' }, 'thaw.dev/checkpoint', /needs a readiness probe in thaw.dev\/ready-exec/],
    [{ 'thaw.dev/pre-checkpoint': '["/bin/sh", 1]' }, 'thaw.dev/pre-checkpoint', /non-empty JSON array of strings/],
    [{ 'thaw.dev/pre-checkpoint': '[]' }, 'thaw.dev/pre-checkpoint', /non-empty JSON array/],
    [{ 'thaw.dev/pre-checkpoint': '["/bin/sh",' }, 'thaw.dev/pre-checkpoint', /not a valid JSON array/],
    [{ 'thaw.dev/pre-checkpoint': '/bin/quiesce' }, 'thaw.dev/pre-checkpoint', /use a JSON array .* or \[METHOD \]http/],
    [{ 'thaw.dev/post-restore': 'https://127.0.0.1/x' }, 'thaw.dev/post-restore', /only http:\/\/ is supported/],
    [{ 'thaw.dev/post-restore': 'POST http://127.0.0.1/x {bad' }, 'thaw.dev/post-restore', /body after the URL must be JSON/],
    [{ 'thaw.dev/hook-timeout': 'soon' }, 'thaw.dev/hook-timeout', /not a duration/],
    [{ 'thaw.dev/kv-cache': 'drop' }, 'thaw.dev/kv-cache', /use keep or discard/],
    [{ 'thaw.dev/kv-cache': 'discard', 'thaw.dev/kv-cache-preset': 'tgi' }, 'thaw.dev/kv-cache-preset', /use vllm, sglang or generic/],
    [{ 'thaw.dev/kv-cache': 'discard', 'thaw.dev/kv-cache-preset': 'generic' }, 'thaw.dev/kv-cache-preset', /needs both/],
    [{ 'thaw.dev/kv-cache': 'discard', 'thaw.dev/kv-cache-url': 'localhost:8000' }, 'thaw.dev/kv-cache-url', /http:\/\//],
  ];
  for (const [annotations, name, msg] of rows) {
    try {
      parseTriggerPolicy({ 'thaw.dev/checkpoint': 'manual', ...annotations });
      t.fail(`accepted ${JSON.stringify(annotations)}`);
    } catch (err) {
      t.type(err, TriggerConfigError, JSON.stringify(annotations));
      const e = err as TriggerConfigError;
      t.equal(e.annotation, name);
      t.equal(e.code, 'InvalidArgument');
      t.match(e.message, new RegExp(`^annotation ${name.replace('/', '\\/')}=`));
      t.match(e.message, msg);
    }
  }
});

t.test('durations', async (t) => {
  t.equal(parseDuration('500ms'), 500);
  t.equal(parseDuration('90s'), 90_000);
  t.equal(parseDuration('1h30m'), 5_400_000);
  t.equal(parseDuration('1.5s'), 1_500);
  t.throws(() => parseDuration('10'), /not a duration/, 'a unit is required');
  t.throws(() => parseDuration('-5s'), /not a duration/);
  t.throws(() => parseDuration('5 s'), /not a duration/);
});

t.test('hooks', async (t) => {
  t.same(parseHook('x', '["/bin/true"]'), { kind: 'exec', argv: ['/bin/true'] });
  t.same(parseHook('x', 'http://127.0.0.1:8000/sleep?level=1'), { kind: 'http', method: 'POST', url: 'http://127.0.0.1:8000/sleep?level=1', body: null });
  t.same(parseHook('x', 'GET http://localhost:8000/health'), { kind: 'http', method: 'GET', url: 'http://localhost:8000/health', body: null });
  t.same(parseHook('x', 'PUT http://127.0.0.1:9/a {"tags": ["kv_cache"]}'), { kind: 'http', method: 'PUT', url: 'http://127.0.0.1:9/a', body: '{"tags": ["kv_cache"]}' });
  t.equal(describeHook({ kind: 'http', method: 'POST', url: 'http://h/x', body: '{}' }), 'POST http://h/x {}');
  t.equal(describeHook({ kind: 'exec', argv: ['a', 'b c'] }), '["a","b c"]');
});

t.test('kv-cache presets', async (t) => {
  t.same(parseTriggerPolicy({}).kvCache, { mode: 'keep' });
  const vllm = parseTriggerPolicy({ 'thaw.dev/kv-cache': 'discard' }).kvCache;
  t.same(vllm, {
    mode: 'discard',
    preset: 'vllm',
    release: { kind: 'http', method: 'POST', url: 'http://127.0.0.1:8000/sleep?level=1', body: null },
    reacquire: { kind: 'http', method: 'POST', url: 'http://127.0.0.1:8000/wake_up', body: null },
  }, 'vllm is the default preset');
  const sglang = parseTriggerPolicy({ 'thaw.dev/kv-cache': 'discard', 'thaw.dev/kv-cache-preset': 'sglang', 'thaw.dev/kv-cache-url': 'http://127.0.0.1:31000/' }).kvCache;
  t.same(sglang, {
    mode: 'discard',
    preset: 'sglang',
    release: { kind: 'http', method: 'POST', url: 'http://127.0.0.1:31000/release_memory_occupation', body: '{"tags":["kv_cache"]}' },
    reacquire: { kind: 'http', method: 'POST', url: 'http://127.0.0.1:31000/resume_memory_occupation', body: '{"tags":["kv_cache"]}' },
  });
  const generic = parseTriggerPolicy({
    'thaw.dev/kv-cache': 'discard',
    'thaw.dev/kv-cache-discard': 'POST http://127.0.0.1:9000/free',
    'thaw.dev/kv-cache-restore': '["/app/realloc"]',
  }).kvCache;
  t.same(generic, {
    mode: 'discard',
    preset: 'generic',
    release: { kind: 'http', method: 'POST', url: 'http://127.0.0.1:9000/free', body: null },
    reacquire: { kind: 'exec', argv: ['/app/realloc'] },
  }, 'generic is implied by the discard hook');
});

t.test('the control dir is mounted iff the trigger annotation is there and not off', async (t) => {
  t.equal(wantsControlDir({}), false);
  t.equal(wantsControlDir({ 'thaw.dev/checkpoint': 'off' }), false);
  t.equal(wantsControlDir({ 'thaw.dev/checkpoint': 'manual' }), true);
  t.equal(wantsControlDir({ 'thaw.dev/checkpoint': 'bogus' }), true, 'an invalid value still mounts: the key does not depend on validity');
  t.equal(wantsControlDir({}, { 'thaw.dev/checkpoint': 'on-request' }), true, 'a config default counts');
  t.equal(wantsControlDir({ 'thaw.dev/checkpoint': 'on-request', 'io.kubernetes.cri.container-type': 'sandbox' }), false, 'never the pod sandbox');
  t.same(parseTriggerPolicy({ 'thaw.dev/checkpoint': 'after:1s', 'io.kubernetes.cri.container-type': 'sandbox' }).trigger, { kind: 'off' });
});
