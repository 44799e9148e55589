// Interop with the official Node `socket.io-client` (v4): long-polling only, websocket only
// and the default polling-then-upgrade, against a real ferrocast. Each run subscribes (ack
// results like the native protocol's), receives `message` and the namespace's own event,
// publishes where allowed (and is refused where not), recovers after a reconnect, and
// disconnects cleanly. A drain makes the client reconnect by itself.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { io } from 'socket.io-client';
import { Ferrocast, Inbox, waitFor } from './lib/server.mjs';

const SETS = ['namespaces.prices.socketio_event=price_update', 'server.ping_interval_ms=2000'];

function connect(server, opts = {}) {
  const socket = io(server.url, { reconnection: false, timeout: 5000, ...opts });
  const messages = new Inbox();
  const prices = new Inbox();
  const closes = new Inbox();
  socket.on('message', (m) => messages.push(m));
  socket.on('price_update', (d) => prices.push(d));
  socket.on('close', (c) => closes.push(c));
  const connected = new Promise((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('connect_error', reject);
  });
  return { socket, messages, prices, closes, connected };
}

const TRANSPORTS = [
  { name: 'polling only', opts: { transports: ['polling'] }, expect: 'polling' },
  { name: 'websocket only', opts: { transports: ['websocket'] }, expect: 'websocket' },
  { name: 'default (polling, then upgrade)', opts: {}, expect: 'websocket' },
];

describe('socket.io-client', () => {
  let server;
  before(async () => {
    server = await Ferrocast.start({ sets: SETS, name: 'socketio' });
  });
  after(async () => {
    await server?.stop();
  });

  for (const { name, opts, expect } of TRANSPORTS) {
    test(`subscribe, receive, publish and disconnect: ${name}`, async () => {
      const channel = `chat.node${Math.random().toString(36).slice(2, 8)}`;
      const price = `prices.N${Math.random().toString(36).slice(2, 6).toUpperCase()}`;
      const c = connect(server, opts);
      await c.connected;
      if (expect === 'websocket' && !opts.transports) {
        // The default client starts with polling and upgrades.
        await waitFor(() => c.socket.io.engine.transport.name === 'websocket', 5000, 'upgrade');
      }
      assert.equal(c.socket.io.engine.transport.name, expect);

      const results = await c.socket.timeout(5000).emitWithAck('subscribe', [channel, price]);
      assert.equal(results[channel].offset, 0);
      assert.equal(typeof results[channel].epoch, 'string');
      assert.equal(results[price].offset, 0);

      const published = await server.publish(channel, { text: 'hello' });
      const msg = await c.messages.next(5000, 'a message');
      assert.deepEqual(msg, {
        channel,
        offset: published.offset,
        epoch: published.epoch,
        data: { text: 'hello' },
      });

      // The namespace's socketio_event carries the data alone, next to `message`.
      await server.publish(price, { p: 189.5 });
      assert.equal((await c.messages.next()).channel, price);
      assert.deepEqual(await c.prices.next(5000, 'a price_update'), { p: 189.5 });

      // chat allows client publishing: the ack says where it landed, and it comes back.
      const ack = await c.socket.timeout(5000).emitWithAck('publish', {
        channel,
        data: { from: 'client' },
      });
      assert.deepEqual(ack, { channel, offset: 2, epoch: published.epoch });
      assert.deepEqual((await c.messages.next()).data, { from: 'client' });

      // prices does not: the same error shape as a refused channel in a native ack.
      const refused = await c.socket.timeout(5000).emitWithAck('publish', { channel: price, data: 1 });
      assert.equal(refused.error.code, 'forbidden');

      const unsub = await c.socket.timeout(5000).emitWithAck('unsubscribe', channel);
      assert.deepEqual(unsub, { unsubscribed: [channel] });
      await server.publish(channel, 'after');
      await c.messages.quiet(300);

      c.socket.disconnect();
      await waitFor(
        async () => (await server.metric('ferrocast_connections', 'transport="socketio"')) === 0,
        5000,
        'the server to close the socket.io session',
      );
    });
  }

  test('recovers missed messages after a reconnect, ack first', async () => {
    const channel = 'chat.noderecover';
    const first = connect(server, { transports: ['websocket'] });
    await first.connected;
    const sub = await first.socket.timeout(5000).emitWithAck('subscribe', channel);
    let position = { epoch: sub[channel].epoch, offset: sub[channel].offset };
    await server.publish(channel, 1);
    const m = await first.messages.next();
    position = { epoch: m.epoch, offset: m.offset };
    first.socket.disconnect();

    for (const n of [2, 3, 4]) await server.publish(channel, n);
    const again = connect(server);
    await again.connected;
    const order = [];
    again.socket.on('message', () => order.push('message'));
    // The callback form: it runs as the ack packet is read, where a promise's continuation
    // would only run after the rest of the same polling payload.
    const results = await new Promise((resolve, reject) => {
      const payload = { channels: [channel], recover: { [channel]: position } };
      again.socket.timeout(5000).emit('subscribe', payload, (err, res) => {
        order.push('ack');
        if (err) reject(err);
        else resolve(res);
      });
    });
    assert.equal(results[channel].recovered, true);
    assert.equal(results[channel].replayed, 3);
    const got = [];
    for (let i = 0; i < 3; i++) got.push((await again.messages.next()).data);
    assert.deepEqual(got, [2, 3, 4]);
    assert.equal(order[0], 'ack', 'the ack callback runs before any replayed message');
    await server.publish(channel, 5);
    assert.equal((await again.messages.next()).data, 5);
    again.socket.disconnect();
  });
});

