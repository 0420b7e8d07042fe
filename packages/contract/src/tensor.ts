// Tensors between the wire (the proto Tensor: dims, dtype, little-endian bytes) and the worker
// pool (HostTensor: dims and a typed array), with shape checks whose messages name the field and
// the expected shape. float16 on the wire is accepted and widened; compute is float32.
import * as os from 'node:os';
import { status } from '@grpc/grpc-js';
import { stagesProto } from '@cfrsam/rpc';

const { DType } = stagesProto;
type Tensor = stagesProto.Tensor;
type DType = stagesProto.DType;

if (os.endianness() !== 'LE') {
  // The proto Tensor is little-endian and typed arrays use host order; no big-endian target exists.
  throw new Error('@cfrsam/contract tensors need a little-endian host');
}

/** Element types the ONNX graphs of the contract consume or produce. */
export type HostTensorType = 'float32' | 'float16' | 'int64' | 'int32' | 'uint8' | 'bool';

export type HostTensorData = Float32Array | Uint16Array | BigInt64Array | Int32Array | Uint8Array;

/** A tensor in host memory: what the worker pool takes and returns. Row-major. */
export interface HostTensor {
  type: HostTensorType;
  dims: number[];
  data: HostTensorData;
}

/** A float32 host tensor (the only kind the graphs take as image/feature inputs). */
export interface Float32Tensor extends HostTensor {
  type: 'float32';
  data: Float32Array;
}

/** Bad tensor on the wire; handlers answer INVALID_ARGUMENT with this message. */
export class TensorShapeError extends Error {
  readonly grpcStatus = status.INVALID_ARGUMENT;
  constructor(message: string) {
    super(message);
    this.name = 'TensorShapeError';
  }
}

/** Expected dims: a number must match; null matches any size (a dynamic axis). */
export type DimsSpec = readonly (number | null)[];

/** Number of elements of a shape. */
export function elementCount(dims: readonly number[]): number {
  let n = 1;
  for (const d of dims) n *= d;
  return n;
}

/** "[3,256,256]" (null dims print as "?"). */
export function formatDims(dims: readonly (number | null)[]): string {
  return `[${dims.map((d) => (d === null ? '?' : String(d))).join(',')}]`;
}

/** Throws TensorShapeError unless `dims` matches `expected`. `what` names the field in the message. */
export function checkDims(what: string, dims: readonly number[], expected: DimsSpec): void {
  const ok = dims.length === expected.length && expected.every((e, i) => e === null || e === dims[i]);
  if (!ok) {
    throw new TensorShapeError(`${what}: expected dims ${formatDims(expected)}, got ${formatDims(dims)}`);
  }
}

/** A float32 HostTensor; `data` defaults to zeros. */
export function float32Tensor(dims: readonly number[], data?: Float32Array): Float32Tensor {
  const n = elementCount(dims);
  const values = data ?? new Float32Array(n);
  if (values.length !== n) throw new TensorShapeError(`float32 tensor ${formatDims(dims)} needs ${n} values, got ${values.length}`);
  return { type: 'float32', dims: [...dims], data: values };
}

// ---------------------------------------------------------------- float16

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** IEEE half bits -> float. */
export function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

/** float -> IEEE half bits, round to nearest even. */
export function floatToHalf(value: number): number {
  f32[0] = value;
  const x = u32[0];
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  const e = exp - 127 + 15;
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let half = mant >> shift;
    const rem = mant & ((1 << shift) - 1);
    const mid = 1 << (shift - 1);
    if (rem > mid || (rem === mid && half & 1)) half++;
    return sign | half;
  }
  let half = (e << 10) | (mant >> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && half & 1)) half++;
  return sign | half; // a carry into the exponent is the correct rounding (up to Infinity)
}

export function float16ToFloat32(bits: Uint16Array): Float32Array {
  const out = new Float32Array(bits.length);
  for (let i = 0; i < bits.length; i++) out[i] = halfToFloat(bits[i]);
  return out;
}

export function float32ToFloat16(values: Float32Array): Uint16Array {
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) out[i] = floatToHalf(values[i]);
  return out;
}

// ---------------------------------------------------------------- wire <-> host

/**
 * A typed view of `bytes` when it is suitably aligned (no copy), else an aligned copy. The view
 * shares memory with the received message: treat it as read-only.
 */
function viewOrCopy<T>(bytes: Uint8Array, elementSize: number, make: (buf: ArrayBuffer, offset: number, length: number) => T): T {
  const length = bytes.byteLength / elementSize;
  if (bytes.byteOffset % elementSize === 0) return make(bytes.buffer as ArrayBuffer, bytes.byteOffset, length);
  const copy = new Uint8Array(bytes.byteLength);
  copy.set(bytes);
  return make(copy.buffer, 0, length);
}

/**
 * Decodes a proto Tensor into a float32 HostTensor, checking dims (when `expected` is given),
 * dtype (FLOAT32, or FLOAT16 which is widened) and byte length. `what` names the field in errors,
 * e.g. "tiles[2].pixels". Throws TensorShapeError (INVALID_ARGUMENT).
 */
