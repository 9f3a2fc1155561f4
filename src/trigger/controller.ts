import { watch, type FSWatcher } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { ShimError, asShimError, isShimError } from '../errors.js';
import { readBundleSpec, type OciSpec } from '../bundle/bundle.js';
import type { Logger } from '../log/logger.js';
import type { ContainerExec } from './container-exec.js';
import { addControlMount, CONTROL_FILES, ControlDir, controlDirFor } from './control-dir.js';
import { ControlServer, type ControlReply } from './control-server.js';
import { HookRunner, type HookName } from './hooks.js';
import {
  describeHook,
  describeTrigger,
  parseTriggerPolicy,
  TriggerConfigError,
  wantsControlDir,
  type Annotations,
  type Hook,
  type TriggerPolicy,
} from './policy.js';

/**
 * One container's trigger: decides when to snapshot, runs the app's hooks around the checkpoint
 * and tells the app what happened.
 *
 * Source container (cold start): arms the trigger (`after:` timer, `when-ready` probe loop, or the
 * control socket and signal file for `on-request`). When it fires: skip with a logged reason if
 * the key already has a snapshot or another checkpoint of it holds the key's lock; otherwise close
 * the control socket and wait until the app has closed its connections to it (runsc cannot
 * checkpoint a sandbox holding a host socket), run pre-checkpoint then kv-cache release, checkpoint
 * with leave-running, and run the matching resume hooks (kv-cache reacquire, post-restore) in the
 * source, which carries on from the quiesced state; they also run when a step failed, for the
 * steps that had run (undo). One attempt per trigger; on-request may ask again after a failure.
 *
 * Restored copy: writes /run/thaw/restored and /run/thaw/env, answers status `restored`, and runs
 * the resume hooks there. No trigger is armed (its key has a snapshot).
 *
 * A bad configuration is logged once at Create with the annotation's name; the container runs
 * without a trigger and the status says why.
 */
export type CheckpointState = 'idle' | 'scheduled' | 'running' | 'committed' | 'skipped' | 'failed' | 'restoring' | 'restored';

/** GET /checkpoint/status and /run/thaw/status. */
export interface CheckpointStatus {
  state: CheckpointState;
  /** The configured trigger (`on-request`, `after:90000ms`, …), or `invalid`. */
  trigger: string;
  /** The snapshot key: the one committed, skipped for, or restored from. */
  snapshot: string | null;
  /** Why it was skipped or failed. */
  reason: string | null;
  updatedAt: string;
  bytes?: number;
  durationMs?: number;
  restoredAt?: string;
}

/** What the controller needs from the container (wired by the Task service; faked in tests). */
export interface TriggerTarget {
  exec: ContainerExec;
  /** Checkpoint with leave-running through the init process (its state machine and lifecycle). */
  checkpoint(): Promise<{ snapshot: string; bytes: number; timings: Record<string, number> }>;
  /** How the app came up, known after Start; undefined before. */
  launched(): LaunchInfo | undefined;
  running(): boolean;
  /** The init process is paused (containerd's client pauses a task around Task.Checkpoint). */
  paused(): boolean;
  pause(): Promise<void>;
  resume(): Promise<void>;
  /** Is there a committed snapshot for `key`, or a checkpoint of it in progress (anywhere)? */
  snapshotState(key: string): Promise<'none' | 'committed' | 'in-progress'>;
}

export interface LaunchInfo {
  /** The container's snapshot key. */
  key: string;
  /** Set when the app was restored from a snapshot (no cold fallback). */
  restored: { snapshot: string; restoreMs: number | null } | null;
}

export interface PrepareTriggerOptions {
  bundle: string;
  id: string;
  namespace: string;
  stateDir: string;
  /** Annotation defaults from the runtime config (same names as the annotations). */
  defaults?: Annotations;
  /** Env var names left out of the snapshot key (config.snapshot.ignoreEnv). */
  ignoreEnv: readonly string[];
  /** runsc --host-uds value from the config: the socket is reachable only with open/all. */
  hostUds: string | undefined;
  log: Logger;
}

