/**
 * CPU restore benchmark (not a test): how long until a container with N GiB of touched memory
 * serves again, for
 *
 *   cold-start          `thaw run --cold` until the demo app prints READY (boot + filling memory)
 *   naive-default       `runsc create` + `runsc restore` of an image written by plain `runsc
 *                       checkpoint` (runsc's default flags: flate compression on 20240729), until the
 *                       app ticks
 *   naive-uncompressed  the same naive create + restore of thaw's image (uncompressed pages.img)
 *   thaw                `thaw run` deciding to restore (stage + verify, create, restore), until it ticks
 *   floor               reading pages.img into freshly mapped anonymous memory (one thread per core):
 *                       the bytes must at least come off the storage tier and populate that memory;
 *                       floor-read / floor-touch split it into its two halves
 *
 * each with a cold page cache (drop_caches before the run) and a warm one (image files read first),
 * median of --runs runs, variants interleaved per run so machine noise spreads evenly. One container
 * at a time. Prints a table (or --json) with the machine, medians, ratios and thaw's phase timings.
 *
 *   npm run build && node dist/bench/cpu-restore/cpu-restore.js --sizes 1,4
 *
 * Needs root (runsc, drop_caches), runsc, gcc, busybox-static.
 */
import { closeSync, existsSync, openSync } from 'node:fs';
import { mkdir, open, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { Command, Option } from 'commander';
import { execa } from 'execa';
import { buildBundle } from '../../src/bundle/bundle.js';
import { commaChoices, gibSizes, nonNegativeInt, positiveInt, positiveNumber } from '../common/options.js';

const REPO = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const THAW = join(REPO, 'bin', 'thaw');
const APP_SOURCE = join(REPO, 'demo', 'app', 'thaw-demo-app.c');
const FLOOR_SOURCE = join(REPO, 'bench', 'cpu-restore', 'floor.c');

const CACHES = ['cold', 'warm'] as const;
type Cache = (typeof CACHES)[number];
type Variant = 'cold-start' | 'naive-default' | 'naive-uncompressed' | 'thaw' | 'floor' | 'floor-read' | 'floor-touch';
const VARIANTS: readonly Variant[] = ['cold-start', 'naive-default', 'naive-uncompressed', 'thaw', 'floor', 'floor-read', 'floor-touch'];

interface Args {
  sizes: number[];
  runs: number;
  caches: Cache[];
  variants: Variant[];
  json: boolean;
  work: string;
  initMs: number;
  tickMs: number;
  out: string | undefined;
  keep: boolean;
  /** Before each sample, wait (up to 5 min) until the 1-minute load average is below this. */
  maxLoad: number | undefined;
}

/** One measured run. */
interface Sample {
  sizeGiB: number;
  variant: Variant;
  cache: Cache | 'n/a';
  run: number;
  /** Until READY (cold start) or the first TICK after restore, or the floor program's own time. */
  ms: number;
  /** Parts of the run: runsc create/restore command times, thaw's phase timings. */
  parts?: Record<string, number>;
  loadavg1: number;
}

interface Summary {
  sizeGiB: number;
  variant: Variant;
  cache: Cache | 'n/a';
  runs: number;
  medianMs: number;
  minMs: number;
  maxMs: number;
  /** Median 1-minute load average at the end of the runs (other work on the machine). */
  medianLoad1: number;
  /** Median of each part across runs. */
  parts?: Record<string, number>;
}

interface SizeInfo {
  sizeGiB: number;
  appMiB: number;
  thawSnapshot: { key: string; bytes: number; checkpointMs: number; timings: Record<string, number> };
  naiveImage: { bytes: number; checkpointMs: number; compression: string };
}

const log = (msg: string): void => {
  process.stderr.write(`[cpu-restore] ${msg}\n`);
};

function parseArgs(argv: string[]): Args {
  return new Command('cpu-restore')
    .description('Time until a container with N GiB of touched memory serves again: cold start, naive runsc restore, thaw, the floor')
    .addOption(new Option('--sizes <gib,...>', 'memory the app touches, GiB').argParser(gibSizes).default([1, 4], '1,4'))
    .option('--runs <n>', 'runs per variant and cache (median reported)', positiveInt, 5)
    .addOption(new Option('--caches <list>', 'page-cache states, comma-separated').argParser(commaChoices(CACHES)).default([...CACHES], CACHES.join(',')))
    .addOption(new Option('--variants <list>', `variants to measure, some of ${VARIANTS.join(',')}`).argParser(commaChoices(VARIANTS)).default([...VARIANTS], 'all'))
    .option('--json', 'print the report as JSON instead of the table', false)
    .option('--out <file>', 'also write the JSON report to this file')
    .option('--work <dir>', 'work directory (bundles, images, tools)', '/var/tmp/thaw-bench-cpu-restore')
    .option('--init-ms <ms>', "the demo app's start-up delay", nonNegativeInt, 0)
    .option('--tick-ms <ms>', "the demo app's tick interval", positiveInt, 10)
    .option('--keep', 'keep the work directory of each size', false)
    .option('--max-load <load>', 'before each sample, wait (up to 5 min) for the 1-minute load average to drop below this', positiveNumber)
    .parse(argv, { from: 'user' })
    .opts<Args>();
}

// ---------------------------------------------------------------------------------------------
// Machine

interface Machine {
  nproc: number;
  cpuModel: string;
  memoryGiB: number;
  kernel: string;
  disk: string;
  runsc: string;
  thawCommit: string;
  thp: string;
  node: string;
  loadavgStart: number[];
  loadavgEnd?: number[];
}

async function describeMachine(work: string): Promise<Machine> {
  const sh = async (cmd: string, args: string[]): Promise<string> => {
    const r = await execa(cmd, args, { reject: false, timeout: 15_000, encoding: 'utf8' });
    return String(r.stdout ?? '').trim();
  };
  const mount = await sh('findmnt', ['-no', 'SOURCE,FSTYPE', '-T', work]);
  const dev = /^\/dev\/(\w+?)\d*\s/.exec(`${mount} `)?.[1];
  const rotational = dev ? (await readFile(`/sys/block/${dev}/queue/rotational`, 'utf8').catch(() => '?')).trim() : '?';
  const model = dev ? (await readFile(`/sys/block/${dev}/device/model`, 'utf8').catch(() => '')).trim() : '';
  const thp = (await readFile('/sys/kernel/mm/transparent_hugepage/enabled', 'utf8').catch(() => '?')).trim();
  return {
    nproc: os.cpus().length,
    cpuModel: os.cpus()[0]?.model ?? '?',
    memoryGiB: Math.round((os.totalmem() / 2 ** 30) * 10) / 10,
    kernel: os.release(),
    disk: `${mount.replace(/\s+/g, ' ')}${model ? ` (${model})` : ''}, ${rotational === '0' ? 'non-rotational' : rotational === '1' ? 'rotational' : 'rotational=?'}`,
    runsc: (await sh('runsc', ['--version'])).split('\n')[0] ?? '?',
    thawCommit: await sh('git', ['-C', REPO, 'rev-parse', '--short', 'HEAD']),
    thp: /\[(\w+)\]/.exec(thp)?.[1] ?? thp,
    node: process.version,
    loadavgStart: os.loadavg().map((l) => Math.round(l * 100) / 100),
  };
}

// ---------------------------------------------------------------------------------------------
// Processes

interface Env {
  args: Args;
  dir: string;
  bundle: string;
  /** thaw --root/--store. */
  thawGlobals: string[];
  thawRoot: string;
  store: string;
  /** runsc root for the naive runs (separate from thaw's). */
  naiveRoot: string;
  floorBin: string;
}

const RUNSC_GLOBALS = ['--network=none', '--platform=systrap'];

async function thaw(env: Env, args: string[], timeoutMs = 600_000): Promise<Record<string, unknown>> {
  const r = await execa(process.execPath, [THAW, ...env.thawGlobals, '--json', ...args], {
    reject: false,
    timeout: timeoutMs,
    stdin: 'ignore',
    encoding: 'utf8',
  });
  const line = String(r.stdout ?? '').trim().split('\n').pop() ?? '';
  if (r.exitCode !== 0) throw new Error(`thaw ${args.join(' ')} failed (${r.exitCode ?? r.signal}): ${String(r.stderr).trim()}`);
  return JSON.parse(line) as Record<string, unknown>;
}

async function runsc(env: Env, args: string[], stdio?: number, timeoutMs = 600_000): Promise<void> {
  const r = await execa('runsc', ['--root', env.naiveRoot, ...RUNSC_GLOBALS, ...args], {
    reject: false,
    timeout: timeoutMs,
    stdin: 'ignore',
    // create/restore hand their stdio to the sandbox: give them a file, never a pipe.
    stdout: (stdio ?? 'pipe') as 'pipe',
    stderr: (stdio ?? 'pipe') as 'pipe',
    encoding: 'utf8',
  });
  if (r.exitCode !== 0) throw new Error(`runsc ${args.join(' ')} failed (${r.exitCode ?? r.signal}): ${String(r.stderr ?? '').trim()}`);
}

async function deleteAllRunsc(root: string): Promise<void> {
  if (!existsSync(root)) return;
  const r = await execa('runsc', ['--root', root, 'list', '--format=json'], { reject: false, timeout: 30_000, encoding: 'utf8' });
  let ids: string[] = [];
  try {
    ids = ((JSON.parse(String(r.stdout || 'null')) as { id: string }[] | null) ?? []).map((c) => c.id);
  } catch {
    ids = [];
  }
  for (const id of ids) await execa('runsc', ['--root', root, 'delete', '--force', id], { reject: false, timeout: 60_000 });
}

/** The first line of `file` matching `pattern`, polled every 5 ms; `t=` of the app and when it was seen. */
async function waitForLine(file: string, pattern: RegExp, timeoutMs = 300_000): Promise<{ appMs: number; seenMs: number; line: string }> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const lines = (await readFile(file, 'utf8').catch(() => '')).split('\n');
    lines.pop(); // a line still being written
    const line = lines.find((l) => pattern.test(l));
    if (line !== undefined && /t=(\d+)/.test(line)) {
      return { appMs: Number(/t=(\d+)/.exec(line)![1]), seenMs: Date.now(), line };
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${pattern} in ${file}`);
    await sleep(5);
  }
}

/**
 * When the app reached the line. The app's clock (CLOCK_REALTIME in the sandbox) is the precise
 * one; the poll only bounds it, so an app clock that disagrees by more than a second is an error.
 */
function reachedAt(seen: { appMs: number; seenMs: number }, t0: number): number {
  if (Math.abs(seen.seenMs - seen.appMs) > 1_000) {
    throw new Error(`sandbox clock off by ${seen.seenMs - seen.appMs} ms; cannot time from the app's output`);
  }
  return seen.appMs - t0;
}

