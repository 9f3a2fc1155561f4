/**
 * GPU machine benchmark of the overlapped restore (run by bench/pages/gpu.sh): the torch workload
 * of bench/gpu/workload.py as a host process, CUDA-checkpointed (thaw-cuda) and dumped with CRIU,
 * then restored per rep × cache × kind until the workload answers `ping` (one CUDA graph replay),
 * followed by a bit-exact `verify`:
 *
 *   naive       criu restore, then CUDA restore + unlock (platform.md's sequence, two copies in series)
 *   cuda-only   the floor: a plain criu restore is done first (untimed, every page in place), then
 *               only CUDA restore + unlock + ping are timed — the target is ≤ 1.2× this
 *   thaw        startLazyRestore (criu restore --lazy-pages + thaw's page server), the CUDA restore
 *               starts as soon as criu returns while pages are still arriving
 *   criu-lazy   the same with CRIU's own single-threaded `criu lazy-pages` daemon
 *
 *   node gpu.js --out DIR --work DIR --criu CRIU --thaw-cuda TC --python PY --workload workload.py
 *     --cases '[{"name":"p8","mode":"pattern","gib":8,"reps":3,"kinds":["naive","thaw"],"caches":["warm","cold"],
 *               "threads":[8],"orders":["file"]}]' [--budget-s 500]
 *
 * Results go to OUT/pages-gpu.json after every measurement (a run cut short still reports).
 */
import { spawn } from 'node:child_process';
import { closeSync, existsSync, openSync, readFileSync, statSync, truncateSync } from 'node:fs';
import { appendFile, mkdir, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Command } from 'commander';
import { execa } from 'execa';
import { CudaCheckpoint } from '../../src/gpu/cuda-checkpoint.js';
import type { FillOrder } from '../../src/restore/pages-image.js';
import { startLazyRestore, type LazyPagesResult } from '../../src/restore/pages.js';
import { jsonArray, positiveNumber } from '../common/options.js';

type Kind = 'naive' | 'cuda-only' | 'thaw' | 'criu-lazy';
interface CaseSpec {
  name: string;
  /** cpu: workload.py without a GPU (no CUDA calls) — tries this flow on any machine. */
  mode: 'pattern' | 'qwen' | 'cpu';
  gib: number;
  weights?: string;
  kvGib?: number;
  reps: number;
  kinds: Kind[];
  caches: ('warm' | 'cold')[];
  /** Page server threads to try (thaw kind). */
  threads?: number[];
  orders?: FillOrder[];
  chunkKib?: number;
  direct?: boolean;
}

type Json = null | boolean | number | string | Json[] | { [k: string]: Json };
type Row = Record<string, Json>;

interface Args {
  out: string;
  work: string;
  criu: string;
  thawCuda: string;
  python: string;
  workload: string;
  cases: CaseSpec[];
  budgetS: number;
}

const { out, work: workRoot, criu: criuPath, python, workload, thawCuda, budgetS, cases } = new Command('pages-gpu')
  .description('Overlapped restore on the GPU machine: naive, cuda-only, thaw and criu-lazy restores (run by bench/pages/gpu.sh)')
  .requiredOption('--out <dir>', 'results directory (pages-gpu.json, pages-gpu.log)')
  .requiredOption('--work <dir>', 'work directory (images, the command channel)')
  .requiredOption('--criu <path>', 'criu binary (or wrapper)')
  .requiredOption('--thaw-cuda <path>', 'thaw-cuda binary')
  .requiredOption('--python <path>', 'python for the workload')
  .requiredOption('--workload <file>', 'bench/gpu/workload.py')
  .requiredOption('--cases <json>', 'JSON array of cases ({name, mode, gib, reps, kinds, caches, threads, orders, ...})', jsonArray<CaseSpec>)
  .option('--budget-s <s>', 'time budget; restores that would not fit are skipped', positiveNumber, 500)
  .parse(process.argv)
  .opts<Args>();
const cuda = new CudaCheckpoint({ path: thawCuda });
const deadline = Date.now() + budgetS * 1000;
const rows: Row[] = [];

const now = () => Date.now() / 1000;
const r3 = (x: number) => Math.round(x * 1000) / 1000;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function log(msg: string): Promise<void> {
  const line = `[${new Date().toISOString().slice(11, 23)}] ${msg}`;
  console.log(line);
  await appendFile(join(out, 'pages-gpu.log'), `${line}\n`);
}

async function record(row: Row): Promise<void> {
  row.thp = (/\[(\w+)\]/.exec(readFileSync('/sys/kernel/mm/transparent_hugepage/enabled', 'utf8'))?.[1]) ?? '';
  rows.push(row);
  await writeFile(join(out, 'pages-gpu.json'), JSON.stringify(rows, null, 1));
  await log(`RESULT ${JSON.stringify(row)}`);
}

