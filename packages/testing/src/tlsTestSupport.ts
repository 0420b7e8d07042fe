// Test certificates made with the openssl CLI (scripts/setup-dev.sh installs it): one CA per
// directory and server or client certificates it signs, valid for 127.0.0.1 and localhost.
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

/** True when the openssl CLI runs here (tests needing certificates skip, saying so, without it). */
export function opensslAvailable(): boolean {
  try {
    execFileSync('openssl', ['version'], { stdio: 'pipe' });
    return true;
  } catch {
    return false;
  }
}

/**
 * In `dir`: ca.pem/ca.key (made on first use), and `name`.pem/`name`.key with subject `cn` signed
 * by that CA for IP 127.0.0.1 and DNS localhost.
 */
export function makeTestCertificates(dir: string, name: string, cn: string): void {
  const openssl = (...args: string[]) => execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' });
  if (!fs.existsSync(path.join(dir, 'ca.pem'))) {
    openssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2', '-subj', '/CN=cfrsam test CA');
  }
  fs.writeFileSync(path.join(dir, 'san.ext'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\n');
  openssl('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${cn}`);
  openssl(
    'x509',
    '-req',
    '-in',
    `${name}.csr`,
    '-CA',
    'ca.pem',
    '-CAkey',
    'ca.key',
    '-CAcreateserial',
    '-out',
    `${name}.pem`,
    '-days',
    '2',
    '-extfile',
    'san.ext',
  );
}
