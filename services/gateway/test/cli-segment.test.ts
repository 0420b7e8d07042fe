// The cfrsam CLI's own parts: output names that never collide, --origin parsing, retries of the
// retryable statuses only (waiting as the gateway's RetryInfo says), help that says each default
// once, and `cfrsam --version` from the built, executable entry point (and from PATH after setup).
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { grpcError, status } from '@cfrsam/rpc';
import { withRetries } from '../src/cli/clientOptions';
import { formatFlags } from '../src/cli/help';
import { WorkProgress } from '../src/cli/progress';
import { parseOrigin, SEGMENT_USAGE, uniqueOutputNames } from '../src/cli/segment';

const ROOT = path.resolve(__dirname, '..', '..', '..');
const CLI = path.join(ROOT, 'services', 'gateway', 'dist', 'cli', 'main.js');

describe('output names', () => {
  it('keeps plain names, and makes colliding ones unique by folder, then extension, then a counter', () => {
    expect(uniqueOutputNames(['a/x.png', 'b/y.tif'])).toEqual(['x', 'y']);
    expect(uniqueOutputNames(['a/x.png', 'b/x.png', 'c/z.webp'])).toEqual(['a_x', 'b_x', 'z']);
    expect(uniqueOutputNames(['a/x.png', 'a/x.tif'])).toEqual(['a_x_png', 'a_x_tif']);
    expect(uniqueOutputNames(['a/x.png', 'a/x.png'])).toEqual(['a_x_png', 'a_x_png-2']);
    const many = uniqueOutputNames(['p/q/x.png', 'r/q/x.png', 's/x.jpg']);
    expect(new Set(many).size).toBe(3);
  });

  it('parses --origin X,Y and names a bad one', () => {
    expect(parseOrigin('1000,2000.5')).toEqual({ x: 1000, y: 2000.5 });
    expect(parseOrigin('')).toBeUndefined();
    expect(() => parseOrigin('10')).toThrow(/--origin must be X,Y/);
  });
});

describe('retries', () => {
  const noSleep = { sleep: async () => {} };

  it('retries UNAVAILABLE and RESOURCE_EXHAUSTED, waiting as RetryInfo says, and gives up after --retries', async () => {
    const waits: number[] = [];
    let calls = 0;
    const answer = await withRetries(
      async () => {
        calls++;
        if (calls === 1) throw grpcError(status.UNAVAILABLE, 'connection refused');
        if (calls === 2) throw grpcError(status.RESOURCE_EXHAUSTED, 'queue full', { retryDelayMs: 1234 });
        return 'ok';
      },
      { retries: 3, onRetry: (_a, _e, ms) => waits.push(ms), ...noSleep },
    );
    expect(answer).toBe('ok');
    expect(calls).toBe(3);
    expect(waits[1]).toBe(1234);
    expect(waits[0]).toBeGreaterThan(0);

    let tries = 0;
    await expect(
      withRetries(
        async () => {
          tries++;
          throw grpcError(status.UNAVAILABLE, 'down');
        },
        { retries: 2, ...noSleep },
      ),
    ).rejects.toMatchObject({ code: status.UNAVAILABLE });
    expect(tries).toBe(3);
  });

  it('never retries bad input', async () => {
    let tries = 0;
    await expect(
      withRetries(
        async () => {
          tries++;
          throw grpcError(status.INVALID_ARGUMENT, 'image format not recognised');
        },
        { retries: 5, ...noSleep },
      ),
    ).rejects.toMatchObject({ code: status.INVALID_ARGUMENT });
    expect(tries).toBe(1);
  });
});

