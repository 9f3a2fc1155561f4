// Run by tap after every test file (package.json "tap.after"): the integration tests' shims boot
// spare servers in the registry of the test build (tmp/it-build/bin, src/shim/spare.ts), and a spare
// waits until it is claimed — so the last one would outlive `npm test`. Ends the spares still
// waiting there (claimed ones serve a container and exit with it) and removes the registry.
import { existsSync, readdirSync, readFileSync, realpathSync, rmSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const SPARE_ROOT = '/run/thaw/spares'; // src/shim/spare.ts SPARE_ROOT
const bin = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'tmp', 'it-build', 'bin');
if (existsSync(bin)) {
  const registry = path.join(SPARE_ROOT, realpathSync(bin));
  const names = existsSync(registry) ? readdirSync(registry) : [];
  for (const name of names) {
    const m = /^spare\.(\d+)-\d+$/.exec(name);
    if (m === null) continue;
    try {
      // The directory's pid may be another process's by now: only a spare shim server is ended.
      const argv = readFileSync(`/proc/${m[1]}/cmdline`, 'utf8').split('\0');
      if (argv.includes('spare') && argv.some((a) => a.endsWith('containerd-shim-thaw-v2.mjs'))) process.kill(Number(m[1]), 'SIGTERM');
    } catch {
      // gone already
    }
  }
  rmSync(registry, { recursive: true, force: true });
}