/**
 * cold: the image is not in the page cache (caches dropped), while the tools are (runsc, node, thaw's
 * code, the bundle are read back in), so a cold run measures the image's storage tier rather than
 * loading node_modules from disk. warm: the image files were read just before.
 */
async function prepareCache(env: Env, cache: Cache, files: string[]): Promise<void> {
  if (cache === 'cold') {
    await execa('sync', [], { timeout: 120_000 });
    await writeFile('/proc/sys/vm/drop_caches', '3\n');
    const runscPath = (await execa('which', ['runsc'], { encoding: 'utf8' })).stdout.trim();
    const tools = [runscPath, process.execPath, join(REPO, 'dist'), join(REPO, 'node_modules'), env.bundle, env.floorBin];
    await execa('sh', ['-c', 'find "$@" -type f -exec cat {} + > /dev/null', 'sh', ...tools], { timeout: 600_000, reject: false });
  } else {
    for (const f of files) await execa('cat', [f], { stdout: 'ignore', timeout: 600_000 });
  }
}

async function imageFiles(dir: string): Promise<string[]> {
  return (await readdir(dir)).map((n) => join(dir, n));
}

async function dirBytes(dir: string): Promise<number> {
  let n = 0;
  for (const f of await imageFiles(dir)) n += (await stat(f)).size;
  return n;
}

