// A tile's focus, the statistic the bundle's blur gate reads: on a tile it calls blurred, the point
// refiner's score bar is the gate's lower one (a blurred scan's nuclei score low, and the served bar
// would drop them). The Python reference is model/cfrsam/prompt_learner/sharpness.py, rule for rule;
// model/tests/fixtures/sharpness_cases.json ties the two.
import { type Float32Tensor, type Manifest } from '@cfrsam/contract';

const GREY_WEIGHTS = [0.299, 0.587, 0.114] as const;
/** Every channel at or above this is white padding (the gateway pads small images with white). */
const PADDING_LEVEL = 254.5;
/** With fewer counted pixels than this fraction, the tile is not judged (+Infinity: sharp). */
const MIN_COUNTED_FRACTION = 0.25;

let scratch = { grey: new Float64Array(0), padding: new Uint8Array(0) };

/**
 * std(Laplacian) / std(|Sobel gradient| / 8) of the grey tile (RGB recovered from the normalised
 * pixels [3, H, W]), over the pixels with no white padding in their 3 x 3 neighbourhood; the edge
 * pixel is repeated outside the tile. Lower is blurrier; +Infinity when padding leaves less than a
 * quarter of the tile.
 */
export function tileSharpness(pixels: Float32Tensor, normalization: Manifest['normalization']): number {
  const [channels, height, width] = pixels.dims;
  if (channels !== 3 || pixels.dims.length !== 3) throw new RangeError(`expected a [3, H, W] tile, got [${pixels.dims}]`);
  const n = height * width;
  // Scratch buffers reused across calls: allocating (and zeroing) 0.5 MB per tile cost more than the
  // arithmetic. The function is synchronous, so one call at a time uses them.
  if (scratch.grey.length < n) scratch = { grey: new Float64Array(n), padding: new Uint8Array(n) };
  const grey = scratch.grey;
  const [r, g, b] = [0, 1, 2].map((c) => pixels.data.subarray(c * n, (c + 1) * n));
  const [meanR, meanG, meanB] = normalization.mean;
  const [stdR, stdG, stdB] = normalization.std;
  let padding: Uint8Array | null = null;
  for (let i = 0; i < n; i++) {
    const red = r[i] * stdR + meanR;
    const green = g[i] * stdG + meanG;
    const blue = b[i] * stdB + meanB;
    grey[i] = GREY_WEIGHTS[0] * red + GREY_WEIGHTS[1] * green + GREY_WEIGHTS[2] * blue;
    if (red >= PADDING_LEVEL && green >= PADDING_LEVEL && blue >= PADDING_LEVEL) {
      if (padding === null) (padding = scratch.padding).fill(0, 0, n);
      padding[i] = 1;
    }
  }
  let count = 0;
  let lapSum = 0;
  let lapSq = 0;
  let gradSum = 0;
  let gradSq = 0;
  for (let y = 0; y < height; y++) {
    const up = Math.max(0, y - 1) * width;
    const mid = y * width;
    const down = Math.min(height - 1, y + 1) * width;
    for (let x = 0; x < width; x++) {
      const left = x > 0 ? x - 1 : 0;
      const right = x < width - 1 ? x + 1 : x;
      // Most tiles have no padding at all: the check is skipped for them.
      if (
        padding !== null &&
        padding[up + left] |
          padding[up + x] |
          padding[up + right] |
          padding[mid + left] |
          padding[mid + x] |
          padding[mid + right] |
          padding[down + left] |
          padding[down + x] |
          padding[down + right]
      ) {
        continue;
      }
      const laplacian = grey[up + x] + grey[down + x] + grey[mid + left] + grey[mid + right] - 4 * grey[mid + x];
      const dx = grey[up + right] + 2 * grey[mid + right] + grey[down + right] - (grey[up + left] + 2 * grey[mid + left] + grey[down + left]);
      const dy = grey[down + left] + 2 * grey[down + x] + grey[down + right] - (grey[up + left] + 2 * grey[up + x] + grey[up + right]);
      const gradient = Math.sqrt(dx * dx + dy * dy) / 8;
      count++;
      lapSum += laplacian;
      lapSq += laplacian * laplacian;
      gradSum += gradient;
      gradSq += gradient * gradient;
    }
  }
  if (count < MIN_COUNTED_FRACTION * n) return Infinity;
  const std = (sum: number, sq: number) => Math.sqrt(Math.max(0, sq / count - (sum / count) ** 2));
  return std(lapSum, lapSq) / Math.max(std(gradSum, gradSq), 1e-6);
}
