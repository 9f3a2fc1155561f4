import { create, fromBinary, toBinary } from '@bufbuild/protobuf';
import {
  BootstrapParamsSchema,
  BootstrapResultSchema,
  LogLevel,
  type BootstrapParams,
} from '../gen/containerd/runtime/bootstrap/v1/bootstrap_pb.js';
import { OptionsSchema, type Options } from '../gen/runtimeoptions/v1/api_pb.js';
import type { Any } from '../wire/any.js';
import { anyTypeName, decodeAny, unpackAny } from '../wire/any.js';

/**
 * What containerd hands `start` on stdin, in either protocol:
 * - containerd ≤ 2.2: nothing (/dev/null) or the runtime options as a serialized Any;
 * - containerd 2.3+: BootstrapParams (runtime options inside `extensions`), answered with a
 *   BootstrapResult instead of a plain address.
 * An Any also decodes as BootstrapParams (both start with two strings), so — as containerd's own
 * shim library does — stdin counts as BootstrapParams only when instance_id and namespace equal
 * the -id and -namespace flags.
 */
export type StartInput =
  | { readonly protocol: 'bootstrap'; readonly params: BootstrapParams; readonly options: RuntimeOptions }
  | { readonly protocol: 'legacy'; readonly options: RuntimeOptions };

export interface RuntimeOptions {
  /** runtimeoptions.v1.Options.config_path: thaw's config file; "" = default location. */
  readonly configPath: string;
  /** The raw options Any, if any (kept for `-info` and for types thaw does not know). */
  readonly raw: Any | undefined;
  /** Set when the options were runtimeoptions.v1.Options. */
  readonly options: Options | undefined;
}

const NO_OPTIONS: RuntimeOptions = { configPath: '', raw: undefined, options: undefined };

export function parseStartInput(stdin: Uint8Array, expect: { id: string; namespace: string }): StartInput {
  if (stdin.byteLength === 0) return { protocol: 'legacy', options: NO_OPTIONS };
  const params = tryDecodeParams(stdin);
  if (params && params.instanceId === expect.id && params.namespace === expect.namespace && params.instanceId !== '') {
    const extensions = params.extensions.flatMap((e) => (e.value ? [e.value] : []));
    const raw = extensions.find((any) => anyTypeName(any) === OptionsSchema.typeName) ?? extensions[0];
    return { protocol: 'bootstrap', params, options: runtimeOptionsOf(raw) };
  }
  return { protocol: 'legacy', options: runtimeOptionsOf(decodeAny(stdin)) };
}

/** Runtime options from an options Any (legacy stdin, `-info` stdin, or a bootstrap extension). */
export function runtimeOptionsOf(raw: Any | undefined): RuntimeOptions {
  if (raw === undefined) return NO_OPTIONS;
  const options = unpackAny(raw, OptionsSchema);
  return { configPath: options?.configPath ?? '', raw, options };
}

/** Whether containerd asked for debug logs (slog levels: DEBUG = -4, TRACE = -8). */
export function isDebugLevel(level: LogLevel | number): boolean {
  return level <= LogLevel.DEBUG;
}

/** The bytes `start` prints: the plain address (legacy) or a BootstrapResult for Task v2. */
export function startReply(input: StartInput, address: string): Uint8Array {
  if (input.protocol === 'legacy') return Buffer.from(address);
  return toBinary(BootstrapResultSchema, create(BootstrapResultSchema, { version: 2, address, protocol: 'ttrpc' }));
}

function tryDecodeParams(stdin: Uint8Array): BootstrapParams | undefined {
  try {
    return fromBinary(BootstrapParamsSchema, stdin);
  } catch {
    return undefined;
  }
}
