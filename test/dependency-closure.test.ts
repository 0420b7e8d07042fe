// The workspace dependency graph keeps each service's closure to what it runs: the gateway runs no
// model (no onnxruntime-node), the stage services decode no images (no sharp). Read from the
// package.json files, following workspace packages transitively.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';

const ROOT = path.resolve(__dirname, '..');
const workspaces: string[] = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')).workspaces;
const manifests = new Map<string, { dir: string; deps: string[] }>();
for (const ws of workspaces) {
  const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, ws, 'package.json'), 'utf8'));
  manifests.set(pkg.name, { dir: ws, deps: [...Object.keys(pkg.dependencies ?? {}), ...Object.keys(pkg.optionalDependencies ?? {})] });
}

const STANDALONE = '@cfrsam/standalone';

function closure(name: string, seen = new Set<string>()): Set<string> {
  for (const dep of manifests.get(name)?.deps ?? []) {
    if (seen.has(dep)) continue;
    seen.add(dep);
    if (manifests.has(dep)) closure(dep, seen);
  }
  return seen;
}

describe('dependency closures', () => {
  it('the gateway does not install onnxruntime-node', () => {
    expect(closure('@cfrsam/gateway').has('onnxruntime-node')).toBe(false);
    expect(closure('@cfrsam/gateway').has('sharp')).toBe(true);
  });

  it.each(['@cfrsam/prompter', '@cfrsam/encoder', '@cfrsam/decoder'])('%s runs the model and loads no image library', (name) => {
    const c = closure(name);
    expect(c.has('onnxruntime-node')).toBe(true);
    expect(c.has('sharp')).toBe(false);
  });

  it('no service depends on another service', () => {
    for (const [name, m] of manifests) {
      if (!m.dir.startsWith('services/') || name === STANDALONE) continue;
      for (const dep of closure(name)) expect(manifests.get(dep)?.dir.startsWith('services/') ?? false, `${name} -> ${dep}`).toBe(false);
    }
  });

  // The one exception: the standalone process is the four services packaged as one (their
  // pipelines behind the gateway's stage ports), a composition root that nothing depends on.
  it('only the standalone composition imports services, and nothing imports it', () => {
    const services = [...manifests].filter(([, m]) => m.dir.startsWith('services/')).map(([n]) => n);
    expect(
      manifests
        .get(STANDALONE)!
        .deps.filter((d) => services.includes(d))
        .sort(),
    ).toEqual(['@cfrsam/decoder', '@cfrsam/encoder', '@cfrsam/gateway', '@cfrsam/prompter']);
    for (const [name] of manifests) expect(closure(name).has(STANDALONE), `${name} -> ${STANDALONE}`).toBe(false);
  });
});
