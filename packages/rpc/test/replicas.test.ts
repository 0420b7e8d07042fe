// The one replica policy (ReplicaSet), against real gRPC on loopback: a live server (the standard
// health service) and an address where nothing listens (connection refused); failure classes by
// status code and ErrorInfo; DNS discovery with a fake resolver.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  credentials,
  makeGenericClientConstructor,
  Metadata,
  Server,
  ServerCredentials,
  status,
  type Client,
  type ServiceError,
} from '@grpc/grpc-js';
import { HealthImplementation, service as healthService } from 'grpc-health-check';
import { isReplicaFailure, rendezvousOrder, ReplicaSet } from '../src/replicas';
import { ErrorReason, grpcError } from '../src/status';
import { freePort } from '@cfrsam/testing';

type HealthClient = Client & {
  check(req: { service: string }, opts: { deadline: number }, cb: (err: ServiceError | null, res: { status: string }) => void): void;
};
const HealthClientCtor = makeGenericClientConstructor(healthService, 'grpc.health.v1.Health');

function check(client: HealthClient, service = ''): Promise<string> {
  return new Promise((resolve, reject) =>
    client.check({ service }, { deadline: Date.now() + 5_000 }, (err, res) => (err ? reject(err) : resolve(res.status))),
  );
}

let server: Server;
let live: string;
let dead: string;

beforeAll(async () => {
  server = new Server();
  new HealthImplementation({ '': 'SERVING' }).addToServer(server);
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
  );
  live = `127.0.0.1:${port}`;
  dead = `127.0.0.1:${await freePort()}`;
});

afterAll(() => {
  server?.forceShutdown();
});

function replicas(addresses: string[], failed: string[] = []) {
  return new ReplicaSet<HealthClient>({
    stage: 'encoder',
    targets: addresses,
    makeClient: (a) => new HealthClientCtor(a, credentials.createInsecure()) as unknown as HealthClient,
    cooldownMs: 60_000,
    onFailover: (r) => failed.push(r),
  });
}

describe('stage replicas', () => {
  it('fails over from an unreachable replica and puts it last while it cools down', async () => {
    const failed: string[] = [];
    const r = replicas([dead, live], failed);
    try {
      expect(await r.call([dead, live], (c) => check(c), {})).toBe('SERVING');
      expect(failed).toEqual([dead]);
      expect(r.failovers).toBe(1);
      for (const key of ['a', 'b', 'c', 'd']) expect(r.orderFor(key)).toEqual([live, dead]);
      expect(r.roundRobin()).toEqual([live, dead]);
      expect(r.roundRobin()).toEqual([live, dead]);
    } finally {
      r.close();
    }
  });

  it('spreads keys by rendezvous and rotates round-robin while all are healthy', () => {
    const r = replicas([dead, live]);
    try {
      const firsts = new Set(Array.from({ length: 32 }, (_, i) => r.orderFor(`tile-${i}`)[0]));
      expect(firsts).toEqual(new Set([dead, live]));
      expect(r.orderFor('tile-7')).toEqual(r.orderFor('tile-7'));
      expect([r.roundRobin()[0], r.roundRobin()[0]]).toEqual([dead, live]);
    } finally {
      r.close();
    }
  });

  it('answers UNAVAILABLE naming the replicas tried when none answers', async () => {
    const r = replicas([dead]);
    try {
      await expect(r.call([dead], (c) => check(c), {})).rejects.toMatchObject({
        code: status.UNAVAILABLE,
        details: expect.stringMatching(new RegExp(`no encoder replica answered \\(tried ${dead.replace(/\./g, '\\.')}\\)`)),
      });
    } finally {
      r.close();
    }
  });

  it('passes other statuses through without failing over', async () => {
    const failed: string[] = [];
    const r = replicas([live, dead], failed);
    try {
      await expect(r.call([live, dead], (c) => check(c, 'no-such-service'), {})).rejects.toMatchObject({ code: status.NOT_FOUND });
      expect(failed).toEqual([]);
    } finally {
      r.close();
    }
  });
});