/** `compression` from a runsc image header: magic `gVisorSF`, 8-byte length, JSON. */
async function imageCompression(checkpointImg: string): Promise<string> {
  const fh = await open(checkpointImg, 'r');
  try {
    const head = Buffer.alloc(64 << 10);
    const { bytesRead } = await fh.read(head, 0, head.length, 0);
    if (head.subarray(0, 8).toString('latin1') !== 'gVisorSF') return 'unknown';
    const len = Number(head.readBigUInt64BE(8));
    const json = head.subarray(16, Math.min(bytesRead, 16 + len)).toString('utf8');
    return (JSON.parse(json) as { compression?: string }).compression ?? 'unknown';
  } catch {
    return 'unknown';
  } finally {
    await fh.close();
  }
}

// ---------------------------------------------------------------------------------------------
// Measurements

let seq = 0;
const nextId = (prefix: string): string => `${prefix}-${++seq}`;
const load1 = (): number => Math.round(os.loadavg()[0]! * 100) / 100;

async function measureColdStart(env: Env, size: number, run: number): Promise<Sample> {
  const id = nextId('cold');
  const out = join(env.dir, `${id}.log`);
  const t0 = Date.now();
  const r = await thaw(env, ['run', '--bundle', env.bundle, '--id', id, '--detach', '--cold', '--output', out]);
  const ready = await waitForLine(out, /^READY /);
  const ms = reachedAt(ready, t0);
  await thaw(env, ['delete', '--force', id]);
  return { sizeGiB: size, variant: 'cold-start', cache: 'n/a', run, ms, parts: r.timings as Record<string, number>, loadavg1: load1() };
}

