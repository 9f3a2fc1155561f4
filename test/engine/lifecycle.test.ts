import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import { resolveConfig } from '../../src/config/config.js';
import { SnapshotError } from '../../src/errors.js';
import type { CreateOptions, Engine, EngineState, RestoreOptions } from '../../src/engine/engine.js';
import { Lifecycle } from '../../src/engine/lifecycle.js';
import { ContainerRecords } from '../../src/engine/records.js';
import { silentLogger } from '../../src/log/logger.js';
import type { RestoreStager, StageRequest, StageResult } from '../../src/restore/engine.js';
import type { ManifestFile } from '../../src/snapshot/manifest.js';
import { SnapshotStore } from '../../src/snapshot/store.js';

/** An engine that records what the lifecycle asks of it; `restoreFails` makes restore throw. */
class RecordingEngine {
  readonly name = 'native' as const;
  calls: string[] = [];
  restoreOptions: RestoreOptions | undefined;
  restoreFails = false;
  constructor(private readonly selfVerified: ((files: readonly ManifestFile[]) => ManifestFile[]) | undefined) {
    if (selfVerified) (this as unknown as Engine).selfVerifiedFiles = async (files) => selfVerified(files);
  }
  async identity() {
    return { runtime: 'test', version: '1' };
  }
  #state(id: string): EngineState {
    return { id, status: 'running', pid: 42 };
  }
  async create(o: CreateOptions) {
    this.calls.push(`create ${o.id}`);
    return { ...this.#state(o.id), status: 'created' as const };
  }
  async start(id: string) {
    this.calls.push(`start ${id}`);
    return this.#state(id);
  }
  async prepareRestore(o: CreateOptions) {
    this.calls.push(`prepareRestore ${o.id}`);
  }
  async restore(o: RestoreOptions) {
    this.calls.push(`restore ${o.id}`);
    this.restoreOptions = o;
    if (this.restoreFails) throw new Error('restore exploded');
    return this.#state(o.id);
  }
  async delete(id: string) {
    this.calls.push(`delete ${id}`);
  }
}

class RecordingStager {
  requests: StageRequest[] = [];
  fail: Error | undefined;
  async stage(req: StageRequest): Promise<StageResult> {
    this.requests.push(req);
    if (this.fail) throw this.fail;
    return { bytes: req.files.reduce((n, f) => n + f.bytes, 0), files: req.files.length, durationMs: 1, backend: 'test' };
  }
}

async function world(t: Test, o: { selfVerified?: (files: readonly ManifestFile[]) => ManifestFile[] } = {}) {
  const dir = t.testdir({ bundle: { rootfs: {} }, state: {} });
  const bundle = join(dir, 'bundle');
  const spec = {
    ociVersion: '1.0.2',
    process: { args: ['/app'], cwd: '/', env: ['A=1'] },
    root: { path: 'rootfs' },
    annotations: { 'io.kubernetes.cri.image-name': 'example/app@sha256:' + 'c'.repeat(64) },
  };
  await writeFile(join(bundle, 'config.json'), JSON.stringify(spec));
  const store = await SnapshotStore.open({ root: join(dir, 'store') });
  const engine = new RecordingEngine(o.selfVerified);
  const stager = new RecordingStager();
  const config = resolveConfig({ stateDir: join(dir, 'state'), engine: 'native' });
  const lifecycle = new Lifecycle({
    config,
    log: silentLogger,
    store,
    records: await ContainerRecords.open(join(dir, 'state')),
    engine: () => engine as unknown as Engine,
    stager: stager as unknown as RestoreStager,
    gpuIdentity: async () => null,
  });
  const request = (id: string) => ({ id, namespace: '', bundle, stdio: ['ignore', 'ignore', 'ignore'] as const, owner: 'cli' as const });
  /** Commits a snapshot under the key this bundle plans to, with a CRIU-like image. */
  const snapshot = async () => {
    const plan = await lifecycle.plan(request('probe'));
    await using pending = await store.begin(plan.decision.key);
    await mkdir(pending.imageDir, { recursive: true });
    await writeFile(join(pending.imageDir, 'pages-1.img'), Buffer.alloc(64 << 10, 7));
    await writeFile(join(pending.imageDir, 'pagemap-1.img'), 'pagemap');
    await writeFile(join(pending.imageDir, 'core-1.img'), 'core');
    return pending.commit({ keyInputs: plan.keyInputs, engine: 'native', timings: {} });
  };
  return { dir, bundle, store, engine, stager, lifecycle, request, snapshot };
}

