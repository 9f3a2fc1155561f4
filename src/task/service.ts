import { create, toBinary } from '@bufbuild/protobuf';
import { link, mkdir, readdir, copyFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Cleanup } from '../cleanup.js';
import { loadConfig, type ThawConfig } from '../config/config.js';
import { ShimError, isShimError } from '../errors.js';
import { PhaseTimer } from '../log/logger.js';
import { settledOrFirstError } from '../settled.js';
import { openRuntime, type Runtime } from '../engine/runtime.js';
import {
  TaskCheckpointedSchema,
  TaskCreateSchema,
  TaskDeleteSchema,
  TaskExecAddedSchema,
  TaskExecStartedSchema,
  TaskExitSchema,
  TaskOOMSchema,
  TaskPausedSchema,
  TaskResumedSchema,
  TaskStartSchema,
} from '../gen/containerd/events/task_pb.js';
import { CheckpointOptionsSchema } from '../gen/containerd/runc/v1/options_pb.js';
import { DeleteResponseSchema } from '../gen/containerd/task/v2/shim_pb.js';
import { BUNDLE_FILES } from '../shim/manager.js';
import { Status } from '../gen/containerd/v1/types/task_pb.js';
import { MetricsSchema } from '../gen/io/containerd/cgroups/v1/metrics_pb.js';
import type { CreateTaskService, TaskServiceContext, TaskServiceImpl } from '../shim/serve.js';
import { topicOf, type TaskEvent } from './publisher.js';
import { anyTypeName, packAny, unpackAny, type Any } from '../wire/any.js';
import { decodeLinuxResources, type LinuxResources } from '../engine/cgroup-resources.js';
import { toTimestamp } from '../wire/timestamp.js';
import { Container } from './container.js';
import { InitProcess } from './process/init.js';
import { ExecProcess } from './process/exec.js';
import type { ExitInfo, Process, ProcessStatus } from './process/process.js';
import { mountRootfs, unmountRootfs } from './rootfs.js';
import { OpenStdio } from './stdio.js';
import { TerminalIo } from './console.js';
import { CONFIG_PATH_FILE } from './dead-task.js';
import { prepareTrigger, triggerTarget } from '../trigger/target.js';
import type { TriggerController } from '../trigger/controller.js';

const STATUS: Record<ProcessStatus, Status> = {
  created: Status.CREATED,
  running: Status.RUNNING,
  paused: Status.PAUSED,
  stopped: Status.STOPPED,
  deleted: Status.STOPPED,
};

/**
 * containerd's Task service for thaw. Each handler looks the container up, calls one method on it,
 * queues an event and returns; errors become wire statuses in ttrpc/status.ts. The boot-vs-restore
 * decision is taken at Create (Lifecycle.plan/create) and acted on at Start.
 */
export const createTaskService: CreateTaskService = async (ctx) => taskServiceFor(ctx, await loadConfig(ctx.configPath));

/** The Task service over a runtime opened from `config` (lazy-service.ts calls this on first use). */
export async function taskServiceFor(ctx: TaskServiceContext, config: ThawConfig): Promise<TaskServiceImpl> {
  const runtime = await openRuntime(config, ctx.log);
  return new TaskService(ctx, runtime).handlers();
}

export class TaskService {
  /** Invariant: keyed by container id; an entry exists from Create until its Delete returns. */
  readonly #containers = new Map<string, Container>();
  /** Checkpoint triggers (thaw.dev/checkpoint), by container id; Create to Delete, like #containers. */
  readonly #triggers = new Map<string, TriggerController>();

  constructor(
    private readonly ctx: TaskServiceContext,
    private readonly rt: Runtime,
  ) {}

