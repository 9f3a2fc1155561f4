import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fromBinary, isFieldSet } from '@bufbuild/protobuf';
import { SnapshotError } from '../errors.js';
import { MmEntrySchema } from '../gen/criu/mm_pb.js';
import { PagemapEntrySchema, PagemapHeadSchema } from '../gen/criu/pagemap_pb.js';

/**
 * Reads what the page server needs from a CRIU image directory — which dumped pages of a task are
 * lazy (served through userfaultfd) and where each lives in pages-<id>.img — and turns it into a
 * fill plan: extents (image pages → target addresses, never crossing a dump-time VMA, because one
 * UFFDIO_COPY must stay inside one VMA) and chunks in the order the eager fill should take them.
 * Layout facts from checkpoint-restore/criu (criu/pagemap.c, criu/image.c, images/*.proto):
 * - every protobuf image is u32 IMG_COMMON_MAGIC, u32 <type magic>, then (u32 length, message)*;
 * - a pagemap entry's pages are in the pages file iff flag PE_PRESENT is set, stored back to back in
 *   entry order, so an entry's file offset is the sum of the present entries before it;
 * - PE_LAZY marks pages the restorer leaves to the lazy-pages server (private anonymous VMAs,
 *   minus the stack pages in use); PE_PARENT pages live in a parent (pre-dump) image.
 */
export const PAGE_SIZE = 4096;
export const PE_PARENT = 1;
export const PE_LAZY = 2;
export const PE_PRESENT = 4;

const IMG_COMMON_MAGIC = 0x54564319;
const PAGEMAP_MAGIC = 0x56084025;
const MM_MAGIC = 0x57492820;

export interface PagemapRun {
  vaddr: bigint;
  pages: number;
  flags: number;
  /** Page index in the pages file when PE_PRESENT, else null. */
  filePage: number | null;
}

export interface TaskPagemap {
  pagesId: number;
  runs: PagemapRun[];
}

export interface VmaBounds {
  start: bigint;
  end: bigint;
}

function imageError(path: string, detail: string, cause?: unknown): SnapshotError {
  return new SnapshotError('DataLoss', `CRIU image ${path}: ${detail}`, { path }, cause === undefined ? {} : { cause });
}

/** Splits a protobuf image into its messages after checking both magics. */
export function imageMessages(bytes: Uint8Array, magic: number, path: string): Uint8Array[] {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (bytes.byteLength < 8) throw imageError(path, 'shorter than its magic');
  const common = view.getUint32(0, true);
  const own = view.getUint32(4, true);
  if (common !== IMG_COMMON_MAGIC || own !== magic) {
    throw imageError(path, `magic ${common.toString(16)}/${own.toString(16)}, expected ${IMG_COMMON_MAGIC.toString(16)}/${magic.toString(16)}`);
  }
  const out: Uint8Array[] = [];
  for (let off = 8; off < bytes.byteLength; ) {
    if (off + 4 > bytes.byteLength) throw imageError(path, `truncated length word at byte ${off}`);
    const len = view.getUint32(off, true);
    off += 4;
    if (off + len > bytes.byteLength) throw imageError(path, `message at byte ${off} runs past the end (${len} bytes)`);
    out.push(bytes.subarray(off, off + len));
    off += len;
  }
  return out;
}

