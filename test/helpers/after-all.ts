/**
 * Run by tap after every test file (package.json "tap.after"): the integration tests' shims boot
 * spare servers in the registry of the test build (src/shim/spare.ts), and a spare waits until it is
 * claimed — so the last one would outlive `npm test`. Ends the spares still waiting there (claimed
 * ones serve a container and exit with it) and removes the registry.
 */
import { existsSync, readFileSync, rmSync } from 'node:fs';
import path from 'node:path';
import { binDirOf, liveSpares, spareRegistry } from '../../src/shim/spare.js';
import { BUILD_BIN_DIR, SHIM_BINARY } from './containerd.js';

const launcher = path.join(BUILD_BIN_DIR, SHIM_BINARY);
if (existsSync(launcher)) {
  const registry = spareRegistry(binDirOf(launcher));
  for (const pid of await liveSpares(registry)) {
    try {
      // The directory's pid may be another process's by now: only a spare shim server is ended.
      const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
      if (argv.includes('spare') && argv.some((a) => a.endsWith(`${SHIM_BINARY}.mjs`))) process.kill(pid, 'SIGTERM');
    } catch {
      // gone already
    }
  }
  rmSync(registry, { recursive: true, force: true });
}
