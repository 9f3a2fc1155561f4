/**
 * ttrpc framing (containerd/ttrpc PROTOCOL.md): a 10-byte big-endian header — uint32 payload
 * length, uint32 stream id, uint8 type, uint8 flags — then the payload. Payloads above 4 MiB are
 * rejected, so a header's first byte is always 0.
 */
export const HEADER_LENGTH = 10;
export const MAX_PAYLOAD_LENGTH = 4 << 20;

export const FrameType = {
  /** Opens a stream (client → server). */
  Request: 0x01,
  /** Final message of a stream (server → client). */
  Response: 0x02,
  /** Stream data (either way; streaming RPCs only). */
  Data: 0x03,
} as const;
export type FrameType = (typeof FrameType)[keyof typeof FrameType];

export const FrameFlags = {
  /** Request/Data: no more data will follow from the sender. */
  RemoteClosed: 0x01,
  /** Request: non-unary, more data follows. */
  RemoteOpen: 0x02,
  /** Data: the frame carries no payload. */
  NoData: 0x04,
} as const;

export interface Frame {
  readonly streamId: number;
  /** One of FrameType, or an unknown type a peer sent (ignored by the server for compatibility). */
  readonly type: number;
  readonly flags: number;
  readonly payload: Uint8Array;
}

/** A peer broke the framing; the connection cannot be trusted any more and must be closed. */
export class FrameError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'FrameError';
  }
}

/** Encodes one frame. Throws FrameError for a payload above MAX_PAYLOAD_LENGTH. */
export function encodeFrame(frame: Frame): Buffer {
  const length = frame.payload.byteLength;
  if (length > MAX_PAYLOAD_LENGTH) {
    throw new FrameError(`payload of ${length} bytes exceeds the ttrpc limit of ${MAX_PAYLOAD_LENGTH}`);
  }
  const out = Buffer.allocUnsafe(HEADER_LENGTH + length);
  out.writeUInt32BE(length, 0);
  out.writeUInt32BE(frame.streamId >>> 0, 4);
  out.writeUInt8(frame.type & 0xff, 8);
  out.writeUInt8(frame.flags & 0xff, 9);
  out.set(frame.payload, HEADER_LENGTH);
  return out;
}

/**
 * Incremental decoder for a socket stream: feed chunks as they arrive, get whole frames back.
 * Chunks are kept as a list and joined only once a whole frame is present, so a 4 MiB payload
 * arriving in 64 KiB pieces is copied once. An oversized length throws FrameError before any of
 * its payload is buffered.
 */
export class FrameDecoder {
  readonly #chunks: Buffer[] = [];
  #buffered = 0;
  #header: { length: number; streamId: number; type: number; flags: number } | undefined;

  /** Bytes received but not yet returned as frames. */
  get buffered(): number {
    return this.#buffered;
  }

  push(chunk: Uint8Array): Frame[] {
    if (chunk.byteLength > 0) {
      this.#chunks.push(Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength));
      this.#buffered += chunk.byteLength;
    }
    const frames: Frame[] = [];
    for (;;) {
      if (this.#header === undefined) {
        if (this.#buffered < HEADER_LENGTH) break;
        const h = this.#take(HEADER_LENGTH);
        const length = h.readUInt32BE(0);
        if (length > MAX_PAYLOAD_LENGTH) {
          throw new FrameError(`frame length ${length} exceeds the ttrpc limit of ${MAX_PAYLOAD_LENGTH}`);
        }
        this.#header = { length, streamId: h.readUInt32BE(4), type: h.readUInt8(8), flags: h.readUInt8(9) };
      }
      const header = this.#header;
      if (this.#buffered < header.length) break;
      // Copy the payload out so it does not pin a large shared chunk.
      const payload = header.length === 0 ? new Uint8Array(0) : new Uint8Array(this.#take(header.length));
      this.#header = undefined;
      frames.push({ streamId: header.streamId, type: header.type, flags: header.flags, payload });
    }
    return frames;
  }

  /** Removes and returns the next n buffered bytes (n <= buffered). */
  #take(n: number): Buffer {
    const first = this.#chunks[0]!;
    if (first.byteLength >= n) {
      const out = first.subarray(0, n);
      if (first.byteLength === n) this.#chunks.shift();
      else this.#chunks[0] = first.subarray(n);
      this.#buffered -= n;
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const chunk = this.#chunks[0]!;
      const count = Math.min(chunk.byteLength, n - filled);
      chunk.copy(out, filled, 0, count);
      filled += count;
      if (count === chunk.byteLength) this.#chunks.shift();
      else this.#chunks[0] = chunk.subarray(count);
    }
    this.#buffered -= n;
    return out;
  }
}
