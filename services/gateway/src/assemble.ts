// Assembly: decoded masks (already in image coordinates) -> the response's nuclei, counts and
// label map. Overlaps are resolved here (higher score keeps contested pixels), then every
// surviving instance is measured and numbered.
import { status } from '@grpc/grpc-js';
import { grpcError, segmentationProto } from '@cfrsam/rpc';
import {
  buildLabelMap,
  cellToProto,
  cocoCountsString,
  encodeCocoRle,
  expandCells,
  encodeRle,
  instanceOrder,
  labelMapToBytes,
  MAX_LABEL,
  measureMask,
  type PlacedMask,
  resolveOverlaps,
  type RgbImage,
  simplifyClosedPolygon,
} from '@cfrsam/nuclei';

export const UNCLASSIFIED = { index: -1, name: 'unclassified' } as const;

/** One decoded prompt, ready for overlap resolution. */
export interface DecodedCandidate {
  mask: PlacedMask;
  /** Anchor point of the prompt, image coordinates. */
  prompt: { x: number; y: number };
  /** Overlap resolution priority and the reported score. */
  score: number;
  predictedIou: number;
  source: segmentationProto.PromptSource;
  classIndex: number;
  classProbabilities: number[];
}

/**
 * The nucleus score: predicted IoU (clamped to [0, 1]) times the confidence of its class. For an
 * automatic detection the class confidence is P(class) over all K+1 outputs (the prompter's
 * foreground times its class probability); for a manual prompt the user asserts there is a
 * nucleus, so it is the class probability alone, and 1 when no detection gave it a class.
 */
export function nucleusScore(predictedIou: number, classConfidence: number): number {
  const iou = Math.min(1, Math.max(0, Number.isFinite(predictedIou) ? predictedIou : 0));
  return iou * classConfidence;
}

export interface AssembleOptions {
  classNames: readonly string[];
  /** Micrometres per pixel for areas (<= 0: area_um2 is 0). */
  mpp: number;
  minScore: number;
  returnLabelMap: boolean;
  returnMasks: boolean;
  /**
   * Grow each nucleus into its cell by up to this many pixels (expandCells over the label map:
   * a background pixel goes to the nearest nucleus) and set Nucleus.cell; 0 or unset: no cells.
   */
  cellExpansionPx?: number;
  /** Box row-major RLE (default) or COCO's whole-image column-major RLE. */
  maskEncoding?: segmentationProto.MaskEncoding;
  minKeptFraction: number;
  minAreaPx: number;
  polygonTolerance: number;
}

export interface Assembled {
  nuclei: segmentationProto.Nucleus[];
  counts: segmentationProto.ClassCount[];
  labelMap?: segmentationProto.LabelMap;
}

export function assembleNuclei(candidates: DecodedCandidate[], image: RgbImage, options: AssembleOptions): Assembled {
  const kept = candidates.filter((c) => c.mask.width > 0 && c.score >= options.minScore);
  const resolved = resolveOverlaps(kept, { minKeptFraction: options.minKeptFraction, minAreaPx: options.minAreaPx });
  const measured = resolved.map((c) => ({ c, shape: measureMask(c.mask, image, options.mpp) }));
  const order = instanceOrder(measured.map((m) => ({ cx: m.shape.centroid.x, cy: m.shape.centroid.y, score: m.c.score })));
  const growCells = (options.cellExpansionPx ?? 0) > 0;
  if ((options.returnLabelMap || growCells) && order.length > MAX_LABEL) {
    throw grpcError(
      status.INVALID_ARGUMENT,
      `${options.returnLabelMap ? 'return_label_map' : 'cell_expansion_um'}: ${order.length} nuclei exceed the ${MAX_LABEL} labels of a ` +
        '16-bit label map; segment smaller regions',
    );
  }
  const nuclei: segmentationProto.Nucleus[] = [];
  const masks: PlacedMask[] = [];
  for (const i of order) {
    const { c, shape } = measured[i];
    const m = shape.measurements;
    const polygon = simplifyClosedPolygon(shape.contour.points, options.polygonTolerance);
    const nucleus: segmentationProto.Nucleus = {
      id: nuclei.length + 1,
      classIndex: c.classIndex,
      className: c.classIndex >= 0 ? (options.classNames[c.classIndex] ?? `class ${c.classIndex}`) : UNCLASSIFIED.name,
      score: c.score,
      classProbabilities: c.classProbabilities,
      centroid: shape.centroid,
      bbox: shape.bbox,
      polygon,
      measurements: {
        areaPx: m.areaPx,
        areaUm2: m.areaUm2,
        perimeterPx: m.perimeterPx,
        circularity: m.circularity,
        eccentricity: m.eccentricity,
        majorAxisPx: m.majorAxisPx,
        minorAxisPx: m.minorAxisPx,
        solidity: m.solidity,
        meanR: m.meanR,
        meanG: m.meanG,
        meanB: m.meanB,
      },
      source: c.source,
      prompt: c.prompt,
      predictedIou: c.predictedIou,
    };
    if (options.returnMasks) nucleus.mask = encodeMask(c.mask, image, options.maskEncoding);
    nuclei.push(nucleus);
    masks.push(c.mask);
  }
  const counts: segmentationProto.ClassCount[] = options.classNames.map((name, index) => ({ classIndex: index, className: name, count: 0 }));
  let unclassified = 0;
  for (const n of nuclei) {
    if (n.classIndex >= 0 && n.classIndex < counts.length) counts[n.classIndex].count++;
    else unclassified++;
  }
  if (unclassified > 0) counts.push({ classIndex: UNCLASSIFIED.index, className: UNCLASSIFIED.name, count: unclassified });
  const out: Assembled = { nuclei, counts };
  if (options.returnLabelMap || growCells) {
    const labels = buildLabelMap(image.width, image.height, masks);
    if (growCells) {
      // Labels are ids: nuclei[id - 1] is the nucleus of label id.
      for (const cell of expandCells(labels, image, options.cellExpansionPx!)) nuclei[cell.id - 1].cell = cellToProto(cell);
    }
    if (options.returnLabelMap) out.labelMap = { width: image.width, height: image.height, data: labelMapToBytes(labels) };
  }
  return out;
}

function encodeMask(
  mask: PlacedMask,
  image: RgbImage,
  encoding = segmentationProto.MaskEncoding.MASK_ENCODING_UNSPECIFIED,
): segmentationProto.RleMask {
  if (encoding === segmentationProto.MaskEncoding.MASK_ENCODING_COCO_RLE) {
    const counts = encodeCocoRle(mask, image.width, image.height);
    return { width: image.width, height: image.height, counts, encoding, cocoCounts: cocoCountsString(counts) };
  }
  // The default layout, as before the encodings existed (encoding and coco_counts unset).
  return encodeRle(mask);
}
