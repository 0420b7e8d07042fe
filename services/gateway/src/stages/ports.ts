// The stages as the gateway's orchestration sees them: three ports, no transport. The gRPC
// adapter (grpcStages.ts) implements them over replica sets; the orchestration's unit tests
// implement them in memory.
import type { stagesProto } from '@cfrsam/rpc';
import type { StageClock } from '../timing';

/** One model-input tile: its digest (SHA-256 of the RGB bytes and the model version) and RGB bytes (S x S x 3). */
export interface StageTile {
  digest: string;
  rgb: Uint8Array;
}

/** Deadline, cancellation and timing of the request a stage call serves. */
export interface StageCall {
  deadline?: Date;
  signal?: AbortSignal;
  clock: StageClock;
  /**
   * Tiles the gateway has in flight now, this request's and every other's: with fewer than there
   * are decoder replicas, a tile's prompts may be spread over several (each prepares the tile).
   */
  tilesInFlight?: () => number;
}

export interface PrompterPort {
  /** Point prompts with classes for each tile (tile pixels), and whether it is blurred, by digest. */
  detect(tiles: readonly StageTile[], call: StageCall): Promise<Map<string, stagesProto.TileDetections>>;
}

export interface EncoderPort {
  /**
   * Makes sure the tiles' features exist on the encoder side (computed or cached), where the
   * decoders fetch them; the features themselves never come back. Resolves to the cache hits.
   */
  encode(tiles: readonly StageTile[], call: StageCall): Promise<{ cacheHits: number }>;
}

export interface DecoderPort {
  /**
   * Decodes a tile's prompts (tile pixels): one mask per prompt, in order. Preparing the decoder
   * replicas for the tile, and encoding it again when its features were evicted everywhere, is
   * the port's business.
   */
  decodeTile(tile: StageTile, prompts: readonly stagesProto.PromptPoints[], call: StageCall): Promise<stagesProto.DecodedMask[]>;
  /**
   * Optional hint, given together with the tile's Encode (sent just before or just after): the
   * tile will probably be decoded, so prepare it now where decodeTile would send its first batch;
   * the port may wait for the features the Encode is computing. decodeTile joins a Prepare in
   * flight and repeats one that failed, so a caller may ignore this one's outcome.
   */
  prepareTile?(tile: StageTile, call: StageCall): Promise<void>;
}

export interface StagePorts {
  prompter: PrompterPort;
  encoder: EncoderPort;
  decoder: DecoderPort;
  close(): void;
}
