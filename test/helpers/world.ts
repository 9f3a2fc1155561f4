import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { lstat, mkdir, mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import type { Test } from 'tap';
import { buildDemoApp, demoBundle, type DemoAppArgs } from './demo-app.js';
import { runThaw, thawOk, type RunThawOptions, type ThawDirs, type ThawResult } from './thaw-cli.js';

/**
 * A throw-away thaw installation for one integration test: temp `--root` and `--store`, the demo
 * app, bundles, output files; at teardown every runsc container under the root is force-deleted
 * and the directory removed, whether the test passed or not.
 */
export const BUSYBOX = '/bin/busybox';

/** Why the real-runsc tests cannot run here, or false when they can. */
export async function integrationSkip(): Promise<string | false> {
  if (!process.env.THAW_INTEGRATION) return 'THAW_INTEGRATION is not set';
  if (process.getuid?.() !== 0) return 'runsc needs root';
  if (!existsSync(BUSYBOX)) return `${BUSYBOX} missing (busybox-static)`;
  if ((await execa('runsc', ['--version'], { reject: false })).failed) return 'runsc is not installed';
  if ((await execa('gcc', ['--version'], { reject: false })).failed) return 'gcc is not installed (demo app)';
  return false;
}

export interface ThawWorld extends ThawDirs {
  dir: string;
  /** `<root>/runsc`: where the gVisor engine keeps runsc state. */
  runscRoot: string;
  /** The statically built demo app. */
  app: string;
  /** Builds a demo-app bundle under the world (`name` must be unique per world). */
  bundle(name: string, args: DemoAppArgs): Promise<string>;
  /** Path of an output file `<dir>/out/<name>.log` (not created). */
  out(name: string): string;
  /** `bin/thaw --root --store --json ARGS`. */
  thaw(args: readonly string[], opts?: RunThawOptions): Promise<ThawResult>;
  /** Same, throwing unless exit 0; returns the JSON. */
  thawOk(args: readonly string[], opts?: RunThawOptions): Promise<Record<string, unknown>>;
}

export async function thawWorld(t: Test, prefix = 'thaw-cli-it-'): Promise<ThawWorld> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  const root = join(dir, 'root');
  const store = join(dir, 'store');
  const runscRoot = join(root, 'runsc');
  t.teardown(async () => {
    await deleteRunscContainers(runscRoot);
    await rm(dir, { recursive: true, force: true });
  });
  await mkdir(join(dir, 'out'));
  const app = await buildDemoApp(dir);
  const dirs = { root, store };
  return {
    dir,
    root,
    store,
    runscRoot,
    app,
    bundle: (name, args) => demoBundle(join(dir, 'bundles', name), app, args),
    out: (name) => join(dir, 'out', `${name}.log`),
    thaw: (args, opts) => runThaw(dirs, args, opts),
    thawOk: (args, opts) => thawOk(dirs, args, opts),
  };
}

/** Force-deletes every container runsc knows under `runscRoot` (sandboxes, gofers, state). */
export async function deleteRunscContainers(runscRoot: string): Promise<string[]> {
  if (!existsSync(runscRoot)) return [];
  const list = await execa('runsc', ['--root', runscRoot, 'list', '--format=json'], { reject: false, timeout: 30_000, encoding: 'utf8' });
  let ids: string[] = [];
  try {
    const parsed = JSON.parse(String(list.stdout || 'null')) as { id: string }[] | null;
    ids = (parsed ?? []).map((c) => c.id);
  } catch {
    ids = [];
  }
  for (const id of ids) {
    await execa('runsc', ['--root', runscRoot, 'delete', '--force', id], { reject: false, timeout: 60_000 });
  }
  return ids;
}

/**
 * A fingerprint of everything under `dir` (paths, modes, file sizes, mtimes and contents of small
 * files): equal before and after means nothing was touched.
 */
export async function treeFingerprint(dir: string): Promise<string> {
  const h = createHash('sha256');
  const walk = async (rel: string): Promise<void> => {
    const abs = rel ? join(dir, rel) : dir;
    const entries = (await readdir(abs, { withFileTypes: true }).catch(() => [])).sort((a, b) => (a.name < b.name ? -1 : 1));
    for (const e of entries) {
      const p = rel ? `${rel}/${e.name}` : e.name;
      const st = await lstat(join(dir, p));
      // A directory's mtime moves when a lock file comes and goes; its entries are what count.
      if (e.isDirectory()) {
        h.update(`${p}/\0${st.mode}\n`);
        await walk(p);
        continue;
      }
      h.update(`${p}\0${st.mode}\0${st.size}\0${st.mtimeMs}\n`);
      if (e.isFile() && st.size <= 1 << 20) h.update(await readFile(join(dir, p)));
    }
  };
  await walk('');
  return h.digest('hex');
}

/** Names directly under `dir` ([] when it does not exist). */
export async function entries(dir: string): Promise<string[]> {
  return (await readdir(dir).catch(() => [])).sort();
}
