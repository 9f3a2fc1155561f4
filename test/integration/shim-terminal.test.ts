/**
 * Terminal (pty) tasks through a real containerd and runsc: `ctr run -t` and `ctr task exec -t` run
 * the command on a terminal, carry input and output through it, report the exit status, and the
 * size ctr sends with ResizePty (its own terminal's, set with stty under `script`) reaches the
 * program. ctr insists on a terminal of its own for -t, so it runs under util-linux `script`.
 * Gated by THAW_INTEGRATION=1; needs root, containerd, ctr, runsc, busybox-static, script.
 */
import { symlink } from 'node:fs/promises';
import path from 'node:path';
import t, { type Test } from 'tap';
import { loadConsoleAddon } from '../../src/task/console.js';
import { ContainerdHarness, commandExists, containerdVersions, integrationSkipReason, runCommand, type CommandResult } from '../helpers/containerd.js';
import { buildOciImage, buildRootfs, imageToolsMissing } from '../helpers/oci-image.js';

const IMAGE = 'localhost/thaw-it-tty:1';

const skip =
  integrationSkipReason() ??
  imageToolsMissing() ??
  (commandExists('script') ? undefined : 'util-linux script is not installed') ??
  (loadConsoleAddon().binding ? undefined : 'the console addon is not built (npm run build:native)');

const version = containerdVersions()[0];
/** What still fails: the program's output, size and input all arrive, but ctr does not return after the exit. */
const EXIT_TODO = 'ctr -t does not return after the task exits (it waits ~60 s); the terminal I/O itself works';

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

  /** ctr ARGS on a `rows`×`cols` terminal made by `script`, `input` typed into it; the output with CRs dropped. */
  const onTerminal = async (args: readonly string[], o: { rows: number; cols: number; input?: string; timeoutMs?: number }): Promise<CommandResult> => {
    const ctr = [h.ctrBin, '--address', h.grpc, ...args].map(sq).join(' ');
    // script's stdin carries the input and stays open while this bash lives (EOF would end the session early).
    const feed = `{ exec 2>/dev/null; sleep 1; printf %s ${sq(o.input ?? '')}; while kill -0 $$ 2>/dev/null; do sleep 0.2; done; }`;
    const r = await runCommand('bash', ['-c', `script -qfec ${sq(`stty rows ${o.rows} cols ${o.cols}; exec ${ctr}`)} /dev/null < <(${feed})`], {
      timeoutMs: o.timeoutMs ?? 20_000,
    });
    return { ...r, out: r.out.replace(/\r/g, '') };
  };
  const runT = (id: string, cmd: string, o: { rows: number; cols: number; input?: string }): Promise<CommandResult> => {
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
    const r = await runT('it-tty', `test -t 0 && test -t 1 && echo ISATTY; echo "TTY=$(tty)"; ${waitSize(33, 111)}; read line; echo "GOT=$line"; exit 5`, {
      rows: 33,
      cols: 111,
      input: 'hello\n',
    });
    t.comment(`ctr run -t took ${Date.now() - started} ms; output: ${JSON.stringify(r.out)}`);
    t.equal(r.code, 5, `exit status through ctr (stderr: ${r.err.trim()})`, { todo: EXIT_TODO });
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
    const r = await onTerminal(['task', 'exec', '-t', '--exec-id', 'sh1', id, 'sh', '-c', `test -t 0 && echo ISATTY; ${waitSize(21, 72)}; read w; echo "GOT=$w"; exit 3`], {
      rows: 21,
      cols: 72,
      input: 'exec-input\n',
    });
    t.equal(r.code, 3, `exec exit status (stderr: ${r.err.trim()})`, { todo: EXIT_TODO });
    t.match(r.out, /ISATTY\n/);
    t.match(r.out, /SIZE=21 72\n/);
    t.match(r.out, /GOT=exec-input\n/);
    t.equal(await h.taskStatus(id), 'RUNNING', 'the task itself kept running');
  });
}
