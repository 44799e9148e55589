// @ferrocast/react (clients/react) with React and react-dom from npm, bundled by esbuild with
// the real client (clients/js), in a real headless Chromium against a real `ferrocast serve`:
//
//   1. useChannel shows values published through POST /api/publish; components on one channel
//      share one server subscription; a late reader gets the latest value at once; a provider
//      given a client leaves it open when it unmounts;
//   2. under StrictMode (double-invoked effects, development build): one WebSocket, one
//      subscription per channel, each message handled once per component;
//   3. 50 mount/unmount cycles of four components on three channels: the client's listeners,
//      channels and event listeners, and the server's subscriber counts, go back to zero;
//   4. useConnectionState and the channel statuses follow a server stop and restart;
//   5. without a browser: server rendering (as in Next.js) creates no client and renders
//      `connecting`; `npm pack` ships index.js, index.d.ts and the README;
//   6. the README's five-line quick start, bundled as written (JSX), shows a live price.
//
// The page comes from its own small web server on another port, as a Next.js app would, and
// the client connects cross-origin to the gateway. Screenshots and the page console go to
// e2e/artifacts/react/.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createServer } from 'node:http';
import { createWriteStream, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { build } from 'esbuild';
import { chromiumMissing, launchChromium } from './lib/browser.mjs';
import { Ferrocast, REPO_ROOT, freePort, waitFor } from './lib/server.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ARTIFACTS = path.join(REPO_ROOT, 'e2e', 'artifacts', 'react');
const CLIENT_JS = path.join(REPO_ROOT, 'clients', 'js', 'ferrocast.js');
const REACT_DIR = path.join(REPO_ROOT, 'clients', 'react');
const PAGE = '<!doctype html><meta charset="utf-8"><title>react</title><div id="root"></div><script type="module" src="/app.js"></script>';
const FAST = ['server.ping_interval_ms=1000', 'server.reconnect_after_ms=200'];

/**
 * Bundles `entry` the way an application would consume the packages from npm: the package
 * names resolve to the in-repo sources (esbuild's alias), and bare imports in those sources
 * (`react`) resolve from this suite's node_modules, so there is exactly one React.
 */
async function bundle(entry, { platform = 'browser', jsx } = {}) {
  const result = await build({
    entryPoints: [entry],
    ...(jsx && { jsx }),
    bundle: true,
    format: 'esm',
    platform,
    write: false,
    logLevel: 'silent',
    alias: { '@ferrocast/client': CLIENT_JS, '@ferrocast/react': path.join(REACT_DIR, 'index.js') },
    nodePaths: [path.join(HERE, 'node_modules')],
    // The development build: StrictMode double-invokes effects only there.
    define: { 'process.env.NODE_ENV': '"development"' },
    // React's CommonJS builds require Node built-ins; an ES module bundle needs a require for them.
    banner: platform === 'node' ? { js: "import { createRequire } from 'node:module'; const require = createRequire(import.meta.url);" } : undefined,
  });
  return result.outputFiles[0].text;
}

const children = new Set();
process.on('exit', () => {
  for (const child of children) child.kill('SIGKILL');
});

async function startServer(opts = {}) {
  const server = await Ferrocast.start({ ...opts, sets: [...FAST, ...(opts.sets ?? [])], name: `react-${opts.name ?? 'test'}` });
  children.add(server.proc);
  server.proc.on('exit', () => children.delete(server.proc));
  return server;
}

async function getJson(url) {
  const r = await fetch(url);
  assert.equal(r.status, 200, `GET ${url}`);
  return r.json();
}

/** Channel -> subscribers, from GET /api/channels. */
async function subscribers(server) {
  const { channels } = await getJson(`${server.url}/api/channels`);
  return Object.fromEntries(channels.map((c) => [c.channel, c.subscribers]));
}

const skip = chromiumMissing();

describe('@ferrocast/react in Chromium', { skip }, () => {
  let browser;
  let site;
  let http;
  // Further pages a test adds: path -> [content type, body].
  const routes = new Map();

  before(async () => {
    mkdirSync(ARTIFACTS, { recursive: true });
    const appJs = await bundle(path.join(HERE, 'lib', 'react-app.js'));
    // The app's own web server (a Next.js app would be one): the page and its bundle, nothing else.
    http = createServer((req, res) => {
      const { pathname } = new URL(req.url, 'http://x');
      if (pathname === '/app.js') res.writeHead(200, { 'content-type': 'text/javascript' }).end(appJs);
      else if (pathname === '/') res.writeHead(200, { 'content-type': 'text/html' }).end(PAGE);
      else if (routes.has(pathname)) res.writeHead(200, { 'content-type': routes.get(pathname)[0] }).end(routes.get(pathname)[1]);
      else res.writeHead(404).end();
    });
    await new Promise((resolve) => http.listen(0, '127.0.0.1', resolve));
    site = `http://127.0.0.1:${http.address().port}`;
    browser = await launchChromium();
  });

  after(async () => {
    await browser?.close();
    await new Promise((resolve) => http?.close(resolve));
  });

  /** A page running the React app, served from its own origin, for the gateway `server`; `strict` wraps it in StrictMode. */
  async function open(t, server, { strict = false } = {}) {
    const context = await browser.newContext();
    t.after(() => context.close().catch(() => {}));
    const page = await context.newPage();
    const name = t.name.replace(/[^a-z0-9]+/gi, '-').slice(0, 40);
    const log = createWriteStream(path.join(ARTIFACTS, `${name}.console.log`));
    log.on('error', () => {});
    t.after(() => new Promise((resolve) => log.end(resolve)));
    page.errors = [];
    page.sockets = [];
    page.on('console', (m) => log.write(`${m.type()}: ${m.text()}\n`));
    page.on('pageerror', (err) => {
      page.errors.push(String(err));
      log.write(`pageerror: ${err.stack ?? err}\n`);
    });
    page.on('websocket', (ws) => page.sockets.push(ws.url()));
    t.after(async () => {
      if (t.passed === false) await page.screenshot({ path: path.join(ARTIFACTS, `${name}-failure.png`) }).catch(() => {});
    });
    await page.goto(`${site}/?gateway=${encodeURIComponent(server.url)}${strict ? '&strict' : ''}`, { waitUntil: 'load' });
    await page.waitForFunction(() => window.harness && window.fc, null, { timeout: 10000, polling: 50 });
    return page;
  }

  const render = (page, tree) => page.evaluate((tree) => window.harness.render(tree), tree);
  const panels = (page) => page.evaluate(() => window.harness.panels());
  const untilPanels = (page, fn, arg, what, timeout = 5000) =>
    page
      .waitForFunction(fn, arg, { timeout, polling: 25 })
      .catch(async (err) => {
        throw new Error(`${what}: ${JSON.stringify(await panels(page))} ${err.message}`);
      });
  const allLive = (page, n) =>
    untilPanels(
      page,
      (n) => {
        const shown = Object.values(window.harness.panels());
        return shown.length === n && shown.every((p) => p.status === 'live');
      },
      n,
      `${n} live panels`,
    );
  const stats = (page) => page.evaluate(() => window.fc.stats());

  test('1. useChannel shows published values; one channel, one subscription; a late reader sees the latest value', { timeout: 30000 }, async (t) => {
    const server = await startServer({ name: 'values' });
    t.after(() => server.stop());
    const page = await open(t, server);
    await render(page, { panels: [{ id: 'a1', channel: 'react.a' }, { id: 'a2', channel: 'react.a' }, { id: 'b', channel: 'react.b' }] });
    await allLive(page, 3);
    assert.deepEqual(await page.locator('#conn').getAttribute('data-state'), 'connected');
    assert.deepEqual(Object.values(await panels(page)).map((p) => p.text), ['', '', ''], 'nothing published yet');

    await server.publish('react.a', { price: 101.5 });
    await server.publish('react.b', { price: 7 });
    await untilPanels(page, () => window.harness.panels().a2?.text === '{"price":101.5}' && window.harness.panels().b?.text === '{"price":7}', null, 'the first values');
    await server.publish('react.a', { price: 102 });
    await untilPanels(page, () => window.harness.panels().a1?.text === '{"price":102}', null, 'the second value');
    const shown = await panels(page);
    assert.equal(shown.a1.text, shown.a2.text, 'both readers of react.a show the same latest value');
    assert.equal(await page.locator('[data-panel="a1"]').getAttribute('data-offset'), '2');
    const log = await page.evaluate(() => window.harness.log.messages);
    assert.deepEqual(log.a1, [{ price: 101.5 }, { price: 102 }], 'onMessage once per message');
    assert.deepEqual(log.a2, [{ price: 101.5 }, { price: 102 }]);
    assert.deepEqual(log.b, [{ price: 7 }]);

    const subs = await subscribers(server);
    assert.equal(subs['react.a'], 1, 'two components, one server subscription');
    assert.equal(subs['react.b'], 1);
    const st = await stats(page);
    assert.equal(st.channels, 2);
    assert.equal(st.listeners, 2, 'one client listener per channel, shared by its components');

    // A component mounted later on react.a shows the latest value without a new publish.
    await render(page, { panels: [{ id: 'a1', channel: 'react.a' }, { id: 'a2', channel: 'react.a' }, { id: 'b', channel: 'react.b' }, { id: 'late', channel: 'react.a' }] });
    const late = (await panels(page)).late;
    assert.deepEqual(late, { status: 'live', text: '{"price":102}', channel: 'react.a' }, 'the first render of the late reader has the value');

    // A provider given a client shares it and does not close it when it unmounts.
    const external = await page.evaluate(async () => {
      const client = new window.harness.Ferrocast({ url: window.harness.gateway });
      window.externalClient = client;
      window.harness.render({ external: true, panels: [{ id: 'x', channel: 'react.b' }] });
      return true;
    });
    assert.ok(external);
    await allLive(page, 1);
    await server.publish('react.b', { price: 8 });
    await untilPanels(page, () => window.harness.panels().x?.text === '{"price":8}', null, 'a value through the given client');
    assert.equal(await page.evaluate(() => window.fc === window.externalClient), true, 'the provider handed out the given client');
    await page.evaluate(() => window.harness.render({ unmounted: true }));
    await page.waitForFunction(() => window.externalClient.stats().listeners === 0, null, { timeout: 5000 });
    assert.equal(await page.evaluate(() => window.externalClient.state), 'connected', 'the provider left the given client open');
    assert.deepEqual(page.errors, []);
  });

  test('2. StrictMode: one WebSocket, one subscription per channel, each message handled once', { timeout: 30000 }, async (t) => {
    const server = await startServer({ name: 'strict' });
    t.after(() => server.stop());
    const page = await open(t, server, { strict: true });
    assert.equal(await page.evaluate(() => window.harness.strict), true);
    await render(page, { panels: [{ id: 's1', channel: 'react.strict' }, { id: 's2', channel: 'react.strict' }, { id: 'o', channel: 'react.other' }] });
    await allLive(page, 3);
    await server.publish('react.strict', { n: 1 });
    await server.publish('react.other', { n: 2 });
    await untilPanels(page, () => window.harness.panels().s2?.text === '{"n":1}' && window.harness.panels().o?.text === '{"n":2}', null, 'the values');

    assert.equal(page.sockets.length, 1, `one WebSocket despite double-invoked effects: ${page.sockets}`);
    assert.deepEqual((await getJson(`${server.url}/api/stats`)).connections, { socketio: 0, sse: 0, ws: 1 });
    const subs = await subscribers(server);
    assert.equal(subs['react.strict'], 1);
    assert.equal(subs['react.other'], 1);
    const { messages, clients } = await page.evaluate(() => ({ messages: window.harness.log.messages, clients: window.harness.log.clients.length }));
    assert.deepEqual(messages, { s1: [{ n: 1 }], s2: [{ n: 1 }], o: [{ n: 2 }] }, 'no doubled onMessage');
    assert.equal(clients, 1, 'the provider handed out one client');
    const st = await stats(page);
    assert.equal(st.listeners, 2);
    assert.equal(st.reconnects, 0);

    await render(page, { panels: [] });
    await page.waitForFunction(() => window.fc.stats().listeners === 0 && window.fc.stats().channels === 0, null, { timeout: 5000 });
    await waitFor(async () => {
      const s = await subscribers(server);
      return s['react.strict'] === 0 && s['react.other'] === 0;
    }, 5000, 'the server subscriptions to end');
    assert.deepEqual(page.errors, []);
  });

  test('3. 50 mount/unmount cycles leave no subscription or listener, in the client and on the server', { timeout: 60000 }, async (t) => {
    const server = await startServer({ name: 'cycles' });
    t.after(() => server.stop());
    const page = await open(t, server, { strict: true });
    // The baseline of a connected client (its heartbeat timer included), not of one connecting.
    await page.waitForFunction(() => window.fc.stats().state === 'connected', null, { timeout: 10000 });
    const baseline = await stats(page);
    assert.equal(baseline.channels, 0);
    const cyclePanels = [
      { id: 'a1', channel: 'react.cycle.a' },
      { id: 'a2', channel: 'react.cycle.a' },
      { id: 'b', channel: 'react.cycle.b' },
      { id: 'c', channel: 'react.cycle.c' },
    ];
    // One cycle by hand first, to see the peak.
    await render(page, { panels: cyclePanels });
    await allLive(page, 4);
    const peak = await stats(page);
    assert.deepEqual([peak.channels, peak.listeners, peak.confirmedSubscriptions], [3, 3, 3], JSON.stringify(peak));
    assert.ok(peak.eventListeners > baseline.eventListeners, 'the channel stores listen to client events');
    const peakServer = await subscribers(server);
    assert.deepEqual(['react.cycle.a', 'react.cycle.b', 'react.cycle.c'].map((c) => peakServer[c]), [1, 1, 1]);
    await render(page, { panels: [] });

    const live = await page.evaluate((p) => window.harness.cycle(50, p), cyclePanels);
    assert.equal(live, 200, 'every component of every cycle went live');

    const keys = ['channels', 'listeners', 'serverSubscriptions', 'confirmedSubscriptions', 'pendingRequests', 'eventListeners', 'timers'];
    await page
      .waitForFunction(
        ({ keys, baseline }) => {
          const st = window.fc.stats();
          return keys.every((k) => st[k] === baseline[k]);
        },
        { keys, baseline },
        { timeout: 5000, polling: 25 },
      )
      .catch(async () => assert.fail(`client counts not back to the baseline: ${JSON.stringify(await stats(page))} vs ${JSON.stringify(baseline)}`));
    const end = await stats(page);
    for (const k of keys) assert.equal(end[k], baseline[k], k);
    assert.equal(end.listeners, 0);
    assert.equal(end.channels, 0);
    await waitFor(async () => {
      const s = await subscribers(server);
      // A channel never published to is forgotten once its last subscriber leaves.
      return ['react.cycle.a', 'react.cycle.b', 'react.cycle.c'].every((c) => (s[c] ?? 0) === 0);
    }, 5000, 'zero subscribers on the cycle channels');
    assert.deepEqual((await getJson(`${server.url}/api/stats`)).connections, { socketio: 0, sse: 0, ws: 1 }, 'still one connection');
    assert.equal(end.reconnects, 0);
    assert.deepEqual(page.errors, []);
  });

  test('4. useConnectionState and channel statuses follow a server stop and restart', { timeout: 45000 }, async (t) => {
    const port = await freePort();
    let server = await startServer({ name: 'restart-1', port });
    t.after(() => server.stop());
    const page = await open(t, server);
    await render(page, { panels: [{ id: 'r', channel: 'react.restart' }] });
    await allLive(page, 1);
    await server.publish('react.restart', { v: 'before' });
    await untilPanels(page, () => window.harness.panels().r?.text === '{"v":"before"}', null, 'the value before the restart');
    assert.equal(await page.locator('#conn').getAttribute('data-state'), 'connected');

    await server.stop();
    await page.waitForFunction(() => document.querySelector('#conn').dataset.state === 'reconnecting', null, { timeout: 5000, polling: 25 });
    await untilPanels(page, () => window.harness.panels().r?.status === 'recovering', null, 'the panel to show recovering');
    assert.equal((await panels(page)).r.text, '{"v":"before"}', 'the last value stays on screen while recovering');

    server = await startServer({ name: 'restart-2', port });
    await page.waitForFunction(() => document.querySelector('#conn').dataset.state === 'connected', null, { timeout: 10000, polling: 25 });
    await allLive(page, 1);
    await server.publish('react.restart', { v: 'after' });
    await untilPanels(page, () => window.harness.panels().r?.text === '{"v":"after"}', null, 'the value after the restart');

    const log = await page.evaluate(() => window.harness.log);
    const states = log.states;
    assert.equal(states[states.indexOf('connected') + 1], 'reconnecting', `connected, then reconnecting: ${states}`);
    assert.equal(states.at(-1), 'connected', `${states}`);
    assert.ok(states.lastIndexOf('connected') > states.indexOf('reconnecting'), `${states}`);
    assert.deepEqual(log.statuses.r.filter((s) => s !== 'connecting'), ['live', 'recovering', 'live'], `statuses: ${log.statuses.r}`);
    assert.deepEqual(log.gaps.r, ['not_recovered'], 'the new server has a new epoch: onGap says so once');
    assert.deepEqual(log.messages.r, [{ v: 'before' }, { v: 'after' }]);
    assert.equal((await subscribers(server))['react.restart'], 1);
    assert.deepEqual(page.errors, []);
  });

  test('6. the README quick start, as written (JSX), shows a live price', { timeout: 30000 }, async (t) => {
    const readme = readFileSync(path.join(REACT_DIR, 'README.md'), 'utf8');
    const code = readme.slice(readme.indexOf('```jsx\n') + 7, readme.indexOf('```', readme.indexOf('```jsx\n') + 7));
    assert.equal(code.trim().split('\n').length, 5, `five lines:\n${code}`);
    const server = await startServer({ name: 'readme' });
    t.after(() => server.stop());
    mkdirSync(ARTIFACTS, { recursive: true });
    writeFileSync(path.join(ARTIFACTS, 'readme-app.jsx'), code.replace('https://push.example.com', server.url));
    const entry = path.join(ARTIFACTS, 'readme-entry.jsx');
    writeFileSync(entry, "import { createRoot } from 'react-dom/client';\nimport { App } from './readme-app.jsx';\ncreateRoot(document.getElementById('root')).render(<App />);\n");
    routes.set('/readme.js', ['text/javascript', await bundle(entry, { jsx: 'automatic' })]);
    routes.set('/readme', ['text/html', PAGE.replace('/app.js', '/readme.js')]);
    const context = await browser.newContext();
    t.after(() => context.close().catch(() => {}));
    const page = await context.newPage();
    const errors = [];
    page.on('pageerror', (err) => errors.push(String(err)));
    await page.goto(`${site}/readme`, { waitUntil: 'load' });
    await page.waitForFunction(() => document.querySelector('#root b')?.textContent === '–', null, { timeout: 10000, polling: 25 });
    await waitFor(async () => (await subscribers(server))['ticks.AAPL'] === 1, 10000, 'the subscription to ticks.AAPL');
    await server.publish('ticks.AAPL', { price: 231.25 });
    await page.waitForFunction(() => document.querySelector('#root b')?.textContent === '231.25', null, { timeout: 10000, polling: 25 });
    assert.deepEqual(errors, []);
  });
});

describe('@ferrocast/react without a browser', () => {
  test('5a. server rendering (Next.js) creates no client and renders connecting', { timeout: 30000 }, async () => {
    const entry = path.join(ARTIFACTS, 'ssr-entry.mjs');
    mkdirSync(ARTIFACTS, { recursive: true });
    writeFileSync(
      entry,
      `import { createElement as h } from 'react';
import { renderToString } from 'react-dom/server';
import { FerrocastProvider, useChannel, useConnectionState } from '@ferrocast/react';
function Price() {
  const { status, data } = useChannel('ticks.AAPL', { initialData: { price: 0 } });
  const { state } = useConnectionState();
  return h('p', null, status + ' ' + state + ' ' + data.price);
}
export const html = renderToString(h(FerrocastProvider, { url: 'http://127.0.0.1:1' }, h(Price)));
export let outside;
try { renderToString(h(Price)); } catch (err) { outside = err.message; }
`,
    );
    const code = await bundle(entry, { platform: 'node' });
    const out = path.join(ARTIFACTS, 'ssr-bundle.mjs');
    writeFileSync(out, code);
    const before = globalThis.WebSocket;
    let constructed = 0;
    globalThis.WebSocket = class {
      constructor() {
        constructed += 1;
      }
    };
    try {
      const { html, outside } = await import(pathToFileURL(out).href);
      assert.equal(html, '<p>connecting connecting 0</p>');
      assert.match(outside, /FerrocastProvider/);
      assert.equal(constructed, 0, 'no connection attempt while rendering on the server');
    } finally {
      globalThis.WebSocket = before;
    }
  });

  test('5b. npm pack ships index.js, index.d.ts, README.md and package.json', { timeout: 30000 }, () => {
    const report = JSON.parse(
      execFileSync('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: REACT_DIR, encoding: 'utf8', env: { ...process.env, npm_config_loglevel: 'silent' } }),
    )[0];
    assert.equal(report.name, '@ferrocast/react');
    assert.deepEqual(report.files.map((f) => f.path).sort(), ['README.md', 'index.d.ts', 'index.js', 'package.json']);
  });
});
