import { describe, expect, it } from 'vitest';
import { segmentationProto } from '@cfrsam/rpc';
import { cropRegion, slideLayout, stitchSlideResult, type SlideJobRecord } from '../src/slideJobs';

const job: SlideJobRecord = {
  jobId: 'a'.repeat(32),
  width: 1000,
  height: 600,
  regionSize: 512,
  overlap: 64,
  regions: 0,
  minScore: 0,
  mpp: 0,
  returnMasks: false,
  createdAt: '',
};

function nucleus(x: number, y: number): segmentationProto.Nucleus {
  return {
    id: 99,
    classIndex: 1,
    className: 'inflammatory',
    score: 0.9,
    classProbabilities: [],
    centroid: { x, y },
    bbox: { x0: Math.floor(x) - 5, y0: Math.floor(y) - 5, x1: Math.floor(x) + 5, y1: Math.floor(y) + 5 },
    polygon: [{ x: x - 5, y: y - 5 }],
    measurements: undefined,
    source: segmentationProto.PromptSource.PROMPT_SOURCE_AUTO,
    prompt: { x, y },
    predictedIou: 0.9,
  };
}

function regionResult(nuclei: segmentationProto.Nucleus[]): segmentationProto.SegmentResponse {
  return { imageId: '', width: 0, height: 0, nuclei, counts: [], modelName: 'm', modelVersion: 'v', timings: [], tiles: 4 };
}

describe('slide job stitching', () => {
  it('keeps each nucleus once, in image coordinates, owned by the region whose core holds its centroid', () => {
    const layout = slideLayout(job);
    expect([layout.cols, layout.rows]).toEqual([3, 2]); // regions of 512 overlapping by >= 64
    const [a, b] = layout.tiles;
    // A nucleus in the overlap of regions 0 and 1, seen by both (in each region's coordinates).
    const seam = { x: b.core.x0 + 3, y: 100 };
    const results = layout.tiles.map(() => regionResult([]));
    results[0] = regionResult([nucleus(seam.x - a.valid.x0, seam.y - a.valid.y0), nucleus(50, 50)]);
    results[1] = regionResult([nucleus(seam.x - b.valid.x0, seam.y - b.valid.y0)]);
    const stitched = stitchSlideResult({ ...job, regions: layout.tiles.length }, results);
    expect(stitched.nuclei.map((n) => [n.id, n.centroid])).toEqual([
      [1, { x: 50, y: 50 }],
      [2, seam],
    ]);
    expect(stitched.nuclei[1].bbox).toEqual({ x0: seam.x - 5, y0: 95, x1: seam.x + 5, y1: 105 });
    expect(stitched.counts).toEqual([{ classIndex: 1, className: 'inflammatory', count: 2 }]);
    expect(stitched.tiles).toBe(4 * layout.tiles.length);
  });

  it('crops a region’s valid pixels', () => {
    const data = new Uint8Array(4 * 3 * 3).map((_, i) => i);
    const crop = cropRegion(
      { width: 4, height: 3, data },
      { index: 0, col: 0, row: 0, x: 1, y: 1, valid: { x0: 1, y0: 1, x1: 3, y1: 3 }, core: { x0: 1, y0: 1, x1: 3, y1: 3 } },
    );
    expect(crop.width).toBe(2);
    expect(Array.from(crop.data)).toEqual([15, 16, 17, 18, 19, 20, 27, 28, 29, 30, 31, 32]);
  });
});
