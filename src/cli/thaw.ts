import { Command, Option } from 'commander';
import { reportAndExit } from './output.js';
import type { GlobalOptions } from './context.js';

/**
 * `thaw`: the engine from a command line. Parses argv and lazily imports one verb module, so a
 * short command pays only for what it uses. No logic beyond parsing lives here.
 */
const program = new Command('thaw')
  .description('Cold-start, checkpoint and restore containers from memory snapshots')
  .option('--root <dir>', 'runtime state directory (container records, runsc/runc roots)')
  .option('--store <dir>', 'snapshot store directory')
  .option('--config <file>', 'thaw config file (JSON)')
  .addOption(new Option('--engine <name>', 'default engine').choices(['gvisor', 'native', 'auto']))
  .addOption(new Option('--log-level <level>', 'log level (logs go to stderr)').choices(['trace', 'debug', 'info', 'warn', 'error', 'silent']).default('warn'))
  .option('--json', 'print one JSON object for scripts', false)
  .showHelpAfterError();

type VerbModule = { default: (args: Record<string, unknown>, global: GlobalOptions) => Promise<unknown> };

function verb(load: () => Promise<VerbModule>, pick: (...a: unknown[]) => Record<string, unknown>) {
  return async (...a: unknown[]) => {
    const global = program.opts<GlobalOptions>();
    try {
      const mod = await load();
      const result = await mod.default(pick(...a), global);
      await reportAndExit(result, global);
    } catch (err) {
      await reportAndExit(err, global);
    }
  };
}

program
  .command('run')
  .description('cold-start or restore (when a verified snapshot matches) a container from an OCI bundle')
  .requiredOption('--bundle <dir>', 'OCI bundle directory')
  .requiredOption('--id <id>', 'container id')
  .option('--detach', 'return once the container runs', false)
  .option('--output <file>', "file receiving the container's stdout and stderr (appended)")
  .option('--cold', 'never restore (force a cold start)', false)
  .action(verb(() => import('./verbs/run.js'), (o) => o as Record<string, unknown>));

program
  .command('checkpoint <id>')
  .description("checkpoint a running container into the snapshot store under its key")
  .option('--leave-running', 'keep the container running after the checkpoint', false)
  .option('--namespace <ns>', 'containerd namespace (shim-managed containers)')
  .action(verb(() => import('./verbs/checkpoint.js'), (id, o) => ({ id, ...(o as object) })));

const snapshots = program.command('snapshots').description('inspect and manage the snapshot store');
snapshots.command('ls').description('list snapshots').action(verb(() => import('./verbs/snapshots.js'), () => ({ op: 'ls' })));
snapshots
  .command('inspect <key>')
  .description('show a snapshot manifest and every key input')
  .action(verb(() => import('./verbs/snapshots.js'), (key) => ({ op: 'inspect', key })));
snapshots
  .command('verify <key>')
  .description("check every file against the snapshot's manifest")
  .action(verb(() => import('./verbs/snapshots.js'), (key) => ({ op: 'verify', key })));
snapshots.command('rm <key>').description('remove a snapshot').action(verb(() => import('./verbs/snapshots.js'), (key) => ({ op: 'rm', key })));
snapshots
  .command('gc')
  .description('evict least recently restored snapshots until the store fits')
  .requiredOption('--max-bytes <n>', 'size bound in bytes')
  .action(verb(() => import('./verbs/snapshots.js'), (o) => ({ op: 'gc', ...(o as object) })));

program.command('ps').description('list containers').action(verb(() => import('./verbs/ps.js'), () => ({})));

program
  .command('kill <id> [signal]')
  .description('send a signal (default SIGTERM) to a container')
  .option('--all', 'signal every process of the container', false)
  .option('--namespace <ns>', 'containerd namespace')
  .action(verb(() => import('./verbs/kill.js'), (id, signal, o) => ({ id, signal, ...(o as object) })));

program
  .command('delete <id>')
  .description('delete a container')
  .option('--force', 'kill it first if it runs', false)
  .option('--namespace <ns>', 'containerd namespace')
  .action(verb(() => import('./verbs/delete.js'), (id, o) => ({ id, ...(o as object) })));

program
  .command('wait <id>')
  .description('wait for a container to exit; exits with its status')
  .option('--namespace <ns>', 'containerd namespace')
  .action(verb(() => import('./verbs/wait.js'), (id, o) => ({ id, ...(o as object) })));

await program.parseAsync(process.argv);
