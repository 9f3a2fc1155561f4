import { readdirSync, readFileSync, realpathSync, writeFileSync } from 'node:fs';
import t from 'tap';
import {
  bestCheckpointFlags,
  binaryIdentity,
  bestRestoreFlags,
  clearProbeCache,
  parseCapabilities,
  parseFlagHelp,
  parseVersion,
  probeRunsc,
  type RunscCapabilities,
  type RunscHelpTexts,
} from '../../src/runsc/probe.js';

function fixture(release: '20240729' | 'upstream'): RunscHelpTexts {
  const read = (name: string) => readFileSync(new URL(`../fixtures/runsc/${release}/${name}.txt`, import.meta.url), 'utf8');
  return { version: read('version'), helpCheckpoint: read('help-checkpoint'), helpRestore: read('help-restore'), flags: read('flags') };
}

t.test('runsc 0.0~20240729 (captured help texts)', async (t) => {
  const caps = parseCapabilities(fixture('20240729'));
  t.same(caps, {
    version: '0.0~20240729.0',
    compression: { values: ['none', 'flate-best-speed'], default: 'flate-best-speed' },
    checkpointDirect: true,
    excludeCommittedZeroPages: true,
    cudaCheckpointPath: false,
    cudaCheckpointSequential: false,
    restoreDirect: true,
    restoreBackground: false,
    nvproxy: true,
  });
});

t.test('upstream release-20260608.0 (help texts rebuilt from source)', async (t) => {
  const caps = parseCapabilities(fixture('upstream'));
  t.same(caps, {
    version: 'release-20260608.0',
    compression: { values: ['none', 'flate-best-speed'], default: 'none' },
    checkpointDirect: true,
    excludeCommittedZeroPages: true,
    cudaCheckpointPath: true,
    cudaCheckpointSequential: true,
    restoreDirect: true,
    restoreBackground: true,
    nvproxy: true,
  });
});

t.test('an old runsc without checkpoint flags', async (t) => {
  const caps = parseCapabilities({
    version: 'runsc version 0.0~20221219.0\nspec: 1.0.2-dev\n',
    helpCheckpoint:
      'checkpoint [flags] <container id> - save current state of container.\n  -image-path string\n    \tdirectory path to saved container image\n  -leave-running\n    \trestart the container after checkpointing\n',
    helpRestore: 'restore [flags] <container id> - restore saved state of container.\n  -detach\n    \tdetach\n',
    flags: '  -platform string\n    \tspecifies which platform to use: ptrace (default), kvm. (default "ptrace")\n',
  });
  t.equal(caps.compression, null);
  t.notOk(caps.checkpointDirect || caps.restoreDirect || caps.restoreBackground || caps.nvproxy);
});

t.test('flag help parser', async (t) => {
  const flags = parseFlagHelp(fixture('20240729').flags);
  t.same(flags.get('platform'), {
    type: 'string',
    usage: 'specifies which platform to use: systrap (default), ptrace, kvm. (default "systrap")',
    default: 'systrap',
  });
  t.equal(flags.get('debug')?.type, undefined, 'booleans have no type word');
  t.equal(flags.get('nvproxy-docker')?.type, 'docker run --gpus', 'back-quoted type words are kept whole');
  t.equal(flags.size, 88, 'every flag of runsc 20240729');
  const upstream = parseFlagHelp(fixture('upstream').helpCheckpoint);
  t.same(upstream.get('save-restore-exec-timeout')?.default, '10m0s');
  t.same(upstream.get('compression')?.default, 'none');
  t.throws(() => parseVersion('no version here'), { code: 'Unavailable' });
});

const v2024 = parseCapabilities(fixture('20240729'));
const vUp = parseCapabilities(fixture('upstream'));
const vOld: RunscCapabilities = { ...v2024, version: 'old', compression: null, checkpointDirect: false, restoreDirect: false };

t.test('best checkpoint flags', async (t) => {
  t.same(bestCheckpointFlags(v2024, { compression: 'auto', direct: true }), { compression: 'none', direct: true, excludeCommittedZeroPages: false });
  t.same(bestCheckpointFlags(vUp, { compression: 'auto', direct: true }), { compression: 'none', direct: true, excludeCommittedZeroPages: false });
  t.same(bestCheckpointFlags(vUp, { compression: 'auto', direct: false, excludeCommittedZeroPages: true }), {
    compression: 'none',
    direct: false,
    excludeCommittedZeroPages: true,
  });
  t.same(bestCheckpointFlags(v2024, { compression: 'flate-best-speed', direct: true }).compression, 'flate-best-speed');
  t.same(bestCheckpointFlags(vOld, { compression: 'auto', direct: true }), { compression: undefined, direct: false, excludeCommittedZeroPages: false });
  t.same(bestCheckpointFlags(vOld, { compression: 'flate-best-speed', direct: false }).compression, undefined, 'old runsc always compresses');
  t.throws(() => bestCheckpointFlags(vOld, { compression: 'none', direct: true }), { code: 'FailedPrecondition' });
});

