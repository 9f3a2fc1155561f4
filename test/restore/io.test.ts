import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import { NativeIoError } from '../../src/errors.js';
import { openIo, withFaults, type IoBackend, type IoBackendName } from '../../src/restore/io.js';
import { loadNativeIo } from '../../src/restore/native.js';
import { xxh64Hex } from '../../src/snapshot/hash.js';

/**
 * One suite, run against every backend: the native addon's uring, aio and pread (each skipped with a
 * reason when the addon is not built or the kernel refuses it) and the TypeScript fallback, which
 * always runs. Expected hashes come from xxhash-wasm's one-shot XXH64, so passing on every backend
 * means all agree with each other and with the snapshot store.
 */

const MiB = 1 << 20;
/** Bytes i*31+7 (mod 256); its XXH64 was computed with libxxhash 0.8 (see test/snapshot/hash.test.ts). */
const PATTERN_BYTES = 9 * MiB + 13;
const PATTERN_XXH64 = '46b2fc0504395eb8';
const SIZES = [0, 1, 4095, 4096, MiB + 3, 64 * MiB] as const;

function pattern(n: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + 7) & 0xff;
  return b;
}

interface Fixture {
  name: string;
  path: string;
  data: Buffer;
  hash: string;
}

const dir = await mkdtemp(join(tmpdir(), 'thaw-io-'));
t.teardown(() => rm(dir, { recursive: true, force: true }));
const fixtures: Fixture[] = [];
for (const size of SIZES) {
  const data = randomBytes(size);
  const path = join(dir, `f${size}`);
  await writeFile(path, data);
  fixtures.push({ name: `${size} bytes`, path, data, hash: await xxh64Hex(data) });
}
{
  const data = pattern(PATTERN_BYTES);
  const path = join(dir, 'pattern');
  await writeFile(path, data);
  fixtures.push({ name: 'pattern', path, data, hash: PATTERN_XXH64 });
}
const big = fixtures.find((f) => f.data.length === 64 * MiB)!;
const missing = join(dir, 'no-such-file');

t.test('the fixture hashes are pinned (wasm agrees with libxxhash on the pattern)', async (t) => {
  t.equal(await xxh64Hex(pattern(PATTERN_BYTES)), PATTERN_XXH64);
  t.equal(fixtures[0]!.hash, 'ef46db3751d8e999', 'empty input');
});

const addon = loadNativeIo();
const BACKENDS: readonly IoBackendName[] = ['uring', 'aio', 'pread', 'ts'];

for (const name of BACKENDS) {
  const io = openIo({ backend: name, env: {} });
  if (io.name !== name) {
    const why = addon.binding === null ? `native addon not built (${addon.error.message})` : `${name} refused by this kernel`;
    t.test(`backend ${name}`, { skip: why }, () => undefined);
    continue;
  }
  t.test(`backend ${name}`, (t) => backendSuite(t, io));
}

async function rejectsIo(
  t: Test,
  p: Promise<unknown>,
  want: { code: string; op?: string; errno?: number },
  msg: string,
): Promise<void> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  t.ok(err instanceof NativeIoError, `${msg}: rejects with NativeIoError`);
  if (err instanceof NativeIoError) t.match({ code: err.code, op: err.op, errno: err.errno }, want, msg);
}