async function measureNaive(env: Env, size: number, variant: 'naive-default' | 'naive-uncompressed', imageDir: string, cache: Cache, run: number): Promise<Sample> {
  const id = nextId(variant);
  const out = join(env.dir, `${id}.log`);
  await prepareCache(env, cache, await imageFiles(imageDir));
  const fd = openSync(out, 'a');
  try {
    const t0 = Date.now();
    await runsc(env, ['create', '--bundle', env.bundle, id], fd);
    const t1 = Date.now();
    await runsc(env, ['restore', '--detach', '--bundle', env.bundle, `--image-path=${imageDir}`, id], fd);
    const t2 = Date.now();
    const tick = await waitForLine(out, /^TICK /);
    const ms = reachedAt(tick, t0);
    return { sizeGiB: size, variant, cache, run, ms, parts: { create: t1 - t0, restore: t2 - t1 }, loadavg1: load1() };
  } finally {
    closeSync(fd);
    await execa('runsc', ['--root', env.naiveRoot, 'delete', '--force', id], { reject: false, timeout: 60_000 });
  }
}

async function measureThaw(env: Env, size: number, imageDir: string, cache: Cache, run: number): Promise<Sample> {
  const id = nextId('thaw');
  const out = join(env.dir, `${id}.log`);
  await prepareCache(env, cache, await imageFiles(imageDir));
  try {
    const t0 = Date.now();
    const r = await thaw(env, ['run', '--bundle', env.bundle, '--id', id, '--detach', '--output', out]);
    if (r.decision !== 'restore') throw new Error(`thaw run decided ${String(r.decision)}: ${String(r.reason)}`);
    const tick = await waitForLine(out, /^TICK /);
    const ms = reachedAt(tick, t0);
    return { sizeGiB: size, variant: 'thaw', cache, run, ms, parts: r.timings as Record<string, number>, loadavg1: load1() };
  } finally {
    await thaw(env, ['delete', '--force', id]).catch(() => undefined);
  }
}

