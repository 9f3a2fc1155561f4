/**
 * Fakes for unit tests of task/: an Engine that records its calls and whose exits the test
 * triggers, a Lifecycle that hands out cold or restore Prepared values without reading bundles,
 * and the Runtime/TaskServiceContext around them. No runsc, no containerd.
 */
import { create, type DescMessage, type MessageShape } from '@bufbuild/protobuf';
import type {
  CheckpointOptions,
  CreateOptions,
  Engine,
  EngineState,
  ExecHandle,
  ExecOptions,
  ExitResult,
  ResourceStats,
  RestoreOptions,
} from '../../src/engine/engine.js';
import type { CheckpointResult, Lifecycle, Plan, Prepared, Started } from '../../src/engine/lifecycle.js';
import type { ContainerRecord } from '../../src/engine/records.js';
import type { Runtime } from '../../src/engine/runtime.js';
import { ShimError } from '../../src/errors.js';
import { silentLogger } from '../../src/log/logger.js';
import { PhaseTimer } from '../../src/log/logger.js';
import type { TaskServiceContext } from '../../src/shim/serve.js';
import { ShutdownService } from '../../src/shim/shutdown.js';
import type { Publisher } from '../../src/task/publisher.js';
import type { CallContext } from '../../src/ttrpc/server.js';
import { defaultConfig } from '../../src/config/config.js';

interface Deferred<T> {
  promise: Promise<T>;
  resolve: (v: T) => void;
  reject: (e: unknown) => void;
}

function deferred<T>(): Deferred<T> {
  let resolve!: (v: T) => void;
  let reject!: (e: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  promise.catch(() => undefined);
  return { promise, resolve, reject };
}

export interface FakeExec {
  id: string;
  opts: ExecOptions;
  pid: number;
  exit: Deferred<ExitResult>;
  signals: number[];
}

/** An Engine whose containers live in a map; `exit(id, status)` ends a container's init. */
export class FakeEngine implements Engine {
  readonly name = 'gvisor' as const;
  readonly calls: string[] = [];
  readonly execs: FakeExec[] = [];
  readonly #waits = new Map<string, Deferred<ExitResult>>();
  readonly #states = new Map<string, EngineState>();
  #nextPid = 1000;
  /** Set to make the next call of that verb fail. */
  failNext: Partial<Record<string, ShimError>> = {};

  #call(verb: string, detail = ''): void {
    this.calls.push(detail ? `${verb} ${detail}` : verb);
    const err = this.failNext[verb];
    if (err) {
      delete this.failNext[verb];
      throw err;
    }
  }

  #waitOf(id: string): Deferred<ExitResult> {
    let d = this.#waits.get(id);
    if (!d) this.#waits.set(id, (d = deferred()));
    return d;
  }

  /** The container's init exits with `status`. */
  exit(id: string, status: number): void {
    const s = this.#states.get(id);
    if (s) s.status = 'stopped';
    this.#waitOf(id).resolve({ exitStatus: status, exitedAt: new Date() });
  }

  identity(): Promise<Record<string, string>> {
    return Promise.resolve({ runtime: 'fake' });
  }
  async create(opts: CreateOptions): Promise<EngineState> {
    this.#call('create', opts.id);
    const state: EngineState = { id: opts.id, status: 'created', pid: this.#nextPid++ };
    this.#states.set(opts.id, state);
    return { ...state };
  }
  async start(id: string): Promise<EngineState> {
    this.#call('start', id);
    return this.#set(id, 'running');
  }
  async prepareRestore(opts: CreateOptions): Promise<void> {
    await this.create(opts);
  }
  async restore(opts: RestoreOptions): Promise<EngineState> {
    this.#call('restore', opts.id);
    return this.#set(opts.id, 'running');
  }
  async checkpoint(id: string, opts: CheckpointOptions): Promise<void> {
    this.#call('checkpoint', `${id} leaveRunning=${opts.leaveRunning}`);
  }
  async state(id: string): Promise<EngineState> {
    const s = this.#states.get(id);
    if (!s) throw new ShimError('NotFound', `container ${id} does not exist`);
    return { ...s };
  }
  wait(id: string): Promise<ExitResult> {
    return this.#waitOf(id).promise;
  }
  async kill(id: string, signal: number, all = false): Promise<void> {
    this.#call('kill', `${id} ${signal}${all ? ' all' : ''}`);
  }
  async delete(id: string, opts: { force?: boolean } = {}): Promise<void> {
    this.#call('delete', `${id}${opts.force ? ' force' : ''}`);
    this.#states.delete(id);
  }
  async ps(id: string): Promise<number[]> {
    this.#call('ps', id);
    return [1];
  }
  async exec(id: string, opts: ExecOptions): Promise<ExecHandle> {
    this.#call('exec', id);
    const e: FakeExec = { id, opts, pid: this.#nextPid++, exit: deferred(), signals: [] };
    this.execs.push(e);
    return {
      pid: e.pid,
      exited: e.exit.promise,
      kill: async (signal) => {
        e.signals.push(signal);
      },
    };
  }
  async pause(id: string): Promise<void> {
    this.#call('pause', id);
    this.#set(id, 'paused');
  }
  async resume(id: string): Promise<void> {
    this.#call('resume', id);
    this.#set(id, 'running');
  }
  async stats(id: string): Promise<ResourceStats> {
    this.#call('stats', id);
    return { memoryUsageBytes: 4096, memoryLimitBytes: 8192, cpuUsageNanos: 1234, pids: 2 };
  }

  #set(id: string, status: EngineState['status']): EngineState {
    const s = this.#states.get(id);
    if (!s) throw new ShimError('NotFound', `container ${id} does not exist`);
    s.status = status;
    return { ...s };
  }
}

