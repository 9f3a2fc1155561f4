import { join } from 'node:path';
import { loadConfig, type ThawConfig, type ThawConfigInput, type EngineChoice } from '../config/config.js';
import { createLogger, type Logger, type LogLevel } from '../log/logger.js';

/** Global CLI flags (commander's camel-cased names). */
export interface GlobalOptions {
  root?: string;
  store?: string;
  config?: string;
  engine?: EngineChoice;
  logLevel: LogLevel;
  json: boolean;
}

/** Loads the one ThawConfig for a CLI invocation: file, then flags over it. */
export async function cliConfig(global: GlobalOptions): Promise<{ config: ThawConfig; log: Logger }> {
  const overrides: ThawConfigInput = { log: { level: global.logLevel } };
  if (global.root) overrides.stateDir = global.root;
  if (global.store) overrides.store = { path: global.store };
  if (global.engine) overrides.engine = global.engine;
  const config = await loadConfig(global.config, overrides);
  const log = createLogger({ level: config.log.level, destination: 2 });
  return { config, log };
}

export function runscRoot(config: ThawConfig): string {
  return join(config.stateDir, 'runsc');
}