async function measureFloor(env: Env, size: number, variant: 'floor' | 'floor-read' | 'floor-touch', pages: string, cache: Cache, run: number): Promise<Sample> {
  const bytes = (await stat(pages)).size;
  await prepareCache(env, cache, [pages]);
  const args =
    variant === 'floor' ? ['read-into', pages] : variant === 'floor-read' ? ['read', pages] : ['touch', String(bytes)];
  const r = await execa(env.floorBin, [...args, String(os.cpus().length)], { timeout: 600_000, encoding: 'utf8' });
  const ms = (JSON.parse(String(r.stdout)) as { ms: number }).ms;
  return { sizeGiB: size, variant, cache: variant === 'floor-touch' ? 'n/a' : cache, run, ms, loadavg1: load1() };
}

/** Starts the app under plain runsc and checkpoints it with runsc's default flags. */
async function naiveDefaultImage(env: Env, imageDir: string): Promise<{ checkpointMs: number }> {
  const id = nextId('naive-src');
  const out = join(env.dir, `${id}.log`);
  const fd = openSync(out, 'a');
  try {
    await runsc(env, ['create', '--bundle', env.bundle, id], fd);
    await runsc(env, ['start', id]);
    await waitForLine(out, /^READY /);
    await waitForLine(out, /^TICK /);
    await mkdir(imageDir, { recursive: true });
    const t0 = Date.now();
    await runsc(env, ['checkpoint', `--image-path=${imageDir}`, id]);
    return { checkpointMs: Date.now() - t0 };
  } finally {
    closeSync(fd);
    await execa('runsc', ['--root', env.naiveRoot, 'delete', '--force', id], { reject: false, timeout: 60_000 });
  }
}

/** Cold-starts the app with thaw and checkpoints it into thaw's store. */
async function thawSnapshot(env: Env): Promise<SizeInfo['thawSnapshot']> {
  const id = nextId('thaw-src');
  const out = join(env.dir, `${id}.log`);
  await thaw(env, ['run', '--bundle', env.bundle, '--id', id, '--detach', '--cold', '--output', out]);
  try {
    await waitForLine(out, /^READY /);
    await waitForLine(out, /^TICK /);
    const t0 = Date.now();
    const c = await thaw(env, ['checkpoint', id]);
    return { key: c.snapshot as string, bytes: c.bytes as number, checkpointMs: Date.now() - t0, timings: c.timings as Record<string, number> };
  } finally {
    await thaw(env, ['delete', '--force', id]).catch(() => undefined);
  }
}

/** Waits (at most 5 minutes) for the 1-minute load average to drop below `maxLoad`. */
async function quietEnough(maxLoad: number | undefined): Promise<void> {
  if (maxLoad === undefined) return;
  const deadline = Date.now() + 300_000;
  while (os.loadavg()[0]! >= maxLoad && Date.now() < deadline) await sleep(2_000);
}

async function memAvailableGiB(): Promise<number> {
  const text = await readFile('/proc/meminfo', 'utf8');
  return Number(/MemAvailable:\s+(\d+)/.exec(text)?.[1] ?? 0) / 2 ** 20;
}

