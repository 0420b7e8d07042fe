// Connection age limits of the server bootstrap: the flags (and CFRSAM_MAX_CONNECTION_AGE_MS) give
// startServer grpc.max_connection_age_ms and its grace, and a real server over loopback closes an
// aged connection so that the client reconnects (and, behind a Service, may reach a new replica).
import { connectivityState, credentials, makeGenericClientConstructor, type ServiceError } from '@grpc/grpc-js';
import { service as healthService } from 'grpc-health-check';
import { describe, expect, it } from 'vitest';
import { ConfigError, connectionAgeFromFlags, parseFlags, serverChannelOptions, stageServiceFlags, stagesProto, startServer } from '@cfrsam/rpc';

describe('connection age', () => {
  it('is off by default and read from --max-connection-age-ms or CFRSAM_MAX_CONNECTION_AGE_MS', () => {
    const flags = stageServiceFlags(50000);
    const off = connectionAgeFromFlags(parseFlags(flags, [], {}));
    expect(serverChannelOptions(1 << 20, off)).not.toHaveProperty('grpc.max_connection_age_ms');
    const fromEnv = connectionAgeFromFlags(parseFlags(flags, [], { CFRSAM_MAX_CONNECTION_AGE_MS: '300000' }));
    expect(serverChannelOptions(1 << 20, fromEnv)).toMatchObject({
      'grpc.max_connection_age_ms': 300_000,
      'grpc.max_connection_age_grace_ms': 60_000,
    });
    const fromFlags = connectionAgeFromFlags(parseFlags(flags, ['--max-connection-age-ms', '1000', '--max-connection-age-grace-ms=500'], {}));
    expect(serverChannelOptions(1 << 20, fromFlags)).toMatchObject({ 'grpc.max_connection_age_ms': 1000, 'grpc.max_connection_age_grace_ms': 500 });
    expect(() => connectionAgeFromFlags(parseFlags(flags, ['--max-connection-age-ms', '-1'], {}))).toThrow(ConfigError);
  });

  it('closes an aged connection; the client reconnects on its next call', async () => {
    const running = await startServer({
      name: 'age-test',
      port: 0,
      host: '127.0.0.1',
      services: [{ name: 'cfrsam.v1.Encoder', definition: stagesProto.EncoderService, implementation: {} }],
      connectionAge: { maxConnectionAgeMs: 200, maxConnectionAgeGraceMs: 100 },
      log: () => undefined,
    });
    const Health = makeGenericClientConstructor(healthService, 'grpc.health.v1.Health');
    const health = new Health(running.address, credentials.createInsecure()) as any;
    const check = () =>
      new Promise<string>((resolve, reject) =>
        health.check({ service: '' }, (err: ServiceError | null, res: { status: string }) => (err ? reject(err) : resolve(res.status))),
      );
    try {
      expect(await check()).toBe('SERVING');
      expect(health.getChannel().getConnectivityState(false)).toBe(connectivityState.READY);
      // GOAWAY after 200 ms (+-10% jitter): the channel drops to IDLE.
      const deadline = Date.now() + 3_000;
      while (health.getChannel().getConnectivityState(false) === connectivityState.READY && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 20));
      }
      expect(health.getChannel().getConnectivityState(false)).not.toBe(connectivityState.READY);
      expect(await check()).toBe('SERVING');
    } finally {
      health.close();
      await running.shutdown();
    }
  });
});
