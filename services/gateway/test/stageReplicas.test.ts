// Failover over prompter/encoder replicas, against real gRPC on loopback: a live server (the
// standard health service) and an address where nothing listens (connection refused).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { credentials, makeGenericClientConstructor, Server, ServerCredentials, status, type Client, type ServiceError } from '@grpc/grpc-js';
import { HealthImplementation, service as healthService } from 'grpc-health-check';
import { StageReplicas } from '../src/stageReplicas';
import { freePort } from '../src/cli/stack';

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
  return new StageReplicas<HealthClient>({
    stage: 'encoder',
    addresses,
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
