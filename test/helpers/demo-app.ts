import { join } from 'node:path';
import { execa } from 'execa';
import { buildBundle } from '../../src/bundle/bundle.js';
import { REPO } from './thaw-cli.js';

/**
 * The demo app (demo/app/thaw-demo-app.c) built statically, and bundles running it: the workload of
 * the integration tests and the benchmark. Its output lines: START, READY, TICK n=…, VERIFY OK|FAIL.
 */
export const DEMO_APP_SOURCE = join(REPO, 'demo', 'app', 'thaw-demo-app.c');

/** Compiles the demo app with `gcc -O2 -static` into `dir`; returns the binary's path. */
export async function buildDemoApp(dir: string): Promise<string> {
  const out = join(dir, 'thaw-demo-app');
  await execa('gcc', ['-O2', '-static', '-o', out, DEMO_APP_SOURCE], { timeout: 120_000 });
  return out;
}

export interface DemoAppArgs {
  /** Memory filled with the pattern (MiB). */
  mib: number;
  /** Simulated initialisation before filling memory. */
  initMs?: number;
  tickMs?: number;
  /** Pattern seed: different seeds give different args, hence different snapshot keys. */
  seed?: number;
  exitAfterTicks?: number;
  exitCode?: number;
  /** Also listen on 127.0.0.1:PORT (TCP), as a server would. */
  listenPort?: number;
}

export function demoAppArgv(a: DemoAppArgs): string[] {
  const argv = ['/app', '--mib', String(a.mib), '--init-ms', String(a.initMs ?? 100), '--tick-ms', String(a.tickMs ?? 100)];
  if (a.seed !== undefined) argv.push('--seed', String(a.seed));
  if (a.exitAfterTicks !== undefined) argv.push('--exit-after-ticks', String(a.exitAfterTicks));
  if (a.exitCode !== undefined) argv.push('--exit-code', String(a.exitCode));
  if (a.listenPort !== undefined) argv.push('--listen-port', String(a.listenPort));
  return argv;
}

/** An OCI bundle at `dir`: busybox-static plus the app at /app, running it with `args`. */
export async function demoBundle(dir: string, app: string, args: DemoAppArgs): Promise<string> {
  return buildBundle({ dir, args: demoAppArgv(args), files: { [app]: '/app' } });
}
