// The dashboard (web/, served at /) and the browser client (/client.js) in a real headless
// Chromium, driven by playwright-core, against real `ferrocast serve` processes with the demo
// simulator on (and a real nginx in front where a test needs a proxy):
//
//   1. the page goes live: green status, ticker prices change, 1-second candles are drawn
//      (`/?interval=1s`), server stats and feeds render; the default page charts 1-minute bars;
//   2. a server restart (SIGTERM, a new process on the same port): the page reconnects by
//      itself, every message of a test channel published before and after is seen, and the
//      lost history is reported as a `gap` (new epoch) — no silent loss;
//   3. a dropped connection (an nginx in front stopped and started again) while the server
//      keeps running: every message published meanwhile arrives exactly once, in order, no gap;
//   4. an nginx that does not pass the WebSocket upgrade: the page falls back to SSE and keeps
//      updating;
//   5. the Retry button: from a terminal close (1008, origin refused) and from a long drain
//      backoff, it reconnects at once;
//   6. 100 subscribe/dispose cycles leave the client's maps and the server's sockets and
//      subscriptions where they were.
//
// Chromium is Debian's (/usr/bin/chromium, or $FERROCAST_CHROMIUM), installed by scripts/test
// through e2e/system-packages.txt; Playwright's own browser download is not used. Screenshots,
// each page's console and the nginx logs go to e2e/artifacts/browser/ (a failing test also
// leaves NN-name-failure.png); server logs go to e2e/artifacts/node/.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { chmodSync, createWriteStream, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { CHROMIUM, launchChromium } from './lib/browser.mjs';
import { Ferrocast, REPO_ROOT, freePort, waitFor } from './lib/server.mjs';

const NGINX = ['/usr/sbin/nginx', '/usr/bin/nginx'].find((p) => existsSync(p));
const ARTIFACTS = path.join(REPO_ROOT, 'e2e', 'artifacts', 'browser');


const SYMBOLS = ['AAPL', 'AMZN', 'GOOGL', 'META', 'MSFT', 'NVDA', 'TSLA', 'V'];

// Short heartbeats: RTT and quality show up quickly, and a dead link is noticed quickly.
const FAST = ['server.ping_interval_ms=1000', 'server.reconnect_after_ms=200'];

const missing = [
  !existsSync(CHROMIUM) && `chromium (${CHROMIUM}; apt-get install chromium)`,
  !NGINX && 'nginx (apt-get install nginx)',
].filter(Boolean);
const skip = missing.length ? `not installed: ${missing.join(', ')}` : false;

// Whatever happens to this process, no server or nginx outlives it.
const children = new Set();
process.on('exit', () => {
  for (const child of children) {
    try {
      child.kill('SIGKILL');
    } catch {
      // already gone
    }
  }
});

// ---------------------------------------------------------------------------------------------
// nginx

/**
 * A real nginx on `port` in front of a ferrocast on `upstream`, from a generated config in
 * e2e/artifacts/browser/<name>/. With `upgrade: false` the WebSocket upgrade is not passed on
 * (HTTP/1.1 upstream with `Connection: ""` and no Upgrade header), as by a proxy that never
 * heard of WebSocket; /sse is unbuffered in both cases.
 */
class Nginx {
  constructor({ name, upstream, port, upgrade }) {
    this.name = name;
    this.port = port;
    this.url = `http://127.0.0.1:${port}`;
    this.prefix = path.join(ARTIFACTS, `${name}-${process.pid}`);
    mkdirSync(path.join(this.prefix, 'tmp'), { recursive: true });
    chmodSync(path.join(this.prefix, 'tmp'), 0o777); // workers may run as nobody
    const passUpgrade = upgrade
      ? `proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;`
      : `proxy_set_header Connection "";`;
    const p = this.prefix;
    this.conf = path.join(p, 'nginx.conf');
    writeFileSync(
      this.conf,
      `worker_processes 1;
pid ${p}/nginx.pid;
error_log ${p}/error.log info;
events { worker_connections 256; }
http {
    access_log ${p}/access.log;
    client_body_temp_path ${p}/tmp/body;
    proxy_temp_path ${p}/tmp/proxy;
    fastcgi_temp_path ${p}/tmp/fastcgi;
    uwsgi_temp_path ${p}/tmp/uwsgi;
    scgi_temp_path ${p}/tmp/scgi;
    map $http_upgrade $connection_upgrade { default upgrade; '' close; }
    server {
        listen 127.0.0.1:${port};
        location / {
            proxy_pass http://127.0.0.1:${upstream};
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            ${passUpgrade}
            proxy_read_timeout 1h;
        }
        location /sse {
            proxy_pass http://127.0.0.1:${upstream};
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 1h;
        }
    }
}
`,
    );
    this.proc = null;
    this.runs = 0;
  }

