/**
 * Opening the stdio URIs containerd passes at Create/Exec: FIFOs (as ctr makes them), plain paths,
 * file:// URIs, and the refusals (terminal, binary:// loggers, unopenable paths) without leaking
 * an fd.
 */
import { spawnSync } from 'node:child_process';
import { closeSync, constants, openSync, readSync, readdirSync, writeSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { OpenStdio, type StdioRequest } from '../../src/task/stdio.js';

const none: StdioRequest = { stdin: '', stdout: '', stderr: '', terminal: false };

async function tmp(t: Test): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'thaw-stdio-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

function mkfifo(p: string): void {
  const r = spawnSync('mkfifo', [p]);
  if (r.status !== 0) throw new Error(`mkfifo failed: ${r.stderr.toString()}`);
}

const openFds = (): number => readdirSync('/proc/self/fd').length;

/** Reads what is available on a non-blocking fd (retrying briefly). */
async function drain(fd: number): Promise<string> {
  const buf = Buffer.alloc(4096);
  for (let i = 0; i < 50; i++) {
    try {
      const n = readSync(fd, buf);
      if (n > 0) return buf.subarray(0, n).toString();
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') throw err;
    }
    await new Promise((r) => setTimeout(r, 10));
  }
  return '';
}

t.test('empty URIs give no fds', async (t) => {
  const io = await OpenStdio.open(none);
  t.same(io.fds, ['ignore', 'ignore', 'ignore']);
  await io.close();
});

t.test('FIFOs as ctr creates them: output reaches the reader; opening never blocks', async (t) => {
  const dir = await tmp(t);
  const [stdin, stdout, stderr] = ['stdin', 'stdout', 'stderr'].map((n) => path.join(dir, `c1-${n}`)) as [string, string, string];
  for (const f of [stdin, stdout, stderr]) mkfifo(f);
  // No reader and no writer yet: O_RDWR (outputs) and O_NONBLOCK (stdin) opens return at once.
  const io = await OpenStdio.open({ stdin, stdout, stderr, terminal: false });
  t.teardown(() => io.close());
  const [inFd, outFd, errFd] = io.fds;
  t.type(inFd, 'number');
  t.type(outFd, 'number');
  t.type(errFd, 'number');
  t.not(outFd, errFd, 'separate FIFOs, separate fds');
  const reader = openSync(stdout, constants.O_RDONLY | constants.O_NONBLOCK);
  writeSync(outFd as number, 'hello from the app\n');
  t.equal(await drain(reader), 'hello from the app\n');
  closeSync(reader);
  // The reader went away: writes still succeed (we hold a read end), no EPIPE.
  t.doesNotThrow(() => writeSync(outFd as number, 'nobody listens\n'));
  const writer = openSync(stdin, constants.O_WRONLY | constants.O_NONBLOCK);
  writeSync(writer, 'input\n');
  closeSync(writer);
  t.equal(await drain(inFd as number), 'input\n', "the client's stdin reaches the app's fd");
});

t.test('plain paths are appended to; file:// creates directories and shares one fd', async (t) => {
  const dir = await tmp(t);
  const plain = path.join(dir, 'out.log');
  await writeFile(plain, 'before\n');
  const io = await OpenStdio.open({ ...none, stdout: plain });
  writeSync(io.fds[1] as number, 'after\n');
  await io.close();
  t.equal(await readFile(plain, 'utf8'), 'before\nafter\n', 'O_APPEND keeps what was there');

  const target = path.join(dir, 'deep', 'er', 'task.log');
  const uri = `file://${target}`;
  const both = await OpenStdio.open({ ...none, stdout: uri, stderr: uri });
  t.equal(both.fds[1], both.fds[2], 'stdout and stderr share the file');
  writeSync(both.fds[1] as number, 'out\n');
  writeSync(both.fds[2] as number, 'err\n');
  await both.close();
  t.equal(await readFile(target, 'utf8'), 'out\nerr\n');

  const spaced = path.join(dir, 'with space', 'x.log');
  const enc = await OpenStdio.open({ ...none, stdout: `file://${encodeURI(spaced)}` });
  await enc.close();
  t.equal(await readFile(spaced, 'utf8'), '', 'percent-encoded file:// paths are decoded');
});

t.test('refusals: terminal, binary:// loggers, unopenable paths — without leaking fds', async (t) => {
  const dir = await tmp(t);
  const before = openFds();
  await t.rejects(OpenStdio.open({ ...none, terminal: true }), { code: 'NotImplemented', message: /terminal/ });
  await t.rejects(OpenStdio.open({ ...none, stdout: 'binary:///usr/bin/logger?tag=x' }), { code: 'NotImplemented', message: /binary:/ });
  const out = path.join(dir, 'out.fifo');
  mkfifo(out);
  // stdout opens, then stdin fails: the stdout fd must be closed again.
  await t.rejects(OpenStdio.open({ ...none, stdout: out, stderr: path.join(dir, 'no', 'such', 'dir', 'err.log') }), { code: 'InvalidArgument', message: /cannot open stdio/ });
  await t.rejects(OpenStdio.open({ ...none, stdin: path.join(dir, 'missing-fifo') }), { code: 'InvalidArgument' });
  t.equal(openFds(), before, 'no fd left open');
});

t.test('closeStdin and close release the fds', async (t) => {
  const dir = await tmp(t);
  const stdin = path.join(dir, 'in');
  mkfifo(stdin);
  await mkdir(path.join(dir, 'logs'));
  const before = openFds();
  const io = await OpenStdio.open({ ...none, stdin, stdout: path.join(dir, 'logs', 'o'), stderr: path.join(dir, 'logs', 'e') });
  t.equal(openFds(), before + 3);
  await io.closeStdin();
  t.equal(openFds(), before + 2, 'CloseIO drops our stdin');
  await io.close();
  t.equal(openFds(), before, 'close releases the rest (twice is harmless)');
  await io.close();
});
