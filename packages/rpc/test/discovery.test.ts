import { describe, expect, it } from 'vitest';
import { ReplicaDiscovery, parseReplicaEntries, systemResolveAll } from '../src/discovery';
import { credentials, makeGenericClientConstructor, type Client } from '@grpc/grpc-js';
import { service as healthService } from 'grpc-health-check';
import { ReplicaSet } from '../src/replicas';

describe('replica discovery', () => {
  it('splits static addresses from dns:/// names and rejects malformed ones', () => {
    expect(parseReplicaEntries(['10.0.0.1:50054', 'dns:///decoder-headless.cfrsam.svc:50054', 'dns:decoder:1'])).toEqual({
      fixed: ['10.0.0.1:50054'],
      dns: [
        { host: 'decoder-headless.cfrsam.svc', port: 50054 },
        { host: 'decoder', port: 1 },
      ],
    });
    expect(() => parseReplicaEntries(['dns:///no-port'])).toThrow(/dns:\/\/\/HOST:PORT/);
  });

  it('reports every resolved replica, follows changes and keeps the last answer when DNS fails', async () => {
    const answers: Array<string[] | Error> = [['10.0.0.2', '10.0.0.1'], ['10.0.0.1', '10.0.0.3', 'fd00::7'], new Error('SERVFAIL'), []];
    const seen: string[][] = [];
    const logs: string[] = [];
    const discovery = new ReplicaDiscovery(
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

  it('a replica set takes new replicas and stops choosing removed ones', () => {
    const Ctor = makeGenericClientConstructor(healthService, 'grpc.health.v1.Health');
    const set = new ReplicaSet<Client>({
      stage: 'decoder',
      targets: ['127.0.0.1:1'],
      makeClient: (a) => new Ctor(a, credentials.createInsecure()),
      retireAfterMs: 10,
    });
    set.setAddresses(['127.0.0.1:2', '127.0.0.1:3']);
    expect(set.addresses.sort()).toEqual(['127.0.0.1:2', '127.0.0.1:3']);
    set.setAddresses([]); // an empty list never empties the set
    expect(set.addresses.sort()).toEqual(['127.0.0.1:2', '127.0.0.1:3']);
    set.setAddresses(['127.0.0.1:1', '127.0.0.1:3']);
    expect(set.addresses.sort()).toEqual(['127.0.0.1:1', '127.0.0.1:3']);
    set.close();
  });
});
