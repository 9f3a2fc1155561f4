import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, openSync, constants } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { createReadStream, createWriteStream } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { ConsoleSocket, loadConsoleAddon, TerminalIo } from '../../src/task/console.js';

/**
 * A fake runtime in Python: makes a real pty, sends the master to the console socket with
 * SCM_RIGHTS the way runsc/runc do (payload: the pty's name), then runs the command on the slave as
 * its controlling terminal and exits with its status. With HOLD_SLAVE_PIDFILE set, a process outside
 * the terminal's session keeps the slave open for a minute after the command exits, as gVisor's
 * sentry does for an exec whose background job lives on (its pid goes to that file): no hangup (EIO)
 * reaches the master then.
 */
const FAKE_RUNTIME = `
import fcntl, os, pty, socket, sys, termios, time
path, argv = sys.argv[1], sys.argv[2:]
m, s = pty.openpty()
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c.connect(path)
socket.send_fds(c, [os.ttyname(s).encode()], [m])
c.close(); os.close(m)
hold = os.environ.get('HOLD_SLAVE_PIDFILE')
if hold:
    h = os.fork()
    if h == 0:
        time.sleep(60); os._exit(0)
    with open(hold, 'w') as f: f.write(str(h))
pid = os.fork()
if pid == 0:
    os.setsid(); fcntl.ioctl(s, termios.TIOCSCTTY, 0)
    for fd in (0, 1, 2): os.dup2(s, fd)
    os.execvp(argv[0], argv)
os.close(s)
_, st = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(st))
`;

