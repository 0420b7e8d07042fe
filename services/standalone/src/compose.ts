// The three stages in this process: their worker pools, their pipelines and LocalStages over them.
// The standalone entry (main.ts) serves it; bench/pipeline.mjs drives it with no gRPC at all.
import { type GraphName, type Manifest, prompterGraphs } from '@cfrsam/contract';
import { DecoderPipeline } from '@cfrsam/decoder/dist/pipeline';
import { EncoderPipeline } from '@cfrsam/encoder/dist/pipeline';
import { PrompterPipeline } from '@cfrsam/prompter/dist/pipeline';
import { OnnxWorkerPool, type OnnxWorkerPoolOptions } from '@cfrsam/runtime';
import { encoderCacheSource, LocalStages } from './localStages';

export interface LocalStagesConfig {
  prompterWorkers: number;
  encoderWorkers: number;
  /** Decoder workers share the prepared tiles (one decoder_image run per tile). */
  decoderWorkers: number;
  intraOpThreads: number;
  /** Inference jobs that may wait per stage (more get RESOURCE_EXHAUSTED); default the pool's. */
  maxQueue?: number;
  executionProviders?: string[];
  encoderCacheBytes?: number;
  decoderCacheBytes?: number;
  /** The gateway's prompts per decoder call and decoder calls in flight. */
  decodeBatchSize: number;
  maxDecoderCalls: number;
  onJobDone?: OnnxWorkerPoolOptions['onJobDone'];
}

export async function startLocalStages(manifest: Manifest, config: LocalStagesConfig): Promise<LocalStages> {
  const pool = (name: string, graphs: GraphName[], workers: number) =>
    OnnxWorkerPool.create({
      name,
      graphs: Object.fromEntries(graphs.map((g) => [g, manifest.graphs[g]!.path])),
      workers,
      intraOpThreads: config.intraOpThreads,
      maxQueue: config.maxQueue,
      executionProviders: config.executionProviders,
      onJobDone: config.onJobDone,
    });
  const pools = await Promise.all([
    pool('prompter', prompterGraphs(manifest), config.prompterWorkers),
    pool('encoder', ['encoder'], config.encoderWorkers),
    pool('decoder', ['decoder_image', 'decoder_prompts'], config.decoderWorkers),
  ]);
  const [prompterPool, encoderPool, decoderPool] = pools;
  const encoder = new EncoderPipeline(manifest, encoderPool, { cacheBytes: config.encoderCacheBytes });
  const decoder = new DecoderPipeline(manifest, decoderPool, {
    cacheBytes: config.decoderCacheBytes,
    featureSources: [encoderCacheSource(encoder)],
    // Prepare's features come from the encoder next to it (the FEATURES_MISSING repair in
    // localStages.ts); no remote caller reaches this decoder.
    acceptUnverifiedInput: true,
  });
  return new LocalStages(
    manifest,
    { prompter: new PrompterPipeline(manifest, prompterPool), encoder, decoder },
    {
      decodeBatchSize: config.decodeBatchSize,
      decodeParallelism: config.decoderWorkers,
      maxDecoderCalls: config.maxDecoderCalls,
      close: () => {
        for (const p of pools) void p.close();
      },
    },
  );
}
