// The authenticator's rules without a network: token files (bad ones refused at start with a
// message naming the problem, a bad edit later ignored), rights, the internal token, and the flag
// combinations a service refuses to start with.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Metadata, status } from '@grpc/grpc-js';
import { afterAll, describe, expect, it } from 'vitest';
import { CallAuthenticator, hashToken, hasRight, INTERNAL_IDENTITY, parseTokenFile, tlsFromFlags } from '../src/auth';
import { makeClient, unary } from '../src/client';
import { ConfigError } from '../src/config';
import { stagesProto } from '../src';
import type { CallIdentity } from '../src/identity';
import { unaryHandler } from '../src/rpc';
import { startServer } from '../src/server';
import { StatusError } from '../src/status';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cfrsam-auth-unit-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

const flags = { tlsCert: '', tlsKey: '', tlsClientCa: '', authTokens: '', internalToken: '' };

describe('token files', () => {
  it('refuse malformed entries with a message naming the entry and the field', () => {
    expect(() => parseTokenFile('not json', 'tokens.json')).toThrow(/tokens.json: not JSON/);
    expect(() => parseTokenFile('{"tokens": {}}', 'tokens.json')).toThrow(/expected \{"tokens": \[...\]\}/);
    expect(() => parseTokenFile('{"tokens": [{"sha256": "secret", "identity": "a", "rights": ["*"]}]}', 'f')).toThrow(
      /tokens\[0\]\.sha256 must be 64 lowercase hex digits \(the SHA-256 of the token, never the token\)/,
    );
    const sha256 = hashToken('t');
    expect(() => parseTokenFile(JSON.stringify({ tokens: [{ sha256, identity: '', rights: [] }] }), 'f')).toThrow(/tokens\[0\]\.identity/);
    expect(() => parseTokenFile(JSON.stringify({ tokens: [{ sha256, identity: 'a', rights: 'all' }] }), 'f')).toThrow(/tokens\[0\]\.rights/);
    expect(parseTokenFile(JSON.stringify({ tokens: [{ sha256, identity: 'a', rights: ['*'] }] }), 'f')).toEqual([
      { sha256, identity: 'a', rights: ['*'] },
    ]);
  });

  it('keep the previous tokens when the file is later replaced by a broken one', async () => {
    const file = path.join(dir, 'tokens.json');
    fs.writeFileSync(file, JSON.stringify({ tokens: [{ sha256: hashToken('alpha'), identity: 'alpha', rights: ['*'] }] }));
    const logs: string[] = [];
    const auth = new CallAuthenticator({ tokenFile: file, reloadIntervalMs: 50, log: (m) => logs.push(m) });
    try {
      expect(auth.authenticate('Bearer alpha', 'x.Y/Z')).toMatchObject({ id: 'alpha', authenticated: true });
      // The file watcher takes its baseline stat on its first poll; a change before it is no change.
      await new Promise((r) => setTimeout(r, 300));
      fs.writeFileSync(file, '{ broken');
      for (let i = 0; i < 200 && logs.length === 0; i++) await new Promise((r) => setTimeout(r, 50)); // up to 10 s on a busy machine
      expect(logs.join('\n')).toMatch(/keeping the previous tokens/);
      expect(auth.authenticate('Bearer alpha', 'x.Y/Z')).toMatchObject({ id: 'alpha' });
    } finally {
      auth.close();
    }
    expect(() => new CallAuthenticator({ tokenFile: path.join(dir, 'absent.json') })).toThrow(ConfigError);
  });
});

