// TLS and bearer tokens on the public API, and the closed stage APIs, against real services over
// loopback: the stage services run with an internal token (only the gateway, which sends it, gets
// through), and a gateway serves TLS from certificate files (reloaded when they change) with a
// token file of two identities. Certificates are made with openssl for each run.
import * as fs from 'node:fs';
import * as https from 'node:https';
import * as os from 'node:os';
import * as path from 'node:path';
import * as tls from 'node:tls';
import { credentials, Metadata, type ChannelCredentials } from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  AuthReason,
  CallAuthenticator,
  errorReason,
  hashToken,
  makeClient,
  segmentationProto,
  startServer,
  stagesProto,
  status,
  unary,
  type RunningServer,
} from '@cfrsam/rpc';
import { makeTestCertificates } from '@cfrsam/testing';
import { startGateway, type RunningGateway } from '../services/gateway/dist/server';
import { checkHealth } from '../services/gateway/dist/cli/stack';
import { startTestStack, type TestStack } from './stack';
import { blobGrid, syntheticPng } from './synthetic';

const INTERNAL_TOKEN = 'internal-secret-for-this-test';
const LAB_TOKEN = 'lab-a-token-0123456789';
const VIEWER_TOKEN = 'viewer-token-9876543210';

let dir: string;
let stack: TestStack;
let gateway: RunningGateway;
let httpPort: number;
let stackHttp: string;

/** A CA, and `name`.pem/.key signed by it for 127.0.0.1 and localhost. */
const makeCertificates = (name: string, cn: string) => makeTestCertificates(dir, name, cn);

const file = (name: string) => path.join(dir, name);
const tlsCredentials = (): ChannelCredentials => credentials.createSsl(fs.readFileSync(file('ca.pem')));
const bearer = (token: string) => {
  const md = new Metadata();
  md.set('authorization', `Bearer ${token}`);
  return md;
};

beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cfrsam-auth-'));
  makeCertificates('server', 'gateway one');
  makeCertificates('client', 'a client');
  fs.writeFileSync(
    file('tokens.json'),
    JSON.stringify({
      tokens: [
        { sha256: hashToken(LAB_TOKEN), identity: 'lab-a', rights: ['cfrsam.v1.Segmentation/*'] },
        { sha256: hashToken(VIEWER_TOKEN), identity: 'viewer', rights: ['cfrsam.v1.Segmentation/GetModelInfo'] },
      ],
    }),
  );
  const internal = ['--internal-token', INTERNAL_TOKEN];
  stack = await startTestStack({
    decoders: 1,
    args: { prompter: internal, encoder: internal, decoder: internal, gateway: [...internal, '--http-port', '0'] },
  });
  stackHttp = stack.http;
  // A second gateway in this process, in front of the same stages: TLS and client tokens.
  gateway = await startGateway({
    port: 0,
    host: '127.0.0.1',
    bundle: path.join(__dirname, '..', 'models', 'tiny'),
    prompter: stack.prompter,
    encoder: stack.encoder,
    decoders: stack.decoders,
    httpPort: 0,
    tls: { certFile: file('server.pem'), keyFile: file('server.key'), refreshIntervalMs: 200 },
    auth: new CallAuthenticator({ tokenFile: file('tokens.json'), reloadIntervalMs: 200 }),
    internalToken: INTERNAL_TOKEN,
  });
  httpPort = gateway.http!.port;
}, 180_000);

