import { join } from 'node:path';
import { Cleanup } from '../cleanup.js';
import { ShimError, asShimError } from '../errors.js';
import { PhaseTimer, type Logger } from '../log/logger.js';
import { readBundleSpec, specWantsGpu, type OciSpec } from '../bundle/bundle.js';
import { decide, type Decision, type SnapshotLookup } from '../policy/decide.js';
import type { ThawConfig } from '../config/config.js';
import type { SnapshotStore } from '../snapshot/store.js';
import { collectKeyInputs, computeKey, fingerprintRootfs, type GpuIdentity, type KeyInputs } from '../snapshot/key.js';
import type { RootfsFingerprints, RootfsMountSource } from '../snapshot/rootfs-cache.js';
import type { RestoreStager, StageResult } from '../restore/engine.js';
import { checksumsFromManifest, type ImageChecksum } from '../restore/pages.js';
import type { ContainerRecords, ContainerRecord } from './records.js';
import type { Engine, EngineName, EngineState, StdioFds } from './engine.js';
import { validateContainerId } from './container-id.js';

/**
 * The decide → create → start|restore sequence and the checkpoint-into-store sequence, shared by
 * the `thaw` CLI and the shim's Task service. Restore failures before the app runs fall back to a
 * cold start in a fresh sandbox; the reason is logged and kept in the container record.
 */
export const ENGINE_ANNOTATION = 'thaw.dev/engine';

export interface LaunchRequest {
  id: string;
  namespace: string;
  bundle: string;
  stdio: StdioFds;
  consoleSocket?: string;
  owner: 'cli' | 'shim';
  /** Force a cold start (CLI --cold). */
  cold?: boolean;
  /** The mounts containerd assembled the rootfs from (Create): the rootfs fingerprint may then come from the cache. */
  rootfsMounts?: readonly RootfsMountSource[];
}

export interface Plan {
  request: LaunchRequest;
  spec: OciSpec;
  engine: Engine;
  keyInputs: KeyInputs;
  decision: Decision;
  timer: PhaseTimer;
}

/** A created container, not yet started; restore is a distinct kind, not a flag. */
export type Prepared =
  | { kind: 'cold'; plan: Plan; state: EngineState }
  | {
      kind: 'restore';
      plan: Plan;
      staging: Promise<StageResult>;
      imageDir: string;
      /** Checksums the engine checks while it restores (files it reads itself, left out of staging). */
      pageChecksums: ReadonlyMap<string, ImageChecksum> | undefined;
    };

export interface Started {
  record: ContainerRecord;
  state: EngineState;
}

export interface CheckpointResult {
  snapshot: string;
  bytes: number;
  timings: Record<string, number>;
}

export interface LifecycleDeps {
  config: ThawConfig;
  log: Logger;
  store: SnapshotStore;
  records: ContainerRecords;
  /** The engine of that name for containers of `namespace`; undefined when not available here. */
  engine: (name: EngineName, namespace: string) => Engine | undefined;
  stager: RestoreStager;
  /** GPU identity for the key (null when the host has no GPU). */
  gpuIdentity: () => Promise<GpuIdentity | null>;
  /** Fingerprints of rootfs trees made of image layers, kept across containers. */
  rootfsFingerprints?: RootfsFingerprints;
}

export class Lifecycle {
  constructor(private readonly deps: LifecycleDeps) {}

  engineFor(spec: OciSpec, namespace: string): Engine {
    const requested = (spec.annotations?.[ENGINE_ANNOTATION] ?? this.deps.config.engine) as string;
    let name: EngineName;
    if (requested === 'auto') name = specWantsGpu(spec) && this.deps.engine('native', namespace) ? 'native' : 'gvisor';
    else if (requested === 'gvisor' || requested === 'native') name = requested;
    else throw new ShimError('InvalidArgument', `annotation ${ENGINE_ANNOTATION}=${requested}: use gvisor, native or auto`);
    const engine = this.deps.engine(name, namespace);
    if (!engine) throw new ShimError('FailedPrecondition', `engine ${name} is not available on this host`);
    return engine;
  }

