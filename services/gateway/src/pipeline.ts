// The gateway's orchestration (docs/architecture.md, "Pipeline"): decode and validate the image,
// tile it, run the prompter and the encoder side by side on batches of tiles, decode the prompts
// of every tile, and assemble the masks into nuclei. Refine re-runs only the last step for new
// prompts on an image kept from an earlier Segment. The stages are ports (stages/ports.ts): the
// gRPC adapter in production, in-memory fakes in the unit tests; nothing here knows the transport.
import { createHash } from 'node:crypto';
import { setMaxListeners } from 'node:events';
import { imageSize } from 'image-size';
import { trace } from '@opentelemetry/api';
import sharp from 'sharp';
import { digestTile, type Manifest } from '@cfrsam/contract';
import {
  decodeImage,
  encodeLabelPng,
  extractTileRgb,
  glassRects,
  labelMapFromBytes,
  isIdentity,
  pasteTileMask,
  planTiles,
  rectContains,
  rescaleMask,
  resizeRgb,
  scaledSize,
  scaleToModel,
  type ResampleScale,
  type RgbImage,
  type Tile,
  type TileLayout,
} from '@cfrsam/nuclei';
import { ByteLruCache, ErrorReason, grpcError, segmentationProto, serviceMetrics, SpanAttributes, stagesProto, status } from '@cfrsam/rpc';
import { AdaptiveLimit } from './admission/adaptiveLimit';
import { Admission, AdmissionRejected, type AdmissionReservation, type AdmissionStats } from './admission/admission';
import type { AnnouncedImage } from './admission/announce';
import { assembleNuclei, nucleusScore, UNCLASSIFIED, type DecodedCandidate } from './assemble';
import type { GatewayConfig } from './config';
import { ownerOfPrompt, pointPrompt, promptAnchor, resolvePromptMode, toTilePoints, validatePrompts } from './prompts';
import { mapConcurrent, withSpan } from './spans';
import type { StageCall, StagePorts, StageTile } from './stages/ports';
import { StageClock } from './timing';

const { PromptSource } = segmentationProto;

/** A prompter detection in image coordinates. */
export interface ImageDetection {
  x: number;
  y: number;
  classIndex: number;
  foreground: number;
  classProbabilities: number[];
}

/** What the gateway keeps of a segmented image for Refine. */
export interface SegmentedImage {
  imageId: string;
  /** The image as sent (outlines and measurements are in its pixels). */
  image: RgbImage;
  /** The image at the model's resolution (the same object when no resampling was needed). */
  work: RgbImage;
  /** Model pixels per image pixel. */
  scale: ResampleScale;
  mppAssumed: boolean;
  layout: TileLayout;
  /** Tile digests by tile index. */
  digests: string[];
  /** Detections by tile index (image coordinates); undefined for tiles the prompter did not see. */
  detections: (ImageDetection[] | undefined)[];
  /** By tile index: the prompter's blur gate called the tile blurred. */
  blurred: boolean[];
  mpp: number;
  /** The Segment request's origin and downsample, echoed by Refine too. */
  placement: { origin?: segmentationProto.Point; downsample: number };
}

/** Deadline, cancellation and tracing of the client's call. */
export interface RequestContext {
  deadline?: Date;
  signal?: AbortSignal;
  /** The caller (callIdentity(call).id): its requests queue and are limited together. */
  identity?: string;
  /** The admission reservation the door (admission/door.ts) took from the call's headers. */
  reservation?: string;
}

/** A manual prompt with its position in the request. */
interface ManualPrompt {
  prompt: segmentationProto.Prompt;
  anchor: { x: number; y: number };
  tile: number;
}

/** One decoder prompt of a tile, with what the response needs to know about it. */
interface PlannedPrompt {
  points: stagesProto.PromptPoints;
  anchor: { x: number; y: number };
  source: segmentationProto.PromptSource;
  classIndex: number;
  classProbabilities: number[];
  classConfidence: number;
}

export interface PipelineStats {
  segments: number;
  refines: number;
  /** Segment requests answered from the result cache. */
  resultHits: number;
  inFlight: number;
  refineCache: { entries: number; bytes: number; capacityBytes: number };
  admission: AdmissionStats;
}

export class SegmentationPipeline {
  private readonly images: ByteLruCache<SegmentedImage>;
  /** Recent Segment responses by request digest (see GatewayConfig.resultCacheBytes). */
  private readonly results: ByteLruCache<segmentationProto.SegmentResponse>;
  private inFlight = 0;
  private counts = { segments: 0, refines: 0, resultHits: 0 };
  /** Tiles being worked on now over all requests (what decides whether a tile's prompts are spread over decoders). */
  private tilesInFlight = 0;
  private readonly S: number;
  /** Admission of Segment and Refine (admission/admission.ts) under an adaptive concurrency limit. */
  readonly admission: Admission;

