// Loads one of thaw's entries for bin/'s launchers: the bundle (scripts/bundle.mjs: ~15 files to
// load instead of ~320, which every `start`, `serve` and `delete` of the shim pays) while it is at
// least as new as tsc's output, else tsc's output (a plain `tsc` since the last bundle).
import { statSync } from 'node:fs';

const mtime = (url) => statSync(url, { throwIfNoEntry: false })?.mtimeMs ?? -1;

export function run(entry) {
  const compiled = new URL(`../dist/src/cli/${entry}.js`, import.meta.url);
  const bundled = new URL(`../dist/bundle/${entry}.js`, import.meta.url);
  return import(mtime(bundled) >= mtime(compiled) ? bundled.href : compiled.href);
}
