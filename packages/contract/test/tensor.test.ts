import { describe, expect, it } from 'vitest';
import { stagesProto } from '@cfrsam/rpc';
import {
  checkDims,
  float16ToFloat32,
  float32ToFloat16,
  floatToHalf,
  halfToFloat,
  stackFloat32,
  tensorFromProto,
  TensorShapeError,
  tensorToProto,
  unstackFloat32,
} from '@cfrsam/contract';

describe('float16', () => {
  it('encodes known values exactly', () => {
    expect(floatToHalf(1)).toBe(0x3c00);
    expect(floatToHalf(-2)).toBe(0xc000);
    expect(floatToHalf(65504)).toBe(0x7bff);
    expect(floatToHalf(1e6)).toBe(0x7c00); // overflow -> Infinity
    expect(floatToHalf(2 ** -24)).toBe(0x0001); // smallest subnormal
    expect(Number.isNaN(halfToFloat(floatToHalf(NaN)))).toBe(true);
    // 1 + 2^-11 is halfway between 1 and the next half; ties round to even (1).
    expect(floatToHalf(1 + 2 ** -11)).toBe(0x3c00);
  });

  it('round-trips within half precision', () => {
    const values = new Float32Array([0, 0.1, -3.14159, 123.456, 1e-5, -60000]);
    const back = float16ToFloat32(float32ToFloat16(values));
    values.forEach((v, i) => expect(Math.abs(back[i] - v)).toBeLessThanOrEqual(Math.abs(v) * 1e-3 + 1e-7));
  });
});

describe('proto tensors', () => {
  it('round-trips float32 and float16 through the wire format', () => {
    const data = new Float32Array([1, 2, 3, 4, 5, 6]);
    const wire = stagesProto.Tensor.decode(stagesProto.Tensor.encode(tensorToProto([2, 3], data)).finish());
    const back = tensorFromProto('t', wire, [2, 3]);
    expect(back.dims).toEqual([2, 3]);
    expect([...back.data]).toEqual([1, 2, 3, 4, 5, 6]);

    const half = tensorFromProto('h', tensorToProto([2, 3], data, stagesProto.DType.DTYPE_FLOAT16), [null, 3]);
    expect([...half.data]).toEqual([1, 2, 3, 4, 5, 6]);
  });

  it('copies misaligned bytes instead of failing', () => {
    const bytes = Buffer.alloc(4 * 3 + 1);
    const values = new Float32Array([1.5, -2, 7]);
    Buffer.from(values.buffer).copy(bytes, 1);
    const t = tensorFromProto('t', { dims: [3], dtype: stagesProto.DType.DTYPE_FLOAT32, data: bytes.subarray(1) }, [3]);
    expect([...t.data]).toEqual([1.5, -2, 7]);
  });

  it('names the field and the expected shape on a mismatch', () => {
    const t = tensorToProto([3, 128, 128], new Float32Array(3 * 128 * 128));
    expect(() => tensorFromProto('tiles[1].pixels', t, [3, 256, 256])).toThrow('tiles[1].pixels: expected dims [3,256,256], got [3,128,128]');
    expect(() => tensorFromProto('pixels', undefined, [3, 256, 256])).toThrow(/pixels: missing tensor/);
    const short = { dims: [4], dtype: stagesProto.DType.DTYPE_FLOAT32, data: Buffer.alloc(8) };
    expect(() => tensorFromProto('x', short)).toThrow('x: float32 [4] needs 16 bytes, got 8');
    expect(() => tensorFromProto('x', { dims: [-1], dtype: 1, data: Buffer.alloc(0) })).toThrow(TensorShapeError);
    expect(() => tensorFromProto('x', { dims: [1], dtype: 7 as stagesProto.DType, data: Buffer.alloc(4) })).toThrow(/unsupported dtype/);
    expect(() => checkDims('f', [1, 2], [1, null, 3])).toThrow('f: expected dims [1,?,3], got [1,2]');
  });

  it('stacks and unstacks batches', () => {
    const a = { type: 'float32' as const, dims: [2], data: new Float32Array([1, 2]) };
    const b = { type: 'float32' as const, dims: [2], data: new Float32Array([3, 4]) };
    const batch = stackFloat32([a, b]);
    expect(batch.dims).toEqual([2, 2]);
    expect([...unstackFloat32(batch, 1).data]).toEqual([3, 4]);
  });
});