export interface TriggerTimeouts {
  /** How long a checkpoint waits for the app to close its connections to thaw.sock. */
  drainMs: number;
  /** Poll period of the signal file (a watcher reacts sooner where inotify sees the write). */
  signalPollMs: number;
}

const DEFAULT_TIMEOUTS: TriggerTimeouts = { drainMs: 10_000, signalPollMs: 500 };

export class TriggerController {
  readonly id: string;
  readonly dir: ControlDir;
  readonly policy: TriggerPolicy | null;
  readonly configError: TriggerConfigError | null;
  /** The container's OCI process: hooks run with its env, cwd, user and capabilities. */
  readonly process: Readonly<Record<string, unknown>>;
  readonly #log: Logger;
  readonly #env: string[];
  readonly #hostUds: boolean;
  readonly #timeouts: TriggerTimeouts;
  readonly #abort = new AbortController();
  #target: TriggerTarget | undefined;
  #hooks: HookRunner | undefined;
  #server: ControlServer | undefined;
  #watcher: FSWatcher | undefined;
  #timers: NodeJS.Timeout[] = [];
  #launch: LaunchInfo | undefined;
  #status: CheckpointStatus;
  /** The one checkpoint attempt in flight (trigger or manual); undefined when none. */
  #busy: Promise<void> | undefined;
  #fired = false;
  #stopped = false;