  constructor(
    readonly manifest: Manifest,
    readonly config: GatewayConfig,
    readonly stages: StagePorts,
  ) {
    this.S = manifest.inputSize;
    const metrics = serviceMetrics();
    this.admission = new Admission({
      limit: new AdaptiveLimit({
        initial: Math.min(config.initialConcurrentRequests, config.maxConcurrentRequests),
        max: config.maxConcurrentRequests,
        tolerance: config.latencyTolerance,
      }),
      maxQueue: config.maxQueuedRequests,
      maxQueueWaitMs: config.maxQueueWaitMs,
      maxConcurrentPerIdentity: config.maxRequestsPerIdentity,
      pixelsPerSecondPerIdentity: config.pixelsPerSecondPerIdentity,
      initialPixelsPerSecond: config.initialPixelsPerSecond,
      onEvent: (event) => {
        metrics.admission(event);
        metrics.admissionState(this.admission.stats());
      },
    });
    if (config.tileOverlap < 0 || config.tileOverlap >= this.S) {
      throw new Error(`tile overlap ${config.tileOverlap} must be in [0, ${this.S})`);
    }
    this.results = new ByteLruCache<segmentationProto.SegmentResponse>({
      capacityBytes: config.resultCacheBytes ?? 0,
      // Polygons dominate a nucleus's size; the label map when asked for.
      sizeOf: (r) =>
        1024 +
        (r.labelMap?.data.byteLength ?? 0) +
        r.nuclei.reduce((n, x) => n + 400 + x.polygon.length * 16 + (x.mask ? x.mask.counts.length * 4 : 0), 0),
    });
    this.images = new ByteLruCache<SegmentedImage>({
      capacityBytes: config.refineCacheBytes,
      sizeOf: (s) =>
        s.image.data.byteLength +
        (s.work === s.image ? 0 : s.work.data.byteLength) +
        s.digests.length * 96 +
        s.detections.reduce((n, d) => n + (d?.length ?? 0) * 80, 0) +
        1024,
    });
  }

  close(): void {
    this.stages.close();
  }

  stats(): PipelineStats {
    const c = this.images.stats();
    return {
      ...this.counts,
      inFlight: this.inFlight,
      refineCache: { entries: c.entries, bytes: c.bytes, capacityBytes: c.capacityBytes },
      admission: this.admission.stats(),
    };
  }

  modelInfo(): segmentationProto.ModelInfo {
    const m = this.manifest;
    return {
      name: m.name,
      version: m.version,
      inputSize: m.inputSize,
      mpp: m.mpp,
      classes: m.classes.map((c, index) => ({ index, name: c.name, color: c.color })),
      refinement: m.refinement.mode,
      refinementWindow: m.refinement.window,
      maxImagePixels: this.config.maxImagePixels,
      maxPrompts: this.config.maxPrompts,
    };
  }

  /**
   * Work of a Segment request for admission: its pixels at the model's resolution, read from the
   * image header (no pixel decoded). An unreadable header counts as one tile; decoding reports it.
   * The header is parsed synchronously in JS (image-size), not by sharp: sharp's calls queue in
   * libuv's thread pool behind the pixel work of running requests, which under load delayed the
   * pricing (and so the early refusals) by seconds.
   */
  private async segmentWork(request: segmentationProto.SegmentRequest): Promise<number> {
    const mpp = request.mpp > 0 ? request.mpp : undefined;
    try {
      const { width, height, type } = imageSize(request.image);
      // Formats the gateway refuses are refused by decoding with INVALID_ARGUMENT; priced as a
      // tile they pass admission to get that answer.
      if (!type || !DECODED_FORMATS.has(type)) return this.S * this.S;
      return this.workOf(width ?? 0, height ?? 0, mpp);
    } catch {
      try {
        const meta = await sharp(request.image, { limitInputPixels: false }).metadata();
        return this.workOf(meta.width ?? 0, meta.height ?? 0, mpp);
      } catch {
        return this.S * this.S;
      }
    }
  }

  /**
   * Work of an image of `width` x `height` at `mpp` (the model's when undefined): its pixels at
   * the model's resolution, at least one tile. Images over the gateway's limit are refused by
   * decoding with INVALID_ARGUMENT; priced as a tile they pass admission to get that answer.
   */
  workOf(width: number, height: number, mpp: number | undefined): number {
    const tile = this.S * this.S;
    const scale = (mpp && mpp > 0 ? mpp : this.manifest.mpp) / this.manifest.mpp;
    const pixels = width * height * scale * scale;
    if (width * height > this.config.maxImagePixels || pixels > this.config.maxImagePixels) return tile;
    return Math.max(tile, pixels);
  }

