// The Kubernetes manifests in deploy/k8s, checked without a cluster: the base and both overlays are
// rendered with the real kustomize (`kubectl kustomize`) when it is installed, else with
// deploy/tools/kustomize-lite.ts (a strict renderer of the kustomize subset they use; where both
// exist they must agree),
// every resource is validated against the Kubernetes OpenAPI schema with kubernetes-models (plus a
// check for misspelt fields), and the wiring is checked against the services' source: ports,
// health-check service names, environment variables, the metric names the dashboards and the
// autoscaler query (from a real scrape of the services' metrics exporter), and the GPU overlay.
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { parse as parseYaml, parseAllDocuments } from 'yaml';
import { renderKustomization, strategicMerge, type Resource } from '../deploy/tools/kustomize-lite';
import { unknownFields, validateResource } from '../deploy/tools/validate-resources';
import { initServiceMetrics } from '../packages/rpc/src/telemetry';
import { SERVICE_NODE_FLAGS } from '../services/gateway/src/cli/stack';

const ROOT = path.resolve(__dirname, '..');
const K8S = path.join(ROOT, 'deploy', 'k8s');
const NAMESPACE = 'cfrsam';

// ---------------------------------------------------------------------------------------------
// What the services' source says.

interface StageSource {
  name: 'prompter' | 'encoder' | 'decoder' | 'gateway';
  port: number;
  /** grpc.health.v1 service name the server registers ("cfrsam.v1.Prompter"). */
  healthService: string;
}

function readSource(rel: string): string {
  return fs.readFileSync(path.join(ROOT, rel), 'utf8');
}

const STAGES: StageSource[] = (['prompter', 'encoder', 'decoder', 'gateway'] as const).map((name) => {
  const src = readSource(`services/${name}/src/server.ts`);
  const port = /export const DEFAULT_\w+_PORT = (\d+);/.exec(src);
  const service = /export const \w+_SERVICE_NAME = '([^']+)';/.exec(src);
  if (!port || !service) throw new Error(`services/${name}/src/server.ts: no DEFAULT_*_PORT or *_SERVICE_NAME`);
  return { name, port: Number(port[1]), healthService: service[1] };
});
const MODEL_STAGES = ['prompter', 'encoder', 'decoder'];

/** Secrets the manifests use; deploy/README.md says how to create each (checked below). */
const DOCUMENTED_SECRETS = ['cfrsam-internal', 'gateway-tls', 'cfrsam-client-tokens', 'grafana-admin'];

function tsFilesUnder(dir: string): string[] {
  const out: string[] = [];
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) {
      if (entry.name !== 'gen') out.push(...tsFilesUnder(full));
    } else if (entry.name.endsWith('.ts')) out.push(full);
  }
  return out;
}

/** Read by Node itself rather than by our code (TMPDIR: os.tmpdir(), where artefacts are staged). */
const NODE_RUNTIME_ENV = new Set(['TMPDIR', 'NODE_OPTIONS']);

/** Environment variables a service reads: string literals in its source and in the shared packages. */
function envReadBy(stage: string): (name: string) => boolean {
  const text = [
    ...['rpc', 'contract', 'runtime', 'nuclei'].flatMap((p) => tsFilesUnder(path.join(ROOT, 'packages', p, 'src'))),
    ...tsFilesUnder(path.join(ROOT, `services/${stage}/src`)),
  ]
    .map((f) => fs.readFileSync(f, 'utf8'))
    .join('\n');
  return (name) => NODE_RUNTIME_ENV.has(name) || text.includes(`'${name}'`) || text.includes(`"${name}"`);
}

/**
 * Set in the manifests ahead of service support (deploy/README.md says what the service must do).
 * Listed so that the check below names them instead of failing.
 */
const AWAITING_SERVICE_SUPPORT = new Set<string>([]);

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

/** Metric names as Prometheus sees them, from a real scrape of the services' exporter. */
async function exportedMetricNames(): Promise<Set<string>> {
  const port = await freePort();
  const metrics = await initServiceMetrics({ serviceName: 'deploy-test', port, host: '127.0.0.1' });
  try {
    metrics.stage('encoder.run', 0.01);
    metrics.rpc('cfrsam.v1.Encoder/Encode', 'OK', 0.02);
    metrics.cache('encoder.features', { hits: 1, misses: 1, coalesced: 1 });
    metrics.batch('decoder', 8);
    metrics.inFlight('cfrsam.v1.Encoder/Encode', 1);
    metrics.poolWait('encoder', 0.001);
    metrics.admission('goodput');
    metrics.admissionState({ limit: 2, running: 1, queued: 3, pixelsPerSecond: 1e5 });
    const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    const names = new Set<string>();
    for (const line of text.split('\n')) {
      const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]/.exec(line);
      if (m) names.add(m[1]);
    }
    return names;
  } finally {
    await metrics.close();
  }
}

const PROMQL_FUNCTIONS = new Set([
  'abs',
  'avg',
  'avg_over_time',
  'bottomk',
  'ceil',
  'clamp_max',
  'clamp_min',
  'count',
  'count_over_time',
  'delta',
  'deriv',
  'floor',
  'histogram_quantile',
  'increase',
  'irate',
  'label_replace',
  'max',
  'max_over_time',
  'min',
  'min_over_time',
  'quantile',
  'rate',
  'round',
  'scalar',
  'stddev',
  'sum',
  'sum_over_time',
  'topk',
  'vector',
]);
/** Series Prometheus makes itself for every target. */
const PROMETHEUS_OWN_METRICS = new Set(['up']);
const PROMQL_KEYWORDS = new Set(['and', 'or', 'unless', 'bool', 'offset']);

/** Metric names a PromQL expression selects (label matchers, ranges and groupings removed). */
function promqlMetricNames(expr: string): string[] {
  let s = expr.replace(/"(?:[^"\\]|\\.)*"/g, '""');
  s = s.replace(/\{[^}]*\}/g, ' ').replace(/\[[^\]]*\]/g, ' ');
  s = s.replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, ' ');
  const names: string[] = [];
  for (const m of s.matchAll(/[A-Za-z_:][A-Za-z0-9_:]*/g)) {
    const word = m[0];
    if (m.index > 0 && /[0-9.]/.test(s[m.index - 1])) continue; // exponent of a number (1e3)
    const isCall = s
      .slice(m.index + word.length)
      .trimStart()
      .startsWith('(');
    if (isCall) {
      if (!PROMQL_FUNCTIONS.has(word)) throw new Error(`"${expr}": unknown PromQL function ${word}`);
      continue;
    }
    if (PROMQL_KEYWORDS.has(word)) continue;
    names.push(word);
  }
  return names;
}

