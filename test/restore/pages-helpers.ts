import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { create, toBinary } from '@bufbuild/protobuf';
import { execa } from 'execa';
import { MmEntrySchema, VmaEntrySchema } from '../../src/gen/criu/mm_pb.js';
import { PagemapEntrySchema, PagemapHeadSchema } from '../../src/gen/criu/pagemap_pb.js';

/**
 * Shared pieces of the page server tests: the uffd-target fixture (a process that hands CRIU's
 * lazy-pages protocol a userfaultfd of its own memory, then uses the memory) and synthetic CRIU
 * images describing that memory.
 */
const here = dirname(fileURLToPath(import.meta.url));
export const TARGET_SOURCE = join(here, '..', 'fixtures', 'uffd', 'uffd-target.c');
export const PAGE = 4096;
/** Where the fixture maps its memory (fixed, so images can name it). */
export const BASE = 0x600000000000n;

/** Builds the fixture into dir; returns its path, or a reason to skip. */
export async function buildTarget(dir: string): Promise<{ path: string } | { skip: string }> {
  const out = join(dir, 'uffd-target');
  const cc = await execa('gcc', ['-O2', '-Wall', '-o', out, TARGET_SOURCE], { reject: false });
  if (cc.failed) return { skip: `cannot build the uffd fixture: ${String(cc.stderr || cc.message).slice(0, 300)}` };
  return { path: out };
}

/** Whether this process may create userfaultfds with the non-cooperative events (root, or the sysctl). */
export function uffdUsable(): string | false {
  if (process.getuid?.() !== 0) return 'needs root (userfaultfd with fork/remap/remove/unmap events)';
  if (!existsSync('/proc/sys/vm/unprivileged_userfaultfd')) return 'kernel without userfaultfd';
  return false;
}

export async function writePages(target: string, path: string, pages: number, seed: number): Promise<void> {
  await execa(target, ['--write-pages', path, String(pages), String(seed)]);
}

export interface Spawned {
  child: ChildProcess;
  output: () => string;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** Starts the fixture; it connects to socket right away. */
export function spawnTarget(target: string, socket: string, pages: number, seed: number, actions: string[]): Spawned {
  const child = spawn(target, [socket, BASE.toString(16), String(pages), String(seed), ...actions], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout?.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (out += d.toString()));
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.on('exit', (code, signal) => resolve({ code, signal })),
  );
  return { child, output: () => out, exit };
}

const IMG_COMMON_MAGIC = 0x54564319;
export const PAGEMAP_MAGIC = 0x56084025;
export const MM_MAGIC = 0x57492820;

/** A CRIU protobuf image: both magics, then length-prefixed messages. */
export function imageBytes(magic: number, messages: Uint8Array[]): Uint8Array {
  const parts: Uint8Array[] = [];
  const head = new DataView(new ArrayBuffer(8));
  head.setUint32(0, IMG_COMMON_MAGIC, true);
  head.setUint32(4, magic, true);
  parts.push(new Uint8Array(head.buffer));
  for (const m of messages) {
    const len = new DataView(new ArrayBuffer(4));
    len.setUint32(0, m.byteLength, true);
    parts.push(new Uint8Array(len.buffer), m);
  }
  const total = parts.reduce((s, p) => s + p.byteLength, 0);
  const out = new Uint8Array(total);
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.byteLength;
  }
  return out;
}

export interface EntrySpec {
  vaddr: bigint;
  pages: number;
  /** Left out of the message when undefined (images older than the flags field). */
  flags?: number;
  /** Write nr_pages in the 64-bit field 5 (newer CRIU) instead of field 2. */
  wide?: boolean;
}

export function pagemapBytes(pagesId: number, entries: EntrySpec[]): Uint8Array {
  return imageBytes(PAGEMAP_MAGIC, [
    toBinary(PagemapHeadSchema, create(PagemapHeadSchema, { pagesId })),
    ...entries.map((e) =>
      toBinary(
        PagemapEntrySchema,
        create(PagemapEntrySchema, {
          vaddr: e.vaddr,
          compatNrPages: e.wide ? 0 : e.pages,
          ...(e.flags === undefined ? {} : { flags: e.flags }),
          ...(e.wide ? { nrPages: BigInt(e.pages) } : {}),
        }),
      ),
    ),
  ]);
}

export function mmBytes(vmas: { start: bigint; end: bigint }[]): Uint8Array {
  const mm = create(MmEntrySchema, {
    mmStartCode: 0n,
    mmEndCode: 0n,
    mmStartData: 0n,
    mmEndData: 0n,
    mmStartStack: 0n,
    mmStartBrk: 0n,
    mmBrk: 0n,
    mmArgStart: 0n,
    mmArgEnd: 0n,
    mmEnvStart: 0n,
    mmEnvEnd: 0n,
    exeFileId: 0,
    vmas: vmas.map((v) => create(VmaEntrySchema, { start: v.start, end: v.end, pgoff: 0n, shmid: 0n, prot: 3, flags: 0x22, status: 1, fd: -1n })),
  });
  return imageBytes(MM_MAGIC, [toBinary(MmEntrySchema, mm)]);
}

/**
 * Writes a CRIU image directory for the fixture: task `pid`, one VMA [BASE, BASE + pages), the
 * image pages present and lazy in entries of 256 pages (as CRIU writes them), pages-1.img from the
 * fixture's pattern. `holes` leave page ranges out of the image (they must read zero).
 */
export async function writeFixtureImages(
  target: string,
  dir: string,
  { pid, pages, seed, holes = [] }: { pid: number; pages: number; seed: number; holes?: [number, number][] },
): Promise<void> {
  await mkdir(dir, { recursive: true });
  const inHole = (p: number) => holes.some(([a, b]) => p >= a && p < b);
  const entries: EntrySpec[] = [];
  for (let p = 0; p < pages; ) {
    if (inHole(p)) {
      p++;
      continue;
    }
    let n = 0;
    while (p + n < pages && n < 256 && !inHole(p + n)) n++;
    entries.push({ vaddr: BASE + BigInt(p * PAGE), pages: n, flags: 6 });
    p += n;
  }
  await writeFile(join(dir, `pagemap-${pid}.img`), pagemapBytes(1, entries));
  await writeFile(join(dir, `mm-${pid}.img`), mmBytes([{ start: BASE, end: BASE + BigInt(pages * PAGE) }]));
  // pages-1.img holds only the present pages, back to back: write the full pattern, then cut holes.
  const full = join(dir, 'pages-full.tmp');
  await writePages(target, full, pages, seed);
  if (holes.length === 0) {
    await execa('mv', [full, join(dir, 'pages-1.img')]);
    return;
  }
  const { readFile } = await import('node:fs/promises');
  const data = await readFile(full);
  const kept: Buffer[] = [];
  for (let p = 0; p < pages; p++) if (!inHole(p)) kept.push(data.subarray(p * PAGE, (p + 1) * PAGE));
  await writeFile(join(dir, 'pages-1.img'), Buffer.concat(kept));
  await execa('rm', ['-f', full]);
}
