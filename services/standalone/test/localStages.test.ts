// LocalStages' repair rules, driven by in-memory pipelines so that each eviction happens exactly
// when the test says (the integration test in test/standalone.test.ts cannot force the order):
// a tile evicted from the decoder between Prepare and Decode is prepared again; features evicted
// from the encoder are encoded again and handed to Prepare; a tile that keeps being evicted fails
// with the decoder's own status instead of looping.
import { describe, expect, it } from 'vitest';
import type { Manifest } from '@cfrsam/contract';
import type { DecoderPipeline } from '@cfrsam/decoder/dist/pipeline';
import type { EncoderPipeline } from '@cfrsam/encoder/dist/pipeline';
import type { PrompterPipeline } from '@cfrsam/prompter/dist/pipeline';
import { StageClock } from '@cfrsam/gateway/dist/timing';
import { ErrorReason, errorReason, grpcError, status, type stagesProto } from '@cfrsam/rpc';
import { LocalStages } from '../src/localStages';

const manifest = { version: 'test+1' } as Manifest;
const tile = { digest: 'a'.repeat(64), rgb: new Uint8Array(12) };
const prompts: stagesProto.PromptPoints[] = Array.from({ length: 5 }, (_, i) => ({ positive: [{ x: i, y: i }], negative: [] }));
const features: stagesProto.Tensor = { type: 'float32', dims: [1], data: Buffer.alloc(4) } as unknown as stagesProto.Tensor;

/** A decoder whose prepared tiles and feature lookups the test controls. */
function fakeStages(opts: { evictions: number; featuresMissing: boolean }) {
  const prepared = new Set<string>();
  const log = { prepares: [] as (stagesProto.Tensor | undefined)[], prepareWaits: [] as number[], decodes: 0, encodes: [] as boolean[] };
  let evictions = opts.evictions;
  let featuresMissing = opts.featuresMissing;
  const decoder = {
    cache: { has: (digest: string) => prepared.has(digest) },
    prepare: async (req: { digest: string; features?: stagesProto.Tensor; featuresWaitMs?: number }) => {
      log.prepares.push(req.features);
      log.prepareWaits.push(req.featuresWaitMs ?? 0);
      if (!req.features && featuresMissing) {
        featuresMissing = false;
        throw grpcError(status.FAILED_PRECONDITION, 'features evicted', { reason: ErrorReason.FEATURES_MISSING });
      }
      prepared.add(req.digest);
      return {};
    },
    decode: async (req: { digest: string; prompts: stagesProto.PromptPoints[] }) => {
      log.decodes++;
      if (evictions > 0) {
        evictions--;
        prepared.delete(req.digest); // another request's tile took its place
      }
      if (!prepared.has(req.digest)) {
        throw grpcError(status.FAILED_PRECONDITION, 'not prepared on this replica', { reason: ErrorReason.NOT_PREPARED });
      }
      return {
        masks: req.prompts.map((p) => ({
          x0: p.positive[0].x,
          y0: 0,
          width: 1,
          height: 1,
          bits: Buffer.from([1]),
          predictedIou: 0.5,
          meanProbability: 0.5,
        })),
      };
    },
  } as unknown as DecoderPipeline;
  const encoder = {
    encode: async (req: { returnFeatures: boolean }) => {
      log.encodes.push(req.returnFeatures);
      return { response: { tiles: [{ digest: tile.digest, cacheHit: false, features }] } };
    },
  } as unknown as EncoderPipeline;
  const stages = new LocalStages(
    manifest,
    { prompter: {} as PrompterPipeline, encoder, decoder },
    { decodeBatchSize: 2, decodeParallelism: 2, maxDecoderCalls: 2 },
  );
  return { stages, log };
}

const call = () => ({ clock: new StageClock() });

describe('LocalStages repairs', () => {
  it('prepares a tile again when the decoder evicted it between Prepare and Decode', async () => {
    const { stages, log } = fakeStages({ evictions: 1, featuresMissing: false });
    const masks = await stages.decoder.decodeTile(tile, prompts, call());
    expect(masks.map((m) => m.x0)).toEqual([0, 1, 2, 3, 4]); // every prompt answered, in order
    // Prepared again after the eviction (batches that saw it at the same time may each prepare:
    // the real decoder's cache joins those); the evicted batch was decoded twice.
    expect(log.prepares.length).toBeGreaterThanOrEqual(2);
    expect(log.decodes).toBeGreaterThanOrEqual(4);
    expect(log.encodes).toEqual([]);
  });

  it('encodes a tile again and hands its features to Prepare when the encoder evicted them', async () => {
    const { stages, log } = fakeStages({ evictions: 0, featuresMissing: true });
    await stages.decoder.decodeTile(tile, prompts, call());
    expect(log.encodes).toEqual([true]); // encoded again, asking for the features back
    expect(log.prepares).toEqual([undefined, features]); // from the cache first, then handed over
    // ... as a copy: the decoder's worker takes ownership of what Prepare gets, and the encoder's
    // response shares its cache's buffer (a detached cache entry failed later Prepares).
    expect(log.prepares[1]!.data.buffer).not.toBe(features.data.buffer);
  });

  it('lets only the Prepare sent with the Encode wait for the features', async () => {
    const early = fakeStages({ evictions: 0, featuresMissing: false });
    await early.stages.decoder.prepareTile!(tile, call());
    expect(early.log.prepareWaits[0]).toBeGreaterThan(0);
    // Any other Prepare (here one after an eviction) must learn at once that the features are
    // gone, and the one that hands the features over has nothing to wait for.
    const late = fakeStages({ evictions: 0, featuresMissing: true });
    await late.stages.decoder.decodeTile(tile, prompts, call());
    expect(late.log.prepareWaits).toEqual([0, 0]);
  });

  it('gives up with the decoder status when the tile keeps being evicted', async () => {
    const { stages } = fakeStages({ evictions: 100, featuresMissing: false });
    const err = await stages.decoder.decodeTile(tile, prompts.slice(0, 1), call()).catch((e: unknown) => e);
    expect(errorReason(err)).toBe(ErrorReason.NOT_PREPARED);
  });
});
