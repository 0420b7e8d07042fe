// Offline validation of rendered Kubernetes resources with kubernetes-models: each resource is
// constructed as its model class and validated against the OpenAPI schema (types, required fields,
// enums). kubernetes-models does not reject unknown fields, so a misspelt field ("readinesProbe")
// would pass; unknownFields() closes that gap by walking the resource along the models' TypeScript
// declarations, which list every field of every API type.
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Resource } from './kustomize-lite';

interface Validatable {
  validate(): void;
}
type ModelClass = new (data: unknown) => Validatable;

const modelsRoot = path.dirname(require.resolve('kubernetes-models/package.json'));

/** The directory of an apiVersion inside kubernetes-models ("v1", "apps/v1", ...). */
function apiDir(apiVersion: string): string {
  return apiVersion.includes('/') ? apiVersion : `v1`;
}

/** The kubernetes-models class for apiVersion + kind; throws for kinds it does not know. */
export function modelClass(apiVersion: string, kind: string): ModelClass {
  const dir = path.join(modelsRoot, apiDir(apiVersion));
  if (!fs.existsSync(path.join(dir, `${kind}.js`))) throw new Error(`kubernetes-models has no ${apiVersion} ${kind}`);
  const mod = require(path.join(dir, `${kind}.js`)) as Record<string, ModelClass>;
  const cls = mod[kind];
  if (typeof cls !== 'function') throw new Error(`kubernetes-models ${apiVersion}/${kind}.js does not export ${kind}`);
  return cls;
}

/** Validates against the schema; throws with the schema errors. */
export function validateResource(resource: Resource): void {
  const Model = modelClass(resource.apiVersion, resource.kind);
  try {
    new Model(resource).validate();
  } catch (err) {
    throw new Error(`${resource.kind}/${resource.metadata.name}: ${(err as Error).message}`);
  }
}

interface TypeInfo {
  /** field -> declaration file of its object type (undefined: a scalar, map or alias; not walked). */
  fields: Map<string, { file?: string; array: boolean }>;
}

const typeCache = new Map<string, TypeInfo | null>();

function resolveImport(fromFile: string, spec: string): string {
  if (spec.startsWith('.')) return path.resolve(path.dirname(fromFile), `${spec}.d.ts`);
  // "@kubernetes-models/apimachinery/apis/meta/v1/ObjectMeta"
  const parts = spec.split('/');
  const pkg = parts.slice(0, 2).join('/');
  const rest = parts.slice(2).join('/');
  for (const base of [path.join(modelsRoot, 'node_modules'), path.dirname(modelsRoot)]) {
    const candidate = path.join(base, pkg, `${rest}.d.ts`);
    if (fs.existsSync(candidate)) return candidate;
  }
  throw new Error(`cannot resolve ${spec} from ${fromFile}`);
}

/** The fields of the first interface declared in a kubernetes-models .d.ts (null for type aliases). */
function typeInfo(file: string): TypeInfo | null {
  if (typeCache.has(file)) return typeCache.get(file)!;
  const text = fs.readFileSync(file, 'utf8');
  const imports = new Map<string, string>();
  for (const m of text.matchAll(/^import \{ ([^}]+) \} from "([^"]+)";$/gm)) {
    for (const name of m[1].split(',').map((s) => s.trim())) imports.set(name, m[2]);
  }
  const lines = text.split('\n');
  const start = lines.findIndex((l) => /^export interface I\w+( extends [\w, ]+)? \{$/.test(l));
  if (start < 0) {
    typeCache.set(file, null);
    return null;
  }
  const fields: TypeInfo['fields'] = new Map();
  if (/extends TypeMeta/.test(lines[start])) {
    fields.set('apiVersion', { array: false });
    fields.set('kind', { array: false });
  }
  for (let i = start + 1; i < lines.length && !/^\}/.test(lines[i]); i++) {
    const m = /^ {4}"([^"]+)"\??: (.*)$/.exec(lines[i]);
    if (!m) continue;
    const type = m[2].replace(/;$/, '');
    const ref = /^(Array<)?(IIoK8s\w+)>?$/.exec(type);
    const spec = ref ? imports.get(ref[2]) : undefined;
    fields.set(m[1], { file: spec ? resolveImport(file, spec) : undefined, array: Boolean(ref?.[1]) });
  }
  const info = { fields };
  typeCache.set(file, info);
  return info;
}

function walk(value: unknown, file: string, where: string, out: string[]): void {
  const info = typeInfo(file);
  if (!info || typeof value !== 'object' || value === null || Array.isArray(value)) return;
  for (const [key, child] of Object.entries(value)) {
    const field = info.fields.get(key);
    if (!field) {
      out.push(`${where}.${key}`);
      continue;
    }
    if (!field.file) continue;
    if (field.array && Array.isArray(child)) child.forEach((item, i) => walk(item, field.file!, `${where}.${key}[${i}]`, out));
    else walk(child, field.file, `${where}.${key}`, out);
  }
}

/** Paths of fields the API type does not have (e.g. ["spec.template.spec.containers[0].readinesProbe"]). */
export function unknownFields(resource: Resource): string[] {
  modelClass(resource.apiVersion, resource.kind);
  const out: string[] = [];
  walk(resource, path.join(modelsRoot, apiDir(resource.apiVersion), `${resource.kind}.d.ts`), `${resource.kind}/${resource.metadata.name}`, out);
  return out.map((p) => p.replace(/^[^.]+\./, `${resource.kind}/${resource.metadata.name}: `));
}
