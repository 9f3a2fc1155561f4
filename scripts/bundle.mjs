// Bundles tsc's output (dist/src) for the two binaries (and the page keeper they exec) into dist/bundle
// with esbuild:
//   node scripts/bundle.mjs [DIST]
//
// Why: containerd runs three Node processes per container (`start`, `serve`, `delete`), and Node 20
// loads ES modules one file at a time — ~320 files for `serve` with the Task service. One bundle per
// entry with shared chunks (code splitting keeps each verb's dynamic imports lazy) loads ~15 files.
// docs/bench/shim-overhead.md has the numbers.
//
// The input is dist/src, not src: bin/launch.mjs uses the bundle only while it is newer than
// dist/src/cli/<entry>.js, so a plain `tsc` after a bundle never runs stale code.
import { build } from 'esbuild';
import { existsSync } from 'node:fs';
import { mkdir, readdir, rename, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
// Optional argument: another tsc output directory (the integration tests build their own).
const dist = path.resolve(process.argv[2] ?? path.join(repo, 'dist'));
const outdir = path.join(dist, 'bundle');
const staging = path.join(dist, `bundle.tmp-${process.pid}`);
// Chunks a running shim may still import lazily stay this long after a rebuild.
const OLD_CHUNK_GRACE_MS = 10 * 60_000;

await rm(staging, { recursive: true, force: true });
const result = await build({
  // Those that were compiled (a test may compile the shim alone). The page keeper is exec'd by path
  // (restore/page-keeper.ts looks for it beside its module, then at the bundle's top).
  entryPoints: [
    { in: 'src/cli/shim.js', out: 'shim' },
    { in: 'src/cli/thaw.js', out: 'thaw' },
    { in: 'src/restore/page-keeper-main.js', out: 'page-keeper-main' },
  ]
    .map((entry) => ({ ...entry, in: path.join(dist, entry.in) }))
    .filter((entry) => existsSync(entry.in)),
  outdir: staging,
  bundle: true,
  splitting: true,
  format: 'esm',
  platform: 'node',
  target: 'node20',
  chunkNames: 'chunks/[name]-[hash]',
  sourcemap: 'linked',
  // CommonJS dependencies (pino) call require() for Node's built-ins, which ESM output lacks.
  banner: { js: "import { createRequire as __thawRequire } from 'node:module'; const require = __thawRequire(import.meta.url);" },
  logLevel: 'warning',
  metafile: true,
});

// Into place without a moment where a running or starting shim finds an entry or chunk missing:
// chunks first (content-hashed names), then each entry by rename.
await mkdir(path.join(outdir, 'chunks'), { recursive: true });
const fresh = new Set();
for (const name of await readdir(path.join(staging, 'chunks'))) {
  fresh.add(name);
  await rename(path.join(staging, 'chunks', name), path.join(outdir, 'chunks', name));
}
for (const name of await readdir(staging, { withFileTypes: true })) {
  if (name.isFile()) await rename(path.join(staging, name.name), path.join(outdir, name.name));
}
await rm(staging, { recursive: true, force: true });
for (const name of await readdir(path.join(outdir, 'chunks'))) {
  const file = path.join(outdir, 'chunks', name);
  if (!fresh.has(name) && Date.now() - (await stat(file)).mtimeMs > OLD_CHUNK_GRACE_MS) await rm(file, { force: true });
}
const files = Object.keys(result.metafile.outputs).filter((f) => f.endsWith('.js'));
console.log(`bundled ${files.length} files into ${outdir}`);
