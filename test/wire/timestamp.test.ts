import t from 'tap';
import { create } from '@bufbuild/protobuf';
import { TimestampSchema } from '@bufbuild/protobuf/wkt';
import { fromTimestamp, timestampNow, toTimestamp } from '../../src/wire/timestamp.js';

t.test('Date → Timestamp → Date', async (t) => {
  const d = new Date('2024-07-29T12:34:56.789Z');
  const ts = toTimestamp(d);
  t.equal(ts.seconds, BigInt(Math.floor(d.getTime() / 1000)));
  t.equal(ts.nanos, 789_000_000);
  t.equal(fromTimestamp(ts).getTime(), d.getTime());
});

t.test('times before 1970 keep nanos positive', async (t) => {
  const d = new Date(-1500); // 1969-12-31T23:59:58.500Z
  const ts = toTimestamp(d);
  t.equal(ts.seconds, -2n);
  t.equal(ts.nanos, 500_000_000);
  t.equal(fromTimestamp(ts).getTime(), -1500);
});

t.test('sub-millisecond nanos are dropped; unset stays unset', async (t) => {
  const ts = create(TimestampSchema, { seconds: 10n, nanos: 1_999_999 });
  t.equal(fromTimestamp(ts).getTime(), 10_001);
  t.equal(fromTimestamp(undefined), undefined);
  t.throws(() => toTimestamp(new Date(NaN)));
  const now = Date.now();
  t.ok(Math.abs(fromTimestamp(timestampNow()).getTime() - now) < 1000);
});
