import { createHash } from 'node:crypto';
import { ShimError } from '../errors.js';

/**
 * Container ids as users and containerd give them. Restricted to a safe charset so they can be
 * file names, and never passed to runsc/runc directly (runsc matches ids by prefix): engines use
 * `runtimeIdFor`, a fixed-length hash, so no runtime id is ever a prefix of another.
 */
const SAFE_ID = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;

export function validateContainerId(id: string): string {
  if (!SAFE_ID.test(id) || id.includes('..')) {
    throw new ShimError(
      'InvalidArgument',
      `invalid container id ${JSON.stringify(id)}: use 1-128 characters of [A-Za-z0-9_.-], starting with a letter or digit`,
    );
  }
  return id;
}

/** Fixed-length (32 hex) runtime id; equal-length ids cannot be prefixes of each other. */
export function runtimeIdFor(id: string, namespace = ''): string {
  return createHash('sha256').update(`${namespace}\0${id}`).digest('hex').slice(0, 32);
}