async function criu(args: string[], signal?: AbortSignal): Promise<void> {
  const r = await execa(criuPath, args, { reject: false, all: true, stdin: 'ignore', timeout: 900_000, ...(signal ? { cancelSignal: signal } : {}) });
  if (r.failed) throw new Error(`criu ${args[0]} failed (${r.exitCode}): ${String(r.all).slice(-1500)}`);
}

async function gone(pid: number, timeoutMs = 60_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (existsSync(`/proc/${pid}`)) {
    if (Date.now() > end) throw new Error(`pid ${pid} still there`);
    await sleep(20);
  }
}

async function killHard(pid: number): Promise<void> {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // gone already
  }
  await gone(pid);
}

/** The workload's file command channel (see workload.py). */
class Ctl {
  #seq = 0;
  constructor(readonly dir: string) {}
  async send(cmd: string, timeoutMs: number): Promise<{ resp: Row; t: number }> {
    const seq = String(++this.#seq).padStart(6, '0'); // one Ctl per workload: sequence numbers never repeat
    await writeFile(join(this.dir, `cmd-${seq}.tmp`), cmd);
    await rename(join(this.dir, `cmd-${seq}.tmp`), join(this.dir, `cmd-${seq}`));
    const resp = join(this.dir, `resp-${seq}.json`);
    const end = Date.now() + timeoutMs;
    while (Date.now() < end) {
      if (existsSync(resp)) {
        const t = now();
        return { resp: JSON.parse(await readFile(resp, 'utf8')) as Row, t };
      }
      await sleep(2);
    }
    throw new Error(`no answer to ${cmd} within ${timeoutMs} ms`);
  }
}

async function runCase(spec: CaseSpec): Promise<void> {
  const base = join(workRoot, spec.name);
  await rm(base, { recursive: true, force: true });
  const ctlDir = join(base, 'ctl');
  const img = join(base, 'img');
  await mkdir(ctlDir, { recursive: true });
  await mkdir(img, { recursive: true });
  const logPath = join(base, 'workload.log');
  closeSync(openSync(logPath, 'a'));
  const wargs = [workload, '--ctl', ctlDir, '--mode', spec.mode, '--gib', String(spec.gib)];
  if (spec.weights) wargs.push('--weights', spec.weights);
  if (spec.kvGib !== undefined) wargs.push('--kv-gib', String(spec.kvGib));
  const starter = spawn('sh', ['-c', 'setsid "$@" </dev/null >>"$LOG" 2>&1 & echo $!', 'sh', python, ...wargs], {
    stdio: ['ignore', 'pipe', 'inherit'],
    env: { ...process.env, LOG: logPath, PYTHONUNBUFFERED: '1' },
  });
  const pid = Number(await new Promise<string>((res) => starter.stdout.on('data', (d: Buffer) => res(d.toString().trim()))));
  let ctl: Ctl;
  try {
    for (let i = 0; i < 6000 && !readFileSync(join(ctlDir, 'events.jsonl'), { encoding: 'utf8', flag: 'a+' }).includes('"ready"'); i++) await sleep(50);
    ctl = new Ctl(ctlDir);
    const v0 = await ctl.send('verify', 600_000);
    if (v0.resp.ok !== true) throw new Error(`verify before checkpoint: ${JSON.stringify(v0.resp)}`);
    const t0 = now();
    if (spec.mode !== 'cpu') {
      await cuda.lock(pid, 10_000);
      await cuda.checkpoint(pid);
    }
    const t1 = now();
    await criu(['dump', '-t', String(pid), '-D', img, '--shell-job', '-o', 'dump.log']);
    const t2 = now();
    await gone(pid);
    await sleep(1000);
    const logSize = statSync(logPath).size;
    const imageBytes = (await readdir(img)).reduce((s, n) => s + statSync(join(img, n)).size, 0);
    await record({ case: spec.name, step: 'checkpoint', cudaS: r3(t1 - t0), dumpS: r3(t2 - t1), imageBytes });

    const variants: { kind: Kind; threads: number; order: FillOrder }[] = [];
    for (const kind of spec.kinds) {
      if (kind === 'thaw') {
        for (const threads of spec.threads ?? [8]) for (const order of spec.orders ?? ['file']) variants.push({ kind, threads, order });
      } else variants.push({ kind, threads: 1, order: 'file' });
    }
    for (let rep = 0; rep < spec.reps; rep++) {
      for (const cache of spec.caches) {
        for (const v of variants) {
          const need = 30 + (imageBytes / 1e9) * (cache === 'cold' ? 1.5 : 1);
          if ((deadline - Date.now()) / 1000 < need) {
            await log(`${spec.name}: out of time, skipping ${v.kind}/${cache}/${rep}`);
            continue;
          }
          await restoreOnce(spec, { ...v, cache, rep }, { pid, img, base, ctl, logPath, logSize, imageBytes });
        }
      }
    }
  } finally {
    await killHard(pid).catch(() => undefined);
    await rm(img, { recursive: true, force: true });
  }
}

async function restoreOnce(
  spec: CaseSpec,
  v: { kind: Kind; threads: number; order: FillOrder; cache: 'warm' | 'cold'; rep: number },
  c: { pid: number; img: string; base: string; ctl: Ctl; logPath: string; logSize: number; imageBytes: number },
): Promise<void> {
  truncateSync(c.logPath, c.logSize); // CRIU reopens the log only at its dump-time size
  if (v.cache === 'cold') {
    await execa('sync');
    await writeFile('/proc/sys/vm/drop_caches', '3\n');
  } else {
    await execa('sh', ['-c', `cat ${c.img}/* > /dev/null`]);
  }
  const work = join(c.base, `work-${v.kind}-${v.cache}-${v.rep}-${v.threads}-${v.order}`);
  await mkdir(work, { recursive: true });
  const row: Row = { case: spec.name, step: 'restore', kind: v.kind, cache: v.cache, rep: v.rep, threads: v.threads, order: v.order };
  const restoreArgs = ['restore', '-D', c.img, '-W', work, '--shell-job', '--restore-detached', '-o', 'restore.log'];
  let daemon: ReturnType<typeof execa> | undefined;
  let lazy: Promise<LazyPagesResult> | undefined;
  try {
    if (v.kind === 'criu-lazy') {
      daemon = execa(criuPath, ['lazy-pages', '-D', c.img, '-W', work, '-o', 'lazy-pages.log'], { reject: false, stdin: 'ignore' });
      for (let i = 0; i < 2000 && !existsSync(join(work, 'lazy-pages.socket')); i++) await sleep(5);
    }
    // The floor: a plain restore has put every page in place (untimed); only the CUDA side counts.
    if (v.kind === 'cuda-only') await criu(restoreArgs);
    const t0 = now();
    if (v.kind === 'thaw') {
      const r = await startLazyRestore({
        imageDir: c.img,
        workDir: work,
        threads: v.threads,
        order: v.order,
        chunkBytes: (spec.chunkKib ?? 1024) * 1024,
        direct: spec.direct === true && v.cache === 'cold',
        hooks: {
          restore: (signal) => criu([...restoreArgs, '--lazy-pages'], signal),
          kill: async (pids) => {
            for (const p of new Set([...pids, c.pid])) await killHard(p);
          },
        },
      });
      lazy = r.done;
    } else if (v.kind !== 'cuda-only') {
      await criu(v.kind === 'criu-lazy' ? [...restoreArgs, '--lazy-pages'] : restoreArgs);
    }
    const t1 = now();
    if (spec.mode !== 'cpu') await cuda.restore(c.pid);
    const t2 = now();
    if (spec.mode !== 'cpu') await cuda.unlock(c.pid);
    const t3 = now();
    const ping = await c.ctl.send('ping', 600_000);
    row.restoreCmdS = r3(t1 - t0);
    row.cudaRestoreS = r3(t2 - t1);
    row.unlockS = r3(t3 - t2);
    row.toServingS = r3(ping.t - t0);
    if (lazy !== undefined) {
      const res = await lazy;
      row.allPagesS = r3(res.allPagesMs / 1000);
      row.fillS = r3(res.fillMs / 1000);
      const m = res.tasks[0]?.native.targets[0];
      row.faults = m?.faults ?? null;
      row.faultPages = m?.faultPagesCopied ?? null;
      row.lazyBytes = res.bytes;
      row.bytesRead = res.tasks[0]?.native.bytesRead ?? null;
    }
    const ver = await c.ctl.send('verify', 600_000);
    row.verify = ver.resp;
    row.ok = ver.resp.ok === true;
  } catch (err) {
    row.ok = false;
    row.error = (err as Error).message.slice(0, 3000);
    row.criuLogTail = (await readFile(join(work, 'restore.log'), 'utf8').catch(() => '')).split('\n').slice(-8).join('\n');
  } finally {
    await killHard(c.pid).catch(() => undefined);
    if (daemon !== undefined) row.daemonExit = (await daemon).exitCode ?? null;
    await sleep(1000);
    await rm(work, { recursive: true, force: true });
  }
  await record(row);
}

async function main(): Promise<void> {
  await mkdir(out, { recursive: true });
  await mkdir(workRoot, { recursive: true });
  for (const spec of cases) {
    if (Date.now() > deadline - 60_000) break;
    try {
      await runCase(spec);
    } catch (err) {
      await record({ case: spec.name, step: 'error', error: (err as Error).stack?.slice(0, 3000) ?? String(err) });
    }
  }
  await log('pages gpu flow done');
}

await main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
