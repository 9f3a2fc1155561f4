/**
 * CPU benchmark of anonymous-memory restore with CRIU 4.1.1: plain `criu restore` vs CRIU's own
 * lazy-pages daemon vs thaw's parallel page server (src/restore/pages.ts), on a process holding N
 * GiB of patterned memory (demo/app/thaw-demo-app.c).
 *
 *   npx tsc -p . && node dist/bench/pages/run.js --gib 1,4 --reps 3 [--modes plain,criu-lazy,thaw]
 *       [--caches warm,cold] [--threads 1,2] [--chunk-kib 1024] [--order file] [--work DIR] [--out FILE]
 *
 * Per size: start the app, time a SIGUSR1 verify of its memory (the app's own read cost), dump it
 * (`criu dump --shell-job`), then per rep × cache × mode: restore and send SIGUSR1 at once; the
 * clock stops when the app prints VERIFY OK — every byte of its memory present and checked.
 * `restoreS` = the restore command returned; `verifyS` = VERIFY OK; thaw adds `fillS` (all pages
 * in). Cold = `sync; echo 3 > drop_caches` first; warm = image files read once before.
 */
import { spawn } from 'node:child_process';
import { closeSync, existsSync, openSync, readFileSync, statSync, truncateSync } from 'node:fs';
import { mkdir, readdir, rm, writeFile } from 'node:fs/promises';
import { availableParallelism, loadavg } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Command, Option } from 'commander';
import { execa } from 'execa';
import { startLazyRestore, type LazyPagesResult } from '../../src/restore/pages.js';
import type { FillOrder } from '../../src/restore/pages-image.js';
import { commaChoices, gibSizes, positiveInt, positiveIntList } from '../common/options.js';

const MODES = ['plain', 'criu-lazy', 'thaw'] as const;
type Mode = (typeof MODES)[number];
const CACHES = ['warm', 'cold'] as const;
type Cache = (typeof CACHES)[number];
/** Every FillOrder, checked complete by the compiler. */
const FILL_ORDERS = Object.keys({ file: 0, 'small-first': 0, 'large-first': 0 } satisfies Record<FillOrder, 0>) as FillOrder[];

interface Args {
  gib: number[];
  reps: number;
  modes: Mode[];
  caches: Cache[];
  threads: number[];
  chunkKib: number;
  order: FillOrder;
  criu: string;
  work: string;
  out: string;
}

function parseArgs(argv: string[]): Args {
  const here = dirname(fileURLToPath(import.meta.url));
  const threads = Math.max(1, Math.min(8, availableParallelism() - 1));
  return new Command('pages')
    .description("Anonymous-memory restore with CRIU: plain criu restore vs CRIU's lazy-pages daemon vs thaw's page server")
    .addOption(new Option('--gib <gib,...>', 'memory the app holds, GiB').argParser(gibSizes).default([1], '1'))
    .option('--reps <n>', 'restores per mode and cache', positiveInt, 3)
    .addOption(new Option('--modes <list>', 'restore modes, comma-separated').argParser(commaChoices(MODES)).default([...MODES], MODES.join(',')))
    .addOption(new Option('--caches <list>', 'page-cache states, comma-separated').argParser(commaChoices(CACHES)).default([...CACHES], CACHES.join(',')))
    .addOption(new Option('--threads <n,...>', "thaw's page server threads to try").argParser(positiveIntList).default([threads], `${threads} (cores - 1, at most 8)`))
    .option('--chunk-kib <kib>', "thaw's read size", positiveInt, 1024)
    .addOption(new Option('--order <order>', "thaw's fill order").choices(FILL_ORDERS).default('file'))
    .option('--criu <path>', 'criu binary', '/opt/thaw/criu/bin/criu')
    .option('--work <dir>', 'work directory (removed first)', '/var/tmp/thaw-pages-bench')
    .option('--out <file>', 'results JSON', join(here, 'results.json'))
    .parse(argv, { from: 'user' })
    .opts<Args>();
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const now = () => performance.now() / 1000;
const r3 = (x: number) => Math.round(x * 1000) / 1000;

function alive(pid: number): boolean {
  return existsSync(`/proc/${pid}`);
}

async function gone(pid: number, timeoutMs = 20_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (alive(pid)) {
    if (Date.now() > end) throw new Error(`pid ${pid} did not go away`);
    await sleep(10);
  }
}

async function killHard(pid: number): Promise<void> {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // already gone
  }
  await gone(pid);
}