async function benchSize(args: Args, base: string, floorBin: string, app: string, size: number, samples: Sample[]): Promise<SizeInfo | undefined> {
  const appMiB = Math.round(size * 1024);
  const avail = await memAvailableGiB();
  if (avail < size * 2 + 2) {
    log(`skipping ${size} GiB: only ${avail.toFixed(1)} GiB available (need the app plus page cache for its image)`);
    return undefined;
  }
  const dir = join(base, `${size}gib`);
  await rm(dir, { recursive: true, force: true });
  await mkdir(dir, { recursive: true });
  const bundle = await buildBundle({
    dir: join(dir, 'bundle'),
    args: ['/app', '--mib', String(appMiB), '--init-ms', String(args.initMs), '--tick-ms', String(args.tickMs)],
    files: { [app]: '/app' },
  });
  const env: Env = {
    args,
    dir,
    bundle,
    thawGlobals: ['--root', join(dir, 'state'), '--store', join(dir, 'store')],
    thawRoot: join(dir, 'state'),
    store: join(dir, 'store'),
    naiveRoot: join(dir, 'naive-runsc'),
    floorBin,
  };
  cleanupRoots.push(join(env.thawRoot, 'runsc'), env.naiveRoot);
  const want = (v: Variant): boolean => args.variants.includes(v);

  log(`${size} GiB: thaw checkpoint`);
  const thawSnap = await thawSnapshot(env);
  const thawImage = join(env.store, 'snapshots', thawSnap.key, 'image');
  const naiveImage = join(dir, 'naive-default-image');
  let naive = { checkpointMs: NaN };
  if (want('naive-default')) {
    log(`${size} GiB: plain runsc checkpoint (default flags)`);
    naive = await naiveDefaultImage(env, naiveImage);
  }
  const info: SizeInfo = {
    sizeGiB: size,
    appMiB,
    thawSnapshot: thawSnap,
    naiveImage: want('naive-default')
      ? { bytes: await dirBytes(naiveImage), checkpointMs: naive.checkpointMs, compression: await imageCompression(join(naiveImage, 'checkpoint.img')) }
      : { bytes: 0, checkpointMs: NaN, compression: 'not measured' },
  };
  const pages = join(thawImage, 'pages.img');

  for (let run = 1; run <= args.runs; run++) {
    const step = async (what: string, fn: () => Promise<Sample>): Promise<void> => {
      await quietEnough(args.maxLoad);
      const s = await fn();
      samples.push(s);
      log(`${size} GiB run ${run}/${args.runs}: ${what} ${(s.ms / 1000).toFixed(2)} s (load ${s.loadavg1})`);
    };
    if (want('cold-start')) await step('cold start', () => measureColdStart(env, size, run));
    for (const cache of args.caches) {
      if (want('naive-default')) await step(`naive default image, ${cache}`, () => measureNaive(env, size, 'naive-default', naiveImage, cache, run));
      if (want('naive-uncompressed')) await step(`naive thaw image, ${cache}`, () => measureNaive(env, size, 'naive-uncompressed', thawImage, cache, run));
      if (want('thaw')) await step(`thaw run, ${cache}`, () => measureThaw(env, size, thawImage, cache, run));
      if (want('floor')) await step(`floor, ${cache}`, () => measureFloor(env, size, 'floor', pages, cache, run));
      if (want('floor-read')) await step(`floor read only, ${cache}`, () => measureFloor(env, size, 'floor-read', pages, cache, run));
    }
    if (want('floor-touch')) await step('floor touch only', () => measureFloor(env, size, 'floor-touch', pages, 'warm', run));
  }
  if (!args.keep) await rm(dir, { recursive: true, force: true });
  return info;
}

// ---------------------------------------------------------------------------------------------
// Report

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

function summarize(samples: Sample[]): Summary[] {
  const groups = new Map<string, Sample[]>();
  for (const s of samples) {
    const k = `${s.sizeGiB}|${s.variant}|${s.cache}`;
    groups.set(k, [...(groups.get(k) ?? []), s]);
  }
  return [...groups.values()].map((g) => {
    const first = g[0]!;
    const partNames = [...new Set(g.flatMap((s) => Object.keys(s.parts ?? {})))];
    const parts = partNames.length
      ? Object.fromEntries(partNames.map((p) => [p, round(median(g.map((s) => s.parts?.[p] ?? 0)))]))
      : undefined;
    const ms = g.map((s) => s.ms);
    return {
      sizeGiB: first.sizeGiB,
      variant: first.variant,
      cache: first.cache,
      runs: g.length,
      medianMs: round(median(ms)),
      minMs: round(Math.min(...ms)),
      maxMs: round(Math.max(...ms)),
      medianLoad1: round(median(g.map((s) => s.loadavg1))),
      ...(parts ? { parts } : {}),
    };
  });
}

