// The API's buf checks: the protos pass `buf lint` (with the exceptions protos/buf.yaml documents),
// and `buf breaking` against the last release's image passes for the current protos and fails for
// a copy with a field removed or a service renamed, so the CI check can catch a break.
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';

const ROOT = path.resolve(__dirname, '..');
const BUF = path.join(ROOT, 'node_modules', '.bin', 'buf');
const RELEASE = path.join(ROOT, 'protos', 'releases', 'v0.1.0.binpb');
const scratch: string[] = [];

function buf(...args: string[]): { ok: boolean; output: string } {
  try {
    return { ok: true, output: execFileSync(BUF, args, { cwd: ROOT, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }) };
  } catch (err) {
    const e = err as { stdout?: string; stderr?: string };
    return { ok: false, output: `${e.stdout ?? ''}${e.stderr ?? ''}` };
  }
}

/** A copy of protos/ with `edit` applied to one file. */
function editedProtos(file: string, edit: (text: string) => string): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cfrsam-protos-'));
  scratch.push(dir);
  fs.cpSync(path.join(ROOT, 'protos'), dir, { recursive: true });
  const target = path.join(dir, file);
  const before = fs.readFileSync(target, 'utf8');
  const after = edit(before);
  expect(after).not.toBe(before);
  fs.writeFileSync(target, after);
  return dir;
}

afterAll(() => {
  for (const dir of scratch) fs.rmSync(dir, { recursive: true, force: true });
});

describe('protos', () => {
  it('pass buf lint', () => {
    const result = buf('lint', 'protos');
    expect(result.output).toBe('');
    expect(result.ok).toBe(true);
  });

  it('make no breaking change against the last release', () => {
    const result = buf('breaking', 'protos', '--against', RELEASE);
    expect(result.output).toBe('');
    expect(result.ok).toBe(true);
  });

  it('fail the breaking-change check when a field is removed or a service renamed', () => {
    const withoutField = editedProtos('cfrsam/v1/segmentation.proto', (t) => t.replace(/^\s*float mpp = \d+;.*$/m, ''));
    const removed = buf('breaking', withoutField, '--against', RELEASE);
    expect(removed.ok).toBe(false);
    expect(removed.output).toMatch(/Previously present field .* "mpp" .* was deleted/);

    const renamed = editedProtos('cfrsam/v1/stages.proto', (t) => t.replace('service Encoder {', 'service EncoderService {'));
    const result = buf('breaking', renamed, '--against', RELEASE);
    expect(result.ok).toBe(false);
    expect(result.output).toMatch(/Previously present service "Encoder" was deleted/);
  });
});
