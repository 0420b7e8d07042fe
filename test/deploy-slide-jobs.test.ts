// The slide-jobs component of the Kubernetes manifests (deploy/k8s/components/slide-jobs), part of
// both overlays, rendered with the repository's kustomize renderer: every gateway mounts the
// ReadWriteMany slide root and knows it (CFRSAM_SLIDE_ROOT), has scratch space for artefacts and
// the NATS URL of the JetStream server, whose store is on a PersistentVolume.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { renderKustomization, type Resource } from '../deploy/tools/kustomize-lite';
import { unknownFields, validateResource } from '../deploy/tools/validate-resources';

const K8S = path.resolve(__dirname, '../deploy/k8s');

/** Both overlays include the component (their kustomization.yaml lists it). */
function render(overlay: string): any[] {
  const kustomization = fs.readFileSync(path.join(K8S, 'overlays', overlay, 'kustomization.yaml'), 'utf8');
  expect(kustomization).toContain('../../components/slide-jobs');
  return renderKustomization(path.join(K8S, 'overlays', overlay)) as any[];
}

describe.each(['cpu', 'gpu'])('components/slide-jobs on overlays/%s', (overlay) => {
  const resources = render(overlay);
  const find = (kind: string, name: string) => resources.find((r) => r.kind === kind && r.metadata.name === name);

  it('renders valid resources', () => {
    for (const r of resources) {
      validateResource(r as Resource);
      expect(unknownFields(r as Resource), `${r.kind}/${r.metadata.name}`).toEqual([]);
    }
  });

  it('gives every gateway the slide root (RWX claim), scratch space and the NATS URL', () => {
    const claim = find('PersistentVolumeClaim', 'slides');
    expect(claim.metadata.namespace).toBe('cfrsam');
    expect(claim.spec.accessModes).toEqual(['ReadWriteMany']);
    const gateway = find('Deployment', 'gateway');
    const pod = gateway.spec.template.spec;
    const server = pod.containers.find((c: any) => c.name === 'server');
    const env = Object.fromEntries(server.env.map((e: any) => [e.name, e.value]));
    expect(env.CFRSAM_SLIDE_ROOT).toBe('/slides');
    expect(env.CFRSAM_NATS_URL).toMatch(/^nats:\/\/nats:4222$/);
    expect(Number(env.CFRSAM_SLIDE_WORKERS)).toBeGreaterThan(0);
    // A job's task window covers every region the autoscaled gateways run at once, so one job can
    // keep them all busy.
    const hpa = find('HorizontalPodAutoscaler', 'gateway');
    expect(Number(env.CFRSAM_SLIDE_JOB_WINDOW)).toBeGreaterThanOrEqual(hpa.spec.maxReplicas * Number(env.CFRSAM_SLIDE_WORKERS));
    const mounts = Object.fromEntries(server.volumeMounts.map((m: any) => [m.name, m.mountPath]));
    expect(mounts.slides).toBe('/slides');
    expect(mounts.scratch).toBe(env.TMPDIR);
    // The base's own mounts survive the patch.
    expect(mounts['model-bundle']).toBe('/models/bundle');
    const volumes = Object.fromEntries(pod.volumes.map((v: any) => [v.name, v]));
    expect(volumes.slides.persistentVolumeClaim.claimName).toBe('slides');
    expect(volumes.scratch.emptyDir).toBeDefined();
  });

  it('keeps JetStream on a persistent volume', () => {
    const nats = find('StatefulSet', 'nats');
    const data = nats.spec.volumeClaimTemplates.find((t: any) => t.metadata.name === 'data');
    expect(data.spec.resources.requests.storage).toBeTruthy();
    const mount = nats.spec.template.spec.containers[0].volumeMounts.find((m: any) => m.name === 'data');
    expect(mount.mountPath).toBe('/data');
    expect(fs.readFileSync(path.join(K8S, 'base/nats/nats.conf'), 'utf8')).toMatch(/store_dir:\s*\/data\//);
  });
});
