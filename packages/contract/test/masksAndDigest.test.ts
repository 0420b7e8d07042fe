import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { digestTile, isDigest, packBits, thresholdAndCrop, unpackBits } from '@cfrsam/contract';

describe('bit packing', () => {
  it('packs row-major, most significant bit first, without row padding', () => {
    // 3x3 mask: rows 100 / 000 / 011 -> bits 1000 0001 1 -> 0x81, 0x80
    const mask = new Uint8Array([1, 0, 0, 0, 0, 0, 0, 1, 1]);
    expect([...packBits(mask, 3, 3)]).toEqual([0x81, 0x80]);
    expect([...unpackBits(new Uint8Array([0x81, 0x80]), 3, 3)]).toEqual([...mask]);
  });

  it('round-trips arbitrary masks', () => {
    const mask = Uint8Array.from({ length: 7 * 13 }, (_, i) => ((i * 2654435761) % 7 < 3 ? 1 : 0));
    expect([...unpackBits(packBits(mask, 7, 13), 7, 13)]).toEqual([...mask]);
  });
});

describe('thresholdAndCrop', () => {
  it('crops to the foreground box and places it at the window origin', () => {
    const W = 8;
    const values = new Float32Array(W * W).fill(-1);
    values[2 * W + 3] = 1;
    values[4 * W + 5] = 0.5;
    const box = thresholdAndCrop(values, W, W, 100, 50, 256, 256, 0);
    expect(box).toMatchObject({ x0: 103, y0: 52, width: 3, height: 3 });
    expect([...box.mask]).toEqual([1, 0, 0, 0, 0, 0, 0, 0, 1]);
  });

  it('clips to the frame and reports an empty mask as 0x0', () => {
    const values = new Float32Array(16).fill(1);
    const box = thresholdAndCrop(values, 4, 4, 254, -2, 256, 256, 0);
    expect(box).toMatchObject({ x0: 254, y0: 0, width: 2, height: 2 });
    expect(thresholdAndCrop(new Float32Array(16), 4, 4, 0, 0, 256, 256, 0)).toMatchObject({ width: 0, height: 0 });
  });
});

describe('digestTile', () => {
  it('is SHA-256 over the RGB bytes followed by the model version', () => {
    const rgb = new Uint8Array([1, 2, 3, 4, 5, 6]);
    const expected = createHash('sha256')
      .update(Buffer.concat([Buffer.from(rgb), Buffer.from('0.1.0+abc')]))
      .digest('hex');
    expect(digestTile(rgb, '0.1.0+abc')).toBe(expected);
    expect(digestTile(rgb, '0.1.0+abd')).not.toBe(expected);
    expect(isDigest(expected)).toBe(true);
    expect(isDigest('xyz')).toBe(false);
  });
});
