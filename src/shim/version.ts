import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** containerd's name for this runtime (`runtime_type`). */
export const RUNTIME_NAME = 'io.containerd.thaw.v2';

let cached: string | undefined;

/**
 * thaw's version from its package.json, found by walking up from this module (src/shim or
 * dist/src/shim); "unknown" if none is found.
 */
export function shimVersion(): string {
  if (cached !== undefined) return cached;
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    try {
      const pkg = JSON.parse(readFileSync(path.join(dir, 'package.json'), 'utf8')) as { name?: unknown; version?: unknown };
      if (pkg.name === 'thaw' && typeof pkg.version === 'string') return (cached = pkg.version);
    } catch {
      // no package.json here: keep walking up
    }
    const parent = path.dirname(dir);
    if (parent === dir) return (cached = 'unknown');
    dir = parent;
  }
}
