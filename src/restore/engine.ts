import { join } from 'node:path';
import { SnapshotError } from '../errors.js';
import { silentLogger, type Logger } from '../log/logger.js';
import type { FileHasher } from '../snapshot/hash.js';
import type { ManifestFile } from '../snapshot/manifest.js';

/**
 * Stages a snapshot for restore: reads every image file once — which pulls it into the page cache
 * for `runsc restore` — and checks its checksum in the same pass, so a corrupt snapshot is caught
 * before the app runs (the caller then boots cold). Runs while the sandbox is being created.
 */
export interface StageRequest {
  snapshotDir: string;
  files: readonly ManifestFile[];
  /** Compare checksums with the manifest (else only read, to warm the page cache). */
  verify: boolean;
  signal?: AbortSignal;
}

export interface StageResult {
  bytes: number;
  files: number;
  durationMs: number;
  /** Which implementation moved the bytes (native backend name or 'ts'). */
  backend: string;
}

/** Reads one file fully and returns its hash (the one primitive staging needs from the I/O layer). */
export interface StageReader {
  readonly name: string;
  readonly algo: string;
  readAndHash(path: string, signal?: AbortSignal): Promise<{ hash: string; bytes: number }>;
}

/** A StageReader over a FileHasher (the store's hasher reads the file to hash it). */
export function hasherReader(hasher: FileHasher, name = 'ts'): StageReader {
  return { name, algo: hasher.algo, readAndHash: (path, signal) => hasher.hashFile(path, signal) };
}

export class RestoreStager {
  constructor(
    private readonly reader: StageReader,
    private readonly log: Logger = silentLogger,
    /** Files read at once; the largest (pages.img) dominates, so 2 suffices. */
    private readonly concurrency = 2,
  ) {}

  async stage(req: StageRequest): Promise<StageResult> {
    const t0 = performance.now();
    const queue = [...req.files].sort((a, b) => b.bytes - a.bytes);
    let bytes = 0;
    const worker = async (): Promise<void> => {
      for (let f = queue.shift(); f; f = queue.shift()) {
        const path = join(req.snapshotDir, f.path);
        const got = await this.reader.readAndHash(path, req.signal);
        bytes += got.bytes;
        if (got.bytes !== f.bytes) {
          throw new SnapshotError('DataLoss', `snapshot file ${f.path}: ${got.bytes} bytes, manifest says ${f.bytes}`, { path });
        }
        if (req.verify && f.algo === this.reader.algo && got.hash !== f.hash) {
          throw new SnapshotError('DataLoss', `snapshot file ${f.path}: checksum ${got.hash} does not match manifest ${f.hash}`, {
            path,
          });
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(this.concurrency, Math.max(1, req.files.length)) }, worker));
    const durationMs = Math.round(performance.now() - t0);
    this.log.debug({ phase: 'stage', durationMs, bytes, backend: this.reader.name }, 'snapshot staged');
    return { bytes, files: req.files.length, durationMs, backend: this.reader.name };
  }
}
