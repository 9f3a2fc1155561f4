/**
 * Terminal (pty) tasks through a real containerd and runsc: `ctr run -t` and `ctr task exec -t` run
 * the command on a terminal, carry input and output through it, report the exit status, the size
 * ctr sends with ResizePty (its own terminal's, set with stty under `script`) reaches the program,
 * and ctr returns within seconds of the exit while its input is still open — also when a
 * background job of an exec keeps the terminal open. ctr insists on a terminal of its own for -t,
 * so it runs under util-linux `script`.
 * Gated by THAW_INTEGRATION=1; needs root, containerd, ctr, runsc, busybox-static, script.
 */
import { spawn } from 'node:child_process';
import { symlink } from 'node:fs/promises';
import path from 'node:path';
import t, { type Test } from 'tap';
import { loadConsoleAddon } from '../../src/task/console.js';
import { ContainerdHarness, commandExists, containerdVersions, integrationSkipReason } from '../helpers/containerd.js';
import { buildOciImage, buildRootfs, imageToolsMissing } from '../helpers/oci-image.js';

const IMAGE = 'localhost/thaw-it-tty:1';

const skip =
  integrationSkipReason() ??
  imageToolsMissing() ??
  (commandExists('script') ? undefined : 'util-linux script is not installed') ??
  (loadConsoleAddon().binding ? undefined : 'the console addon is not built (npm run build:native)');

const version = containerdVersions()[0];
/** The program prints this right before it exits; ctr's return is timed from it. */
const BYE = 'BYE-NOW';
/** ctr must return this soon after the program's last output (measured: 0.1-0.7 s; a hang lasted until the kill). */
const RETURN_WITHIN_MS = 8_000;
/** How long one ctr command may take before it is killed. */
const CTR_TIMEOUT_MS = 40_000;

interface TerminalResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** What the terminal showed, CRs dropped. */
  out: string;
  err: string;
  /** From the first output holding BYE to script's exit (undefined when BYE never came). */
  afterByeMs: number | undefined;
  timedOut: boolean;
}

t.test('terminal tasks under containerd (ctr -t)', { skip: skip ?? version?.skip ?? (version ? false : 'no containerd') }, (t) => terminal(t));

