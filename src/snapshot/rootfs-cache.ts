import { createHash } from 'node:crypto';
import { mkdir, readdir, readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import { writeFileAtomic } from '../atomic-file.js';
import { fingerprintRootfs, SNAPSHOT_FORMAT_VERSION, type FingerprintOptions, type RootfsFingerprint } from './key.js';

/** A rootfs mount as containerd passes it in Create (the snapshotter's mounts). */
export interface RootfsMountSource {
  readonly type: string;
  readonly source: string;
  readonly options: readonly string[];
}

/** Bumped when what fingerprintRootfs hashes changes. */
const CACHE_VERSION = `${SNAPSHOT_FORMAT_VERSION}.1`;

/**
 * Rootfs fingerprints kept across containers. The compatibility key fingerprints the rootfs (the
 * path, mode, size and mtime of every entry) when no image digest is known, and neither ctr nor CRI
 * passes one to the runtime: for an image of 138k entries that walk takes 1.9-3.2 s on the dev VM,
 * on the path of every Create and every restore. But an overlay rootfs whose upper layer is still
 * empty is exactly its lower layers, and containerd never changes a layer once committed: the same
 * layer directories (same inode, same ctime) with the same exclusions have the fingerprint
 * computed before. Anything else (bind mounts, an upper layer with content, a directory rootfs of
 * `thaw run`) is walked as before.
 */
export class RootfsFingerprints {
  constructor(private readonly dir: string) {}

  async fingerprint(rootfsDir: string, mounts: readonly RootfsMountSource[] | undefined, opts: FingerprintOptions = {}): Promise<RootfsFingerprint> {
    const layers = mounts === undefined ? undefined : await immutableLayers(mounts);
    if (layers === undefined) return fingerprintRootfs(rootfsDir, opts);
    const key = createHash('sha256')
      .update(JSON.stringify({ version: CACHE_VERSION, layers, exclude: [...(opts.exclude ?? [])].sort() }))
      .digest('hex');
    const file = path.join(this.dir, `${key}.json`);
    const cached = await readCached(file);
    if (cached !== undefined) return cached;
    const fresh = await fingerprintRootfs(rootfsDir, opts);
    try {
      await mkdir(this.dir, { recursive: true, mode: 0o700 });
      await writeFileAtomic(file, JSON.stringify(fresh), 0o600);
    } catch {
      // not kept: the next container of these layers walks again
    }
    return fresh;
  }
}

interface LayerIdentity {
  readonly dir: string;
  readonly ino: string;
  readonly ctimeNs: string;
}

/**
 * The lower layers of a single overlay mount whose upper layer is empty (or absent), with what
 * tells a layer directory from another at the same path later; undefined when the rootfs is not
 * that.
 */
async function immutableLayers(mounts: readonly RootfsMountSource[]): Promise<LayerIdentity[] | undefined> {
  const [mount] = mounts;
  if (mounts.length !== 1 || mount === undefined || mount.type !== 'overlay') return undefined;
  const option = (name: string): string | undefined => mount.options.find((o) => o.startsWith(`${name}=`))?.slice(name.length + 1);
  const lower = option('lowerdir');
  // Escaped separators (`\:`) are not worth parsing: such a rootfs is walked.
  if (lower === undefined || lower === '' || lower.includes('\\')) return undefined;
  const upper = option('upperdir');
  try {
    if (upper !== undefined && (await readdir(upper)).length > 0) return undefined; // the container wrote into it
    return await Promise.all(
      lower.split(':').map(async (dir): Promise<LayerIdentity> => {
        const st = await stat(dir, { bigint: true });
        return { dir, ino: st.ino.toString(), ctimeNs: st.ctimeNs.toString() };
      }),
    );
  } catch {
    return undefined;
  }
}

async function readCached(file: string): Promise<RootfsFingerprint | undefined> {
  try {
    const value = JSON.parse(await readFile(file, 'utf8')) as Partial<RootfsFingerprint>;
    const valid = typeof value.fingerprint === 'string' && /^[0-9a-f]{64}$/.test(value.fingerprint) && Number.isSafeInteger(value.entries) && Number.isSafeInteger(value.bytes);
    return valid ? (value as RootfsFingerprint) : undefined;
  } catch {
    return undefined; // absent or unreadable: walk
  }
}