/** Parses pagemap-<pid>.img (entries keep CRIU's order: ascending vaddr). */
export function parsePagemap(bytes: Uint8Array, path: string): TaskPagemap {
  const messages = imageMessages(bytes, PAGEMAP_MAGIC, path);
  const [head, ...entries] = messages;
  if (head === undefined) throw imageError(path, 'has no pagemap head');
  let pagesId: number;
  try {
    pagesId = fromBinary(PagemapHeadSchema, head).pagesId;
  } catch (err) {
    throw imageError(path, 'bad pagemap head', err);
  }
  const runs: PagemapRun[] = [];
  let filePage = 0;
  for (const [i, raw] of entries.entries()) {
    let e;
    try {
      e = fromBinary(PagemapEntrySchema, raw);
    } catch (err) {
      throw imageError(path, `bad pagemap entry ${i}`, err);
    }
    const pages = isFieldSet(e, PagemapEntrySchema.field.nrPages) ? Number(e.nrPages) : e.compatNrPages;
    // Images without flags predate them: in_parent or present (criu/pagemap.c init_compat_pagemap_entry).
    let flags = e.flags;
    if (!isFieldSet(e, PagemapEntrySchema.field.flags)) flags = e.inParent ? PE_PARENT : PE_PRESENT;
    else if (e.inParent) flags |= PE_PARENT;
    if (!Number.isSafeInteger(pages) || pages <= 0) throw imageError(path, `entry ${i} has ${pages} pages`);
    const present = (flags & PE_PRESENT) !== 0;
    runs.push({ vaddr: e.vaddr, pages, flags, filePage: present ? filePage : null });
    if (present) filePage += pages;
  }
  return { pagesId, runs };
}

/** The VMA bounds of mm-<pid>.img, sorted by start. */
export function parseVmas(bytes: Uint8Array, path: string): VmaBounds[] {
  const [raw] = imageMessages(bytes, MM_MAGIC, path);
  if (raw === undefined) throw imageError(path, 'has no mm entry');
  try {
    return fromBinary(MmEntrySchema, raw)
      .vmas.map((v) => ({ start: v.start, end: v.end }))
      .sort((a, b) => (a.start < b.start ? -1 : a.start > b.start ? 1 : 0));
  } catch (err) {
    throw imageError(path, 'bad mm entry', err);
  }
}

/** Image files of one task as read from disk (kept so the caller can checksum exactly these bytes). */
export interface TaskImages {
  pid: number;
  pagemapPath: string;
  mmPath: string;
  pagesPath: string;
  pagemap: TaskPagemap;
  vmas: VmaBounds[];
  /** The raw bytes read, by path. */
  raw: Map<string, Uint8Array>;
}

/** The pids of the tasks in an image directory (pagemap-<pid>.img; shmem pagemaps excluded). */
export async function listImagePids(imageDir: string): Promise<number[]> {
  const names = await readdir(imageDir);
  return names
    .map((n) => /^pagemap-(\d+)\.img$/.exec(n)?.[1])
    .filter((s): s is string => s !== undefined)
    .map(Number)
    .sort((a, b) => a - b);
}

export async function readTaskImages(imageDir: string, pid: number): Promise<TaskImages> {
  const pagemapPath = join(imageDir, `pagemap-${pid}.img`);
  const mmPath = join(imageDir, `mm-${pid}.img`);
  const read = async (p: string): Promise<Uint8Array> => {
    try {
      return new Uint8Array(await readFile(p));
    } catch (err) {
      throw imageError(p, `unreadable: ${(err as Error).message}`, err);
    }
  };
  const [pm, mm] = await Promise.all([read(pagemapPath), read(mmPath)]);
  const pagemap = parsePagemap(pm, pagemapPath);
  return {
    pid,
    pagemapPath,
    mmPath,
    pagesPath: join(imageDir, `pages-${pagemap.pagesId}.img`),
    pagemap,
    vmas: parseVmas(mm, mmPath),
    raw: new Map([
      [pagemapPath, pm],
      [mmPath, mm],
    ]),
  };
}

/**
 * Which chunks the eager fill takes first. Faults are always answered first, whatever the order.
 * - `file`: ascending address = pages-file order (sequential reads; the concurrent checksum pass
 *   reads right behind the fill, so a cold image is read from disk once).
 * - `small-first`: smaller VMAs first (the app's heaps and stacks), then the large ones — for a GPU
 *   process the device memory the CUDA restore copies back is parked in the largest anonymous VMAs.
 * - `large-first`: the largest VMAs first.
 */
export type FillOrder = 'file' | 'small-first' | 'large-first';

export interface PagePlan {
  /** [addr, firstPage, pages] per extent, sorted by addr. */
  extents: BigUint64Array;
  /** [firstPage, pages] per chunk, in fill order. */
  chunks: BigUint64Array;
  extentCount: number;
  chunkCount: number;
  /** Pages the server must install (lazy and present in the pages file). */
  lazyPages: number;
  /** Lazy pages without data (CRIU zero pages): answered with the zero page on fault. */
  lazyZeroPages: number;
  /** Pages CRIU restores itself (not lazy). */
  eagerPages: number;
}