describe('failure classes', () => {
  const transport = (code: number) => Object.assign(new Error('x'), { code, details: 'Received RST_STREAM with code 2', metadata: new Metadata() });
  it('fails over on UNAVAILABLE and RESOURCE_EXHAUSTED from anywhere', () => {
    expect(isReplicaFailure(transport(status.UNAVAILABLE))).toBe(true);
    expect(isReplicaFailure(grpcError(status.RESOURCE_EXHAUSTED, 'queue full'))).toBe(true);
  });
  it('fails over on INTERNAL/UNKNOWN/CANCELLED only when the transport raised them (no ErrorInfo)', () => {
    for (const code of [status.INTERNAL, status.UNKNOWN, status.CANCELLED]) {
      expect(isReplicaFailure(transport(code))).toBe(true);
      // The same code from a handler carries our ErrorInfo: a real answer, not a dead replica,
      // whatever its message says.
      expect(isReplicaFailure(grpcError(code, 'connection reset by the model (ECONNRESET)'))).toBe(false);
    }
  });
  it('never fails over on client errors', () => {
    expect(isReplicaFailure(grpcError(status.INVALID_ARGUMENT, 'bad'))).toBe(false);
    expect(isReplicaFailure(grpcError(status.FAILED_PRECONDITION, 'x', { reason: ErrorReason.NOT_PREPARED }))).toBe(false);
    expect(isReplicaFailure(new Error('plain'))).toBe(false);
  });
});

describe('rendezvous hashing', () => {
  it('is stable, a permutation, spreads keys, and moves only the keys of a removed replica', () => {
    const replicas = ['a:1', 'b:2', 'c:3', 'd:4'];
    const first = new Map<string, number>();
    for (let i = 0; i < 400; i++) {
      const key = `digest-${i}`;
      const order = rendezvousOrder(replicas, key);
      expect([...order].sort()).toEqual(replicas);
      expect(rendezvousOrder(replicas, key)).toEqual(order);
      first.set(order[0], (first.get(order[0]) ?? 0) + 1);
      const without = rendezvousOrder(
        replicas.filter((r) => r !== 'b:2'),
        key,
      );
      expect(without).toEqual(order.filter((r) => r !== 'b:2'));
    }
    for (const r of replicas) expect(first.get(r)!).toBeGreaterThan(60);
  });

  it('spreads the calls of one key over its top-k replicas', () => {
    const r = replicas(['a:1', 'b:2', 'c:3', 'd:4']);
    try {
      const homes = new Set([0, 1, 2, 3, 4, 5].map((i) => r.spreadOrderFor('tile', i, 2)[0]));
      expect(homes).toEqual(new Set(r.orderFor('tile').slice(0, 2)));
      expect([...r.spreadOrderFor('tile', 1, 2)].sort()).toEqual(['a:1', 'b:2', 'c:3', 'd:4']);
    } finally {
      r.close();
    }
  });
});

describe('discovery', () => {
  it('resolves dns:/// targets into one replica per address and follows changes', async () => {
    const answers = [['10.0.0.2', '10.0.0.1'], ['10.0.0.3']];
    const r = new ReplicaSet<HealthClient>({
      stage: 'decoder',
      targets: ['dns:///decoders:50054'],
      makeClient: (a) => new HealthClientCtor(a, credentials.createInsecure()) as unknown as HealthClient,
      resolveIntervalMs: 60_000,
      resolveAll: async () => answers.shift() ?? ['10.0.0.3'],
    });
    try {
      expect(r.addresses).toEqual([]);
      await r.start();
      expect(r.addresses.sort()).toEqual(['10.0.0.1:50054', '10.0.0.2:50054']);
      r.setAddresses(['10.0.0.3:50054']);
      expect(r.addresses).toEqual(['10.0.0.3:50054']);
    } finally {
      r.close();
    }
  });
});
