// A real `ferrocast serve` for Node's end-to-end tests: started on a free loopback port,
// waited for until /healthz answers, stopped with SIGTERM (a graceful drain) at the end.
// The binary is $FERROCAST_BIN, else $CARGO_TARGET_DIR/debug/ferrocast, else
// target/debug/ferrocast. Each server's log goes to e2e/artifacts/node/.

import { spawn } from 'node:child_process';
import { createWriteStream, existsSync, mkdirSync } from 'node:fs';
import https from 'node:https';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const REPO_ROOT = path.resolve(HERE, '..', '..', '..');
const ARTIFACTS = path.join(REPO_ROOT, 'e2e', 'artifacts', 'node');

export function ferrocastBin() {
  if (process.env.FERROCAST_BIN) return process.env.FERROCAST_BIN;
  const target = process.env.CARGO_TARGET_DIR || path.join(REPO_ROOT, 'target');
  return path.join(target, 'debug', 'ferrocast');
}

/** A TCP port on 127.0.0.1 that was free a moment ago. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Resolves with `fn()`'s first truthy value, polling every 25 ms; rejects after `ms`. */
export async function waitFor(fn, ms = 5000, what = 'condition') {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await fn();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(25);
  }
}

let serial = 0;

export class Ferrocast {
  /**
   * Starts a server. `sets` are `--set KEY=VALUE` overrides; `port` reuses a given port (to
   * stand in for a restarted server at the same address); `simulator: true` keeps the demo
   * market feed on (off by default, so tests publish their own data). `tls: {cert, key, ca}`
   * (PEM paths, see lib/certs.mjs) serves https:// and wss:// with that certificate; the
   * helpers below then trust `ca`.
   */
  static async start({ sets = [], port, name = 'ferrocast', simulator = false, tls } = {}) {
    const bin = ferrocastBin();
    if (!existsSync(bin)) {
      throw new Error(`ferrocast binary not found at ${bin}: run cargo build or set FERROCAST_BIN`);
    }
    port = port ?? (await freePort());
    const args = [
      'serve',
      '--listen', `127.0.0.1:${port}`,
      ...(simulator ? [] : ['--no-simulator']),
      '--set', 'server.shutdown_grace_ms=3000',
      '--set', 'log.level=info,ferrocast_server=debug',
    ];
    if (tls) args.push('--set', `server.tls.cert_file=${tls.cert}`, '--set', `server.tls.key_file=${tls.key}`);
    for (const s of sets) args.push('--set', s);
    mkdirSync(ARTIFACTS, { recursive: true });
    serial += 1;
    const logPath = path.join(ARTIFACTS, `${name}-${process.pid}-${serial}.log`);
    const log = createWriteStream(logPath);
    const env = Object.fromEntries(
      Object.entries(process.env).filter(([k]) => !k.startsWith('FERROCAST_')),
    );
    env.NO_COLOR = '1';
    const proc = spawn(bin, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
    // Two sources share one file: neither may end it, the process exit does.
    proc.stdout.pipe(log, { end: false });
    proc.stderr.pipe(log, { end: false });
    proc.once('close', () => log.end());
    const server = new Ferrocast(port, proc, logPath, tls);
    await waitFor(
      async () => {
        if (proc.exitCode !== null) throw new Error(`ferrocast exited (${proc.exitCode}); log: ${logPath}`);
        try {
          return (await server.fetch('/healthz')).status === 200;
        } catch {
          return false;
        }
      },
      20000,
      `/healthz on port ${port}`,
    );
    return server;
  }

  constructor(port, proc, logPath, tls) {
    this.port = port;
    this.proc = proc;
    this.logPath = logPath;
    this.tls = tls;
    this.url = `${tls ? 'https' : 'http'}://127.0.0.1:${port}`;
    this.wsUrl = `${tls ? 'wss' : 'ws'}://127.0.0.1:${port}`;
    this.exited = new Promise((resolve) => proc.on('exit', (code) => resolve(code)));
  }

  /**
   * `fetch(url + path)`, or, with TLS, the same over node:https trusting the test CA (Node's
   * fetch takes no CA of its own): `{status, headers, text(), json()}`.
   */
  async fetch(path, options = {}) {
    if (!this.tls) return fetch(`${this.url}${path}`, options);
    const { readFileSync } = await import('node:fs');
    const ca = readFileSync(this.tls.ca);
    return new Promise((resolve, reject) => {
      const req = https.request(`${this.url}${path}`, { method: options.method ?? 'GET', headers: options.headers, ca }, (res) => {
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('end', () => {
          const body = Buffer.concat(chunks).toString();
          resolve({ status: res.statusCode, headers: res.headers, text: async () => body, json: async () => JSON.parse(body) });
        });
      });
      req.on('error', reject);
      req.end(options.body);
    });
  }

  /** POST /api/publish; returns the result entry ({channel, offset, epoch}). */
  async publish(channel, data, { ephemeral = false } = {}) {
    const r = await this.fetch('/api/publish', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ channel, data, ephemeral }),
    });
    const body = await r.json();
    if (r.status !== 200) throw new Error(`publish answered ${r.status}: ${JSON.stringify(body)}`);
    return body.results[0];
  }

  /** The value of a metric sample whose labels include `labels` (a substring), or null. */
  async metric(name, labels = '') {
    const text = await (await this.fetch('/metrics')).text();
    for (const line of text.split('\n')) {
      if (!line.startsWith(name)) continue;
      const rest = line.slice(name.length);
      const m = rest.match(/^(\{([^}]*)\})?\s+(\S+)$/);
      if (m && (m[2] ?? '').includes(labels)) return Number(m[3]);
    }
    return null;
  }

  /** Starts a graceful drain (SIGTERM) without waiting. */
  drain() {
    if (this.proc.exitCode === null) this.proc.kill('SIGTERM');
  }

  /** Drains and waits for the process to exit (SIGKILL after 10 s). */
  async stop() {
    if (this.proc.exitCode !== null) return this.proc.exitCode;
    this.drain();
    const timer = setTimeout(() => this.proc.kill('SIGKILL'), 10000);
    const code = await this.exited;
    clearTimeout(timer);
    return code;
  }
}

/** A queue of events from an emitter-like source, awaited one at a time. */
export class Inbox {
  constructor() {
    this.items = [];
    this.waiters = [];
  }

  push(item) {
    const waiter = this.waiters.shift();
    if (waiter) waiter.resolve(item);
    else this.items.push(item);
  }

  /** The next item, or a rejection after `ms`. */
  next(ms = 5000, what = 'an event') {
    if (this.items.length) return Promise.resolve(this.items.shift());
    return new Promise((resolve, reject) => {
      const waiter = { resolve: (v) => { clearTimeout(timer); resolve(v); } };
      const timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(waiter), 1);
        reject(new Error(`no ${what} within ${ms} ms`));
      }, ms);
      this.waiters.push(waiter);
    });
  }

  /** Asserts nothing arrives for `ms`. */
  async quiet(ms) {
    await sleep(ms);
    if (this.items.length) throw new Error(`unexpected: ${JSON.stringify(this.items[0])}`);
  }
}
