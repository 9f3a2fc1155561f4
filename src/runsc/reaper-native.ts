import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/**
 * The typed facade of the reaper addon (`native/build/Release/thaw_reaper.node`, source
 * native/src/reaper.cc). This is the only file that loads it. Without it (not built, or a kernel
 * without pidfds) the shim learns exits from `runsc wait`, as before; reaper.ts decides.
 */

/** What `waitExit` resolves to; it never rejects. */
export interface WaitExitResult {
  pid: number;
  /** 0, or why the pid could not be waited for (ECHILD: not a child of this process). */
  errno: number;
  /** Exit code (when it exited). */
  code: number;
  /** Signal number (when a signal killed it), else 0. */
  signal: number;
}

export interface ReaperBinding {
  /** prctl(PR_SET_CHILD_SUBREAPER, on); returns 0 or the errno. */
  setChildSubreaper(on: boolean): number;
  /** 0 when pidfd_open works here (Linux 5.3+), else its errno. */
  pidfdSupport(): number;
  /** Resolves once the child `pid` exited, and reaps it (one pid, never -1). */
  waitExit(pid: number): Promise<WaitExitResult>;
}

function isBinding(mod: unknown): mod is ReaperBinding {
  if (typeof mod !== 'object' || mod === null) return false;
  const m = mod as Record<string, unknown>;
  return ['setChildSubreaper', 'pidfdSupport', 'waitExit'].every((k) => typeof m[k] === 'function');
}

/** `<repo>/native/build/Release/thaw_reaper.node`, found by walking up from this module (src/ or dist/src/). */
export function defaultReaperAddonPath(): string {
  const here = dirname(fileURLToPath(import.meta.url));
  for (let dir = here, i = 0; i < 6; i++, dir = dirname(dir)) {
    if (existsSync(join(dir, 'native', 'binding.gyp'))) return join(dir, 'native', 'build', 'Release', 'thaw_reaper.node');
  }
  return join(here, '..', '..', 'native', 'build', 'Release', 'thaw_reaper.node');
}

export type ReaperAddonLoad = { binding: ReaperBinding; path: string } | { binding: null; path: string; error: Error };

/** Loads the addon; a missing or broken build is reported, not thrown. */
export function loadReaperAddon(path = defaultReaperAddonPath()): ReaperAddonLoad {
  try {
    const mod: unknown = createRequire(import.meta.url)(path);
    return isBinding(mod) ? { binding: mod, path } : { binding: null, path, error: new Error(`${path} is not thaw_reaper`) };
  } catch (err) {
    return { binding: null, path, error: err instanceof Error ? err : new Error(String(err)) };
  }
}
