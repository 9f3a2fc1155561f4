/**
 * Shim overhead: `ctr run --rm` of a trivial container (busybox `true`) through thaw's shim vs
 * through containerd's own runc shim driving runsc (a `--runc-binary` wrapper adding
 * `--network=none --platform=systrap`), on one private containerd, interleaved so that machine
 * load hits both alike; medians of N runs after one warm-up each. Then up to 6 long-running
 * containers started back to back with `ctr run -d` (each path; medians). Also the RSS of thaw's `serve`
 * process (and of the runc shim) while a container runs, and the cost of the shim's short-lived
 * verbs (`-v`, `delete` with nothing to clean) next to a bare `node -e 0`.
 *
 *   npm run build:ts && node dist/bench/shim-overhead/run.js [--runs 10] [--out FILE]
 *
 * Needs root, containerd, ctr, runsc, busybox-static. Results: JSON on stdout (and --out).
 */
import { chmod, mkdir, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Command } from 'commander';
import {
  ContainerdHarness,
  THAW_RUNTIME,
  findProcesses,
  rssKiB,
  runCommand,
  until,
  type CommandResult,
} from '../../test/helpers/containerd.js';
import { buildOciImage, buildRootfs } from '../../test/helpers/oci-image.js';
import { positiveInt } from '../common/options.js';

const IMAGE = 'localhost/thaw-bench-true:1';

interface Sample {
  ms: number;
  code: number | null;
}

interface Stats {
  runs: number;
  medianMs: number;
  minMs: number;
  maxMs: number;
  exitCodes: Record<string, number>;
}

function stats(samples: readonly Sample[]): Stats {
  const ms = samples.map((s) => s.ms).sort((a, b) => a - b);
  const mid = Math.floor(ms.length / 2);
  const median = ms.length % 2 ? (ms[mid] ?? 0) : ((ms[mid - 1] ?? 0) + (ms[mid] ?? 0)) / 2;
  const exitCodes: Record<string, number> = {};
  for (const s of samples) exitCodes[String(s.code)] = (exitCodes[String(s.code)] ?? 0) + 1;
  return { runs: ms.length, medianMs: round(median), minMs: round(ms[0] ?? 0), maxMs: round(ms.at(-1) ?? 0), exitCodes };
}

const round = (n: number): number => Math.round(n * 10) / 10;

interface Args {
  runs: number;
  out: string | undefined;
}

function parseArgs(argv: string[]): Args {
  return new Command('shim-overhead')
    .description("ctr run --rm through thaw's shim vs containerd's runc shim driving runsc; shim RSS and short-lived verb costs")
    .option('--runs <n>', 'measured runs per shim after one warm-up (median reported)', positiveInt, 10)
    .option('--out <file>', 'also write the JSON results to this file')
    .parse(argv, { from: 'user' })
    .opts<Args>();
}

async function main(): Promise<void> {
  const { runs, out } = parseArgs(process.argv.slice(2));
  const cleanups: (() => Promise<void>)[] = [];
  const h = await ContainerdHarness.start((fn) => cleanups.push(fn), { prefix: 'thaw-bench-' });
  try {
    const result = await bench(h, runs);
    const text = `${JSON.stringify(result, null, 2)}\n`;
    process.stdout.write(text);
    if (out) {
      await mkdir(path.dirname(out), { recursive: true });
      await writeFile(out, text);
    }
  } finally {
    for (const fn of cleanups.reverse()) await fn();
  }
}