  /**
   * Holds a place for a Segment request that announced its image (x-image-size; admission/door.ts
   * and the HTTP routes) before its body has arrived. Throws the refusal as its gRPC status.
   */
  reserveAnnounced(announced: AnnouncedImage, identity: string, deadline: number | undefined): AdmissionReservation {
    try {
      return this.admission.reserve({ identity, pixels: this.workOf(announced.width, announced.height, announced.mpp), deadline });
    } catch (err) {
      throw err instanceof AdmissionRejected ? admissionError(err) : err;
    }
  }

  private stageCall(ctx: RequestContext, clock: StageClock): StageCall {
    // Without a client deadline, stage calls still get one, so nothing waits forever.
    return {
      deadline: ctx.deadline ?? new Date(Date.now() + this.config.defaultTimeoutMs),
      signal: ctx.signal,
      clock,
      tilesInFlight: () => this.tilesInFlight,
    };
  }

  private async withTilesInFlight<T>(tiles: number, work: () => Promise<T>): Promise<T> {
    this.tilesInFlight += tiles;
    try {
      return await work();
    } finally {
      this.tilesInFlight -= tiles;
    }
  }

  private checkModel(model: string): void {
    if (!model) return;
    const m = this.manifest;
    if (model !== m.name && model !== `${m.name}@${m.version}`) {
      throw grpcError(
        status.INVALID_ARGUMENT,
        `model "${model}" is not served here; this gateway serves "${m.name}" version ${m.version} ` +
          `(send model "${m.name}", "${m.name}@${m.version}" or leave it empty)`,
      );
    }
  }

  // ------------------------------------------------------------------ Segment

  async segment(request: segmentationProto.SegmentRequest, ctx: RequestContext = {}): Promise<segmentationProto.SegmentResponse> {
    this.counts.segments++;
    const started = performance.now();
    const key = this.results.capacityBytes > 0 ? resultKey(request, this.manifest.version) : '';
    const cached = key ? this.results.get(key) : undefined;
    // A hit needs the image still held for Refine, so that its image_id keeps working. It costs
    // no stage work, so it is answered without waiting for admission.
    if (cached && this.images.has(cached.imageId)) {
      this.counts.resultHits++;
      return { ...cached, timings: [{ stage: 'result_cache', ms: performance.now() - started }] };
    }
    return this.admitted(ctx, await this.segmentWork(request), async (scoped) => {
      const response = await this.runSegment(request, scoped);
      if (key) this.results.set(key, response);
      return response;
    });
  }

  /**
   * Runs one public request under the admission limit, in its own cancellation scope: a failure
   * stops the child calls still running for it (other tile batches).
   */
  private async admitted<T>(ctx: RequestContext, pixels: number, run: (ctx: RequestContext) => Promise<T>): Promise<T> {
    const ticket = await this.admission
      .acquire({ identity: ctx.identity ?? 'anonymous', pixels, deadline: ctx.deadline?.getTime(), signal: ctx.signal, reservation: ctx.reservation })
      .catch((err: unknown) => {
        throw err instanceof AdmissionRejected ? admissionError(err) : err;
      });
    this.inFlight++;
    const scope = requestScope(ctx);
    let ok = false;
    let dropped = false;
    try {
      const out = await run(scope.ctx);
      ok = true;
      return out;
    } catch (err) {
      // A stage out of capacity or out of time is overload: the concurrency limit shrinks.
      dropped = !ctx.signal?.aborted && isOverload(err);
      scope.abort();
      throw err;
    } finally {
      scope.dispose();
      this.inFlight--;
      ticket.release({ ok, dropped });
    }
  }

