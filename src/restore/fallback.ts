import { open, type FileHandle } from 'node:fs/promises';
import { constants as osConstants } from 'node:os';
import xxhash, { type XXHash, type XXHashAPI } from 'xxhash-wasm';
import { NativeIoError } from '../errors.js';
import { formatXxh64 } from '../snapshot/hash.js';
import {
  DEFAULT_BLOCK_SIZE,
  DEFAULT_QUEUE_DEPTH,
  canceledError,
  checkIoOptions,
  fromNodeError,
  ioError,
  type CopyResult,
  type FaultSpec,
  type FileHashResult,
  type FileRange,
  type HashOptions,
  type IoBackend,
  type IoOptions,
  type PrefetchResult,
  type RangeResult,
  type ReadIntoOptions,
} from './native.js';

/**
 * The pure-TypeScript IoBackend ('ts'): the same operations and results as the native addon, over
 * fs.promises reads (libuv's thread pool: `queueDepth` reads in flight per file) and xxhash-wasm's
 * streaming XXH64. Used where the addon is not built or no native backend works. Always buffered:
 * `direct` is ignored, since Node cannot align its buffers for O_DIRECT.
 */

const ERRNO = osConstants.errno;

let api: Promise<XXHashAPI> | undefined;
function xxhashApi(): Promise<XXHashAPI> {
  api ??= xxhash();
  return api;
}

/** Counts bytes read across one call, as the native pipeline does, to apply FaultSpec. */
class FaultState {
  #bytes = 0;
  constructor(private readonly spec: FaultSpec | undefined) {}

  /** A read returned `n` bytes: how many the caller sees, or throws the injected error. */
  apply(n: number, path: string, position: number): number {
    const f = this.spec;
    if (f === undefined || n <= 0) return n;
    const limit = f.failAfterBytes ?? 0;
    if (this.#bytes + n > limit) {
      if (!f.shortRead) {
        throw ioError('read', ERRNO[f.errno ?? 'EIO'], path, `at offset ${position} (injected)`);
      }
      n = Math.max(0, limit - this.#bytes);
    }
    this.#bytes += n;
    return n;
  }
}

interface Resolved {
  blockSize: number;
  queueDepth: number;
  signal: AbortSignal | undefined;
  faults: FaultState;
}

/** Where a range's bytes go after hashing. */
type Sink =
  | { kind: 'none' }
  | { kind: 'file'; fh: FileHandle; path: string }
  | { kind: 'memory'; target: Uint8Array };

interface StreamRequest {
  op: string;
  path: string;
  offset: number;
  length: number | undefined;
  hash: boolean;
  sink: Sink;
}

export class TsIo implements IoBackend {
  readonly name = 'ts' as const;

  async prefetch(ranges: readonly FileRange[], opts: IoOptions = {}): Promise<PrefetchResult> {
    const o = resolve('prefetch', opts);
    const files: RangeResult[] = [];
    let bytes = 0;
    for (const r of ranges) {
      const got = await stream(o, {
        op: 'prefetch',
        path: r.path,
        offset: r.offset ?? 0,
        length: r.length,
        hash: opts.hash === true,
        sink: { kind: 'none' },
      });
      files.push({ path: r.path, ...got });
      bytes += got.bytes;
    }
    return { bytes, files };
  }

  async copyFile(src: string, dst: string, opts: IoOptions = {}): Promise<CopyResult> {
    const o = resolve('copyFile', opts);
    // Opened (and so truncated) only once the source opens, as the native pipeline does.
    const srcCheck = await openRead('copyFile', src);
    await srcCheck.close();
    let fh: FileHandle;
    try {
      fh = await open(dst, 'w', 0o644);
    } catch (err) {
      throw fromNodeError(err, 'open', dst);
    }
    let result: RangeResult | undefined;
    try {
      const got = await stream(o, {
        op: 'copyFile',
        path: src,
        offset: 0,
        length: undefined,
        hash: opts.hash === true,
        sink: { kind: 'file', fh, path: dst },
      });
      result = { path: src, ...got };
    } finally {
      try {
        await fh.close();
      } catch (err) {
        if (result !== undefined) throw fromNodeError(err, 'close', dst);
      }
    }
    return withHash(result.bytes, result.hash);
  }

  async hashFiles(paths: readonly string[], opts: HashOptions = {}): Promise<FileHashResult[]> {
    const o = resolve('hashFiles', opts);
    const out = new Array<FileHashResult>(paths.length);
    let next = 0;
    const worker = async (): Promise<void> => {
      for (let i = next++; i < paths.length; i = next++) {
        const path = paths[i]!;
        const got = await stream(o, { op: 'hashFiles', path, offset: 0, length: undefined, hash: true, sink: { kind: 'none' } });
        out[i] = { path, bytes: got.bytes, hash: got.hash ?? '' };
      }
    };
    const concurrency = Math.max(1, Math.min(opts.concurrency ?? 2, paths.length));
    await Promise.all(Array.from({ length: concurrency }, worker));
    return out;
  }