async function backendSuite(t: Test, io: IoBackend): Promise<void> {
  const native = io.name !== 'ts';

  t.test('prefetch reads every size and hashes while reading', async (t) => {
    for (const direct of [false, true]) {
      const r = await io.prefetch(
        fixtures.map((f) => ({ path: f.path })),
        { hash: true, direct },
      );
      t.equal(r.bytes, fixtures.reduce((n, f) => n + f.data.length, 0), `direct=${direct}: total bytes`);
      r.files.forEach((got, i) => {
        const f = fixtures[i]!;
        t.same(got, { path: f.path, offset: 0, bytes: f.data.length, hash: f.hash }, `direct=${direct}: ${f.name}`);
      });
    }
    const plain = await io.prefetch([{ path: big.path }]);
    t.equal(plain.files[0]!.hash, undefined, 'no hash unless asked');
    t.equal(plain.bytes, big.data.length);
  });

  t.test('small blocks and queue depths cross block boundaries and O_DIRECT tails', async (t) => {
    for (const [blockSize, queueDepth] of [
      [4096, 1],
      [8192, 3],
      [64 * 1024, 7],
    ] as const) {
      for (const direct of [false, true]) {
        const r = await io.hashFiles(
          fixtures.filter((f) => f.data.length <= 9 * MiB + 13).map((f) => f.path),
          { blockSize, queueDepth, direct, concurrency: 2 },
        );
        const want = fixtures.filter((f) => f.data.length <= 9 * MiB + 13).map((f) => f.hash);
        t.same(
          r.map((x) => x.hash),
          want,
          `blockSize=${blockSize} queueDepth=${queueDepth} direct=${direct}`,
        );
      }
    }
    if (!native) {
      // The TS backend needs no block alignment (it never uses O_DIRECT).
      const r = await io.hashFiles([big.path], { blockSize: 1000, queueDepth: 5 });
      t.equal(r[0]!.hash, big.hash, 'odd block size');
    }
  });

  t.test('prefetch of ranges hashes exactly the range', async (t) => {
    const f = big;
    const ranges = [
      { path: f.path, offset: 4096, length: MiB },
      { path: f.path, offset: 1, length: 0 },
      { path: f.path, offset: f.data.length - 5 },
      { path: f.path, offset: 12345, length: 3 * MiB + 7 },
    ];
    const r = await io.prefetch(ranges, { hash: true });
    for (const [i, range] of ranges.entries()) {
      const end = range.length === undefined ? f.data.length : range.offset + range.length;
      const slice = f.data.subarray(range.offset, end);
      t.same(r.files[i], { path: f.path, offset: range.offset, bytes: slice.length, hash: await xxh64Hex(slice) }, `range ${i}`);
    }
    const aligned = await io.prefetch([{ path: f.path, offset: 8192, length: 5000 }], { hash: true, direct: true });
    t.equal(aligned.files[0]!.hash, await xxh64Hex(f.data.subarray(8192, 8192 + 5000)), 'O_DIRECT range ending mid-block');
    await rejectsIo(t, io.prefetch([{ path: f.path, offset: f.data.length - 10, length: 11 }]), { code: 'DataLoss', op: 'read' }, 'range past EOF');
    await rejectsIo(t, io.prefetch([{ path: f.path, offset: f.data.length + 1 }]), { code: 'InvalidArgument', op: 'range' }, 'offset past EOF');
    if (native) {
      await rejectsIo(t, io.prefetch([{ path: f.path, offset: 100 }], { direct: true }), { code: 'InvalidArgument' }, 'unaligned O_DIRECT offset');
    }
  });

  t.test('copyFile copies bytes and hashes, buffered and O_DIRECT', async (t) => {
    const out = await mkdtemp(join(dir, `copy-${io.name}-`));
    for (const direct of [false, true]) {
      for (const f of fixtures) {
        const dst = join(out, `${direct ? 'd' : 'b'}-${f.name.replace(/ /g, '_')}`);
        const r = await io.copyFile(f.path, dst, { hash: true, direct });
        t.same(r, { bytes: f.data.length, hash: f.hash }, `direct=${direct}: ${f.name} result`);
        t.ok((await readFile(dst)).equals(f.data), `direct=${direct}: ${f.name} bytes`);
      }
    }
    const dst = join(out, 'overwrite');
    await writeFile(dst, Buffer.alloc(3 * MiB, 1));
    t.same(await io.copyFile(fixtures[2]!.path, dst), { bytes: 4095 }, 'no hash unless asked');
    t.ok((await readFile(dst)).equals(fixtures[2]!.data), 'a longer destination is truncated');
    await rm(out, { recursive: true, force: true });
  });

  t.test('readInto fills caller memory, also from an offset and through O_DIRECT', async (t) => {
    for (const direct of [false, true]) {
      for (const f of fixtures) {
        const target = Buffer.alloc(f.data.length + 7, 0xee);
        const r = await io.readInto(f.path, target, { hash: true, direct });
        t.same(r, { bytes: f.data.length, hash: f.hash }, `direct=${direct}: ${f.name} result`);
        t.ok(target.subarray(0, f.data.length).equals(f.data), `direct=${direct}: ${f.name} bytes`);
        t.ok(target.subarray(f.data.length).every((b) => b === 0xee), `direct=${direct}: ${f.name} nothing written past`);
      }
      const part = new Uint8Array(MiB + 100);
      const r = await io.readInto(big.path, part, { fileOffset: 2 * MiB, length: MiB + 100, direct });
      t.equal(r.bytes, MiB + 100);
      t.ok(Buffer.from(part).equals(big.data.subarray(2 * MiB, 3 * MiB + 100)), `direct=${direct}: part of a file`);
    }
    await rejectsIo(t, io.readInto(big.path, new Uint8Array(10)), { code: 'InvalidArgument', op: 'range' }, 'file larger than buffer');
  });

  t.test('a missing file is NotFound, and copyFile then creates no destination', async (t) => {
    const want = { code: 'NotFound', op: 'open', errno: 2 };
    await rejectsIo(t, io.prefetch([{ path: fixtures[1]!.path }, { path: missing }]), want, 'prefetch');
    await rejectsIo(t, io.hashFiles([missing]), want, 'hashFiles');
    await rejectsIo(t, io.readInto(missing, new Uint8Array(1)), want, 'readInto');
    const dst = join(dir, `never-${io.name}`);
    await rejectsIo(t, io.copyFile(missing, dst), want, 'copyFile');
    t.notOk(existsSync(dst), 'no destination created');
    await rejectsIo(t, io.copyFile(big.path, join(dir, 'no-such-dir', 'x')), want, 'copyFile into a missing directory');
  });

  t.test('injected EIO and short reads surface as NativeIoError (DataLoss)', async (t) => {
    for (const direct of [false, true]) {
      const eio = withFaults(io, { failAfterBytes: 3 * MiB, errno: 'EIO' });
      t.equal(eio.name, io.name, 'the wrapper keeps the name');
      await rejectsIo(t, eio.prefetch([{ path: big.path }], { direct, hash: true }), { code: 'DataLoss', op: 'read', errno: 5 }, `direct=${direct}: prefetch EIO`);
      await rejectsIo(t, eio.copyFile(big.path, join(dir, `eio-${io.name}`), { direct }), { code: 'DataLoss', op: 'read', errno: 5 }, `direct=${direct}: copyFile EIO`);
      await rejectsIo(t, eio.hashFiles([big.path], { direct }), { code: 'DataLoss', op: 'read', errno: 5 }, `direct=${direct}: hashFiles EIO`);
      const short = withFaults(io, { failAfterBytes: 3 * MiB + 100, shortRead: true });
      await rejectsIo(t, short.prefetch([{ path: big.path }], { direct }), { code: 'DataLoss', op: 'read', errno: 61 }, `direct=${direct}: short read`);
      await rejectsIo(t, short.readInto(big.path, new Uint8Array(big.data.length), { direct }), { code: 'DataLoss', errno: 61 }, `direct=${direct}: readInto short read`);
    }
    const viaOpen = openIo({ backend: io.name, env: {}, faults: { shortRead: true } });
    await rejectsIo(t, viaOpen.hashFiles([fixtures[1]!.path]), { code: 'DataLoss', op: 'read', errno: 61 }, 'openIo({faults}) injects too');
    const roomy = withFaults(io, { failAfterBytes: 10 * MiB });
    t.same(await roomy.hashFiles([fixtures[4]!.path]), [{ path: fixtures[4]!.path, bytes: MiB + 3, hash: fixtures[4]!.hash }], 'below the limit nothing fails');
  });

  t.test('an aborted signal cancels', async (t) => {
    await rejectsIo(t, io.prefetch([{ path: big.path }], { signal: AbortSignal.abort() }), { code: 'Canceled' }, 'already aborted');
    const ac = new AbortController();
    const p = io.hashFiles([big.path], { signal: ac.signal, blockSize: 4096, queueDepth: 1 });
    ac.abort(new Error('stop'));
    const err = await p.then(
      () => undefined,
      (e: unknown) => e,
    );
    t.ok(err instanceof NativeIoError && err.code === 'Canceled', 'aborted mid-way');
    t.match(err instanceof Error ? err.cause : undefined, { message: 'stop' }, 'the reason is the cause');
  });

  t.test('bad sizes are InvalidArgument', async (t) => {
    await rejectsIo(t, io.prefetch([{ path: big.path }], { blockSize: 0 }), { code: 'InvalidArgument' }, 'blockSize 0');
    await rejectsIo(t, io.prefetch([{ path: big.path }], { queueDepth: 0 }), { code: 'InvalidArgument' }, 'queueDepth 0');
    if (native) {
      await rejectsIo(t, io.prefetch([{ path: big.path }], { direct: true, blockSize: 1000 }), { code: 'InvalidArgument' }, 'O_DIRECT block size');
    }
    await rejectsIo(t, io.prefetch([{ path: dir }]), { code: 'InvalidArgument' }, 'a directory');
  });
}
