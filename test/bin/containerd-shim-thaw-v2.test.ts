/**
 * bin/containerd-shim-thaw-v2, the sh launcher: a `delete` whose answer the server left in the bundle
 * is printed without Node; everything else reaches the TypeScript shim.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import t from 'tap';
import { BUNDLE_FILES } from '../../src/shim/manager.js';

const LAUNCHER = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'bin', 'containerd-shim-thaw-v2');
const ANSWER = Buffer.from([0x10, 0x03, 0x18, 0x2a]); // any bytes: the launcher must pass them through untouched

/** A PATH holding only coreutils the launcher uses: no `node` on it. */
function pathWithoutNode(t: { teardown: (fn: () => void) => void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'thaw-launcher-path-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  for (const tool of ['cat', 'dirname', 'readlink']) {
    const found = ['/usr/bin', '/bin'].map((d) => join(d, tool)).find((p) => existsSync(p));
    if (found) symlinkSync(found, join(dir, tool));
  }
  return dir;
}

function launch(args: string[], opts: { cwd?: string; path?: string } = {}) {
  return spawnSync(LAUNCHER, args, { cwd: opts.cwd, env: { ...process.env, PATH: opts.path ?? process.env.PATH }, timeout: 60_000 });
}

t.test('delete with the answer file: printed byte for byte, no Node needed', async (t) => {
  const bundle = mkdtempSync(join(tmpdir(), 'thaw-launcher-'));
  t.teardown(() => rmSync(bundle, { recursive: true, force: true }));
  writeFileSync(join(bundle, BUNDLE_FILES.deleted), ANSWER);
  const flags = ['-namespace', 'default', '-address', '/run/containerd/containerd.sock', '-publish-binary', '/usr/bin/containerd', '-id', 'c1'];
  // `node` cannot be found on this PATH, so only the launcher's own path can answer.
  const path = pathWithoutNode(t);
  for (const [what, args, cwd] of [
    ['-bundle DIR', [...flags, '-bundle', bundle, 'delete'], '/'],
    ['-bundle=DIR', [...flags, `-bundle=${bundle}`, 'delete'], '/'],
    ['the working directory', [...flags, 'delete'], bundle],
  ] as const) {
    const r = launch([...args], { cwd, path });
    t.equal(r.status, 0, `${what}: exit 0 (${r.stderr.toString().trim()})`);
    t.same(r.stdout, ANSWER, `${what}: the answer file, untouched`);
  }
});

t.test('without the answer file, or for another verb, the TypeScript shim runs', async (t) => {
  const bundle = mkdtempSync(join(tmpdir(), 'thaw-launcher-'));
  t.teardown(() => rmSync(bundle, { recursive: true, force: true }));
  const v = launch(['-v']);
  t.equal(v.status, 0);
  t.match(v.stdout.toString(), /^containerd-shim-thaw-v2:\n {2}Version:/, '-v is answered by the shim');
  const noNode = launch(['-namespace', 'default', '-id', 'c1', '-bundle', bundle, 'delete'], { path: pathWithoutNode(t) });
  t.not(noNode.status, 0, 'no answer file: the launcher needs Node (not found here), so it did not short-cut');
  t.match(noNode.stderr.toString(), /node/, 'and says it could not run node');
  // Through a symlink (npm's bin links): the .mjs beside the real file is found.
  const link = join(bundle, 'containerd-shim-thaw-v2');
  symlinkSync(LAUNCHER, link);
  const viaLink = spawnSync(link, ['-v'], { timeout: 60_000 });
  t.equal(viaLink.status, 0, viaLink.stderr.toString());
  t.match(viaLink.stdout.toString(), /^containerd-shim-thaw-v2:/);
});
