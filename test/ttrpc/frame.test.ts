import t from 'tap';
import {
  encodeFrame,
  FrameDecoder,
  FrameError,
  FrameFlags,
  FrameType,
  HEADER_LENGTH,
  MAX_PAYLOAD_LENGTH,
} from '../../src/ttrpc/frame.js';

t.test('header layout is 10 bytes big-endian', async (t) => {
  const bytes = encodeFrame({ streamId: 0x01020305, type: FrameType.Request, flags: FrameFlags.RemoteClosed, payload: Uint8Array.of(0xaa, 0xbb) });
  t.same([...bytes], [0, 0, 0, 2, 1, 2, 3, 5, 1, 1, 0xaa, 0xbb]);
  t.equal(HEADER_LENGTH, 10);
});

t.test('round trip of several frames in one chunk', async (t) => {
  const frames = [
    { streamId: 1, type: FrameType.Request, flags: 0, payload: Buffer.from('hello') },
    { streamId: 3, type: FrameType.Response, flags: 0, payload: new Uint8Array(0) },
    { streamId: 5, type: FrameType.Data, flags: FrameFlags.NoData | FrameFlags.RemoteClosed, payload: Buffer.from('x') },
  ];
  const decoder = new FrameDecoder();
  const out = decoder.push(Buffer.concat(frames.map(encodeFrame)));
  t.equal(out.length, 3);
  out.forEach((f, i) => {
    const want = frames[i]!;
    t.equal(f.streamId, want.streamId);
    t.equal(f.type, want.type);
    t.equal(f.flags, want.flags);
    t.same(Buffer.from(f.payload), Buffer.from(want.payload));
  });
  t.equal(decoder.buffered, 0);
});

t.test('frames split at every byte boundary decode the same', async (t) => {
  const payload = Buffer.alloc(300, 7);
  const wire = Buffer.concat([
    encodeFrame({ streamId: 7, type: FrameType.Request, flags: 0, payload }),
    encodeFrame({ streamId: 9, type: FrameType.Request, flags: 0, payload: Buffer.from('tail') }),
  ]);
  for (const size of [1, 2, 3, 9, 10, 11, 64, 311]) {
    const decoder = new FrameDecoder();
    const got = [];
    for (let i = 0; i < wire.length; i += size) got.push(...decoder.push(wire.subarray(i, i + size)));
    t.equal(got.length, 2, `chunk size ${size}`);
    t.same(Buffer.from(got[0]!.payload), payload);
    t.equal(Buffer.from(got[1]!.payload).toString(), 'tail');
    t.equal(decoder.buffered, 0);
  }
});

t.test('a payload of exactly 4 MiB is accepted; one byte more is rejected', async (t) => {
  const max = new Uint8Array(MAX_PAYLOAD_LENGTH);
  const wire = encodeFrame({ streamId: 1, type: FrameType.Request, flags: 0, payload: max });
  const decoder = new FrameDecoder();
  const frames = [];
  for (let i = 0; i < wire.length; i += 65536) frames.push(...decoder.push(wire.subarray(i, i + 65536)));
  t.equal(frames.length, 1);
  t.equal(frames[0]!.payload.byteLength, MAX_PAYLOAD_LENGTH);

  t.throws(() => encodeFrame({ streamId: 1, type: FrameType.Request, flags: 0, payload: new Uint8Array(MAX_PAYLOAD_LENGTH + 1) }), FrameError);
  const header = Buffer.alloc(HEADER_LENGTH);
  header.writeUInt32BE(MAX_PAYLOAD_LENGTH + 1, 0);
  header.writeUInt32BE(1, 4);
  header[8] = FrameType.Request;
  // Rejected from the header alone, before any payload arrives.
  t.throws(() => new FrameDecoder().push(header), FrameError);
});
