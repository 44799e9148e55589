// Certificates for the TLS tests, made with `openssl` in a temporary directory: a private CA
// and server certificates it signs for 127.0.0.1 and localhost.

import { execFileSync } from 'node:child_process';
import { createHash, X509Certificate } from 'node:crypto';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const EC = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
const openssl = (...args) => execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });

/** A private CA in a new temporary directory: `{dir, ca, caKey}` (paths). */
export function makeCa() {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'ferrocast-pki-'));
  const ca = path.join(dir, 'ca.pem');
  const caKey = path.join(dir, 'ca.key');
  openssl('req', '-x509', ...EC, '-days', '30', '-subj', '/CN=ferrocast node e2e CA', '-keyout', caKey, '-out', ca);
  return { dir, ca, caKey };
}

/** A server certificate for 127.0.0.1 and localhost signed by `pki`: `{cert, key, ca}`. */
export function issue(pki, stem = 'server') {
  const file = (ext) => path.join(pki.dir, `${stem}.${ext}`);
  writeFileSync(
    file('cnf'),
    'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n' +
      'keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n',
  );
  openssl('req', ...EC, '-subj', `/CN=ferrocast ${stem}`, '-keyout', file('key'), '-out', file('csr'));
  openssl('x509', '-req', '-in', file('csr'), '-CA', pki.ca, '-CAkey', pki.caKey, '-CAcreateserial', '-days', '30', '-extfile', file('cnf'), '-out', file('pem'));
  return { cert: file('pem'), key: file('key'), ca: pki.ca };
}

/** The base64 SHA-256 of a certificate's public key (Chromium's --ignore-certificate-errors-spki-list). */
export function spkiHash(certPath) {
  const spki = new X509Certificate(readFileSync(certPath)).publicKey.export({ type: 'spki', format: 'der' });
  return createHash('sha256').update(spki).digest('base64');
}