  /** Starts nginx (again) and waits until /healthz answers through it. */
  async start() {
    this.runs += 1;
    const log = createWriteStream(path.join(this.prefix, `nginx-${this.runs}.log`));
    log.on('error', () => {});
    const proc = spawn(NGINX, ['-p', this.prefix, '-e', path.join(this.prefix, 'error.log'), '-c', this.conf, '-g', 'daemon off;'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    proc.stdout.pipe(log, { end: false });
    proc.stderr.pipe(log, { end: false });
    proc.once('close', () => log.end());
    children.add(proc);
    this.proc = proc;
    this.exited = new Promise((resolve) => proc.on('exit', (code) => resolve(code)));
    proc.on('exit', () => children.delete(proc));
    await waitFor(
      async () => {
        if (proc.exitCode !== null) throw new Error(`nginx exited (${proc.exitCode}); see ${this.prefix}`);
        try {
          return (await fetch(`${this.url}/healthz`)).status === 200;
        } catch {
          return false;
        }
      },
      10000,
      `nginx on port ${this.port}`,
    );
    return this;
  }

  /** Fast shutdown (SIGTERM, like `nginx -s stop`): every proxied connection is cut. */
  async stop() {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    proc.kill('SIGTERM');
    const timer = setTimeout(() => proc.kill('SIGKILL'), 5000);
    await this.exited;
    clearTimeout(timer);
  }

  accessLog() {
    const file = path.join(this.prefix, 'access.log');
    return existsSync(file) ? readFileSync(file, 'utf8') : '';
  }
}

// ---------------------------------------------------------------------------------------------
// Per-test scope: what a test starts is stopped at its end, in reverse order, even on failure.

let browser;

class Scope {
  constructor(name) {
    this.name = name;
    this.cleanups = [];
    this.pages = [];
  }

  defer(fn) {
    this.cleanups.push(fn);
  }

  /** A ferrocast with the simulator on; `port` stands in for a restart at the same address. */
  async server({ sets = [], port, name = this.name } = {}) {
    const server = await Ferrocast.start({ sets: [...FAST, ...sets], port, name: `browser-${name}`, simulator: true });
    children.add(server.proc);
    server.proc.on('exit', () => children.delete(server.proc));
    this.defer(() => server.stop());
    return server;
  }

  /**
   * A server simulating `symbols` only, once each has traded: the page lists the symbols it finds
   * in /api/channels when it opens and looks again only every 15 s, so this fixes its rows (and
   * its subscriptions) from the start.
   */
  async simulating(symbols, opts = {}) {
    const server = await this.server({ ...opts, sets: [`simulator.symbols=${JSON.stringify(symbols)}`, ...(opts.sets ?? [])] });
    const traded = async () => (await getJson(`${server.url}/api/channels`)).channels.filter((c) => c.channel.startsWith('ticks.')).length;
    await waitFor(async () => (await traded()) === symbols.length, 10000, `a trade on each of ${symbols}`);
    return server;
  }

  async nginx({ upstream, upgrade }) {
    const nginx = new Nginx({ name: `${this.name}-nginx`, upstream: upstream.port, port: await freePort(), upgrade });
    this.defer(() => nginx.stop());
    return nginx.start();
  }

  /** A fresh browser context and page at `url`, once `window.ferrocast` exists. */
  async page(url) {
    const context = await browser.newContext({ viewport: { width: 1280, height: 720 } });
    this.defer(() => context.close().catch(() => {}));
    const page = await context.newPage();
    const log = createWriteStream(path.join(ARTIFACTS, `${this.name}.console.log`));
    log.on('error', () => {}); // a log is a convenience, never a reason to fail
    this.defer(() => new Promise((resolve) => log.end(resolve)));
    page.errors = [];
    page.on('console', (m) => log.write(`${new Date().toISOString()} ${m.type()}: ${m.text()}\n`));
    page.on('pageerror', (err) => {
      page.errors.push(err);
      log.write(`${new Date().toISOString()} pageerror: ${err.stack ?? err}\n`);
    });
    page.on('websocket', (ws) => {
      log.write(`${new Date().toISOString()} websocket open ${ws.url()}\n`);
      ws.on('close', () => log.write(`${new Date().toISOString()} websocket closed ${ws.url()}\n`));
    });
    this.pages.push(page);
    await page.goto(url, { waitUntil: 'load', timeout: 15000 });
    await until(page, () => window.ferrocast !== undefined, undefined, 10000, 'the dashboard to create window.ferrocast');
    return page;
  }

  async screenshot(page, file) {
    await page.screenshot({ path: path.join(ARTIFACTS, file) });
  }

  async run(fn) {
    try {
      await fn(this);
      for (const page of this.pages) {
        assert.deepEqual(page.errors.map(String), [], 'no uncaught exception in the page');
      }
    } catch (err) {
      for (const [i, page] of this.pages.entries()) {
        await page
          .screenshot({ path: path.join(ARTIFACTS, `${this.name}-failure${i ? `-${i}` : ''}.png`), timeout: 5000 })
          .catch(() => {});
      }
      throw err;
    } finally {
      for (const fn of this.cleanups.reverse()) {
        try {
          await fn();
        } catch (err) {
          console.error(`cleanup of ${this.name} failed:`, err);
        }
      }
    }
  }
}

const scenario = (name, fn) => new Scope(name).run(fn);

// ---------------------------------------------------------------------------------------------
// Page helpers

/** Waits for `fn(arg)` to be truthy in the page; on timeout says what and shows the client's state. */
async function until(page, fn, arg, timeout, what) {
  try {
    return await page.waitForFunction(fn, arg, { timeout, polling: 50 });
  } catch (err) {
    const state = await page
      .evaluate(() => ({
        status: document.querySelector('#status')?.dataset.state,
        text: document.querySelector('#status-text')?.textContent,
        stats: window.ferrocast?.stats(),
        events: [...document.querySelectorAll('#events li')].slice(0, 8).map((li) => li.textContent),
      }))
      .catch(() => 'unavailable');
    throw new Error(`timed out after ${timeout} ms waiting for ${what}; page: ${JSON.stringify(state)}\n${err.message}`);
  }
}

const statusIs = (page, states, timeout, what) =>
  until(page, (s) => s.includes(document.querySelector('#status').dataset.state), states, timeout, what ?? `#status in ${states}`);

const text = (page, selector) => page.locator(selector).first().textContent();

let priceWaits = 0;

/**
 * Waits until a price the ticker table showed changes: the first price each row shows
 * (whenever it arrives) is its baseline, and any row moving off its baseline ends the wait.
 * Every row counts, also one that gets its first price after the wait began: after a restart
 * only the few symbols that traded just then have a price, and waiting on those alone would
 * wait on whether one rarely traded symbol trades again. Returns `{sym, from, to}`.
 */
async function waitForPriceChange(page, timeout = 10000) {
  const key = `__prices${(priceWaits += 1)}`;
  const change = await until(
    page,
    ({ key, dash }) => {
      const baseline = (window[key] ??= {});
      for (const tr of document.querySelectorAll('#tickers tr[data-sym]')) {
        const sym = tr.dataset.sym;
        const now = tr.querySelector('td.last').textContent;
        if (now === dash) continue;
        if (baseline[sym] === undefined) baseline[sym] = now;
        else if (baseline[sym] !== now) return { sym, from: baseline[sym], to: now };
      }
      return false;
    },
    { key, dash: '–' },
    timeout,
    'a ticker price to change',
  ).then((handle) => handle.jsonValue());
  assert.notEqual(change.from, change.to, JSON.stringify(change));
  assert.match(change.to, /\d/, `a price: ${JSON.stringify(change)}`);
  return change;
}

/**
 * Subscribes the page to `channel` through window.ferrocast and records, in window.__t, every
 * message (data, offset, epoch), every gap event and every state change.
 */
function watchChannel(page, channel) {
  return page.evaluate((channel) => {
    const t = { msgs: [], gaps: [], states: [] };
    window.__t = t;
    window.ferrocast.on('gap', (gap) => t.gaps.push(gap));
    window.ferrocast.on('state', (state, detail) => t.states.push({ state, detail, at: Date.now() }));
    window.ferrocast.subscribe(channel, (data, meta) => t.msgs.push({ data, offset: meta.offset, epoch: meta.epoch }));
  }, channel);
}

const recorded = (page) => page.evaluate(() => window.__t);

const waitForMessages = (page, count, timeout, what) =>
  until(page, (n) => window.__t.msgs.length >= n, count, timeout, what ?? `${count} messages on the test channel`);

// ---------------------------------------------------------------------------------------------
// Server helpers (straight to a server, never through the page)

async function getJson(url) {
  const r = await fetch(url);
  assert.equal(r.status, 200, `GET ${url}`);
  return r.json();
}

async function channelInfo(server, channel) {
  const { channels } = await getJson(`${server.url}/api/channels`);
  return channels.find((c) => c.channel === channel);
}

/** Waits until the server counts `n` subscribers on `channel`. */
const waitForSubscribers = (server, channel, n, ms = 10000) =>
  waitFor(async () => (await channelInfo(server, channel))?.subscribers === n, ms, `${n} subscriber(s) on ${channel}`);

/** Publishes `{n}` for each n in `numbers` in one request; returns the result entries. */
async function publishNumbers(server, channel, numbers) {
  const r = await fetch(`${server.url}/api/publish`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ messages: numbers.map((n) => ({ channel, data: { n } })) }),
  });
  const body = await r.json();
  assert.equal(r.status, 200, JSON.stringify(body));
  assert.equal(body.results.length, numbers.length);
  return body.results;
}

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

