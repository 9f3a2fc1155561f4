/**
 * containerd-shim-thaw-v2: parses Go-style flags and runs one verb, importing only its module —
 * containerd execs `start` and `delete` as short-lived processes.
 */
import { isShimVerb, parseShimArgs, SHIM_USAGE, type ShimArgs, type ShimFlags } from './shim-flags.js';

const BINARY = 'containerd-shim-thaw-v2';

process.exitCode = await main(process.argv.slice(2));

async function main(argv: readonly string[]): Promise<number> {
  let args: ShimArgs;
  try {
    args = parseShimArgs(argv);
  } catch (err) {
    process.stderr.write(`${errorText(err)}\n${SHIM_USAGE}\n`);
    return 2;
  }
  const { flags, verb } = args;
  try {
    if (flags.version) {
      const { versionText } = await import('../shim/manager.js');
      await writeStdout(versionText(BINARY));
      return 0;
    }
    if (flags.info) {
      const { runtimeInfo } = await import('../shim/manager.js');
      await writeStdout(await runtimeInfo(await readStdin()));
      return 0;
    }
    if (!isShimVerb(verb)) {
      process.stderr.write(`unknown action ${JSON.stringify(verb ?? '')}\n${SHIM_USAGE}\n`);
      return 2;
    }
    if (verb === 'start') return await runStart(flags);
    if (verb === 'delete') return await runDelete(flags);
    return await runServe(flags);
  } catch (err) {
    // For start this text is containerd's error message ("start failed: <output>").
    process.stderr.write(`${BINARY}: ${errorText(err)}\n`);
    return 1;
  }
}

async function runStart(flags: ShimFlags): Promise<number> {
  const { start, openShimLog, closeFd } = await import('../shim/manager.js');
  const { createLogger, silentLogger } = await import('../log/logger.js');
  const bundle = process.cwd();
  const logFd = openShimLog(bundle);
  try {
    const log = logFd === undefined ? silentLogger : createLogger({ destination: logFd, level: flags.debug ? 'debug' : 'info', name: BINARY });
    const { reply } = await start({ flags, stdin: await readStdin(), bundle, log, serveOutputFd: logFd });
    await writeStdout(reply);
    return 0;
  } finally {
    closeFd(logFd);
  }
}

async function runDelete(flags: ShimFlags): Promise<number> {
  const { deleteDeadShim, deletedTaskReply } = await import('../shim/manager.js');
  const bundle = flags.bundle || process.cwd();
  const answered = await deletedTaskReply(bundle);
  if (answered) {
    await writeStdout(answered);
    return 0;
  }
  const { createLogger } = await import('../log/logger.js');
  const { cleanupDeadTaskWith } = await import('../task/dead-task.js');
  const reply = await deleteDeadShim({
    flags,
    bundle,
    cleanupDeadTask: cleanupDeadTaskWith(flags.configPath || undefined),
    log: createLogger({ destination: 2, level: flags.debug ? 'debug' : 'info', name: BINARY }),
  });
  await writeStdout(reply);
  return 0;
}

async function runServe(flags: ShimFlags): Promise<never> {
  const { serve } = await import('../shim/serve.js');
  const { READY_FD_ENV, RUNTIME_OPTIONS_ENV } = await import('../shim/manager.js');
  const { createLogger } = await import('../log/logger.js');
  const { createLazyTaskService } = await import('../task/lazy-service.js');
  const readyFd = Number.parseInt(process.env[READY_FD_ENV] ?? '', 10);
  const runtimeOptions = process.env[RUNTIME_OPTIONS_ENV];
  delete process.env[READY_FD_ENV]; // not for runsc and other children
  delete process.env[RUNTIME_OPTIONS_ENV];
  // stdout/stderr are the bundle's log FIFO (or /dev/null), as `start` set them up.
  // `shim`, not `id`: a group's server serves several tasks, and each line about one carries its `id`.
  const log = createLogger({ destination: 2, level: flags.debug ? 'debug' : 'info', name: BINARY }).child({
    ns: flags.namespace,
    shim: flags.id,
  });
  // Before any runsc: sandboxes become this server's children, so exits are reaped, not polled.
  const { enableChildReaper } = await import('../runsc/reaper.js');
  enableChildReaper({ log });
  const shim = await serve(
    {
      flags,
      bundle: process.cwd(),
      log,
      readyFd: Number.isInteger(readyFd) ? readyFd : undefined,
      runtimeOptions: runtimeOptions ? Buffer.from(runtimeOptions, 'base64') : undefined,
      handleSignals: true,
    },
    { createTaskService: createLazyTaskService },
  );
  await shim.done;
  process.exit(shim.shutdown.failures.length === 0 ? 0 : 1);
}

async function readStdin(): Promise<Uint8Array> {
  const chunks: Buffer[] = [];
  try {
    for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  } catch {
    // closed or unreadable stdin carries nothing
  }
  return Buffer.concat(chunks);
}

function writeStdout(data: string | Uint8Array): Promise<void> {
  return new Promise((resolve, reject) => process.stdout.write(data, (err) => (err ? reject(err) : resolve())));
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
