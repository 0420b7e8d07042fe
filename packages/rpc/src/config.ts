// Locating the repository (bundle and protos directories) and parsing service flags with
// environment-variable fallbacks, so every service starts with working defaults and no config.
import * as fs from 'node:fs';
import * as path from 'node:path';

/**
 * The repository root: the nearest ancestor of this module (or of `from`) holding both
 * `package.json` and `protos/`. Works from src/ under vitest and from dist/ when compiled.
 */
export function repoRoot(from: string = __dirname): string {
  let dir = path.resolve(from);
  for (;;) {
    if (fs.existsSync(path.join(dir, 'protos')) && fs.existsSync(path.join(dir, 'package.json'))) {
      return dir;
    }
    const parent = path.dirname(dir);
    if (parent === dir) {
      throw new Error(`cannot find the repository root (a directory with protos/) above ${from}`);
    }
    dir = parent;
  }
}

/** `protos/` at the repository root (override with CFRSAM_PROTOS_DIR, e.g. in a container). */
export function protosDir(): string {
  return process.env.CFRSAM_PROTOS_DIR ?? path.join(repoRoot(), 'protos');
}

/** The default model bundle: CFRSAM_BUNDLE, else `models/tiny` at the repository root. */
export function defaultBundleDir(): string {
  return process.env.CFRSAM_BUNDLE ?? path.join(repoRoot(), 'models', 'tiny');
}

export type FlagType = 'string' | 'int' | 'number' | 'boolean';

export interface FlagSpec {
  type: FlagType;
  /** Environment variable consulted when the flag is absent. */
  env?: string;
  default?: string | number | boolean;
  help: string;
}

export type FlagValues<S extends Record<string, FlagSpec>> = {
  [K in keyof S]: S[K]['type'] extends 'string' ? string : S[K]['type'] extends 'boolean' ? boolean : number;
};

/** Bad command-line or environment configuration; main() prints it with the usage and exits 2. */
export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ConfigError';
  }
}

/** `--help` was given: main() prints the usage to stdout and exits 0. */
export class HelpRequested extends ConfigError {
  constructor(usageText: string) {
    super(usageText);
    this.name = 'HelpRequested';
  }
}

function kebab(name: string): string {
  return name.replace(/[A-Z]/g, (c) => '-' + c.toLowerCase());
}

function convert(name: string, spec: FlagSpec, raw: string | boolean): string | number | boolean {
  switch (spec.type) {
    case 'string':
      return String(raw);
    case 'boolean':
      if (typeof raw === 'boolean') return raw;
      if (/^(1|true|yes|on)$/i.test(raw)) return true;
      if (/^(0|false|no|off|)$/i.test(raw)) return false;
      throw new ConfigError(`--${kebab(name)}: expected a boolean, got "${raw}"`);
    case 'int': {
      const value = Number(raw);
      if (!Number.isInteger(value)) throw new ConfigError(`--${kebab(name)}: expected an integer, got "${raw}"`);
      return value;
    }
    case 'number': {
      const value = Number(raw);
      if (!Number.isFinite(value)) throw new ConfigError(`--${kebab(name)}: expected a number, got "${raw}"`);
      return value;
    }
  }
}

/**
 * Parses `--name value`, `--name=value` and `--flag`/`--no-flag` (booleans); flag names are the
 * spec keys in kebab case (`maxBatch` -> `--max-batch`). Precedence: flag, environment, default.
 * Unknown flags and missing values throw ConfigError; `--help` throws HelpRequested with the usage.
 */
export function parseFlags<S extends Record<string, FlagSpec>>(
  spec: S,
  argv: readonly string[] = process.argv.slice(2),
  env: NodeJS.ProcessEnv = process.env,
): FlagValues<S> {
  const byFlag = new Map<string, string>();
  for (const key of Object.keys(spec)) byFlag.set(kebab(key), key);
  const raw = new Map<string, string | boolean>();
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--help' || arg === '-h') throw new HelpRequested(usage(spec));
    if (!arg.startsWith('--')) throw new ConfigError(`unexpected argument "${arg}"\n${usage(spec)}`);
    const eq = arg.indexOf('=');
    const flag = eq >= 0 ? arg.slice(2, eq) : arg.slice(2);
    let key = byFlag.get(flag);
    if (key === undefined && flag.startsWith('no-') && eq < 0) {
      key = byFlag.get(flag.slice(3));
      if (key !== undefined && spec[key].type === 'boolean') {
        raw.set(key, false);
        continue;
      }
      key = undefined;
    }
    if (key === undefined) throw new ConfigError(`unknown flag --${flag}\n${usage(spec)}`);
    if (eq >= 0) {
      raw.set(key, arg.slice(eq + 1));
    } else if (spec[key].type === 'boolean') {
      raw.set(key, true);
    } else {
      if (i + 1 >= argv.length) throw new ConfigError(`--${flag} needs a value`);
      raw.set(key, argv[++i]);
    }
  }
  const out: Record<string, string | number | boolean> = {};
  for (const [key, s] of Object.entries(spec)) {
    const given = raw.get(key) ?? (s.env !== undefined ? env[s.env] : undefined);
    if (given !== undefined) out[key] = convert(key, s, given);
    else if (s.default !== undefined) out[key] = s.default;
    else out[key] = s.type === 'string' ? '' : s.type === 'boolean' ? false : 0;
  }
  return out as FlagValues<S>;
}

/** The usage text of a flag spec: one line per flag with its env variable and default. */
export function usage(spec: Record<string, FlagSpec>): string {
  const lines = ['flags:'];
  for (const [key, s] of Object.entries(spec)) {
    const extra = [s.env ? `env ${s.env}` : '', s.default !== undefined ? `default ${JSON.stringify(s.default)}` : ''].filter(Boolean).join(', ');
    lines.push(`  --${kebab(key)} <${s.type}>  ${s.help}${extra ? ` (${extra})` : ''}`);
  }
  return lines.join('\n');
}
