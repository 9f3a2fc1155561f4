import t from 'tap';
import { SnapshotError } from '../../src/errors.js';
import {
  PE_LAZY,
  PE_PARENT,
  PE_PRESENT,
  PagesUnsupportedError,
  imageMessages,
  parsePagemap,
  parseVmas,
  planPages,
  type TaskPagemap,
} from '../../src/restore/pages-image.js';
import { MM_MAGIC, PAGEMAP_MAGIC, imageBytes, mmBytes, pagemapBytes } from './pages-helpers.js';

const P = 4096n;
const LP = PE_LAZY | PE_PRESENT;

t.test('pagemap: file offsets advance only over present entries', async (t) => {
  const pm = parsePagemap(
    pagemapBytes(3, [
      { vaddr: 0x1000n, pages: 2, flags: PE_PRESENT }, // eager, file pages 0-1
      { vaddr: 0x10000n, pages: 4, flags: PE_LAZY }, // lazy zero pages: no data
      { vaddr: 0x20000n, pages: 3, flags: LP }, // file pages 2-4
      { vaddr: 0x30000n, pages: 5, flags: LP, wide: true }, // nr_pages in field 5
    ]),
    'pm',
  );
  t.equal(pm.pagesId, 3);
  t.same(
    pm.runs.map((r) => [r.vaddr, r.pages, r.flags, r.filePage]),
    [
      [0x1000n, 2, PE_PRESENT, 0],
      [0x10000n, 4, PE_LAZY, null],
      [0x20000n, 3, LP, 2],
      [0x30000n, 5, LP, 5],
    ],
  );
});

t.test('pagemap: entries without flags are present, or in the parent (old images)', async (t) => {
  const pm = parsePagemap(
    pagemapBytes(1, [
      { vaddr: 0x1000n, pages: 1, flags: 0 },
      { vaddr: 0x2000n, pages: 2 },
      { vaddr: 0x4000n, pages: 1 },
    ]),
    'pm',
  );
  t.same(
    pm.runs.map((r) => [r.flags, r.filePage]),
    [
      [0, null],
      [PE_PRESENT, 0],
      [PE_PRESENT, 2],
    ],
  );
});

t.test('images: bad magic, truncation and garbage are DataLoss', async (t) => {
  const good = pagemapBytes(1, [{ vaddr: 0x1000n, pages: 1, flags: LP }]);
  t.throws(() => imageMessages(good, MM_MAGIC, 'x'), SnapshotError);
  t.throws(() => parsePagemap(good.subarray(0, good.length - 1), 'x'), /runs past the end/);
  t.throws(() => parsePagemap(good.subarray(0, 5), 'x'), /shorter than its magic/);
  t.throws(() => parsePagemap(imageBytes(PAGEMAP_MAGIC, []), 'x'), /no pagemap head/);
  t.throws(() => parsePagemap(imageBytes(PAGEMAP_MAGIC, [new Uint8Array([8, 1]), new Uint8Array([0xff, 0xff])]), 'x'), /bad pagemap entry 0/);
  t.equal(imageMessages(good, PAGEMAP_MAGIC, 'x').length, 2);
});

t.test('mm: VMA bounds sorted', async (t) => {
  const vmas = parseVmas(mmBytes([{ start: 0x5000n, end: 0x6000n }, { start: 0x1000n, end: 0x3000n }]), 'mm');
  t.same(vmas, [
    { start: 0x1000n, end: 0x3000n },
    { start: 0x5000n, end: 0x6000n },
  ]);
});

function plan(pagemap: TaskPagemap, vmas: { start: bigint; end: bigint }[], chunkPages = 2, order: 'file' | 'small-first' | 'large-first' = 'file') {
  const p = planPages({ pagemap, vmas, chunkPages, order });
  const ext: bigint[][] = [];
  for (let i = 0; i < p.extents.length; i += 3) ext.push([p.extents[i]!, p.extents[i + 1]!, p.extents[i + 2]!]);
  const chunks: number[][] = [];
  for (let i = 0; i < p.chunks.length; i += 2) chunks.push([Number(p.chunks[i]), Number(p.chunks[i + 1])]);
  return { p, ext, chunks };
}

t.test('plan: entries merge within a VMA and split at VMA ends; chunks stay in extents', async (t) => {
  const pm: TaskPagemap = {
    pagesId: 1,
    runs: [
      { vaddr: 0x10n * P, pages: 1, flags: PE_PRESENT, filePage: 0 }, // eager
      { vaddr: 0x20n * P, pages: 3, flags: LP, filePage: 1 },
      { vaddr: 0x23n * P, pages: 3, flags: LP, filePage: 4 }, // continues 0x20.. and crosses into VMA 2 at 0x25
      { vaddr: 0x40n * P, pages: 2, flags: PE_LAZY, filePage: null }, // zero
    ],
  };
  const vmas = [
    { start: 0x10n * P, end: 0x11n * P },
    { start: 0x20n * P, end: 0x25n * P },
    { start: 0x25n * P, end: 0x30n * P },
    { start: 0x40n * P, end: 0x42n * P },
  ];
  const { p, ext, chunks } = plan(pm, vmas);
  t.same(ext, [
    [0x20n * P, 1n, 5n],
    [0x25n * P, 6n, 1n],
  ]);
  t.same(chunks, [
    [1, 2],
    [3, 2],
    [5, 1],
    [6, 1],
  ]);
  t.equal(p.lazyPages, 6);
  t.equal(p.lazyZeroPages, 2);
  t.equal(p.eagerPages, 1);
});

t.test('plan: orders by VMA size', async (t) => {
  const pm: TaskPagemap = {
    pagesId: 1,
    runs: [
      { vaddr: 0x10n * P, pages: 4, flags: LP, filePage: 0 },
      { vaddr: 0x20n * P, pages: 1, flags: LP, filePage: 4 },
    ],
  };
  const vmas = [
    { start: 0x10n * P, end: 0x14n * P },
    { start: 0x20n * P, end: 0x21n * P },
  ];
  t.same(plan(pm, vmas, 4, 'small-first').chunks, [
    [4, 1],
    [0, 4],
  ]);
  t.same(plan(pm, vmas, 4, 'large-first').chunks, [
    [0, 4],
    [4, 1],
  ]);
  t.same(plan(pm, vmas, 4, 'file').chunks, [
    [0, 4],
    [4, 1],
  ]);
});

t.test('plan: parent pages and pages outside any VMA are refused', async (t) => {
  const vmas = [{ start: 0x10n * P, end: 0x20n * P }];
  t.throws(() => plan({ pagesId: 1, runs: [{ vaddr: 0x10n * P, pages: 1, flags: PE_LAZY | PE_PARENT, filePage: null }] }, vmas), PagesUnsupportedError);
  t.throws(() => plan({ pagesId: 1, runs: [{ vaddr: 0x30n * P, pages: 1, flags: LP, filePage: 0 }] }, vmas), /in no VMA/);
  t.throws(() => plan({ pagesId: 1, runs: [{ vaddr: 0x1fn * P, pages: 2, flags: LP, filePage: 0 }] }, vmas), /in no VMA/);
  t.throws(() => planPages({ pagemap: { pagesId: 1, runs: [] }, vmas, chunkPages: 0, order: 'file' }), RangeError);
});