function round(x: number): number {
  return Math.round(x * 10) / 10;
}

interface Ratio {
  sizeGiB: number;
  cache: Cache;
  /** naive-default median / thaw median (> 1: thaw faster). */
  naiveDefaultOverThaw: number | null;
  naiveUncompressedOverThaw: number | null;
  /** thaw median / floor median (how far above the physical floor). */
  thawOverFloor: number | null;
  /** cold-start median / thaw median. */
  coldStartOverThaw: number | null;
}

function ratios(summaries: Summary[]): Ratio[] {
  const out: Ratio[] = [];
  const sizes = [...new Set(summaries.map((s) => s.sizeGiB))];
  for (const size of sizes) {
    const get = (v: Variant, c: Cache | 'n/a'): number | undefined =>
      summaries.find((s) => s.sizeGiB === size && s.variant === v && s.cache === c)?.medianMs;
    for (const cache of ['cold', 'warm'] as const) {
      const t = get('thaw', cache);
      if (t === undefined) continue;
      const r = (x: number | undefined, y: number | undefined): number | null => (x === undefined || y === undefined ? null : Math.round((x / y) * 100) / 100);
      out.push({
        sizeGiB: size,
        cache,
        naiveDefaultOverThaw: r(get('naive-default', cache), t),
        naiveUncompressedOverThaw: r(get('naive-uncompressed', cache), t),
        thawOverFloor: r(t, get('floor', cache)),
        coldStartOverThaw: r(get('cold-start', 'n/a'), t),
      });
    }
  }
  return out;
}

const LABEL: Record<Variant, string> = {
  'cold-start': 'cold start (thaw run --cold → READY)',
  'naive-default': 'naive runsc create+restore, default image',
  'naive-uncompressed': 'naive runsc create+restore, thaw image',
  thaw: 'thaw run (restore → first tick)',
  floor: 'floor: read pages.img into fresh memory',
  'floor-read': 'floor part: read pages.img only',
  'floor-touch': 'floor part: touch fresh memory only',
};

/** Phases of `thaw run` in execution order; stage runs concurrently with create. */
const PHASES = ['read-spec', 'key', 'lookup', 'stage', 'create', 'restore'];

