// `cfrsam stack` as a user runs it: a child process with several replicas of each stage, its printed
// addresses answering Segment (through every gateway), Ctrl-C stopping everything with exit 0, and
// replica flags it cannot honour refused with a usage error.
import { spawn, spawnSync } from 'node:child_process';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { makeClient, segmentationProto, unary } from '@cfrsam/rpc';
import { blobGrid, syntheticPng } from './synthetic';

const CLI = path.join(__dirname, '..', 'services', 'gateway', 'dist', 'cli', 'main.js');

describe('cfrsam stack', () => {
  it('runs several prompters, encoders and gateways and stops them on SIGINT', async () => {
    const child = spawn(
      process.execPath,
      [CLI, 'stack', '--prompters', '2', '--encoders', '2', '--decoders', '1', '--gateways', '2', '--port', '0', '--quiet'],
      {
        stdio: ['ignore', 'pipe', 'pipe'],
      },
    );
    let out = '';
    let err = '';
    child.stderr.on('data', (d) => (err += d));
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    try {
      await new Promise<void>((resolve, reject) => {
        child.stdout.on('data', (d) => {
          out += d;
          if (out.includes('ready;')) resolve();
        });
        void exited.then((code) => reject(new Error(`cfrsam stack exited (${code}) before it was ready:\n${err}`)));
      });
      const addresses = (kind: string) => [...out.matchAll(new RegExp(`^${kind}(?:-\\d+)?\\s+(\\S+)`, 'gm'))].map((m) => m[1]);
      expect(addresses('prompter')).toHaveLength(2);
      expect(addresses('encoder')).toHaveLength(2);
      expect(addresses('decoder')).toHaveLength(1);
      const gateways = addresses('gateway');
      expect(gateways).toHaveLength(2);
      expect(new Set([...gateways, ...addresses('prompter'), ...addresses('encoder')]).size).toBe(6);

      const image = await syntheticPng(320, 256, blobGrid([60, 140, 220], [70, 170]));
      for (const gateway of gateways) {
        const client = makeClient(segmentationProto.SegmentationClient, gateway);
        const response = await unary(
          client,
          client.segment,
          {
            image,
            model: '',
            prompts: [],
            promptMode: segmentationProto.PromptMode.PROMPT_MODE_AUTO,
            returnLabelMap: false,
            returnMasks: false,
            minScore: 0,
            mpp: 0,
          },
          { timeoutMs: 60_000 },
        );
        expect(response.width).toBe(320);
        expect(response.tiles).toBe(2);
        client.close();
      }
    } finally {
      child.kill('SIGINT');
    }
    expect(await exited).toBe(0);
    expect(err).toContain('stopped');
  }, 180_000);

  it('refuses replica counts a standalone stack cannot have', () => {
    const run = spawnSync(process.execPath, [CLI, 'stack', '--standalone', '--encoders', '2'], { encoding: 'utf8' });
    expect(run.status).toBe(2);
    expect(run.stderr).toContain('--standalone is one process');
    const zero = spawnSync(process.execPath, [CLI, 'stack', '--prompters', '0'], { encoding: 'utf8' });
    expect(zero.status).toBe(2);
    expect(zero.stderr).toContain('--prompters must be >= 1, got 0');
  });
});