afterAll(async () => {
  await gateway?.server.shutdown('test over');
  await stack?.close();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe('closed stage APIs', () => {
  it('refuse a caller without the internal token and serve the gateway, which has it', async () => {
    const blobs = blobGrid([60, 180], [80]);
    const png = await syntheticPng(256, 256, blobs);
    const tile = { digest: 'a'.repeat(64), rgb: Buffer.alloc(0) };
    // From outside the gateway: no token, a wrong one.
    await expect(
      unary(stack.encoderClient, stack.encoderClient.encode, { tiles: [tile], modelVersion: '', returnFeatures: true }),
    ).rejects.toMatchObject({
      code: status.UNAUTHENTICATED,
    });
    const withWrong = makeClient(stagesProto.DecoderClient, stack.decoders[0], { bearerToken: 'guess' });
    const wrong = unary(withWrong, withWrong.decode, { digest: 'a'.repeat(64), prompts: [], modelVersion: '' } as never);
    await expect(wrong).rejects.toMatchObject({ code: status.UNAUTHENTICATED });
    expect(errorReason(await wrong.catch((e: unknown) => e))).toBe(AuthReason.TOKEN_INVALID);
    withWrong.close();
    // Health stays open to probes.
    expect(await checkHealth(stack.encoder)).toBe('SERVING');
    // The gateway's own calls get through (Detect, Encode, Prepare, Decode, and the decoder's fetch).
    const response = await unary(
      stack.segmentation,
      stack.segmentation.segment,
      segmentationProto.SegmentRequest.fromPartial({ image: png, prompts: blobs.map((b) => ({ positive: [{ x: b.x, y: b.y }] })), mpp: 0.25 }),
    );
    expect(response.nuclei.length).toBeGreaterThanOrEqual(1);
  }, 120_000);
});

describe('structured logs and spans', () => {
  it('write one JSON line per request with identity, status, duration and trace ids, never image bytes', async () => {
    const png = await syntheticPng(256, 256, blobGrid([100], [100]), 5);
    await unary(stack.segmentation, stack.segmentation.segment, segmentationProto.SegmentRequest.fromPartial({ image: png, mpp: 0.25 }));
    // A refused stage call is logged too (the handler never ran).
    await unary(stack.encoderClient, stack.encoderClient.getCacheStats, {}).catch(() => undefined);
    await new Promise((r) => setTimeout(r, 200));
    const lines = (name: string) => (stack.logs.get(name) ?? []).map((line) => JSON.parse(line) as Record<string, unknown>);
    for (const name of ['gateway', 'prompter', 'encoder', 'decoder-0']) {
      for (const line of lines(name))
        expect(line, `${name}: ${JSON.stringify(line)}`).toMatchObject({ service: name.replace(/-\d+$/, ''), level: expect.any(String) });
    }
    const requests = (name: string) => lines(name).filter((l) => l.msg === 'request');
    const segment = requests('gateway').find((l) => l.method === 'cfrsam.v1.Segmentation/Segment' && l.code === 'OK');
    expect(segment).toMatchObject({
      identity: expect.stringMatching(/^peer:/),
      durationMs: expect.any(Number),
      traceId: expect.stringMatching(/^[0-9a-f]{32}$/),
      spanId: expect.stringMatching(/^[0-9a-f]{16}$/),
    });
    // The stage calls of that request: in its trace, made by the gateway as the internal identity.
    const encodes = requests('encoder').filter((l) => l.method === 'cfrsam.v1.Encoder/Encode' && l.traceId === segment!.traceId);
    expect(encodes.length).toBeGreaterThan(0);
    expect(encodes[0]).toMatchObject({ identity: 'internal', authenticated: true, code: 'OK' });
    expect(requests('encoder').find((l) => l.method === 'cfrsam.v1.Encoder/GetCacheStats')).toMatchObject({
      code: 'UNAUTHENTICATED',
      authenticated: false,
    });
    const imageText = png.toString('base64').slice(100, 164);
    for (const name of stack.logs.keys()) expect((stack.logs.get(name) ?? []).join('\n')).not.toContain(imageText);

    // Spans: rpc.* attributes, the caller's identity, service.version = the model version.
    const version = (JSON.parse(fs.readFileSync(path.join(__dirname, '..', 'models', 'tiny', 'manifest.json'), 'utf8')) as { version: string })
      .version;
    const encodeSpan = stack.spans('encoder').find((sp) => sp.kind === 'SERVER' && sp.traceId === segment!.traceId);
    expect(encodeSpan).toMatchObject({
      serviceVersion: version,
      attributes: {
        'rpc.system': 'grpc',
        'rpc.service': 'cfrsam.v1.Encoder',
        'rpc.method': 'Encode',
        'enduser.id': 'internal',
        'rpc.grpc.status_code': 0,
      },
    });
  }, 120_000);

  it('logs HTTP/JSON requests the same way, in the trace of the traceparent header they carry', async () => {
    const traceId = 'ab'.repeat(16);
    const png = await syntheticPng(256, 256, blobGrid([90], [150]), 6);
    const res = await fetch(`http://${stackHttp}/v1/segment`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', traceparent: `00-${traceId}-${'cd'.repeat(8)}-01` },
      body: JSON.stringify({ image: png.toString('base64'), mpp: 0.25 }),
    });
    expect(res.status).toBe(200);
    await res.arrayBuffer();
    await new Promise((r) => setTimeout(r, 200));
    const requestLines = (name: string) =>
      (stack.logs.get(name) ?? [])
        .map((line) => JSON.parse(line) as Record<string, unknown>)
        .filter((l) => l.msg === 'request' && l.traceId === traceId);
    expect(requestLines('gateway')).toContainEqual(
      expect.objectContaining({ method: 'POST /v1/segment', code: 'OK', identity: expect.stringMatching(/^peer:/) }),
    );
    expect(requestLines('encoder')).toContainEqual(expect.objectContaining({ method: 'cfrsam.v1.Encoder/Encode', identity: 'internal' }));
  }, 60_000);

  it('marks a server span ERROR only for a server fault, not for bad input', async () => {
    const bad = unary(
      stack.segmentation,
      stack.segmentation.segment,
      segmentationProto.SegmentRequest.fromPartial({ image: Buffer.from('not an image') }),
    );
    await expect(bad).rejects.toMatchObject({ code: status.INVALID_ARGUMENT });
    await new Promise((r) => setTimeout(r, 200));
    const span = stack
      .spans('gateway')
      .filter((sp) => sp.kind === 'SERVER' && sp.attributes['rpc.grpc.status_code'] === status.INVALID_ARGUMENT)
      .pop();
    expect(span?.status.code).toBe(0); // UNSET
  });
});

describe('TLS and tokens on the public API', () => {
  let client: segmentationProto.SegmentationClient;
  beforeAll(() => {
    client = makeClient(segmentationProto.SegmentationClient, `localhost:${gateway.server.port}`, { credentials: tlsCredentials() });
  });
  afterAll(() => client?.close());

  it('answers UNAUTHENTICATED without a token and with a wrong one, and serves a right one', async () => {
    const info = (md?: Metadata) => unary(client, client.getModelInfo, {}, { metadata: md });
    const none = info();
    await expect(none).rejects.toMatchObject({ code: status.UNAUTHENTICATED });
    expect(errorReason(await none.catch((e: unknown) => e))).toBe(AuthReason.TOKEN_MISSING);
    await expect(info(bearer('not-a-token'))).rejects.toMatchObject({ code: status.UNAUTHENTICATED, details: expect.stringMatching(/not valid/) });
    expect((await info(bearer(LAB_TOKEN))).inputSize).toBeGreaterThan(0);

    const png = await syntheticPng(256, 256, blobGrid([80], [80]));
    const segmented = await unary(client, client.segment, segmentationProto.SegmentRequest.fromPartial({ image: png, mpp: 0.25 }), {
      metadata: bearer(LAB_TOKEN),
    });
    expect(segmented.width).toBe(256);
  }, 120_000);

  it('answers PERMISSION_DENIED to an identity without the right', async () => {
    const png = await syntheticPng(256, 256, blobGrid([80], [80]));
    const denied = unary(client, client.segment, segmentationProto.SegmentRequest.fromPartial({ image: png, mpp: 0.25 }), {
      metadata: bearer(VIEWER_TOKEN),
    });
    await expect(denied).rejects.toMatchObject({ code: status.PERMISSION_DENIED, details: expect.stringMatching(/"viewer" has no right/) });
    expect(errorReason(await denied.catch((e: unknown) => e))).toBe(AuthReason.RIGHT_MISSING);
    expect((await unary(client, client.getModelInfo, {}, { metadata: bearer(VIEWER_TOKEN) })).inputSize).toBeGreaterThan(0);
  });

  it('refuses streaming calls without a token too (server and client streaming)', async () => {
    const serverStream = await new Promise<{ code: number }>((resolve) => {
      const call = client.streamSlideJobNuclei(segmentationProto.StreamSlideJobNucleiRequest.fromPartial({ jobId: 'x' }));
      call.on('data', () => undefined);
      call.on('error', (err: { code: number }) => resolve(err));
    });
    expect(serverStream.code).toBe(status.UNAUTHENTICATED);
    const clientStream = await new Promise<{ code: number }>((resolve) => {
      const call = client.uploadSlide((err: { code: number } | null) => resolve(err ?? { code: status.OK }));
      call.end();
    });
    expect(clientStream.code).toBe(status.UNAUTHENTICATED);
  });

  it('refuses plaintext clients on the TLS port', async () => {
    const plain = makeClient(segmentationProto.SegmentationClient, `127.0.0.1:${gateway.server.port}`);
    await expect(unary(plain, plain.getModelInfo, {}, { metadata: bearer(LAB_TOKEN), timeoutMs: 3000 })).rejects.toMatchObject({
      code: expect.toSatisfy((c: number) => c === status.UNAVAILABLE || c === status.DEADLINE_EXCEEDED),
    });
    plain.close();
  });

  it('checks the same tokens on the HTTPS/JSON API, with /healthz open', async () => {
    const get = (route: string, headers: Record<string, string> = {}) =>
      new Promise<{ status: number; body: string }>((resolve, reject) => {
        const req = https.get({ host: '127.0.0.1', port: httpPort, path: route, ca: fs.readFileSync(file('ca.pem')), headers }, (res) => {
          let body = '';
          res.on('data', (c: Buffer) => (body += c.toString()));
          res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
        });
        req.on('error', reject);
      });
    expect((await get('/healthz')).status).toBe(200);
    const refused = await get('/v1/model');
    expect(refused.status).toBe(401);
    expect(JSON.parse(refused.body)).toMatchObject({ status: 'UNAUTHENTICATED' });
    expect((await get('/v1/model', { authorization: `Bearer ${LAB_TOKEN}` })).status).toBe(200);
    expect((await get('/v1/model', { authorization: 'Bearer wrong' })).status).toBe(401);
    // Every route but /healthz needs the token, including ones added later (GeoJSON).
    const geojson = await new Promise<number>((resolve, reject) => {
      const req = https.request(
        { host: '127.0.0.1', port: httpPort, path: '/v1/segment/geojson', method: 'POST', ca: fs.readFileSync(file('ca.pem')) },
        (res) => {
          res.resume();
          resolve(res.statusCode ?? 0);
        },
      );
      req.on('error', reject);
      req.end('{}');
    });
    expect(geojson).toBe(401);
    expect((await get('/v1/unknown')).status).toBe(401);
  });

  it('serves a renewed certificate once its files change, and picks up a changed token file', async () => {
    const serial = () =>
      new Promise<string>((resolve, reject) => {
        const socket = tls.connect(
          { host: '127.0.0.1', port: gateway.server.port, ca: fs.readFileSync(file('ca.pem')), ALPNProtocols: ['h2'] },
          () => {
            const s = socket.getPeerCertificate().serialNumber;
            socket.end();
            resolve(s);
          },
        );
        socket.on('error', reject);
      });
    const before = await serial();
    makeCertificates('renewed', 'gateway two');
    fs.copyFileSync(file('renewed.key'), file('server.key'));
    fs.copyFileSync(file('renewed.pem'), file('server.pem'));
    let after = before;
    for (let i = 0; i < 50 && after === before; i++) {
      await new Promise((r) => setTimeout(r, 100));
      after = await serial();
    }
    expect(after).not.toBe(before);

    // A token revoked from the file stops working without a restart.
    const tokens = JSON.parse(fs.readFileSync(file('tokens.json'), 'utf8')) as { tokens: Array<{ identity: string }> };
    fs.writeFileSync(file('tokens.json'), JSON.stringify({ tokens: tokens.tokens.filter((t) => t.identity !== 'viewer') }));
    let code = 0;
    for (let i = 0; i < 50 && code !== status.UNAUTHENTICATED; i++) {
      await new Promise((r) => setTimeout(r, 100));
      code = await unary(client, client.getModelInfo, {}, { metadata: bearer(VIEWER_TOKEN) }).then(
        () => 0,
        (e: { code: number }) => e.code,
      );
    }
    expect(code).toBe(status.UNAUTHENTICATED);
  }, 30_000);
});

describe('mutual TLS', () => {
  let server: RunningServer;
  beforeAll(async () => {
    server = await startServer({
      name: 'mtls-test',
      port: 0,
      host: '127.0.0.1',
      services: [],
      reflection: false,
      tls: { certFile: file('server.pem'), keyFile: file('server.key'), clientCaFile: file('ca.pem') },
      log: () => {},
    });
  });
  afterAll(() => server?.shutdown('test over'));

  it('serves clients with a certificate from the CA and refuses clients without one', async () => {
    const health = (creds: ChannelCredentials) => {
      const client = makeClient(segmentationProto.SegmentationClient, `localhost:${server.port}`, { credentials: creds });
      return new Promise<void>((resolve, reject) => client.waitForReady(Date.now() + 3000, (err) => (client.close(), err ? reject(err) : resolve())));
    };
    const ca = fs.readFileSync(file('ca.pem'));
    await expect(
      health(credentials.createSsl(ca, fs.readFileSync(file('client.key')), fs.readFileSync(file('client.pem')))),
    ).resolves.toBeUndefined();
    await expect(health(credentials.createSsl(ca))).rejects.toThrow();
  });
});