export class PagesUnsupportedError extends SnapshotError {}

interface Extent {
  addr: bigint;
  firstPage: number;
  pages: number;
  vma: number;
}

/** Builds the fill plan of one task. Throws PagesUnsupportedError for images the server cannot serve. */
export function planPages({
  pagemap,
  vmas,
  chunkPages,
  order,
  path = 'pagemap',
}: {
  readonly pagemap: TaskPagemap;
  readonly vmas: readonly VmaBounds[];
  readonly chunkPages: number;
  readonly order: FillOrder;
  readonly path?: string;
}): PagePlan {
  if (!Number.isSafeInteger(chunkPages) || chunkPages <= 0) throw new RangeError('chunkPages must be a positive integer');
  const page = BigInt(PAGE_SIZE);
  const extents: Extent[] = [];
  let lazyPages = 0;
  let lazyZeroPages = 0;
  let eagerPages = 0;
  let v = 0;
  for (const run of pagemap.runs) {
    if ((run.flags & PE_LAZY) === 0) {
      eagerPages += run.pages;
      continue;
    }
    if ((run.flags & PE_PARENT) !== 0) {
      throw new PagesUnsupportedError('FailedPrecondition', `${path}: lazy pages at 0x${run.vaddr.toString(16)} live in a parent image (pre-dump chains are not served)`, { path });
    }
    if (run.filePage === null) {
      lazyZeroPages += run.pages;
      continue;
    }
    lazyPages += run.pages;
    // Split at VMA ends: pagemap entries may run across adjacent VMAs.
    let addr = run.vaddr;
    let filePage = run.filePage;
    let left = run.pages;
    while (left > 0) {
      while (v < vmas.length && vmas[v]!.end <= addr) v++;
      const vma = vmas[v];
      if (vma === undefined || vma.start > addr) {
        throw new PagesUnsupportedError('FailedPrecondition', `${path}: lazy page 0x${addr.toString(16)} is in no VMA of the mm image`, { path });
      }
      const inVma = Number((vma.end - addr) / page);
      const n = Math.min(left, inVma);
      const last = extents[extents.length - 1];
      if (last !== undefined && last.vma === v && last.addr + BigInt(last.pages) * page === addr && last.firstPage + last.pages === filePage) {
        last.pages += n; // contiguous in memory and in the file: one extent
      } else {
        extents.push({ addr, firstPage: filePage, pages: n, vma: v });
      }
      addr += BigInt(n) * page;
      filePage += n;
      left -= n;
    }
  }

  // Chunks: each extent cut into chunkPages pieces, then ordered.
  const vmaBytes = new Map<number, number>();
  for (const e of extents) vmaBytes.set(e.vma, (vmaBytes.get(e.vma) ?? 0) + e.pages);
  const ordered = [...extents];
  if (order !== 'file') {
    const sign = order === 'small-first' ? 1 : -1;
    ordered.sort((a, b) => sign * ((vmaBytes.get(a.vma) ?? 0) - (vmaBytes.get(b.vma) ?? 0)) || a.vma - b.vma || (a.addr < b.addr ? -1 : 1));
  }
  const chunkList: number[] = [];
  for (const e of ordered) {
    for (let off = 0; off < e.pages; off += chunkPages) chunkList.push(e.firstPage + off, Math.min(chunkPages, e.pages - off));
  }
  const extentArray = new BigUint64Array(extents.length * 3);
  extents.forEach((e, i) => {
    extentArray[i * 3] = e.addr;
    extentArray[i * 3 + 1] = BigInt(e.firstPage);
    extentArray[i * 3 + 2] = BigInt(e.pages);
  });
  return {
    extents: extentArray,
    chunks: BigUint64Array.from(chunkList, (n) => BigInt(n)),
    extentCount: extents.length,
    chunkCount: chunkList.length / 2,
    lazyPages,
    lazyZeroPages,
    eagerPages,
  };
}
