/**
 * `delete` after a shim died: containerd gives the verb no runtime options, so the config must come
 * from the note Create left in the bundle — otherwise the dead task is looked for in the default
 * state dir and its sandbox and record leak.
 */
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { ContainerRecords, type ContainerRecord } from '../../src/engine/records.js';
import { silentLogger } from '../../src/log/logger.js';
import { CONFIG_PATH_FILE, cleanupDeadTaskWith } from '../../src/task/dead-task.js';

async function setup(t: Test) {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'thaw-dead-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const stateDir = path.join(dir, 'state');
  const configPath = path.join(dir, 'config.json');
  // A runsc that cannot run: the cleanup must still remove what it can.
  await writeFile(
    configPath,
    JSON.stringify({ stateDir, store: { path: path.join(dir, 'store') }, runsc: { path: path.join(dir, 'no-runsc') }, gpu: { mode: 'off' } }),
  );
  const records = await ContainerRecords.open(stateDir);
  await records.save({ id: 'c1', namespace: 'default', engine: 'gvisor', pid: 4242 } as ContainerRecord);
  const bundle = path.join(dir, 'bundle');
  await mkdir(bundle);
  const recordFile = path.join(stateDir, 'containers', 'default.c1.json');
  return { dir, configPath, bundle, recordFile };
}

t.test('without options, the config named in the bundle is used', async (t) => {
  const s = await setup(t);
  await writeFile(path.join(s.bundle, CONFIG_PATH_FILE), `${s.configPath}\n`);
  t.ok(existsSync(s.recordFile), 'record present before');
  const status = await cleanupDeadTaskWith(undefined)(s.bundle, 'c1', { namespace: 'default', log: silentLogger });
  t.equal(status?.exitStatus, 137);
  t.equal(status?.pid, 4242, 'pid from the record');
  t.notOk(existsSync(s.recordFile), "the record under the task's own state dir is removed");
});

t.test('an explicit config path wins over the bundle note', async (t) => {
  const s = await setup(t);
  await writeFile(path.join(s.bundle, CONFIG_PATH_FILE), path.join(s.dir, 'missing.json'));
  await cleanupDeadTaskWith(s.configPath)(s.bundle, 'c1', { namespace: 'default', log: silentLogger });
  t.notOk(existsSync(s.recordFile));
});

t.test('a note naming a missing config fails loudly instead of guessing', async (t) => {
  const s = await setup(t);
  await writeFile(path.join(s.bundle, CONFIG_PATH_FILE), path.join(s.dir, 'missing.json'));
  await t.rejects(cleanupDeadTaskWith(undefined)(s.bundle, 'c1', { namespace: 'default', log: silentLogger }), { code: 'InvalidArgument' });
});