/** Waits for a line matching re in the app's log after byte offset `from`. */
async function waitLine(log: string, from: number, re: RegExp, timeoutMs: number): Promise<{ line: string; t: number }> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const text = readFileSync(log, 'utf8').slice(from);
    const m = text.split('\n').find((l) => re.test(l));
    if (m !== undefined) return { line: m, t: now() };
    if (Date.now() > end) throw new Error(`no ${re} in ${log} within ${timeoutMs} ms: ${text.slice(-500)}`);
    await sleep(2);
  }
}

async function dropCaches(): Promise<void> {
  await execa('sync');
  await writeFile('/proc/sys/vm/drop_caches', '3\n');
}

async function warm(dir: string): Promise<void> {
  await execa('sh', ['-c', `cat ${dir}/* > /dev/null`]);
}

async function criu(args: Args, argv: string[]): Promise<void> {
  const r = await execa(args.criu, argv, { reject: false, all: true, stdin: 'ignore', timeout: 600_000 });
  if (r.failed) throw new Error(`criu ${argv.join(' ')} failed: ${String(r.all).slice(-2000)}`);
}

interface Row {
  [k: string]: string | number | boolean | null;
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  const rows: Row[] = [];
  const save = async () => writeFile(args.out, JSON.stringify(rows, null, 1));
  await rm(args.work, { recursive: true, force: true });
  await mkdir(args.work, { recursive: true });
  const app = join(args.work, 'thaw-demo-app');
  const src = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..', 'demo', 'app', 'thaw-demo-app.c');
  await execa('gcc', ['-O2', '-o', app, existsSync(src) ? src : join(process.cwd(), 'demo', 'app', 'thaw-demo-app.c')]);

