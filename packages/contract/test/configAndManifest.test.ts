import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ConfigError, parseFlags } from '@cfrsam/rpc';
import { loadManifest, ManifestError, sha256File } from '@cfrsam/contract';
import { testBundle } from '@cfrsam/testing';

describe('parseFlags', () => {
  const spec = {
    port: { type: 'int', env: 'PORT', default: 50052, help: 'port' },
    bundle: { type: 'string', default: 'models/tiny', help: 'bundle' },
    verbose: { type: 'boolean', default: false, help: 'verbose' },
    maxBatch: { type: 'int', default: 8, help: 'batch' },
  } as const;

  it('takes flags over environment over defaults', () => {
    expect(parseFlags(spec, [], {})).toEqual({ port: 50052, bundle: 'models/tiny', verbose: false, maxBatch: 8 });
    expect(parseFlags(spec, [], { PORT: '6000' }).port).toBe(6000);
    expect(parseFlags(spec, ['--port', '7000', '--max-batch=3', '--verbose'], { PORT: '6000' })).toMatchObject({
      port: 7000,
      maxBatch: 3,
      verbose: true,
    });
  });

  it('rejects unknown flags and bad values with a message', () => {
    expect(() => parseFlags(spec, ['--nope'], {})).toThrow(ConfigError);
    expect(() => parseFlags(spec, ['--port', 'abc'], {})).toThrow('--port: expected an integer, got "abc"');
    expect(() => parseFlags(spec, ['--port'], {})).toThrow('--port needs a value');
  });
});

describe('loadManifest', () => {
  const bundle = testBundle();
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'cfrsam-manifest-'));
  afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

  /** A bundle with tiny placeholder graph files (only their checksums are read here). */
  function writeBundle(name: string, edit: (m: Record<string, any>) => void): string {
    const dir = path.join(tmp, name);
    fs.mkdirSync(dir);
    const graphs: Record<string, unknown> = {};
    for (const g of ['prompter', 'encoder', 'decoder_image', 'decoder_prompts']) {
      fs.writeFileSync(path.join(dir, `${g}.onnx`), `graph ${g}`);
      graphs[g] = { file: `${g}.onnx`, sha256: sha256File(path.join(dir, `${g}.onnx`)) };
    }
    const manifest: Record<string, any> = {
      format: 'cfrsam-bundle/1',
      name: 'test',
      version: '0.0.1+test',
      config: 'tiny',
      input_size: 256,
      patch_size: 16,
      normalization: { mean: [1, 2, 3], std: [1, 1, 1] },
      classes: [{ name: 'other', color: '#112233' }],
      mpp: 0.25,
      hmfm_levels: [1, 3],
      feature_shape: [2, 8, 16, 16],
      refinement: { mode: 'window', window: 64 },
      mask_threshold: 0,
      prompter: { anchors: 64, min_foreground: 0.5, nms_radius: 4 },
      graphs,
    };
    edit(manifest);
    fs.writeFileSync(path.join(dir, 'manifest.json'), JSON.stringify(manifest));
    return dir;
  }

  it.skipIf(!bundle.manifest)('loads models/tiny', () => {
    const m = bundle.manifest!;
    expect(m.inputSize).toBe(256);
    expect(m.classes.length).toBeGreaterThan(0);
    expect(m.featureShape[2]).toBe(m.inputSize / m.patchSize);
    expect(m.graphs.encoder?.path).toMatch(/encoder\.onnx$/);
  });

  it('accepts a valid manifest and converts names', () => {
    const m = loadManifest(writeBundle('ok', () => {}));
    expect(m).toMatchObject({ inputSize: 256, featureShape: [2, 8, 16, 16], refinement: { mode: 'window', window: 64 } });
    expect(m.prompter).toEqual({ anchors: 64, minForeground: 0.5, nmsRadius: 4, refinedNmsRadius: 0, minPointScore: 0, refinerClassWeight: 0 });
  });

  it('reads a blur gate, and refuses one with no score bar to lower or out of range', () => {
    const gated =
      (gate: unknown, bar = 0.6) =>
      (m: Record<string, any>) => {
        m.prompter = { ...m.prompter, min_point_score: bar, blur_gate: gate };
      };
    const m = loadManifest(writeBundle('gate', gated({ sharpness_below: 1.08, min_point_score: 0.3 })));
    expect(m.prompter.blurGate).toEqual({ sharpnessBelow: 1.08, minPointScore: 0.3 });
    expect(m.prompter.minPointScore).toBe(0.6);
    expect(() => loadManifest(writeBundle('gate-nobar', gated({ sharpness_below: 1.08, min_point_score: 0.3 }, 0)))).toThrow(
      /"prompter.blur_gate" needs a score bar/,
    );
    expect(() => loadManifest(writeBundle('gate-high', gated({ sharpness_below: 1.08, min_point_score: 1.3 })))).toThrow(
      /"prompter.blur_gate.min_point_score" must be in \[0, 1\]/,
    );
    expect(() => loadManifest(writeBundle('gate-nocut', gated({ min_point_score: 0.3 })))).toThrow(/prompter.blur_gate.sharpness_below/);
  });

  it('names the field or file at fault', () => {
    expect(() => loadManifest(writeBundle('nofield', (m) => delete m.mpp))).toThrow(/missing field "mpp"/);
    expect(() => loadManifest(writeBundle('badfmt', (m) => (m.format = 'other/2')))).toThrow(/"format" is "other\/2"/);
    expect(() => loadManifest(writeBundle('badshape', (m) => (m.feature_shape = [2, 8, 8, 8])))).toThrow(/feature_shape/);
    expect(() => loadManifest(writeBundle('badcolor', (m) => (m.classes[0].color = 'red')))).toThrow(/classes\[0\]\.color/);
    expect(() => loadManifest(writeBundle('badwin', (m) => (m.refinement.window = 30)))).toThrow(/refinement\.window/);
    expect(() => loadManifest(writeBundle('nograph', (m) => delete m.graphs.encoder))).toThrow(/missing graph "graphs.encoder"/);
    expect(() => loadManifest(path.join(tmp, 'absent'))).toThrow(/no model bundle at/);
  });

  it('rejects a graph whose checksum does not match', () => {
    const dir = writeBundle('stale', () => {});
    fs.writeFileSync(path.join(dir, 'encoder.onnx'), 'changed');
    expect(() => loadManifest(dir)).toThrow(ManifestError);
    expect(() => loadManifest(dir)).toThrow(/graph "encoder": .* has sha256 .* the manifest says/);
    expect(() => loadManifest(dir, { graphs: ['prompter'] })).not.toThrow();
  });
});
