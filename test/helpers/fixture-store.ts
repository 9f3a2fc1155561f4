import { randomBytes } from 'node:crypto';
import { mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Test } from 'tap';
import { ContainerRecords, type ContainerRecord } from '../../src/engine/records.js';
import { computeKey } from '../../src/snapshot/key.js';
import { SnapshotStore, type SnapshotInfo } from '../../src/snapshot/store.js';
import { fixtureKeyInputs } from '../fixtures/snapshot/inputs.js';
import type { ThawDirs } from './thaw-cli.js';

/**
 * A temp root and store for CLI tests that need no runtime: snapshots committed through the real
 * SnapshotStore (fixture key inputs, random image bytes) and container records written as the
 * engine writes them.
 */
export interface CliSandbox extends ThawDirs {
  dir: string;
  /** Commits a snapshot of fixture inputs `n` with a `pagesBytes` image/pages.img. */
  snapshot(n: number, pagesBytes?: number): Promise<SnapshotInfo>;
  /** Writes a container record (as `thaw run` would) for fixture inputs `n`. */
  record(id: string, n: number, extra?: Partial<ContainerRecord>): Promise<ContainerRecord>;
  openStore(): Promise<SnapshotStore>;
}

export async function cliSandbox(t: Test): Promise<CliSandbox> {
  const dir = await mkdtemp(join(tmpdir(), 'thaw-cli-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const root = join(dir, 'root');
  const store = join(dir, 'store');
  const openStore = () => SnapshotStore.open({ root: store });
  return {
    dir,
    root,
    store,
    openStore,
    async snapshot(n, pagesBytes = 256 << 10) {
      const s = await openStore();
      const keyInputs = fixtureKeyInputs(n);
      await using pending = await s.begin(computeKey(keyInputs));
      await writeFile(join(pending.imageDir, 'pages.img'), randomBytes(pagesBytes));
      await writeFile(join(pending.imageDir, 'checkpoint.img'), 'kernel state');
      return await pending.commit({ keyInputs, engine: 'gvisor', timings: { checkpoint: 1 } });
    },
    async record(id, n, extra = {}) {
      const keyInputs = fixtureKeyInputs(n);
      const rec: ContainerRecord = {
        id,
        namespace: '',
        engine: 'gvisor',
        bundle: join(dir, 'no-bundle'),
        key: computeKey(keyInputs),
        decision: 'cold',
        snapshot: null,
        reason: 'no snapshot for this key',
        fallback: null,
        owner: 'cli',
        createdAt: new Date().toISOString(),
        pid: 0,
        timings: {},
        keyInputs,
        ...extra,
      };
      await (await ContainerRecords.open(root)).save(rec);
      return rec;
    },
  };
}

/** Flips one byte of `path` at `offset` (default: the middle). */
export async function flipByte(path: string, offset?: number): Promise<number> {
  const fh = await open(path, 'r+');
  try {
    const size = (await fh.stat()).size;
    const at = offset ?? Math.floor(size / 2);
    const b = Buffer.alloc(1);
    await fh.read(b, 0, 1, at);
    b[0] = b[0]! ^ 0xff;
    await fh.write(b, 0, 1, at);
    return at;
  } finally {
    await fh.close();
  }
}
