/**
 * Like Promise.all, but waits for every step before throwing the first error: steps that change
 * the world register their undo (or are closed by the caller) whether or not a sibling failed.
 */
export async function settledOrFirstError<T extends readonly unknown[]>(steps: { [K in keyof T]: Promise<T[K]> }): Promise<T> {
  const results = await Promise.allSettled(steps);
  const failed = results.find((r) => r.status === 'rejected');
  if (failed) throw failed.reason;
  return results.map((r) => (r as PromiseFulfilledResult<unknown>).value) as unknown as T;
}
