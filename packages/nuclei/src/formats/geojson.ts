// QuPath-compatible GeoJSON: a FeatureCollection with one Feature per nucleus and the properties
// QuPath reads when importing objects (objectType, classification { name, color }, measurements as
// a name -> number map, as QuPath 0.4+ writes). QuPath keeps nothing else of a Feature, so the
// nucleus id travels as the "Nucleus ID" measurement, and measurements carry QuPath's own names and
// units ("Area µm^2", "Length µm", "Max diameter µm"...) so they line up with QuPath's detections.
// Coordinates: the slide's (or larger image's) level-0 pixels, slide = origin + downsample *
// image pixels, for a region cut from a slide; the image's own pixels by default.
// clients/python/cfrsam_client/geojson.py writes the same layout.
import { createHash } from 'node:crypto';
import type { segmentationProto } from '@cfrsam/rpc';

type Nucleus = segmentationProto.Nucleus;
import { convexHull } from '../instances/contour';
import { parseHexColor, type ClassStyle, type Rgb } from './color';

export interface GeoJsonFeature {
  type: 'Feature';
  id: string;
  geometry: { type: 'Polygon'; coordinates: number[][][] };
  properties: {
    /** 'cell' when the nucleus was grown into a cell (geometry = the cell, nucleusGeometry = the nucleus). */
    objectType: 'detection' | 'cell';
    nucleusGeometry?: { type: 'Polygon'; coordinates: number[][][] };
    /** Absent for unclassified nuclei (QuPath's convention for "no class"). */
    classification?: { name: string; color: Rgb };
    isLocked: boolean;
    measurements: Record<string, number>;
  };
}

/** What the collection says about where it came from (QuPath ignores it on import; tools read it). */
export interface GeoJsonCollectionProperties {
  model?: { name: string; version: string; mpp: number };
  image?: {
    id: string;
    width: number;
    height: number;
    mpp: number;
    mppAssumed: boolean;
    origin: [number, number];
    downsample: number;
    /** Model tiles run, and those the model's blur gate called blurred at the model's resolution. */
    tiles?: number;
    blurredTiles?: number;
  };
  [key: string]: unknown;
}

export interface GeoJsonFeatureCollection {
  type: 'FeatureCollection';
  properties?: GeoJsonCollectionProperties;
  features: GeoJsonFeature[];
}

/** QuPath's built-in classes and their colours (PathClass defaults). */
export const QUPATH_CLASSES: Readonly<Record<string, Rgb>> = {
  Tumor: [200, 0, 0],
  Stroma: [150, 200, 150],
  'Immune cells': [160, 90, 160],
  Necrosis: [50, 50, 50],
  Other: [255, 200, 0],
  'Region*': [0, 0, 180],
  'Ignore*': [180, 180, 180],
  Positive: [200, 50, 50],
  Negative: [112, 112, 225],
};

/** The model's class -> a QuPath class name, optionally with its colour. */
export type QuPathClassMap = Readonly<Record<string, string | { name: string; color?: Rgb }>>;

/**
 * The default model's CoNSeP classes as QuPath classes: QuPath's own where one fits (its colour
 * too), the model's name capitalised otherwise.
 */
export const DEFAULT_QUPATH_CLASS_MAP: QuPathClassMap = {
  other: 'Other',
  inflammatory: 'Immune cells',
  epithelial: 'Epithelial',
  'spindle-shaped': 'Stroma',
};

/**
 * Parses a class mapping "model=QuPath[#rrggbb],..." (e.g. "epithelial=Tumor,other=Other#ffc800")
 * or a JSON object {"epithelial": "Tumor"}; throws RangeError naming the bad entry.
 */