  private constructor(o: {
    id: string;
    dir: ControlDir;
    policy: TriggerPolicy | null;
    configError: TriggerConfigError | null;
    process: Readonly<Record<string, unknown>>;
    env: string[];
    hostUds: boolean;
    log: Logger;
    timeouts?: Partial<TriggerTimeouts>;
  }) {
    this.id = o.id;
    this.process = o.process;
    this.dir = o.dir;
    this.policy = o.policy;
    this.configError = o.configError;
    this.#env = o.env;
    this.#hostUds = o.hostUds;
    this.#log = o.log;
    this.#timeouts = { ...DEFAULT_TIMEOUTS, ...o.timeouts };
    this.#status = {
      state: o.configError ? 'failed' : 'idle',
      trigger: o.policy ? describeTrigger(o.policy.trigger) : 'invalid',
      snapshot: null,
      reason: o.configError ? o.configError.message : null,
      updatedAt: new Date().toISOString(),
    };
  }

  /**
   * At Create, before the container is planned: reads the bundle's annotations and, when the
   * container has a trigger (annotation present and not `off`), creates its control directory and
   * adds the /run/thaw mount to config.json. Returns undefined for containers without one. A bad
   * configuration is logged here and yields a controller without a trigger.
   */
  static async prepare(o: PrepareTriggerOptions, timeouts?: Partial<TriggerTimeouts>): Promise<TriggerController | undefined> {
    let spec: OciSpec;
    try {
      spec = await readBundleSpec(o.bundle);
    } catch {
      return undefined; // Lifecycle.plan reads the bundle next and reports what is wrong with it
    }
    const annotations = spec.annotations ?? {};
    if (!wantsControlDir(annotations, o.defaults)) return undefined;
    const log = o.log.child({ id: o.id });
    let policy: TriggerPolicy | null = null;
    let configError: TriggerConfigError | null = null;
    try {
      policy = parseTriggerPolicy(annotations, o.defaults);
    } catch (err) {
      if (!(err instanceof TriggerConfigError)) throw err;
      configError = err;
      log.error({ err, annotation: err.annotation, phase: 'trigger' }, `bad trigger configuration, no automatic snapshot: ${err.message}`);
    }
    const dir = new ControlDir(controlDirFor(o.stateDir, o.namespace, o.id));
    await dir.create();
    try {
      await addControlMount(o.bundle, dir.path);
    } catch (err) {
      await dir.remove();
      throw err;
    }
    const ignored = new Set(o.ignoreEnv);
    const env = (spec.process.env ?? []).filter((e) => ignored.has(e.slice(0, Math.max(0, e.indexOf('=')))));
    const hostUds = o.hostUds === 'open' || o.hostUds === 'all';
    const c = new TriggerController({ id: o.id, dir, policy, configError, process: spec.process, env, hostUds, log, timeouts });
    await c.#writeStatus();
    if (policy) log.info({ trigger: describeTrigger(policy.trigger), controlDir: dir.path, phase: 'trigger' }, 'trigger configured');
    return c;
  }

  get status(): CheckpointStatus {
    return { ...this.#status };
  }

  /** After Start returned: learns how the app came up, then arms the trigger or tells the app it was restored. */
  started(target: TriggerTarget): void {
    if (this.#stopped || this.#target) return;
    this.#target = target;
    this.#hooks = new HookRunner(target.exec);
    const launch = target.launched();
    if (!launch) {
      this.#log.warn({ phase: 'trigger' }, 'container started without a launch record; trigger not armed');
      return;
    }
    this.#launch = launch;
    void this.#startServer().catch((err: unknown) => this.#log.warn({ err, phase: 'trigger' }, 'control socket not available'));
    if (launch.restored) {
      void this.#afterRestore(launch);
      return;
    }
    this.#arm();
  }

  /** Stops the trigger: no new checkpoint starts, running hooks are killed, the socket closes. */
  async stop(): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    this.#abort.abort(new ShimError('Canceled', 'container is being deleted'));
    for (const t of this.#timers) clearTimeout(t);
    this.#watcher?.close();
    await this.#server?.close();
  }

  /** Removes the control directory (after the container is gone). */
  async dispose(): Promise<void> {
    await this.stop();
    await this.dir.remove();
  }

  /**
   * A checkpoint asked for from outside (Task.Checkpoint): runs the hooks around `checkpoint` when
   * the configuration is valid; resume hooks only when the container keeps running. containerd's
   * client pauses the task around Task.Checkpoint, and hooks cannot run in a paused sandbox: the
   * task is resumed for the hooks only and paused again, so the checkpoint itself and containerd's
   * own resume see the state containerd left.
   */
  async manual<T>(leaveRunning: boolean, checkpoint: () => Promise<T>): Promise<T> {
    const target = this.#target;
    const hooks = this.policy && (this.policy.preCheckpoint !== null || this.policy.kvCache.mode === 'discard');
    if (this.#busy) throw new ShimError('FailedPrecondition', 'a triggered checkpoint of this container is in progress');
    if (!this.policy || !target) return checkpoint();
    const paused = hooks ? target.paused() : false;
    const unpaused = async <R>(fn: () => Promise<R>): Promise<R> => {
      if (!paused) return fn();
      await target.resume();
      try {
        return await fn();
      } finally {
        await target.pause();
      }
    };
    let result: T | undefined;
    await this.#withBusy(async () => {
      this.#setStatus({ state: 'running', reason: null });
      let undo: UndoHook[] = [];
      try {
        undo = await unpaused(() => this.#quiesce());
        result = await checkpoint();
        this.#setStatus({ state: 'committed', snapshot: this.#launch?.key ?? null });
      } catch (err) {
        this.#setStatus({ state: isShimError(err, 'AlreadyExists') ? 'skipped' : 'failed', reason: asShimError(err).message });
        throw err;
      } finally {
        if (leaveRunning && undo.length > 0) await unpaused(() => this.#resume(undo, 'checkpointed'));
      }
    });
    return result as T;
  }

  // ---- trigger kinds ----

  #arm(): void {
    const policy = this.policy;
    if (!policy) return;
    const t = policy.trigger;
    switch (t.kind) {
      case 'off':
      case 'manual':
        return;
      case 'after':
        this.#timers.push(setTimeout(() => void this.#fire('after'), t.delayMs));
        this.#log.info({ phase: 'trigger', delayMs: t.delayMs }, 'checkpoint scheduled');
        return;
      case 'when-ready':
        void this.#waitReady(policy);
        return;
      case 'on-request':
        this.#watchSignalFile();
        if (!this.#hostUds) {
          this.#log.warn(
            { phase: 'trigger' },
            'runsc runs without --host-uds=open: the app cannot connect to /run/thaw/thaw.sock (set runsc.flags["host-uds"]="open" in the thaw config); /run/thaw/checkpoint-now still works',
          );
        }
        return;
    }
  }

  async #waitReady(policy: TriggerPolicy): Promise<void> {
    const probe = policy.ready!;
    const deadline = performance.now() + policy.readyTimeoutMs;
    const signal = this.#abort.signal;
    let attempts = 0;
    let lastError = '';
    while (!signal.aborted) {
      attempts++;
      try {
        await this.#hooks!.run('ready', probe, { timeoutMs: Math.min(policy.hookTimeoutMs, policy.readyTimeoutMs), signal });
        this.#log.info({ phase: 'ready', attempts }, 'readiness probe succeeded');
        await this.#fire('ready');
        return;
      } catch (err) {
        if (signal.aborted) return;
        lastError = asShimError(err).message;
        this.#log.debug({ phase: 'ready', attempts, err }, 'not ready yet');
      }
      if (!this.#target?.running()) return;
      if (performance.now() + policy.readyIntervalMs > deadline) {
        const reason = `not ready after ${policy.readyTimeoutMs} ms (${attempts} probes; last: ${lastError})`;
        this.#log.error({ phase: 'ready', probe: describeHook(probe) }, `readiness probe gave up, no snapshot: ${reason}`);
        this.#setStatus({ state: 'failed', reason });
        return;
      }
      await sleep(policy.readyIntervalMs, undefined, { signal }).catch(() => undefined);
    }
  }

  #watchSignalFile(): void {
    const check = (): void => {
      if (this.#stopped) return;
      void this.dir.hasSignal().then(async (present) => {
        if (!present || this.#stopped) return;
        await this.dir.takeSignal();
        this.#log.info({ phase: 'trigger' }, `${CONTROL_FILES.signal} found`);
        this.#schedule('signal file');
      });
    };
    try {
      this.#watcher = watch(this.dir.path, (_event, name) => {
        if (name === CONTROL_FILES.signal) check();
      });
      this.#watcher.on('error', () => undefined);
    } catch (err) {
      this.#log.debug({ err }, 'no inotify watch on the control dir; polling only');
    }
    const poll = (): void => {
      check();
      if (!this.#stopped) this.#timers.push(setTimeout(poll, this.#timeouts.signalPollMs).unref());
    };
    poll();
  }

  /** on-request: a request arrived (socket or signal file); the checkpoint starts on the next turn. */
  #schedule(source: string): ControlReply {
    const launch = this.#launch;
    const policy = this.policy;
    if (!policy || this.configError) return { status: 409, body: { ...this.status, reason: this.configError?.message ?? 'no valid trigger' } };
    if (policy.trigger.kind !== 'on-request') {
      return { status: 403, body: { ...this.status, reason: `this container's trigger is ${describeTrigger(policy.trigger)}, not on-request` } };
    }
    if (!launch) return { status: 409, body: { ...this.status, reason: 'the container has not started yet' } };
    if (launch.restored) {
      this.#log.info({ phase: 'trigger', snapshot: launch.key, source }, 'checkpoint skipped: this copy was restored from the snapshot of its key');
      return { status: 409, body: { ...this.status, reason: `restored copy: snapshot ${launch.key} exists` } };
    }
    if (this.#status.state === 'committed') {
      this.#log.info({ phase: 'trigger', snapshot: launch.key, source }, 'checkpoint skipped: snapshot exists');
      return { status: 409, body: { ...this.status, reason: `snapshot ${launch.key} exists` } };
    }
    if (this.#busy || this.#status.state === 'scheduled') return { status: 202, body: this.status };
    this.#setStatus({ state: 'scheduled', reason: null });
    setImmediate(() => void this.#fire(source));
    return { status: 202, body: this.status };
  }

  // ---- the checkpoint ----

  async #fire(source: string): Promise<void> {
    const target = this.#target;
    const launch = this.#launch;
    const policy = this.policy;
    if (!target || !launch || !policy || this.#stopped) return;
    if (policy.trigger.kind !== 'on-request') {
      if (this.#fired) return;
      this.#fired = true;
    }
    const skip = (reason: string, state: CheckpointState = 'skipped'): void => {
      this.#log.info({ phase: 'trigger', snapshot: launch.key, source }, `checkpoint skipped: ${reason}`);
      this.#setStatus({ state, snapshot: launch.key, reason });
    };
    if (this.#busy) return skip('another checkpoint of this container is in progress', this.#status.state);
    if (!target.running()) return skip('the container is not running');
    const existing = await target.snapshotState(launch.key).catch((err: unknown) => {
      this.#log.warn({ err, snapshot: launch.key }, 'cannot look up the snapshot store');
      return 'none' as const;
    });
    if (existing === 'committed') return skip(`snapshot ${launch.key} exists`);
    if (existing === 'in-progress') return skip(`another checkpoint of snapshot ${launch.key} holds its lock`);
    if (this.#stopped) return;
    await this.#withBusy(() => this.#checkpoint(source, target, launch));
  }

  async #checkpoint(source: string, target: TriggerTarget, launch: LaunchInfo): Promise<void> {
    const t0 = performance.now();
    this.#setStatus({ state: 'running', snapshot: launch.key, reason: null });
    this.#log.info({ phase: 'trigger', snapshot: launch.key, source }, 'checkpoint triggered');
    let undo: UndoHook[] = [];
    try {
      // No host-socket connection may be open in the sandbox while runsc saves it.
      if (this.#server) await this.#server.pause(this.#timeouts.drainMs);
      undo = await this.#quiesce();
      const r = await target.checkpoint();
      const durationMs = Math.round(performance.now() - t0);
      this.#setStatus({ state: 'committed', snapshot: r.snapshot, bytes: r.bytes, durationMs, reason: null });
      this.#log.info({ phase: 'trigger', snapshot: r.snapshot, bytes: r.bytes, durationMs, source }, 'triggered checkpoint committed');
    } catch (err) {
      const e = asShimError(err);
      if (isShimError(err, 'AlreadyExists')) {
        this.#setStatus({ state: 'skipped', reason: e.message });
        this.#log.info({ phase: 'trigger', snapshot: launch.key, source }, `checkpoint skipped: ${e.message}`);
      } else if (!this.#stopped) {
        const hint = /encoding error/.test(e.message) ? ' (does the app hold a connection to a host unix socket?)' : '';
        this.#setStatus({ state: 'failed', reason: `${e.message}${hint}` });
        this.#log.error({ phase: 'trigger', snapshot: launch.key, source, err }, `triggered checkpoint failed, no snapshot; the container keeps running: ${e.message}${hint}`);
      }
    } finally {
      await this.#resume(undo, 'checkpointed');
      if (this.#server && !this.#stopped) await this.#server.resume().catch((err: unknown) => this.#log.warn({ err }, 'control socket not reopened'));
    }
  }

  async #withBusy(fn: () => Promise<void>): Promise<void> {
    const run = fn();
    this.#busy = run.catch(() => undefined);
    try {
      await run;
    } finally {
      this.#busy = undefined;
    }
  }

  /**
   * pre-checkpoint, then kv-cache release. Returns the resume hooks owed for the steps that ran
   * (post-restore pairs with pre-checkpoint, kv-cache restore with release); when a step fails, runs
   * those at once and throws its HookError.
   */
  async #quiesce(): Promise<UndoHook[]> {
    const policy = this.policy!;
    const undo: UndoHook[] = [];
    try {
      if (policy.preCheckpoint) {
        await this.#runHook('pre-checkpoint', policy.preCheckpoint, 'checkpoint');
        if (policy.postRestore) undo.push({ name: 'post-restore', hook: policy.postRestore });
      }
      if (policy.kvCache.mode === 'discard') {
        await this.#runHook('kv-cache-discard', policy.kvCache.release, 'checkpoint');
        undo.push({ name: 'kv-cache-restore', hook: policy.kvCache.reacquire });
      }
    } catch (err) {
      await this.#resume(undo, 'checkpoint-failed');
      throw err;
    }
    return undo;
  }

  /** Runs resume hooks newest first; failures are logged (the app is running either way). */
  async #resume(undo: UndoHook[], phase: 'checkpointed' | 'checkpoint-failed' | 'restored'): Promise<void> {
    for (const u of [...undo].reverse()) {
      if (this.#stopped) return;
      await this.#runHook(u.name, u.hook, phase).catch((err: unknown) => {
        this.#log.error({ phase: u.name, err }, `${u.name} hook failed; the app keeps running: ${asShimError(err).message}`);
      });
    }
  }

  async #runHook(name: HookName, hook: Hook, phase: string): Promise<void> {
    const policy = this.policy!;
    const r = await this.#hooks!.run(name, hook, {
      timeoutMs: policy.hookTimeoutMs,
      env: [`THAW_PHASE=${phase}`, `THAW_SNAPSHOT=${this.#launch?.key ?? ''}`],
      signal: this.#abort.signal,
    });
    this.#log.info({ phase: name, durationMs: r.durationMs, hook: describeHook(hook) }, 'hook done');
  }

  // ---- restored copies ----

  async #afterRestore(launch: LaunchInfo): Promise<void> {
    const restored = launch.restored!;
    const restoredAt = new Date().toISOString();
    try {
      // env first: `restored` is what the app waits for, and env must be complete by then.
      await this.dir.write(CONTROL_FILES.env, this.#env.map((e) => `${e}\n`).join(''));
      await this.dir.writeJson(CONTROL_FILES.restored, { restoredAt, snapshot: restored.snapshot, restoreMs: restored.restoreMs });
    } catch (err) {
      this.#log.warn({ err }, 'could not tell the app it was restored');
    }
    this.#setStatus({ state: 'restoring', snapshot: restored.snapshot, reason: null, restoredAt });
    const policy = this.policy;
    if (policy) {
      const undo: UndoHook[] = [];
      if (policy.postRestore) undo.push({ name: 'post-restore', hook: policy.postRestore });
      if (policy.kvCache.mode === 'discard') undo.push({ name: 'kv-cache-restore', hook: policy.kvCache.reacquire });
      await this.#resume(undo, 'restored');
    }
    this.#setStatus({ state: 'restored' });
    this.#log.info({ phase: 'trigger', snapshot: restored.snapshot }, 'app told it was restored');
  }

  // ---- status and socket ----

  async #startServer(): Promise<void> {
    const server = new ControlServer({
      socketPath: this.dir.socketPath,
      log: this.#log,
      handler: { status: () => this.status, requestCheckpoint: () => this.#schedule('control socket') },
    });
    this.#server = server;
    await server.listen();
  }

  #setStatus(patch: Partial<CheckpointStatus>): void {
    this.#status = { ...this.#status, ...patch, updatedAt: new Date().toISOString() };
    void this.#writeStatus();
  }

  async #writeStatus(): Promise<void> {
    if (this.#stopped) return;
    await this.dir.writeJson(CONTROL_FILES.status, this.#status).catch((err: unknown) => this.#log.debug({ err }, 'status file not written'));
  }
}

interface UndoHook {
  name: HookName;
  hook: Hook;
}