  #get(id: string): Container {
    const c = this.#containers.get(id);
    if (!c) throw new ShimError('NotFound', `container ${id} not found`);
    return c;
  }

  #publish(event: TaskEvent): void {
    this.ctx.publisher.publish(topicOf(event), event);
  }

  #onExit = (p: Process, exit: ExitInfo): void => {
    this.#publish(
      create(TaskExitSchema, {
        containerId: p.id,
        id: p.execId || p.id,
        pid: p.pid,
        exitStatus: exit.status,
        exitedAt: toTimestamp(exit.at),
      }),
    );
  };

  /** containerd's runc shim publishes TaskOOM with the container id only; CRI then reports reason OOMKilled. */
  #onOom = (p: InitProcess): void => {
    this.#publish(create(TaskOOMSchema, { containerId: p.id }));
  };

  handlers(): TaskServiceImpl {
    return {
      create: async (req) => {
        if (this.#containers.has(req.id)) throw new ShimError('AlreadyExists', `container ${req.id} already exists`);
        const log = this.ctx.log.child({ id: req.id });
        await using cleanup = new Cleanup((f) => log.warn({ err: f.err, step: f.name }, 'undo failed'));
        const timer = new PhaseTimer(log);
        const stdio = { stdin: req.stdin, stdout: req.stdout, stderr: req.stderr, terminal: req.terminal };
        // Three independent steps at once (each registers its undo when done): the rootfs mount,
        // the stdio, and the trigger, which must come before plan: it adds the /run/thaw mount to
        // config.json, which the key and runsc then see.
        const [rootfsTarget, io, trigger] = await settledOrFirstError([
          timer.phase('mount-rootfs', async () => {
            const target = await mountRootfs(req.bundle, req.rootfs);
            if (target) cleanup.add('unmount rootfs', () => unmountRootfs(target));
            return target;
          }),
          timer.phase('open-stdio', async () => {
            const opened = stdio.terminal ? await TerminalIo.open(stdio, { log }) : await OpenStdio.open(stdio);
            cleanup.add('close stdio', () => opened.close());
            return opened;
          }),
          timer.phase('prepare-trigger', async () => {
            const prepared = await prepareTrigger({ bundle: req.bundle, id: req.id, namespace: this.ctx.namespace, config: this.rt.config, log });
            if (prepared) cleanup.add('remove control dir', () => prepared.dispose());
            return prepared;
          }),
        ]);
        const lifecycle = this.rt.lifecycle;
        const plan = await lifecycle.plan({
          id: req.id,
          namespace: this.ctx.namespace,
          bundle: req.bundle,
          stdio: io.fds,
          ...(io instanceof TerminalIo ? { consoleSocket: io.consoleSocket } : {}),
          owner: 'shim',
          rootfsMounts: req.rootfs,
        });
        // For `delete` after a crash, which gets no runtime options from containerd. Written once
        // plan() has read the bundle (a missing bundle is NotFound there) and before any sandbox.
        if (this.ctx.configPath) await writeFile(join(req.bundle, CONFIG_PATH_FILE), this.ctx.configPath);
        const prepared = await lifecycle.create(plan);
        cleanup.add('delete container', () => plan.engine.delete(req.id, { force: true }));
        // A cold create has sent the pty master by now; a restore sends it at Start (InitProcess.launch).
        if (io instanceof TerminalIo && prepared.kind === 'cold') await io.attach();
        const init = new InitProcess({
          id: req.id,
          namespace: this.ctx.namespace,
          bundle: req.bundle,
          prepared,
          engine: plan.engine,
          lifecycle,
          io,
          stdio,
          log,
          onExit: this.#onExit,
          onOom: this.#onOom,
        });
        this.#containers.set(req.id, new Container(req.id, this.ctx.namespace, req.bundle, init, rootfsTarget));
        if (trigger) this.#triggers.set(req.id, trigger);
        cleanup.release();
        this.#publish(
          create(TaskCreateSchema, {
            containerId: req.id,
            bundle: req.bundle,
            rootfs: req.rootfs,
            io: { stdin: req.stdin, stdout: req.stdout, stderr: req.stderr, terminal: req.terminal },
            checkpoint: req.checkpoint,
            pid: init.pid,
          }),
        );
        return { pid: init.pid };
      },

      start: async (req) => {
        const c = this.#get(req.id);
        const p = c.process(req.execId);
        const pid = await p.start();
        if (req.execId === '') {
          this.#publish(create(TaskStartSchema, { containerId: req.id, pid }));
          const trigger = this.#triggers.get(req.id);
          trigger?.started(triggerTarget({ controller: trigger, init: c.init, config: this.rt.config, store: this.rt.store }));
        } else this.#publish(create(TaskExecStartedSchema, { containerId: req.id, execId: req.execId, pid }));
        return { pid };
      },

      state: (req) => {
        const c = this.#get(req.id);
        const p = c.process(req.execId);
        return {
          id: p.execId || p.id,
          bundle: c.bundle,
          pid: p.pid,
          status: STATUS[p.status],
          stdin: p.stdio.stdin,
          stdout: p.stdio.stdout,
          stderr: p.stdio.stderr,
          terminal: p.stdio.terminal,
          exitStatus: p.exit?.status ?? 0,
          exitedAt: p.exit ? toTimestamp(p.exit.at) : undefined,
          execId: req.execId,
        };
      },

      wait: async (req) => {
        const exit = await this.#get(req.id).process(req.execId).wait();
        return { exitStatus: exit.status, exitedAt: toTimestamp(exit.at) };
      },

      kill: async (req) => {
        await this.#get(req.id).process(req.execId).kill(req.signal, req.all);
        return {};
      },

      delete: async (req) => {
        const c = this.#get(req.id);
        if (req.execId !== '') {
          const p = c.exec(req.execId);
          const exit = await p.delete();
          c.execs.delete(req.execId);
          return { pid: p.pid, exitStatus: exit.status, exitedAt: toTimestamp(exit.at) };
        }
        const trigger = this.#triggers.get(c.id);
        await trigger?.stop(); // no checkpoint may start while the container goes away
        const exit = await c.init.delete();
        await trigger?.dispose();
        this.#triggers.delete(c.id);
        if (c.rootfsTarget) await unmountRootfs(c.rootfsTarget);
        await this.rt.records.remove(c.id, c.namespace);
        this.#containers.delete(c.id);
        this.#publish(
          create(TaskDeleteSchema, { containerId: c.id, id: c.id, pid: c.init.pid, exitStatus: exit.status, exitedAt: toTimestamp(exit.at) }),
        );
        const response = create(DeleteResponseSchema, { pid: c.init.pid, exitStatus: exit.status, exitedAt: toTimestamp(exit.at) });
        // Nothing is left to clean: the `delete` verb containerd runs after the shim exits answers from this.
        await writeFile(join(c.bundle, BUNDLE_FILES.deleted), toBinary(DeleteResponseSchema, response)).catch((err: unknown) =>
          this.ctx.log.warn({ id: c.id, err }, 'recording the deleted task for the delete verb failed'),
        );
        return response;
      },

      exec: async (req) => {
        const c = this.#get(req.id);
        c.init.assertCanExec();
        if (req.execId === '' || c.execs.has(req.execId)) {
          throw new ShimError('AlreadyExists', `exec ${JSON.stringify(req.execId)} already exists in container ${req.id}`);
        }
        const stdio = { stdin: req.stdin, stdout: req.stdout, stderr: req.stderr, terminal: req.terminal };
        const io = stdio.terminal ? await TerminalIo.open(stdio, { log: this.ctx.log.child({ id: req.id, execId: req.execId }) }) : await OpenStdio.open(stdio);
        const spec = processSpecOf(req.spec?.value);
        c.execs.set(
          req.execId,
          new ExecProcess({ id: req.id, execId: req.execId, engine: c.init.engine, spec, io, stdio, log: this.ctx.log, onExit: this.#onExit }),
        );
        this.#publish(create(TaskExecAddedSchema, { containerId: req.id, execId: req.execId }));
        return {};
      },

      pids: async (req) => {
        const c = this.#get(req.id);
        const pids = await c.init.engine.ps(c.id);
        return { processes: pids.map((pid) => ({ pid })) };
      },

      pause: async (req) => {
        await this.#get(req.id).init.pause();
        this.#publish(create(TaskPausedSchema, { containerId: req.id }));
        return {};
      },

      resume: async (req) => {
        await this.#get(req.id).init.resume();
        this.#publish(create(TaskResumedSchema, { containerId: req.id }));
        return {};
      },

      checkpoint: async (req) => {
        const c = this.#get(req.id);
        const opts = req.options ? unpackAny(req.options, CheckpointOptionsSchema) : undefined;
        const target = opts?.imagePath || req.path;
        const leaveRunning = !(opts?.exit ?? false);
        // With a trigger configured, its hooks (pre-checkpoint, kv-cache) run around this checkpoint too.
        const trigger = this.#triggers.get(req.id);
        const run = (): Promise<void> => this.#checkpoint(c, target, leaveRunning);
        await (trigger ? trigger.manual(leaveRunning, run) : run());
        this.#publish(create(TaskCheckpointedSchema, { containerId: req.id, checkpoint: target }));
        return {};
      },

      closeIO: async (req) => {
        if (req.stdin) await this.#get(req.id).process(req.execId).closeStdin();
        return {};
      },

      resizePty: (req) => {
        this.#get(req.id).process(req.execId).resizePty({ width: req.width, height: req.height });
        return {};
      },

      // UpdateTaskRequest has no exec id: limits apply to the whole container. No event (containerd publishes none).
      update: async (req) => {
        const c = this.#get(req.id);
        const engine = c.init.engine;
        if (!engine.update) throw new ShimError('NotImplemented', `the ${engine.name} engine cannot update the resources of a running task`);
        const status = c.init.status;
        if (status === 'stopped' || status === 'deleted') throw new ShimError('FailedPrecondition', `cannot update task in ${status} state`);
        await engine.update(c.id, linuxResourcesOf(req.resources));
        return {};
      },

      stats: async (req) => {
        const c = this.#get(req.id);
        const s = await c.init.engine.stats(c.id);
        const big = (n: number | undefined): bigint => BigInt(Math.max(0, Math.trunc(n ?? 0)));
        const metrics = create(MetricsSchema, {
          pids: { current: big(s.pids) },
          cpu: { usage: { total: big(s.cpuUsageNanos) } },
          memory: { usage: { usage: big(s.memoryUsageBytes), limit: big(s.memoryLimitBytes) } },
        });
        return { stats: packAny(MetricsSchema, metrics) };
      },

      connect: (req) => {
        const c = this.#containers.get(req.id);
        return { shimPid: process.pid, taskPid: c?.init.pid ?? 0, version: this.ctx.version };
      },

      shutdown: () => {
        if (this.#containers.size === 0) setImmediate(() => void this.ctx.shutdown.shutdown('Shutdown RPC'));
        return {};
      },
    };
  }

  /**
   * Task.Checkpoint: commits the snapshot into thaw's store under the container's key (so the next
   * Create of that image restores) and puts the runtime image where containerd asked. If the key
   * already has a snapshot, the image for containerd is written directly.
   */
  async #checkpoint(c: Container, target: string, leaveRunning: boolean): Promise<void> {
    await mkdir(target, { recursive: true });
    try {
      const r = await c.init.checkpoint(leaveRunning);
      const snap = await this.rt.store.get(r.snapshot);
      if (snap) await linkTree(snap.imageDir, target);
    } catch (err) {
      if (!isShimError(err, 'AlreadyExists')) throw err;
      this.ctx.log.info({ id: c.id }, 'snapshot for this key exists; writing the image for containerd only');
      await c.init.engine.checkpoint(c.id, { imageDir: target, leaveRunning });
    }
  }
}