for (const transports of [['websocket'], ['polling']]) {
  test(`a drain says close 1001 and the client reconnects by itself to the next server: ${transports}`, async () => {
    const sets = ['server.reconnect_after_ms=200'];
    const server = await Ferrocast.start({ sets, name: 'socketio-drain' });
    const channel = `chat.nodedrain${transports[0]}`;
    const socket = io(server.url, {
      transports,
      reconnectionDelay: 100,
      reconnectionDelayMax: 300,
      timeout: 2000,
    });
    const closes = new Inbox();
    const disconnects = new Inbox();
    const subscribed = new Inbox();
    const messages = new Inbox();
    socket.on('close', (c) => closes.push(c));
    socket.on('disconnect', (reason) => disconnects.push(reason));
    socket.on('message', (m) => messages.push(m));
    // The app subscribes on every connect, as apps do: only a reconnect by the library
    // itself subscribes a second time.
    socket.on('connect', async () => {
      subscribed.push(await socket.timeout(5000).emitWithAck('subscribe', channel));
    });
    // Whatever fails, the client stops retrying and no server is left behind.
    let next = null;
    try {
      await subscribed.next(5000, 'the first subscribe');
      await server.publish(channel, { n: 1 });
      assert.deepEqual((await messages.next(5000, 'a message')).data, { n: 1 });
      server.drain();
      const close = await closes.next(5000, 'a close event');
      assert.equal(close.code, 1001);
      assert.equal(JSON.parse(close.reason).reconnect, true);
      // A transport loss, not "io server disconnect": socket.io-client retries on its own.
      const reason = await disconnects.next(5000, 'a disconnect');
      assert.ok(['transport close', 'transport error'].includes(reason), reason);
      assert.equal(socket.active, true, 'the client keeps trying to reconnect');
      assert.equal(await server.exited, 0);
      // A new server at the same address: the client comes back by itself.
      next = await Ferrocast.start({ sets, port: server.port, name: 'socketio-drain-next' });
      await subscribed.next(10000, 'a subscribe after reconnecting');
      assert.equal(socket.io.engine.transport.name, transports[0]);
      await next.publish(channel, { n: 2 });
      assert.deepEqual((await messages.next(5000, 'a message from the new server')).data, { n: 2 });
    } finally {
      socket.close();
      await server.stop();
      await next?.stop();
    }
  });
}