async function bench(h: ContainerdHarness, runs: number): Promise<Record<string, unknown>> {
  const load0 = os.loadavg();
  const rootfs = await buildRootfs({ dir: path.join(h.dir, 'rootfs') });
  const image = await buildOciImage({ workDir: path.join(h.dir, 'img'), rootfs, name: IMAGE, cmd: ['/bin/true'], out: path.join(h.dir, 'img.tar') });
  await h.importImage(image.tar);

  // containerd's runc shim with runsc as its "runc" (platform.md, Part A).
  const wrapper = path.join(h.dir, 'runsc-as-runc');
  await writeFile(wrapper, '#!/bin/sh\n# runsc in place of runc for containerd-shim-runc-v2\nexec runsc --network=none --platform=systrap "$@"\n');
  await chmod(wrapper, 0o755);
  const runcRoot = path.join(h.dir, 'runc-root');
  const viaRunc = (id: string, args: string[] = []): Promise<CommandResult> =>
    h.ctr(['run', '--rm', '--fifo-dir', h.fifoDir, '--runc-binary', wrapper, '--runc-root', runcRoot, IMAGE, id, ...args], { timeoutMs: 120_000 });
  const viaThaw = (id: string, args: string[] = []): Promise<CommandResult> => h.runThaw({ id, image: IMAGE, args, timeoutMs: 120_000 });

  const samples: Record<'thaw' | 'runc', Sample[]> = { thaw: [], runc: [] };
  for (let i = -1; i < runs; i++) {
    // Alternate which goes first, so neither always runs right after the other's teardown.
    const order: ('thaw' | 'runc')[] = i % 2 === 0 ? ['thaw', 'runc'] : ['runc', 'thaw'];
    for (const which of order) {
      const id = `bench-${which}-${i + 1}`;
      const r = which === 'thaw' ? await viaThaw(id) : await viaRunc(id);
      if (r.code !== 0 && r.code !== 255) throw new Error(`${which} run ${id} failed (${r.code}): ${r.err}`);
      if (i >= 0) samples[which].push({ ms: r.ms, code: r.code });
      process.stderr.write(`${id}: ${r.ms.toFixed(0)} ms (exit ${r.code})\n`);
    }
  }
  const thaw = stats(samples.thaw);
  const runc = stats(samples.runc);
  // A container the Node `start` launched a server for logs "shim server started"; one a spare took does not.
  const nodeStarted = new Set(
    [...h.log.matchAll(/"id":"(bench-thaw-\d+)"[^\n]*"msg":"shim server started"/g)].map((m) => m[1]),
  );
  const servedBySpare = samples.thaw.length - [...nodeStarted].filter((id) => id !== 'bench-thaw-0').length;
  // Of those, the ones a server took that had served an earlier container (recycled, no Node boot at all).
  const recycled = new Set([...h.log.matchAll(/"shim":"(bench-thaw-\d+)"[^\n]*"msg":"a recycled shim server serves this container"/g)].map((m) => m[1]));
  const servedByRecycled = [...recycled].filter((id) => id !== 'bench-thaw-0').length;

  // Long-running containers started back to back (a scale-up): each `ctr run -d` returns once its
  // task runs, and the next one starts while the earlier ones keep running, so no server is
  // recycled in between and spares must boot in time.
  const burst = async (which: 'thaw' | 'runc'): Promise<Stats> => {
    const s: Sample[] = [];
    const ids = Array.from({ length: Math.min(runs, 6) }, (_, i) => `burst-${which}-${i}`);
    for (const id of ids) {
      const args = ['run', '-d', '--fifo-dir', h.fifoDir];
      if (which === 'thaw') args.push('--runtime', THAW_RUNTIME, '--runtime-config-path', h.thawConfigPath);
      else args.push('--runc-binary', wrapper, '--runc-root', runcRoot);
      const r = await h.ctr([...args, IMAGE, h.track(id), '/bin/sleep', '600'], { timeoutMs: 120_000 });
      if (r.code !== 0) throw new Error(`${which} burst ${id} failed (${r.code}): ${r.err}`);
      s.push({ ms: r.ms, code: r.code });
    }
    for (const id of ids) await h.ctr(['tasks', 'kill', '-s', 'SIGKILL', id]);
    for (const id of ids) {
      await until(async () => (await h.taskStatus(id)) === 'STOPPED', 30_000, `${id} to stop`).catch(() => undefined);
      await h.ctr(['tasks', 'rm', '-f', id]);
      await h.ctr(['containers', 'rm', id]);
    }
    return stats(s);
  };
  const burstThaw = await burst('thaw');
  const burstRunc = await burst('runc');
  const burstNodeStarted = [...h.log.matchAll(/"id":"(burst-thaw-\d+)"[^\n]*"msg":"shim server started"/g)].length;

  // RSS of each shim while a container runs.
  const rss: Record<string, number | undefined> = {};
  const thawLog = path.join(h.dir, 'rss-thaw.log');
  await h.ctr(['run', '-d', '--log-uri', `file://${thawLog}`, '--runtime', THAW_RUNTIME, '--runtime-config-path', h.thawConfigPath, IMAGE, h.track('rss-thaw'), '/bin/sleep', '600']);
  await h.waitForTaskStatus('rss-thaw', 'RUNNING');
  await new Promise((r) => setTimeout(r, 1000));
  const thawShim = h.shimPidOf('rss-thaw');
  rss.thawServeKiB = rssKiB(thawShim);
  const runcLog = path.join(h.dir, 'rss-runc.log');
  await h.ctr(['run', '-d', '--log-uri', `file://${runcLog}`, '--runc-binary', wrapper, '--runc-root', runcRoot, IMAGE, 'rss-runc', '/bin/sleep', '600']);
  await h.waitForTaskStatus('rss-runc', 'RUNNING');
  // containerd's runc shim leaves no shim.pid in the bundle: find it by its argv.
  const [runcShim] = findProcesses((argv) => (argv[0] ?? '').endsWith('containerd-shim-runc-v2') && argv.includes('rss-runc'));
  rss.runcShimKiB = runcShim === undefined ? undefined : rssKiB(runcShim);
  // The runsc sandbox processes behind each (same for both paths): for context.
  rss.runscSandboxKiB = findProcesses((argv) => argv.some((a) => a === 'boot') && (argv[0] ?? '').includes('runsc'))
    .map((p) => rssKiB(p) ?? 0)
    .reduce((a, b) => Math.max(a, b), 0);
  for (const id of ['rss-thaw', 'rss-runc']) {
    await h.ctr(['tasks', 'kill', '-s', 'SIGKILL', id]);
    await until(async () => (await h.taskStatus(id)) === 'STOPPED', 30_000, `${id} to stop`).catch(() => undefined);
    await h.ctr(['tasks', 'rm', '-f', id]);
    await h.ctr(['containers', 'rm', id]);
  }

  // The shim's short-lived processes: containerd waits for `start` (twice the Node start-up: the
  // verb and the server it launches) and, after every shim exit, for `delete`.
  const shim = path.join(h.bin, 'containerd-shim-thaw-v2');
  const verb = async (file: string, args: string[], cwd?: string): Promise<Stats> => {
    const s: Sample[] = [];
    for (let i = 0; i < Math.min(runs, 10); i++) {
      const r = await runCommand(file, args, { cwd, timeoutMs: 60_000 });
      s.push({ ms: r.ms, code: r.code });
    }
    return stats(s);
  };
  const bundle = path.join(h.dir, 'empty-bundle');
  await mkdir(bundle, { recursive: true });
  await writeFile(path.join(bundle, 'thaw-config-path'), h.thawConfigPath);
  const processes = {
    nodeBare: await verb(process.execPath, ['-e', '0']),
    shimVersion: await verb(shim, ['-v']),
    shimDeleteNothingLeft: await verb(shim, ['-namespace', 'default', '-address', h.grpc, '-publish-binary', '/usr/bin/containerd', '-id', 'none', '-bundle', bundle, 'delete'], bundle),
  };

  return {
    date: new Date().toISOString(),
    host: { cpus: os.cpus().length, loadavgStart: load0.map(round), loadavgEnd: os.loadavg().map(round), node: process.version },
    command: {
      thaw: `ctr run --rm --runtime ${THAW_RUNTIME} --runtime-config-path CONFIG ${IMAGE} ID`,
      runc: `ctr run --rm --runc-binary WRAPPER --runc-root DIR ${IMAGE} ID   (WRAPPER: exec runsc --network=none --platform=systrap "$@")`,
    },
    ctrRunRm: { thaw, runcShimWithRunsc: runc, ratio: Number((thaw.medianMs / runc.medianMs).toFixed(2)), thawRunsServedBySpare: servedBySpare, thawRunsServedByRecycledServer: servedByRecycled },
    ctrRunDetachedBackToBack: {
      thaw: burstThaw,
      runcShimWithRunsc: burstRunc,
      ratio: Number((burstThaw.medianMs / burstRunc.medianMs).toFixed(2)),
      thawRunsStartingNode: burstNodeStarted,
    },
    rss,
    processes,
  };
}

await main();
