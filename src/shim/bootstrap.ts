import type { BootstrapParams } from '../gen/containerd/runtime/bootstrap/v1/bootstrap_pb.js';
import type { Options } from '../gen/runtimeoptions/v1/api_pb.js';
import type { Any } from '../wire/any.js';

/**
 * What containerd hands `start` on stdin, in either protocol:
 * - containerd ≤ 2.2: nothing (/dev/null) or the runtime options as a serialized Any;
 * - containerd 2.3+: BootstrapParams (runtime options inside `extensions`), answered with a
 *   BootstrapResult instead of a plain address.
 * An Any also decodes as BootstrapParams (both start with two strings), so — as containerd's own
 * shim library does — stdin counts as BootstrapParams only when instance_id and namespace equal
 * the -id and -namespace flags.
 *
 * Protobuf code is imported on demand: loading it costs about as much as booting node, and the
 * common `start` (containerd 1.6/1.7, no runtime options) needs none of it.
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

/** LogLevel.LOG_LEVEL_DEBUG: levels are Go slog's, lower = more verbose (TRACE = -8). */
const DEBUG_LEVEL = -4;

export async function parseStartInput(stdin: Uint8Array, expect: { id: string; namespace: string }): Promise<StartInput> {
  if (stdin.byteLength === 0) return { protocol: 'legacy', options: NO_OPTIONS };
  const [{ fromBinary }, { BootstrapParamsSchema }, { anyTypeName, decodeAny }, { OptionsSchema }] = await Promise.all([
    import('@bufbuild/protobuf'),
    import('../gen/containerd/runtime/bootstrap/v1/bootstrap_pb.js'),
    import('../wire/any.js'),
    import('../gen/runtimeoptions/v1/api_pb.js'),
  ]);
  let params: BootstrapParams | undefined;
  try {
    params = fromBinary(BootstrapParamsSchema, stdin);
  } catch {
    params = undefined; // not BootstrapParams: legacy options
  }
  if (params && params.instanceId !== '' && params.instanceId === expect.id && params.namespace === expect.namespace) {
    const extensions = params.extensions.flatMap((e) => (e.value ? [e.value] : []));
    const raw = extensions.find((any) => anyTypeName(any) === OptionsSchema.typeName) ?? extensions[0];
    return { protocol: 'bootstrap', params, options: await runtimeOptionsOf(raw) };
  }
  return { protocol: 'legacy', options: await runtimeOptionsOf(decodeAny(stdin)) };
}

/** Runtime options from an options Any (legacy stdin, `-info` stdin, or a bootstrap extension). */
export async function runtimeOptionsOf(raw: Any | undefined): Promise<RuntimeOptions> {
  if (raw === undefined) return NO_OPTIONS;
  const [{ unpackAny }, { OptionsSchema }] = await Promise.all([import('../wire/any.js'), import('../gen/runtimeoptions/v1/api_pb.js')]);
  const options = unpackAny(raw, OptionsSchema);
  return { configPath: options?.configPath ?? '', raw, options };
}

/** Whether containerd asked for debug logs (slog levels: DEBUG = -4, TRACE = -8). */
export function isDebugLevel(level: number): boolean {
  return level <= DEBUG_LEVEL;
}

/** The bytes `start` prints: the plain address (legacy) or a BootstrapResult for Task v2. */
export async function startReply(input: StartInput, address: string): Promise<Uint8Array> {
  if (input.protocol === 'legacy') return Buffer.from(address);
  const [{ create, toBinary }, { BootstrapResultSchema }] = await Promise.all([
    import('@bufbuild/protobuf'),
    import('../gen/containerd/runtime/bootstrap/v1/bootstrap_pb.js'),
  ]);
  return toBinary(BootstrapResultSchema, create(BootstrapResultSchema, { version: 2, address, protocol: 'ttrpc' }));
}
