import { execFile } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { ShimError } from '../errors.js';
import type { RootfsMountSource } from '../snapshot/rootfs-cache.js';

const TIMEOUT_MS = 30_000;

/**
 * Mounts the rootfs layers containerd passes in Create (snapshotter mounts: overlay, bind) onto
 * `<bundle>/rootfs`, and unmounts them on Delete. Node has no mount(2), so util-linux's mount(8)
 * does it: the options arrive exactly as `-o` expects them.
 */
export async function mountRootfs(bundle: string, mounts: readonly RootfsMountSource[]): Promise<string | undefined> {
  if (mounts.length === 0) return undefined;
  const target = join(bundle, 'rootfs');
  await mkdir(target, { recursive: true });
  for (const m of mounts) {
    const type = m.type === 'bind' || m.type === 'rbind' ? [] : ['-t', m.type];
    const options = m.options.length > 0 ? ['-o', m.options.join(',')] : [];
    const r = await run('mount', [...type, ...options, m.source, target]);
    if (r.exitCode !== 0) {
      throw new ShimError('Internal', `mounting rootfs (${m.type} ${m.source}) failed: ${lastLine(r.stderr)}`);
    }
  }
  return target;
}

export async function unmountRootfs(target: string): Promise<void> {
  // Lazy unmount: a sandbox that is still being torn down may hold the mount for a moment.
  const r = await run('umount', ['-l', target]);
  if (r.exitCode !== 0 && !/not mounted|no mount point/.test(r.stderr)) {
    throw new ShimError('Internal', `unmounting ${target} failed: ${lastLine(r.stderr)}`);
  }
}

/** mount(8)/umount(8) through node:child_process: on the path of every Create, where execa costs 4-9 ms more. */
function run(file: string, args: readonly string[]): Promise<{ exitCode: number; stderr: string }> {
  return new Promise((resolve) => {
    execFile(file, args, { timeout: TIMEOUT_MS, encoding: 'utf8' }, (err, _stdout, stderr) => {
      if (err === null) return resolve({ exitCode: 0, stderr });
      const code = (err as { code?: unknown }).code;
      resolve({ exitCode: typeof code === 'number' ? code : -1, stderr: stderr || err.message });
    });
  });
}

function lastLine(s: string): string {
  return s.trim().split('\n').pop() ?? '';
}
