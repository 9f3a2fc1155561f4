/**
 * RootfsFingerprints: an overlay rootfs with an empty upper layer is fingerprinted once per set of
 * lower layers; everything else is walked every time. The "rootfs" here is a plain directory that
 * the test changes behind the cache's back: a cached answer then differs from a fresh walk, which
 * is how each case tells which one it got. Layers and upper are directories the mount options name
 * (no mount is needed: only their identity and the upper's emptiness are read).
 */
import { mkdirSync, readdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import { fingerprintRootfs } from '../../src/snapshot/key.js';
import { RootfsFingerprints, type RootfsMountSource } from '../../src/snapshot/rootfs-cache.js';

function world(t: Test) {
  const dir = t.testdir({ rootfs: { bin: { sh: 'x' }, etc: { passwd: 'root' } }, l1: {}, l2: {}, upper: {}, work: {}, cache: {} });
  const overlay = (o: { upper?: boolean } = {}): RootfsMountSource[] => [
    {
      type: 'overlay',
      source: 'overlay',
      options: [`lowerdir=${join(dir, 'l2')}:${join(dir, 'l1')}`, ...(o.upper === false ? [] : [`upperdir=${join(dir, 'upper')}`, `workdir=${join(dir, 'work')}`]), 'index=off'],
    },
  ];
  return { dir, rootfs: join(dir, 'rootfs'), cacheDir: join(dir, 'cache'), cache: new RootfsFingerprints(join(dir, 'cache')), overlay };
}

/** Changes the rootfs so that a fresh walk gives another fingerprint. */
function touchRootfs(rootfs: string, name: string): void {
  writeFileSync(join(rootfs, 'etc', name), name);
}

t.test('same layers, empty upper: walked once, then answered from the cache', async (t) => {
  const w = world(t);
  const first = await w.cache.fingerprint(w.rootfs, w.overlay());
  t.same(first, await fingerprintRootfs(w.rootfs), 'the first answer is the walk');
  t.equal(readdirSync(w.cacheDir).length, 1, 'kept');
  touchRootfs(w.rootfs, 'changed');
  t.same(await w.cache.fingerprint(w.rootfs, w.overlay()), first, 'the cached one, not a new walk');
  t.same(await new RootfsFingerprints(w.cacheDir).fingerprint(w.rootfs, w.overlay({ upper: false })), first, 'a read-only overlay (no upper) too, and in another process');
});

t.test('what makes it walk again', async (t) => {
  const cases: [string, (w: ReturnType<typeof world>) => RootfsMountSource[] | undefined][] = [
    [
      'an upper layer with content',
      (w) => {
        writeFileSync(join(w.dir, 'upper', 'written'), 'x');
        return w.overlay();
      },
    ],
    [
      'a layer directory replaced at the same path',
      (w) => {
        renameSync(join(w.dir, 'l1'), join(w.dir, 'l1-old'));
        mkdirSync(join(w.dir, 'l1'));
        return w.overlay();
      },
    ],
    ['a bind mount', (w) => [{ type: 'bind', source: w.rootfs, options: ['rbind', 'rw'] }]],
    ['no mounts known (a directory rootfs)', () => undefined],
    ['two mounts', (w) => [...w.overlay(), ...w.overlay()]],
    [
      'a layer that is gone',
      (w) => {
        rmSync(join(w.dir, 'l2'), { recursive: true });
        return w.overlay();
      },
    ],
  ];
  for (const [what, change] of cases) {
    const w = world(t);
    const before = await w.cache.fingerprint(w.rootfs, w.overlay());
    touchRootfs(w.rootfs, 'changed');
    const mounts = change(w);
    const now = await w.cache.fingerprint(w.rootfs, mounts);
    t.not(now.fingerprint, before.fingerprint, `${what}: walked`);
    t.same(now, await fingerprintRootfs(w.rootfs), `${what}: the walk's answer`);
  }
});

t.test('the exclusions are part of what is cached', async (t) => {
  const w = world(t);
  const all = await w.cache.fingerprint(w.rootfs, w.overlay());
  const withoutEtc = await w.cache.fingerprint(w.rootfs, w.overlay(), { exclude: ['/etc'] });
  t.not(withoutEtc.fingerprint, all.fingerprint);
  t.same(withoutEtc, await fingerprintRootfs(w.rootfs, { exclude: ['/etc'] }));
});

t.test('a damaged cache entry is walked over and replaced; an unwritable cache only costs walks', async (t) => {
  const w = world(t);
  await w.cache.fingerprint(w.rootfs, w.overlay());
  const [entry] = readdirSync(w.cacheDir);
  writeFileSync(join(w.cacheDir, entry!), '{"fingerprint":"not hex"');
  touchRootfs(w.rootfs, 'changed');
  const fresh = await fingerprintRootfs(w.rootfs);
  t.same(await w.cache.fingerprint(w.rootfs, w.overlay()), fresh, 'walked');
  touchRootfs(w.rootfs, 'again');
  t.same(await w.cache.fingerprint(w.rootfs, w.overlay()), fresh, 'and kept again');
  const blocked = new RootfsFingerprints(join(w.dir, 'rootfs', 'bin', 'sh', 'cache')); // under a file: cannot be created
  t.same(await blocked.fingerprint(w.rootfs, w.overlay()), await fingerprintRootfs(w.rootfs), 'still answers');
});
