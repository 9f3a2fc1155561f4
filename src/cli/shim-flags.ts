import { ShimError } from '../errors.js';

/**
 * argv of containerd-shim-thaw-v2, parsed with Go `flag` syntax (containerd execs shims with it):
 * `-name value`, `-name=value`, `--name` likewise; bool flags take no separate value
 * (`-debug`, `-debug=false`). Unlike Go we parse position-independently, since containerd
 * releases order flags and the verb differently: the verb is the first non-flag argument.
 */
export interface ShimFlags {
  namespace: string;
  /** containerd's grpc address. */
  address: string;
  publishBinary: string;
  id: string;
  /** Only with `delete`; otherwise the bundle is the working directory. */
  bundle: string;
  /** Socket `serve` listens on (set by our `start`; containerd's shims use the same flag). */
  socket: string;
  debugSocket: string;
  /** thaw's own: runtime options' config_path, handed from `start` to `serve`. */
  configPath: string;
  debug: boolean;
  version: boolean;
  info: boolean;
}

/** `spare`: a server booted ahead of time for the next `start` (src/shim/spare.ts). */
export const SHIM_VERBS = ['start', 'delete', 'serve', 'spare'] as const;
export type ShimVerb = (typeof SHIM_VERBS)[number];

export interface ShimArgs {
  flags: ShimFlags;
  /** The first non-flag argument, if any (validated by the caller). */
  verb: string | undefined;
  /** Non-flag arguments after the verb (Go ignores them; so do we). */
  rest: string[];
}

type StringFlag = 'namespace' | 'address' | 'publishBinary' | 'id' | 'bundle' | 'socket' | 'debugSocket' | 'configPath';
type BoolFlag = 'debug' | 'version' | 'info';

const stringFlags: Readonly<Record<string, StringFlag>> = {
  namespace: 'namespace',
  address: 'address',
  'publish-binary': 'publishBinary',
  id: 'id',
  bundle: 'bundle',
  socket: 'socket',
  'debug-socket': 'debugSocket',
  'config-path': 'configPath',
};

const boolFlags: Readonly<Record<string, BoolFlag>> = {
  debug: 'debug',
  v: 'version',
  version: 'version',
  info: 'info',
};

export function isShimVerb(verb: string | undefined): verb is ShimVerb {
  return (SHIM_VERBS as readonly (string | undefined)[]).includes(verb);
}

/** Throws InvalidArgument with Go's wording for unknown flags and missing values. */
export function parseShimArgs(argv: readonly string[]): ShimArgs {
  const flags: ShimFlags = {
    namespace: '',
    address: '',
    publishBinary: '',
    id: '',
    bundle: '',
    socket: '',
    debugSocket: '',
    configPath: '',
    debug: false,
    version: false,
    info: false,
  };
  const positional: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--') {
      positional.push(...argv.slice(i + 1));
      break;
    }
    if (arg.length < 2 || !arg.startsWith('-')) {
      positional.push(arg);
      continue;
    }
    const body = arg.startsWith('--') ? arg.slice(2) : arg.slice(1);
    const eq = body.indexOf('=');
    const name = eq >= 0 ? body.slice(0, eq) : body;
    const inline = eq >= 0 ? body.slice(eq + 1) : undefined;
    if (name === '' || name.startsWith('-')) throw flagError(`bad flag syntax: ${arg}`);
    const boolKey = boolFlags[name];
    if (boolKey !== undefined) {
      flags[boolKey] = inline === undefined ? true : parseBool(name, inline);
      continue;
    }
    const stringKey = stringFlags[name];
    if (stringKey === undefined) throw flagError(`flag provided but not defined: -${name}`);
    if (inline !== undefined) {
      flags[stringKey] = inline;
      continue;
    }
    const value = argv[i + 1];
    if (value === undefined) throw flagError(`flag needs an argument: -${name}`);
    flags[stringKey] = value;
    i++;
  }
  return { flags, verb: positional[0], rest: positional.slice(1) };
}

export const SHIM_USAGE = `usage: containerd-shim-thaw-v2 -namespace NS -address ADDR -publish-binary BIN -id ID [-bundle PATH] [-debug] start|delete|serve
       containerd-shim-thaw-v2 -v | -info`;

/** Go's strconv.ParseBool. */
function parseBool(name: string, value: string): boolean {
  if (['1', 't', 'T', 'true', 'TRUE', 'True'].includes(value)) return true;
  if (['0', 'f', 'F', 'false', 'FALSE', 'False'].includes(value)) return false;
  throw flagError(`invalid boolean value "${value}" for -${name}`);
}

function flagError(message: string): ShimError {
  return new ShimError('InvalidArgument', message);
}
