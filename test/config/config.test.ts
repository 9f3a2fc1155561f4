import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { DEFAULT_CONFIG_PATH, defaultConfig, loadConfig, resolveConfig } from '../../src/config/config.js';
import { ShimError } from '../../src/errors.js';

t.test('no input gives the defaults, and they are not shared with the frozen default', async (t) => {
  const c = resolveConfig(undefined);
  t.same(c, defaultConfig);
  t.equal(c.runsc.flags['host-uds'], 'open', 'the app can reach /run/thaw/thaw.sock by default');
  c.runsc.flags['x'] = 'y';
  t.notOk('x' in defaultConfig.runsc.flags);
});

t.test('runsc.flags add to the defaults; a default is changed by giving it another value', async (t) => {
  t.same(resolveConfig({ runsc: { flags: { nvproxy: 'true' } } }).runsc.flags, { 'host-uds': 'open', nvproxy: 'true' });
  t.same(resolveConfig({ runsc: { flags: { 'host-uds': 'none' } } }).runsc.flags, { 'host-uds': 'none' });
});

t.test('annotation defaults for the runtime', async (t) => {
  t.same(resolveConfig({ annotations: { 'thaw.dev/checkpoint': 'when-ready' } }).annotations, { 'thaw.dev/checkpoint': 'when-ready' });
});

t.test('nested settings merge field by field', async (t) => {
  const c = resolveConfig({ restore: { verify: false }, runsc: { platform: 'ptrace' } });
  t.equal(c.restore.verify, false);
  t.equal(c.restore.stage, defaultConfig.restore.stage);
  t.equal(c.runsc.platform, 'ptrace');
  t.equal(c.runsc.network, 'none');
});

t.test('bad input names the field that is wrong', async (t) => {
  const cases: [unknown, RegExp][] = [
    [[], /must be a JSON object/],
    [{ nope: 1 }, /nope.*not a known setting/],
    [{ runsc: { platfrom: 'kvm' } }, /runsc\.platfrom.*not a known setting/],
    [{ runsc: { platform: 'xen' } }, /runsc\.platform/],
    [{ engine: 'docker' }, /engine/],
    [{ restore: { verify: 'yes' } }, /restore\.verify.*boolean/],
    [{ runsc: { flags: { 'host-uds': 1 } } }, /runsc\.flags\.host-uds.*string/],
    [{ runsc: { flags: { '--debug': 'true' } } }, /runsc\.flags\.--debug.*flag name/],
    [{ runsc: { flags: 'x' } }, /runsc\.flags.*object/],
    [{ store: { maxBytes: -1 } }, /store\.maxBytes/],
    [{ gpu: { lockTimeoutMs: 1.5 } }, /gpu\.lockTimeoutMs/],
    [{ snapshot: { ignoreEnv: [1] } }, /snapshot\.ignoreEnv/],
    [{ annotations: { 'thaw.dev/checkpoint': 5 } }, /annotations\.thaw\.dev\/checkpoint.*string/],
    [{ annotations: { 'io.kubernetes.cri.container-type': 'x' } }, /annotations\.io\.kubernetes.*thaw\.dev/],
    [{ annotations: [] }, /annotations.*object/],
  ];
  for (const [input, message] of cases) {
    t.throws(() => resolveConfig(input, 'test.json'), message, JSON.stringify(input));
  }
  t.throws(() => resolveConfig({ engine: 'x' }, 'test.json'), /test\.json/, 'the source is named');
});

t.test('loadConfig: file, overrides, missing files', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'thaw-config-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const file = join(dir, 'config.json');
  await writeFile(file, JSON.stringify({ stateDir: '/tmp/s', runsc: { flags: { nvproxy: 'true' } } }));
  const c = await loadConfig(file, { engine: 'native', runsc: { flags: { 'host-uds': 'all' } } });
  t.equal(c.stateDir, '/tmp/s');
  t.equal(c.engine, 'native');
  t.same(c.runsc.flags, { 'host-uds': 'all', nvproxy: 'true' });

  const missing = join(dir, 'missing.json');
  const err = await loadConfig(missing).catch((e: unknown) => e);
  t.ok(err instanceof ShimError, 'a ShimError');
  t.match(err, { code: 'InvalidArgument', message: /missing\.json/ });
  if (!existsSync(DEFAULT_CONFIG_PATH)) t.same(await loadConfig(undefined), defaultConfig, 'no file at the default path: defaults');
  await writeFile(file, '{ not json');
  await t.rejects(loadConfig(file), /cannot load config/);
});