  private async runSegment(request: segmentationProto.SegmentRequest, ctx: RequestContext): Promise<segmentationProto.SegmentResponse> {
    const clock = new StageClock();
    clock.declare('decode', 'prompter', 'encoder', 'decoder_prepare', 'decoder_decode', 'assemble');
    this.checkModel(request.model);
    const mode = resolvePromptMode(request.promptMode, request.prompts.length);
    if (!Number.isFinite(request.minScore) || request.minScore < 0 || request.minScore > 1) {
      throw grpcError(status.INVALID_ARGUMENT, `min_score must be in [0, 1], got ${request.minScore}`);
    }
    if (!Number.isFinite(request.mpp) || request.mpp < 0) {
      throw grpcError(status.INVALID_ARGUMENT, `mpp must be a positive number of micrometres per pixel (or 0 for the model's), got ${request.mpp}`);
    }
    checkCellExpansion(request.cellExpansionUm);
    const placement = slidePlacement(request);
    const image = await clock.time('decode', () =>
      withSpan('gateway.decode_image', { 'cfrsam.image_bytes': request.image.length }, async (span) => {
        const decoded = await decodeImage(request.image, {
          maxPixels: this.config.maxImagePixels,
          minSide: this.config.minImageSide,
        });
        span.setAttributes({ 'cfrsam.width': decoded.width, 'cfrsam.height': decoded.height, 'cfrsam.format': decoded.format });
        return decoded;
      }),
    );
    validatePrompts(request.prompts, image.width, image.height, this.config);
    // The model's resolution: resample (and later map every mask back to the image's pixels).
    const mppAssumed = !(request.mpp > 0);
    const imageMpp = mppAssumed ? this.manifest.mpp : request.mpp;
    const scale = scaleToModel(imageMpp, this.manifest.mpp);
    const work = await this.toModelResolution(image, scale, clock);
    const layout = planTiles(work.width, work.height, this.S, this.config.tileOverlap);
    const imageId = imageDigest(image, this.manifest.version, imageMpp);
    const manual = mode.manual ? this.manualPrompts(request.prompts, layout, scale) : [];
    // Glass tiles (no stained tissue, in an image that has some) skip the model in automatic mode:
    // they hold no nuclei, and on slide regions at the tissue's edge they are a large share of the
    // work. A tile with a manual prompt runs whatever it shows.
    const glass = mode.auto
      ? glassRects(
          work,
          layout.tiles.map((t) => t.valid),
          this.config.glassTileMaxTissue,
        )
      : new Set<number>();
    const tilesToRun = layout.tiles.filter((t) => (mode.auto && !glass.has(t.index)) || manual.some((m) => m.tile === t.index));
    if (glass.size > 0) trace.getActiveSpan()?.setAttribute('cfrsam.glass_tiles', glass.size);
    const digests: string[] = new Array(layout.tiles.length);
    const detections: (ImageDetection[] | undefined)[] = new Array(layout.tiles.length).fill(undefined);
    const blurred: boolean[] = new Array(layout.tiles.length).fill(false);
    // Candidates by tile, flattened in tile order so the result does not depend on call timing.
    const byTile: DecodedCandidate[][] = layout.tiles.map(() => []);
    const call = this.stageCall(ctx, clock);
    const batches: Tile[][] = [];
    for (let i = 0; i < tilesToRun.length; i += this.config.tileBatchSize) batches.push(tilesToRun.slice(i, i + this.config.tileBatchSize));

    await this.withTilesInFlight(tilesToRun.length, () =>
      mapConcurrent(batches, this.config.tileBatchConcurrency, async (batch) => {
        const tiles = batch.map((tile) => {
          const stageTile = this.stageTile(work, tile);
          digests[tile.index] = stageTile.digest;
          return stageTile;
        });
        // The prompter and the encoder side by side; decoding a tile needs both (its prompts, and
        // its features where the decoders fetch them). Preparing it (decoder_image) needs only the
        // features, so its Prepare starts with the Encode: the tile's bytes reach the decoder while
        // the encoder works, the decoder's fetch of the features waits at the encoder for them, and
        // decoder_image runs while the prompter still works (a tile of automatic mode that turns out
        // to have no prompts was prepared for nothing: one decoder_image run, against a shorter
        // critical path for every tile).
        this.prepareEarly(tiles, call);
        const [detected] = await Promise.all([this.stages.prompter.detect(tiles, call), this.stages.encoder.encode(tiles, call)]);
        await Promise.all(
          batch.map(async (tile, i) => {
            const found = detected.get(tiles[i].digest);
            const tileDetections = toImageDetections(found?.detections ?? [], tile);
            detections[tile.index] = tileDetections;
            blurred[tile.index] = found?.blurred ?? false;
            const planned = this.planTilePrompts(tile, tileDetections, manual, mode, request.minScore);
            byTile[tile.index] = await this.decodePlanned(tile, tiles[i], planned, call);
          }),
        );
      }),
    );

    // Tiles the prompter and encoder did not see (manual mode) get their digest now, for Refine.
    for (const tile of layout.tiles) {
      digests[tile.index] ??= digestTile(extractTileRgb(work, tile, this.S), this.manifest.version);
    }
    const kept: RgbImage = { width: image.width, height: image.height, data: image.data };
    const stored: SegmentedImage = {
      imageId,
      image: kept,
      work: work === image ? kept : work,
      scale,
      mppAssumed,
      layout,
      digests,
      detections,
      blurred,
      mpp: imageMpp,
      placement,
    };
    const response = await this.respond(toImageFrame(byTile.flat(), scale, image), stored, request.minScore, request, clock, image.notes);
    // Kept for Refine once the answer is made (a Segment that failed leaves nothing to refine).
    this.images.set(imageId, stored);
    return response;
  }

