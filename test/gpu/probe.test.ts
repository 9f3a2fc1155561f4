import t from 'tap';
import { gpuKeyIdentity, parseDriverVersion, parseGpuInformation, probeGpuIdentity, readGpuInventory } from '../../src/gpu/probe.js';
import { fakeGpuHost } from './helpers.js';

t.test('inventory from /proc/driver/nvidia, sorted by bus', async (t) => {
  const host = await fakeGpuHost({ gpus: false });
  t.teardown(host.cleanup);
  t.equal(await readGpuInventory({ procDir: host.nvidiaProcDir }), null, 'no module: null');
  t.equal(await probeGpuIdentity({ procDir: host.nvidiaProcDir }), null);
  await host.addGpu('0000:00:08.0', 'H100 80GB HBM3', 'GPU-00000000-0000-0000-0000-000000000002', 1);
  await host.addGpu('0000:00:07.0', 'H100 80GB HBM3', 'GPU-00000000-0000-0000-0000-000000000001', 0);
  const inv = await readGpuInventory({ procDir: host.nvidiaProcDir });
  t.same(inv, {
    driverVersion: '580.159.04',
    gpus: [
      { busLocation: '0000:00:07.0', model: 'NVIDIA H100 80GB HBM3', uuid: 'GPU-00000000-0000-0000-0000-000000000001', minor: 0 },
      { busLocation: '0000:00:08.0', model: 'NVIDIA H100 80GB HBM3', uuid: 'GPU-00000000-0000-0000-0000-000000000002', minor: 1 },
    ],
  });
  // UUIDs stay out of the key: a snapshot restores onto any GPUs of the same model via a device map.
  t.same(gpuKeyIdentity(inv), { model: 'NVIDIA H100 80GB HBM3', count: 2, driverVersion: '580.159.04' });
});

t.test('parsers', async (t) => {
  t.equal(parseDriverVersion('NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.12  Wed Aug 30 2023\n'), '535.104.12');
  t.equal(parseDriverVersion(''), '');
  const f = parseGpuInformation('Model: \t\t NVIDIA H200\nGPU UUID: \t GPU-abc\nBus Location: \t 0000:00:07.0\n');
  t.equal(f.get('Model'), 'NVIDIA H200');
  t.equal(f.get('GPU UUID'), 'GPU-abc');
  t.equal(f.get('Bus Location'), '0000:00:07.0', 'values keep their own colons');
  t.same(gpuKeyIdentity(null), null);
});
