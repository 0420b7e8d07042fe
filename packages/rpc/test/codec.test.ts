// The low-copy serializers: the same bytes as the generated ones, no result overwritten by the
// next call, the writer usable after an encode that threw, and a real Encode round trip over
// loopback with the rebuilt client and service definitions.
import { afterAll, describe, expect, it } from 'vitest';
import {
  lowCopyClient,
  lowCopySerializer,
  makeClient,
  type RunningServer,
  segmentationProto,
  stagesProto,
  startServer,
  unary,
  unaryHandler,
  withLowCopySerializers,
} from '@cfrsam/rpc';

function tile(seed: number, bytes: number): stagesProto.TileInput {
  const rgb = new Uint8Array(bytes);
  for (let i = 0; i < bytes; i++) rgb[i] = (i * 31 + seed) & 0xff;
  return stagesProto.TileInput.fromPartial({ digest: `d${seed}`, rgb });
}

describe('lowCopySerializer', () => {
  it('writes the bytes the generated serializer writes', () => {
    const generated = stagesProto.EncoderService.encode.requestSerialize;
    const lowCopy = lowCopySerializer(stagesProto.EncodeRequest);
    for (const request of [
      stagesProto.EncodeRequest.fromPartial({}),
      stagesProto.EncodeRequest.fromPartial({ tiles: [tile(1, 768)], modelVersion: 'v' }),
      stagesProto.EncodeRequest.fromPartial({ tiles: [tile(2, 196_608), tile(3, 196_608), tile(4, 5)], modelVersion: 'v' }),
    ]) {
      expect(Buffer.compare(lowCopy(request), generated(request))).toBe(0);
    }
  });

  it('returns buffers of their own: a later message does not overwrite an earlier one', () => {
    const serialize = lowCopySerializer(stagesProto.EncodeRequest);
    const first = serialize(stagesProto.EncodeRequest.fromPartial({ tiles: [tile(5, 4096)] }));
    const copy = Buffer.from(first);
    serialize(stagesProto.EncodeRequest.fromPartial({ tiles: [tile(6, 8192)] }));
    expect(Buffer.compare(first, copy)).toBe(0);
    expect(first.buffer.byteLength).toBe(first.byteLength); // exactly the message, not the writer's buffer
    expect(stagesProto.EncodeRequest.decode(first).tiles[0].digest).toBe('d5');
  });

  it('recovers after an encode that threw midway', () => {
    const serialize = lowCopySerializer(stagesProto.EncodeRequest);
    // A tile whose rgb is not bytes makes the writer throw after it opened the tile's fork.
    const broken = { tiles: [{ digest: 'x', rgb: 42 as unknown as Uint8Array }], modelVersion: '' };
    expect(() => serialize(broken as unknown as stagesProto.EncodeRequest)).toThrow();
    const request = stagesProto.EncodeRequest.fromPartial({ tiles: [tile(7, 300)], modelVersion: 'v' });
    expect(Buffer.compare(serialize(request), stagesProto.EncoderService.encode.requestSerialize(request))).toBe(0);
  });
});

describe('withLowCopySerializers / lowCopyClient', () => {
  it('replaces the serializers of this package’s methods only', () => {
    const definition = withLowCopySerializers(stagesProto.DecoderService);
    expect(definition.decode.requestSerialize).not.toBe(stagesProto.DecoderService.decode.requestSerialize);
    expect(definition.decode.requestDeserialize).toBe(stagesProto.DecoderService.decode.requestDeserialize);
    expect(withLowCopySerializers(stagesProto.DecoderService)).toBe(definition);
    const foreign = { check: { ...stagesProto.DecoderService.decode, path: '/grpc.health.v1.Health/Check' } };
    expect(withLowCopySerializers(foreign).check).toBe(foreign.check);
    expect(lowCopyClient(segmentationProto.SegmentationClient)).toBe(lowCopyClient(segmentationProto.SegmentationClient));
  });

  let running: RunningServer | undefined;
  afterAll(async () => running?.shutdown());

  it('carries large requests and responses over loopback', async () => {
    const encode = unaryHandler('cfrsam.v1.Encoder/Encode', async (request: stagesProto.EncodeRequest) => ({
      // Echo each tile's pixels back as a "feature" tensor: large in both directions.
      tiles: request.tiles.map((t) => ({
        digest: t.digest,
        features: { dims: [t.rgb!.length], dtype: 0, data: new Uint8Array(t.rgb!) },
        cacheHit: false,
      })),
    }));
    running = await startServer({
      name: 'codec-test',
      port: 0,
      host: '127.0.0.1',
      services: [{ name: 'cfrsam.v1.Encoder', definition: stagesProto.EncoderService, implementation: { encode } }],
      reflection: false,
      log: () => {},
    });
    const client = makeClient(stagesProto.EncoderClient, `127.0.0.1:${running.port}`);
    try {
      const tiles = [tile(8, 196_608), tile(9, 1_000_000)];
      const responses = await Promise.all(
        [0, 1, 2].map(() => unary(client, client.encode, stagesProto.EncodeRequest.fromPartial({ tiles, modelVersion: 'v' }))),
      );
      for (const response of responses) {
        expect(response.tiles.map((t) => t.digest)).toEqual(['d8', 'd9']);
        response.tiles.forEach((t, i) => expect(Buffer.compare(Buffer.from(t.features!.data), Buffer.from(tiles[i].rgb!))).toBe(0));
      }
    } finally {
      client.close();
    }
  });
});
