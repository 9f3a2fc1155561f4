import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { ShimError } from '../errors.js';
import type { ThawConfig } from '../config/config.js';
import type { Engine } from '../engine/engine.js';
import { GvisorEngine } from '../engine/gvisor.js';
import { runtimeIdFor } from '../engine/container-id.js';
import { globalArgs, type RunscGlobalOptions } from '../runsc/options.js';
import { parseRunscLog } from '../runsc/log.js';

/**
 * Runs a command inside a running container to completion and reports its exit code and output:
 * what hooks and readiness probes need. Hooks must learn the exit code of commands that finish in
 * milliseconds (`test -e /tmp/ready`), which `Engine.exec` cannot promise on gVisor: it runs
 * `runsc exec --detach` and then `runsc wait --pid`, and a process that exits before the wait
 * attaches loses its status ("waiting for PID n: no such process", measured with 20240729).
 * So for gVisor this runs `runsc exec` in the foreground, whose own exit code is the process's
 * (128+signal when killed). STOPGAP: this is a second place that execs runsc; it belongs in
 * `Runsc.exec({wait: true})` / an `Engine.run()` (proposed to the lead), after which this file
 * keeps only the timeout handling.
 */
export interface ExecRequest {
  argv: readonly string[];
  /** Added to the container's environment (NAME=value). */
  env?: readonly string[];
  timeoutMs: number;
  signal?: AbortSignal;
}

export interface ExecOutcome {
  /** The process's exit code (128 + signal number when it was killed). */
  exitCode: number;
  /** stdout and stderr, interleaved, at most the last 4 KiB. */
  output: string;
  durationMs: number;
}

export interface ContainerExec {
  /** Rejects with DeadlineExceeded (after killing the process) or Canceled; otherwise reports the exit. */
  run(req: ExecRequest): Promise<ExecOutcome>;
}

const OUTPUT_TAIL = 4096;

export interface ContainerExecOptions {
  config: ThawConfig;
  engine: Engine;
  /** thaw's container id and its containerd namespace (the engine maps them to its runtime id). */
  id: string;
  namespace: string;
  /** The container's OCI process (env, cwd, user, capabilities…): hooks run with the app's settings. */
  process: Readonly<Record<string, unknown>>;
}

/** The right runner for the container's engine. */
export function containerExecFor(o: ContainerExecOptions): ContainerExec {
  if (o.engine instanceof GvisorEngine) return new RunscForegroundExec(o, o.engine);
  return new EngineExec(o);
}

function processFor(base: Readonly<Record<string, unknown>>, req: ExecRequest): Record<string, unknown> {
  const env = Array.isArray(base.env) ? (base.env as string[]) : [];
  return { ...base, terminal: false, args: [...req.argv], env: [...env, ...(req.env ?? [])] };
}

class RunscForegroundExec implements ContainerExec {
  readonly #o: ContainerExecOptions;
  readonly #engine: GvisorEngine;
  readonly #global: RunscGlobalOptions;
  readonly #rid: string;

  constructor(o: ContainerExecOptions, engine: GvisorEngine) {
    this.#o = o;
    this.#engine = engine;
    this.#rid = runtimeIdFor(o.id, o.namespace);
    const c = o.config.runsc;
    this.#global = { path: c.path, root: engine.runsc.root, platform: c.platform, network: c.network, debugLogDir: null, flags: c.flags };
  }

  async run(req: ExecRequest): Promise<ExecOutcome> {
    const dir = await mkdtemp(join(this.#o.config.stateDir, 'tmp', 'thaw-hook-'));
    const t0 = performance.now();
    try {
      const processFile = join(dir, 'process.json');
      const pidFile = join(dir, 'pid');
      const logFile = join(dir, 'runsc.log');
      await writeFile(processFile, JSON.stringify(processFor(this.#o.process, req)), { mode: 0o600 });
      const argv = [...globalArgs(this.#global, logFile), 'exec', `--process=${processFile}`, `--internal-pid-file=${pidFile}`, this.#rid];
      const child = execa(this.#global.path, argv, {
        reject: false,
        cancelSignal: req.signal,
        forceKillAfterDelay: 2_000,
        stdin: 'ignore',
        all: true,
        encoding: 'utf8',
        maxBuffer: 1024 * 1024,
      });
      let timedOut = false;
      const timer = setTimeout(() => {
        timedOut = true;
        void this.#killInSandbox(pidFile).finally(() => setTimeout(() => child.kill('SIGKILL'), 2_000).unref());
      }, req.timeoutMs);
      const onAbort = (): void => void this.#killInSandbox(pidFile);
      req.signal?.addEventListener('abort', onAbort, { once: true });
      const r = await child.finally(() => {
        clearTimeout(timer);
        req.signal?.removeEventListener('abort', onAbort);
      });
      const durationMs = Math.round(performance.now() - t0);
      const output = tail(typeof r.all === 'string' ? r.all : '');
      if (timedOut) throw new ShimError('DeadlineExceeded', `timed out after ${req.timeoutMs} ms (killed)${output ? `; output: ${output}` : ''}`);
      if (r.isCanceled) throw new ShimError('Canceled', 'canceled', { cause: req.signal?.reason });
      if (r.exitCode === undefined) {
        throw new ShimError('Unavailable', `cannot run ${this.#global.path} exec: ${r.shortMessage}`, { cause: r });
      }
      // runsc's own failures (no such binary in the image, container gone) land in its log.
      const runscError = r.exitCode === 128 ? lastLogLine(await readFile(logFile, 'utf8').catch(() => '')) : '';
      if (runscError) throw new ShimError('FailedPrecondition', `runsc exec failed: ${runscError}`);
      return { exitCode: r.exitCode, output, durationMs };
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }

  /** `runsc kill --pid` of the hook's process (the foreground runsc then exits with 137). */
  async #killInSandbox(pidFile: string): Promise<void> {
    const pid = Number((await readFile(pidFile, 'utf8').catch(() => '')).trim());
    if (!Number.isInteger(pid) || pid <= 0) return;
    await this.#engine.runsc.kill(this.#rid, 'SIGKILL', { pid }).catch(() => undefined);
  }
}

/** Other engines: their exec reports exits reliably (runc waits on its own child). */
class EngineExec implements ContainerExec {
  constructor(private readonly o: ContainerExecOptions) {}

  async run(req: ExecRequest): Promise<ExecOutcome> {
    const t0 = performance.now();
    const h = await this.o.engine.exec(this.o.id, { process: processFor(this.o.process, req), stdio: ['ignore', 'ignore', 'ignore'], signal: req.signal });
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        void h.kill(9).catch(() => undefined);
        reject(new ShimError('DeadlineExceeded', `timed out after ${req.timeoutMs} ms (killed)`));
      }, req.timeoutMs);
    });
    try {
      const exit = await Promise.race([h.exited, timeout]);
      return { exitCode: exit.exitStatus, output: '', durationMs: Math.round(performance.now() - t0) };
    } finally {
      clearTimeout(timer);
    }
  }
}

function tail(s: string): string {
  const t = s.trim();
  return t.length <= OUTPUT_TAIL ? t : `…${t.slice(-OUTPUT_TAIL)}`;
}

/** The last error record of runsc's `--log` file (written only when runsc itself failed), or ''. */
function lastLogLine(text: string): string {
  const errors = parseRunscLog(text).filter((r) => r.msg !== '' && (r.level === 'error' || r.level === 'fatal'));
  return errors.at(-1)?.msg ?? '';
}
