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

/**
 * Whether `stdin` may hold BootstrapParams for instance `id`, told without loading protobuf:
 * parseStartInput accepts BootstrapParams only when instance_id equals the -id flag, and
 * containerd serializes fields in number order, so such stdin starts with field 1 (tag 0x0a), its
 * length and the id. When this says no, stdin is a legacy options Any, which `start` can leave to
 * `serve` to decode (it loads protobuf anyway), keeping ~0.15 s of module loading off `start`. It
 * says yes when it cannot tell (an id of 128 bytes or more); parseStartInput then decides.
 */
export function mayBeBootstrap(stdin: Uint8Array, id: string): boolean {
  const idBytes = Buffer.from(id);
  if (idBytes.length === 0 || idBytes.length > 127) return true;
  if (stdin.byteLength < 2 + idBytes.length || stdin[0] !== 0x0a || stdin[1] !== idBytes.length) return false;
  return Buffer.from(stdin.buffer, stdin.byteOffset + 2, idBytes.length).equals(idBytes);
}

/** The config path in legacy runtime options that `start` handed over undecoded (see mayBeBootstrap). */
export async function configPathOfOptions(raw: Uint8Array): Promise<string> {
  const { decodeAny } = await import('../wire/any.js');
  return (await runtimeOptionsOf(decodeAny(raw))).configPath;
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