function table(machine: Machine, infos: SizeInfo[], summaries: Summary[], rs: Ratio[], args: Args): string {
  const lines: string[] = [];
  lines.push(`machine: ${machine.nproc} CPUs (${machine.cpuModel}), ${machine.memoryGiB} GiB RAM, kernel ${machine.kernel}, disk ${machine.disk}`);
  lines.push(`         ${machine.runsc}, THP ${machine.thp}, node ${machine.node}, thaw ${machine.thawCommit}; load ${machine.loadavgStart.join('/')} → ${machine.loadavgEnd?.join('/')}`);
  lines.push(`app: demo app, --init-ms ${args.initMs} --tick-ms ${args.tickMs}; median of ${args.runs} runs; seconds; load = median 1-min load average`);
  for (const info of infos) {
    lines.push('');
    lines.push(
      `${info.sizeGiB} GiB touched: thaw image ${(info.thawSnapshot.bytes / 2 ** 30).toFixed(2)} GiB (checkpoint ${(info.thawSnapshot.checkpointMs / 1000).toFixed(1)} s: ${JSON.stringify(info.thawSnapshot.timings)}), ` +
        `default image ${(info.naiveImage.bytes / 2 ** 30).toFixed(2)} GiB ${info.naiveImage.compression} (checkpoint ${(info.naiveImage.checkpointMs / 1000).toFixed(1)} s)`,
    );
    lines.push(`  ${'variant'.padEnd(44)} ${'cache'.padEnd(5)} ${'median'.padStart(7)} ${'min'.padStart(7)} ${'max'.padStart(7)}  load`);
    for (const s of summaries.filter((x) => x.sizeGiB === info.sizeGiB)) {
      lines.push(
        `  ${LABEL[s.variant].padEnd(44)} ${s.cache.padEnd(5)} ${(s.medianMs / 1000).toFixed(2).padStart(7)} ${(s.minMs / 1000).toFixed(2).padStart(7)} ${(s.maxMs / 1000).toFixed(2).padStart(7)}  ${s.medianLoad1.toFixed(1)}`,
      );
    }
    for (const r of rs.filter((x) => x.sizeGiB === info.sizeGiB)) {
      const f = (x: number | null): string => (x === null ? '–' : `${x.toFixed(2)}×`);
      lines.push(
        `  ${r.cache}: naive(default)/thaw ${f(r.naiveDefaultOverThaw)}, naive(uncompressed)/thaw ${f(r.naiveUncompressedOverThaw)}, thaw/floor ${f(r.thawOverFloor)}, cold start/thaw ${f(r.coldStartOverThaw)}`,
      );
    }
    for (const s of summaries.filter((x) => x.sizeGiB === info.sizeGiB && x.variant === 'thaw')) {
      const p = s.parts ?? {};
      const inPhases = (p['read-spec'] ?? 0) + (p.key ?? 0) + (p.lookup ?? 0) + Math.max(p.stage ?? 0, p.create ?? 0) + (p.restore ?? 0);
      const phases = PHASES.filter((n) => n in p).map((n) => `${n} ${p[n]}`).join(', ');
      lines.push(`  thaw phases (${s.cache}, median ms): ${phases}; outside them (node start-up, opening the store, first tick) ${round(s.medianMs - inPhases)}`);
    }
    for (const s of summaries.filter((x) => x.sizeGiB === info.sizeGiB && x.variant.startsWith('naive-'))) {
      lines.push(`  ${s.variant} (${s.cache}, median ms): runsc create ${s.parts?.create}, runsc restore ${s.parts?.restore}`);
    }
  }
  return lines.join('\n');
}

// ---------------------------------------------------------------------------------------------

const cleanupRoots: string[] = [];

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  if (process.getuid?.() !== 0) throw new Error('run as root (runsc, drop_caches)');
  await mkdir(args.work, { recursive: true });
  const tools = join(args.work, 'tools');
  await mkdir(tools, { recursive: true });
  const app = join(tools, 'thaw-demo-app');
  const floorBin = join(tools, 'floor');
  await execa('gcc', ['-O2', '-static', '-o', app, APP_SOURCE], { timeout: 120_000 });
  await execa('gcc', ['-O2', '-pthread', '-o', floorBin, FLOOR_SOURCE], { timeout: 120_000 });

  const machine = await describeMachine(args.work);
  const samples: Sample[] = [];
  const infos: SizeInfo[] = [];
  for (const size of args.sizes) {
    const info = await benchSize(args, args.work, floorBin, app, size, samples);
    if (info) infos.push(info);
  }
  machine.loadavgEnd = os.loadavg().map((l) => Math.round(l * 100) / 100);
  const summaries = summarize(samples);
  const rs = ratios(summaries);
  const report = { machine, args: { ...args, out: undefined }, sizes: infos, summaries, ratios: rs, samples };
  if (args.out) await writeFile(args.out, `${JSON.stringify(report, null, 2)}\n`);
  if (args.json) process.stdout.write(`${JSON.stringify(report)}\n`);
  else process.stdout.write(`${table(machine, infos, summaries, rs, args)}\n`);
}

async function cleanup(): Promise<void> {
  for (const root of cleanupRoots) await deleteAllRunsc(root).catch(() => undefined);
}

process.once('SIGINT', () => {
  void cleanup().finally(() => process.exit(130));
});

main()
  .catch((err: unknown) => {
    process.stderr.write(`cpu-restore failed: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exitCode = 1;
  })
  .finally(cleanup);
