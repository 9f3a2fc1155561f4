import { execa } from 'execa';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { ShimError } from '../errors.js';

/**
 * Mounts the rootfs layers containerd passes in Create (snapshotter mounts: overlay, bind) onto
 * `<bundle>/rootfs`, and unmounts them on Delete. Node has no mount(2), so util-linux's mount(8)
 * does it: the options arrive exactly as `-o` expects them.
 */
export interface RootfsMount {
  type: string;
  source: string;
  options: readonly string[];
}

const TIMEOUT_MS = 30_000;

export async function mountRootfs(bundle: string, mounts: readonly RootfsMount[]): Promise<string | undefined> {
  if (mounts.length === 0) return undefined;
  const target = join(bundle, 'rootfs');
  await mkdir(target, { recursive: true });
  for (const m of mounts) {
    const type = m.type === 'bind' || m.type === 'rbind' ? [] : ['-t', m.type];
    const options = m.options.length > 0 ? ['-o', m.options.join(',')] : [];
    const r = await execa('mount', [...type, ...options, m.source, target], { reject: false, timeout: TIMEOUT_MS });
    if (r.exitCode !== 0) {
      throw new ShimError('Internal', `mounting rootfs (${m.type} ${m.source}) failed: ${lastLine(r.stderr)}`);
    }
  }
  return target;
}

export async function unmountRootfs(target: string): Promise<void> {
  // Lazy unmount: a sandbox that is still being torn down may hold the mount for a moment.
  const r = await execa('umount', ['-l', target], { reject: false, timeout: TIMEOUT_MS });
  if (r.exitCode !== 0 && !/not mounted|no mount point/.test(r.stderr)) {
    throw new ShimError('Internal', `unmounting ${target} failed: ${lastLine(r.stderr)}`);
  }
}

function lastLine(s: string): string {
  return s.trim().split('\n').pop() ?? '';
}
