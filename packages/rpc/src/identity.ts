// Who is calling: the one key that authentication writes and admission, fairness, logs and spans
// read. Authentication (when configured) attaches the verified identity to the call; without it
// a client may name itself with the `x-client-id` metadata header (trusted only for fairness, never
// for permissions), and otherwise the peer address stands in.
import type { Metadata } from '@grpc/grpc-js';

/** The part of a server call the identity is read from (unary and streaming calls both have it). */
export interface IdentifiedCall {
  metadata: Metadata;
  getPeer(): string;
}

/** A caller's identity. `authenticated` is true only when a credential was verified. */
export interface CallIdentity {
  id: string;
  authenticated: boolean;
  /** Rights granted to this identity by the auth configuration (empty when unauthenticated). */
  rights: readonly string[];
}

const verified = new WeakMap<object, CallIdentity>();

/** Called by the authentication layer once it has verified the call's credential. */
export function attachIdentity(call: object, identity: CallIdentity): void {
  verified.set(call, identity);
}

/** The verified identity, else the self-declared `x-client-id`, else the peer's host. */
export function callIdentity(call: IdentifiedCall): CallIdentity {
  const found = verified.get(call);
  if (found) return found;
  const declared = call.metadata.get('x-client-id')[0];
  if (typeof declared === 'string' && declared.length > 0 && declared.length <= 128) {
    return { id: `client:${declared}`, authenticated: false, rights: [] };
  }
  return { id: `peer:${peerHost(call.getPeer())}`, authenticated: false, rights: [] };
}

/** "ipv4:127.0.0.1:5123" or "[::1]:5123" -> the host part (ports differ per connection). */
export function peerHost(peer: string): string {
  const withoutScheme = peer.replace(/^(ipv4|ipv6|unix):/, '');
  const bracketed = /^\[([^\]]+)\](?::\d+)?$/.exec(withoutScheme);
  if (bracketed) return bracketed[1]!;
  const lastColon = withoutScheme.lastIndexOf(':');
  return lastColon > 0 && withoutScheme.indexOf(':') === lastColon ? withoutScheme.slice(0, lastColon) : withoutScheme;
}
