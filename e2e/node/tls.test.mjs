// TLS served by ferrocast itself ([server.tls]) with Node's clients and headless Chromium:
// - the `ws` package over wss:// trusting a private CA (made with openssl for the test);
// - node:http2 over https://: ALPN picks h2, many SSE streams share one connection, and a
//   WebSocket runs on an HTTP/2 stream (RFC 8441 extended CONNECT, spoken by hand: no Node
//   WebSocket library does it);
// - Chromium (trusting the certificate by its key, --ignore-certificate-errors-spki-list):
//   the page, ten EventSources and the native WebSocket all go over one HTTP/2 connection
//   (over plain HTTP/1.1 the same page gets only six streams: the browser's per-origin
//   limit), and socket.io-client's WebSocket runs over HTTP/2 too.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http2 from 'node:http2';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import WebSocket from 'ws';
import { CHROMIUM, CHROMIUM_ARGS, chromiumMissing } from './lib/browser.mjs';
import { issue, makeCa, spkiHash } from './lib/certs.mjs';
import { Ferrocast, Inbox, REPO_ROOT, freePort, waitFor } from './lib/server.mjs';
import { chromium } from 'playwright-core';

const pki = makeCa();
const tls = issue(pki);
const ca = readFileSync(tls.ca);

/** Parsed frames of one `ws` client, in an inbox. */
async function wsClient(url) {
  const ws = new WebSocket(url, { ca });
  const inbox = new Inbox();
  ws.on('message', (data) => inbox.push(JSON.parse(data.toString())));
  await new Promise((resolve, reject) => {
    ws.once('open', resolve);
    ws.once('error', reject);
  });
  return { ws, inbox };
}

async function nextOfType(inbox, type) {
  for (;;) {
    const frame = await inbox.next(5000, `a ${type}`);
    if (frame.type === type) return frame;
  }
}

/** An HTTP/2 session (node:http2) to the server, with its remote SETTINGS received. */
async function h2Session(server) {
  const session = http2.connect(server.url, { ca });
  await new Promise((resolve, reject) => {
    session.once('remoteSettings', resolve);
    session.once('error', reject);
  });
  return session;
}

/** Reads the `data:` frames of an SSE response on an HTTP/2 stream into an inbox. */
function sseFrames(stream) {
  const inbox = new Inbox();
  let text = '';
  stream.setEncoding('utf8');
  stream.on('data', (chunk) => {
    text += chunk;
    let end;
    while ((end = text.indexOf('\n\n')) >= 0) {
      const event = text.slice(0, end);
      text = text.slice(end + 2);
      const data = event.split('\n').filter((l) => l.startsWith('data: ')).map((l) => l.slice(6));
      if (data.length) inbox.push(JSON.parse(data.join('\n')));
    }
  });
  return inbox;
}

/** A masked client text frame (RFC 6455), for the hand-spoken RFC 8441 WebSocket. */
function clientTextFrame(text) {
  const payload = Buffer.from(text);
  assert.ok(payload.length < 126);
  const mask = randomBytes(4);
  const masked = Buffer.from(payload.map((b, i) => b ^ mask[i % 4]));
  return Buffer.concat([Buffer.from([0x81, 0x80 | payload.length]), mask, masked]);
}

/** Unmasked server frames (text only, payloads under 64 KiB) from a byte stream, in an inbox. */
function serverFrames(stream) {
  const inbox = new Inbox();
  let buf = Buffer.alloc(0);
  stream.on('data', (chunk) => {
    buf = Buffer.concat([buf, chunk]);
    for (;;) {
      if (buf.length < 2) return;
      let len = buf[1] & 0x7f;
      let at = 2;
      if (len === 126) {
        if (buf.length < 4) return;
        len = buf.readUInt16BE(2);
        at = 4;
      }
      if (buf.length < at + len) return;
      const opcode = buf[0] & 0x0f;
      const payload = buf.subarray(at, at + len);
      buf = buf.subarray(at + len);
      if (opcode === 0x1) inbox.push(JSON.parse(payload.toString()));
      if (opcode === 0x8) inbox.push({ type: 'close-frame', code: payload.readUInt16BE(0) });
    }
  });
  return inbox;
}

