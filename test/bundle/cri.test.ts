import { readFile, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import t from 'tap';
import { ORIGINAL_CRI_ANNOTATION_PREFIX, presentCriToRunsc, runscCriView } from '../../src/bundle/cri.js';
import { defaultSpec, type OciSpec } from '../../src/bundle/bundle.js';
import { collectKeyInputs, computeKey } from '../../src/snapshot/key.js';
import { parseTriggerPolicy, wantsControlDir } from '../../src/trigger/policy.js';

const SANDBOX_ID = 'a'.repeat(64);
const podMember = {
  'io.kubernetes.cri.container-type': 'container',
  'io.kubernetes.cri.sandbox-id': SANDBOX_ID,
  'io.kubernetes.cri.container-name': 'app',
  'io.kubernetes.cri.image-name': 'localhost/app:1',
  'thaw.dev/checkpoint': 'manual',
};
const pause = {
  'io.kubernetes.cri.container-type': 'sandbox',
  'io.kubernetes.cri.sandbox-id': SANDBOX_ID,
  'io.kubernetes.cri.sandbox-name': 'pod',
};

t.test('runscCriView: a pod container becomes a sandbox of its own; originals are kept under thaw’s prefix', async (t) => {
  const view = runscCriView(podMember);
  t.same(view, {
    kind: 'own-sandbox',
    annotations: {
      [`${ORIGINAL_CRI_ANNOTATION_PREFIX}io.kubernetes.cri.container-type`]: 'container',
      [`${ORIGINAL_CRI_ANNOTATION_PREFIX}io.kubernetes.cri.sandbox-id`]: SANDBOX_ID,
      'io.kubernetes.cri.container-name': 'app',
      'io.kubernetes.cri.image-name': 'localhost/app:1',
      'thaw.dev/checkpoint': 'manual',
    },
  });
  t.same(podMember['io.kubernetes.cri.container-type'], 'container', 'the input is not modified');
  if (view.kind !== 'own-sandbox') return;
  t.match(runscCriView(view.annotations), { kind: 'as-is' }, 'idempotent: its output needs no second rewrite');
});

t.test('runscCriView: what runsc already starts as a new sandbox stays as it is', async (t) => {
  t.match(runscCriView(pause), { kind: 'as-is', reason: /sandbox/ }, 'the pause container');
  t.match(runscCriView({}), { kind: 'as-is', reason: /no CRI container type/ }, 'no CRI (ctr, thaw run)');
  t.match(runscCriView({ 'io.kubernetes.cri.sandbox-id': SANDBOX_ID }), { kind: 'as-is' }, 'a sandbox id without a type');
  t.match(runscCriView({ 'io.kubernetes.cri.container-type': 'other' }), { kind: 'as-is', reason: /other/ }, 'an unknown type (runsc: root)');
});

t.test('runscCriView: CRI-O’s annotations, and containerd’s winning over them as in runsc', async (t) => {
  t.same(runscCriView({ 'io.kubernetes.cri-o.ContainerType': 'container', 'io.kubernetes.cri-o.SandboxID': 'pod1' }), {
    kind: 'own-sandbox',
    annotations: {
      [`${ORIGINAL_CRI_ANNOTATION_PREFIX}io.kubernetes.cri-o.ContainerType`]: 'container',
      [`${ORIGINAL_CRI_ANNOTATION_PREFIX}io.kubernetes.cri-o.SandboxID`]: 'pod1',
    },
  });
  t.match(
    runscCriView({ 'io.kubernetes.cri.container-type': 'sandbox', 'io.kubernetes.cri-o.ContainerType': 'container' }),
    { kind: 'as-is' },
    'runsc reads containerd’s annotation first',
  );
  const both = runscCriView({ 'io.kubernetes.cri.container-type': 'container', 'io.kubernetes.cri-o.SandboxID': 'pod1' });
  t.notOk(both.kind === 'own-sandbox' && 'io.kubernetes.cri-o.SandboxID' in both.annotations, 'every sandbox id runsc could join is hidden');
});

t.test('the rewrite does not change the snapshot key or make triggers treat the container as a pause container', async (t) => {
  const view = runscCriView(podMember);
  if (view.kind !== 'own-sandbox') throw new Error('expected a rewrite');
  t.equal(wantsControlDir(view.annotations), wantsControlDir(podMember), 'control dir decided alike');
  t.same(parseTriggerPolicy(view.annotations).trigger, parseTriggerPolicy(podMember).trigger, 'same trigger');
  t.same(parseTriggerPolicy(view.annotations).trigger, { kind: 'manual' });
  const bundle = t.testdir({ rootfs: { f: 'x' } });
  const key = async (annotations: Record<string, string>) =>
    computeKey(
      await collectKeyInputs({
        spec: defaultSpec({ args: ['/app'], env: [], cwd: '/', annotations }),
        bundle,
        engine: { name: 'gvisor', identity: { runtime: 'runsc' } },
        gpu: null,
      }),
    );
  t.equal(await key(view.annotations), await key(podMember), 'same key');
});

t.test('presentCriToRunsc rewrites only the annotations of config.json, once, atomically', async (t) => {
  const bundle = t.testdir({ rootfs: {} });
  const spec: OciSpec = defaultSpec({ args: ['/app'], env: ['A=1'], cwd: '/', annotations: podMember });
  spec.linux = {
    namespaces: [
      { type: 'pid' },
      { type: 'ipc', path: '/proc/42/ns/ipc' },
      { type: 'uts', path: '/proc/42/ns/uts' },
      { type: 'mount' },
      { type: 'network', path: '/proc/42/ns/net' },
    ],
    cgroupsPath: '/k8s.io/app',
  };
  const file = join(bundle, 'config.json');
  await writeFile(file, JSON.stringify(spec));
  t.equal(await presentCriToRunsc(bundle), true);
  const after = JSON.parse(await readFile(file, 'utf8')) as OciSpec;
  const view = runscCriView(podMember);
  t.same(after, { ...spec, annotations: view.kind === 'own-sandbox' ? view.annotations : {} }, 'everything else as CRI wrote it');
  t.same(
    (after.linux as { namespaces: unknown[] }).namespaces.find((n) => (n as { type: string }).type === 'network'),
    { type: 'network', path: '/proc/42/ns/net' },
    'the pod network namespace path stays: runsc starts the sandbox in it',
  );
  const text = await readFile(file, 'utf8');
  t.equal(await presentCriToRunsc(bundle), false, 'a second call changes nothing');
  t.equal(await readFile(file, 'utf8'), text);
  t.same((await readdir(bundle)).sort(), ['config.json', 'rootfs'], 'no temp file left');
});

t.test('presentCriToRunsc leaves other bundles untouched and reports unreadable ones', async (t) => {
  const bundle = t.testdir({ rootfs: {} });
  const file = join(bundle, 'config.json');
  for (const annotations of [pause, {}, undefined]) {
    const text = JSON.stringify({ ...defaultSpec({ args: ['/x'], env: [], cwd: '/', annotations: {} }), annotations });
    await writeFile(file, text);
    t.equal(await presentCriToRunsc(bundle), false, JSON.stringify(annotations));
    t.equal(await readFile(file, 'utf8'), text, 'file untouched');
  }
  await writeFile(file, '{not json');
  await t.rejects(presentCriToRunsc(bundle), { code: 'InvalidArgument', message: /config\.json/ });
  await t.rejects(presentCriToRunsc(join(bundle, 'missing')), { code: 'NotFound' });
});
