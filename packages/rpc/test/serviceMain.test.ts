// The stage services' main(): the common flags become the start options every stage service takes.
import { describe, expect, it } from 'vitest';
import { ConfigError, listFlag, parseFlags, stageServiceFlags, stageServiceMainOptions } from '@cfrsam/rpc';

describe('stage service main options', () => {
  it('map the common flags and environment to the start options', async () => {
    const config = parseFlags(stageServiceFlags(50052), ['--workers', '3', '--execution-providers', ' cuda, cpu ,'], {
      CFRSAM_MAX_MESSAGE_MB: '8',
      CFRSAM_INTERNAL_TOKEN: '',
    });
    const options = await stageServiceMainOptions('prompter', config);
    expect(options).toMatchObject({
      port: 50052,
      workers: 3,
      intraOpThreads: 1,
      executionProviders: ['cuda', 'cpu'],
      maxMessageBytes: 8 * 1024 * 1024,
      internalToken: undefined,
      handleSignals: true,
      connectionAge: { maxConnectionAgeMs: 0 },
    });
    await options.onShutdown();
  });

  it('refuse a bad flag before anything starts', async () => {
    const config = parseFlags(stageServiceFlags(50052), ['--max-connection-age-ms', '-5'], {});
    await expect(stageServiceMainOptions('encoder', config)).rejects.toThrow(ConfigError);
    const tracing = parseFlags(stageServiceFlags(50052), ['--tracing', 'zipkin'], {});
    await expect(stageServiceMainOptions('encoder', tracing)).rejects.toThrow(/--tracing must be otlp, memory or none/);
  });

  it('split list flags into trimmed, non-empty items', () => {
    expect(listFlag('a, b,,c ')).toEqual(['a', 'b', 'c']);
    expect(listFlag('')).toEqual([]);
  });
});