describe('TLS with Node clients', () => {
  let server;
  before(async () => {
    server = await Ferrocast.start({ name: 'tls', tls });
  });
  after(async () => {
    await server.stop();
  });

  test('ws over wss:// trusting the private CA', async () => {
    const { ws, inbox } = await wsClient(`${server.wsUrl}/ws`);
    assert.equal((await nextOfType(inbox, 'welcome')).type, 'welcome');
    ws.send(JSON.stringify({ op: 'subscribe', id: 1, channels: ['chat.nodetls'] }));
    await nextOfType(inbox, 'ack');
    await server.publish('chat.nodetls', { over: 'tls' });
    assert.deepEqual((await nextOfType(inbox, 'msg')).data, { over: 'tls' });
    ws.close();
    // A client that does not trust the CA is refused by the handshake.
    await assert.rejects(
      new Promise((resolve, reject) => {
        const bad = new WebSocket(`${server.wsUrl}/ws`);
        bad.once('open', resolve);
        bad.once('error', reject);
      }),
      /self-signed|unable to verify|certificate/i,
    );
  });

  test('HTTP/2 by ALPN: the API and ten SSE streams on one connection', async () => {
    const session = await h2Session(server);
    try {
      assert.equal(session.alpnProtocol, 'h2');
      assert.equal(session.remoteSettings.enableConnectProtocol, true);
      const health = session.request({ ':path': '/healthz' });
      const status = await new Promise((resolve) => health.once('response', (h) => resolve(h[':status'])));
      health.resume();
      assert.equal(status, 200);
      const streams = [];
      for (let i = 0; i < 10; i++) {
        const stream = session.request({ ':path': `/sse?channels=chat.h2sse`, accept: 'text/event-stream' });
        streams.push({ stream, inbox: sseFrames(stream) });
      }
      for (const { inbox } of streams) {
        assert.equal((await inbox.next(5000, 'the welcome')).type, 'welcome');
        assert.equal((await inbox.next(5000, 'the ack')).type, 'ack');
      }
      await server.publish('chat.h2sse', { n: 1 });
      for (const { inbox } of streams) assert.deepEqual((await nextOfType(inbox, 'msg')).data, { n: 1 });
      for (const { stream } of streams) stream.close();
    } finally {
      session.close();
    }
  });

  test('a WebSocket on an HTTP/2 stream (RFC 8441 extended CONNECT)', async () => {
    const before = (await server.metric('ferrocast_tls_websockets_total', 'http="2"')) ?? 0;
    const session = await h2Session(server);
    try {
      const stream = session.request({
        ':method': 'CONNECT',
        ':protocol': 'websocket',
        ':path': '/ws',
        'sec-websocket-version': '13',
      });
      const headers = await new Promise((resolve) => stream.once('response', resolve));
      assert.equal(headers[':status'], 200);
      const inbox = serverFrames(stream);
      assert.equal((await nextOfType(inbox, 'welcome')).type, 'welcome');
      stream.write(clientTextFrame(JSON.stringify({ op: 'subscribe', id: 1, channels: ['chat.rfc8441'] })));
      assert.equal((await nextOfType(inbox, 'ack')).id, 1);
      await server.publish('chat.rfc8441', { on: 'a stream' });
      assert.deepEqual((await nextOfType(inbox, 'msg')).data, { on: 'a stream' });
      // The same connection carries plain requests meanwhile.
      const health = session.request({ ':path': '/healthz' });
      assert.equal(await new Promise((r) => health.once('response', (h) => r(h[':status']))), 200);
      health.resume();
      stream.close();
    } finally {
      session.close();
    }
    assert.equal(await server.metric('ferrocast_tls_websockets_total', 'http="2"'), before + 1);
  });
});