  async readInto(path: string, target: Uint8Array, opts: ReadIntoOptions = {}): Promise<CopyResult> {
    const o = resolve('readInto', opts);
    const got = await stream(o, {
      op: 'readInto',
      path,
      offset: opts.fileOffset ?? 0,
      length: opts.length,
      hash: opts.hash === true,
      sink: { kind: 'memory', target },
    });
    return withHash(got.bytes, got.hash);
  }
}

function withHash(bytes: number, hash: string | undefined): CopyResult {
  return hash === undefined ? { bytes } : { bytes, hash };
}

function resolve(op: string, opts: IoOptions): Resolved {
  if (opts.signal?.aborted) throw canceledError(op, opts.signal);
  const blockSize = opts.blockSize ?? DEFAULT_BLOCK_SIZE;
  const queueDepth = opts.queueDepth ?? DEFAULT_QUEUE_DEPTH.buffered.ts;
  // direct is accepted (and ignored) so that callers need not know which backend they got.
  checkIoOptions(op, { blockSize, queueDepth, direct: false });
  return { blockSize, queueDepth, signal: opts.signal, faults: new FaultState(opts.faults) };
}

async function openRead(op: string, path: string): Promise<FileHandle> {
  try {
    return await open(path, 'r');
  } catch (err) {
    throw fromNodeError(err, 'open', path);
  }
}

/**
 * Reads [offset, offset+length) of one file in blocks, `queueDepth` reads in flight, and consumes
 * them in file order: hash, then write to the sink.
 */
async function stream(o: Resolved, req: StreamRequest): Promise<Omit<RangeResult, 'path'>> {
  const { path } = req;
  const fh = await openRead(req.op, path);
  const inFlight = new Set<Promise<unknown>>();
  try {
    const st = await fh.stat().catch((err: unknown) => {
      throw fromNodeError(err, 'fstat', path);
    });
    if (!st.isFile()) throw ioError('stat', ERRNO.EINVAL, path, 'not a regular file');
    const size = st.size;
    const begin = req.offset;
    if (!Number.isSafeInteger(begin) || begin < 0) throw ioError('range', ERRNO.EINVAL, path, 'offset must be a non-negative integer');
    let end: number;
    if (req.length === undefined) {
      if (begin > size) throw ioError('range', ERRNO.EINVAL, path, `offset ${begin} is past the end of the file`);
      end = size;
    } else {
      if (!Number.isSafeInteger(req.length) || req.length < 0) throw ioError('range', ERRNO.EINVAL, path, 'length must be a non-negative integer');
      end = begin + req.length;
      if (end > size) throw ioError('read', ERRNO.ENODATA, path, `range ends at byte ${end} but the file has ${size}`);
    }
    const sink = req.sink;
    if (sink.kind === 'memory' && end - begin > sink.target.byteLength) {
      throw ioError('range', ERRNO.EINVAL, path, `${end - begin} bytes do not fit a buffer of ${sink.target.byteLength}`);
    }
    const hasher: XXHash<bigint> | undefined = req.hash ? (await xxhashApi()).create64(0n) : undefined;

    const spare: Uint8Array[] = [];
    const takeBuffer = (rel: number, len: number): Uint8Array => {
      if (sink.kind === 'memory') return sink.target.subarray(rel, rel + len);
      return spare.pop() ?? new Uint8Array(o.blockSize);
    };
    const window: { rel: number; len: number; buf: Uint8Array; done: Promise<void> }[] = [];
    const track = <T>(p: Promise<T>): Promise<T> => {
      inFlight.add(p);
      void p.then(
        () => inFlight.delete(p),
        () => inFlight.delete(p),
      );
      return p;
    };
    let next = begin;
    for (;;) {
      while (window.length < o.queueDepth && next < end) {
        const len = Math.min(o.blockSize, end - next);
        const buf = takeBuffer(next - begin, len);
        window.push({ rel: next - begin, len, buf, done: track(readFull(fh, buf, len, next, end, path, o.faults)) });
        next += len;
      }
      const head = window.shift();
      if (head === undefined) break;
      await head.done;
      if (o.signal?.aborted) throw canceledError(req.op, o.signal);
      const data = head.buf.subarray(0, head.len);
      hasher?.update(data);
      if (sink.kind === 'file') await writeFull(sink.fh, data, head.rel, sink.path);
      if (sink.kind !== 'memory') spare.push(head.buf);
    }
    const result: Omit<RangeResult, 'path'> = { offset: begin, bytes: end - begin };
    if (hasher) result.hash = formatXxh64(hasher.digest());
    return result;
  } finally {
    // Never close the handle under a pending read; their errors are already reported or moot.
    await Promise.allSettled([...inFlight]);
    await fh.close().catch(() => undefined);
  }
}

async function readFull(
  fh: FileHandle,
  buf: Uint8Array,
  len: number,
  position: number,
  end: number,
  path: string,
  faults: FaultState,
): Promise<void> {
  let done = 0;
  while (done < len) {
    let n: number;
    try {
      ({ bytesRead: n } = await fh.read(buf, done, len - done, position + done));
    } catch (err) {
      throw fromNodeError(err, 'read', path);
    }
    n = faults.apply(n, path, position + done);
    if (n === 0) {
      throw ioError('read', ERRNO.ENODATA, path, `short read: end of file at byte ${position + done}, expected ${end}`);
    }
    done += n;
  }
}

async function writeFull(fh: FileHandle, data: Uint8Array, position: number, path: string): Promise<void> {
  let done = 0;
  while (done < data.byteLength) {
    let n: number;
    try {
      ({ bytesWritten: n } = await fh.write(data, done, data.byteLength - done, position + done));
    } catch (err) {
      throw fromNodeError(err, 'write', path);
    }
    if (n === 0) throw new NativeIoError('DataLoss', `write ${path} failed: wrote 0 bytes`, { op: 'write', errno: ERRNO.EIO });
    done += n;
  }
}