const addon = loadConsoleAddon();
const hasPython = (() => {
  try {
    execFileSync('python3', ['-c', 'import pty, socket; socket.send_fds'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
})();

if (!addon.binding) {
  t.skip(`console addon not built (${addon.path}): npm run build:native`);
} else if (!hasPython) {
  t.skip('python3 with socket.send_fds is needed to make a pty for these tests');
} else {
  const binding = addon.binding;

  function runtime(socketPath: string, argv: string[], o: { holdSlavePidFile?: string } = {}): { child: ChildProcess; exited: Promise<number | null> } {
    const env = o.holdSlavePidFile ? { ...process.env, HOLD_SLAVE_PIDFILE: o.holdSlavePidFile } : process.env;
    const child = spawn('python3', ['-c', FAKE_RUNTIME, socketPath, ...argv], { stdio: ['ignore', 'ignore', 'inherit'], env });
    const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
    return { child, exited };
  }

  async function fifoDir(t: { teardown(fn: () => unknown): void }): Promise<{ dir: string; stdin: string; stdout: string }> {
    const dir = await mkdtemp(join(tmpdir(), 'thaw-console-test-'));
    t.teardown(() => rm(dir, { recursive: true, force: true }));
    const stdin = join(dir, 'stdin');
    const stdout = join(dir, 'stdout');
    execFileSync('mkfifo', [stdin, stdout]);
    return { dir, stdin, stdout };
  }

  /** Everything read from the stdout FIFO until EOF (every writer closed it). */
  function readAll(stdout: string): Promise<string> {
    const reader = createReadStream(stdout);
    return new Promise<string>((resolve, reject) => {
      let text = '';
      reader.on('data', (c) => (text += c.toString()));
      reader.once('end', () => resolve(text));
      reader.once('error', reject);
    });
  }

  /** The client (ctr's) side of the FIFOs: a writer for stdin, a reader collecting stdout until EOF. */
  function client(fifos: { stdin: string; stdout: string }): { write(s: string): void; endInput(): void; output: Promise<string> } {
    const output = readAll(fifos.stdout);
    const writer = createWriteStream(fifos.stdin);
    writer.on('error', () => undefined); // EPIPE once the shim side stops reading
    return { write: (s) => writer.write(s), endInput: () => writer.end(), output };
  }

  t.test('ConsoleSocket receives the fd a runtime sends and removes its directory on close', async (t) => {
    const sock = await ConsoleSocket.create({ binding });
    t.ok(existsSync(sock.path), 'socket file exists while open');
    const { exited } = runtime(sock.path, ['true']);
    const master = await sock.receive({ timeoutMs: 10_000 });
    t.ok(master > 2, 'got an fd');
    binding.setWindowSize(master, 33, 101);
    t.same(binding.getWindowSize(master), { rows: 33, cols: 101 }, 'TIOCSWINSZ on the received master sticks');
    t.equal(await exited, 0); // closing the master first would hang the child up
    binding.close(master);
    await sock.close();
    t.notOk(existsSync(sock.path), 'socket removed');
  });

  t.test('ConsoleSocket.receive times out and a pending receive is canceled by close()', async (t) => {
    const sock = await ConsoleSocket.create({ binding });
    await t.rejects(sock.receive({ timeoutMs: 50 }), { code: 'DeadlineExceeded' });
    const pending = t.rejects(sock.receive({ timeoutMs: 60_000 }), { code: 'Canceled' });
    const started = Date.now();
    await sock.close();
    await pending;
    t.ok(Date.now() - started < 5_000, 'close did not wait for the timeout');
  });

  t.test('TerminalIo relays stdin → pty → stdout, applies the size, and ends at the pty hangup (EIO)', async (t) => {
    const fifos = await fifoDir(t);
    const io = await TerminalIo.open({ stdin: fifos.stdin, stdout: fifos.stdout, stderr: '', terminal: true }, { binding });
    t.teardown(() => io.close());
    t.same(io.fds, ['ignore', 'ignore', 'ignore']);
    const c = client(fifos);
    io.resize({ width: 97, height: 31 }); // before attach: kept and applied when the master arrives
    const { exited } = runtime(io.consoleSocket, ['sh', '-c', 'read line; echo "got:$line"; tty; stty size']);
    await io.attach();
    t.notOk(existsSync(io.consoleSocket), 'socket gone once the master is in');
    c.write('hello\n');
    t.equal(await exited, 0);
    await io.outputEnded();
    const out = await c.output; // EOF: the relay closed stdout by itself after the hangup
    t.match(out, /got:hello/);
    t.match(out, /\/dev\/pts\/\d+/);
    t.match(out, /31 97/);
    c.endInput();
    await io.close();
  });

  t.test('resize after attach reaches the running program', async (t) => {
    const fifos = await fifoDir(t);
    const io = await TerminalIo.open({ stdin: fifos.stdin, stdout: fifos.stdout, stderr: '', terminal: true }, { binding });
    t.teardown(() => io.close());
    const c = client(fifos);
    const { exited } = runtime(io.consoleSocket, ['sh', '-c', 'stty size; read x; stty size']);
    await io.attach();
    io.resize({ width: 80, height: 24 });
    io.resize({ width: 132, height: 50 });
    c.write('\n');
    t.equal(await exited, 0);
    const out = await c.output;
    t.match(out, /50 132/);
    t.throws(() => io.resize({ width: -1, height: 2 }), { code: 'InvalidArgument' });
    c.endInput();
  });

  t.test('a program that never reads its terminal does not stall the event loop (input beyond the pty buffer)', async (t) => {
    const fifos = await fifoDir(t);
    const io = await TerminalIo.open({ stdin: fifos.stdin, stdout: fifos.stdout, stderr: '', terminal: true }, { binding, drainTimeoutMs: 500 });
    t.teardown(() => io.close());
    const c = client(fifos);
    const { child, exited } = runtime(io.consoleSocket, ['sleep', '30']);
    await io.attach();
    c.write('x'.repeat(1 << 20)); // far more than a pty holds
    let ticks = 0;
    const timer = setInterval(() => ticks++, 10);
    await new Promise((r) => setTimeout(r, 500));
    clearInterval(timer);
    t.ok(ticks >= 20, `event loop kept running (${ticks} ticks in 500 ms)`);
    child.kill('SIGKILL');
    await exited;
    c.endInput();
    await io.close();
    await c.output;
  });

  t.test('close() before attach cancels the pending stdin open and removes the socket', async (t) => {
    const fifos = await fifoDir(t);
    const io = await TerminalIo.open({ stdin: fifos.stdin, stdout: fifos.stdout, stderr: '', terminal: true }, { binding });
    const path = io.consoleSocket;
    // Nobody opens the stdin FIFO's write end: the blocked open must not hold close() up.
    const reader = openSync(fifos.stdout, constants.O_RDONLY | constants.O_NONBLOCK);
    const started = Date.now();
    await io.close();
    closeSync(reader);
    t.ok(Date.now() - started < 3_000, 'close returned promptly');
    t.notOk(existsSync(path));
  });

  /** Kills the pid written to `file` (a process that holds the pty slave). */
  async function killPidIn(file: string): Promise<void> {
    const pid = Number((await readFile(file, 'utf8').catch(() => '')).trim());
    if (pid > 0) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone already (the hangup ended it)
      }
    }
  }

  t.test('close() after the exit does not wait for an end of file while another process holds the pty slave', async (t) => {
    const fifos = await fifoDir(t);
    const pidFile = join(fifos.dir, 'bg.pid');
    t.teardown(() => killPidIn(pidFile));
    // drainTimeoutMs far above the bound asserted below: only the quiet window may end the wait.
    const io = await TerminalIo.open({ stdin: fifos.stdin, stdout: fifos.stdout, stderr: '', terminal: true }, { binding, drainTimeoutMs: 30_000 });
    t.teardown(() => io.close());
    const c = client(fifos);
    // Output beyond what a pty buffers, then exit while the slave stays open elsewhere: no EIO comes.
    const { exited } = runtime(io.consoleSocket, ['sh', '-c', `head -c 200000 /dev/zero | tr '\\0' x; echo; echo last-line; exit 7`], { holdSlavePidFile: pidFile });
    await io.attach();
    t.equal(await exited, 7, 'the program exited');
    await t.resolves(readFile(pidFile), 'a process holds the slave');
    const ended = await Promise.race([io.outputEnded().then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 300))]);
    t.notOk(ended, 'the pty gave no end of file after the exit');
    const started = Date.now();
    await io.close();
    const ms = Date.now() - started;
    t.ok(ms < 10_000, `close() returned in ${ms} ms, not at the 30 s drain limit`);
    const out = await c.output; // EOF: the stdout target was closed
    t.equal(out.match(/x/g)?.length ?? 0, 200_000, 'all output before the exit arrived');
    t.match(out, /last-line/);
    c.endInput();
  });

  t.test('close() moves output still sitting in the pty without waiting for the event loop (quietMs 0)', async (t) => {
    const fifos = await fifoDir(t);
    const done = join(fifos.dir, 'written');
    const pidFile = join(fifos.dir, 'bg.pid');
    t.teardown(() => killPidIn(pidFile));
    const io = await TerminalIo.open({ stdin: '', stdout: fifos.stdout, stderr: '', terminal: true }, { binding, quietMs: 0, drainTimeoutMs: 30_000 });
    t.teardown(() => io.close());
    const output = readAll(fifos.stdout);
    runtime(io.consoleSocket, ['sh', '-c', `echo $$ > ${pidFile}; echo still-in-the-pty; touch ${done}; exec sleep 60`]);
    await io.attach();
    // Block the event loop until the program wrote: the relay cannot have read the output yet, so
    // only close()'s final drain can deliver it (close runs synchronously up to that drain).
    const end = Date.now() + 20_000;
    while (!existsSync(done) && Date.now() < end) execFileSync('sleep', ['0.05']);
    t.ok(existsSync(done), 'the program wrote its line');
    await io.close();
    t.match(await output, /still-in-the-pty/);
  });

  t.test('output to a plain file target', async (t) => {
    const fifos = await fifoDir(t);
    const file = join(fifos.dir, 'out.log');
    const io = await TerminalIo.open({ stdin: '', stdout: `file://${file}`, stderr: '', terminal: true }, { binding });
    t.teardown(() => io.close());
    const { exited } = runtime(io.consoleSocket, ['sh', '-c', 'echo to-file']);
    await io.attach();
    t.equal(await exited, 0);
    await io.outputEnded();
    t.match(await readFile(file, 'utf8'), /to-file/);
  });
}