describe('TLS and HTTP/2 in Chromium', { skip: chromiumMissing() }, () => {
  let browser;
  let server;
  let plain;
  before(async () => {
    // The page publishes with fetch(): a web page may use the API without a key only from
    // an allowed origin (its own, here).
    const port = await freePort();
    server = await Ferrocast.start({
      name: 'tls-chromium',
      tls,
      port,
      sets: [`server.allowed_origins=["https://127.0.0.1:${port}"]`],
    });
    plain = await Ferrocast.start({ name: 'h1-chromium' });
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: [...CHROMIUM_ARGS, `--ignore-certificate-errors-spki-list=${spkiHash(tls.cert)}`],
      timeout: 30000,
    });
  });
  after(async () => {
    await browser?.close();
    await server?.stop();
    await plain?.stop();
  });

  /** Opens `count` EventSources on the page's origin; resolves with how many got their welcome within `ms`. */
  const openStreams = (page, count, ms) =>
    page.evaluate(
      ([count, ms]) =>
        new Promise((resolve) => {
          let welcomed = 0;
          window.streams = [];
          for (let i = 0; i < count; i++) {
            const es = new EventSource(`/sse?channels=chat.browser${i}`);
            es.onmessage = (e) => {
              if (JSON.parse(e.data).type === 'welcome') welcomed += 1;
            };
            window.streams.push(es);
          }
          setTimeout(() => resolve(welcomed), ms);
        }),
      [count, ms],
    );

  test('ten EventSources and a WebSocket share one HTTP/2 connection', async () => {
    const handshakes = await server.metric('ferrocast_tls_handshakes_total', 'result="ok"');
    const ws2 = (await server.metric('ferrocast_tls_websockets_total', 'http="2"')) ?? 0;
    const page = await browser.newPage();
    try {
      await page.goto(`${server.url}/healthz`);
      const protocol = await page.evaluate(() => performance.getEntriesByType('navigation')[0].nextHopProtocol);
      assert.equal(protocol, 'h2');
      assert.equal(await openStreams(page, 10, 3000), 10);
      const got = await page.evaluate(
        (wsUrl) =>
          new Promise((resolve, reject) => {
            const ws = new WebSocket(`${wsUrl}/ws`);
            ws.onmessage = (e) => {
              const frame = JSON.parse(e.data);
              if (frame.type === 'welcome') ws.send(JSON.stringify({ op: 'subscribe', id: 1, channels: ['chat.chromium'] }));
              if (frame.type === 'ack') fetch('/api/publish', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ channel: 'chat.chromium', data: 'h2' }) });
              if (frame.type === 'msg') resolve(frame.data);
            };
            ws.onerror = () => reject(new Error('websocket error'));
          }),
        server.wsUrl,
      );
      assert.equal(got, 'h2');
      // One TLS connection carried the page, the streams, the publish and the WebSocket
      // (Chromium may open a spare one beside it; HTTP/1.1 would have needed twelve).
      const opened = (await server.metric('ferrocast_tls_handshakes_total', 'result="ok"')) - handshakes;
      assert.ok(opened >= 1 && opened <= 2, `${opened} TLS connections`);
      assert.equal(await server.metric('ferrocast_tls_websockets_total', 'http="2"'), ws2 + 1);
    } finally {
      await page.close();
    }
  });

  test('over plain HTTP/1.1 the same page gets only six streams', async () => {
    const page = await browser.newPage();
    try {
      await page.goto(`${plain.url}/healthz`);
      assert.equal(await page.evaluate(() => performance.getEntriesByType('navigation')[0].nextHopProtocol), 'http/1.1');
      assert.equal(await openStreams(page, 10, 3000), 6);
    } finally {
      await page.close();
    }
  });

  test("socket.io-client's WebSocket over HTTP/2", async () => {
    const ws2 = (await server.metric('ferrocast_tls_websockets_total', 'http="2"')) ?? 0;
    const page = await browser.newPage();
    try {
      await page.goto(`${server.url}/healthz`);
      await page.addScriptTag({ path: path.join(REPO_ROOT, 'e2e/node/node_modules/socket.io-client/dist/socket.io.min.js') });
      const result = await page.evaluate(
        () =>
          new Promise((resolve, reject) => {
            const socket = io({ transports: ['websocket'] });
            socket.on('connect_error', (e) => reject(new Error(`connect_error: ${e.message}`)));
            socket.on('connect', async () => {
              const ack = await socket.emitWithAck('subscribe', 'chat.sioh2');
              resolve({ transport: socket.io.engine.transport.name, ack });
            });
          }),
      );
      assert.equal(result.transport, 'websocket');
      assert.ok(result.ack['chat.sioh2'].epoch, JSON.stringify(result.ack));
      await waitFor(async () => (await server.metric('ferrocast_tls_websockets_total', 'http="2"')) === ws2 + 1, 5000, 'the socket.io websocket counted as HTTP/2');
    } finally {
      await page.close();
    }
  });
});
