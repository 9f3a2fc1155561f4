/**
 * containerd-shim-thaw-v2: parses Go-style flags and runs one verb, importing only its module —
 * containerd execs `start` and `delete` as short-lived processes.
 */
import type { Logger, SwitchableDestination } from '../log/logger.js';
import type { SpareRequests } from '../shim/spare.js';
import type { ServeFlags } from '../shim/manager.js';
import type { ShimServer } from '../shim/serve.js';
import { isShimVerb, parseShimArgs, SHIM_USAGE, type ShimArgs, type ShimFlags } from './shim-flags.js';

const BINARY = 'containerd-shim-thaw-v2';

// The shim server of this process (`serve`, or a spare that serves one container after another).
// Declared before main() runs: top-level await starts it right below.
/** Where every logger of the server writes: the log FIFO of the container it serves now. */
let serverLog: SwitchableDestination | undefined;
/** The logger of the container served now: Node's report of a crash, spare boots. */
let containerLog: Logger | undefined;
/**
 * The server's requests for the next container's spare (the Task service makes them after Start
 * and Delete). One per process, not per container: a recycled server must still know the spares it
 * booted for earlier containers — they stay its children, and are no leftover of its last one.
 */
let spareRequests: SpareRequests | undefined;

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
    if (verb === 'spare') return await runSpare();
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
  const { READY_FD_ENV, RUNTIME_OPTIONS_ENV } = await import('../shim/manager.js');
  const readyFd = Number.parseInt(process.env[READY_FD_ENV] ?? '', 10);
  const runtimeOptions = process.env[RUNTIME_OPTIONS_ENV];
  delete process.env[READY_FD_ENV]; // not for runsc and other children
  delete process.env[RUNTIME_OPTIONS_ENV];
  // stdout/stderr are the bundle's log FIFO (or /dev/null), as `start` set them up.
  const shim = await serveShim(flags, {
    logFd: 2,
    readyFd: Number.isInteger(readyFd) ? readyFd : undefined,
    runtimeOptions: runtimeOptions ? Buffer.from(runtimeOptions, 'base64') : undefined,
  });
  await shim.done;
  await spareRequests?.settle(); // this server exits with its container: leave the next one a spare
  process.exit(shim.shutdown.failures.length === 0 ? 0 : 1);
}

/**
 * A shim server on the socket of `flags`, with the Task service; shared by `serve` and a claimed
 * spare (also one that served containers before: `servedBefore`).
 */
async function serveShim(
  flags: ServeFlags,
  opts: { logFd: number; readyFd?: number; runtimeOptions?: Uint8Array; servedBefore?: number },
): Promise<ShimServer> {
  const [{ serve }, { createLogger, SwitchableDestination }, { createLazyTaskService }, { enableChildReaper }, { SpareRequests, binDirOf, spareRegistry, sparesInDemand }] =
    await Promise.all([
      import('../shim/serve.js'),
      import('../log/logger.js'),
      import('../task/lazy-service.js'),
      import('../runsc/reaper.js'),
      import('../shim/spare.js'),
    ]);
  serverLog ??= new SwitchableDestination();
  serverLog.switchTo(opts.logFd);
  // `shim`, not `id`: a group's server serves several tasks, and each line about one carries its `id`.
  const log = createLogger({ destination: serverLog, level: flags.debug ? 'debug' : 'info', name: BINARY }).child({
    ns: flags.namespace,
    shim: flags.id,
  });
  // A claimed spare's stderr is /dev/null, not the log FIFO: Node's own report of a crash would be lost.
  if (containerLog === undefined) process.on('uncaughtExceptionMonitor', (err, origin) => containerLog?.fatal({ err, origin }, 'shim server crashed'));
  containerLog = log;
  if (opts.servedBefore) log.info({ servedBefore: opts.servedBefore }, 'a recycled shim server serves this container');
  // Before any runsc: sandboxes become this server's children, so exits are reaped, not polled.
  enableChildReaper({ log });
  if (spareRequests === undefined) {
    const registry = spareRegistry(binDirOf(process.argv[1]!)); // once per process, not per container
    spareRequests = new SpareRequests(() => bootSpare(containerLog ?? log, registry), () => sparesInDemand(registry));
  }
  return serve(
    {
      flags,
      bundle: process.cwd(),
      log,
      readyFd: opts.readyFd,
      runtimeOptions: opts.runtimeOptions,
      handleSignals: true,
      requestSpare: (moment) => spareRequests?.request(moment),
    },
    { createTaskService: createLazyTaskService },
  );
}

/** Boots a spare for the next container unless one waits or boots already (src/shim/spare.ts). */
async function bootSpare(log: Logger, registry: string): Promise<number | undefined> {
  try {
    const [{ ensureSpare }, { defaultServeCommand }] = await Promise.all([import('../shim/spare.js'), import('../shim/manager.js')]);
    return await ensureSpare({ registry, command: defaultServeCommand(), log });
  } catch (err) {
    log.warn({ err }, 'no spare shim server: the next container starts one');
    return undefined;
  }
}

/**
 * `spare`: boot now, then wait in the registry until a `start` claims this process; then do what
 * that `start` and the `serve` it would have launched do, here (src/shim/spare.ts).
 */
async function runSpare(): Promise<never> {
  const spare = await import('../shim/spare.js');
  const manager = await import('../shim/manager.js');
  // What `start` and `serve` need before listening, loaded before registering; the Task service
  // after it, as `serve` does once it listens (a claim in between waits for it in Create, as there).
  await Promise.all([import('../shim/serve.js'), import('../log/logger.js'), import('../task/lazy-service.js'), import('../runsc/reaper.js')]);
  (await import('../runsc/reaper-native.js')).loadReaperAddon(); // dlopen now; enableChildReaper then finds it loaded
  const binDir = spare.binDirOf(process.argv[1]!);
  const registry = spare.spareRegistry(binDir);
  const code = new spare.CodeStamp(binDir);
  const slot = await spare.SpareSlot.register(registry);
  if (slot === undefined) process.exit(0); // another spare waits already
  void import('../task/service.js').catch(() => undefined);
  const recycling = new spare.RecyclePolicy();
  for (;;) {
    // A spare of code that was rebuilt or removed (a test build), or one too many, leaves.
    const stopWatching = spare.retireWhenUnneeded(slot, () => spare.whySpareUnneeded({ code, registry }), () => process.exit(0));
    const claim = await slot.waitForClaim().catch(() => undefined); // a broken claim: `start` goes on without us
    stopWatching();
    if (claim === undefined) process.exit(0);
    const outcome = await spare.handleClaim(claim, {
      codeUnchanged: () => code.unchanged(),
      planStart: manager.planStart,
      writeStartFiles: manager.writeStartFiles,
      serve: (plan, bundle) =>
        serveShim(plan.serveFlags, { logFd: manager.openShimLog(bundle) ?? 2, runtimeOptions: plan.runtimeOptions, servedBefore: recycling.served }),
      onAccepted: spare.takeNormalPriority,
      binary: BINARY,
    });
    if (outcome.kind === 'exit') process.exit(outcome.code);
    if (outcome.kind === 'serving') {
      const after = await spare.afterServing({
        server: outcome.server,
        policy: recycling,
        slot,
        codeUnchanged: code.unchanged(),
        serverLog,
        spareRequests,
        inDemand: () => spare.sparesInDemand(registry),
        log: containerLog,
      });
      if (after.kind === 'exit') process.exit(after.code);
      continue;
    }
    await slot.reregister();
  }
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
