import { describe, expect, it } from 'vitest';
import { DecoderDiscovery, parseDecoderEntries, systemResolveAll } from '../src/decoderDiscovery';
import { DecoderFleet } from '../src/decoderFleet';

describe('decoder discovery', () => {
  it('splits static addresses from dns:/// names and rejects malformed ones', () => {
    expect(parseDecoderEntries(['10.0.0.1:50054', 'dns:///decoder-headless.cfrsam.svc:50054', 'dns:decoder:1'])).toEqual({
      fixed: ['10.0.0.1:50054'],
      dns: [
        { host: 'decoder-headless.cfrsam.svc', port: 50054 },
        { host: 'decoder', port: 1 },
      ],
    });
    expect(() => parseDecoderEntries(['dns:///no-port'])).toThrow(/dns:\/\/\/HOST:PORT/);
  });

  it('reports every resolved replica, follows changes and keeps the last answer when DNS fails', async () => {
    const answers: Array<string[] | Error> = [['10.0.0.2', '10.0.0.1'], ['10.0.0.1', '10.0.0.3', 'fd00::7'], new Error('SERVFAIL'), []];
    const seen: string[][] = [];
    const logs: string[] = [];
    const discovery = new DecoderDiscovery(
      ['127.0.0.1:50054', 'dns:///decoders:50054'],
      (a) => seen.push(a),
      1000,
      async () => {
        const next = answers.shift()!;
        if (next instanceof Error) throw next;
        return next;
      },
      (m) => logs.push(m),
    );
    expect(discovery.dynamic).toBe(true);
    expect(await discovery.refresh()).toEqual(['10.0.0.1:50054', '10.0.0.2:50054', '127.0.0.1:50054']);
    expect(await discovery.refresh()).toEqual(['10.0.0.1:50054', '10.0.0.3:50054', '127.0.0.1:50054', '[fd00::7]:50054']);
    // A failure and an empty answer keep the previous replicas of that name.
    expect(await discovery.refresh()).toEqual(['10.0.0.1:50054', '10.0.0.3:50054', '127.0.0.1:50054', '[fd00::7]:50054']);
    expect(await discovery.refresh()).toEqual(['10.0.0.1:50054', '10.0.0.3:50054', '127.0.0.1:50054', '[fd00::7]:50054']);
    expect(seen).toHaveLength(2);
    expect(logs.join('\n')).toMatch(/SERVFAIL/);
  });

  it('resolves a real name with the system resolver', async () => {
    const ips = await systemResolveAll('localhost');
    expect(ips.some((ip) => ip === '127.0.0.1' || ip === '::1')).toBe(true);
  });

  it('a fleet takes new replicas and stops choosing removed ones', () => {
    const fleet = new DecoderFleet({
      addresses: ['127.0.0.1:1'],
      modelVersion: 'v',
      replicasPerTile: 2,
      batchSize: 16,
      maxCalls: 4,
      cooldownMs: 1000,
    } as ConstructorParameters<typeof DecoderFleet>[0]);
    fleet.setAddresses(['127.0.0.1:2', '127.0.0.1:3']);
    expect(fleet.addresses.sort()).toEqual(['127.0.0.1:2', '127.0.0.1:3']);
    fleet.setAddresses([]); // an empty list never empties the fleet
    expect(fleet.addresses.sort()).toEqual(['127.0.0.1:2', '127.0.0.1:3']);
    fleet.setAddresses(['127.0.0.1:1', '127.0.0.1:3'], 10);
    expect(fleet.addresses.sort()).toEqual(['127.0.0.1:1', '127.0.0.1:3']);
    fleet.close();
  });
});
