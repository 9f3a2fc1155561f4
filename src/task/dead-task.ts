import { readdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { isShimError } from '../errors.js';
import { loadConfig, type ThawConfig } from '../config/config.js';
import { ContainerRecords } from '../engine/records.js';
import { runtimeIdFor } from '../engine/container-id.js';
import { controlDirFor } from '../trigger/control-dir.js';
import type { CleanupDeadTask } from '../shim/manager.js';

/**
 * Bundle file naming the thaw config the task was created with. containerd runs `delete` with an
 * empty stdin (no runtime options), so without it a dead shim's task under a non-default config
 * would be looked for in the default state dir and its sandbox would leak.
 */
export const CONFIG_PATH_FILE = 'thaw-config-path';

/**
 * `delete` after containerd lost the shim: remove the sandbox, the rootfs mount and the record the
 * dead server left. Best effort: every step runs even if an earlier one failed.
 *
 * containerd 1.6 runs this after every shim exit, a normal Shutdown included (`ctr run --rm` waits
 * for it), and kills it after 5 s (1.6.20 and 1.7 alike): when the task left nothing behind it returns before
 * loading the engines and execa, which cost most of a Node start-up under load.
 */
export function cleanupDeadTaskWith(configPath: string | undefined): CleanupDeadTask {
  return async (bundle, id, { namespace, log }) => {
    const config = await loadConfig(configPath ?? (await configPathOf(bundle)));
    const records = await ContainerRecords.open(config.stateDir);
    const record = await records.get(id, namespace);
    const rootfs = join(bundle, 'rootfs');
    const mounted = await isMounted(rootfs);
    // The trigger's control dir (socket, status files) the dead server would have removed at Delete.
    const controlDir = controlDirFor(config.stateDir, namespace, id);
    await rm(controlDir, { recursive: true, force: true }).catch((err: unknown) => log.warn({ id, err }, 'dead task: control dir removal failed'));
    if (!record && !mounted && config.engine === 'gvisor' && !(await runscKnows(config, id, namespace))) {
      return { exitStatus: 137, exitedAt: new Date() };
    }
    // containerd kills this verb after 5 s and `runsc delete --force` of a live sandbox alone takes
    // ~2 s, so the unmount runs alongside it; the pid comes from the record, not a runsc query.
    const deleteSandbox = async (): Promise<void> => {
      const { openRuntime } = await import('../engine/runtime.js');
      const rt = await openRuntime(config, log);
      try {
        await rt.engine(record?.engine ?? 'gvisor', namespace)?.delete(id, { force: true });
      } catch (err) {
        // The sandbox may be gone already (it died with the shim, or Delete ran before the exit).
        if (!isShimError(err, 'NotFound')) log.warn({ id, err }, 'dead task: runtime delete failed');
      }
    };
    const unmount = async (): Promise<void> => {
      if (!mounted) return;
      const { unmountRootfs } = await import('./rootfs.js');
      await unmountRootfs(rootfs).catch((err: unknown) => log.warn({ id, err }, 'dead task: unmount failed'));
    };
    await Promise.all([deleteSandbox(), unmount()]);
    await records.remove(id, namespace);
    return { pid: record?.pid, exitStatus: 137, exitedAt: new Date() };
  };
}

async function configPathOf(bundle: string): Promise<string | undefined> {
  const text = await readFile(join(bundle, CONFIG_PATH_FILE), 'utf8').catch(() => '');
  return text.trim() || undefined;
}

async function isMounted(target: string): Promise<boolean> {
  const mounts = await readFile('/proc/self/mounts', 'utf8').catch(() => '');
  // /proc/mounts escapes space, tab, newline and backslash as octal.
  const escaped = target.replace(/[ \t\n\\]/g, (c) => `\\${c.charCodeAt(0).toString(8).padStart(3, '0')}`);
  return mounts.split('\n').some((line) => line.split(' ')[1] === escaped);
}

/**
 * Whether runsc has state for the task's runtime id under the config's runsc root (files
 * `<rid>_sandbox:<rid>.state`, `runsc-<rid>.sock`; see GvisorEngine for the root and ids).
 */
async function runscKnows(config: ThawConfig, id: string, namespace: string): Promise<boolean> {
  const rid = runtimeIdFor(id, namespace);
  const entries = await readdir(join(config.stateDir, 'runsc')).catch(() => [] as string[]);
  return entries.some((e) => e.includes(rid));
}
