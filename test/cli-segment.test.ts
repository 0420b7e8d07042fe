// `cfrsam segment` against a gateway that serves TLS and checks bearer tokens (real services over
// loopback, certificates made with openssl): --ca and --token connect, a missing token is refused
// with a clear message; two inputs with one name get distinct outputs; --origin, --downsample and
// --qupath-classes put the GeoJSON in the slide's coordinates with QuPath's names; --progress
// reports an ETA.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { PassThrough } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CallAuthenticator, hashToken } from '@cfrsam/rpc';
import { makeTestCertificates, opensslAvailable } from '@cfrsam/testing';
import { startGateway, type RunningGateway } from '../services/gateway/dist/server';
import { runSegment } from '../services/gateway/dist/cli/segment';
import { startTestStack, type TestStack } from './stack';
import { blobGrid, syntheticPng } from './synthetic';

const TOKEN = 'cli-test-token-0123456789';
const hasOpenssl = opensslAvailable();
if (!hasOpenssl) console.warn('skipping the cfrsam segment TLS test: openssl not found (scripts/setup-dev.sh installs it)');

let dir: string;
let stack: TestStack;
let gateway: RunningGateway;

async function cli(args: string[]): Promise<{ code: number; out: string; err: string }> {
  const stdout = new PassThrough();
  const stderr = new PassThrough();
  let out = '';
  let err = '';
  stdout.on('data', (d) => (out += d));
  stderr.on('data', (d) => (err += d));
  const code = await runSegment(args, { stdout, stderr });
  return { code, out, err };
}

describe.skipIf(!hasOpenssl)('cfrsam segment over TLS with a token', () => {
  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cfrsam-cli-'));
    makeTestCertificates(dir, 'server', 'gateway');
    fs.writeFileSync(
      path.join(dir, 'tokens.json'),
      JSON.stringify({ tokens: [{ sha256: hashToken(TOKEN), identity: 'cli', rights: ['cfrsam.v1.Segmentation/*'] }] }),
    );
    stack = await startTestStack({ decoders: 1 });
    // A gateway in this process in front of the same stages, with TLS and tokens.
    gateway = await startGateway({
      port: 0,
      host: '127.0.0.1',
      bundle: path.join(__dirname, '..', 'models', 'tiny'),
      prompter: stack.prompter,
      encoder: stack.encoder,
      decoders: stack.decoders,
      tls: { certFile: path.join(dir, 'server.pem'), keyFile: path.join(dir, 'server.key') },
      auth: new CallAuthenticator({ tokenFile: path.join(dir, 'tokens.json') }),
    });
  }, 180_000);

  afterAll(async () => {
    await gateway?.server.shutdown('test over');
    await stack?.close();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('segments with --ca and --token; distinct outputs for one name; GeoJSON in slide coordinates; progress with ETA', async () => {
    const address = `127.0.0.1:${gateway.server.port}`;
    fs.mkdirSync(path.join(dir, 'a'));
    fs.mkdirSync(path.join(dir, 'b'));
    const blobs = blobGrid([50, 120, 190], [60, 170]);
    fs.writeFileSync(path.join(dir, 'a', 'x.png'), await syntheticPng(256, 256, blobs, 1));
    fs.writeFileSync(path.join(dir, 'b', 'x.png'), await syntheticPng(256, 256, blobs, 2));
    const out = path.join(dir, 'out');
    const common = [path.join(dir, 'a', 'x.png'), path.join(dir, 'b', 'x.png'), '--gateway', address, '--out', out, '--ca', path.join(dir, 'ca.pem')];

    const refused = await cli([...common, '--retries', '0']);
    expect(refused.code).toBe(1);
    expect(refused.err).toMatch(/UNAUTHENTICATED/);

    const r = await cli([
      ...common,
      '--token',
      TOKEN,
      '--origin',
      '5000,7000',
      '--downsample',
      '4',
      '--qupath-classes',
      'inflammatory=Tumor',
      '--progress',
    ]);
    expect(r.code, r.err).toBe(0);
    expect(r.err).toMatch(/a_x\.\* \(another input has the same name\)/);
    expect(r.err).toMatch(/1\/2 images.*elapsed, ETA \d/);
    expect(r.err).toMatch(/2\/2 images.*ETA 0s/);
    for (const name of ['a_x', 'b_x']) {
      for (const ext of ['geojson', 'csv', 'labels.png', 'json', 'overlay.png'])
        expect(fs.existsSync(path.join(out, `${name}.${ext}`)), `${name}.${ext}`).toBe(true);
    }
    const geo = JSON.parse(fs.readFileSync(path.join(out, 'a_x.geojson'), 'utf8')) as {
      properties: { model: { name: string; mpp: number }; image: { origin: number[]; downsample: number } };
      features: Array<{
        geometry: { coordinates: number[][][] };
        properties: { measurements: Record<string, number>; classification?: { name: string } };
      }>;
    };
    expect(geo.properties.model.mpp).toBe(0.25);
    expect(geo.properties.image).toMatchObject({ origin: [5000, 7000], downsample: 4 });
    expect(geo.features.length).toBeGreaterThan(0);
    const csv = fs.readFileSync(path.join(out, 'a_x.csv'), 'utf8').trim().split('\n').slice(1);
    // Every vertex lies in the slide's frame of the 256 x 256 image: [5000, 5000 + 4 * 256).
    for (const f of geo.features) {
      for (const [x, y] of f.geometry.coordinates[0]) {
        expect(x).toBeGreaterThanOrEqual(5000);
        expect(x).toBeLessThanOrEqual(5000 + 4 * 256);
        expect(y).toBeGreaterThanOrEqual(7000);
        expect(y).toBeLessThanOrEqual(7000 + 4 * 256);
      }
      expect(f.properties.measurements['Nucleus ID']).toBeGreaterThan(0);
      expect(f.properties.measurements['Area µm^2']).toBeGreaterThan(0);
      expect(['Other', 'Tumor', 'Epithelial', 'Stroma', undefined]).toContain(f.properties.classification?.name);
    }
    expect(csv).toHaveLength(geo.features.length);

    // --cells 2: QuPath cell objects (the nucleus grown by 2 µm), nucleus outline inside.
    const cellsOut = path.join(dir, 'cells');
    const c = await cli([
      path.join(dir, 'a', 'x.png'),
      '--gateway',
      address,
      '--out',
      cellsOut,
      '--ca',
      path.join(dir, 'ca.pem'),
      '--token',
      TOKEN,
      '--mpp',
      '0.5',
      '--cells',
      '2',
    ]);
    expect(c.code, c.err).toBe(0);
    const cellGeo = JSON.parse(fs.readFileSync(path.join(cellsOut, 'x.geojson'), 'utf8')) as {
      features: Array<{ properties: { objectType: string; nucleusGeometry?: unknown; measurements: Record<string, number> } }>;
    };
    expect(cellGeo.features.length).toBeGreaterThan(0);
    for (const f of cellGeo.features) {
      expect(f.properties.objectType).toBe('cell');
      expect(f.properties.nucleusGeometry).toBeDefined();
      expect(f.properties.measurements['Cell: Area µm^2']).toBeGreaterThan(f.properties.measurements['Nucleus: Area µm^2']);
    }
  });
});