// ---------------------------------------------------------------------------------------------

describe('the dashboard in headless Chromium', { skip }, () => {
  before(async () => {
    mkdirSync(ARTIFACTS, { recursive: true });
    browser = await launchChromium();
  });

  after(async () => {
    await browser?.close();
  });

  test('1. the page goes live: green status, changing prices, candles, stats and feeds', { timeout: 60000 }, () =>
    scenario('01-live', async (s) => {
      const server = await s.simulating(SYMBOLS);
      const page = await s.page(`${server.url}/?interval=1s`);
      await statusIs(page, ['connected'], 10000);
      assert.equal(await text(page, '#status-text'), 'live');
      assert.equal(await text(page, '#transport'), 'websocket');
      assert.equal(await page.evaluate(() => window.ferrocast.transport), 'websocket');

      // One row per symbol, in order, and prices move.
      await until(page, (n) => document.querySelectorAll('#tickers tr[data-sym]').length === n, SYMBOLS.length, 10000, 'a row per symbol');
      assert.deepEqual(await page.locator('#tickers tr[data-sym]').evaluateAll((trs) => trs.map((tr) => tr.dataset.sym)), SYMBOLS);
      assert.ok(await page.locator('#tickers-empty').isHidden());
      await waitForPriceChange(page);

      // The 1-second chart of the first symbol: bars are there and new ones keep closing.
      assert.equal(await text(page, '#chart-interval'), '1-second');
      assert.equal(await text(page, '#chart-symbol'), SYMBOLS[0]);
      await until(page, () => Number(document.querySelector('#chart').dataset.bars) > 0, undefined, 10000, 'the first candles');
      // The server backfills 300 bars of past per channel at startup, so the chart is full at once.
      const bars0 = Number(await page.locator('#chart').getAttribute('data-bars'));
      assert.ok(bars0 >= 200, `the backfilled past is drawn at once (${bars0} bars)`);
      const last0 = Number(await page.locator('#chart').getAttribute('data-last-start'));
      await until(page, (n) => Number(document.querySelector('#chart').dataset.lastStart) >= n, last0 + 2000, 10000, 'two more 1-second candles');
      assert.ok(await page.locator('#chart-status').isHidden(), 'the "waiting for candles" note is gone');
      const inked = await page.evaluate(() => {
        const canvas = document.querySelector('#chart');
        const { data } = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height);
        let n = 0;
        for (let i = 3; i < data.length; i += 4) if (data[i] > 0) n += 1;
        return n;
      });
      assert.ok(inked > 1000, `the canvas has candles drawn on it (${inked} painted pixels)`);

      // Link figures, server stats (needs two polls for the rate) and the feed list.
      await until(page, () => /^\d+(\.\d)? ms$/.test(document.querySelector('#rtt').textContent), undefined, 10000, 'an RTT');
      const quality = Number(await text(page, '#quality'));
      assert.ok(quality >= 50 && quality <= 100, `quality ${quality}`);
      assert.notEqual(await page.locator('#quality').getAttribute('data-level'), 'none');
      await until(page, () => Number(document.querySelector('#stats-rate').textContent.replace(/\D/g, '')) > 0, undefined, 10000, 'a message rate');
      assert.equal(await text(page, '#stats-connections'), '1');
      await until(page, () => document.querySelector('#feeds li[data-feed="sim"]')?.dataset.state === 'live', undefined, 10000, 'the simulator feed, live');

      await s.screenshot(page, '01-live.png');

      // The default page charts 1-minute candles (the forming bar shows at once).
      await page.goto(`${server.url}/`, { waitUntil: 'load' });
      await statusIs(page, ['connected'], 10000);
      assert.equal(await text(page, '#chart-interval'), '1-minute');
      await until(page, () => Number(document.querySelector('#chart').dataset.bars) > 0, undefined, 10000, 'a 1-minute candle');
    }));

  test('2. a server restart: the page reconnects by itself and reports the lost history as a gap', { timeout: 60000 }, () =>
    scenario('02-restart', async (s) => {
      const first = await s.server();
      const page = await s.page(first.url);
      await statusIs(page, ['connected'], 10000);
      await watchChannel(page, 'chat.test');
      await waitForSubscribers(first, 'chat.test', 1);
      const before = await publishNumbers(first, 'chat.test', [1, 2, 3]);
      await waitForMessages(page, 3, 5000);

      // SIGTERM: a graceful drain (1001 with a reconnect hint), then the process exits.
      assert.equal(await first.stop(), 0, 'the first server drained and exited cleanly');
      await statusIs(page, ['reconnecting', 'connecting'], 5000, 'the page to notice the restart');
      const second = await s.server({ port: first.port, name: '02-restart-second' });

      await statusIs(page, ['connected'], 20000, 'the page to reconnect to the new server by itself');
      await until(page, () => window.__t.gaps.some((g) => g.channel === 'chat.test'), undefined, 10000, 'a gap on chat.test');
      await waitForSubscribers(second, 'chat.test', 1);
      const after = await publishNumbers(second, 'chat.test', [4, 5, 6]);
      await waitForMessages(page, 6, 5000);

      const t = await recorded(page);
      assert.deepEqual(t.msgs.map((m) => m.data.n), [1, 2, 3, 4, 5, 6], 'every message, before and after, once and in order');
      const [e1, e2] = [before[0].epoch, after[0].epoch];
      assert.notEqual(e1, e2, 'the restarted server started a new epoch');
      assert.deepEqual(t.msgs.map((m) => m.epoch), [e1, e1, e1, e2, e2, e2]);
      assert.deepEqual(t.msgs.map((m) => m.offset), [1, 2, 3, 1, 2, 3]);
      const gaps = t.gaps.filter((g) => g.channel === 'chat.test');
      assert.equal(gaps.length, 1, JSON.stringify(t.gaps));
      assert.ok(['not_recovered', 'epoch'].includes(gaps[0].reason), JSON.stringify(gaps[0]));
      assert.equal(gaps[0].previousEpoch, e1);
      assert.equal(gaps[0].epoch, e2);
      // The drain hint was followed: the first close was 1001 with {"reconnect":true,...}.
      const closed = t.states.find((x) => x.state === 'reconnecting');
      assert.equal(closed.detail.code, 1001, JSON.stringify(closed));
      assert.equal(JSON.parse(closed.detail.reason).reconnect, true);

      // The page itself says what happened and is live again.
      assert.equal(await text(page, '#status-text'), 'live');
      const warnings = await page.locator('#events li[data-kind="warn"]').allTextContents();
      assert.ok(warnings.some((w) => w.includes('missed messages')), `the event log reports the gap: ${warnings}`);
      await waitForPriceChange(page);
      await s.screenshot(page, '02-restarted.png');
    }));

  test('3. a dropped connection (nginx stopped and started): missed messages arrive once, in order, no gap', { timeout: 60000 }, () =>
    scenario('03-proxy-drop', async (s) => {
      const server = await s.simulating(SYMBOLS);
      const nginx = await s.nginx({ upstream: server, upgrade: true });
      const page = await s.page(nginx.url);
      await statusIs(page, ['connected'], 10000);
      assert.equal(await text(page, '#transport'), 'websocket');
      await watchChannel(page, 'chat.recover');
      await waitForSubscribers(server, 'chat.recover', 1);
      await publishNumbers(server, 'chat.recover', [1, 2, 3]);
      await waitForMessages(page, 3, 5000);
      const gapsBefore = (await page.evaluate(() => window.ferrocast.stats())).gaps;

      // The proxy goes away: the page's WebSocket is cut while the server keeps running.
      await nginx.stop();
      await statusIs(page, ['reconnecting'], 5000, 'the page to lose its connection');
      await waitForSubscribers(server, 'chat.recover', 0);
      const N = 25;
      const missed = await publishNumbers(server, 'chat.recover', range(4, 3 + N));
      assert.deepEqual(missed.map((r) => r.offset), range(4, 3 + N));
      await nginx.start();

      await statusIs(page, ['connected', 'fallback'], 20000, 'the page to reconnect through nginx');
      await waitForMessages(page, 3 + N, 10000, 'the missed messages');
      // One more, live: a replayed duplicate would have arrived before it.
      await publishNumbers(server, 'chat.recover', [4 + N]);
      await waitForMessages(page, 4 + N, 5000, 'the live message after the replay');

      const t = await recorded(page);
      assert.deepEqual(t.msgs.map((m) => m.data.n), range(1, 4 + N), 'every message exactly once, in order');
      assert.deepEqual(t.msgs.map((m) => m.offset), range(1, 4 + N));
      assert.equal(new Set(t.msgs.map((m) => m.epoch)).size, 1);
      assert.deepEqual(t.gaps, [], 'no gap on any channel');
      const stats = await page.evaluate(() => window.ferrocast.stats());
      assert.equal(stats.gaps, gapsBefore);
      assert.ok(stats.reconnects >= 1, `the client counted the lost connection: ${stats.reconnects}`);
      assert.ok(t.states.some((x) => x.state === 'reconnecting'));
      await waitForPriceChange(page);
      await s.screenshot(page, '03-recovered.png');
    }));

  test('4. WebSocket blocked by the proxy: the page falls back to SSE and keeps updating', { timeout: 60000 }, () =>
    scenario('04-sse-fallback', async (s) => {
      const server = await s.simulating(SYMBOLS);
      const nginx = await s.nginx({ upstream: server, upgrade: false });
      const page = await s.page(nginx.url);

      await statusIs(page, ['fallback'], 20000, 'the SSE fallback');
      assert.equal(await text(page, '#transport'), 'sse');
      assert.equal(await text(page, '#status-text'), 'live (SSE fallback)');
      // The upgrades really were refused (426 from ferrocast: no Upgrade header got through).
      assert.match(nginx.accessLog(), /"GET \/ws HTTP\/1\.1" 426 /);
      const { connections } = await getJson(`${server.url}/api/stats`);
      assert.deepEqual(connections, { socketio: 0, sse: 1, ws: 0 });

      await waitForPriceChange(page);
      await until(page, () => Number(document.querySelector('#chart').dataset.bars) > 0, undefined, 10000, 'candles over SSE');
      // Subscribing later works over SSE too (through /sse/control).
      await watchChannel(page, 'chat.sse');
      await waitForSubscribers(server, 'chat.sse', 1);
      await publishNumbers(server, 'chat.sse', [1, 2]);
      await waitForMessages(page, 2, 5000);
      assert.deepEqual((await recorded(page)).msgs.map((m) => m.data.n), [1, 2]);
      assert.equal(await page.evaluate(() => window.ferrocast.state), 'fallback');
      await s.screenshot(page, '04-sse-fallback.png');
    }));

  test('5. the Retry button reconnects at once: after a terminal close and during a long backoff', { timeout: 60000 }, () =>
    scenario('05-retry', async (s) => {
      const port = await freePort();
      // An origin allowlist without this page: its WebSocket is closed with 1008, a terminal code.
      const refusing = await s.server({ port, sets: ['server.allowed_origins=["https://elsewhere.example"]'], name: '05-retry-refusing' });
      const page = await s.page(refusing.url);
      await statusIs(page, ['disconnected'], 10000, 'the terminal close');
      let stats = await page.evaluate(() => ({ detail: window.ferrocast.stateDetail, timers: window.ferrocast.stats().timers }));
      assert.equal(stats.detail.code, 1008, JSON.stringify(stats));
      assert.equal(stats.timers, 0, 'nothing scheduled: the client would not reconnect by itself');
      assert.match(await text(page, '#status-text'), /^disconnected/);

      // A server that accepts the page, on the same port; drains hint a 30-60 s wait.
      await refusing.stop();
      const accepting = await s.server({ port, sets: ['server.reconnect_after_ms=30000'], name: '05-retry-accepting' });
      stats = await page.evaluate(() => ({ state: window.ferrocast.state, timers: window.ferrocast.stats().timers }));
      assert.deepEqual(stats, { state: 'disconnected', timers: 0 });
      let clicked = Date.now();
      await page.click('#retry');
      await statusIs(page, ['connected'], 5000, 'the retry to connect');
      assert.ok(Date.now() - clicked < 5000);
      const events = await page.locator('#events li').allTextContents();
      assert.ok(events.some((e) => e.includes('manual retry')), `the retry is logged: ${events}`);

      // A drain: the page is told to come back in 30-60 s. A new server is up long before.
      await accepting.stop();
      await statusIs(page, ['reconnecting'], 5000, 'the drain');
      const detail = await page.evaluate(() => window.ferrocast.stateDetail);
      assert.equal(detail.code, 1001, JSON.stringify(detail));
      assert.ok(detail.delayMs >= 30000, `the drain hint sets a long delay: ${JSON.stringify(detail)}`);
      await s.server({ port, name: '05-retry-again' });
      assert.equal(await page.evaluate(() => window.ferrocast.state), 'reconnecting', 'still waiting out the backoff');
      clicked = Date.now();
      await page.click('#retry');
      await statusIs(page, ['connected'], 5000, 'the retry to connect');
      const took = Date.now() - clicked;
      assert.ok(took < detail.delayMs / 6, `reconnected ${took} ms after the click, not after the ${detail.delayMs} ms backoff`);
      assert.equal(await text(page, '#transport'), 'websocket');
      await waitForPriceChange(page);
      await s.screenshot(page, '05-retried.png');
    }));

  test('6. 100 subscribe/dispose cycles leave no listener, subscription or socket behind', { timeout: 60000 }, () =>
    scenario('06-cycles', async (s) => {
      // 200 requests in a burst, faster than a person clicks: off the default request budget.
      const server = await s.simulating(SYMBOLS, { sets: ['limits.commands_per_s=0'] });
      const page = await s.page(server.url);
      await statusIs(page, ['connected'], 10000);
      // Let the page settle: its rows and chart subscribed, nothing in flight.
      await until(page, () => document.querySelectorAll('#tickers tr[data-sym]').length > 0, undefined, 10000, 'the ticker rows');
      await until(page, () => document.querySelector('#chart-symbol').textContent !== '–', undefined, 10000, 'the chart symbol');
      const keys = ['channels', 'listeners', 'serverSubscriptions', 'pendingRequests', 'queued', 'eventListeners', 'timers'];
      const counts = (keys) =>
        page.evaluate((keys) => {
          const st = window.ferrocast.stats();
          return Object.fromEntries(keys.map((k) => [k, st[k]]));
        }, keys);
      await until(page, () => window.ferrocast.stats().pendingRequests === 0, undefined, 5000, 'no request in flight');
      const baseline = await counts(keys);
      assert.ok(baseline.channels > 0 && baseline.serverSubscriptions === baseline.channels, JSON.stringify(baseline));
      const serverBefore = await getJson(`${server.url}/api/stats`);
      assert.deepEqual(serverBefore.connections, { socketio: 0, sse: 0, ws: 1 });

      // Each cycle: subscribe, wait for the server's ack, publish through the page and receive
      // it, dispose, wait for the unsubscribe's ack.
      const received = await page.evaluate(async () => {
        const fc = window.ferrocast;
        const tick = () => new Promise((resolve) => setTimeout(resolve, 0));
        const settled = async (what) => {
          const deadline = Date.now() + 5000;
          while (fc.stats().pendingRequests > 0) {
            if (Date.now() > deadline) throw new Error(`no reply to ${what}`);
            await new Promise((resolve) => setTimeout(resolve, 2));
          }
        };
        const got = [];
        const peak = { channels: 0, serverSubscriptions: 0 };
        for (let i = 0; i < 100; i++) {
          let arrived;
          const seen = new Promise((resolve) => (arrived = resolve));
          const dispose = fc.subscribe('chat.cycle', (data) => {
            got.push(data.i);
            if (data.i === i) arrived();
          });
          await tick();
          await settled(`subscribe ${i}`);
          peak.channels = Math.max(peak.channels, fc.stats().channels);
          peak.serverSubscriptions = Math.max(peak.serverSubscriptions, fc.stats().serverSubscriptions);
          await fc.publish('chat.cycle', { i });
          await Promise.race([seen, new Promise((_, reject) => setTimeout(() => reject(new Error(`message ${i} not received`)), 5000))]);
          dispose();
          dispose(); // idempotent
          await tick();
          await settled(`unsubscribe ${i}`);
        }
        return { got, peak };
      });
      assert.deepEqual(received.got, range(0, 99), 'each cycle received its own message, once');
      assert.equal(received.peak.channels, baseline.channels + 1, 'the cycles did subscribe');
      assert.equal(received.peak.serverSubscriptions, baseline.serverSubscriptions + 1);

      // The client's collections are back where they were (timers may be mid-rearm: wait briefly).
      await until(
        page,
        ({ keys, baseline }) => {
          const st = window.ferrocast.stats();
          return keys.every((k) => st[k] === baseline[k]);
        },
        { keys, baseline },
        5000,
        `client counts back to ${JSON.stringify(baseline)}`,
      );
      assert.deepEqual(await counts(keys), baseline);

      // The server still sees one WebSocket, the same subscriptions, none on chat.cycle.
      const serverAfter = await getJson(`${server.url}/api/stats`);
      assert.deepEqual(serverAfter.connections, { socketio: 0, sse: 0, ws: 1 }, 'no extra socket');
      assert.equal(serverAfter.subscriptions, serverBefore.subscriptions);
      const cycle = await channelInfo(server, 'chat.cycle');
      assert.equal(cycle?.subscribers, 0, JSON.stringify(cycle));
      assert.equal(cycle.offset, 100, 'the 100 publishes went through');
      assert.equal(await page.evaluate(() => window.ferrocast.stats().reconnects), 0, 'one connection all along');
      await s.screenshot(page, '06-cycles.png');
    }));
});
