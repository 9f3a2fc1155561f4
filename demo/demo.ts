/**
 * `npm run demo`: a real container cold-started, checkpointed, then restored, with timings.
 * Drives the `thaw` CLI exactly as a person would, on a bundle holding busybox-static and the
 * demo app (which "initialises" for a few seconds, fills memory with a pattern, then ticks).
 */
import { execFileSync, execFile } from 'node:child_process';
import { mkdir, readFile, rm } from 'node:fs/promises';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { buildBundle } from '../src/bundle/bundle.js';

const run = promisify(execFile);
const repo = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const thawBin = join(repo, 'bin', 'thaw');
const work = process.env.THAW_DEMO_DIR ?? '/var/tmp/thaw-demo';
const initMs = Number(process.env.THAW_DEMO_INIT_MS ?? 4000);
const mib = Number(process.env.THAW_DEMO_MIB ?? 1024);
const global = ['--root', join(work, 'state'), '--store', join(work, 'store'), '--json'];

async function thaw(...args: string[]): Promise<Record<string, unknown>> {
  const { stdout } = await run(thawBin, [...global, ...args], { maxBuffer: 1 << 20 });
  return JSON.parse(stdout.trim().split('\n').pop() ?? '{}') as Record<string, unknown>;
}

/** Resolves with the wall-clock ms at which `pattern` first appears in `file`. */
async function waitForLine(file: string, pattern: RegExp, timeoutMs = 120_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const text = await readFile(file, 'utf8').catch(() => '');
    const line = text.split('\n').find((l) => pattern.test(l));
    if (line) return line;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${pattern} in ${file}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

function s(ms: number): string {
  return `${(ms / 1000).toFixed(2)} s`;
}

async function main(): Promise<void> {
  await rm(work, { recursive: true, force: true });
  await mkdir(work, { recursive: true });
  const app = join(work, 'thaw-demo-app');
  execFileSync('gcc', ['-O2', '-static', '-o', app, join(repo, 'demo/app/thaw-demo-app.c')]);
  const bundle = await buildBundle({
    dir: join(work, 'bundle'),
    args: ['/app', '--init-ms', String(initMs), '--mib', String(mib), '--tick-ms', '100'],
    files: { [app]: '/app' },
  });
  console.log(`thaw demo: app initialises for ${initMs} ms, then fills ${mib} MiB; engine gvisor (runsc, systrap)\n`);

  // 1. Cold start: no snapshot exists yet.
  const coldOut = join(work, 'cold.log');
  const t0 = Date.now();
  const cold = await thaw('run', '--bundle', bundle, '--id', 'demo-cold', '--detach', '--output', coldOut);
  const ready = await waitForLine(coldOut, /^READY /);
  const coldReadyMs = Number(/t=(\d+)/.exec(ready)?.[1]) - t0;
  console.log(`1. cold start     decision=${cold.decision} (${cold.reason}); ready after ${s(coldReadyMs)}`);

  // 2. Checkpoint into the store under the container's compatibility key.
  await waitForLine(coldOut, /^TICK n=3 /);
  const t1 = Date.now();
  const ckpt = await thaw('checkpoint', 'demo-cold');
  const ckptMs = Date.now() - t1;
  console.log(`2. checkpoint     snapshot=${String(ckpt.snapshot).slice(0, 16)}… ${(Number(ckpt.bytes) / 2 ** 20).toFixed(0)} MiB in ${s(ckptMs)}`);
  await thaw('delete', '--force', 'demo-cold');

  // 3. Same bundle, new container: thaw finds the snapshot and restores it.
  const restoreOut = join(work, 'restored.log');
  const t2 = Date.now();
  const restored = await thaw('run', '--bundle', bundle, '--id', 'demo-restored', '--detach', '--output', restoreOut);
  const tick = await waitForLine(restoreOut, /^TICK /);
  const restoreReadyMs = Number(/t=(\d+)/.exec(tick)?.[1]) - t2;
  console.log(`3. restore        decision=${restored.decision}; serving again after ${s(restoreReadyMs)} (ticks go on from ${/n=(\d+)/.exec(tick)?.[1]})`);

  // 4. The restored app checks every byte of its memory.
  await thaw('kill', 'demo-restored', 'SIGUSR1');
  const verify = await waitForLine(restoreOut, /^VERIFY /);
  console.log(`4. memory check   ${verify.split(' ').slice(0, 2).join(' ')} (${mib} MiB compared with the pattern)`);
  await thaw('delete', '--force', 'demo-restored');

  const timings = restored.timings as Record<string, number> | undefined;
  console.log(`\ncold-to-ready ${s(coldReadyMs)}  vs  restore-to-ready ${s(restoreReadyMs)}  →  ${(coldReadyMs / restoreReadyMs).toFixed(1)}× faster`);
  if (timings) console.log(`restore phases (ms): ${JSON.stringify(timings)}`);
  if (!verify.includes('OK')) process.exitCode = 1;
}

main().catch((err: unknown) => {
  console.error(`demo failed: ${err instanceof Error ? err.message : String(err)}`);
  const stderr = (err as { stderr?: string }).stderr;
  if (stderr) console.error(stderr);
  process.exitCode = 1;
});
