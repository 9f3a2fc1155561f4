/**
 * GPU snapshot benchmark flows for the GPU machine (driven by bench/gpu/run-all.sh, one device
 * call). For each case (a workload size) it measures, with the workload in a runc container:
 *
 *   cold start     fresh container → workload ready → first request served (warm and cold page cache)
 *   checkpoint     GpuDriver.beforeCheckpoint (CUDA lock + checkpoint) + `runc checkpoint` (CRIU dump)
 *   restore        `runc restore` (CRIU) then the CUDA restore + unlock, until the first request is
 *                  served, then a bit-exact verify; "thaw" drives the CUDA side through GpuDriver
 *                  (discovery by state, device map, undo log), "naive" calls thaw-cuda restore/unlock
 *                  on the init pid directly — the sequence of platform.md. Cold = after drop_caches.
 *
 * Results go to OUT/results.json after every measurement, so a run cut short still reports.
 */
import { spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { appendFile, mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Command, Option } from 'commander';
import { execa } from 'execa';
import { CudaCheckpoint } from '../../src/gpu/cuda-checkpoint.js';
import { GpuDriver, type GpuSnapshotRecord } from '../../src/gpu/driver.js';
import { commaList, jsonArray, positiveNumber } from '../common/options.js';

/** thaw: GpuDriver; naive: thaw-cuda restore + unlock of the init pid; naive-noinit: the same without cuInit. */
type RestoreKind = 'thaw' | 'naive' | 'naive-noinit';

interface CaseSpec {
  name: string;
  /** cpu: no GPU, for trying the container/CRIU plumbing on any machine. */
  mode: 'pattern' | 'qwen' | 'cpu';
  gib: number;
  weights?: string;
  kvGib?: number;
  reps: number;
  coldStarts: boolean;
  /** Which restore kinds to run per rep. */
  kinds: RestoreKind[];
  caches: ('cold' | 'warm')[];
}

interface Args {
  out: string;
  work: string;
  runc: string;
  criu: string;
  thawCuda: string;
  python: string;
  workload: string;
  /** Host mounts to bind into the container at the same path (python/torch outside the root fs). */
  binds: string[];
  deadline: number;
  cases: CaseSpec[];
}

type Json = null | boolean | number | string | Json[] | { [k: string]: Json };
type Row = Record<string, Json>;

const results: Row[] = [];
let args: Args;

function now(): number {
  return Date.now() / 1000;
}

function r3(x: number): number {
  return Math.round(x * 1000) / 1000;
}

async function log(msg: string): Promise<void> {
  const line = `[${new Date().toISOString().slice(11, 23)}] ${msg}`;
  console.log(line);
  await appendFile(join(args.out, 'flow.log'), `${line}\n`);
}

let thp = '';

async function record(row: Row): Promise<void> {
  if (thp !== '') row.thp = thp;
  results.push(row);
  await writeFile(join(args.out, 'results.json'), JSON.stringify(results, null, 1));
  await log(`RESULT ${JSON.stringify(row)}`);
}

function secondsLeft(): number {
  return (args.deadline - Date.now()) / 1000;
}

async function sh(cmd: string, argv: string[], timeoutMs = 600_000): Promise<string> {
  const r = await execa(cmd, argv, { timeout: timeoutMs, reject: false, all: true, stdin: 'ignore' });
  if (r.failed) throw new Error(`${cmd} ${argv.join(' ')} failed (exit ${r.exitCode}): ${String(r.all ?? '').slice(-3000)}`);
  return typeof r.stdout === 'string' ? r.stdout : '';
}

async function dropCaches(): Promise<void> {
  await sh('sync', []);
  await writeFile('/proc/sys/vm/drop_caches', '3\n');
}

async function warmFiles(dir: string): Promise<void> {
  // Reads every image file once so the restore finds it in the page cache.
  await sh('sh', ['-c', `cat ${dir}/* > /dev/null`]);
}

async function duBytes(dir: string): Promise<number> {
  const out = await sh('du', ['-sb', dir]);
  return Number(out.split(/\s+/)[0]);
}

// ---- the workload's command channel (files in a bind-mounted directory) ----
class Ctl {
  #seq = 0;
  constructor(readonly dir: string) {}

  async reset(): Promise<void> {
    await rm(this.dir, { recursive: true, force: true });
    await mkdir(this.dir, { recursive: true });
  }

  /** Sends one command; resolves with the response and the wall time it appeared. */
  async send(cmd: string, timeoutMs: number): Promise<{ resp: Row; tSeen: number }> {
    const seq = String(++this.#seq).padStart(6, '0');
    const tmp = join(this.dir, `cmd-${seq}.tmp`);
    await writeFile(tmp, cmd);
    await rename(tmp, join(this.dir, `cmd-${seq}`));
    const resp = join(this.dir, `resp-${seq}.json`);
    const end = Date.now() + timeoutMs;
    while (Date.now() < end) {
      if (existsSync(resp)) {
        const tSeen = now();
        return { resp: JSON.parse(await readFile(resp, 'utf8')) as Row, tSeen };
      }
      await sleep(2);
    }
    throw new Error(`no answer to ${cmd} within ${timeoutMs} ms`);
  }

  async waitEvent(name: string, since: number, timeoutMs: number): Promise<Row> {
    const end = Date.now() + timeoutMs;
    const file = join(this.dir, 'events.jsonl');
    while (Date.now() < end) {
      const text = await readFile(file, 'utf8').catch(() => '');
      for (const line of text.split('\n')) {
        let ev: Row;
        try {
          ev = JSON.parse(line) as Row; // a line being appended right now may be partial
        } catch {
          continue;
        }
        if (ev.event === name && typeof ev.t === 'number' && ev.t >= since) return ev;
      }
      await sleep(10);
    }
    throw new Error(`workload did not report ${name} within ${timeoutMs} ms`);
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

// ---- runc container ----
interface NvidiaNode {
  path: string;
  major: number;
  minor: number;
}

function nvidiaNodes(): NvidiaNode[] {
  return readdirSync('/dev')
    .filter((n) => n.startsWith('nvidia'))
    .map((n) => join('/dev', n))
    .filter((p) => statSync(p).isCharacterDevice())
    .map((p) => {
      const rdev = statSync(p).rdev;
      return { path: p, major: Math.floor(rdev / 256) & 0xfff, minor: (rdev & 0xff) | ((rdev >> 12) & 0xfff00) };
    });
}

class Container {
  readonly bundle: string;
  readonly root: string;
  constructor(
    readonly id: string,
    base: string,
  ) {
    this.bundle = join(base, 'bundle');
    this.root = join(base, 'runc-root');
  }

  async prepare(spec: CaseSpec, ctl: Ctl, dataDir: string): Promise<void> {
    const rootfs = join(this.bundle, 'rootfs');
    const upper = join(this.bundle, 'upper');
    const work = join(this.bundle, 'ovl-work');
    await mkdir(rootfs, { recursive: true });
    await mkdir(upper, { recursive: true });
    await mkdir(work, { recursive: true });
    await mkdir(this.root, { recursive: true });
    // Overlay over the host's /: the image's python + torch without building a rootfs.
    await sh('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=/,upperdir=${upper},workdir=${work}`, rootfs]);
    const nodes = nvidiaNodes();
    const argv = [args.python, args.workload, '--ctl', ctl.dir, '--mode', spec.mode, '--gib', String(spec.gib)];
    if (spec.weights) argv.push('--weights', spec.weights);
    if (spec.kvGib !== undefined) argv.push('--kv-gib', String(spec.kvGib));
    // The host's environment (the image's python works with it), the driver's libraries first.
    const env = Object.entries(process.env)
      .filter(([k, v]) => v !== undefined && !k.startsWith('NODE') && k !== 'LD_PRELOAD' && k !== 'LD_LIBRARY_PATH')
      .map(([k, v]) => `${k}=${v}`);
    const hostLd = (process.env.LD_LIBRARY_PATH ?? '').split(':').filter((p) => p !== '' && p !== '/usr/local/nvidia/lib64');
    env.push(`LD_LIBRARY_PATH=${['/usr/local/nvidia/lib64', ...hostLd].join(':')}`, 'PYTHONUNBUFFERED=1');
    const caps = ['CAP_CHOWN', 'CAP_DAC_OVERRIDE', 'CAP_FOWNER', 'CAP_KILL', 'CAP_SETGID', 'CAP_SETUID', 'CAP_SYS_NICE'];
    const config = {
      ociVersion: '1.0.2',
      process: {
        terminal: false,
        user: { uid: 0, gid: 0 },
        args: argv,
        env,
        cwd: '/tmp',
        capabilities: { bounding: caps, effective: caps, permitted: caps },
        noNewPrivileges: true,
      },
      root: { path: 'rootfs', readonly: false },
      hostname: 'thaw-bench',
      mounts: [
        { destination: '/proc', type: 'proc', source: 'proc' },
        { destination: '/dev', type: 'tmpfs', source: 'tmpfs', options: ['nosuid', 'strictatime', 'mode=755', 'size=65536k'] },
        { destination: '/dev/pts', type: 'devpts', source: 'devpts', options: ['nosuid', 'noexec', 'newinstance', 'ptmxmode=0666', 'mode=0620'] },
        { destination: '/dev/shm', type: 'tmpfs', source: 'shm', options: ['nosuid', 'noexec', 'nodev', 'mode=1777', 'size=1g'] },
        { destination: '/dev/mqueue', type: 'mqueue', source: 'mqueue', options: ['nosuid', 'noexec', 'nodev'] },
        { destination: '/sys', type: 'sysfs', source: 'sysfs', options: ['nosuid', 'noexec', 'nodev', 'ro'] },
        ...(existsSync('/usr/local/nvidia') ? [{ destination: '/usr/local/nvidia', type: 'bind', source: '/usr/local/nvidia', options: ['rbind', 'ro'] }] : []),
        ...args.binds.map((b) => ({ destination: b, type: 'bind', source: b, options: ['rbind', 'ro'] })),
        { destination: ctl.dir, type: 'bind', source: ctl.dir, options: ['rbind', 'rw'] },
        { destination: dataDir, type: 'bind', source: dataDir, options: ['rbind', 'ro'] },
      ],
      linux: {
        namespaces: [{ type: 'pid' }, { type: 'ipc' }, { type: 'uts' }, { type: 'mount' }],
        cgroupsPath: `/thaw-bench/${this.id}`,
        devices: nodes.map((n) => ({ path: n.path, type: 'c', major: n.major, minor: n.minor, fileMode: 0o666, uid: 0, gid: 0 })),
        resources: {
          devices: [{ allow: false, access: 'rwm' }, ...nodes.map((n) => ({ allow: true, type: 'c', major: n.major, minor: n.minor, access: 'rwm' }))],
        },
      },
    };
    await writeFile(join(this.bundle, 'config.json'), JSON.stringify(config, null, 1));
  }

  /**
   * Runs `runc <verb> … -d` with the container's stdio on anonymous pipes (CRIU records them as
   * external `pipe:[ino]` fds and runc re-inherits them on restore). Node's 'pipe' stdio would be
   * unix socketpairs, which CRIU refuses as external sockets, so bash makes the pipes: stdin reads
   * an empty pipe, stdout + stderr go to a `cat` appending to container.log, which lives as long as
   * the container holds the pipe.
   */
  async detached(verbArgs: string[]): Promise<void> {
    const logFile = join(args.out, 'container.log');
    await appendFile(logFile, `--- runc ${verbArgs[0]} ${new Date().toISOString()}\n`);
    const script = 'exec "$@" < <(:) > >(exec cat >> "$THAW_LOG") 2>&1';
    const child = spawn('bash', ['-c', script, 'runc', args.runc, '--root', this.root, '--criu', args.criu, ...verbArgs], {
      stdio: 'ignore',
      env: { ...process.env, THAW_LOG: logFile },
    });
    const code = await new Promise<number>((resolve) => child.on('exit', (c) => resolve(c ?? -1)));
    if (code !== 0) {
      await sleep(100);
      const tail = (await readFile(logFile, 'utf8').catch(() => '')).split('\n').slice(-20).join('\n');
      throw new Error(`runc ${verbArgs[0]} exited ${code}: ${tail}`);
    }
  }

  async run(): Promise<void> {
    await this.detached(['run', '-d', '-b', this.bundle, '--pid-file', join(this.bundle, 'init.pid'), this.id]);
  }

  async restore(image: string, work: string): Promise<void> {
    await mkdir(work, { recursive: true });
    await this.detached(
      ['restore', '-d', '--image-path', image, '--work-path', work, '-b', this.bundle, '--pid-file', join(this.bundle, 'init.pid'), this.id],
    );
  }

  async checkpoint(image: string, work: string): Promise<void> {
    await mkdir(image, { recursive: true });
    await mkdir(work, { recursive: true });
    await sh(args.runc, ['--root', this.root, '--criu', args.criu, 'checkpoint', '--image-path', image, '--work-path', work, this.id]);
  }

  initPid(): number {
    return Number(readFileSync(join(this.bundle, 'init.pid'), 'utf8').trim());
  }

  async pids(): Promise<number[]> {
    const out = await sh(args.runc, ['--root', this.root, 'ps', '--format', 'json', this.id]);
    return JSON.parse(out) as number[];
  }

  async remove(): Promise<void> {
    await execa(args.runc, ['--root', this.root, 'kill', this.id, 'KILL'], { reject: false, timeout: 30_000 });
    for (let i = 0; i < 200; i++) {
      const st = await execa(args.runc, ['--root', this.root, 'state', this.id], { reject: false, timeout: 30_000 });
      if (st.exitCode !== 0 || String(st.stdout).includes('"stopped"')) break;
      await sleep(25);
    }
    await execa(args.runc, ['--root', this.root, 'delete', '-f', this.id], { reject: false, timeout: 30_000 });
  }

  async unmount(): Promise<void> {
    await execa('umount', ['-l', join(this.bundle, 'rootfs')], { reject: false });
  }
}

// ---- one case ----
async function runCase(spec: CaseSpec, driver: GpuDriver): Promise<void> {
  const base = join(args.work, spec.name);
  // Never rm through a still-mounted overlay of / (a rerun on the same machine).
  await execa('umount', ['-l', join(base, 'bundle', 'rootfs')], { reject: false });
  await rm(base, { recursive: true, force: true });
  await mkdir(base, { recursive: true });
  const ctl = new Ctl(join(base, 'ctl'));
  await ctl.reset();
  const dataDir = join(args.work, 'data');
  await mkdir(dataDir, { recursive: true });
  const c = new Container(`tb-${spec.name}`, base);
  await c.prepare(spec, ctl, dataDir);
  const readyTimeout = 300_000;
  try {
    // Cold starts: a fresh container until the first request is served.
    if (spec.coldStarts) {
      for (const cache of spec.caches) {
        if (secondsLeft() < 60) break;
        if (cache === 'cold') await dropCaches();
        await ctl.reset();
        const t0 = now();
        await c.run();
        const ready = await ctl.waitEvent('ready', t0, readyTimeout);
        const ping = await ctl.send('ping', 60_000);
        await record({
          case: spec.name,
          step: 'coldStart',
          cache,
          toReadyS: r3(Number(ready.t) - t0),
          toServingS: r3(ping.tSeen - t0),
          importS: ready.importS ?? null,
          contextS: ready.contextS ?? null,
          loadS: ready.loadS ?? null,
          computeS: ready.computeS ?? null,
          gpuBytes: ready.gpuBytes ?? null,
          memReserved: ready.memReserved ?? null,
        });
        await c.remove();
      }
    }

    // The container to checkpoint.
    await ctl.reset();
    const t0 = now();
    await c.run();
    const ready = await ctl.waitEvent('ready', t0, readyTimeout);
    await log(`${spec.name}: ready in ${r3(Number(ready.t) - t0)} s (${JSON.stringify(ready)})`);
    const v0 = await ctl.send('verify', 300_000);
    if (v0.resp.ok !== true) throw new Error(`verify before checkpoint failed: ${JSON.stringify(v0.resp)}`);

    const image = join(base, 'image');
    const pidsBefore = await c.pids();
    const tc0 = now();
    const gpu = await driver.beforeCheckpoint(pidsBefore);
    const tc1 = now();
    try {
      await c.checkpoint(image, join(base, 'ckpt-work'));
    } catch (err) {
      await driver.resumeAfterCheckpoint(gpu).catch(() => undefined);
      const dumpLog = await readFile(join(base, 'ckpt-work', 'dump.log'), 'utf8').catch(() => '');
      throw new Error(`${err instanceof Error ? err.message : String(err)}\ndump.log tail:\n${dumpLog.split('\n').slice(-25).join('\n')}`);
    }
    const tc2 = now();
    await c.remove(); // runc's record of the stopped container
    await sleep(1000); // platform.md: let the old pids go before restoring
    const imageBytes = await duBytes(image);
    await record({
      case: spec.name,
      step: 'checkpoint',
      pids: pidsBefore,
      cudaPids: gpu.pids,
      gpuS: r3(tc1 - tc0),
      gpuTimingsMs: gpu.timings,
      runcCheckpointS: r3(tc2 - tc1),
      totalS: r3(tc2 - tc0),
      imageBytes,
      devices: gpu.devices,
    });
    await writeFile(join(base, 'gpu-record.json'), JSON.stringify(gpu));

    for (let rep = 0; rep < spec.reps; rep++) {
      for (const cache of spec.caches) {
        for (const kind of spec.kinds) {
          const need = 20 + (imageBytes / 1e9) * (cache === 'cold' ? 1.2 : 0.9);
          if (secondsLeft() < need) {
            await log(`${spec.name}: ${r3(secondsLeft())} s left, skipping ${kind}/${cache} rep ${rep}`);
            continue;
          }
          await restoreOnce(spec, c, ctl, driver, gpu, image, { rep, cache, kind, base });
        }
      }
    }
  } finally {
    await c.remove().catch(() => undefined);
    await c.unmount();
    await rm(join(base, 'image'), { recursive: true, force: true });
  }
}

async function restoreOnce(
  spec: CaseSpec,
  c: Container,
  ctl: Ctl,
  driver: GpuDriver,
  gpu: GpuSnapshotRecord,
  image: string,
  o: { rep: number; cache: 'cold' | 'warm'; kind: RestoreKind; base: string },
): Promise<void> {
  if (o.cache === 'cold') await dropCaches();
  else await warmFiles(image);
  const work = join(o.base, `restore-work-${o.rep}-${o.cache}-${o.kind}`);
  const row: Row = { case: spec.name, step: 'restore', kind: o.kind, cache: o.cache, rep: o.rep };
  const t0 = now();
  try {
    await c.restore(image, work);
    const t1 = now();
    row.runcRestoreS = r3(t1 - t0);
    if (o.kind === 'thaw') {
      const pids = await c.pids();
      const t2 = now();
      const res = await driver.restoreProcesses(gpu, pids);
      const t3 = now();
      row.psS = r3(t2 - t1);
      row.gpuS = r3(t3 - t2);
      row.gpuTimingsMs = res.timings;
      row.cudaPids = res.pids;
    } else if (gpu.pids.length > 0) {
      // The shortest CLI sequence: restore + unlock of the init pid (a one-process workload).
      const pid = c.initPid();
      const cuda = args.thawCuda;
      const env = o.kind === 'naive-noinit' ? { THAW_CUDA_NO_INIT: '1' } : {};
      const a = await execa(cuda, ['--json', '--action', 'restore', '--pid', String(pid)], { reject: false, all: true, env });
      const t2 = now();
      const b = await execa(cuda, ['--json', '--action', 'unlock', '--pid', String(pid)], { reject: false, all: true });
      const t3 = now();
      if (a.failed || b.failed) throw new Error(`thaw-cuda restore/unlock failed: ${String(a.all)} ${String(b.all)}`);
      row.cudaRestoreS = r3(t2 - t1);
      row.cudaUnlockS = r3(t3 - t2);
      row.cudaRestoreJson = String(a.stdout).trim();
      row.gpuS = r3(t3 - t1);
    }
    const ping = await ctl.send('ping', 120_000);
    row.toServingS = r3(ping.tSeen - t0);
    const v = await ctl.send('verify', 300_000);
    row.verify = v.resp;
    row.ok = v.resp.ok === true;
  } catch (err) {
    row.ok = false;
    row.error = err instanceof Error ? err.message.slice(0, 3000) : String(err);
    const restoreLog = join(work, 'restore.log');
    if (existsSync(restoreLog)) row.criuLogTail = (await readFile(restoreLog, 'utf8')).split('\n').slice(-15).join('\n');
  } finally {
    await c.remove().catch(() => undefined);
    await sleep(500);
    await rm(work, { recursive: true, force: true });
  }
  await record(row);
}

// ---- main ----
function parseArgs(argv: string[]): Args {
  const o = new Command('flow')
    .description('GPU snapshot benchmark flows in runc containers (driven by bench/gpu/run-all.sh)')
    .requiredOption('--out <dir>', 'results directory (results.json, flow.log, container.log)')
    .requiredOption('--work <dir>', 'work directory (bundles, images, the command channel)')
    .requiredOption('--runc <path>', 'runc binary')
    .requiredOption('--criu <path>', 'criu binary (or wrapper)')
    .requiredOption('--thaw-cuda <path>', 'thaw-cuda binary')
    .requiredOption('--python <path>', 'python for the workload')
    .requiredOption('--workload <file>', 'bench/gpu/workload.py')
    .requiredOption('--cases <json>', 'JSON array of cases ({name, mode, gib, reps, coldStarts, kinds, caches, ...})', jsonArray<CaseSpec>)
    .addOption(new Option('--binds <dir,...>', 'host mounts to bind into the container at the same path').argParser(commaList).default([], 'none'))
    .option('--budget-s <s>', 'time budget; steps that would not fit are skipped', positiveNumber, 540)
    .parse(argv, { from: 'user' })
    .opts<Omit<Args, 'deadline'> & { budgetS: number }>();
  const { budgetS, ...rest } = o;
  return { ...rest, deadline: Date.now() + budgetS * 1000 };
}

async function main(): Promise<void> {
  args = parseArgs(process.argv.slice(2));
  await mkdir(args.out, { recursive: true });
  // Transparent huge pages decide how many page faults a restore takes: tag every row with the mode.
  thp = (/\[(\w+)\]/.exec(readFileSync('/sys/kernel/mm/transparent_hugepage/enabled', 'utf8'))?.[1]) ?? '';
  const cuda = new CudaCheckpoint({ path: args.thawCuda });
  const driver = new GpuDriver({ cuda, lockTimeoutMs: 10_000 });
  const avail = await driver.probe();
  await record({ step: 'probe', enabled: avail.enabled, detail: JSON.parse(JSON.stringify(avail)) as Json });
  if (!avail.enabled && !args.cases.every((c) => c.mode === 'cpu')) return;
  for (const spec of args.cases) {
    if (secondsLeft() < 45) {
      await log(`out of time before case ${spec.name}`);
      break;
    }
    try {
      await runCase(spec, driver);
    } catch (err) {
      await record({ case: spec.name, step: 'error', error: err instanceof Error ? (err.stack ?? err.message).slice(0, 4000) : String(err) });
    }
  }
  await log('flow done');
}

await main().catch(async (err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
