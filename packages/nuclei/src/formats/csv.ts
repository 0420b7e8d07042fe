// CSV of per-nucleus results: one row per nucleus, RFC 4180 quoting.
import { segmentationProto } from '@cfrsam/rpc';

type Nucleus = segmentationProto.Nucleus;
const { promptSourceToJSON } = segmentationProto;
import type { ClassStyle } from './color';

export function csvField(v: string | number): string {
  if (typeof v === 'number') return Number.isFinite(v) ? String(Math.round(v * 1e4) / 1e4) : '';
  return /[",\r\n]/.test(v) ? `"${v.replace(/"/g, '""')}"` : v;
}

export const NUCLEUS_CSV_COLUMNS = [
  'id',
  'class_index',
  'class',
  'score',
  'predicted_iou',
  'source',
  'centroid_x',
  'centroid_y',
  'bbox_x0',
  'bbox_y0',
  'bbox_x1',
  'bbox_y1',
  'area_px',
  'area_um2',
  'perimeter_px',
  'circularity',
  'eccentricity',
  'major_axis_px',
  'minor_axis_px',
  'solidity',
  'mean_r',
  'mean_g',
  'mean_b',
] as const;

/** The CSV text (header + one line per nucleus, "\n" line ends), with a probability column per class. */
export function nucleiToCsv(nuclei: readonly Nucleus[], classes: readonly ClassStyle[]): string {
  const probColumns = [...classes].sort((a, b) => a.index - b.index).map((c) => `p_${c.name}`);
  const lines = [[...NUCLEUS_CSV_COLUMNS, ...probColumns].map(csvField).join(',')];
  for (const n of nuclei) {
    const m = n.measurements;
    const source = promptSourceToJSON(n.source)
      .replace(/^PROMPT_SOURCE_/, '')
      .toLowerCase();
    const row: (string | number)[] = [
      n.id,
      n.classIndex,
      n.className,
      n.score,
      n.predictedIou,
      source,
      n.centroid?.x ?? 0,
      n.centroid?.y ?? 0,
      n.bbox?.x0 ?? 0,
      n.bbox?.y0 ?? 0,
      n.bbox?.x1 ?? 0,
      n.bbox?.y1 ?? 0,
      m?.areaPx ?? 0,
      m?.areaUm2 ?? 0,
      m?.perimeterPx ?? 0,
      m?.circularity ?? 0,
      m?.eccentricity ?? 0,
      m?.majorAxisPx ?? 0,
      m?.minorAxisPx ?? 0,
      m?.solidity ?? 0,
      m?.meanR ?? 0,
      m?.meanG ?? 0,
      m?.meanB ?? 0,
    ];
    for (let i = 0; i < probColumns.length; i++) row.push(n.classProbabilities[i] ?? 0);
    lines.push(row.map(csvField).join(','));
  }
  return lines.join('\n') + '\n';
}

/** Minimal RFC 4180 parser (quoted fields, doubled quotes); used by tests and tools. */
export function parseCsv(text: string): string[][] {
  const rows: string[][] = [];
  let row: string[] = [];
  let field = '';
  let quoted = false;
  for (let i = 0; i < text.length; i++) {
    const ch = text[i];
    if (quoted) {
      if (ch === '"' && text[i + 1] === '"') {
        field += '"';
        i++;
      } else if (ch === '"') quoted = false;
      else field += ch;
    } else if (ch === '"') quoted = true;
    else if (ch === ',') {
      row.push(field);
      field = '';
    } else if (ch === '\n' || ch === '\r') {
      if (ch === '\r' && text[i + 1] === '\n') i++;
      row.push(field);
      rows.push(row);
      row = [];
      field = '';
    } else field += ch;
  }
  if (field !== '' || row.length > 0) {
    row.push(field);
    rows.push(row);
  }
  return rows;
}