  /** The image resized by `scale` (itself when no resampling is needed), within the pixel limit. */
  private async toModelResolution(image: RgbImage, scale: ResampleScale, clock: StageClock): Promise<RgbImage> {
    if (isIdentity(scale)) return image;
    const size = scaledSize(image.width, image.height, scale);
    if (size.width * size.height > this.config.maxImagePixels) {
      throw grpcError(
        status.INVALID_ARGUMENT,
        `at the model's resolution (${this.manifest.mpp} um/px) the ${image.width}x${image.height} image is ${size.width}x${size.height}, ` +
          `over the limit of ${this.config.maxImagePixels} pixels; send smaller regions (or use cfrsam slide run)`,
        { fieldViolations: [{ field: 'image', description: 'too large at the model resolution' }] },
      );
    }
    return clock.time('resample', () =>
      withSpan('gateway.resample', { 'cfrsam.scale': scale.x, 'cfrsam.width': size.width, 'cfrsam.height': size.height }, () =>
        resizeRgb(image, size.width, size.height),
      ),
    );
  }

  /** Manual prompts (image pixels) in the model frame, with their owner tiles. */
  private manualPrompts(prompts: readonly segmentationProto.Prompt[], layout: TileLayout, scale: ResampleScale): ManualPrompt[] {
    return prompts.map((p) => {
      const prompt = scalePrompt(p, scale);
      return { prompt, anchor: promptAnchor(prompt), tile: ownerOfPrompt(layout, prompt).index };
    });
  }

  private assembleOptions(
    mpp: number,
    minScore: number,
    returnLabelMap: boolean,
    returnMasks: boolean,
    maskEncoding?: segmentationProto.MaskEncoding,
    cellExpansionPx = 0,
  ) {
    return {
      maskEncoding,
      cellExpansionPx,
      classNames: this.manifest.classes.map((c) => c.name),
      mpp,
      minScore,
      returnLabelMap,
      returnMasks,
      minKeptFraction: this.config.minKeptFraction,
      minAreaPx: this.config.minAreaPx,
      polygonTolerance: this.config.polygonTolerance,
    };
  }

  /** A tile of the image as the stages take it: RGB bytes and digest. */
  private stageTile(image: RgbImage, tile: Tile): StageTile {
    const rgb = extractTileRgb(image, tile, this.S);
    return { digest: digestTile(rgb, this.manifest.version), rgb };
  }

  /**
   * The prompts tile `tile` decodes: its automatic detections whose point lies in its core (each
   * nucleus is decoded by one tile), and the manual prompts it owns, each classed by the nearest
   * detection within classRadius. In AUTO_AND_MANUAL mode a manual prompt replaces the automatic
   * detections around it.
   */
  private planTilePrompts(
    tile: Tile,
    tileDetections: ImageDetection[],
    manual: ManualPrompt[],
    mode: { auto: boolean; manual: boolean },
    minScore: number,
  ): PlannedPrompt[] {
    const planned: PlannedPrompt[] = [];
    const r2 = this.config.classRadius ** 2;
    if (mode.auto) {
      for (const d of tileDetections) {
        if (!rectContains(tile.core, d.x, d.y)) continue;
        const classConfidence = d.foreground * (d.classProbabilities[d.classIndex] ?? 0);
        // score = iou * classConfidence <= classConfidence: skip what min_score would drop anyway.
        if (classConfidence < minScore) continue;
        if (mode.manual && manual.some((m) => (m.anchor.x - d.x) ** 2 + (m.anchor.y - d.y) ** 2 <= r2)) continue;
        planned.push({
          points: pointPrompt(d.x - tile.x, d.y - tile.y),
          anchor: { x: d.x, y: d.y },
          source: PromptSource.PROMPT_SOURCE_AUTO,
          classIndex: d.classIndex,
          classProbabilities: d.classProbabilities,
          classConfidence,
        });
      }
    }
    for (const m of manual) {
      if (m.tile !== tile.index) continue;
      planned.push(this.planManual(m, tile, tileDetections));
    }
    return planned;
  }

  private planManual(m: ManualPrompt, tile: Tile, tileDetections: readonly ImageDetection[]): PlannedPrompt {
    const nearest = nearestDetection(tileDetections, m.anchor, this.config.classRadius);
    return {
      points: toTilePoints(m.prompt, tile, this.S),
      anchor: m.anchor,
      source: PromptSource.PROMPT_SOURCE_MANUAL,
      classIndex: nearest ? nearest.classIndex : UNCLASSIFIED.index,
      classProbabilities: nearest ? nearest.classProbabilities : [],
      classConfidence: nearest ? (nearest.classProbabilities[nearest.classIndex] ?? 0) : 1,
    };
  }

  /**
   * Starts preparing the tiles on the decoders (the port's optional hint) without waiting for it:
   * decodeTile joins a Prepare in flight, and prepares again if this one failed, so its errors are
   * decodeTile's to report, not this hint's.
   */
  private prepareEarly(tiles: readonly StageTile[], call: StageCall): void {
    const prepareTile = this.stages.decoder.prepareTile?.bind(this.stages.decoder);
    if (!prepareTile) return;
    for (const tile of tiles) prepareTile(tile, call).catch(() => undefined);
  }

