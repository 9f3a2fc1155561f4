import { addonLoader, addonPath, hasFunctions, type AddonLoad } from '../native-addon.js';

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
  return hasFunctions(mod, ['setChildSubreaper', 'pidfdSupport', 'waitExit']);
}

/** `<repo>/native/build/Release/thaw_reaper.node`. */
export function defaultReaperAddonPath(): string {
  return addonPath('', 'thaw_reaper.node');
}

export type ReaperAddonLoad = AddonLoad<ReaperBinding>;

const loadThawReaper = addonLoader('thaw_reaper', isBinding);

/** Loads the addon once per process; a missing or broken build is reported, not thrown. */
export function loadReaperAddon(path = defaultReaperAddonPath()): ReaperAddonLoad {
  return loadThawReaper(path);
}
