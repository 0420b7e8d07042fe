// The encoders as a feature source of the decoder: Encode with the digest alone and
// return_features set reads the features from an encoder's cache (or its shared tier). The
// replica that encoded the tile (the Prepare's hint) is asked first when it is one of this
// decoder's encoders; the others follow in the digest's rendezvous order, which is the order the
// gateway used, so the first answer is nearly always a hit. A hint naming any other address is
// ignored: the decoder only calls the encoders it was configured with. The first replica asked is
// the one the gateway sends the tile to, and the gateway starts the Prepare together with the
// Encode, and asks the decoder to wait for it (PrepareRequest.features_wait_ms): the request to that
// replica waits up to that long for the tile to arrive there (EncodeRequest.wait_ms).
import { isServiceError, makeClient, ReplicaSet, stagesProto, status, unary, type MakeClientOptions } from '@cfrsam/rpc';
import type { FeatureSource } from './pipeline';

export interface EncoderFeatureSourceOptions {
  /** Encoder addresses and dns:/// names (--encoder). */
  targets: string[];
  modelVersion: string;
  /** Features per tile (product of the manifest's feature_shape). */
  featureCount: number;
  timeoutMs?: number;
  client?: MakeClientOptions;
}

export class EncoderFeatureSource implements FeatureSource {
  readonly name = 'encoders';
  private readonly encoders: ReplicaSet<stagesProto.EncoderClient>;

  constructor(private readonly options: EncoderFeatureSourceOptions) {
    this.encoders = new ReplicaSet({
      stage: 'encoder',
      targets: options.targets,
      makeClient: (a) => makeClient(stagesProto.EncoderClient, a, options.client),
    });
  }

  start(): Promise<void> {
    return this.encoders.start();
  }

  async fetch(digest: string, hint: string, waitMs: number): Promise<{ values: Float32Array | null; error?: string }> {
    const rendezvous = this.encoders.orderFor(digest);
    const order = hint && rendezvous.includes(hint) ? [hint, ...rendezvous.filter((r) => r !== hint)] : rendezvous;
    const errors: string[] = [];
    // Every replica is asked in turn: a NOT_FOUND on one (not cached there) is not the answer.
    for (const [i, replica] of order.entries()) {
      try {
        const client = this.encoders.client(replica);
        // Only the replica the Encode went to is worth waiting at; the others answer at once.
        const res = await unary(
          client,
          client.encode,
          { tiles: [{ digest, rgb: Buffer.alloc(0) }], modelVersion: this.options.modelVersion, returnFeatures: true, waitMs: i === 0 ? waitMs : 0 },
          { timeoutMs: this.options.timeoutMs ?? 30_000 },
        );
        const t = res.tiles[0]?.features;
        if (!t || t.dtype !== stagesProto.DType.DTYPE_FLOAT32 || t.data.byteLength !== this.options.featureCount * 4) {
          errors.push(`${replica}: malformed features`);
          continue;
        }
        // Copy into an aligned array (the proto bytes may sit at any offset of a larger buffer).
        const values = new Float32Array(this.options.featureCount);
        new Uint8Array(values.buffer).set(t.data);
        return { values };
      } catch (err) {
        if (isServiceError(err) && err.code === status.NOT_FOUND) continue;
        errors.push(`${replica}: ${isServiceError(err) ? err.details : (err as Error).message}`);
      }
    }
    return { values: null, error: errors.length > 0 ? errors.join('; ') : 'not cached on any encoder' };
  }

  close(): void {
    this.encoders.close();
  }
}
