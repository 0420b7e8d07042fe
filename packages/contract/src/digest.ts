// The tile digest that keys every cache (encoder features, decoder prepared state).
import { createHash } from 'node:crypto';

/**
 * SHA-256 hex of a tile's RGB bytes (S*S*3, row-major, interleaved) followed by the UTF-8 model
 * version. The version is part of the key so a new model never reads features of an old one.
 * The tile size is implied by the byte count, so it needs no separate field.
 */
export function digestTile(rgb: Uint8Array, modelVersion: string): string {
  return createHash('sha256').update(rgb).update(modelVersion, 'utf8').digest('hex');
}

/** True for a 64-hex-digit lowercase SHA-256. */
export function isDigest(value: string): boolean {
  return /^[0-9a-f]{64}$/.test(value);
}