  /** Reads the bundle, computes the compatibility key and decides cold vs restore. No side effects. */
  async plan(request: LaunchRequest): Promise<Plan> {
    validateContainerId(request.id);
    const timer = new PhaseTimer(this.deps.log);
    const spec = await timer.phase('read-spec', () => readBundleSpec(request.bundle));
    const engine = this.engineFor(spec, request.namespace);
    const keyInputs = await timer.phase('key', async () =>
      collectKeyInputs({
        spec,
        bundle: request.bundle,
        engine: { name: engine.name, identity: await engine.identity() },
        gpu: await this.deps.gpuIdentity(),
        ignoreEnv: this.deps.config.snapshot.ignoreEnv,
        fingerprintRootfs: (dir, o) =>
          this.deps.rootfsFingerprints ? this.deps.rootfsFingerprints.fingerprint(dir, request.rootfsMounts, o) : fingerprintRootfs(dir, o),
      }),
    );
    const key = computeKey(keyInputs);
    const lookup = request.cold ? ({ state: 'missing' } as const) : await timer.phase('lookup', () => this.#lookup(key));
    const decision = request.cold
      ? ({ kind: 'cold', key, reason: 'cold start requested' } as const)
      : decide({ key, lookup, annotations: spec.annotations ?? {} });
    this.deps.log.info({ id: request.id, snapshot: key, decision: decision.kind, reason: decision.reason }, 'decided');
    return { request, spec, engine, keyInputs, decision, timer };
  }

  async #lookup(key: string): Promise<SnapshotLookup> {
    // Full byte verification happens while staging; here only what is cheap (manifest, sizes).
    let bytes: number;
    try {
      const snap = await this.deps.store.get(key);
      if (!snap) return { state: 'missing' };
      bytes = snap.manifest.totalBytes;
      await this.deps.store.verify(key, { quick: true });
    } catch (err) {
      return { state: 'invalid', key, reason: asShimError(err).message };
    }
    return { state: 'verified', key, bytes };
  }

  /** Creates the container. For a restore, also starts staging the image while the sandbox comes up. */
  async create(plan: Plan): Promise<Prepared> {
    const { request, engine, decision, timer } = plan;
    const opts = { id: request.id, bundle: request.bundle, stdio: request.stdio, consoleSocket: request.consoleSocket };
    if (decision.kind === 'cold') {
      const state = await timer.phase('create', () => engine.create(opts));
      return { kind: 'cold', plan, state };
    }
    const snapshot = await this.deps.store.get(decision.snapshot);
    if (!snapshot) return this.#fallBackAtCreate(plan, 'snapshot disappeared before create');
    // Files the engine verifies while it restores are read once, by the restore, not staged first.
    const selfVerified = (await engine.selfVerifiedFiles?.(snapshot.manifest.files)) ?? [];
    const selfPaths = new Set(selfVerified.map((f) => f.path));
    const verify = this.deps.config.restore.verify;
    // Every file's checksum: the page server also checks the small images it parses (pagemap, mm).
    const pageChecksums = verify && selfVerified.length > 0 ? checksumsFromManifest(snapshot.dir, snapshot.manifest.files) : undefined;
    const staging = timer.phase('stage', () =>
      this.deps.stager.stage({ snapshotDir: snapshot.dir, files: snapshot.manifest.files.filter((f) => !selfPaths.has(f.path)), verify }),
    );
    staging.catch(() => undefined); // observed in start(); avoid an unhandled rejection meanwhile
    try {
      await timer.phase('create', () => engine.prepareRestore(opts));
    } catch (err) {
      await staging.catch(() => undefined);
      throw err;
    }
    return { kind: 'restore', plan, staging, imageDir: join(snapshot.dir, 'image'), pageChecksums };
  }