// ---------------------------------------------------------------------------------------------
// Rendered resources and helpers.

/** Rendered resources, read as loose JSON: validateResource() vouches for their shape. */
type Obj = Record<string, any>;

/** A kustomization using the base with components/prometheus-operator (what a cluster with the operator would apply). */
function operatorVariant(): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cfrsam-kustomize-'));
  const rel = path.relative(dir, K8S);
  fs.writeFileSync(
    path.join(dir, 'kustomization.yaml'),
    `apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ${rel}/base\ncomponents:\n  - ${rel}/components/prometheus-operator\n`,
  );
  return dir;
}

const VARIANTS = {
  base: path.join(K8S, 'base'),
  cpu: path.join(K8S, 'overlays', 'cpu'),
  gpu: path.join(K8S, 'overlays', 'gpu'),
  operator: operatorVariant(),
};
type Variant = keyof typeof VARIANTS;
/** Variants that include components/observability (collector, Prometheus, Grafana, tracing on). */
const WITH_OBSERVABILITY: Variant[] = ['cpu', 'gpu'];
const rendered = {} as Record<Variant, Resource[]>;
let exported: Set<string>;

/** `kubectl kustomize` if it is installed (null otherwise). */
const KUBECTL = (() => {
  try {
    execFileSync('kubectl', ['version', '--client'], { stdio: 'pipe' });
    return 'kubectl';
  } catch {
    return null;
  }
})();
if (!KUBECTL) console.warn('deploy-manifests.test: kubectl not found; rendering with the offline renderer (deploy/tools/kustomize-lite.ts)');

