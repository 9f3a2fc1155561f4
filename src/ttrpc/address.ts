import { ShimError } from '../errors.js';

/**
 * The socket path of a ttrpc address: `unix:///path` and a plain `/path` both name a filesystem
 * socket, as containerd's dialer treats TTRPC_ADDRESS and shim addresses. Kept free of protobuf
 * imports: the short-lived `start` verb needs it before anything else.
 */
export function socketPathOf(address: string): string {
  if (address.startsWith('unix://')) return address.slice('unix://'.length);
  if (address.includes('://')) throw new ShimError('InvalidArgument', `unsupported ttrpc address ${address}`);
  return address;
}