  /** Decodes a tile's planned prompts and pastes the masks into image coordinates. */
  private async decodePlanned(tile: Tile, stageTile: StageTile, planned: PlannedPrompt[], call: StageCall): Promise<DecodedCandidate[]> {
    if (planned.length === 0) return [];
    const masks = await withSpan(
      'gateway.decode_tile',
      { [SpanAttributes.digest]: stageTile.digest, [SpanAttributes.prompts]: planned.length, 'cfrsam.tile': tile.index },
      () =>
        this.stages.decoder.decodeTile(
          stageTile,
          planned.map((p) => p.points),
          call,
        ),
    );
    const out: DecodedCandidate[] = [];
    masks.forEach((decoded, i) => {
      const p = planned[i];
      const mask = pasteTileMask(decoded, tile);
      if (mask.width === 0) return;
      out.push({
        mask,
        prompt: p.anchor,
        score: nucleusScore(decoded.predictedIou, p.classConfidence),
        predictedIou: decoded.predictedIou,
        source: p.source,
        classIndex: p.classIndex,
        classProbabilities: p.classProbabilities,
      });
    });
    return out;
  }

  // ------------------------------------------------------------------ Refine

  refine(request: segmentationProto.RefineRequest, ctx: RequestContext = {}): Promise<segmentationProto.SegmentResponse> {
    // Refine decodes a few tiles' prompts only: priced as one tile.
    return this.admitted(ctx, this.S * this.S, (scoped) => {
      this.counts.refines++;
      return this.runRefine(request, scoped);
    });
  }

  private async runRefine(request: segmentationProto.RefineRequest, ctx: RequestContext): Promise<segmentationProto.SegmentResponse> {
    const clock = new StageClock();
    clock.declare('decoder_prepare', 'decoder_decode', 'assemble');
    if (!request.imageId) throw grpcError(status.INVALID_ARGUMENT, 'image_id is empty; pass the image_id of a SegmentResponse');
    const entry = this.images.get(request.imageId);
    if (!entry) {
      throw grpcError(
        status.NOT_FOUND,
        `unknown image_id ${request.imageId.slice(0, 16)}: this gateway does not hold that image (never segmented, or evicted); call Segment first`,
      );
    }
    if (request.prompts.length === 0) throw grpcError(status.INVALID_ARGUMENT, 'Refine needs at least one prompt');
    checkCellExpansion(request.cellExpansionUm);
    const { image, work, layout, scale } = entry;
    validatePrompts(request.prompts, image.width, image.height, this.config);
    const manual = this.manualPrompts(request.prompts, layout, scale);
    const tiles = layout.tiles.filter((t) => manual.some((m) => m.tile === t.index));
    const call = this.stageCall(ctx, clock);
    const stageTiles = new Map(tiles.map((t) => [t.index, this.stageTile(work, t)]));
    // Tiles the prompter has not seen (Segment in manual mode): classify their prompts now.
    const unseen = tiles.filter((t) => entry.detections[t.index] === undefined);
    if (unseen.length > 0) {
      const detected = await this.stages.prompter.detect(
        unseen.map((t) => stageTiles.get(t.index)!),
        call,
      );
      for (const t of unseen) {
        const found = detected.get(entry.digests[t.index]);
        entry.detections[t.index] = toImageDetections(found?.detections ?? [], t);
        entry.blurred[t.index] = found?.blurred ?? false;
      }
      // The entry grew: store it again so the cache counts its new size.
      this.images.set(entry.imageId, entry);
    }
    // The decoders that prepared these tiles in Segment still hold them (or fetch the features
    // again from the encoders); nothing is relayed through here.
    const byTile = await this.withTilesInFlight(tiles.length, () =>
      Promise.all(
        tiles.map((tile) => {
          const planned = manual.filter((m) => m.tile === tile.index).map((m) => this.planManual(m, tile, entry.detections[tile.index] ?? []));
          return this.decodePlanned(tile, stageTiles.get(tile.index)!, planned, call);
        }),
      ),
    );
    return this.respond(toImageFrame(byTile.flat(), scale, image), entry, 0, request, clock);
  }