t.test('best restore flags', async (t) => {
  t.same(bestRestoreFlags(vUp, { compression: 'none', direct: true }), { direct: true, background: true });
  t.same(bestRestoreFlags(vUp, { compression: 'none', direct: true }, { background: false }), { direct: true, background: false });
  t.same(bestRestoreFlags(vUp, { compression: 'flate-best-speed', direct: false }), { direct: false, background: false });
  t.same(bestRestoreFlags(v2024, { compression: 'none', direct: true }), { direct: true, background: false }, 'no --background in 20240729');
  t.same(bestRestoreFlags(vOld, { compression: undefined, direct: true }), { direct: false, background: false });
});

t.test('probe runs once per path and forgets failures', async (t) => {
  clearProbeCache();
  const texts = fixture('upstream');
  let runs = 0;
  const ok = async (args: readonly string[]) => {
    runs++;
    if (args[0] === '--version') return texts.version;
    if (args[1] === 'checkpoint') return texts.helpCheckpoint;
    if (args[1] === 'restore') return texts.helpRestore;
    return texts.flags;
  };
  const [a, b] = await Promise.all([probeRunsc('/x/runsc', ok), probeRunsc('/x/runsc', ok)]);
  t.equal(a, b);
  t.equal(runs, 4, 'four commands for one probe');
  await probeRunsc('/x/runsc', ok);
  t.equal(runs, 4, 'cached');
  await probeRunsc('/y/runsc', ok);
  t.equal(runs, 8, 'another path probes again');

  let fail = true;
  const flaky = async (args: readonly string[]) => {
    if (fail) throw new Error('spawn failed');
    return ok(args);
  };
  await t.rejects(probeRunsc('/z/runsc', flaky), /spawn failed/);
  fail = false;
  t.equal((await probeRunsc('/z/runsc', flaky)).version, 'release-20260608.0', 'retried after a failure');
  clearProbeCache();
});

t.test('with a cache dir the probe outlives the process and follows the binary', async (t) => {
  const dir = t.testdir({ bin: {}, cache: {} });
  const binary = `${dir}/bin/runsc`;
  writeFileSync(binary, '#!/bin/sh\n');
  const texts = fixture('20240729');
  let runs = 0;
  const run = async (args: readonly string[]) => {
    runs++;
    if (args[0] === '--version') return texts.version;
    if (args[1] === 'checkpoint') return texts.helpCheckpoint;
    if (args[1] === 'restore') return texts.helpRestore;
    return texts.flags;
  };
  clearProbeCache();
  const first = await probeRunsc(binary, run, `${dir}/cache`);
  t.equal(runs, 4);
  t.equal(readdirSync(`${dir}/cache`).filter((f) => f.endsWith('.json')).length, 1, 'written to the cache dir');
  clearProbeCache(); // a new process
  t.same(await probeRunsc(binary, run, `${dir}/cache`), first, 'same capabilities');
  t.equal(runs, 4, 'from the cache: no runsc ran');

  clearProbeCache();
  writeFileSync(binary, '#!/bin/sh\n# upgraded\n');
  await probeRunsc(binary, run, `${dir}/cache`);
  t.equal(runs, 8, 'a changed binary is probed again');

  clearProbeCache();
  writeFileSync(readdirSync(`${dir}/cache`).map((f) => `${dir}/cache/${f}`)[0]!, '{not json');
  await probeRunsc(binary, run, `${dir}/cache`);
  t.equal(runs, 12, 'an unreadable cache file is ignored');

  clearProbeCache();
  await probeRunsc(`${dir}/bin/missing-runsc`, run, `${dir}/cache`);
  t.equal(runs, 16, 'no binary to identify: probed, not cached');
  clearProbeCache();
});

t.test('binaryIdentity resolves bare names through PATH', async (t) => {
  const dir = t.testdir({ bin: { 'my-runsc': '#!/bin/sh\n' } });
  const saved = process.env.PATH;
  t.teardown(() => {
    process.env.PATH = saved;
  });
  process.env.PATH = `/nonexistent:${dir}/bin`;
  t.match(await binaryIdentity('my-runsc'), { path: realpathSync(`${dir}/bin/my-runsc`), size: 10 });
  t.equal(await binaryIdentity('not-there'), null);
});
