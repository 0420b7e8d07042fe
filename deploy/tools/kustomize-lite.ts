// A small, strict renderer for the subset of kustomize that deploy/k8s uses, so the manifests can
// be rendered and checked in tests without a kustomize binary or a cluster. Anything outside the
// subset throws instead of being silently ignored: a kustomization that uses a feature this file
// does not implement fails the test rather than rendering something kustomize would not.
//
// The tests render with the real kustomize (`kubectl kustomize`) when it is installed; this
// renderer is the fallback, and the tests check that both agree where both exist.
//
// Supported kustomization fields: resources (files and directories), components (directories
// holding a `kind: Component` kustomization, applied in order after the resources: their own
// resources and generators are added, then their patches and images act on everything so far),
// namespace, patches (a path or an inline strategic-merge patch, with an optional target: kind,
// name, labelSelector), configMapGenerator (files and literals, with
// generatorOptions.disableNameSuffixHash: true), and images (newName, newTag, digest). Strategic merge follows Kubernetes' merge keys for the list
// fields it knows (containers, env, volumes, ...) and replaces the lists Kubernetes treats as
// atomic; other lists of objects throw.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseAllDocuments } from 'yaml';

export interface Resource {
  apiVersion: string;
  kind: string;
  metadata: {
    name: string;
    namespace?: string;
    labels?: Record<string, string>;
    annotations?: Record<string, string>;
    [key: string]: unknown;
  };
  [key: string]: unknown;
}

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
type JsonObject = { [key: string]: Json };

const SUPPORTED_FIELDS = new Set([
  'apiVersion',
  'kind',
  'namespace',
  'resources',
  'components',
  'patches',
  'configMapGenerator',
  'generatorOptions',
  'images',
]);

/** Kinds that have no namespace (the namespace transformer leaves them alone). */
const CLUSTER_SCOPED_KINDS = new Set([
  'Namespace',
  'ClusterRole',
  'ClusterRoleBinding',
  'APIService',
  'CustomResourceDefinition',
  'PersistentVolume',
  'StorageClass',
  'PriorityClass',
]);

/** List fields merged item by item on a key, as in Kubernetes' strategic merge patch. */
const MERGE_KEYS: Record<string, string> = {
  containers: 'name',
  initContainers: 'name',
  env: 'name',
  volumes: 'name',
  volumeMounts: 'mountPath',
  imagePullSecrets: 'name',
};

/** Lists of objects that strategic merge replaces as a whole. */
const ATOMIC_LISTS = new Set(['metrics', 'tolerations', 'rules', 'subjects', 'matchExpressions']);