  async #fallBackAtCreate(plan: Plan, reason: string): Promise<Prepared> {
    this.deps.log.warn({ id: plan.request.id, phase: 'create', fallback: 'cold', reason }, 'restore not possible, cold start');
    plan.decision = { kind: 'cold', key: plan.decision.key, reason: `fallback: ${reason}` };
    return this.create(plan);
  }

  /** Starts the app: `start` for a cold container, `restore` (with cold fallback) for a snapshot. */
  async start(prepared: Prepared): Promise<Started> {
    const { plan } = prepared;
    const { request, engine, timer } = plan;
    let fallback: string | null = null;
    let state: EngineState;
    if (prepared.kind === 'cold') {
      state = await timer.phase('start', () => engine.start(request.id));
    } else {
      try {
        await prepared.staging;
        state = await timer.phase('restore', () =>
          engine.restore({
            id: request.id,
            bundle: request.bundle,
            stdio: request.stdio,
            consoleSocket: request.consoleSocket,
            imageDir: prepared.imageDir,
            ...(prepared.pageChecksums !== undefined ? { pageChecksums: prepared.pageChecksums } : {}),
          }),
        );
        await this.deps.store.recordRestore(plan.decision.key, timer.timings).catch((err: unknown) => {
          this.deps.log.warn({ id: request.id, err }, 'could not record restore in manifest');
        });
      } catch (err) {
        fallback = asShimError(err).message;
        this.deps.log.warn({ id: request.id, phase: 'restore', fallback: 'cold', err }, 'restore failed, cold start');
        state = await this.#coldAfterFailedRestore(plan);
      }
    }
    const record: ContainerRecord = {
      id: request.id,
      namespace: request.namespace,
      engine: engine.name,
      bundle: request.bundle,
      key: plan.decision.key,
      decision: fallback ? 'cold' : plan.decision.kind,
      snapshot: plan.decision.kind === 'restore' ? plan.decision.snapshot : null,
      reason: fallback ? `restore failed: ${fallback}` : plan.decision.reason,
      fallback,
      owner: request.owner,
      createdAt: new Date().toISOString(),
      pid: state.pid,
      timings: timer.timings,
      keyInputs: plan.keyInputs,
    };
    await this.deps.records.save(record);
    return { record, state };
  }

  /** The restore failed before the app ran: throw the sandbox away and boot a fresh one. */
  async #coldAfterFailedRestore(plan: Plan): Promise<EngineState> {
    const { request, engine, timer } = plan;
    await engine.delete(request.id, { force: true }).catch(() => undefined);
    const opts = { id: request.id, bundle: request.bundle, stdio: request.stdio, consoleSocket: request.consoleSocket };
    await timer.phase('fallback-create', () => engine.create(opts));
    return timer.phase('fallback-start', () => engine.start(request.id));
  }

  /** Plan + create + start in one go (CLI `thaw run`). */
  async run(request: LaunchRequest): Promise<Started & { plan: Plan }> {
    const plan = await this.plan(request);
    await using cleanup = new Cleanup();
    const prepared = await this.create(plan);
    cleanup.add('delete', () => plan.engine.delete(request.id, { force: true }));
    const started = await this.start(prepared);
    cleanup.release();
    return { ...started, plan };
  }

  /** The engine that runs a recorded container. */
  engineOf(record: ContainerRecord): Engine | undefined {
    return this.deps.engine(record.engine, record.namespace);
  }

  /** Checkpoints a running container into the store under its key. One snapshot per key. */
  async checkpoint(id: string, namespace: string, opts: { leaveRunning: boolean }): Promise<CheckpointResult> {
    const record = await this.deps.records.require(id, namespace);
    const engine = this.engineOf(record);
    if (!engine) throw new ShimError('FailedPrecondition', `engine ${record.engine} is not available`);
    const timer = new PhaseTimer(this.deps.log);
    // The inputs computed at start: the rootfs may have changed since (writes by the app), and
    // the snapshot must land under the key the next start of this bundle computes.
    const keyInputs = record.keyInputs;
    const key = computeKey(keyInputs);
    await using pending = await this.deps.store.begin(key);
    await timer.phase('checkpoint', () => engine.checkpoint(id, { imageDir: pending.imageDir, leaveRunning: opts.leaveRunning }));
    const committed = await timer.phase('commit', () =>
      pending.commit({ keyInputs, engine: engine.name, timings: timer.timings }),
    );
    this.deps.log.info({ id, snapshot: key, bytes: committed.totalBytes, durationMs: timer.elapsed() }, 'checkpoint committed');
    return { snapshot: key, bytes: committed.totalBytes, timings: timer.timings };
  }
}
