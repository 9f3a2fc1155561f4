import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { isShimError } from '../errors.js';
import { loadConfig } from '../config/config.js';
import { openRuntime } from '../engine/runtime.js';
import type { CleanupDeadTask } from '../shim/manager.js';
import { unmountRootfs } from './rootfs.js';

/**
 * Bundle file naming the thaw config the task was created with. containerd runs `delete` with an
 * empty stdin (no runtime options), so without it a dead shim's task under a non-default config
 * would be looked for in the default state dir and its sandbox would leak.
 */
export const CONFIG_PATH_FILE = 'thaw-config-path';

/**
 * `delete` after containerd lost the shim: remove the sandbox, the rootfs mount and the record the
 * dead server left. Best effort: every step runs even if an earlier one failed.
 */
export function cleanupDeadTaskWith(configPath: string | undefined): CleanupDeadTask {
  return async (bundle, id, { namespace, log }) => {
    const config = await loadConfig(configPath ?? (await configPathOf(bundle)));
    const rt = await openRuntime(config, log);
    const record = await rt.records.get(id, namespace);
    const engine = rt.engine(record?.engine ?? 'gvisor', namespace);
    let pid = record?.pid;
    try {
      pid = (await engine?.state(id))?.pid ?? pid;
      await engine?.delete(id, { force: true });
    } catch (err) {
      // A normal shutdown also ends here (containerd 1.6 treats the closed connection as a dead
      // shim): the sandbox is already gone then.
      if (!isShimError(err, 'NotFound')) log.warn({ id, err }, 'dead task: runtime delete failed');
    }
    await unmountRootfs(join(bundle, 'rootfs')).catch((err: unknown) => log.warn({ id, err }, 'dead task: unmount failed'));
    await rt.records.remove(id, namespace);
    return { pid, exitStatus: 137, exitedAt: new Date() };
  };
}

async function configPathOf(bundle: string): Promise<string | undefined> {
  const text = await readFile(join(bundle, CONFIG_PATH_FILE), 'utf8').catch(() => '');
  return text.trim() || undefined;
}