/**
 * The parts of Lifecycle that task/ calls. `restoreFor` lists ids whose Create finds a snapshot;
 * checkpoints are recorded in `checkpoints` and committed into `snapshots`.
 */
export class FakeLifecycle {
  readonly checkpoints: { id: string; namespace: string; leaveRunning: boolean }[] = [];
  readonly restoreFor = new Set<string>();
  readonly saved: ContainerRecord[] = [];
  /** Set to make the next checkpoint fail with it. */
  checkpointError: ShimError | undefined;

  constructor(readonly engine: FakeEngine) {}

  async plan(request: Plan['request']): Promise<Plan> {
    const restore = this.restoreFor.has(request.id);
    return {
      request,
      spec: { ociVersion: '1.0.2', process: { args: ['/app'], cwd: '/' } } as unknown as Plan['spec'],
      engine: this.engine,
      keyInputs: {} as Plan['keyInputs'],
      decision: restore
        ? { kind: 'restore', key: 'k'.repeat(64), snapshot: 'k'.repeat(64), reason: 'fake snapshot' }
        : { kind: 'cold', key: 'k'.repeat(64), reason: 'no snapshot' },
      timer: new PhaseTimer(),
    };
  }

  async create(plan: Plan): Promise<Prepared> {
    const opts = { id: plan.request.id, bundle: plan.request.bundle, stdio: plan.request.stdio };
    if (plan.decision.kind === 'restore') {
      await this.engine.prepareRestore(opts);
      return { kind: 'restore', plan, staging: Promise.resolve({} as never), imageDir: '/fake/image', pageChecksums: undefined };
    }
    return { kind: 'cold', plan, state: await this.engine.create(opts) };
  }

  async start(prepared: Prepared): Promise<Started> {
    const { request } = prepared.plan;
    const state =
      prepared.kind === 'cold'
        ? await this.engine.start(request.id)
        : await this.engine.restore({ id: request.id, bundle: request.bundle, stdio: request.stdio, imageDir: prepared.imageDir });
    const record = {
      id: request.id,
      namespace: request.namespace,
      engine: 'gvisor',
      decision: prepared.kind,
      pid: state.pid,
    } as unknown as ContainerRecord;
    this.saved.push(record);
    return { record, state };
  }

  async checkpoint(id: string, namespace: string, opts: { leaveRunning: boolean }): Promise<CheckpointResult> {
    this.checkpoints.push({ id, namespace, ...opts });
    if (this.checkpointError) {
      const err = this.checkpointError;
      this.checkpointError = undefined;
      throw err;
    }
    await this.engine.checkpoint(id, { imageDir: '/fake/store', leaveRunning: opts.leaveRunning });
    return { snapshot: 's'.repeat(64), bytes: 42, timings: {} };
  }
}

export function asLifecycle(l: FakeLifecycle): Lifecycle {
  return l as unknown as Lifecycle;
}

export interface PublishedEvent {
  topic: string;
  event: unknown;
}

export interface FakeShim {
  engine: FakeEngine;
  lifecycle: FakeLifecycle;
  runtime: Runtime;
  ctx: TaskServiceContext;
  events: PublishedEvent[];
  removedRecords: string[];
  shutdownReasons: string[];
}

/** A Runtime and TaskServiceContext around a FakeEngine (store has no snapshots). */
export function fakeShim({ configPath }: { configPath?: string } = {}): FakeShim {
  const engine = new FakeEngine();
  const lifecycle = new FakeLifecycle(engine);
  const events: PublishedEvent[] = [];
  const removedRecords: string[] = [];
  const shutdownReasons: string[] = [];
  const runtime = {
    config: defaultConfig,
    log: silentLogger,
    store: { get: async () => undefined },
    records: {
      remove: async (id: string, ns: string) => {
        removedRecords.push(`${ns}/${id}`);
      },
    },
    engine: () => engine,
    lifecycle: asLifecycle(lifecycle),
  } as unknown as Runtime;
  const publisher = {
    publish: (topic: string, event: unknown) => {
      events.push({ topic, event });
    },
  } as unknown as Publisher;
  const shutdown = new ShutdownService();
  const originalShutdown = shutdown.shutdown.bind(shutdown);
  shutdown.shutdown = (reason: string) => {
    shutdownReasons.push(reason);
    return originalShutdown(reason);
  };
  const ctx: TaskServiceContext = {
    id: 'c1',
    namespace: 'default',
    bundle: '/nonexistent',
    grpcAddress: '/run/containerd/containerd.sock',
    ttrpcAddress: undefined,
    publishBinary: '/usr/bin/containerd',
    debug: false,
    configPath,
    version: '0.0.0-test',
    publisher,
    shutdown,
    log: silentLogger,
    listening: Promise.resolve(),
  };
  return { engine, lifecycle, runtime, ctx, events, removedRecords, shutdownReasons };
}

/** A CallContext for calling handlers directly. */
export function callContext(method: string): CallContext {
  return {
    service: 'containerd.task.v2.Task',
    method,
    namespace: 'default',
    deadline: undefined,
    signal: new AbortController().signal,
    metadata: new Map(),
  };
}

/** `create(schema, init)` with the init typed loosely, for table-driven requests. */
export function message<D extends DescMessage>(schema: D, init: Record<string, unknown>): MessageShape<D> {
  return create(schema, init as never) as MessageShape<D>;
}

/** Lets queued promise callbacks (exit watchers) run. */
export function settle(): Promise<void> {
  return new Promise((r) => setImmediate(r));
}
