import t from 'tap';
import { decide } from '../../src/policy/decide.js';

const key = 'k'.repeat(64);

t.test('decision table', async (t) => {
  const rows = [
    { lookup: { state: 'missing' } as const, annotations: {}, want: 'cold', reason: /no snapshot/ },
    { lookup: { state: 'verified', key, bytes: 10 } as const, annotations: {}, want: 'restore', reason: /verified/ },
    {
      lookup: { state: 'invalid', key, reason: 'pages.img: hash mismatch' } as const,
      annotations: {},
      want: 'cold',
      reason: /pages.img: hash mismatch/,
    },
    {
      lookup: { state: 'verified', key, bytes: 10 } as const,
      annotations: { 'thaw.dev/restore': 'never' },
      want: 'cold',
      reason: /disabled by annotation/,
    },
  ];
  for (const row of rows) {
    const d = decide({ key, lookup: row.lookup, annotations: row.annotations });
    t.equal(d.kind, row.want, JSON.stringify(row.lookup));
    t.match(d.reason, row.reason);
    t.equal(d.key, key);
  }
});

t.test('an unavailable engine always cold-starts', async (t) => {
  const d = decide({ key, lookup: { state: 'verified', key, bytes: 1 }, annotations: {}, unavailable: 'runsc lacks checkpoint' });
  t.equal(d.kind, 'cold');
  t.equal(d.reason, 'runsc lacks checkpoint');
});
