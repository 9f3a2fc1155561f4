import { createLogger } from '../log/logger.js';
import { runPageKeeper, KEEPER_READY, type PageKeeperConfig } from './page-keeper.js';

/**
 * Entry of the page keeper process (spawned by PageKeeper.spawn, see page-keeper.ts): argv[2] is its
 * JSON config, stdin thaw's socket, stdout the "ready" line, stderr the log file, fds 3… the
 * userfaultfds. Only wires.
 */
const config = JSON.parse(process.argv[2] ?? '{}') as PageKeeperConfig;
// thaw may be gone before "ready" is written: EPIPE must not end the keeper (its uffds would close).
process.stdout.on('error', () => undefined);
const log = createLogger({ name: 'thaw-page-keeper', destination: 2 });
process.exitCode = await runPageKeeper(config, {
  input: process.stdin,
  log,
  ready: () => process.stdout.write(`${KEEPER_READY}\n`, () => undefined),
});
process.stdin.destroy();