/** ExecProcessRequest.spec: an OCI runtime-spec Process as JSON inside the Any. */
function processSpecOf(value: Uint8Array | undefined): Record<string, unknown> {
  if (!value || value.length === 0) throw new ShimError('InvalidArgument', 'exec request has no process spec');
  try {
    const spec = JSON.parse(Buffer.from(value).toString('utf8')) as unknown;
    if (typeof spec !== 'object' || spec === null || !Array.isArray((spec as { args?: unknown }).args)) {
      throw new Error('no args');
    }
    return spec as Record<string, unknown>;
  } catch (err) {
    throw new ShimError('InvalidArgument', `exec process spec is not an OCI process: ${(err as Error).message}`, { cause: err });
  }
}

/**
 * UpdateTaskRequest.resources: an OCI LinuxResources as JSON inside the Any (containerd's type URL
 * types.containerd.io/opencontainers/runtime-spec/1/LinuxResources). WindowsResources is refused.
 */
function linuxResourcesOf(any: Any | undefined): LinuxResources {
  if (!any || any.value.length === 0) throw new ShimError('InvalidArgument', 'update request carries no resources');
  const type = anyTypeName(any);
  if (type !== 'LinuxResources' && any.typeUrl !== '') {
    throw new ShimError('InvalidArgument', `update resources of type ${JSON.stringify(any.typeUrl)}: only OCI LinuxResources apply to a thaw task`);
  }
  return decodeLinuxResources(any.value);
}

/** Hard-links (or copies across filesystems) every file of `src` into `dst`. */
async function linkTree(src: string, dst: string): Promise<void> {
  for (const e of await readdir(src, { withFileTypes: true })) {
    const from = join(src, e.name);
    const to = join(dst, e.name);
    if (e.isDirectory()) {
      await mkdir(to, { recursive: true });
      await linkTree(from, to);
    } else {
      await link(from, to).catch(() => copyFile(from, to));
    }
  }
}