export function tensorFromProto(what: string, tensor: Tensor | undefined, expected?: DimsSpec): Float32Tensor {
  if (!tensor) throw new TensorShapeError(`${what}: missing tensor${expected ? ` (expected dims ${formatDims(expected)})` : ''}`);
  const dims = tensor.dims.map(Number);
  if (dims.some((d) => !Number.isSafeInteger(d) || d < 0)) {
    throw new TensorShapeError(`${what}: dims must be non-negative integers, got ${formatDims(dims)}`);
  }
  if (expected) checkDims(what, dims, expected);
  const count = elementCount(dims);
  const dtype = tensor.dtype === DType.DTYPE_UNSPECIFIED ? DType.DTYPE_FLOAT32 : tensor.dtype;
  const bytes = tensor.data ?? new Uint8Array(0);
  if (dtype === DType.DTYPE_FLOAT32) {
    if (bytes.byteLength !== count * 4) {
      throw new TensorShapeError(`${what}: float32 ${formatDims(dims)} needs ${count * 4} bytes, got ${bytes.byteLength}`);
    }
    const data = viewOrCopy(bytes, 4, (b, o, n) => new Float32Array(b, o, n));
    return { type: 'float32', dims, data };
  }
  if (dtype === DType.DTYPE_FLOAT16) {
    if (bytes.byteLength !== count * 2) {
      throw new TensorShapeError(`${what}: float16 ${formatDims(dims)} needs ${count * 2} bytes, got ${bytes.byteLength}`);
    }
    const half = viewOrCopy(bytes, 2, (b, o, n) => new Uint16Array(b, o, n));
    return { type: 'float32', dims, data: float16ToFloat32(half) };
  }
  throw new TensorShapeError(`${what}: unsupported dtype ${tensor.dtype} (FLOAT32 or FLOAT16)`);
}

/**
 * Encodes float32 values as a proto Tensor. FLOAT32 wraps the array's memory (no copy); FLOAT16
 * halves the bytes at the cost of precision (about 3 significant digits).
 */
export function tensorToProto(dims: readonly number[], data: Float32Array, dtype: DType = DType.DTYPE_FLOAT32): Tensor {
  if (data.length !== elementCount(dims)) {
    throw new TensorShapeError(`tensor ${formatDims(dims)} needs ${elementCount(dims)} values, got ${data.length}`);
  }
  if (dtype === DType.DTYPE_FLOAT16) {
    const half = float32ToFloat16(data);
    return { dims: [...dims], dtype, data: Buffer.from(half.buffer, half.byteOffset, half.byteLength) };
  }
  return { dims: [...dims], dtype: DType.DTYPE_FLOAT32, data: Buffer.from(data.buffer, data.byteOffset, data.byteLength) };
}

/** Stacks equally shaped float32 tensors along a new leading batch axis: n x [..] -> [n, ..]. */
export function stackFloat32(tensors: readonly Float32Tensor[]): Float32Tensor {
  if (tensors.length === 0) throw new Error('stackFloat32: nothing to stack');
  const itemDims = tensors[0].dims;
  const itemSize = elementCount(itemDims);
  const out = new Float32Array(itemSize * tensors.length);
  tensors.forEach((t, i) => {
    checkDims(`stack item ${i}`, t.dims, itemDims);
    out.set(t.data, i * itemSize);
  });
  return { type: 'float32', dims: [tensors.length, ...itemDims], data: out };
}

/** Item `index` of a batched float32 tensor [B, ..] as a view (no copy) with dims [..]. */
export function unstackFloat32(batch: Float32Tensor, index: number): Float32Tensor {
  const itemDims = batch.dims.slice(1);
  const itemSize = elementCount(itemDims);
  return { type: 'float32', dims: itemDims, data: batch.data.subarray(index * itemSize, (index + 1) * itemSize) };
}

/**
 * Output `name` of a graph run, checked against the contract's dims. A mismatch is the bundle's
 * fault, not the caller's, so this throws a plain Error (answered as INTERNAL).
 */
export function graphOutput(graph: string, outputs: Record<string, HostTensor>, name: string, expected: DimsSpec): HostTensor {
  const t = outputs[name];
  if (!t) throw new Error(`${graph}.onnx returned no output "${name}" (have: ${Object.keys(outputs).join(', ')})`);
  const ok = t.dims.length === expected.length && expected.every((e, i) => e === null || e === t.dims[i]);
  if (!ok) {
    throw new Error(`${graph}.onnx output "${name}" has dims ${formatDims(t.dims)}, the contract says ${formatDims(expected)}`);
  }
  return t;
}

/** graphOutput for float32 outputs, returning the data. */
export function graphOutputFloat32(graph: string, outputs: Record<string, HostTensor>, name: string, expected: DimsSpec): Float32Array {
  const t = graphOutput(graph, outputs, name, expected);
  if (!(t.data instanceof Float32Array)) throw new Error(`${graph}.onnx output "${name}" is ${t.type}, expected float32`);
  return t.data;
}
