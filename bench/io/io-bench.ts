/**
 * Restore I/O benchmark: how fast each thaw I/O backend reads (prefetch, buffered and O_DIRECT,
 * with and without XXH64) and copies (to tmpfs) one large file, against dd, cat, Node's fs.copyFile
 * and a plain fs.read loop. Cold cache (drop_caches before every run; needs root) and warm.
 *
 *   npm run build && node dist/bench/io/io-bench.js [--size-gib 2] [--repeats 5] [--json]
 *
 * Other options (--file, --dst-dir, --caches, --only, --block-size, --queue-depth, --keep): --help.
 * Progress goes to stderr.
 */
import { randomFillSync } from 'node:crypto';
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { copyFile, mkdir, open, rm } from 'node:fs/promises';
import { cpus, loadavg, release, totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { Command, Option } from 'commander';
import { execa } from 'execa';
import {
  DEFAULT_QUEUE_DEPTH,
  availableBackends,
  openIo,
  type IoBackend,
  type IoBackendName,
  type IoOptions,
} from '../../src/restore/io.js';
import { commaChoices, positiveInt, positiveNumber, regex } from '../common/options.js';

const CACHES = ['cold', 'warm'] as const;
type Cache = (typeof CACHES)[number];

interface Args {
  file: string | undefined;
  sizeGib: number;
  repeats: number;
  dstDir: string;
  caches: Cache[];
  only: RegExp | undefined;
  blockSize: number | undefined;
  queueDepth: number | undefined;
  json: boolean;
  keep: boolean;
}

interface BenchCase {
  name: string;
  /** Backend name or the tool compared against. */
  kind: IoBackendName | 'baseline';
  /** Moves the file's bytes once; returns the hash when it computed one. */
  run(file: string, dst: string): Promise<string | undefined>;
}

interface CaseResult {
  name: string;
  cache: Cache;
  seconds: number[];
  medianS: number;
  gbps: number;
  ratioToBest: number;
  hash?: string;
}

function parseArgs(argv: string[]): Args {
  return new Command('io-bench')
    .description("Reads and copies one large file with each of thaw's I/O backends and with dd, cat and Node, cold and warm cache")
    .option('--file <path>', 'file to read (default: a fresh file under /var/tmp, removed afterwards unless --keep)')
    .option('--size-gib <gib>', 'size of the fresh file', positiveNumber, 2)
    .option('--repeats <n>', 'runs per case and cache (median reported)', positiveInt, 5)
    .option('--dst-dir <dir>', 'copy destination directory', '/dev/shm')
    .addOption(new Option('--caches <list>', 'page-cache states, comma-separated (cold needs root)').argParser(commaChoices(CACHES)).default([...CACHES], CACHES.join(',')))
    .option('--only <regex>', 'run only the cases whose names match', regex)
    .option('--block-size <bytes>', "read size (default: each backend's own)", positiveInt)
    .option('--queue-depth <n>', "requests in flight (default: each backend's own)", positiveInt)
    .option('--json', 'JSON on stdout instead of the table', false)
    .option('--keep', 'keep the fresh file', false)
    .parse(argv, { from: 'user' })
    .opts<Args>();
}

const progress = (msg: string): void => void process.stderr.write(`[io-bench] ${msg}\n`);

async function sh(cmd: string, args: string[], timeoutMs = 120_000): Promise<string> {
  const r = await execa(cmd, args, { timeout: timeoutMs, reject: false, stdin: 'ignore' });
  return `${r.stdout ?? ''}`.trim();
}

async function machine(file: string): Promise<Record<string, string | number>> {
  const src = await sh('findmnt', ['-no', 'SOURCE,FSTYPE', '--target', file]);
  const dev = src.split(/\s+/)[0] ?? '';
  const base = dev.replace(/^\/dev\//, '');
  const read = (p: string): string => {
    try {
      return readFileSync(p, 'utf8').trim();
    } catch {
      return '?';
    }
  };
  return {
    nproc: cpus().length,
    cpu: cpus()[0]?.model ?? '?',
    memoryGiB: Math.round(totalmem() / 2 ** 30),
    kernel: release(),
    node: process.version,
    disk: `${src} (${base}: rotational=${read(`/sys/block/${base}/queue/rotational`)}, ` +
      `scheduler=${read(`/sys/block/${base}/queue/scheduler`)}, max_sectors_kb=${read(`/sys/block/${base}/queue/max_sectors_kb`)})`,
    ioUringDisabled: read('/proc/sys/kernel/io_uring_disabled'),
    thp: read('/sys/kernel/mm/transparent_hugepage/enabled'),
    readAheadKb: read(`/sys/block/${base}/queue/read_ahead_kb`),
  };
}

async function dropCaches(): Promise<boolean> {
  try {
    await sh('sync', []);
    writeFileSync('/proc/sys/vm/drop_caches', '3');
    return true;
  } catch {
    return false;
  }
}

async function makeFile(path: string, bytes: number): Promise<void> {
  if (existsSync(path) && statSync(path).size === bytes) return;
  progress(`writing ${bytes} bytes of random data to ${path}`);
  await mkdir(dirname(path), { recursive: true });
  const chunk = Buffer.allocUnsafe(64 << 20);
  const fh = await open(path, 'w');
  try {
    for (let done = 0; done < bytes; ) {
      randomFillSync(chunk);
      const n = Math.min(chunk.length, bytes - done);
      await fh.write(chunk, 0, n, done);
      done += n;
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
}

function ioCases(io: IoBackend, args: Args): BenchCase[] {
  const base: IoOptions = {
    ...(args.blockSize === undefined ? {} : { blockSize: args.blockSize }),
    ...(args.queueDepth === undefined ? {} : { queueDepth: args.queueDepth }),
  };
  const n = io.name;
  const cases: BenchCase[] = [
    { name: `${n} prefetch`, kind: n, run: async (f) => void (await io.prefetch([{ path: f }], base)) },
    {
      name: `${n} prefetch+xxh64`,
      kind: n,
      run: async (f) => (await io.prefetch([{ path: f }], { ...base, hash: true })).files[0]?.hash,
    },
    { name: `${n} copyFile`, kind: n, run: async (f, d) => void (await io.copyFile(f, d, base)) },
  ];
  if (n !== 'ts') {
    cases.push(
      { name: `${n} prefetch O_DIRECT`, kind: n, run: async (f) => void (await io.prefetch([{ path: f }], { ...base, direct: true })) },
      {
        name: `${n} prefetch+xxh64 O_DIRECT`,
        kind: n,
        run: async (f) => (await io.prefetch([{ path: f }], { ...base, direct: true, hash: true })).files[0]?.hash,
      },
      { name: `${n} copyFile O_DIRECT`, kind: n, run: async (f, d) => void (await io.copyFile(f, d, { ...base, direct: true })) },
    );
  }
  return cases;
}

function baselineCases(): BenchCase[] {
  return [
    {
      name: 'dd iflag=direct bs=1M',
      kind: 'baseline',
      run: async (f) => void (await execa('dd', [`if=${f}`, 'of=/dev/null', 'iflag=direct', 'bs=1M'], { timeout: 300_000 })),
    },
    { name: 'cat > /dev/null', kind: 'baseline', run: async (f) => void (await execa('sh', ['-c', 'cat "$1" > /dev/null', 'sh', f], { timeout: 300_000 })) },
    { name: 'node fs.copyFile', kind: 'baseline', run: async (f, d) => void (await copyFile(f, d)) },
    {
      name: 'node fs.read loop (1 MiB)',
      kind: 'baseline',
      run: async (f) => {
        const fh = await open(f, 'r');
        try {
          const buf = Buffer.allocUnsafe(1 << 20);
          for (let pos = 0; ; ) {
            const { bytesRead } = await fh.read(buf, 0, buf.length, pos);
            if (bytesRead === 0) break;
            pos += bytesRead;
          }
        } finally {
          await fh.close();
        }
        return undefined;
      },
    },
  ];
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  const bytes = Math.round(args.sizeGib * 2 ** 30);
  const file = args.file ?? join('/var/tmp', 'thaw-io-bench', `data-${args.sizeGib}GiB.bin`);
  const dst = join(args.dstDir, `thaw-io-bench-${process.pid}.copy`);
  await makeFile(file, bytes);
  const size = statSync(file).size;
  const info = await machine(file);

  const backends = availableBackends();
  const cases = [...backends.flatMap((name) => ioCases(openIo({ backend: name, env: {} }), args)), ...baselineCases()].filter(
    (c) => args.only === undefined || args.only.test(c.name),
  );
  const caches = [...args.caches];
  if (caches.includes('cold') && !(await dropCaches())) {
    progress('cannot write /proc/sys/vm/drop_caches (not root?): skipping cold-cache runs');
    caches.splice(caches.indexOf('cold'), 1);
  }

  const results: CaseResult[] = [];
  const started = performance.now();
  // Other work on the machine shows up as noise: record the load around the run.
  const loadBefore = loadavg()[0]!;
  try {
    for (const cache of caches) {
      const samples = new Map<string, number[]>(cases.map((c) => [c.name, []]));
      const hashes = new Map<string, string>();
      if (cache === 'warm') await execa('sh', ['-c', 'cat "$1" > /dev/null', 'sh', file]);
      // Repeats are interleaved across cases so that drift (other load, disk state) spreads evenly.
      for (let rep = 0; rep < args.repeats; rep++) {
        for (const c of cases) {
          if (cache === 'cold') await dropCaches();
          const t0 = performance.now();
          const hash = await c.run(file, dst);
          const s = (performance.now() - t0) / 1000;
          samples.get(c.name)!.push(s);
          if (hash !== undefined) hashes.set(c.name, hash);
          await rm(dst, { force: true });
          progress(`${cache} rep ${rep + 1}/${args.repeats} ${c.name}: ${(size / s / 1e9).toFixed(2)} GB/s`);
        }
      }
      const rows = cases.map((c) => {
        const seconds = samples.get(c.name)!;
        const medianS = median(seconds);
        const row: CaseResult = { name: c.name, cache, seconds, medianS, gbps: size / medianS / 1e9, ratioToBest: 0 };
        const h = hashes.get(c.name);
        if (h !== undefined) row.hash = h;
        return row;
      });
      const best = Math.max(...rows.map((r) => r.gbps));
      for (const r of rows) r.ratioToBest = r.gbps / best;
      results.push(...rows);
      const distinct = new Set(hashes.values());
      if (distinct.size > 1) throw new Error(`backends disagree on the file's XXH64: ${[...hashes].join(', ')}`);
    }
  } finally {
    await rm(dst, { force: true });
    if (args.file === undefined && !args.keep) await rm(file, { force: true });
  }

  const out = {
    machine: info,
    config: {
      file,
      bytes: size,
      repeats: args.repeats,
      copyDestination: `${args.dstDir} (${(await sh('findmnt', ['-no', 'FSTYPE', '--target', args.dstDir])).split('\n')[0]})`,
      blockSize: args.blockSize ?? 'backend default (1 MiB)',
      queueDepth: args.queueDepth ?? `backend default: ${JSON.stringify(DEFAULT_QUEUE_DEPTH)}`,
      backends,
      durationS: Math.round((performance.now() - started) / 100) / 10,
      loadavg1m: { before: loadBefore, after: loadavg()[0]! },
    },
    results,
  };
  if (args.json) {
    process.stdout.write(`${JSON.stringify(out, null, 2)}\n`);
    return;
  }
  const lines: string[] = [];
  lines.push(`machine: ${Object.entries(info).map(([k, v]) => `${k}=${v}`).join(', ')}`);
  lines.push(`file: ${size} bytes, ${args.repeats} repeats, median; copy destination ${out.config.copyDestination}`);
  lines.push(`load average (1 min) before ${loadBefore.toFixed(1)}, after ${out.config.loadavg1m.after.toFixed(1)}; ${out.config.durationS} s`);
  lines.push('');
  const byName = new Map<string, Partial<Record<Cache, CaseResult>>>();
  for (const r of results) byName.set(r.name, { ...byName.get(r.name), [r.cache]: r });
  const cell = (r: CaseResult | undefined): string =>
    r === undefined
      ? '– | –'
      : `${r.gbps.toFixed(2)} (${(size / Math.max(...r.seconds) / 1e9).toFixed(2)}–${(size / Math.min(...r.seconds) / 1e9).toFixed(2)}) | ${r.ratioToBest.toFixed(2)}`;
  lines.push('| case | cold GB/s (range) | cold ÷ best | warm GB/s (range) | warm ÷ best |');
  lines.push('|---|---|---|---|---|');
  for (const [name, r] of byName) lines.push(`| ${name} | ${cell(r.cold)} | ${cell(r.warm)} |`);
  process.stdout.write(`${lines.join('\n')}\n`);
}

main().catch((err: unknown) => {
  process.stderr.write(`[io-bench] failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  process.exitCode = 1;
});