t.test('no snapshot: cold create + start, nothing staged', async (t) => {
  const w = await world(t);
  const { record } = await w.lifecycle.run(w.request('a'));
  t.equal(record.decision, 'cold');
  t.same(w.engine.calls, ['create a', 'start a']);
  t.equal(w.stager.requests.length, 0);
});

t.test('restore: every file staged and verified before the engine restores, no checksums handed down', async (t) => {
  const w = await world(t);
  const snap = await w.snapshot();
  const { record } = await w.lifecycle.run(w.request('b'));
  t.match(record, { decision: 'restore', snapshot: snap.key, fallback: null });
  t.same(w.engine.calls, ['prepareRestore b', 'restore b']);
  t.same(w.stager.requests[0]!.files.map((f) => f.path).sort(), ['image/core-1.img', 'image/pagemap-1.img', 'image/pages-1.img']);
  t.equal(w.stager.requests[0]!.verify, true);
  t.equal(w.engine.restoreOptions?.pageChecksums, undefined);
});

t.test('an engine that verifies page images itself: they skip staging and their checksums go to restore', async (t) => {
  const w = await world(t, { selfVerified: (files) => files.filter((f) => f.path.endsWith('/pages-1.img')) });
  const snap = await w.snapshot();
  await w.lifecycle.run(w.request('c'));
  t.same(w.stager.requests[0]!.files.map((f) => f.path).sort(), ['image/core-1.img', 'image/pagemap-1.img'], 'the small images are still staged + verified');
  const pages = snap.manifest.files.find((f) => f.path === 'image/pages-1.img')!;
  const sums = w.engine.restoreOptions?.pageChecksums;
  t.ok(sums, 'checksums handed to the engine');
  t.same(sums!.get(join(snap.dir, 'image/pages-1.img')), { bytes: pages.bytes, hash: pages.hash, algo: pages.algo });
  t.equal(sums!.size, snap.manifest.files.length, 'every file (the page server also parses the small images)');
});

t.test('restore.verify off: nothing is checked, by the stager or the engine', async (t) => {
  const w = await world(t, { selfVerified: (files) => files.filter((f) => f.path.endsWith('/pages-1.img')) });
  await w.snapshot();
  const lifecycle = new Lifecycle({
    ...(w.lifecycle as unknown as { deps: ConstructorParameters<typeof Lifecycle>[0] }).deps,
    config: resolveConfig({ stateDir: join(w.dir, 'state'), engine: 'native', restore: { verify: false } }),
  });
  await lifecycle.run(w.request('d'));
  t.equal(w.stager.requests[0]!.verify, false);
  t.equal(w.engine.restoreOptions?.pageChecksums, undefined);
});

t.test('a failed restore or a bad image falls back to a cold start in a fresh sandbox, with the reason', async (t) => {
  const w = await world(t);
  await w.snapshot();
  w.engine.restoreFails = true;
  const { record } = await w.lifecycle.run(w.request('e'));
  t.match(record, { decision: 'cold', fallback: /restore exploded/ });
  t.same(w.engine.calls, ['prepareRestore e', 'restore e', 'delete e', 'create e', 'start e']);

  const v = await world(t);
  await v.snapshot();
  v.stager.fail = new SnapshotError('DataLoss', 'snapshot file image/pages-1.img: checksum x does not match manifest y', { path: 'image/pages-1.img' });
  const staged = await v.lifecycle.run(v.request('f'));
  t.match(staged.record, { decision: 'cold', fallback: /does not match manifest/ });
  t.notOk(v.engine.calls.includes('restore f'), 'the engine never restored unverified bytes');
});
