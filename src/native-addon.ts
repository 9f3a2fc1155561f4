import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/**
 * Finding and loading thaw's node-gyp addons, shared by their typed facades (restore/native.ts,
 * restore/pages-native.ts, runsc/reaper-native.ts, task/console.ts). A missing or broken build is a
 * value, not an exception: every facade has a fallback or a clear error of its own.
 */
export type AddonLoad<B> = { binding: B; path: string } | { binding: null; path: string; error: Error };

/**
 * `<repo>/native/<dir>/build/Release/<file>`, the repo found by walking up from this module to
 * `native/<dir>/binding.gyp` (src/ when run from source, dist/src/ when compiled).
 */
export function addonPath(dir: string, file: string): string {
  const here = dirname(fileURLToPath(import.meta.url));
  for (let d = here, i = 0; i < 6; i++, d = dirname(d)) {
    if (existsSync(join(d, 'native', dir, 'binding.gyp'))) return join(d, 'native', dir, 'build', 'Release', file);
  }
  return join(here, '..', 'native', dir, 'build', 'Release', file);
}

/** A loader for one addon that loads each path once per process and checks the exports it needs. */
export function addonLoader<B>(name: string, isBinding: (mod: unknown) => mod is B): (path: string) => AddonLoad<B> {
  const loaded = new Map<string, AddonLoad<B>>();
  return (path) => {
    let result = loaded.get(path);
    if (result === undefined) {
      try {
        const mod: unknown = createRequire(import.meta.url)(path);
        result = isBinding(mod) ? { binding: mod, path } : { binding: null, path, error: new Error(`${path} is not ${name}`) };
      } catch (err) {
        result = { binding: null, path, error: err instanceof Error ? err : new Error(String(err)) };
      }
      loaded.set(path, result);
    }
    return result;
  };
}

/** True when `mod` is an object with a function under each of `names`. */
export function hasFunctions(mod: unknown, names: readonly string[]): boolean {
  if (typeof mod !== 'object' || mod === null) return false;
  const m = mod as Record<string, unknown>;
  return names.every((k) => typeof m[k] === 'function');
}