  /**
   * Segment's and Refine's last step: overlaps resolved, outlines and measurements made (image
   * pixels), and the response built around them.
   */
  private async respond(
    candidates: DecodedCandidate[],
    stored: SegmentedImage,
    minScore: number,
    output: Pick<segmentationProto.RefineRequest, 'returnLabelMap' | 'returnMasks' | 'maskEncoding' | 'labelMapEncoding' | 'cellExpansionUm'>,
    clock: StageClock,
    imageNotes: string[] = [],
  ): Promise<segmentationProto.SegmentResponse> {
    const { image, layout } = stored;
    const blurredTiles = stored.blurred.filter(Boolean).length;
    const notes = [...imageNotes];
    if (blurredTiles > 0) {
      notes.push(
        `${blurredTiles} of ${layout.tiles.length} tiles look blurred at the model's resolution (out of focus, ` +
          "or upsampled from a lower magnification): their nuclei were kept at the blur gate's lower score bar",
      );
    }
    const assembled = await clock.time('assemble', () =>
      withSpan('gateway.assemble', { [SpanAttributes.prompts]: candidates.length }, async (span) => {
        const out = assembleNuclei(
          candidates,
          image,
          this.assembleOptions(
            stored.mpp,
            minScore,
            output.returnLabelMap,
            output.returnMasks,
            output.maskEncoding,
            (output.cellExpansionUm ?? 0) / stored.mpp,
          ),
        );
        span.setAttribute('cfrsam.nuclei', out.nuclei.length);
        return out;
      }),
    );
    return {
      imageId: stored.imageId,
      width: image.width,
      height: image.height,
      nuclei: assembled.nuclei,
      counts: assembled.counts,
      labelMap: await encodeLabelMapAs(assembled.labelMap, output.labelMapEncoding),
      modelName: this.manifest.name,
      modelVersion: this.manifest.version,
      timings: clock.timings(),
      tiles: layout.tiles.length,
      blurredTiles,
      imageMpp: stored.mpp,
      mppAssumed: stored.mppAssumed,
      modelMpp: this.manifest.mpp,
      ...stored.placement,
      ...(notes.length > 0 ? { imageNotes: notes.join('; ') } : {}),
    };
  }
}

/** The largest cell expansion a request may ask for (QuPath's cell detection defaults to 5 µm). */
export const MAX_CELL_EXPANSION_UM = 50;

/** INVALID_ARGUMENT unless cell_expansion_um is unset or in [0, MAX_CELL_EXPANSION_UM]. */
function checkCellExpansion(um: number | undefined): void {
  if (um === undefined) return;
  if (!Number.isFinite(um) || um < 0 || um > MAX_CELL_EXPANSION_UM) {
    throw grpcError(status.INVALID_ARGUMENT, `cell_expansion_um must be in [0, ${MAX_CELL_EXPANSION_UM}] micrometres, got ${um}`);
  }
}

/** Image formats (image-size's names) that the gateway decodes (@cfrsam/nuclei decodeImage). */
const DECODED_FORMATS: ReadonlySet<string> = new Set(['png', 'jpg', 'tiff', 'webp', 'gif']);

/** An admission refusal as the gRPC status the spec means (see admission/admission.ts). */
function admissionError(err: AdmissionRejected): Error {
  switch (err.kind) {
    case 'expired':
      return grpcError(status.DEADLINE_EXCEEDED, `deadline exceeded while waiting for admission: ${err.message}`);
    case 'cancelled':
      return grpcError(status.CANCELLED, `cancelled while waiting for admission: ${err.message}`);
    case 'misannounced':
      return grpcError(status.INVALID_ARGUMENT, err.message);
    case 'identity_concurrency':
    case 'identity_rate':
      return grpcError(status.RESOURCE_EXHAUSTED, `${err.message}; other callers are still served`, {
        reason: ErrorReason.QUEUE_FULL,
        metadata: { admission: err.kind },
        retryDelayMs: err.retryAfterMs,
      });
    default:
      return grpcError(status.RESOURCE_EXHAUSTED, `gateway is busy: ${err.message}; retry after the RetryInfo delay`, {
        reason: ErrorReason.QUEUE_FULL,
        metadata: { admission: err.kind },
        retryDelayMs: err.retryAfterMs,
      });
  }
}

/** A stage failure that signals overload rather than bad input. */
function isOverload(err: unknown): boolean {
  const code = (err as { code?: unknown })?.code;
  return code === status.RESOURCE_EXHAUSTED || code === status.DEADLINE_EXCEEDED;
}

/**
 * A request's own cancellation: aborted when the client cancels (or its deadline passes) and when
 * the request fails, so a failure in one tile batch stops the child calls of the others.
 */
function requestScope(ctx: RequestContext): { ctx: RequestContext; abort(): void; dispose(): void } {
  const controller = new AbortController();
  // Every stage call of the request listens on this signal (a large image makes hundreds).
  setMaxListeners(0, controller.signal);
  const onAbort = () => controller.abort(ctx.signal?.reason);
  if (ctx.signal?.aborted) controller.abort(ctx.signal.reason);
  else ctx.signal?.addEventListener('abort', onAbort, { once: true });
  return {
    ctx: { ...ctx, signal: controller.signal },
    abort: () => controller.abort(new Error('request failed')),
    dispose: () => ctx.signal?.removeEventListener('abort', onAbort),
  };
}