/** Single-quotes a word for sh. */
function sq(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

async function terminal(t: Test): Promise<void> {
  const h = await ContainerdHarness.start(t.teardown.bind(t), { ...version!.options, prefix: 'thaw-tty-' });
  const rootfs = await buildRootfs({ dir: path.join(h.dir, 'rootfs') });
  for (const applet of ['stty', 'tty', 'test']) await symlink('busybox', path.join(rootfs, 'bin', applet));
  const image = await buildOciImage({ workDir: path.join(h.dir, 'image'), rootfs, name: IMAGE, cmd: ['/bin/sh'], out: path.join(h.dir, 'image.tar') });
  await h.importImage(image.tar);

  /**
   * ctr ARGS on a `rows`×`cols` terminal made by `script`, `input` typed into it after a second;
   * the input stays open until ctr has returned (EOF would end the session early).
   *
   * The feed runs as bash's process substitution on fd 3, not in script's own redirection: a
   * redirection's process substitution is forked by the child that then execs script, so it would
   * be script's child, and script (util-linux 2.38) waits for all its children after the session
   * ends — a feed that lives as long as script would then hold ctr's terminal session forever.
   */
  const onTerminal = (args: readonly string[], o: { rows: number; cols: number; input?: string }): Promise<TerminalResult> => {
    const ctr = [h.ctrBin, '--address', h.grpc, ...args].map(sq).join(' ');
    const feed = `{ exec 2>/dev/null; sleep 1; printf %s ${sq(o.input ?? '')}; while kill -0 $$; do sleep 0.2; done; }`;
    const session = `exec 3< <(${feed}); script -qfec ${sq(`stty rows ${o.rows} cols ${o.cols}; exec ${ctr}`)} /dev/null <&3`;
    return new Promise((resolve, reject) => {
      const child = spawn('bash', ['-c', session], { stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      let err = '';
      let byeAt: number | undefined;
      let timedOut = false;
      child.stdout.on('data', (c: Buffer) => {
        out += c.toString();
        if (byeAt === undefined && out.includes(BYE)) byeAt = performance.now();
      });
      child.stderr.on('data', (c: Buffer) => (err += c.toString()));
      const timer = setTimeout(() => {
        timedOut = true;
        child.kill('SIGKILL');
      }, CTR_TIMEOUT_MS);
      child.once('error', (e) => {
        clearTimeout(timer);
        reject(e);
      });
      // Timed at the exit; the result waits for the close, when all output has been read.
      let exitAt = 0;
      child.once('exit', () => (exitAt = performance.now()));
      child.once('close', (code, signal) => {
        clearTimeout(timer);
        const afterByeMs = byeAt === undefined ? undefined : Math.round((exitAt || performance.now()) - byeAt);
        resolve({ code, signal, out: out.replace(/\r/g, ''), err, afterByeMs, timedOut });
      });
    });
  };
  /** ctr returned with `code`, soon after the program's last words. */
  const returnedPromptly = (t: Test, r: TerminalResult, code: number, what: string): void => {
    t.notOk(r.timedOut, `${what}: ctr returned before the ${CTR_TIMEOUT_MS} ms kill`);
    t.equal(r.code, code, `${what}: exit status through ctr (stderr: ${r.err.trim()})`);
    t.ok(r.afterByeMs !== undefined && r.afterByeMs < RETURN_WITHIN_MS, `${what}: ctr returned ${r.afterByeMs} ms after the program's last output`);
  };
  const runT = (id: string, cmd: string, o: { rows: number; cols: number; input?: string }): Promise<TerminalResult> => {
    h.track(id);
    return onTerminal(
      ['run', '-t', '--rm', '--fifo-dir', h.fifoDir, '--runtime', 'io.containerd.thaw.v2', '--runtime-config-path', h.thawConfigPath, IMAGE, id, 'sh', '-c', cmd],
      o,
    );
  };
  // ctr sends ResizePty right after Start: wait for it rather than race it.
  const waitSize = (rows: number, cols: number): string =>
    `i=0; while [ "$(stty size)" != "${rows} ${cols}" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done; echo "SIZE=$(stty size)"`;

  await t.test('ctr run -t: a terminal, the size ctr sends, input, output and the exit status', async (t) => {
    const started = Date.now();
    const r = await runT('it-tty', `test -t 0 && test -t 1 && echo ISATTY; echo "TTY=$(tty)"; ${waitSize(33, 111)}; read line; echo "GOT=$line"; echo ${BYE}; exit 5`, {
      rows: 33,
      cols: 111,
      input: 'hello\n',
    });
    t.comment(`ctr run -t took ${Date.now() - started} ms, returned ${r.afterByeMs} ms after the last output; output: ${JSON.stringify(r.out)}`);
    returnedPromptly(t, r, 5, 'ctr run -t');
    t.match(r.out, /ISATTY\n/, 'stdin and stdout are a terminal');
    t.match(r.out, /SIZE=33 111\n/, 'ResizePty reached the program');
    t.match(r.out, /GOT=hello\n/, 'input went through the pty');
    // gVisor's terminal is the host pty's slave behind the sentry: ttyname() finds no /dev/pts name.
    t.match(r.out, /TTY=(\/dev\/pts\/\d+|not a tty)\n/);
    t.same(await h.runscSandboxes(), [], 'no runsc sandbox left');
  });

  await t.test('ctr task exec -t into a running task, with its own size', async (t) => {
    const id = h.track('it-tty-exec');
    const run = await h.runThaw({ id, image: IMAGE, args: ['sleep', '120'], logFile: path.join(h.dir, 'it-tty-exec.log') });
    t.equal(run.code, 0, run.err);
    t.teardown(async () => {
      await h.ctr(['tasks', 'kill', '-s', 'SIGKILL', id]);
      await h.ctr(['tasks', 'delete', '-f', id]);
      await h.ctr(['containers', 'delete', id]);
    });
    await h.waitForTaskStatus(id, 'RUNNING');
    const r = await onTerminal(['task', 'exec', '-t', '--exec-id', 'sh1', id, 'sh', '-c', `test -t 0 && echo ISATTY; ${waitSize(21, 72)}; read w; echo "GOT=$w"; echo ${BYE}; exit 3`], {
      rows: 21,
      cols: 72,
      input: 'exec-input\n',
    });
    t.comment(`ctr task exec -t returned ${r.afterByeMs} ms after the last output`);
    returnedPromptly(t, r, 3, 'ctr task exec -t');
    t.match(r.out, /ISATTY\n/);
    t.match(r.out, /SIZE=21 72\n/);
    t.match(r.out, /GOT=exec-input\n/);
    t.equal(await h.taskStatus(id), 'RUNNING', 'the task itself kept running');

    // A background job keeps the exec's terminal open inside the sandbox, so its pty never hangs
    // up: the exec's exit must still end ctr's session.
    const bg = await onTerminal(['task', 'exec', '-t', '--exec-id', 'sh2', id, 'sh', '-c', `sleep 300 & echo ${BYE}; exit 4`], { rows: 24, cols: 80 });
    t.comment(`ctr task exec -t with a background job returned ${bg.afterByeMs} ms after the last output`);
    returnedPromptly(t, bg, 4, 'ctr task exec -t, background job left');
    t.equal(await h.taskStatus(id), 'RUNNING', 'the task itself kept running');
  });
}