describe('help and progress', () => {
  it('says each default once, and no empty defaults', () => {
    const text = formatFlags({
      decoders: { type: 'int', default: 1, help: 'decoder replicas' },
      bundle: { type: 'string', default: '', help: 'model bundle' },
      quiet: { type: 'boolean', default: false, help: 'less output' },
    });
    expect(text).toMatch(/--decoders N\s+decoder replicas \(default 1\)/);
    expect(text).not.toMatch(/default ""|default false/);
    expect(SEGMENT_USAGE.match(/\(default [^)]*\)[^\n]*\(default/g)).toBeNull();
    expect(SEGMENT_USAGE).toMatch(/--token TOKEN/);
    expect(SEGMENT_USAGE).toMatch(/--origin X,Y/);
  });

  it('estimates the time left from the rate so far', () => {
    let text = '';
    const io = { stderr: { write: (s: string) => ((text += s), true), isTTY: false } as unknown as NodeJS.WritableStream };
    const p = new WorkProgress(io, 300, 3, 'images', (r) => `${r.toFixed(0)} px/s`);
    p.start('one', 100);
    p.finish();
    expect(Number.isFinite(p.eta())).toBe(true);
    expect(p.line()).toMatch(/1\/3 images, .*elapsed, ETA \d/);
    p.start('two', 100);
    p.finish();
    p.start('three', 100);
    p.finish();
    expect(p.line()).toMatch(/3\/3 images.*ETA 0s/);
    p.close();
    expect(text).toMatch(/one/);
  });
});

describe('set-up for serving', () => {
  it('needs Node and npm alone: no apt, no root, no Python; run.sh uses it and setup.sh adds the rest', () => {
    const read = (f: string) => fs.readFileSync(path.join(ROOT, f), 'utf8');
    // Commands only (comments may name what is not needed).
    const commands = (f: string) =>
      read(f)
        .split('\n')
        .filter((l) => !l.trimStart().startsWith('#'))
        .join('\n');
    const serving = commands('scripts/setup-serving.sh');
    expect(serving).not.toMatch(/apt-get|dpkg|sudo|python|pip /);
    expect(serving).toMatch(/npm install/);
    expect(serving).toMatch(/npm run build/);
    expect(commands('run.sh')).toMatch(/scripts\/setup-serving\.sh/);
    expect(commands('run.sh')).not.toMatch(/scripts\/setup\.sh|setup-dev/);
    const full = commands('scripts/setup.sh');
    expect(full).toMatch(/setup-dev\.sh/);
    expect(full).toMatch(/setup-serving\.sh/);
    // What the tests need is in the development list (CI runs scripts/setup.sh).
    for (const deb of ['python3-grpcio', 'protobuf-compiler-grpc', 'python3-venv', 'nats-server', 'openssl'])
      expect(commands('scripts/setup-dev.sh')).toContain(deb);
  });
});

describe.skipIf(!fs.existsSync(CLI))('cfrsam --version', () => {
  it("runs from the executable entry point, through npm's bin link, and from PATH after setup", () => {
    const version = (JSON.parse(fs.readFileSync(path.join(ROOT, 'services', 'gateway', 'package.json'), 'utf8')) as { version: string }).version;
    expect(fs.readFileSync(CLI, 'utf8').startsWith('#!/usr/bin/env node\n')).toBe(true);
    // Executable as installed by setup (scripts/setup-serving.sh), run without `node` in front.
    expect(fs.statSync(CLI).mode & 0o111).not.toBe(0);
    expect(execFileSync(CLI, ['--version'], { encoding: 'utf8' })).toMatch(new RegExp(`^cfrsam ${version.replace(/\./g, '\\.')} `));
    const bin = path.join(ROOT, 'node_modules', '.bin', 'cfrsam');
    expect(execFileSync(bin, ['--version'], { encoding: 'utf8' })).toMatch(/^cfrsam /);
    expect(execFileSync(CLI, ['--help'], { encoding: 'utf8' })).toMatch(/cfrsam <command> --help/);
    // CI runs scripts/setup.sh first, which links `cfrsam` into a folder on PATH.
    if (process.env.CI) expect(execFileSync('cfrsam', ['--version'], { encoding: 'utf8' })).toMatch(/^cfrsam /);
  });
});