  for (const gib of args.gib) {
    const base = join(args.work, `g${gib}`);
    const img = join(base, 'img');
    const work = join(base, 'work');
    await mkdir(img, { recursive: true });
    await mkdir(work, { recursive: true });
    const log = join(base, 'app.log');
    closeSync(openSync(log, 'a'));
    // setsid, stdin /dev/null, stdout O_APPEND on a file: what CRIU restores without extra flags.
    const starter = spawn('sh', ['-c', `setsid "$0" --init-ms 0 --mib ${gib * 1024} --tick-ms 5 </dev/null >>"$1" 2>&1 & echo $!`, app, log], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    const pid = Number(await new Promise<string>((res) => starter.stdout.on('data', (d: Buffer) => res(d.toString().trim()))));
    await waitLine(log, 0, /^READY/, 300_000);
    // The app's own cost of reading its memory once (no restore involved).
    let off = statSync(log).size;
    const tv = now();
    process.kill(pid, 'SIGUSR1');
    const v0 = await waitLine(log, off, /^VERIFY/, 300_000);
    rows.push({ gib, step: 'baseline-verify', verifyS: r3(v0.t - tv), ok: v0.line.startsWith('VERIFY OK') });
    const td = now();
    await criu(args, ['dump', '-t', String(pid), '-D', img, '-W', work, '--shell-job', '-o', 'dump.log']);
    rows.push({ gib, step: 'dump', dumpS: r3(now() - td), imageBytes: (await readdir(img)).reduce((s, n) => s + statSync(join(img, n)).size, 0) });
    await gone(pid);
    await sleep(500);
    const logSize = statSync(log).size;
    console.log(JSON.stringify(rows.slice(-2)));
    await save();

    for (let rep = 0; rep < args.reps; rep++) {
      for (const cache of args.caches) {
        const runs = args.modes.flatMap((mode): { mode: Mode; threads: number }[] => (mode === 'thaw' ? args.threads.map((threads) => ({ mode, threads })) : [{ mode, threads: 1 }]));
        for (const { mode, threads } of runs) {
          truncateSync(log, logSize); // CRIU checks the size of files it reopens
          if (cache === 'cold') await dropCaches();
          else await warm(img);
          const row: Row = { gib, step: 'restore', mode, cache, rep, threads, load1: loadavg()[0]! };
          let daemon: ReturnType<typeof execa> | undefined;
          let lazy: Promise<LazyPagesResult> | undefined;
          const restoreArgv = ['restore', '-D', img, '-W', work, '--shell-job', '--restore-detached', '-o', `restore-${mode}.log`];
          try {
            if (mode === 'criu-lazy') {
              await rm(join(work, 'lazy-pages.socket'), { force: true });
              daemon = execa(args.criu, ['lazy-pages', '-D', img, '-W', work, '-o', 'lazy-pages.log'], { reject: false, stdin: 'ignore' });
              for (let i = 0; i < 1000 && !existsSync(join(work, 'lazy-pages.socket')); i++) await sleep(5);
            }
            const t0 = now();
            if (mode === 'thaw') {
              const r = await startLazyRestore({
                imageDir: img,
                workDir: work,
                threads,
                chunkBytes: args.chunkKib * 1024,
                order: args.order,
                hooks: {
                  restore: () => criu(args, [...restoreArgv, '--lazy-pages']),
                  kill: async (pids) => {
                    for (const p of pids) await killHard(p);
                  },
                },
              });
              lazy = r.done;
            } else {
              await criu(args, mode === 'criu-lazy' ? [...restoreArgv, '--lazy-pages'] : restoreArgv);
            }
            const t1 = now();
            process.kill(pid, 'SIGUSR1');
            const v = await waitLine(log, logSize, /^VERIFY/, 600_000);
            row.restoreS = r3(t1 - t0);
            row.verifyS = r3(v.t - t0);
            row.ok = v.line.startsWith('VERIFY OK');
            if (lazy !== undefined) {
              const res = await lazy;
              row.fillS = r3(res.fillMs / 1000);
              row.allPagesS = r3(res.allPagesMs / 1000);
              const tgt = res.tasks[0]?.native.targets[0];
              row.faults = tgt?.faults ?? null;
              row.faultPages = tgt?.faultPagesCopied ?? null;
              row.lazyBytes = res.bytes;
            }
          } catch (err) {
            row.ok = false;
            row.error = (err as Error).message.slice(0, 1500);
          } finally {
            await killHard(pid).catch(() => undefined);
            if (daemon !== undefined) {
              const d = await daemon;
              row.daemonExit = d.exitCode ?? null;
            }
            await sleep(300);
          }
          rows.push(row);
          console.log(JSON.stringify(row));
          await save();
        }
      }
    }
    await rm(base, { recursive: true, force: true });
  }
  summarize(rows);
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

function summarize(rows: Row[]): void {
  const groups = new Map<string, Row[]>();
  for (const r of rows.filter((x) => x.step === 'restore' && x.ok === true)) {
    const k = `${r.gib} GiB | ${r.mode}${r.mode === 'thaw' ? ` ×${r.threads}` : ''} | ${r.cache}`;
    groups.set(k, [...(groups.get(k) ?? []), r]);
  }
  console.log('| GiB | mode | cache | restore cmd s | → VERIFY OK s | thaw fill s | n |');
  console.log('|---|---|---|---|---|---|---|');
  for (const [k, rs] of groups) {
    const col = (f: string) => {
      const xs = rs.map((r) => r[f]).filter((x): x is number => typeof x === 'number');
      return xs.length ? `${r3(median(xs))} (${r3(Math.min(...xs))}–${r3(Math.max(...xs))})` : '–';
    };
    console.log(`| ${k.split(' | ').join(' | ')} | ${col('restoreS')} | ${col('verifyS')} | ${col('fillS')} | ${rs.length} |`);
  }
}

await main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