function isObject(value: unknown): value is JsonObject {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** Parses every YAML document of a file (empty documents are skipped). */
export function loadYamlDocuments(file: string): Json[] {
  const docs = parseAllDocuments(fs.readFileSync(file, 'utf8'));
  const out: Json[] = [];
  for (const doc of docs) {
    if (doc.errors.length > 0) throw new Error(`${file}: ${doc.errors.map((e) => e.message).join('; ')}`);
    const value = doc.toJS() as Json;
    if (value !== null && value !== undefined) out.push(value);
  }
  return out;
}

function asResource(value: Json, origin: string): Resource {
  if (!isObject(value)) throw new Error(`${origin}: a document is not a mapping`);
  const metadata = value.metadata;
  if (typeof value.apiVersion !== 'string' || typeof value.kind !== 'string' || !isObject(metadata) || typeof metadata.name !== 'string') {
    throw new Error(`${origin}: every resource needs apiVersion, kind and metadata.name`);
  }
  return value as unknown as Resource;
}

/** Strategic merge of `patch` into `target` (returns a new value; `target` is not modified). */
export function strategicMerge(target: Json, patch: Json, field = ''): Json {
  if (isObject(patch)) {
    if ('$patch' in patch || Object.keys(patch).some((k) => k.startsWith('$'))) {
      throw new Error(`strategic-merge directives ($patch, $setElementOrder, ...) are not supported (field ${field})`);
    }
    const base: JsonObject = isObject(target) ? { ...target } : {};
    for (const [key, value] of Object.entries(patch)) {
      if (value === null) delete base[key];
      else base[key] = key in base ? strategicMerge(base[key], value, key) : value;
    }
    return base;
  }
  if (Array.isArray(patch)) {
    if (!Array.isArray(target) || patch.every((item) => !isObject(item))) return patch;
    let key = MERGE_KEYS[field];
    if (field === 'ports') key = patch.every((p) => isObject(p) && 'containerPort' in p) ? 'containerPort' : 'port';
    if (key === undefined) {
      if (ATOMIC_LISTS.has(field)) return patch;
      throw new Error(`strategic merge of list field "${field}" is not supported by this renderer`);
    }
    // As kustomize (kyaml) orders the result: the patch's items first, each merged into the item
    // of the same key, then the target's other items in their order.
    const merged: Json[] = [];
    const patched = new Set<Json>();
    for (const item of patch) {
      if (!isObject(item) || !(key in item)) throw new Error(`items of "${field}" need the merge key "${key}"`);
      const existing = target.find((t) => isObject(t) && t[key] === item[key]);
      if (existing !== undefined) patched.add(existing);
      merged.push(existing !== undefined ? strategicMerge(existing, item, field) : item);
    }
    for (const item of target) if (!patched.has(item)) merged.push(item);
    return merged;
  }
  return patch;
}

interface PatchTarget {
  kind?: string;
  name?: string;
  labelSelector?: string;
}

function matchesTarget(resource: Resource, target: PatchTarget): boolean {
  if (target.kind !== undefined && resource.kind !== target.kind) return false;
  if (target.name !== undefined && resource.metadata.name !== target.name) return false;
  if (target.labelSelector !== undefined) {
    const labels = resource.metadata.labels ?? {};
    for (const term of target.labelSelector.split(',')) {
      const match = /^\s*([^=!\s]+)\s*==?\s*([^\s]*)\s*$/.exec(term);
      if (!match) throw new Error(`label selector "${target.labelSelector}": only key=value terms are supported`);
      if (labels[match[1]] !== match[2]) return false;
    }
  }
  return true;
}

function applyPatch(resources: Resource[], patchDoc: Json, target: PatchTarget | undefined, origin: string): void {
  const patch = asResource(patchDoc, origin);
  const selector: PatchTarget = target ?? { kind: patch.kind, name: patch.metadata.name };
  for (const key of Object.keys(target ?? {})) {
    if (!['kind', 'name', 'labelSelector'].includes(key)) throw new Error(`${origin}: patch target field "${key}" is not supported`);
  }
  const matched = resources.filter((r) => matchesTarget(r, selector));
  if (matched.length === 0) throw new Error(`${origin}: the patch matches no resource (${JSON.stringify(selector)})`);
  // With an explicit target the patch's own name is a placeholder, as in kustomize.
  const body: JsonObject = { ...(patch as unknown as JsonObject) };
  if (target) {
    const metadata = { ...(body.metadata as JsonObject) };
    delete metadata.name;
    body.metadata = metadata;
  }
  for (const resource of matched) {
    const merged = strategicMerge(resource as unknown as Json, body) as unknown as Resource;
    resources[resources.indexOf(resource)] = merged;
  }
}

function setImages(resources: Resource[], images: JsonObject[], origin: string): void {
  for (const image of images) {
    for (const key of Object.keys(image)) {
      if (!['name', 'newName', 'newTag', 'digest'].includes(key)) throw new Error(`${origin}: images field "${key}" is not supported`);
    }
  }
  const visit = (node: Json): void => {
    if (Array.isArray(node)) {
      node.forEach(visit);
      return;
    }
    if (!isObject(node)) return;
    for (const listKey of ['containers', 'initContainers']) {
      const list = node[listKey];
      if (!Array.isArray(list)) continue;
      for (const container of list) {
        if (!isObject(container) || typeof container.image !== 'string') continue;
        const ref = container.image;
        const at = ref.indexOf('@');
        const withoutDigest = at >= 0 ? ref.slice(0, at) : ref;
        const colon = withoutDigest.lastIndexOf(':');
        const hasTag = colon > withoutDigest.lastIndexOf('/');
        const name = hasTag ? withoutDigest.slice(0, colon) : withoutDigest;
        const tag = hasTag ? withoutDigest.slice(colon + 1) : undefined;
        const rule = images.find((i) => i.name === name);
        if (!rule) continue;
        const newName = typeof rule.newName === 'string' ? rule.newName : name;
        if (typeof rule.digest === 'string') container.image = `${newName}@${rule.digest}`;
        else {
          const newTag = typeof rule.newTag === 'string' ? rule.newTag : tag;
          container.image = newTag ? `${newName}:${newTag}` : newName;
        }
      }
    }
    for (const value of Object.values(node)) visit(value);
  };
  resources.forEach((r) => visit(r as unknown as Json));
}

function generateConfigMaps(dir: string, generators: JsonObject[], options: JsonObject | undefined): Resource[] {
  if (generators.length > 0 && options?.disableNameSuffixHash !== true) {
    throw new Error(`${dir}: configMapGenerator needs generatorOptions.disableNameSuffixHash: true (name hashing is not implemented)`);
  }
  return generators.map((gen) => {
    for (const key of Object.keys(gen)) {
      if (!['name', 'namespace', 'files', 'literals'].includes(key)) throw new Error(`${dir}: configMapGenerator field "${key}" is not supported`);
    }
    const data: Record<string, string> = {};
    for (const entry of (gen.files as string[] | undefined) ?? []) {
      const eq = entry.indexOf('=');
      const key = eq >= 0 ? entry.slice(0, eq) : path.basename(entry);
      const file = eq >= 0 ? entry.slice(eq + 1) : entry;
      data[key] = fs.readFileSync(path.join(dir, file), 'utf8');
    }
    for (const literal of (gen.literals as string[] | undefined) ?? []) {
      const eq = literal.indexOf('=');
      data[literal.slice(0, eq)] = literal.slice(eq + 1);
    }
    const metadata: Resource['metadata'] = { name: String(gen.name) };
    if (typeof gen.namespace === 'string') metadata.namespace = gen.namespace;
    return { apiVersion: 'v1', kind: 'ConfigMap', metadata, data } as Resource;
  });
}

function loadKustomization(dir: string, kind: 'Kustomization' | 'Component'): { file: string; doc: JsonObject } {
  const file = path.join(dir, 'kustomization.yaml');
  const [doc] = loadYamlDocuments(file);
  if (!isObject(doc)) throw new Error(`${file}: not a mapping`);
  for (const key of Object.keys(doc)) {
    if (!SUPPORTED_FIELDS.has(key)) throw new Error(`${file}: field "${key}" is not supported by this renderer`);
  }
  const declared = typeof doc.kind === 'string' ? doc.kind : 'Kustomization';
  if (declared !== kind) throw new Error(`${file}: expected kind ${kind}, found ${declared}`);
  return { file, doc };
}

function loadResources(dir: string, doc: JsonObject): Resource[] {
  const resources: Resource[] = [];
  for (const entry of (doc.resources as string[] | undefined) ?? []) {
    const target = path.join(dir, entry);
    if (fs.statSync(target).isDirectory()) resources.push(...renderKustomization(target));
    else resources.push(...loadYamlDocuments(target).map((d) => asResource(d, target)));
  }
  return resources;
}

/** A kustomization's own generators and transformers, applied to `resources` in kustomize's order. */
function applyLayer(dir: string, file: string, doc: JsonObject, resources: Resource[]): void {
  resources.push(
    ...generateConfigMaps(dir, (doc.configMapGenerator as JsonObject[] | undefined) ?? [], doc.generatorOptions as JsonObject | undefined),
  );

  for (const patch of (doc.patches as JsonObject[] | undefined) ?? []) {
    const target = patch.target as PatchTarget | undefined;
    if (typeof patch.path === 'string') {
      const patchFile = path.join(dir, patch.path);
      const docs = loadYamlDocuments(patchFile);
      if (docs.length !== 1) throw new Error(`${patchFile}: a patch file holds exactly one document`);
      applyPatch(resources, docs[0], target, patchFile);
    } else if (typeof patch.patch === 'string') {
      const docs = parseAllDocuments(patch.patch).map((d) => d.toJS() as Json);
      if (docs.length !== 1) throw new Error(`${file}: an inline patch holds exactly one document`);
      applyPatch(resources, docs[0], target, `${file} (inline patch)`);
    } else {
      throw new Error(`${file}: a patch needs "path" or "patch"`);
    }
  }

  setImages(resources, (doc.images as JsonObject[] | undefined) ?? [], file);

  if (typeof doc.namespace === 'string') {
    for (const r of resources) if (!CLUSTER_SCOPED_KINDS.has(r.kind)) r.metadata.namespace = doc.namespace;
  }
}

/** Renders the kustomization in `dir` (a directory holding kustomization.yaml). */
export function renderKustomization(dir: string): Resource[] {
  const { file, doc } = loadKustomization(dir, 'Kustomization');
  const resources = loadResources(dir, doc);
  for (const entry of (doc.components as string[] | undefined) ?? []) {
    const componentDir = path.join(dir, entry);
    const component = loadKustomization(componentDir, 'Component');
    resources.push(...loadResources(componentDir, component.doc));
    applyLayer(componentDir, component.file, component.doc, resources);
  }
  applyLayer(dir, file, doc, resources);

  const seen = new Set<string>();
  for (const r of resources) {
    const id = `${r.kind}/${r.metadata.namespace ?? ''}/${r.metadata.name}`;
    if (seen.has(id)) throw new Error(`${file}: resource ${id} is defined twice`);
    seen.add(id);
  }
  return resources;
}
