// Prompter transport: the gRPC handler for Detect and the assembly of a running prompter
// (manifest -> worker pool -> pipeline -> gRPC server).
import { serviceMetrics, SpanAttributes, stagesProto, unaryHandler } from '@cfrsam/rpc';
import { type RunningStageService, type StageServiceOptions, startStageService } from '@cfrsam/runtime';
import { PrompterPipeline, type PrompterPipelineOptions } from './pipeline';

export const PROMPTER_SERVICE_NAME = 'cfrsam.v1.Prompter';
export const DEFAULT_PROMPTER_PORT = 50052;

/** The Prompter service implementation over a pipeline. */
export function prompterHandlers(pipeline: PrompterPipeline): stagesProto.PrompterServer {
  return {
    detect: unaryHandler(`${PROMPTER_SERVICE_NAME}/Detect`, async (request: stagesProto.DetectRequest, ctx) => {
      ctx.span.setAttribute(SpanAttributes.tiles, request.tiles.length);
      if (request.tiles.length === 1) ctx.span.setAttribute(SpanAttributes.digest, request.tiles[0].digest);
      const metrics = serviceMetrics();
      const response = await metrics.timeStage('prompter.detect', () => pipeline.detect(request, ctx.signal));
      ctx.span.setAttribute(
        SpanAttributes.prompts,
        response.tiles.reduce((n, t) => n + t.detections.length, 0),
      );
      return response;
    }),
  };
}

export interface PrompterOptions extends PrompterPipelineOptions, StageServiceOptions {}

export type RunningPrompter = RunningStageService<PrompterPipeline>;

/** Loads the bundle, starts the worker pool and serves Detect. */
export function startPrompter(options: PrompterOptions): Promise<RunningPrompter> {
  return startStageService(
    {
      name: 'prompter',
      serviceName: PROMPTER_SERVICE_NAME,
      definition: stagesProto.PrompterService,
      graphs: ['prompter'],
      optionalGraphs: ['point_refiner'],
      createPipeline: (manifest, pool) => new PrompterPipeline(manifest, pool, options),
      handlers: prompterHandlers,
    },
    options,
  );
}
