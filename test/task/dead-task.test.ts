/**
 * `delete` after a shim died: containerd gives the verb no runtime options, so the config must come
 * from the note Create left in the bundle — otherwise the dead task is looked for in the default
 * state dir and its sandbox and record leak.
 */
import { existsSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { ContainerRecords, type ContainerRecord } from '../../src/engine/records.js';
import { silentLogger } from '../../src/log/logger.js';
import { CONFIG_PATH_FILE, cleanupDeadTaskWith } from '../../src/task/dead-task.js';
import { runtimeIdFor } from '../../src/engine/container-id.js';
import { controlDirFor } from '../../src/trigger/control-dir.js';

async function setup(t: Test) {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'thaw-dead-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const stateDir = path.join(dir, 'state');
  const configPath = path.join(dir, 'config.json');
  // A runsc that records its argv and fails: the cleanup must still remove what it can.
  const runsc = path.join(dir, 'runsc');
  const calls = path.join(dir, 'runsc-calls');
  await writeFile(runsc, `#!/bin/sh\necho "$*" >> ${calls}\necho 'container does not exist' >&2\nexit 1\n`);
  await chmod(runsc, 0o755);
  await writeFile(configPath, JSON.stringify({ stateDir, store: { path: path.join(dir, 'store') }, runsc: { path: runsc }, gpu: { mode: 'off' } }));
  const records = await ContainerRecords.open(stateDir);
  await mkdir(path.join(stateDir, 'tmp')); // the shim made it when it created the sandbox
  await records.save({ id: 'c1', namespace: 'default', engine: 'gvisor', pid: 4242 } as ContainerRecord);
  const bundle = path.join(dir, 'bundle');
  await mkdir(bundle);
  const recordFile = path.join(stateDir, 'containers', 'default.c1.json');
  const runscCalls = (): Promise<string> => readFile(calls, 'utf8').catch(() => '');
  return { dir, stateDir, configPath, bundle, recordFile, records, runscCalls };
}

t.test('without options, the config named in the bundle is used', async (t) => {
  const s = await setup(t);
  await writeFile(path.join(s.bundle, CONFIG_PATH_FILE), `${s.configPath}\n`);
  t.ok(existsSync(s.recordFile), 'record present before');
  const status = await cleanupDeadTaskWith(undefined)(s.bundle, 'c1', { namespace: 'default', log: silentLogger });
  t.equal(status?.exitStatus, 137);
  t.equal(status?.pid, 4242, 'pid from the record');
  t.notOk(existsSync(s.recordFile), "the record under the task's own state dir is removed");
  t.match(await s.runscCalls(), /delete --force/, 'runsc delete was tried');
});

t.test('nothing left behind (a normal Shutdown): no runtime call at all', async (t) => {
  const s = await setup(t);
  await s.records.remove('c1', 'default');
  const status = await cleanupDeadTaskWith(s.configPath)(s.bundle, 'c1', { namespace: 'default', log: silentLogger });
  t.equal(status?.exitStatus, 137);
  t.equal(await s.runscCalls(), '', 'runsc not run');
});

t.test('no record but runsc still knows the sandbox (died between create and start): it is deleted', async (t) => {
  const s = await setup(t);
  await s.records.remove('c1', 'default');
  const rid = runtimeIdFor('c1', 'default');
  await mkdir(path.join(s.stateDir, 'runsc'), { recursive: true });
  await writeFile(path.join(s.stateDir, 'runsc', `${rid}_sandbox:${rid}.state`), '{}');
  await cleanupDeadTaskWith(s.configPath)(s.bundle, 'c1', { namespace: 'default', log: silentLogger });
  t.match(await s.runscCalls(), new RegExp(`delete --force ${rid}`), 'runsc delete of the runtime id');
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

t.test("the trigger's control dir a dead shim left is removed", async (t) => {
  const s = await setup(t);
  const ctl = controlDirFor(s.stateDir, 'default', 'c1');
  await mkdir(ctl, { recursive: true });
  await writeFile(path.join(ctl, 'status.json'), '{}');
  const other = controlDirFor(s.stateDir, 'default', 'c2');
  await mkdir(other, { recursive: true });
  await cleanupDeadTaskWith(s.configPath)(s.bundle, 'c1', { namespace: 'default', log: silentLogger });
  t.notOk(existsSync(ctl), 'gone');
  t.ok(existsSync(other), "another task's dir stays");
});
