// A stage's view of one TileInput: its digest and normalised pixels. Tiles sent as RGB bytes are
// normalised here and their digest is computed from those bytes and compared with the one sent,
// so a cache keyed by digest only ever holds what the digest names (no caller can plant results
// under another tile's digest). Tiles sent as float pixels (the older form) are taken as they are.
import { grpcError, status, type stagesProto } from '@cfrsam/rpc';
import { digestTile, isDigest } from './digest';
import type { Manifest } from './manifest';
import { normalizeRgb } from './normalize';
import { tensorFromProto, type Float32Tensor } from './tensor';

export interface StageTile {
  digest: string;
  /** Normalised [3, S, S], or null for a digest-only tile (read from a cache). */
  pixels: Float32Tensor | null;
  /** True when the digest was checked against the tile's RGB bytes. */
  verified: boolean;
}

/**
 * Validates one tile of a stage request (`field` names it in errors, e.g. "tiles[2]"):
 * INVALID_ARGUMENT for a malformed digest, RGB of the wrong size or a digest that is not the RGB's.
 */
export function readStageTile(field: string, tile: { digest: string; pixels?: stagesProto.Tensor; rgb?: Uint8Array }, manifest: Manifest): StageTile {
  if (!isDigest(tile.digest)) {
    throw grpcError(status.INVALID_ARGUMENT, `${field}.digest must be a SHA-256 in 64 lowercase hex digits, got "${tile.digest}"`, {
      fieldViolations: [{ field: `${field}.digest`, description: 'not a 64-hex-digit SHA-256' }],
    });
  }
  const S = manifest.inputSize;
  if (tile.rgb && tile.rgb.length > 0) {
    if (tile.rgb.length !== S * S * 3) {
      throw grpcError(status.INVALID_ARGUMENT, `${field}.rgb: expected ${S}x${S}x3 = ${S * S * 3} bytes, got ${tile.rgb.length}`, {
        fieldViolations: [{ field: `${field}.rgb`, description: `expected ${S * S * 3} bytes` }],
      });
    }
    const actual = digestTile(tile.rgb, manifest.version);
    if (actual !== tile.digest) {
      throw grpcError(
        status.INVALID_ARGUMENT,
        `${field}.digest ${tile.digest.slice(0, 16)}... is not the digest of its RGB bytes and model version ${manifest.version} ` +
          `(${actual.slice(0, 16)}...)`,
        { fieldViolations: [{ field: `${field}.digest`, description: 'does not match the RGB bytes' }] },
      );
    }
    return {
      digest: tile.digest,
      pixels: { type: 'float32', dims: [3, S, S], data: normalizeRgb(tile.rgb, S, S, manifest.normalization) },
      verified: true,
    };
  }
  const pixels = tile.pixels ? tensorFromProto(`${field}.pixels`, tile.pixels, [3, S, S]) : null;
  return { digest: tile.digest, pixels, verified: false };
}
