import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { NativeIoError } from '../../src/errors.js';
import { createLogger } from '../../src/log/logger.js';
import { IO_BACKEND_ENV, availableBackends, ioFileHasher, ioStageReader, isUringRefused, openIo } from '../../src/restore/io.js';
import { loadNativeIo, type NativeBackendName, type NativeIoBinding } from '../../src/restore/native.js';
import { xxh64Hex } from '../../src/snapshot/hash.js';

/** How openIo picks a backend: env override, the io_uring → aio → pread → ts chain, one log line per refusal. */

interface LogLine {
  level: number;
  msg: string;
  backend?: string;
  errno?: string;
  fallback?: string;
  wanted?: string;
}

function capture(): { log: ReturnType<typeof createLogger>; lines: LogLine[] } {
  const lines: LogLine[] = [];
  const log = createLogger({ level: 'debug', destination: { write: (s: string) => lines.push(JSON.parse(s) as LogLine) } });
  return { log, lines };
}

/** A stand-in addon whose probe answers from a table (-1 = EPERM) and whose calls fail like a refused ring. */
function fakeBinding(probes: Partial<Record<NativeBackendName, number>>): NativeIoBinding {
  const refused = (): Promise<never> =>
    Promise.reject(
      Object.assign(new Error('io_uring_queue_init failed: Operation not permitted'), {
        op: 'io_uring_queue_init',
        errno: 1,
        path: '',
        backend: 'uring',
        refused: true,
      }),
    );
  return {
    version: 'fake',
    probe: (name) => probes[name] ?? 0,
    prefetch: refused,
    copyFile: refused,
    hashFiles: refused,
    readInto: refused,
    xxh64: () => '0000000000000000',
  };
}

const warnings = (lines: LogLine[]): LogLine[] => lines.filter((l) => l.level === 40);

t.test('auto picks io_uring when it works', async (t) => {
  const { log, lines } = capture();
  t.equal(openIo({ binding: fakeBinding({}), log, env: {} }).name, 'uring');
  t.same(warnings(lines), [], 'nothing to warn about');
});

t.test('io_uring refused: falls back to aio, logs once per process', async (t) => {
  const binding = fakeBinding({ uring: -1 });
  const first = capture();
  t.equal(openIo({ binding, log: first.log, env: {} }).name, 'aio');
  t.match(warnings(first.lines), [{ backend: 'uring', errno: 'EPERM', fallback: 'aio', msg: /io_uring refused/ }]);
  t.equal(warnings(first.lines).length, 1);
  const second = capture();
  t.equal(openIo({ binding, log: second.log, env: {} }).name, 'aio');
  t.same(warnings(second.lines), [], 'the refusal is logged only the first time');
});

t.test('the chain continues to pread, then ts', async (t) => {
  t.equal(openIo({ binding: fakeBinding({ uring: -38, aio: -1 }), env: {} }).name, 'pread');
  t.equal(openIo({ binding: fakeBinding({ uring: -38, aio: -1, pread: -11 }), env: {} }).name, 'ts');
  t.equal(openIo({ binding: null, env: {} }).name, 'ts', 'no addon');
  t.same(availableBackends({ binding: fakeBinding({ aio: -1 }) }), ['uring', 'pread', 'ts']);
  t.same(availableBackends({ binding: null }), ['ts']);
});

t.test('THAW_IO_BACKEND overrides the configured backend', async (t) => {
  const binding = fakeBinding({});
  for (const name of ['uring', 'aio', 'pread', 'ts'] as const) {
    t.equal(openIo({ binding, backend: 'uring', env: { [IO_BACKEND_ENV]: name } }).name, name, name);
  }
  t.equal(openIo({ binding, backend: 'pread', env: {} }).name, 'pread', 'without it, the option decides');
  const { log, lines } = capture();
  t.equal(openIo({ binding, log, env: { [IO_BACKEND_ENV]: 'spdk' } }).name, 'uring', 'an unknown value is ignored');
  t.match(warnings(lines), [{ msg: /ignoring unknown THAW_IO_BACKEND/ }]);
  const refused = capture();
  t.equal(openIo({ binding: fakeBinding({ uring: -1 }), log: refused.log, env: { [IO_BACKEND_ENV]: 'uring' } }).name, 'aio');
  t.match(warnings(refused.lines), [{ backend: 'uring' }, { backend: 'aio', wanted: 'uring' }], 'an unavailable forced backend falls back, loudly');
});

