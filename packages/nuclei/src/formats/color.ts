// Class colours: the manifest writes "#rrggbb"; QuPath and the overlay want [r, g, b].

export type Rgb = [number, number, number];

/** Colour of instances without a class (class_index -1). */
export const UNCLASSIFIED_COLOR: Rgb = [255, 255, 0];

export function parseHexColor(hex: string, fallback: Rgb = UNCLASSIFIED_COLOR): Rgb {
  const m = /^#?([0-9a-f]{6})$/i.exec(hex.trim());
  if (!m) return [...fallback];
  const v = parseInt(m[1], 16);
  return [(v >> 16) & 255, (v >> 8) & 255, v & 255];
}

export function toHexColor([r, g, b]: Rgb): string {
  return (
    '#' +
    [r, g, b]
      .map((c) =>
        Math.max(0, Math.min(255, Math.round(c)))
          .toString(16)
          .padStart(2, '0'),
      )
      .join('')
  );
}

/** A class as the exports need it: index, name and colour. */
export interface ClassStyle {
  index: number;
  name: string;
  color: string;
}

export function colorOfClass(classes: readonly ClassStyle[], classIndex: number): Rgb {
  const c = classes.find((k) => k.index === classIndex);
  return c ? parseHexColor(c.color) : [...UNCLASSIFIED_COLOR];
}
