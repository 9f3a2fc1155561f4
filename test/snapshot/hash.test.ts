import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { WasmXxh64Hasher, XXH64, formatXxh64, isHashFormat, xxh64Hex } from '../../src/snapshot/hash.js';

/** Bytes i*31+7 (mod 256); its XXH64 was computed with libxxhash 0.8 (XXH64(buf, n, 0)). */
function pattern(n: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + 7) & 0xff;
  return b;
}
const PATTERN_BYTES = (9 << 20) + 13;
const PATTERN_XXH64 = '46b2fc0504395eb8';

t.test('xxh64 output format is pinned: 16 lowercase hex chars, seed 0', async (t) => {
  t.equal(await xxh64Hex(Buffer.from('abc')), '44bc2cf5ad770999');
  t.equal(await xxh64Hex(Buffer.alloc(0)), 'ef46db3751d8e999');
  t.equal(formatXxh64(1n), '0000000000000001', 'zero-padded');
  t.equal(formatXxh64(0xabcdefn << 40n), 'abcdef0000000000', 'lowercase');
  t.ok(isHashFormat(XXH64, '44bc2cf5ad770999'));
  t.notOk(isHashFormat(XXH64, '44BC2CF5AD770999'), 'uppercase is not the format');
  t.notOk(isHashFormat(XXH64, 'bc2cf5ad770999'), 'unpadded is not the format');
});

t.test('hashFile streams in chunks and matches libxxhash on a multi-chunk file', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'thaw-hash-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const data = pattern(PATTERN_BYTES);
  await writeFile(join(dir, 'big'), data);
  await writeFile(join(dir, 'abc'), 'abc');
  await writeFile(join(dir, 'empty'), '');

  const hasher = new WasmXxh64Hasher();
  t.equal(hasher.algo, 'xxh64');
  t.same(await hasher.hashFile(join(dir, 'big')), { hash: PATTERN_XXH64, bytes: PATTERN_BYTES });
  t.same(await hasher.hashFile(join(dir, 'abc')), { hash: '44bc2cf5ad770999', bytes: 3 });
  t.same(await hasher.hashFile(join(dir, 'empty')), { hash: 'ef46db3751d8e999', bytes: 0 });
  // Odd chunk sizes (not multiples of XXH64's 32-byte stripe) must give the same answer.
  for (const chunkBytes of [1, 7, 4096, 1 << 20]) {
    const small = new WasmXxh64Hasher({ chunkBytes });
    const target = chunkBytes < 4096 ? 'abc' : 'big';
    const want = target === 'abc' ? '44bc2cf5ad770999' : PATTERN_XXH64;
    t.equal((await small.hashFile(join(dir, target))).hash, want, `chunkBytes=${chunkBytes}`);
  }
  t.equal(await xxh64Hex(data), PATTERN_XXH64, 'one-shot agrees with streaming');
});

t.test('hashFile honours an aborted signal and reports a missing file', async (t) => {
  const hasher = new WasmXxh64Hasher();
  await t.rejects(hasher.hashFile('/nonexistent/thaw/file'), { code: 'ENOENT' });
  const dir = await mkdtemp(join(tmpdir(), 'thaw-hash-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  await writeFile(join(dir, 'f'), 'x');
  await t.rejects(hasher.hashFile(join(dir, 'f'), AbortSignal.abort()), { name: 'AbortError' });
});