t.test('THAW_IO_BACKEND selects each real backend available here', async (t) => {
  const real = availableBackends();
  t.ok(real.includes('ts'));
  for (const name of real) t.equal(openIo({ env: { [IO_BACKEND_ENV]: name } }).name, name, name);
  if (loadNativeIo().binding === null) t.comment('native addon not built: only ts checked');
});

t.test('a refused ring at call time is a recognisable NativeIoError', async (t) => {
  const io = openIo({ binding: fakeBinding({}), env: {} });
  const err = await io.hashFiles(['/x']).then(
    () => undefined,
    (e: unknown) => e,
  );
  t.ok(err instanceof NativeIoError);
  t.match(err, { code: 'Unavailable', op: 'io_uring_queue_init', errno: 1 });
  t.ok(isUringRefused(err));
  t.notOk(isUringRefused(new NativeIoError('NotFound', 'x', { op: 'open', errno: 2 })));
});

t.test('libxxhash (native) and xxhash-wasm agree', async (t) => {
  const binding = loadNativeIo().binding;
  if (binding === null) return t.skip('native addon not built');
  for (const n of [0, 1, 3, 31, 32, 33, 4095, 4096, 100_003]) {
    const data = randomBytes(n);
    t.equal(binding.xxh64(data), await xxh64Hex(data), `${n} bytes`);
  }
  t.equal(binding.xxh64(Buffer.from('abc')), '44bc2cf5ad770999');
});

t.test('adapters: the store hasher and the restore stage reader hash like WasmXxh64Hasher', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'thaw-io-adapt-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const data = randomBytes(3 << 20);
  await writeFile(join(dir, 'f'), data);
  const want = { hash: await xxh64Hex(data), bytes: data.length };
  for (const name of availableBackends()) {
    const io = openIo({ backend: name, env: {} });
    const hasher = ioFileHasher(io);
    t.equal(hasher.algo, 'xxh64');
    t.same(await hasher.hashFile(join(dir, 'f')), want, `${name}: FileHasher`);
    const reader = ioStageReader(io);
    t.equal(reader.name, name);
    t.same(await reader.readAndHash(join(dir, 'f')), want, `${name}: StageReader`);
  }
});

t.test('a filesystem that refuses O_DIRECT gets the call retried buffered', async (t) => {
  const calls: boolean[] = [];
  let refuseAll = false;
  const einval = (): Promise<never> =>
    Promise.reject(
      Object.assign(new Error('open failed for /x: Invalid argument'), { op: 'open', errno: 22, path: '/x', backend: 'uring', refused: false }),
    );
  const binding: NativeIoBinding = {
    ...fakeBinding({}),
    prefetch: (_ranges, o) => {
      calls.push(o.direct);
      if (o.direct || refuseAll) return einval();
      return Promise.resolve({ bytes: 1, files: [{ path: '/x', offset: 0, bytes: 1 }] });
    },
  };
  const { log, lines } = capture();
  const io = openIo({ binding, log, env: {} });
  t.same(await io.prefetch([{ path: '/x' }], { direct: true }), { bytes: 1, files: [{ path: '/x', offset: 0, bytes: 1 }] });
  t.same(calls, [true, false], 'O_DIRECT first, then buffered');
  t.ok(lines.some((l) => /O_DIRECT refused/.test(l.msg)), 'the retry is logged');
  calls.length = 0;
  refuseAll = true;
  await t.rejects(io.prefetch([{ path: '/x' }]), { code: 'InvalidArgument', op: 'open', errno: 22 });
  t.same(calls, [false], 'a buffered call is not retried');
});
