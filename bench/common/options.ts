/**
 * Option-argument parsers shared by the bench programs, for commander's `.option(flags, text, parser)`
 * and `Option#argParser`. Each throws commander's InvalidArgumentError, which commander prints as
 * one line naming the flag (`error: option '--runs <n>' argument '0' is invalid. a positive integer`)
 * and exits 1, so the message says only what a good value looks like.
 */
import { InvalidArgumentError } from 'commander';

/** Splits a comma-separated value, dropping empty items (`''` → `[]`, `a,,b` → `[a, b]`). */
export function commaList(value: string): string[] {
  return value.split(',').filter((item) => item !== '');
}

/** An integer ≥ 1 (repeats, runs, block sizes, queue depths). */
export function positiveInt(value: string): number {
  const n = Number(value);
  if (value.trim() === '' || !Number.isInteger(n) || n < 1) throw new InvalidArgumentError('a positive integer');
  return n;
}

/** An integer ≥ 0 (millisecond delays where 0 means none). */
export function nonNegativeInt(value: string): number {
  const n = Number(value);
  if (value.trim() === '' || !Number.isInteger(n) || n < 0) throw new InvalidArgumentError('an integer >= 0');
  return n;
}

/** A finite number > 0 (sizes in GiB, seconds, load averages). */
export function positiveNumber(value: string): number {
  const n = Number(value);
  if (value.trim() === '' || !Number.isFinite(n) || n <= 0) throw new InvalidArgumentError('a number > 0');
  return n;
}

/** Sizes in GiB, comma-separated, each > 0 (`1,4`, `0.5`). */
export function gibSizes(value: string): number[] {
  const sizes = value.split(',').map((s) => (s.trim() === '' ? NaN : Number(s)));
  if (sizes.some((s) => !Number.isFinite(s) || s <= 0)) throw new InvalidArgumentError('GiB values > 0, comma-separated');
  return sizes;
}

/** Positive integers, comma-separated (`1,2,8`). */
export function positiveIntList(value: string): number[] {
  const ns = value.split(',').map((s) => (s.trim() === '' ? NaN : Number(s)));
  if (ns.some((n) => !Number.isInteger(n) || n < 1)) throw new InvalidArgumentError('positive integers, comma-separated');
  return ns;
}

/** A parser for a comma-separated subset of `choices`, in the order given (`cold,warm`). */
export function commaChoices<T extends string>(choices: readonly T[]): (value: string) => T[] {
  return (value) => {
    const items = value.split(',');
    if (items.some((item) => !(choices as readonly string[]).includes(item))) {
      throw new InvalidArgumentError(`some of ${choices.join(',')}, comma-separated`);
    }
    return items as T[];
  };
}

/** A JavaScript regular expression (`uring|dd`). */
export function regex(value: string): RegExp {
  try {
    return new RegExp(value);
  } catch (err) {
    throw new InvalidArgumentError(`a regular expression (${err instanceof Error ? err.message : String(err)})`);
  }
}

/**
 * A JSON array (case lists). The items' shape is the program's business; this only makes a typo in
 * the JSON fail at parse time, naming the flag, instead of as a SyntaxError from deep inside.
 */
export function jsonArray<T>(value: string): T[] {
  let parsed: unknown;
  try {
    parsed = JSON.parse(value);
  } catch (err) {
    throw new InvalidArgumentError(`a JSON array (${err instanceof Error ? err.message : String(err)})`);
  }
  if (!Array.isArray(parsed)) throw new InvalidArgumentError('a JSON array');
  return parsed as T[];
}
