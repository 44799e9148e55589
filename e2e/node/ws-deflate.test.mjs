// permessage-deflate on /ws with Node's `ws` (perMessageDeflate, as most Node apps leave it on).
// A TCP tap between the client and the server reads the server's frame headers, so the test
// sees what went over the wire: RSV1 set on the large messages of a compressing namespace,
// not on small ones, not for a client that did not offer the extension; and `ws` decodes them
// to the published data. A message `ws` compresses on its way in reaches another subscriber.

import assert from 'node:assert/strict';
import net from 'node:net';
import { test } from 'node:test';
import WebSocket from 'ws';
import { Ferrocast, Inbox } from './lib/server.mjs';

/** A TCP proxy to `port` recording the header of every frame the server sends. */
async function tap(port) {
  const conns = [];
  const server = net.createServer((client) => {
    const frames = [];
    conns.push(frames);
    const upstream = net.connect(port, '127.0.0.1');
    client.pipe(upstream);
    let buf = Buffer.alloc(0);
    let inHeaders = true;
    upstream.on('data', (chunk) => {
      client.write(chunk);
      buf = Buffer.concat([buf, chunk]);
      if (inHeaders) {
        const end = buf.indexOf('\r\n\r\n');
        if (end < 0) return;
        buf = buf.subarray(end + 4);
        inHeaders = false;
      }
      for (;;) {
        if (buf.length < 2) return;
        let len = buf[1] & 0x7f;
        let at = 2;
        if (len === 126) {
          if (buf.length < 4) return;
          len = buf.readUInt16BE(2);
          at = 4;
        } else if (len === 127) {
          if (buf.length < 10) return;
          len = Number(buf.readBigUInt64BE(2));
          at = 10;
        }
        if (buf.length < at + len) return;
        frames.push({ rsv1: (buf[0] & 0x40) !== 0, opcode: buf[0] & 0x0f, len });
        buf = buf.subarray(at + len);
      }
    });
    const end = () => { client.destroy(); upstream.destroy(); };
    client.on('close', end);
    upstream.on('close', end);
    client.on('error', end);
    upstream.on('error', end);
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { port: server.address().port, conns, close: () => server.close() };
}

function open(url, options) {
  const ws = new WebSocket(url, options);
  const inbox = new Inbox();
  let answer;
  ws.once('upgrade', (res) => (answer = res.headers['sec-websocket-extensions']));
  ws.on('message', (data) => inbox.push(JSON.parse(data.toString())));
  return new Promise((resolve, reject) => {
    ws.once('open', () => resolve({ ws, inbox, answer }));
    ws.once('error', reject);
  });
}

async function next(inbox, type) {
  for (;;) {
    const frame = await inbox.next(5000, type);
    if (frame.type === type) return frame;
  }
}

async function subscribe(client, channel) {
  client.ws.send(JSON.stringify({ op: 'subscribe', id: 1, channels: [channel] }));
  const ack = await next(client.inbox, 'ack');
  assert.ok(!ack.result[channel].error, JSON.stringify(ack));
}

const doc = (n) => ({
  n,
  symbol: 'MSFT',
  rows: Array.from({ length: 40 }, (_, i) => ({ price: 300 + i / 4, size: 5 * i, side: i % 2 ? 'bid' : 'ask' })),
});

test('ws with perMessageDeflate gets large messages compressed, others plain, and its own compressed publish goes through', { timeout: 30000 }, async (t) => {
  const server = await Ferrocast.start({
    name: 'ws-deflate',
    sets: ['namespaces.docs.compress=true', 'namespaces.docs.compress_min_bytes=256', 'namespaces.docs.client_publish=true'],
  });
  t.after(() => server.stop());
  const proxy = await tap(server.port);
  t.after(() => proxy.close());
  const url = `ws://127.0.0.1:${proxy.port}/ws`;

  const zipped = await open(url, { perMessageDeflate: true });
  const plain = await open(url, { perMessageDeflate: false });
  t.after(() => { zipped.ws.terminate(); plain.ws.terminate(); });
  assert.equal(zipped.ws.extensions, 'permessage-deflate');
  assert.equal(zipped.answer, 'permessage-deflate; server_no_context_takeover; client_no_context_takeover');
  assert.equal(plain.ws.extensions, '');
  assert.equal(plain.answer, undefined);
  await subscribe(zipped, 'docs.n');
  await subscribe(plain, 'docs.n');

  const small = { p: 2.5 };
  await server.publish('docs.n', small);
  await server.publish('docs.n', doc(1));
  await server.publish('docs.n', doc(2));
  for (const c of [zipped, plain]) {
    const got = [];
    for (let i = 0; i < 3; i++) got.push((await next(c.inbox, 'msg')).data);
    assert.deepEqual(got, [small, doc(1), doc(2)]);
  }
  const [zFrames, pFrames] = proxy.conns;
  const text = (frames) => frames.filter((f) => f.opcode === 1);
  // welcome, ack, then the three messages.
  assert.deepEqual(text(zFrames).map((f) => f.rsv1), [false, false, false, true, true]);
  assert.deepEqual(text(pFrames).map((f) => f.rsv1), [false, false, false, false, false]);
  const [, , , zDoc] = text(zFrames);
  const [, , , pDoc] = text(pFrames);
  assert.ok(zDoc.len * 3 < pDoc.len, `compressed ${zDoc.len} bytes vs plain ${pDoc.len}`);

  // ws compresses what it sends above its 1 KiB threshold; the server inflates it.
  await subscribe(plain, 'docs.in');
  zipped.ws.send(JSON.stringify({ op: 'publish', id: 2, channel: 'docs.in', data: doc(3) }));
  const ack = await next(zipped.inbox, 'ack');
  assert.ok(!ack.error, JSON.stringify(ack));
  assert.deepEqual((await next(plain.inbox, 'msg')).data, doc(3));
});

test('EventSource (eventsource on fetch, which asks for gzip) reads a gzip event stream with shared compressed messages', { timeout: 30000 }, async (t) => {
  const { EventSource } = await import('eventsource');
  const server = await Ferrocast.start({
    name: 'sse-gzip',
    sets: ['namespaces.docs.compress=true', 'namespaces.docs.compress_min_bytes=256'],
  });
  t.after(() => server.stop());
  let encoding;
  const inbox = new Inbox();
  const es = new EventSource(`${server.url}/sse?channels=docs.e`, {
    fetch: async (url, init) => {
      const res = await fetch(url, init);
      encoding = res.headers.get('content-encoding');
      return res;
    },
  });
  t.after(() => es.close());
  es.onmessage = (e) => inbox.push(JSON.parse(e.data));
  await next(inbox, 'ack');
  assert.equal(encoding, 'gzip');
  await server.publish('docs.e', { p: 3 });
  await server.publish('docs.e', doc(4));
  await server.publish('docs.e', doc(5));
  const got = [];
  for (let i = 0; i < 3; i++) got.push((await next(inbox, 'msg')).data);
  assert.deepEqual(got, [{ p: 3 }, doc(4), doc(5)]);
});
