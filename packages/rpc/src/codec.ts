// Message serialisation with fewer copies than the generated grpc-js definitions make.
//
// ts-proto's grpc-js serializers are `Buffer.from(T.encode(value).finish())`: a fresh writer that
// doubles its buffer as the message grows (each doubling a copy), `finish()` slicing the written
// bytes out (a copy), and `Buffer.from` copying them once more. For the tile pixels and features
// the services pass around (196 KB to 2.4 MB per message) that is about five times the message in
// fresh allocations per call, and fresh memory is what drives the services' garbage collection
// (V8 collects on external-memory pressure). Here one writer is reused across calls (encoding is
// synchronous, so calls never interleave), its `finish()` copy is the only one, and the result is
// wrapped as a Buffer without copying. Applied to every client `makeClient` builds and every
// service `startServer` adds; the bytes on the wire are the same.
import { BinaryWriter } from '@bufbuild/protobuf/wire';
import { makeGenericClientConstructor, type ServiceDefinition } from '@grpc/grpc-js';
import * as segmentation from './gen/cfrsam/v1/segmentation';
import * as stages from './gen/cfrsam/v1/stages';

/** A generated message type, as the serializers see it (messages of any type: see serializersByPath). */
interface MessageType {
  encode(message: unknown, writer?: BinaryWriter): BinaryWriter;
}

interface GenericServiceDefinition {
  fullName: string;
  methods: Record<string, { name: string; requestType: unknown; responseType: unknown }>;
}

// ts-proto's generic definitions (outputServices=generic-definitions) name each method's message
// types, which the grpc-js definitions only hold inside their serializer closures.
const SERVICES: readonly GenericServiceDefinition[] = [
  stages.PrompterDefinition,
  stages.EncoderDefinition,
  stages.DecoderDefinition,
  segmentation.SegmentationDefinition,
];

/** A writer whose buffer grew past this after a message is dropped rather than kept for the next. */
const RETAINED_MESSAGE_BYTES = 16 * 1024 * 1024;
let writer = new BinaryWriter();

/** A serializer for `type` that encodes into the shared writer; the Buffer it returns is the message's own. */
export function lowCopySerializer<T>(type: { encode(message: T, writer?: BinaryWriter): BinaryWriter }): (value: T) => Buffer {
  return (value) => {
    let bytes: Uint8Array;
    try {
      bytes = type.encode(value, writer).finish();
    } catch (err) {
      // An encode that threw left the writer mid-message (open forks): start over with a new one.
      writer = new BinaryWriter();
      throw err;
    }
    // The writer's capacity is at most twice the largest message it has written.
    if (bytes.byteLength > RETAINED_MESSAGE_BYTES) writer = new BinaryWriter();
    return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  };
}

/** Each method's low-copy serializers by path, built once. grpc-js hands each the method's own message type. */
const serializersByPath = new Map<string, { requestSerialize: (value: unknown) => Buffer; responseSerialize: (value: unknown) => Buffer }>();
for (const service of SERVICES) {
  for (const method of Object.values(service.methods)) {
    serializersByPath.set(`/${service.fullName}/${method.name}`, {
      requestSerialize: lowCopySerializer(method.requestType as MessageType),
      responseSerialize: lowCopySerializer(method.responseType as MessageType),
    });
  }
}

const lowCopyDefinitions = new WeakMap<ServiceDefinition, ServiceDefinition>();

/**
 * `definition` with the low-copy serializers for the methods of this package's protos (others, such
 * as health, unchanged). Deserializers stay: decoding already reads bytes fields as views.
 */
export function withLowCopySerializers<D extends ServiceDefinition>(definition: D): D {
  const cached = lowCopyDefinitions.get(definition);
  if (cached) return cached as D;
  const out: Record<string, ServiceDefinition[string]> = {};
  for (const [name, method] of Object.entries(definition)) {
    const serializers = serializersByPath.get(method.path);
    out[name] = serializers ? { ...method, ...serializers } : method;
  }
  lowCopyDefinitions.set(definition, out as ServiceDefinition);
  return out as D;
}

type ClientConstructor<C> = new (...args: never[]) => C;
const lowCopyClients = new WeakMap<object, unknown>();

/** The generated client class rebuilt over `withLowCopySerializers(ctor.service)`; the same class when it has no `service`. */
export function lowCopyClient<K extends ClientConstructor<unknown>>(ctor: K): K {
  const service = (ctor as unknown as { service?: ServiceDefinition }).service;
  if (!service) return ctor;
  let rebuilt = lowCopyClients.get(ctor);
  if (!rebuilt) {
    rebuilt = makeGenericClientConstructor(withLowCopySerializers(service), '');
    lowCopyClients.set(ctor, rebuilt);
  }
  return rebuilt as K;
}
