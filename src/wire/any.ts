import { create, fromBinary, toBinary, type DescMessage, type MessageShape } from '@bufbuild/protobuf';
import { AnySchema, type Any } from '@bufbuild/protobuf/wkt';
import { ShimError } from '../errors.js';

/**
 * The only place that builds or opens a google.protobuf.Any. containerd writes type URLs as bare
 * full names ("containerd.events.TaskExit", "runtimeoptions.v1.Options") where protobuf libraries
 * default to "type.googleapis.com/<name>"; we write the bare name and accept both on read.
 */
export type { Any };

/** Packs `message` with containerd's bare type URL. */
export function packAny<D extends DescMessage>(schema: D, message: MessageShape<D>): Any {
  return create(AnySchema, { typeUrl: schema.typeName, value: toBinary(schema, message) });
}

/** The full message name an Any holds: whatever follows the last "/" of its type URL. */
export function anyTypeName(any: Any): string {
  const slash = any.typeUrl.lastIndexOf('/');
  return slash >= 0 ? any.typeUrl.slice(slash + 1) : any.typeUrl;
}

/** Whether the Any holds a `schema` message (bare or prefixed type URL). */
export function anyIs(any: Any, schema: DescMessage): boolean {
  return any.typeUrl !== '' && anyTypeName(any) === schema.typeName;
}

/**
 * Opens an Any holding a `schema` message; undefined when it holds another type.
 * Throws InvalidArgument when the type matches but the bytes do not decode.
 */
export function unpackAny<D extends DescMessage>(any: Any, schema: D): MessageShape<D> | undefined {
  if (!anyIs(any, schema)) return undefined;
  try {
    return fromBinary(schema, any.value);
  } catch (err) {
    throw new ShimError('InvalidArgument', `decode ${schema.typeName} from Any failed: ${errorText(err)}`, {
      cause: err,
    });
  }
}

/** Decodes a serialized Any (e.g. runtime options on a shim's stdin). Throws InvalidArgument. */
export function decodeAny(bytes: Uint8Array): Any {
  try {
    return fromBinary(AnySchema, bytes);
  } catch (err) {
    throw new ShimError('InvalidArgument', `decode google.protobuf.Any failed: ${errorText(err)}`, { cause: err });
  }
}

/** Serializes an Any (its type URL is kept as it is). */
export function encodeAny(any: Any): Uint8Array {
  return toBinary(AnySchema, any);
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