function kustomize(dir: string): Resource[] {
  const text = execFileSync(KUBECTL!, ['kustomize', dir], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  return parseAllDocuments(text)
    .map((d) => d.toJS() as Resource)
    .filter(Boolean);
}

beforeAll(async () => {
  for (const [variant, dir] of Object.entries(VARIANTS)) rendered[variant as Variant] = KUBECTL ? kustomize(dir) : renderKustomization(dir);
  exported = await exportedMetricNames();
});

function ofKind(resources: Resource[], kind: string): Obj[] {
  return resources.filter((r) => r.kind === kind) as Obj[];
}

function named(resources: Resource[], kind: string, name: string): Obj {
  const found = resources.find((r) => r.kind === kind && r.metadata.name === name);
  if (!found) throw new Error(`no ${kind} ${name}`);
  return found as Obj;
}

function workloads(resources: Resource[]): Obj[] {
  return resources.filter((r) => r.kind === 'Deployment' || r.kind === 'StatefulSet') as Obj[];
}

function podLabels(workload: Obj): Record<string, string> {
  return workload.spec.template.metadata.labels ?? {};
}

function selects(selector: Record<string, string>, labels: Record<string, string>): boolean {
  return Object.entries(selector).every(([k, v]) => labels[k] === v);
}

function server(resources: Resource[], stage: string): Obj {
  const container = named(resources, 'Deployment', stage).spec.template.spec.containers.find((c: Obj) => c.name === 'server');
  if (!container) throw new Error(`Deployment ${stage} has no container "server"`);
  return container;
}

function env(container: Obj, name: string): string | undefined {
  return (container.env ?? []).find((e: Obj) => e.name === name)?.value;
}

/** The Service answering "host:port" inside the namespace (short Service names only). */
function serviceFor(resources: Resource[], address: string): Obj {
  const m = /^(?:https?:\/\/)?([a-z0-9-]+):(\d+)$/.exec(address);
  if (!m) throw new Error(`"${address}" is not <service>:<port>`);
  const svc = named(resources, 'Service', m[1]);
  expect(
    svc.spec.ports.map((p: Obj) => p.port),
    `${address}: port of Service ${m[1]}`,
  ).toContain(Number(m[2]));
  return svc;
}

// ---------------------------------------------------------------------------------------------

describe('the offline checks themselves', () => {
  it('catch misspelt fields, schema violations and PromQL metric names', () => {
    const deployment = {
      apiVersion: 'apps/v1',
      kind: 'Deployment',
      metadata: { name: 'x' },
      spec: {
        selector: { matchLabels: { a: 'b' } },
        template: { metadata: { labels: { a: 'b' } }, spec: { containers: [{ name: 'c', image: 'i', readinesProbe: {} }] } },
      },
    } as unknown as Resource;
    expect(unknownFields(deployment)).toEqual(['Deployment/x: spec.template.spec.containers[0].readinesProbe']);
    const badPort = strategicMerge(
      deployment as never,
      {
        spec: { template: { spec: { containers: [{ name: 'c', ports: [{ containerPort: 'grpc' }] }] } } },
      } as never,
    ) as unknown as Resource;
    expect(() => validateResource(badPort)).toThrow(/containerPort must be integer/);
    expect(promqlMetricNames('histogram_quantile(0.95, sum by (le, stage) (rate(a_bucket{x="y"}[5m]))) / b')).toEqual(['a_bucket', 'b']);
  });

  it('merge lists the way strategic merge patch does', () => {
    const merged = strategicMerge(
      {
        containers: [
          {
            name: 'a',
            env: [
              { name: 'X', value: '1' },
              { name: 'Y', value: '2' },
            ],
          },
        ],
        metrics: [{ type: 'Resource' }],
      },
      { containers: [{ name: 'a', env: [{ name: 'X', value: '3' }] }], metrics: [{ type: 'Pods' }] },
    );
    expect(merged).toEqual({
      containers: [
        {
          name: 'a',
          env: [
            { name: 'X', value: '3' },
            { name: 'Y', value: '2' },
          ],
        },
      ],
      metrics: [{ type: 'Pods' }],
    });
  });
});

describe('deploy/docker', () => {
  // No Docker engine here: these are the checks that can be made by reading the files.
  const workspaces: string[] = JSON.parse(readSource('package.json')).workspaces;
  const dockerfile = (name: string) => readSource(`deploy/docker/${name}.Dockerfile`);
  // The images start node with the flags `cfrsam stack` gives every service process.
  const entrypoint = (script: string) => `ENTRYPOINT ${JSON.stringify(['node', ...SERVICE_NODE_FLAGS, script]).replaceAll(',', ', ')}`;

  it.each(['prompter', 'encoder', 'decoder', 'gateway', 'gpu', 'standalone'])(
    '%s.Dockerfile installs with every workspace manifest (npm ci needs them)',
    (name) => {
      const text = dockerfile(name);
      for (const ws of workspaces) {
        const line = `COPY ${ws}/package.json ${ws}/`;
        // once for the production dependencies, once for the build
        expect(text.split(line).length - 1, `${name}.Dockerfile: ${line}`).toBe(2);
      }
      expect(text).toContain('COPY package.json package-lock.json .npmrc ./');
      expect(text).toContain('npm ci --omit=dev');
    },
  );

  it.each(STAGES)('$name.Dockerfile starts the service on its default port', (stage) => {
    const text = dockerfile(stage.name);
    expect(text).toContain(entrypoint(`services/${stage.name}/dist/main.js`));
    expect(fs.existsSync(path.join(ROOT, `services/${stage.name}/src/main.ts`))).toBe(true);
    expect(text).toMatch(new RegExp(`^EXPOSE ${stage.port} 9464$`, 'm'));
  });

  it('standalone.Dockerfile builds every service and starts the standalone process on the gateway port', () => {
    const text = dockerfile('standalone');
    expect(text).toContain('npx tsc -b services/standalone');
    for (const service of ['prompter', 'encoder', 'decoder', 'gateway', 'standalone']) {
      expect(text).toContain(`COPY --from=build /src/services/${service}/dist services/${service}/dist`);
    }
    expect(text).toContain(entrypoint('services/standalone/dist/main.js'));
    expect(text).toMatch(/^EXPOSE 50051 9464$/m);
  });

  it('gpu.Dockerfile installs the CUDA provider of onnxruntime-node', () => {
    const text = dockerfile('gpu');
    expect(text).toContain('ONNXRUNTIME_NODE_INSTALL=cuda12 node script/install.js');
    expect(text).toContain('libonnxruntime_providers_cuda.so');
    expect(text).toMatch(/^ARG CUDA_IMAGE=nvidia\/cuda:12\.[\d.]+-cudnn-runtime-/m);
    expect(text).toContain(entrypoint('/app/main.js'));
  });
});

describe.each(Object.keys(VARIANTS) as Variant[])('deploy/k8s %s', (variant) => {
  const resources = () => rendered[variant];
  const observed = WITH_OBSERVABILITY.includes(variant);
  const itObserved = observed ? it : it.skip;

  it('renders resources that pass the Kubernetes schema and have no unknown fields', () => {
    expect(resources().length).toBeGreaterThan(20);
    for (const r of resources()) {
      // Prometheus Operator kinds are not in kubernetes-models; their own test checks them.
      if (r.apiVersion.startsWith('monitoring.coreos.com/')) continue;
      validateResource(r);
      expect(unknownFields(r), `${r.kind}/${r.metadata.name}`).toEqual([]);
    }
  });

  it('puts every namespaced resource in an explicit namespace', () => {
    named(resources(), 'Namespace', NAMESPACE);
    const clusterScoped = new Set(['Namespace', 'ClusterRole', 'ClusterRoleBinding', 'APIService']);
    for (const r of resources()) {
      if (clusterScoped.has(r.kind)) expect(r.metadata.namespace, `${r.kind}/${r.metadata.name}`).toBeUndefined();
      else if (r.kind === 'RoleBinding' && r.metadata.name.endsWith('auth-reader')) expect(r.metadata.namespace).toBe('kube-system');
      else expect(r.metadata.namespace, `${r.kind}/${r.metadata.name}`).toBe(NAMESPACE);
    }
    for (const binding of [...ofKind(resources(), 'RoleBinding'), ...ofKind(resources(), 'ClusterRoleBinding')]) {
      for (const subject of binding.subjects) {
        if (subject.kind !== 'ServiceAccount' || subject.namespace === 'kube-system') continue;
        named(resources(), 'ServiceAccount', subject.name);
        expect(subject.namespace).toBe(NAMESPACE);
      }
    }
  });

  it('gives every container readiness and liveness probes, and requests and limits', () => {
    for (const w of workloads(resources())) {
      const spec = w.spec.template.spec;
      for (const c of spec.containers) {
        const where = `${w.kind}/${w.metadata.name} ${c.name}`;
        expect(c.readinessProbe, `${where}: readinessProbe`).toBeDefined();
        expect(c.livenessProbe, `${where}: livenessProbe`).toBeDefined();
      }
      for (const c of [...spec.containers, ...(spec.initContainers ?? [])]) {
        const where = `${w.kind}/${w.metadata.name} ${c.name}`;
        for (const kind of ['requests', 'limits']) {
          expect(c.resources?.[kind]?.cpu, `${where}: ${kind}.cpu`).toBeDefined();
          expect(c.resources?.[kind]?.memory, `${where}: ${kind}.memory`).toBeDefined();
        }
      }
    }
  });

  it('points every HorizontalPodAutoscaler at an existing Deployment', () => {
    const hpas = ofKind(resources(), 'HorizontalPodAutoscaler');
    expect(hpas.map((h) => h.spec.scaleTargetRef.name).sort()).toEqual(STAGES.map((s) => s.name).sort());
    for (const hpa of hpas) {
      expect(hpa.apiVersion).toBe('autoscaling/v2');
      expect(hpa.spec.scaleTargetRef.kind).toBe('Deployment');
      named(resources(), 'Deployment', hpa.spec.scaleTargetRef.name);
      expect(hpa.spec.minReplicas).toBeLessThanOrEqual(hpa.spec.maxReplicas);
    }
  });

  it('routes every Service port to a container port of the pods it selects', () => {
    for (const svc of ofKind(resources(), 'Service')) {
      const targets = workloads(resources()).filter((w) => selects(svc.spec.selector, podLabels(w)));
      expect(targets.length, `Service ${svc.metadata.name} selects no pods`).toBeGreaterThan(0);
      for (const w of targets) {
        const ports = w.spec.template.spec.containers.flatMap((c: Obj) => c.ports ?? []);
        for (const p of svc.spec.ports) {
          const target = p.targetPort ?? p.port;
          const match = ports.find((cp: Obj) => (typeof target === 'number' ? cp.containerPort === target : cp.name === target));
          expect(match, `Service ${svc.metadata.name} port ${p.port} -> ${target} on ${w.metadata.name}`).toBeDefined();
        }
      }
    }
    for (const pdb of ofKind(resources(), 'PodDisruptionBudget')) {
      const targets = workloads(resources()).filter((w) => selects(pdb.spec.selector.matchLabels, podLabels(w)));
      expect(targets.length, `PodDisruptionBudget ${pdb.metadata.name}`).toBe(1);
    }
  });

  it('mounts only ConfigMaps and ServiceAccounts that are part of the stack', () => {
    for (const w of workloads(resources())) {
      const spec = w.spec.template.spec;
      if (spec.serviceAccountName) named(resources(), 'ServiceAccount', spec.serviceAccountName);
      for (const v of spec.volumes ?? []) {
        if (v.configMap) named(resources(), 'ConfigMap', v.configMap.name);
        // Secrets hold credentials and are created by the operator, never committed (deploy/README.md).
        if (v.secret) expect(DOCUMENTED_SECRETS, `${w.metadata.name}: Secret ${v.secret.secretName}`).toContain(v.secret.secretName);
      }
      for (const c of spec.containers) {
        for (const e of c.env ?? []) {
          if (e.valueFrom?.secretKeyRef)
            expect(DOCUMENTED_SECRETS, `${w.metadata.name}: Secret ${e.valueFrom.secretKeyRef.name}`).toContain(e.valueFrom.secretKeyRef.name);
        }
      }
      const mounts = [...spec.containers, ...(spec.initContainers ?? [])].flatMap((c: Obj) => c.volumeMounts ?? []);
      const volumes = new Set([...(spec.volumes ?? []), ...(w.spec.volumeClaimTemplates ?? []).map((t: Obj) => t.metadata)].map((v: Obj) => v.name));
      for (const m of mounts) expect(volumes.has(m.name), `${w.metadata.name}: volume ${m.name}`).toBe(true);
    }
  });

  it.each(STAGES)('runs $name on its default port $port with gRPC health probes and metrics', (stage) => {
    const deployment = named(resources(), 'Deployment', stage.name);
    const c = server(resources(), stage.name);
    const grpcPort = c.ports.find((p: Obj) => p.name === 'grpc');
    expect(grpcPort.containerPort).toBe(stage.port);
    expect(env(c, 'PORT') ?? String(stage.port)).toBe(String(stage.port));
    if (stage.name === 'gateway') {
      // TLS on the gRPC port: the kubelet's plaintext gRPC probe cannot speak to it, so the
      // HTTPS /healthz of the HTTP/JSON port answers the probes.
      const http = c.ports.find((p: Obj) => p.name === 'http');
      expect(env(c, 'CFRSAM_HTTP_PORT')).toBe(String(http.containerPort));
      for (const probe of ['startupProbe', 'readinessProbe', 'livenessProbe']) {
        expect(c[probe].httpGet, `${stage.name} ${probe}`).toEqual({ port: 'http', path: '/healthz', scheme: 'HTTPS' });
      }
    } else {
      for (const probe of ['startupProbe', 'readinessProbe']) {
        expect(c[probe].grpc, `${stage.name} ${probe}`).toEqual({ port: stage.port, service: stage.healthService });
      }
      expect(c.livenessProbe.grpc.port).toBe(stage.port);
    }

    const serviceName = stage.name === 'decoder' ? 'decoder-headless' : stage.name;
    const svc = named(resources(), 'Service', serviceName);
    expect(svc.spec.ports.find((p: Obj) => p.name === 'grpc').port).toBe(stage.port);

    const metricsPort = c.ports.find((p: Obj) => p.name === 'metrics').containerPort;
    expect(env(c, 'METRICS_PORT')).toBe(String(metricsPort));
    const annotations = deployment.spec.template.metadata.annotations;
    expect(annotations['prometheus.io/scrape']).toBe('true');
    expect(annotations['prometheus.io/port']).toBe(String(metricsPort));
    if (observed) {
      expect(env(c, 'CFRSAM_TRACING')).toBe('otlp');
      serviceFor(resources(), env(c, 'OTEL_EXPORTER_OTLP_ENDPOINT')!);
    } else {
      expect(env(c, 'CFRSAM_TRACING')).toBeUndefined();
    }
  });

  it.each(STAGES)('sets only environment variables that $name reads', (stage) => {
    const reads = envReadBy(stage.name);
    const unread = (server(resources(), stage.name).env ?? [])
      .map((e: Obj) => e.name as string)
      .filter((name: string) => !reads(name) && !AWAITING_SERVICE_SUPPORT.has(name));
    expect(unread).toEqual([]);
  });

  it.each(STAGES)('copies the model bundle into $name from the bundle image', (stage) => {
    const spec = named(resources(), 'Deployment', stage.name).spec.template.spec;
    const bundleDir = env(server(resources(), stage.name), 'CFRSAM_BUNDLE');
    const mount = server(resources(), stage.name).volumeMounts.find((m: Obj) => m.mountPath === bundleDir);
    expect(mount, `${stage.name}: CFRSAM_BUNDLE ${bundleDir} is a mount`).toBeDefined();
    expect(mount.readOnly).toBe(true);
    expect(spec.volumes.find((v: Obj) => v.name === mount.name).emptyDir).toBeDefined();
    const init = spec.initContainers.find((c: Obj) => c.name === 'model-bundle');
    expect(init.image).toMatch(variant === 'cpu' || variant === 'gpu' ? /^registry\.example\.com\/cfrsam\/model-bundle:/ : /^cfrsam\/model-bundle:/);
    expect(init.volumeMounts.find((m: Obj) => m.name === mount.name).mountPath).toBe(bundleDir);
    expect(init.command.join(' ')).toContain(bundleDir);
  });

  it('lets the gateway reach every replica of every stage, and the decoders every encoder, through headless Services', () => {
    const gw = server(resources(), 'gateway');
    const callers: Array<[string, Obj, string]> = [
      ['prompter', gw, 'CFRSAM_PROMPTER'],
      ['encoder', gw, 'CFRSAM_ENCODER'],
      ['decoder', gw, 'CFRSAM_DECODERS'],
      ['encoder', server(resources(), 'decoder'), 'CFRSAM_ENCODER'],
    ];
    for (const [stage, container, variable] of callers) {
      const entries = env(container, variable)!.split(',');
      expect(entries.length).toBeGreaterThan(0);
      for (const entry of entries) {
        // dns:///NAME:PORT: the caller resolves NAME to every replica (packages/rpc/src/discovery.ts).
        expect(entry, `${variable}`).toMatch(/^dns:\/\/\//);
        const svc = serviceFor(resources(), entry.replace(/^dns:\/\/\//, ''));
        expect(svc.spec.clusterIP).toBe('None');
        expect(selects(svc.spec.selector, podLabels(named(resources(), 'Deployment', stage)))).toBe(true);
      }
    }
  });

  it('points encoder and decoder at the NATS Service for the shared feature cache', () => {
    for (const stage of ['encoder', 'decoder']) {
      const url = env(server(resources(), stage), 'CFRSAM_NATS_URL');
      const m = /^nats:\/\/([a-z0-9-]+:\d+)$/.exec(url ?? '');
      expect(m, `${stage}: CFRSAM_NATS_URL ${url}`).not.toBeNull();
      expect(serviceFor(resources(), m![1]).metadata.name).toBe('nats');
    }
  });

  itObserved('scrapes annotated pods with Prometheus and labels series with their pod', () => {
    const config = parseYaml(named(resources(), 'ConfigMap', 'prometheus-config').data['prometheus.yml']);
    const job = config.scrape_configs.find((j: Obj) => j.job_name === 'cfrsam-pods');
    expect(job.kubernetes_sd_configs[0].role).toBe('pod');
    const targetLabels = job.relabel_configs.map((r: Obj) => r.target_label);
    expect(targetLabels).toEqual(expect.arrayContaining(['namespace', 'pod', '__address__']));
    expect(job.relabel_configs[0].source_labels).toEqual(['__meta_kubernetes_pod_annotation_prometheus_io_scrape']);
    const prometheus = named(resources(), 'Deployment', 'prometheus');
    const role = named(resources(), 'Role', 'prometheus-discovery');
    expect(role.rules[0].resources).toContain('pods');
    expect(prometheus.spec.template.spec.serviceAccountName).toBe('prometheus');
  });

  it('runs NATS with JetStream on file storage on its volume', () => {
    const conf: string = named(resources(), 'ConfigMap', 'nats-config').data['nats.conf'];
    const jetstream = /jetstream \{([^}]*)\}/.exec(conf);
    expect(jetstream).not.toBeNull();
    const storeDir = /store_dir: (\S+)/.exec(jetstream![1])![1];
    expect(jetstream![1]).toMatch(/max_file_store: \d+GB/);
    const nats = named(resources(), 'StatefulSet', 'nats');
    const data = nats.spec.template.spec.containers[0].volumeMounts.find((m: Obj) => storeDir.startsWith(m.mountPath + '/'));
    expect(data.name).toBe(nats.spec.volumeClaimTemplates[0].metadata.name);
    expect(named(resources(), 'Service', 'nats').spec.ports.find((p: Obj) => p.name === 'client').port).toBe(Number(/^port: (\d+)/m.exec(conf)![1]));
  });

  itObserved('receives spans in the collector on the port the services send to and exports them to Jaeger', () => {
    const config = parseYaml(named(resources(), 'ConfigMap', 'otel-collector-config').data['config.yaml']);
    const collector = named(resources(), 'Deployment', 'otel-collector').spec.template.spec.containers[0];
    const portOf = (endpoint: string) => Number(endpoint.split(':').pop());
    expect(collector.ports.map((p: Obj) => p.containerPort)).toContain(portOf(config.receivers.otlp.protocols.grpc.endpoint));
    expect(env(server(resources(), 'gateway'), 'OTEL_EXPORTER_OTLP_ENDPOINT')).toBe(
      `http://otel-collector:${portOf(config.receivers.otlp.protocols.grpc.endpoint)}`,
    );
    serviceFor(resources(), config.exporters['otlp/jaeger'].endpoint);
    const annotations = named(resources(), 'Deployment', 'otel-collector').spec.template.metadata.annotations;
    expect(annotations['prometheus.io/port']).toBe(String(portOf(config.exporters.prometheus.endpoint)));
    const defined = new Set([
      ...Object.keys(config.receivers),
      ...Object.keys(config.processors),
      ...Object.keys(config.exporters),
      ...Object.keys(config.connectors),
    ]);
    for (const pipeline of Object.values(config.service.pipelines) as Obj[]) {
      for (const part of [...pipeline.receivers, ...(pipeline.processors ?? []), ...pipeline.exporters]) expect(defined.has(part), part).toBe(true);
    }
  });

  itObserved('provisions Grafana dashboards that query only metrics the services export', () => {
    expect(exported.has('cfrsam_stage_duration_seconds_bucket')).toBe(true);
    const grafana = named(resources(), 'Deployment', 'grafana').spec.template.spec;
    const mountOf = (configMap: string) => {
      const volume = grafana.volumes.find((v: Obj) => v.configMap?.name === configMap);
      return grafana.containers[0].volumeMounts.find((m: Obj) => m.name === volume.name).mountPath;
    };
    const providers = parseYaml(named(resources(), 'ConfigMap', 'grafana-dashboard-providers').data['dashboard-providers.yaml']);
    expect(providers.providers[0].options.path).toBe(mountOf('grafana-dashboards'));
    expect(mountOf('grafana-datasources')).toBe('/etc/grafana/provisioning/datasources');
    const datasources = parseYaml(named(resources(), 'ConfigMap', 'grafana-datasources').data['datasources.yaml']).datasources;
    for (const ds of datasources) serviceFor(resources(), ds.url.replace(/^http:\/\//, ''));
    expect(datasources.map((d: Obj) => d.type)).toContain('prometheus');

    const dashboards = named(resources(), 'ConfigMap', 'grafana-dashboards').data as Record<string, string>;
    expect(Object.keys(dashboards).length).toBeGreaterThan(0);
    const queried = new Set<string>();
    for (const [file, text] of Object.entries(dashboards)) {
      const dashboard = JSON.parse(text);
      // Portable: the Prometheus data source and the namespace are variables, not this cluster's uid.
      const variables = new Map<string, Obj>(dashboard.templating.list.map((v: Obj) => [v.name, v]));
      expect(variables.get('datasource')).toMatchObject({ type: 'datasource', query: 'prometheus' });
      expect(variables.get('namespace')).toMatchObject({ type: 'query', datasource: { uid: '${datasource}' } });
      const panels: Obj[] = dashboard.panels.flatMap((p: Obj) => [p, ...(p.panels ?? [])]);
      const ids = panels.map((p) => p.id);
      expect(new Set(ids).size, `${file}: panel ids are unique`).toBe(ids.length);
      for (const panel of panels.filter((p) => p.type !== 'row')) {
        expect(panel.datasource.uid, `${file} "${panel.title}": data source`).toBe('${datasource}');
        expect(panel.targets.length, `${file} "${panel.title}"`).toBeGreaterThan(0);
        for (const target of panel.targets) {
          expect(target.expr, `${file} "${panel.title}": scoped to the namespace variable`).toContain('namespace="$namespace"');
          expect(promqlMetricNames(target.expr).length, `${file} "${panel.title}": ${target.expr}`).toBeGreaterThan(0);
          const names = promqlMetricNames(target.expr).filter((n) => !PROMETHEUS_OWN_METRICS.has(n));
          for (const name of names) {
            expect(exported.has(name), `${file} "${panel.title}" queries ${name}, which the services do not export`).toBe(true);
            queried.add(name);
          }
        }
      }
    }
    // Latency per stage, cache hit ratio, batch sizes, in-flight calls per pod (the HPA metric).
    for (const name of ['cfrsam_stage_duration_seconds_bucket', 'cfrsam_cache_lookups_total', 'cfrsam_batch_size_bucket', 'cfrsam_in_flight_calls']) {
      expect(queried.has(name), `dashboards query ${name}`).toBe(true);
    }
    // Error rates, with server faults apart from client errors; pods counted by scrape targets.
    const overview = JSON.parse(dashboards['cfrsam-overview.json']);
    const titles = overview.panels.map((p: Obj) => p.title);
    expect(titles).toEqual(
      expect.arrayContaining(['Server error rate by method', 'Client error and rejection rate by method', 'Pods up per service']),
    );
  });

  itObserved('loads alert rules into Prometheus that query exported metrics, the same rules as the PrometheusRule', () => {
    const config = parseYaml(named(resources(), 'ConfigMap', 'prometheus-config').data['prometheus.yml']);
    const data = named(resources(), 'ConfigMap', 'prometheus-config').data as Record<string, string>;
    expect(config.rule_files).toEqual(['/etc/prometheus/alerts.yml']);
    const prometheus = named(resources(), 'Deployment', 'prometheus').spec.template.spec;
    const configVolume = prometheus.volumes.find((v: Obj) => v.configMap?.name === 'prometheus-config').name;
    expect(prometheus.containers[0].volumeMounts.find((m: Obj) => m.name === configVolume).mountPath).toBe('/etc/prometheus');
    const alerts = parseYaml(data['alerts.yml']);
    const rules: Obj[] = alerts.groups.flatMap((g: Obj) => g.rules);
    expect(rules.map((r) => r.alert)).toEqual(expect.arrayContaining(['CfrsamServerErrors', 'CfrsamServiceDown']));
    for (const rule of rules) {
      for (const name of promqlMetricNames(rule.expr).filter((n) => !PROMETHEUS_OWN_METRICS.has(n)))
        expect(exported.has(name), `${rule.alert}: ${name}`).toBe(true);
    }
    const operator = parseAllDocuments(fs.readFileSync(path.join(K8S, 'components', 'prometheus-operator', 'monitors.yaml'), 'utf8')).map((d) =>
      d.toJS(),
    );
    expect(operator.find((r: Obj) => r.kind === 'PrometheusRule').spec).toEqual(alerts);
  });

  if (variant === 'gpu') {
    it('gives prompter, encoder and decoder one GPU each on GPU nodes with the CUDA provider', () => {
      for (const stage of MODEL_STAGES) {
        const spec = named(resources(), 'Deployment', stage).spec.template.spec;
        const c = server(resources(), stage);
        expect(c.resources.limits['nvidia.com/gpu'], stage).toBe('1');
        expect(c.resources.requests['nvidia.com/gpu'], stage).toBe('1');
        expect(spec.nodeSelector['nvidia.com/gpu.present']).toBe('true');
        expect(spec.tolerations).toContainEqual({ key: 'nvidia.com/gpu', operator: 'Exists', effect: 'NoSchedule' });
        expect(env(c, 'CFRSAM_EXECUTION_PROVIDERS')).toBe('cuda,cpu');
        expect(c.image).toBe(`registry.example.com/cfrsam/${stage}-gpu:0.1.0`);
        // The base's settings survive the patch.
        expect(env(c, 'CFRSAM_BUNDLE')).toBe('/models/bundle');
        expect(c.readinessProbe.grpc.service).toMatch(/^cfrsam\.v1\./);
      }
      const gateway = server(resources(), 'gateway');
      expect(gateway.resources.limits['nvidia.com/gpu']).toBeUndefined();
      expect(gateway.image).toBe('registry.example.com/cfrsam/gateway:0.1.0');
      // Larger batches for launch-bound GPU stages (overlays/gpu/gateway-gpu-batches.yaml); the
      // base's settings survive the patch.
      expect(env(gateway, 'CFRSAM_DECODE_BATCH')).toBe('64');
      expect(env(gateway, 'CFRSAM_TILE_BATCH')).toBe('8');
      expect(env(gateway, 'CFRSAM_PROMPTER')).toBeDefined();
    });

    it('scales the GPU stages on in-flight calls per pod served by prometheus-adapter', () => {
      const config = parseYaml(named(resources(), 'ConfigMap', 'prometheus-adapter-config').data['config.yaml']);
      const served = new Map<string, Obj>(config.rules.map((r: Obj) => [r.name.as, r]));
      for (const stage of MODEL_STAGES) {
        const [metric] = named(resources(), 'HorizontalPodAutoscaler', stage).spec.metrics;
        expect(metric.type).toBe('Pods');
        const rule = served.get(metric.pods.metric.name);
        expect(rule, `adapter serves ${metric.pods.metric.name}`).toBeDefined();
        expect(Object.keys(rule!.resources.overrides).sort()).toEqual(['namespace', 'pod']);
        for (const name of promqlMetricNames(rule!.seriesQuery)) expect(exported.has(name), name).toBe(true);
      }
      expect(named(resources(), 'HorizontalPodAutoscaler', 'gateway').spec.metrics[0].resource.name).toBe('cpu');
      const adapter = named(resources(), 'Deployment', 'prometheus-adapter').spec.template.spec.containers[0];
      expect(adapter.args).toContain('--prometheus-url=http://prometheus:9090/');
      for (const api of ofKind(resources(), 'APIService')) {
        expect(api.spec.group).toBe('custom.metrics.k8s.io');
        const svc = named(resources(), 'Service', api.spec.service.name);
        expect(svc.spec.ports.map((p: Obj) => p.port)).toContain(api.spec.service.port);
      }
    });
  } else if (variant === 'cpu') {
    it('runs on CPU only and scales every stage on CPU utilisation', () => {
      expect(JSON.stringify(resources())).not.toContain('nvidia.com/gpu');
      for (const stage of MODEL_STAGES) expect(env(server(resources(), stage), 'CFRSAM_EXECUTION_PROVIDERS')).toBe('cpu');
      for (const hpa of ofKind(resources(), 'HorizontalPodAutoscaler')) {
        expect(hpa.spec.metrics).toEqual([{ type: 'Resource', resource: { name: 'cpu', target: { type: 'Utilization', averageUtilization: 70 } } }]);
      }
    });
  }
});

// ---------------------------------------------------------------------------------------------
// Security and scaling rules that hold for every variant.

/** Whether NetworkPolicy `peer` (a from/to entry) admits pods labelled `labels` in the namespace. */
function peerAdmits(peer: Obj, labels: Record<string, string> | null): boolean {
  // `labels` null: a client outside the namespace (another namespace or outside the cluster).
  if (peer.ipBlock) return labels === null;
  if (peer.namespaceSelector) return false; // other namespaces only (ours carries no such label)
  return labels !== null && selects(peer.podSelector?.matchLabels ?? {}, labels);
}

/** Whether `rules` (ingress or egress rules of the policies that select a pod) allow `peer` on `port`. */
function rulesAllow(policies: Obj[], direction: 'ingress' | 'egress', peer: Record<string, string> | null, port: number): boolean {
  const field = direction === 'ingress' ? 'from' : 'to';
  return policies.some((p) =>
    (p.spec[direction] ?? []).some(
      (rule: Obj) =>
        (rule.ports === undefined || rule.ports.some((rp: Obj) => rp.port === port)) &&
        (rule[field] === undefined || rule[field].some((entry: Obj) => peerAdmits(entry, peer))),
    ),
  );
}

/** Whether pods labelled `from` (null: outside the namespace) can open `port` on pods labelled `to`. */
function reachable(resources: Resource[], from: Record<string, string> | null, to: Record<string, string>, port: number): boolean {
  const policies = ofKind(resources, 'NetworkPolicy');
  const governing = (labels: Record<string, string>, type: string) =>
    policies.filter((p) => p.spec.policyTypes.includes(type) && selects(p.spec.podSelector.matchLabels ?? {}, labels));
  const ingress = governing(to, 'Ingress');
  const ingressOk = ingress.length === 0 || rulesAllow(ingress, 'ingress', from, port);
  if (from === null) return ingressOk;
  const egress = governing(from, 'Egress');
  const egressOk = egress.length === 0 || rulesAllow(egress, 'egress', to, port);
  return ingressOk && egressOk;
}

describe.each(Object.keys(VARIANTS) as Variant[])('deploy/k8s %s: security and scaling', (variant) => {
  const resources = () => rendered[variant];
  const pods = () => new Map(workloads(resources()).map((w) => [w.metadata.name as string, podLabels(w)]));

  it('leaves the scale of every HPA-owned Deployment to its HPA (no replicas)', () => {
    for (const hpa of ofKind(resources(), 'HorizontalPodAutoscaler')) {
      expect(named(resources(), 'Deployment', hpa.spec.scaleTargetRef.name).spec.replicas, hpa.metadata.name).toBeUndefined();
    }
  });

  it('reaches every stage only as the NetworkPolicies say', () => {
    const p = pods();
    const pod = (name: string) => p.get(name)!;
    expect(ofKind(resources(), 'NetworkPolicy').find((n) => n.metadata.name === 'default-deny')?.spec).toEqual({
      podSelector: {},
      policyTypes: ['Ingress', 'Egress'],
    });
    const stagePort: Record<string, number> = { prompter: 50052, encoder: 50053, decoder: 50054 };
    for (const [stage, port] of Object.entries(stagePort)) {
      expect(reachable(resources(), pod('gateway'), pod(stage), port), `gateway -> ${stage}`).toBe(true);
      expect(reachable(resources(), null, pod(stage), port), `outside -> ${stage}`).toBe(false);
      for (const other of p.keys()) {
        if (other === 'gateway' || (other === 'decoder' && stage === 'encoder')) continue;
        expect(reachable(resources(), pod(other), pod(stage), port), `${other} -> ${stage}`).toBe(false);
      }
    }
    expect(reachable(resources(), pod('decoder'), pod('encoder'), 50053), 'decoder -> encoder (features)').toBe(true);
    expect(reachable(resources(), null, pod('gateway'), 50051), 'clients -> gateway').toBe(true);
    for (const stage of ['gateway', 'encoder', 'decoder'])
      expect(reachable(resources(), pod(stage), pod('nats'), 4222), `${stage} -> nats`).toBe(true);
    expect(reachable(resources(), pod('prompter'), pod('nats'), 4222), 'prompter -> nats').toBe(false);
    expect(reachable(resources(), null, pod('nats'), 4222), 'outside -> nats').toBe(false);
    if (p.has('prometheus')) {
      for (const stage of ['gateway', ...Object.keys(stagePort)]) {
        expect(reachable(resources(), pod('prometheus'), pod(stage), 9464), `prometheus -> ${stage} metrics`).toBe(true);
        expect(reachable(resources(), pod(stage), pod('otel-collector'), 4317), `${stage} -> collector`).toBe(true);
      }
      expect(reachable(resources(), pod('grafana'), pod('encoder'), 50053), 'grafana -> encoder').toBe(false);
    }
  });

  it('meets the restricted Pod Security Standard the namespace enforces, with no service account token where none is needed', () => {
    const labels = named(resources(), 'Namespace', NAMESPACE).metadata.labels;
    expect(labels['pod-security.kubernetes.io/enforce']).toBe('restricted');
    for (const w of workloads(resources())) {
      const spec = w.spec.template.spec;
      const where = `${w.kind}/${w.metadata.name}`;
      expect(spec.securityContext?.runAsNonRoot, where).toBe(true);
      expect(spec.securityContext?.seccompProfile?.type, where).toBe('RuntimeDefault');
      for (const c of [...spec.containers, ...(spec.initContainers ?? [])]) {
        expect(c.securityContext?.allowPrivilegeEscalation, `${where} ${c.name}`).toBe(false);
        expect(c.securityContext?.capabilities?.drop, `${where} ${c.name}`).toEqual(['ALL']);
      }
      // Only the pods that read the Kubernetes API (Prometheus discovery, prometheus-adapter) get a token.
      if (spec.serviceAccountName) expect(spec.automountServiceAccountToken, where).not.toBe(false);
      else expect(spec.automountServiceAccountToken, where).toBe(false);
    }
  });

  it('wires the internal token into every service, and TLS, client tokens, NATS and a connection age into the gateway', () => {
    for (const stage of STAGES) {
      const token = (server(resources(), stage.name).env as Obj[]).find((e) => e.name === 'CFRSAM_INTERNAL_TOKEN');
      expect(token?.valueFrom?.secretKeyRef, stage.name).toEqual({ name: 'cfrsam-internal', key: 'token' });
    }
    const deployment = named(resources(), 'Deployment', 'gateway');
    const gw = server(resources(), 'gateway');
    const secretMountOf = (file: string, secret: string) => {
      const mount = (gw.volumeMounts as Obj[]).find((m) => file.startsWith(m.mountPath + '/'));
      expect(mount, file).toBeDefined();
      expect(mount!.subPath, `${file}: no subPath, so renewed Secrets reach the pod`).toBeUndefined();
      const volume = deployment.spec.template.spec.volumes.find((v: Obj) => v.name === mount!.name);
      expect(volume.secret.secretName).toBe(secret);
    };
    secretMountOf(env(gw, 'CFRSAM_TLS_CERT')!, 'gateway-tls');
    secretMountOf(env(gw, 'CFRSAM_TLS_KEY')!, 'gateway-tls');
    expect(env(gw, 'CFRSAM_TLS_CERT')).toMatch(/\/tls\.crt$/);
    secretMountOf(env(gw, 'CFRSAM_AUTH_TOKENS')!, 'cfrsam-client-tokens');
    const nats = /^nats:\/\/([a-z0-9-]+:\d+)$/.exec(env(gw, 'CFRSAM_NATS_URL') ?? '');
    expect(nats, 'gateway CFRSAM_NATS_URL').not.toBeNull();
    expect(serviceFor(resources(), nats![1]).metadata.name).toBe('nats');
    expect(Number(env(gw, 'CFRSAM_MAX_CONNECTION_AGE_MS'))).toBeGreaterThan(0);
    const readme = fs.readFileSync(path.join(ROOT, 'deploy', 'README.md'), 'utf8');
    for (const secret of DOCUMENTED_SECRETS) expect(readme, `deploy/README.md explains Secret ${secret}`).toContain(secret);
  });

  if (variant === 'cpu' || variant === 'gpu') {
    it('takes every image of the stack from the registry set in components/images', () => {
      for (const w of workloads(resources())) {
        for (const c of [...w.spec.template.spec.containers, ...(w.spec.template.spec.initContainers ?? [])]) {
          if (/(^|\/)cfrsam\//.test(c.image)) expect(c.image, `${w.metadata.name} ${c.name}`).toMatch(/^registry\.example\.com\/cfrsam\//);
        }
      }
      const files = (dir: string): string[] =>
        fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? files(path.join(dir, e.name)) : [path.join(dir, e.name)]));
      const naming = files(K8S).filter((f) => fs.readFileSync(f, 'utf8').includes('registry.example.com'));
      expect(naming.map((f) => path.relative(K8S, f))).toEqual(['components/images/kustomization.yaml']);
    });
  }

  if (variant === 'operator') {
    it('scrapes the services with a PodMonitor on their metrics port', () => {
      const monitor = named(resources(), 'PodMonitor', 'cfrsam-services');
      const [expression] = monitor.spec.selector.matchExpressions;
      expect([...expression.values].sort()).toEqual(STAGES.map((st) => st.name).sort());
      for (const stage of STAGES) {
        const ports = server(resources(), stage.name).ports.map((p: Obj) => p.name);
        for (const endpoint of monitor.spec.podMetricsEndpoints) expect(ports, stage.name).toContain(endpoint.port);
      }
      const targets = monitor.spec.podMetricsEndpoints[0].relabelings.map((r: Obj) => r.targetLabel);
      expect(targets).toEqual(expect.arrayContaining(['app', 'namespace', 'pod']));
    });
  }
});

describe.skipIf(!KUBECTL)('the offline renderer', () => {
  it.each(Object.keys(VARIANTS) as Variant[])('renders %s as kustomize does', (variant) => {
    const key = (r: Resource) => `${r.kind}/${r.metadata.namespace ?? ''}/${r.metadata.name}`;
    const sortKeys = (v: unknown): unknown =>
      Array.isArray(v)
        ? v.map(sortKeys)
        : v && typeof v === 'object'
          ? Object.fromEntries(
              Object.keys(v)
                .sort()
                .map((k) => [k, sortKeys((v as Obj)[k])]),
            )
          : v;
    const lite = new Map(renderKustomization(VARIANTS[variant]).map((r) => [key(r), sortKeys(r)]));
    const real = new Map(rendered[variant].map((r) => [key(r), sortKeys(r)]));
    expect([...lite.keys()].sort()).toEqual([...real.keys()].sort());
    for (const [k, r] of real) expect(lite.get(k), k).toEqual(r);
  });
});