test('websocket-only sockets are spliced (ack before the replay, thousands in order); polling ones are not', async () => {
  const server = await Ferrocast.start({ sets: SETS, name: 'socketio-splice' });
  const spliced = 'ferrocast_socketio_spliced_frames_total';
  try {
    const polling = connect(server, { transports: ['polling'] });
    await polling.connected;
    await polling.socket.timeout(5000).emitWithAck('subscribe', 'chat.nodesplicepoll');
    await server.publish('chat.nodesplicepoll', 1);
    assert.equal((await polling.messages.next()).data, 1);
    assert.equal(await server.metric(spliced), 0, 'a polling session is not spliced');
    polling.socket.disconnect();

    const channel = 'chat.nodesplice';
    let epoch;
    for (let n = 1; n <= 5; n++) epoch = (await server.publish(channel, n)).epoch;
    const c = connect(server, { transports: ['websocket'] });
    await c.connected;
    assert.equal(c.socket.io.engine.transport.name, 'websocket');
    const order = [];
    c.socket.on('message', (m) => order.push(m));
    const results = await new Promise((resolve, reject) => {
      const payload = { channels: [channel], recover: { [channel]: { epoch, offset: 2 } } };
      c.socket.timeout(5000).emit('subscribe', payload, (err, res) => {
        order.push('ack');
        if (err) reject(err);
        else resolve(res);
      });
    });
    assert.equal(results[channel].recovered, true);
    assert.equal(results[channel].replayed, 3);

    const total = 3000;
    for (let start = 6; start < 6 + total; start += 100) {
      const messages = [];
      for (let n = start; n < Math.min(start + 100, 6 + total); n++) messages.push({ channel, data: n });
      const r = await server.fetch('/api/publish', {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ messages }),
      });
      assert.equal(r.status, 200);
    }
    await waitFor(() => order.length >= 1 + 3 + total, 20000, 'every message');
    assert.equal(order[0], 'ack', 'the ack callback runs before any replayed message');
    const data = order.slice(1).map((m) => m.data);
    const expected = Array.from({ length: 3 + total }, (_, i) => i + 3);
    assert.deepEqual(data, expected, 'every message, in order');
    assert.deepEqual(order.slice(1).map((m) => m.offset), expected);

    const price = 'prices.NSPL';
    await c.socket.timeout(5000).emitWithAck('subscribe', price);
    await server.publish(price, { p: 7 });
    assert.deepEqual(await c.prices.next(5000, 'a price_update'), { p: 7 });
    assert.ok((await server.metric(spliced)) >= 1 + 3 + total + 1 + 2);
    c.socket.disconnect();
  } finally {
    await server.stop();
  }
});

test('default sockets are spliced once upgraded: nothing lost across the switch, no stray event', async () => {
  const server = await Ferrocast.start({ sets: SETS, name: 'socketio-upgrade-splice' });
  const spliced = 'ferrocast_socketio_spliced_frames_total';
  try {
    const channel = 'chat.nodeupgrade';
    const c = connect(server);
    const stray = [];
    const known = new Set(['message', 'price_update', 'close']);
    c.socket.onAny((event) => {
      if (!known.has(event)) stray.push(event);
    });
    await c.connected;
    // socket.io-client upgrades after connecting: this subscribe usually goes over polling,
    // and the messages below cross the switch.
    await c.socket.timeout(5000).emitWithAck('subscribe', channel);
    const total = 1500;
    const received = [];
    c.socket.on('message', (m) => received.push(m));
    for (let start = 1; start <= total; start += 50) {
      const messages = [];
      for (let n = start; n < Math.min(start + 50, total + 1); n++) messages.push({ channel, data: n });
      const r = await server.fetch('/api/publish', {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ messages }),
      });
      assert.equal(r.status, 200);
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    await waitFor(() => c.socket.io.engine.transport.name === 'websocket', 5000, 'upgrade');
    await waitFor(() => received.length >= total, 20000, 'every message');
    const expected = Array.from({ length: total }, (_, i) => i + 1);
    assert.deepEqual(received.map((m) => m.data), expected, 'every message once, in order');
    assert.deepEqual(received.map((m) => m.offset), expected);

    // Spliced now: each message counts as a spliced frame.
    const before = await server.metric(spliced);
    await server.publish(channel, 'after');
    await waitFor(() => received.length > total, 5000, 'the message after the switch');
    assert.equal(received[total].data, 'after');
    assert.equal(await server.metric(spliced), before + 1);
    assert.deepEqual(stray, [], 'the barrier never reaches the client');
    c.socket.disconnect();
  } finally {
    await server.stop();
  }
});
