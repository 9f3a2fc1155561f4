import { mkdir, readdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { writeFileAtomic } from '../atomic-file.js';
import { ShimError } from '../errors.js';
import type { EngineName } from './engine.js';
import type { KeyInputs } from '../snapshot/key.js';

/**
 * What thaw remembers about each container it runs, shared by the CLI and the shim (same state
 * dir), so `thaw checkpoint ID` and `thaw ps` work on shim-managed containers too.
 */
export interface ContainerRecord {
  id: string;
  /** containerd namespace for shim-managed containers, '' for CLI ones. */
  namespace: string;
  engine: EngineName;
  bundle: string;
  /** Compatibility key of this container's snapshots. */
  key: string;
  decision: 'cold' | 'restore';
  snapshot: string | null;
  reason: string;
  /** Set when a restore was attempted and fell back to a cold start. */
  fallback: string | null;
  owner: 'cli' | 'shim';
  createdAt: string;
  /** Host pid of the init process (gVisor: sandbox) when known. */
  pid: number;
  timings: Record<string, number>;
  /** Inputs of `key` as computed at start; checkpoints reuse them. */
  keyInputs: KeyInputs;
}

export class ContainerRecords {
  constructor(private readonly dir: string) {}

  static async open(stateDir: string): Promise<ContainerRecords> {
    const dir = join(stateDir, 'containers');
    await mkdir(dir, { recursive: true, mode: 0o700 });
    return new ContainerRecords(dir);
  }

  #path(id: string, namespace: string): string {
    return join(this.dir, `${namespace ? `${namespace}.` : ''}${id}.json`);
  }

  async save(rec: ContainerRecord): Promise<void> {
    const path = this.#path(rec.id, rec.namespace);
    await writeFileAtomic(path, JSON.stringify(rec, null, 2));
  }

  async get(id: string, namespace = ''): Promise<ContainerRecord | undefined> {
    try {
      return JSON.parse(await readFile(this.#path(id, namespace), 'utf8')) as ContainerRecord;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw new ShimError('Internal', `container record ${id} unreadable: ${(err as Error).message}`, { cause: err });
    }
  }

  async require(id: string, namespace = ''): Promise<ContainerRecord> {
    const rec = await this.get(id, namespace);
    if (!rec) throw new ShimError('NotFound', `container ${id} not found${namespace ? ` in namespace ${namespace}` : ''}`);
    return rec;
  }

  /** Finds a record by id in any namespace (CLI convenience); ambiguity is an error. */
  async find(id: string): Promise<ContainerRecord | undefined> {
    const all = (await this.list()).filter((r) => r.id === id);
    if (all.length > 1) {
      throw new ShimError('FailedPrecondition', `container ${id} exists in several namespaces: pass --namespace`);
    }
    return all[0];
  }

  async list(): Promise<ContainerRecord[]> {
    const names = (await readdir(this.dir)).filter((n) => n.endsWith('.json'));
    const out: ContainerRecord[] = [];
    for (const n of names) {
      try {
        out.push(JSON.parse(await readFile(join(this.dir, n), 'utf8')) as ContainerRecord);
      } catch {
        // A record removed or half-written between readdir and read: skip it.
      }
    }
    return out.sort((a, b) => a.createdAt.localeCompare(b.createdAt));
  }

  async remove(id: string, namespace = ''): Promise<void> {
    await rm(this.#path(id, namespace), { force: true });
  }
}
