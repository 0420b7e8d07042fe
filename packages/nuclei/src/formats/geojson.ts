// QuPath-compatible GeoJSON: a FeatureCollection with one Feature per nucleus, a Polygon geometry
// in image pixels and the properties QuPath reads when importing objects (objectType,
// classification { name, color }, measurements as a name -> number map, as QuPath 0.4+ writes).
import { createHash } from 'node:crypto';
import type { segmentationProto } from '@cfrsam/rpc';

type Nucleus = segmentationProto.Nucleus;
import { colorOfClass, type ClassStyle, type Rgb } from './color';

export interface GeoJsonFeature {
  type: 'Feature';
  id: string;
  geometry: { type: 'Polygon'; coordinates: number[][][] };
  properties: {
    objectType: 'detection';
    /** Absent for unclassified nuclei (QuPath's convention for "no class"). */
    classification?: { name: string; color: Rgb };
    isLocked: boolean;
    measurements: Record<string, number>;
    /** The service's nucleus id (label map value), kept for cross-reference with the CSV. */
    nucleusId: number;
  };
}

export interface GeoJsonFeatureCollection {
  type: 'FeatureCollection';
  features: GeoJsonFeature[];
}

/** Measurement names shared by the GeoJSON and the CSV; um^2 only when mpp is known. */
export function nucleusMeasurementMap(n: Nucleus, classes: readonly ClassStyle[]): Record<string, number> {
  const m = n.measurements;
  const out: Record<string, number> = {
    Score: n.score,
    'Predicted IoU': n.predictedIou,
    'Centroid X px': n.centroid?.x ?? 0,
    'Centroid Y px': n.centroid?.y ?? 0,
    'Area px^2': m?.areaPx ?? 0,
  };
  if (m && m.areaUm2 > 0) out['Area um^2'] = m.areaUm2;
  Object.assign(out, {
    'Perimeter px': m?.perimeterPx ?? 0,
    Circularity: m?.circularity ?? 0,
    Eccentricity: m?.eccentricity ?? 0,
    'Major axis px': m?.majorAxisPx ?? 0,
    'Minor axis px': m?.minorAxisPx ?? 0,
    Solidity: m?.solidity ?? 0,
    'Mean R': m?.meanR ?? 0,
    'Mean G': m?.meanG ?? 0,
    'Mean B': m?.meanB ?? 0,
  });
  n.classProbabilities.forEach((p, i) => {
    const name = classes.find((c) => c.index === i)?.name ?? `class ${i}`;
    out[`P(${name})`] = p;
  });
  return out;
}

/** A stable UUID-shaped id from the image and nucleus ids (QuPath keeps feature ids as UUIDs). */
export function featureId(imageId: string, nucleusId: number): string {
  const h = createHash('sha1').update(`${imageId}/${nucleusId}`).digest('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-5${h.slice(13, 16)}-${((parseInt(h[16], 16) & 3) | 8).toString(16)}${h.slice(17, 20)}-${h.slice(20, 32)}`;
}

export function nucleiToGeoJson(nuclei: readonly Nucleus[], classes: readonly ClassStyle[], imageId = ''): GeoJsonFeatureCollection {
  const features: GeoJsonFeature[] = [];
  for (const n of nuclei) {
    if (n.polygon.length < 3) continue;
    const ring = n.polygon.map((p) => [p.x, p.y]);
    ring.push([n.polygon[0].x, n.polygon[0].y]);
    const feature: GeoJsonFeature = {
      type: 'Feature',
      id: featureId(imageId, n.id),
      geometry: { type: 'Polygon', coordinates: [ring] },
      properties: {
        objectType: 'detection',
        isLocked: false,
        measurements: nucleusMeasurementMap(n, classes),
        nucleusId: n.id,
      },
    };
    if (n.classIndex >= 0) {
      feature.properties.classification = { name: n.className, color: colorOfClass(classes, n.classIndex) };
    }
    features.push(feature);
  }
  return { type: 'FeatureCollection', features };
}
