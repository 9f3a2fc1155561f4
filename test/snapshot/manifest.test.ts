import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { SnapshotError } from '../../src/errors.js';
import { computeKey } from '../../src/snapshot/key.js';
import {
  isSafeRelativePath,
  parseManifest,
  parseManifestText,
  readManifest,
  serializeManifest,
  writeManifest,
  type Manifest,
} from '../../src/snapshot/manifest.js';
import { fixtureKeyInputs } from '../fixtures/snapshot/inputs.js';

function validManifest(): Manifest {
  const keyInputs = fixtureKeyInputs(0);
  return {
    schemaVersion: 1,
    key: computeKey(keyInputs),
    keyInputs,
    createdAt: '2025-01-02T03:04:05.678Z',
    files: [
      { path: 'image/checkpoint.img', bytes: 10, hash: '0123456789abcdef', algo: 'xxh64' },
      { path: 'image/pages.img', bytes: 4096, hash: 'fedcba9876543210', algo: 'xxh64' },
    ],
    totalBytes: 4106,
    engine: 'gvisor',
    runtimeVersion: '0.0~20240729',
    platform: 'systrap',
    gpu: { pids: [123], timings: { lock: 0.3, checkpoint: 1200 } },
    checkpoint: { timings: { checkpoint: 450, commit: 20 }, leaveRunning: true },
    restoreCount: 2,
    lastRestoredAt: '2025-01-03T00:00:00.000Z',
    lastRestoreTimings: { restore: 700 },
    extra: { note: 'x', nested: [1, { a: null }] },
  };
}

t.test('a valid manifest round-trips', async (t) => {
  const m = validManifest();
  t.same(parseManifestText(serializeManifest(m), 'm.json', m.key), m);
  const fresh = { ...m, gpu: null, lastRestoredAt: null, lastRestoreTimings: null, runtimeVersion: null, platform: null };
  t.same(parseManifest(JSON.parse(serializeManifest(fresh)), 'm.json'), fresh);
  const withGpuDetail = { ...m, gpu: { ...m.gpu!, driver: '580.159.04' } };
  t.same(parseManifest(JSON.parse(JSON.stringify(withGpuDetail)), 'm.json').gpu, withGpuDetail.gpu, 'extra GPU record fields are kept');
});

type Edit = (m: Record<string, any>) => void; // eslint-disable-line @typescript-eslint/no-explicit-any

t.test('every defect is DataLoss naming what is wrong', async (t) => {
  const cases: [string, Edit, RegExp][] = [
    ['missing field', (m) => delete m.restoreCount, /restoreCount is missing/],
    ['unknown field', (m) => (m.surprise = 1), /surprise is not a known field/],
    ['newer schema', (m) => (m.schemaVersion = 2), /schemaVersion is 2, this thaw reads 1/],
    ['bad key', (m) => (m.key = 'abc'), /key is not 64 lowercase hex/],
    ['keyInputs do not hash to key', (m) => m.keyInputs.process.env.push('X=1'), /keyInputs hash to [0-9a-f]{64}, not to the key/],
    ['keyInputs with an unknown nested field', (m) => (m.keyInputs.process.extra = 'x'), /keyInputs\.process\.extra is not a known field/],
    ['keyInputs wrong type', (m) => (m.keyInputs.process.user.uid = '0'), /keyInputs\.process\.user\.uid must be a non-negative integer/],
    ['path escapes', (m) => (m.files[0].path = '../etc/passwd'), /files\[0\]\.path "\.\.\/etc\/passwd" is not a safe relative path/],
    ['absolute path', (m) => (m.files[1].path = '/etc/passwd'), /files\[1\]\.path .* not a safe relative path/],
    ['manifest as a file', (m) => (m.files[0].path = 'manifest.json'), /files\[0\]\.path .* not a safe relative path/],
    ['duplicate path', (m) => (m.files[1].path = m.files[0].path), /files\[1\]\.path image\/checkpoint\.img is listed twice/],
    ['short hash', (m) => (m.files[0].hash = 'abc'), /files\[0\]\.hash "abc" is not a xxh64 hash/],
    ['uppercase hash', (m) => (m.files[0].hash = '0123456789ABCDEF'), /files\[0\]\.hash .* is not a xxh64 hash/],
    ['negative size', (m) => (m.files[0].bytes = -1), /files\[0\]\.bytes must be a non-negative integer/],
    ['fractional size', (m) => (m.files[0].bytes = 1.5), /files\[0\]\.bytes must be a non-negative integer/],
    ['totalBytes off', (m) => (m.totalBytes = 1), /totalBytes is 1, but the files add up to 4106/],
    ['bad date', (m) => (m.createdAt = 'yesterday'), /createdAt "yesterday" is not an ISO 8601 UTC time/],
    ['bad gpu pid', (m) => (m.gpu.pids = ['x']), /gpu\.pids\[0\] must be a non-negative integer/],
    ['bad timing', (m) => (m.checkpoint.timings.commit = -3), /checkpoint\.timings\.commit must be a non-negative number of ms/],
    ['leaveRunning missing', (m) => delete m.checkpoint.leaveRunning, /checkpoint\.leaveRunning is missing/],
    ['extra not an object', (m) => (m.extra = []), /extra must be an object/],
    ['files not an array', (m) => (m.files = {}), /files must be an array/],
    ['not an object', () => undefined, /document must be an object/],
  ];
  for (const [name, edit, want] of cases) {
    const m = JSON.parse(JSON.stringify(validManifest()));
    edit(m);
    const value = name === 'not an object' ? [m] : m;
    t.throws(() => parseManifest(value, '/store/x/manifest.json'), { name: 'SnapshotError', code: 'DataLoss', message: want }, name);
  }
  const m = validManifest();
  t.throws(() => parseManifest(JSON.parse(serializeManifest(m)), 'm.json', 'e'.repeat(64)), { code: 'DataLoss', message: /but the snapshot directory is e{64}/ });
  const err = (() => {
    try {
      parseManifestText('{"schemaVersion": 1,', '/store/k/manifest.json', m.key);
    } catch (e) {
      return e;
    }
  })();
  t.ok(err instanceof SnapshotError);
  t.match(err, { code: 'DataLoss', message: /manifest \/store\/k\/manifest\.json is not valid JSON/, key: m.key, path: '/store/k/manifest.json' });
});

t.test('safe relative paths', async (t) => {
  for (const ok of ['image/pages.img', 'gpu/0.bin', 'a']) t.ok(isSafeRelativePath(ok), ok);
  for (const bad of ['', '/a', 'a/../b', './a', 'a//b', 'a/', 'manifest.json', 'a\\b', '..']) t.notOk(isSafeRelativePath(bad), bad);
});

t.test('read and write manifest files', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'thaw-manifest-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const path = join(dir, 'manifest.json');
  await t.rejects(readManifest(path), { code: 'DataLoss', message: /is missing/ });
  const m = validManifest();
  await writeManifest(path, m);
  t.same(await readManifest(path, m.key), m);
  t.same(await readdir(dir), ['manifest.json'], 'no temp file left behind');
  const bad = { ...m, totalBytes: 5 };
  await t.rejects(writeManifest(path, bad), { code: 'DataLoss' }, 'refuses to write what it would not read');
  t.same(JSON.parse(await readFile(path, 'utf8')), JSON.parse(serializeManifest(m)), 'old manifest untouched');
  await writeFile(path, '{}');
  await t.rejects(readManifest(path), { code: 'DataLoss', message: /schemaVersion is missing/ });
});