/** Detections of one tile (tile pixels) -> image coordinates. */
function toImageDetections(list: readonly stagesProto.Detection[], tile: Tile): ImageDetection[] {
  return list.map((d) => ({
    x: d.x + tile.x,
    y: d.y + tile.y,
    classIndex: d.classIndex,
    foreground: d.foreground,
    classProbabilities: d.classProbabilities,
  }));
}

function nearestDetection(list: readonly ImageDetection[], p: { x: number; y: number }, radius: number): ImageDetection | undefined {
  let best: ImageDetection | undefined;
  let bestD = radius * radius;
  for (const d of list) {
    const dd = (d.x - p.x) ** 2 + (d.y - p.y) ** 2;
    if (dd <= bestD) {
      bestD = dd;
      best = d;
    }
  }
  return best;
}

/** Masks found at the model's resolution, mapped back to the image's pixels. */
function toImageFrame(candidates: DecodedCandidate[], scale: ResampleScale, image: RgbImage): DecodedCandidate[] {
  if (isIdentity(scale)) return candidates;
  return candidates
    .map((c) => ({
      ...c,
      mask: rescaleMask(c.mask, scale.x, scale.y, image.width, image.height),
      prompt: { x: c.prompt.x / scale.x, y: c.prompt.y / scale.y },
    }))
    .filter((c) => c.mask.width > 0);
}

/** A prompt in image pixels -> the model frame. */
function scalePrompt(p: segmentationProto.Prompt, scale: ResampleScale): segmentationProto.Prompt {
  if (isIdentity(scale)) return p;
  const pt = (q: { x: number; y: number }) => ({ x: q.x * scale.x, y: q.y * scale.y });
  return {
    ...p,
    positive: p.positive.map(pt),
    negative: p.negative.map(pt),
    box: p.box ? { x0: p.box.x0 * scale.x, y0: p.box.y0 * scale.y, x1: p.box.x1 * scale.x, y1: p.box.y1 * scale.y } : undefined,
  };
}

/** The request's origin and downsample, checked, for the response (downsample 0 means 1). */
function slidePlacement(request: segmentationProto.SegmentRequest): { origin?: segmentationProto.Point; downsample: number } {
  const { origin } = request;
  const downsample = request.downsample ?? 0;
  if (!Number.isFinite(downsample) || downsample < 0) {
    throw grpcError(
      status.INVALID_ARGUMENT,
      `downsample must be a positive number of level-0 pixels per image pixel (or 0 for 1), got ${downsample}`,
      {
        fieldViolations: [{ field: 'downsample', description: 'must be >= 0' }],
      },
    );
  }
  if (origin && !(Number.isFinite(origin.x) && Number.isFinite(origin.y))) {
    throw grpcError(status.INVALID_ARGUMENT, `origin must be finite level-0 pixel coordinates, got (${origin.x}, ${origin.y})`, {
      fieldViolations: [{ field: 'origin', description: 'must be finite' }],
    });
  }
  return { origin, downsample: downsample > 0 ? downsample : 1 };
}

/** The label map in the encoding asked for: raw uint16 (default) or a 16-bit PNG. */
async function encodeLabelMapAs(
  labelMap: segmentationProto.LabelMap | undefined,
  encoding: segmentationProto.LabelMapEncoding | undefined,
): Promise<segmentationProto.LabelMap | undefined> {
  if (!labelMap || encoding !== segmentationProto.LabelMapEncoding.LABEL_MAP_ENCODING_PNG) return labelMap;
  const labels = labelMapFromBytes(labelMap.data, labelMap.width, labelMap.height);
  return {
    width: labelMap.width,
    height: labelMap.height,
    data: Buffer.alloc(0),
    png: await encodeLabelPng(labels, labelMap.width, labelMap.height),
  };
}

/** The result cache's key: SHA-256 over the model version, the request without its image, and the image's bytes. */
function resultKey(request: segmentationProto.SegmentRequest, modelVersion: string): string {
  // The image's bytes are hashed as they came; only the rest of the request is encoded (encoding
  // the whole request copied the image twice more: a few MB per large image, on every request).
  const rest = segmentationProto.SegmentRequest.encode({ ...request, image: EMPTY_BYTES }).finish();
  return createHash('sha256').update(`cfrsam-result/2 ${modelVersion} ${rest.length}\n`).update(rest).update(request.image).digest('hex');
}

const EMPTY_BYTES = Buffer.alloc(0);

/** image_id: SHA-256 over the decoded RGB pixels, the size, the resolution and the model version. */
export function imageDigest(image: RgbImage, modelVersion: string, mpp: number): string {
  return createHash('sha256').update(`cfrsam-image/2 ${image.width}x${image.height} ${mpp} ${modelVersion}\n`).update(image.data).digest('hex');
}