describe('rights and tokens', () => {
  it('grant a method, a whole service or everything', () => {
    expect(hasRight(['cfrsam.v1.Segmentation/Segment'], 'cfrsam.v1.Segmentation/Segment')).toBe(true);
    expect(hasRight(['cfrsam.v1.Segmentation/Segment'], 'cfrsam.v1.Segmentation/Refine')).toBe(false);
    expect(hasRight(['cfrsam.v1.Segmentation/*'], 'cfrsam.v1.Segmentation/Refine')).toBe(true);
    expect(hasRight(['cfrsam.v1.Segmentation/*'], 'cfrsam.v1.Encoder/Encode')).toBe(false);
    expect(hasRight(['*'], 'cfrsam.v1.Encoder/Encode')).toBe(true);
    expect(hasRight([], 'cfrsam.v1.Encoder/Encode')).toBe(false);
  });

  it('take the internal token as the internal identity, and nothing else without a grant', () => {
    const auth = new CallAuthenticator({ internalToken: 'shared-secret' });
    expect(auth.enabled).toBe(true);
    expect(auth.authenticate('Bearer shared-secret', 'cfrsam.v1.Encoder/Encode')).toEqual({
      id: INTERNAL_IDENTITY,
      authenticated: true,
      rights: ['*'],
    });
    for (const header of [undefined, '', 'shared-secret', 'Basic c2hhcmVkLXNlY3JldA==', 'Bearer shared-secre', 'Bearer shared-secret extra']) {
      const refused = auth.authenticate(header, 'cfrsam.v1.Encoder/Encode');
      expect(refused, String(header)).toBeInstanceOf(StatusError);
      expect((refused as StatusError).code).toBe(status.UNAUTHENTICATED);
    }
    expect(new CallAuthenticator({}).enabled).toBe(false);
  });
});

describe('TLS flags', () => {
  it('go together, or the service refuses to start', () => {
    expect(tlsFromFlags(flags)).toBeUndefined();
    expect(() => tlsFromFlags({ ...flags, tlsCert: 'a.pem' })).toThrow(/--tls-cert and --tls-key go together/);
    expect(() => tlsFromFlags({ ...flags, tlsClientCa: 'ca.pem' })).toThrow(/--tls-client-ca needs --tls-cert and --tls-key/);
    expect(tlsFromFlags({ ...flags, tlsCert: 'a.pem', tlsKey: 'a.key', tlsClientCa: 'ca.pem' })).toEqual({
      certFile: 'a.pem',
      keyFile: 'a.key',
      clientCaFile: 'ca.pem',
    });
  });
});

describe('a server with tokens', () => {
  it("hands the handler the verified identity, and never the caller's secret", async () => {
    const seen: Array<{ identity: CallIdentity; authorization: unknown[] }> = [];
    const grants = [{ sha256: hashToken('lab-token'), identity: 'lab-a', rights: ['cfrsam.v1.Encoder/GetCacheStats'] }];
    const server = await startServer({
      name: 'auth-unit',
      port: 0,
      host: '127.0.0.1',
      reflection: false,
      log: () => undefined,
      auth: new CallAuthenticator({ grants }),
      services: [
        {
          name: 'cfrsam.v1.Encoder',
          definition: stagesProto.EncoderService,
          implementation: {
            getCacheStats: unaryHandler('cfrsam.v1.Encoder/GetCacheStats', async (_request: stagesProto.CacheStatsRequest, ctx) => {
              seen.push({ identity: ctx.identity, authorization: ctx.metadata.get('authorization') });
              return stagesProto.CacheStats.fromPartial({});
            }),
            encode: unaryHandler('cfrsam.v1.Encoder/Encode', async () => stagesProto.EncodeResponse.fromPartial({})),
          },
        },
      ],
    });
    const client = makeClient(stagesProto.EncoderClient, server.address);
    try {
      const md = new Metadata();
      md.set('authorization', 'Bearer lab-token');
      md.set('x-client-id', 'pretending-to-be-someone');
      await unary(client, client.getCacheStats, {}, { metadata: md });
      expect(seen).toEqual([{ identity: { id: 'lab-a', authenticated: true, rights: grants[0].rights }, authorization: [] }]);
      // The right is per method: Encode is not granted.
      await expect(unary(client, client.encode, stagesProto.EncodeRequest.fromPartial({}), { metadata: md })).rejects.toMatchObject({
        code: status.PERMISSION_DENIED,
      });
    } finally {
      client.close();
      await server.shutdown('test over');
    }
  });
});