export function parseQuPathClassMap(spec: string): QuPathClassMap {
  const text = spec.trim();
  if (!text) return {};
  if (text.startsWith('{')) {
    const parsed = JSON.parse(text) as Record<string, unknown>;
    const out: Record<string, string> = {};
    for (const [k, v] of Object.entries(parsed)) {
      if (typeof v !== 'string' || !v) throw new RangeError(`class map: "${k}" must map to a QuPath class name`);
      out[k] = v;
    }
    return out;
  }
  const out: Record<string, { name: string; color?: Rgb }> = {};
  for (const entry of text.split(',')) {
    const m = /^\s*([^=]+?)\s*=\s*([^#]+?)\s*(#[0-9a-fA-F]{6})?\s*$/.exec(entry);
    if (!m) throw new RangeError(`class map entry "${entry}": expected model=QuPath or model=QuPath#rrggbb`);
    out[m[1]] = m[3] ? { name: m[2], color: parseHexColor(m[3]) } : { name: m[2] };
  }
  return out;
}

/** A model class as QuPath shows it: the mapped name, QuPath's colour for its classes, else the model's. */
export function quPathClass(cls: ClassStyle, classMap: QuPathClassMap = {}): { name: string; color: Rgb } {
  const target = classMap[cls.name] ?? DEFAULT_QUPATH_CLASS_MAP[cls.name] ?? cls.name.charAt(0).toUpperCase() + cls.name.slice(1);
  const name = typeof target === 'string' ? target : target.name;
  const color = (typeof target === 'string' ? undefined : target.color) ?? QUPATH_CLASSES[name] ?? parseHexColor(cls.color);
  return { name, color: [...color] as Rgb };
}

/** Max and min caliper (Feret) diameters of a polygon, in its units: QuPath's Max/Min diameter. */
export function caliperDiameters(points: readonly { x: number; y: number }[]): { max: number; min: number } {
  const hull = convexHull(points);
  if (hull.length < 2) return { max: 0, min: 0 };
  let max = 0;
  for (let i = 0; i < hull.length; i++) {
    for (let j = i + 1; j < hull.length; j++) max = Math.max(max, Math.hypot(hull[i].x - hull[j].x, hull[i].y - hull[j].y));
  }
  if (hull.length < 3) return { max, min: 0 };
  let min = Infinity;
  for (let i = 0; i < hull.length; i++) {
    const a = hull[i];
    const b = hull[(i + 1) % hull.length];
    const len = Math.hypot(b.x - a.x, b.y - a.y);
    if (len === 0) continue;
    let width = 0;
    for (const p of hull) width = Math.max(width, Math.abs((b.x - a.x) * (p.y - a.y) - (b.y - a.y) * (p.x - a.x)) / len);
    min = Math.min(min, width);
  }
  return { max, min: Number.isFinite(min) ? min : 0 };
}

/**
 * QuPath-named measurements of a nucleus, lengths and areas in µm from `mpp` (the image's
 * micrometres per pixel; when absent, from the nucleus's own area_um2 / area_px).
 */
export function nucleusMeasurementMap(
  n: Nucleus,
  classes: readonly ClassStyle[],
  mpp?: number,
  classMap: QuPathClassMap = {},
): Record<string, number> {
  const m = n.measurements;
  const areaPx = m?.areaPx ?? 0;
  const scale = mpp && mpp > 0 ? mpp : areaPx > 0 && (m?.areaUm2 ?? 0) > 0 ? Math.sqrt(m!.areaUm2 / areaPx) : 0;
  const caliper = caliperDiameters(n.polygon);
  const out: Record<string, number> = {
    'Nucleus ID': n.id,
    Score: n.score,
    'Predicted IoU': n.predictedIou,
  };
  if (scale > 0) {
    Object.assign(out, {
      'Area µm^2': m && m.areaUm2 > 0 ? m.areaUm2 : areaPx * scale * scale,
      'Length µm': (m?.perimeterPx ?? 0) * scale,
      'Max diameter µm': caliper.max * scale,
      'Min diameter µm': caliper.min * scale,
    });
  } else {
    Object.assign(out, { 'Area px^2': areaPx, 'Length px': m?.perimeterPx ?? 0, 'Max diameter px': caliper.max, 'Min diameter px': caliper.min });
  }
  Object.assign(out, {
    Circularity: m?.circularity ?? 0,
    Solidity: m?.solidity ?? 0,
    Eccentricity: m?.eccentricity ?? 0,
    'Red: Mean': m?.meanR ?? 0,
    'Green: Mean': m?.meanG ?? 0,
    'Blue: Mean': m?.meanB ?? 0,
  });
  n.classProbabilities.forEach((p, i) => {
    const cls = classes.find((c) => c.index === i);
    out[`Probability: ${cls ? quPathClass(cls, classMap).name : `class ${i}`}`] = p;
  });
  return out;
}

/** A stable UUID-shaped id from the image and nucleus ids (QuPath keeps feature ids as UUIDs). */
export function featureId(imageId: string, nucleusId: number): string {
  const h = createHash('sha1').update(`${imageId}/${nucleusId}`).digest('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-5${h.slice(13, 16)}-${((parseInt(h[16], 16) & 3) | 8).toString(16)}${h.slice(17, 20)}-${h.slice(20, 32)}`;
}

export interface GeoJsonOptions {
  /** Where the image's top-left corner lies in the slide, level-0 pixels (default 0, 0). */
  origin?: { x: number; y: number };
  /** Level-0 pixels per image pixel (default 1). */
  downsample?: number;
  /** The image's micrometres per pixel, for the µm measurements. */
  mpp?: number;
  /** Model class -> QuPath class (over DEFAULT_QUPATH_CLASS_MAP). */
  classMap?: QuPathClassMap;
  /** The collection's `properties` (model, image...). */
  properties?: GeoJsonCollectionProperties;
}

/** Measurements of a cell object: the nucleus's under "Nucleus: ", the cell's, H&E optical densities. */
function cellMeasurements(nucleus: Record<string, number>, cell: segmentationProto.Cell, scale: number): Record<string, number> {
  const out: Record<string, number> = {};
  const shared = /^(Nucleus ID|Score|Predicted IoU|Probability: )/;
  for (const [k, v] of Object.entries(nucleus)) out[shared.test(k) ? k : `Nucleus: ${k}`] = v;
  const nucleusArea = nucleus['Area µm^2'] ?? nucleus['Area px^2'] ?? 0;
  const cellArea = scale > 0 ? cell.areaPx * scale * scale : cell.areaPx;
  Object.assign(out, {
    [scale > 0 ? 'Cell: Area µm^2' : 'Cell: Area px^2']: cellArea,
    [scale > 0 ? 'Cell: Length µm' : 'Cell: Length px']: scale > 0 ? cell.perimeterPx * scale : cell.perimeterPx,
    'Nucleus: Hematoxylin OD mean': cell.nucleusHematoxylinOd,
    'Nucleus: Eosin OD mean': cell.nucleusEosinOd,
    'Cell: Hematoxylin OD mean': cell.cellHematoxylinOd,
    'Cell: Eosin OD mean': cell.cellEosinOd,
    'Nucleus/Cell area ratio': cellArea > 0 ? nucleusArea / cellArea : 0,
  });
  return out;
}

export function nucleiToGeoJson(
  nuclei: readonly Nucleus[],
  classes: readonly ClassStyle[],
  imageId = '',
  options: GeoJsonOptions = {},
): GeoJsonFeatureCollection {
  const ox = options.origin?.x ?? 0;
  const oy = options.origin?.y ?? 0;
  const ds = options.downsample && options.downsample > 0 ? options.downsample : 1;
  const styles = new Map(classes.map((c) => [c.index, quPathClass(c, options.classMap)]));
  const features: GeoJsonFeature[] = [];
  for (const n of nuclei) {
    if (n.polygon.length < 3) continue;
    const place = (points: readonly { x: number; y: number }[]) => {
      const ring = points.map((p) => [ox + ds * p.x, oy + ds * p.y]);
      ring.push([...ring[0]]);
      return { type: 'Polygon' as const, coordinates: [ring] };
    };
    const measurements = nucleusMeasurementMap(n, classes, options.mpp, options.classMap);
    // The pixel centroid (of the mask, not the simplified outline) in the output's coordinates,
    // for tools that match nuclei by position (QuPath computes its own from the outline).
    if (n.centroid) {
      measurements['Centroid X px'] = ox + ds * n.centroid.x;
      measurements['Centroid Y px'] = oy + ds * n.centroid.y;
    }
    // A nucleus grown into its cell (SegmentRequest.cell_expansion_um) is a QuPath cell object.
    const cell = n.cell;
    const feature: GeoJsonFeature = {
      type: 'Feature',
      id: featureId(imageId, n.id),
      geometry: place(n.polygon),
      properties: { objectType: 'detection', isLocked: false, measurements },
    };
    if (cell && cell.polygon.length >= 3) {
      const m = n.measurements;
      const scale = options.mpp && options.mpp > 0 ? options.mpp : m && m.areaPx > 0 && m.areaUm2 > 0 ? Math.sqrt(m.areaUm2 / m.areaPx) : 0;
      feature.geometry = place(cell.polygon);
      feature.properties = {
        objectType: 'cell',
        nucleusGeometry: place(n.polygon),
        isLocked: false,
        measurements: cellMeasurements(measurements, cell, scale),
      };
    }
    const style = n.classIndex >= 0 ? styles.get(n.classIndex) : undefined;
    if (style) feature.properties.classification = { name: style.name, color: [...style.color] as Rgb };
    features.push(feature);
  }
  return options.properties ? { type: 'FeatureCollection', properties: options.properties, features } : { type: 'FeatureCollection', features };
}

/**
 * A Segment response as QuPath GeoJSON: in the slide's coordinates from the response's origin and
 * downsample, µm from its image_mpp, and the model and image at the collection level.
 */
export function segmentResponseToGeoJson(
  response: segmentationProto.SegmentResponse,
  classes: readonly ClassStyle[],
  classMap: QuPathClassMap = {},
): GeoJsonFeatureCollection {
  const origin = response.origin ?? { x: 0, y: 0 };
  const downsample = response.downsample && response.downsample > 0 ? response.downsample : 1;
  return nucleiToGeoJson(response.nuclei, classes, response.imageId, {
    origin,
    downsample,
    mpp: response.imageMpp,
    classMap,
    properties: {
      model: { name: response.modelName, version: response.modelVersion, mpp: response.modelMpp },
      image: {
        id: response.imageId,
        width: response.width,
        height: response.height,
        mpp: response.imageMpp,
        mppAssumed: response.mppAssumed,
        origin: [origin.x, origin.y],
        downsample,
        tiles: response.tiles,
        blurredTiles: response.blurredTiles,
      },
    },
  });
}
