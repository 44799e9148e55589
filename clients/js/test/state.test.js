// Unit tests for the connection state machine: states, close codes, hints, liveness, fallback, retry and close.
import test from 'node:test';
import assert from 'node:assert/strict';
import { setup, fakeEventSourceClass, fakeFetch, flush, advanceAsync } from './fakes.js';

const names = (states) => states.map(([state]) => state);

test('connecting, then connected on the welcome, with per-state and generic events', () => {
  const { client, states, WebSocket } = setup();
  const connected = [];
  client.on('connected', (detail) => connected.push(detail));
  client.connect();
  assert.equal(WebSocket.instances.length, 1);
  assert.equal(WebSocket.instances[0].url, 'ws://gw.test/ws');
  assert.equal(client.state, 'connecting');
  assert.equal(client.transport, 'websocket');
  WebSocket.instances[0].accept({ session: 'abc' });
  assert.deepEqual(names(states), ['connecting', 'connected']);
  assert.deepEqual(connected, [{ transport: 'websocket', session: 'abc' }]);
  assert.equal(client.session, 'abc');
  client.close();
});

test('autoConnect starts after the constructor returns, so listeners see every state', async () => {
  const { client, WebSocket, states } = setup({ autoConnect: true });
  assert.equal(client.state, 'connecting');
  assert.equal(WebSocket.instances.length, 0);
  await flush();
  assert.equal(WebSocket.instances.length, 1);
  assert.deepEqual(names(states), ['connecting']);
  client.close();
});

test('a lost connection goes to reconnecting and back to connected', () => {
  const harness = setup();
  const { client, clock, states } = harness;
  client.connect();
  harness.ws.accept();
  harness.ws.drop(1006);
  const [state, detail] = states.at(-1);
  assert.equal(state, 'reconnecting');
  assert.equal(detail.code, 1006);
  assert.equal(detail.delayMs, 250, 'random 0.5 of the 500 ms first step');
  clock.advance(249);
  assert.equal(harness.WebSocket.instances.length, 1);
  clock.advance(1);
  assert.equal(harness.WebSocket.instances.length, 2);
  harness.ws.accept();
  assert.deepEqual(names(states), ['connecting', 'connected', 'reconnecting', 'connected']);
  assert.equal(client.stats().reconnects, 1);
  client.close();
});

for (const code of [4001, 4003, 1008]) {
  test(`close code ${code} is terminal: disconnected with the reason, no further attempts, no timers`, () => {
    const harness = setup();
    const { client, clock, states, WebSocket } = harness;
    const disconnected = [];
    client.on('disconnected', (detail) => disconnected.push(detail));
    client.connect();
    harness.ws.accept();
    harness.ws.drop(code, 'token expired');
    assert.equal(client.state, 'disconnected');
    assert.deepEqual(disconnected, [{ code, reason: 'token expired' }]);
    assert.deepEqual(client.stateDetail, { code, reason: 'token expired' });
    assert.equal(client.stats().timers, 0);
    clock.advance(10 * 60_000);
    assert.equal(WebSocket.instances.length, 1);
    assert.equal(states.at(-1)[0], 'disconnected');
  });
}

test('a terminal code before the welcome also stops', () => {
  const harness = setup();
  harness.client.connect();
  harness.ws.drop(4001, '');
  assert.equal(harness.client.state, 'disconnected');
  assert.equal(harness.client.stateDetail.code, 4001);
});

test('close 1001 honours the after_ms hint in its reason', () => {
  const harness = setup({ random: () => 0 });
  const { client, clock, states, WebSocket } = harness;
  client.connect();
  harness.ws.accept();
  harness.ws.drop(1001, JSON.stringify({ reconnect: true, after_ms: 1200 }));
  assert.equal(states.at(-1)[0], 'reconnecting');
  assert.equal(states.at(-1)[1].delayMs, 1200);
  clock.advance(1199);
  assert.equal(WebSocket.instances.length, 1);
  clock.advance(1);
  assert.equal(WebSocket.instances.length, 2);
  client.close();
});

test('close 1013 from a connection limit honours its after_ms hint; a bare 1013 backs off', () => {
  const limited = setup({ random: () => 0 });
  limited.client.connect();
  limited.ws.drop(1013, '{"reconnect":true,"after_ms":2500,"limit":"limits.connections_per_ip"}');
  assert.equal(limited.client.state, 'reconnecting');
  assert.equal(limited.states.at(-1)[1].delayMs, 2500);
  limited.client.close();

  const bare = setup();
  bare.client.connect();
  bare.ws.drop(1013, 'connection limit reached; try again later');
  assert.equal(bare.states.at(-1)[1].delayMs, 250);
  bare.client.close();
});

test('the 1001 hint is spread by at most one base step of jitter', () => {
  const harness = setup({ random: () => 0.999999 });
  harness.client.connect();
  harness.ws.accept();
  harness.ws.drop(1001, '{"reconnect":true,"after_ms":1200}');
  const { delayMs } = harness.states.at(-1)[1];
  assert.ok(delayMs >= 1200 && delayMs < 1200 + 500, `${delayMs}`);
  harness.client.close();
});

test('close 1001 with reconnect:false stops; a malformed hint falls back to backoff', () => {
  const first = setup();
  first.client.connect();
  first.ws.accept();
  first.ws.drop(1001, '{"reconnect":false}');
  assert.equal(first.client.state, 'disconnected');

  const second = setup();
  second.client.connect();
  second.ws.accept();
  second.ws.drop(1001, 'going away');
  assert.equal(second.client.state, 'reconnecting');
  assert.equal(second.states.at(-1)[1].delayMs, 250);
  second.client.close();
});

test('liveness: silence longer than ping_interval_ms + pingGraceMs closes and reconnects', () => {
  const harness = setup({ pingGraceMs: 500, rttIntervalMs: 60_000 });
  const { client, clock } = harness;
  client.connect();
  const ws = harness.ws;
  ws.accept({ ping_interval_ms: 1000 });
  clock.advance(900);
  ws.push({ type: 'ping' });
  assert.deepEqual(ws.ops('pong'), [{ op: 'pong' }]);
  clock.advance(1400);
  assert.equal(client.state, 'connected', 'the server ping kept the connection alive');
  clock.advance(100);
  assert.equal(client.state, 'reconnecting');
  assert.equal(client.stateDetail.reason, 'heartbeat timeout');
  assert.equal(ws.closedWith.code, 1000, 'the dead socket is closed without waiting for a close event');
  client.close();
});

test('a handshake that never delivers a welcome times out', () => {
  const harness = setup({ handshakeTimeoutMs: 3000, transports: ['websocket'] });
  harness.client.connect();
  harness.ws.readyState = 1;
  harness.clock.advance(3000);
  assert.equal(harness.client.state, 'reconnecting');
  assert.equal(harness.client.stateDetail.reason, 'handshake timeout');
  harness.client.close();
});

test('frames before the welcome are ignored; batched frames are all handled', () => {
  const harness = setup();
  const { client } = harness;
  const got = [];
  client.subscribe('ticks.AAPL', (data) => got.push(data.price));
  client.connect();
  harness.ws.push({ type: 'msg', channel: 'ticks.AAPL', offset: 1, data: { price: 0 } });
  harness.ws.accept();
  harness.ws.onmessage({
    data: JSON.stringify([
      { type: 'msg', channel: 'ticks.AAPL', offset: 1, data: { price: 1 } },
      { type: 'msg', channel: 'ticks.AAPL', offset: 2, data: { price: 2 } },
    ]),
  });
  harness.ws.onmessage({ data: new TextEncoder().encode('{"type":"msg","channel":"ticks.AAPL","offset":3,"data":{"price":3}}') });
  harness.ws.onmessage({ data: 'not json' });
  assert.deepEqual(got, [1, 2, 3]);
  client.close();
});

test('falls back to SSE after consecutive WebSocket failures and returns to WebSocket through a probe', async () => {
  const EventSource = fakeEventSourceClass();
  const fetch = fakeFetch();
  const harness = setup({ EventSource, fetch, fallbackAfter: 2, wsRetryMs: 60_000 });
  const { client, clock, states, WebSocket } = harness;
  client.subscribe('ticks.AAPL', () => {});
  client.connect();
  harness.ws.drop();
  clock.advance(states.at(-1)[1].delayMs);
  assert.equal(WebSocket.instances.length, 2);
  harness.ws.drop();
  assert.equal(states.at(-1)[1].transport, 'sse');
  clock.advance(states.at(-1)[1].delayMs);
  assert.equal(EventSource.instances.length, 1);
  assert.equal(EventSource.instances[0].url, 'http://gw.test/sse?channels=ticks.AAPL');
  EventSource.instances[0].welcome();
  assert.equal(client.state, 'fallback');
  assert.equal(client.transport, 'sse');
  await advanceAsync(clock, 1_000);
  assert.deepEqual(fetch.calls[0], { url: 'http://gw.test/sse/control', body: { session: 'sse1', token: 'tok', op: 'ping', id: fetch.calls[0].body.id } });

  await advanceAsync(clock, 60_000);
  assert.equal(client.state, 'fallback', 'control pings kept the SSE session alive');
  assert.equal(WebSocket.instances.length, 3, 'a WebSocket probe after wsRetryMs');
  harness.ws.accept();
  assert.equal(client.state, 'connected');
  assert.equal(client.transport, 'websocket');
  assert.ok(EventSource.instances[0].closed);
  assert.deepEqual(harness.ws.ops('subscribe').map((f) => f.channels), [['ticks.AAPL']]);
  assert.deepEqual(names(states).slice(-2), ['fallback', 'connected']);
  client.close();
});

test('an outage that SSE cannot reach either sends the client back to WebSocket first, then probes soon', () => {
  const EventSource = fakeEventSourceClass();
  const harness = setup({ EventSource, fetch: fakeFetch(), fallbackAfter: 2, wsRetryMs: 60_000 });
  const { client, clock, states, WebSocket } = harness;
  const next = () => clock.advance(states.at(-1)[1].delayMs);
  client.connect();
  harness.ws.accept();
  harness.ws.drop();
  next();
  harness.ws.drop();
  next();
  harness.ws.drop();
  assert.equal(states.at(-1)[1].transport, 'sse', 'two failures before a welcome fall back');
  next();
  EventSource.instances[0].fail();
  assert.equal(states.at(-1)[1].transport, 'websocket', 'SSE is down too: an outage, so WebSocket goes first');
  next();
  harness.ws.drop();
  next();
  harness.ws.drop();
  next();
  EventSource.instances[1].welcome();
  assert.equal(client.state, 'fallback');
  const sockets = WebSocket.instances.length;
  clock.advance(5_000);
  assert.equal(WebSocket.instances.length, sockets + 1, 'WebSocket worked before, so the first probe comes after 5 s');
  harness.ws.accept();
  assert.equal(client.transport, 'websocket');
  client.close();
});

test('a failed probe keeps SSE and tries again later', async () => {
  const EventSource = fakeEventSourceClass();
  const harness = setup({ EventSource, fetch: fakeFetch(), transports: ['sse', 'websocket'], fallbackAfter: 1, wsRetryMs: 1000 });
  const { client, clock, WebSocket } = harness;
  client.connect();
  harness.ws.drop();
  clock.advance(harness.states.at(-1)[1].delayMs);
  EventSource.instances[0].welcome();
  clock.advance(1000);
  assert.equal(WebSocket.instances.length, 2);
  harness.ws.drop();
  assert.equal(client.state, 'fallback');
  clock.advance(1000);
  assert.equal(WebSocket.instances.length, 3);
  client.close();
  await flush();
  assert.equal(client.stats().timers, 0);
});

test('an SSE session the server no longer knows (control 404) reconnects', async () => {
  const EventSource = fakeEventSourceClass();
  const fetch = fakeFetch((body) => (body.op === 'ping' ? { status: 404, body: '' } : null));
  const harness = setup({ EventSource, fetch, transports: ['sse'] });
  harness.client.connect();
  EventSource.instances[0].welcome();
  await advanceAsync(harness.clock, 1_000);
  assert.equal(harness.client.state, 'reconnecting');
  assert.equal(harness.client.stateDetail.reason, 'unknown SSE session');
  assert.ok(EventSource.instances[0].closed);
  harness.client.close();
});

test('the close event that ends an SSE stream is handled like a WebSocket close frame', () => {
  const EventSource = fakeEventSourceClass();
  const harness = setup({ EventSource, fetch: fakeFetch(), transports: ['sse'], random: () => 0 });
  const { client, clock } = harness;
  client.connect();
  EventSource.instances[0].welcome();
  EventSource.instances[0].push({ type: 'close', code: 1001, reason: '{"reconnect":true,"after_ms":1500}' });
  assert.ok(EventSource.instances[0].closed);
  assert.deepEqual(client.stateDetail, { attempt: 0, delayMs: 1500, code: 1001, reason: '{"reconnect":true,"after_ms":1500}', transport: 'sse' });
  clock.advance(1500);
  assert.equal(EventSource.instances.length, 2);
  EventSource.instances[1].push({ type: 'close', code: 4003, reason: 'forbidden' });
  assert.equal(client.state, 'disconnected');
  assert.deepEqual(client.stateDetail, { code: 4003, reason: 'forbidden' });
});

test('an EventSource error is handled by the client backoff, not the browser loop', () => {
  const EventSource = fakeEventSourceClass();
  const harness = setup({ EventSource, fetch: fakeFetch(), transports: ['sse'] });
  harness.client.connect();
  EventSource.instances[0].welcome();
  EventSource.instances[0].fail();
  assert.ok(EventSource.instances[0].closed);
  assert.equal(harness.client.state, 'reconnecting');
  harness.clock.advance(harness.client.stateDetail.delayMs);
  assert.equal(EventSource.instances.length, 2);
  harness.client.close();
});

test('retry() reconnects now, resets the backoff and prefers WebSocket again', () => {
  const EventSource = fakeEventSourceClass();
  const harness = setup({ EventSource, fetch: fakeFetch(), random: () => 0.999999, fallbackAfter: 1 });
  const { client, clock, WebSocket, states } = harness;
  client.connect();
  for (let i = 0; i < 5; i++) {
    if (client.transport === 'websocket') WebSocket.instances.at(-1).drop();
    else EventSource.instances.at(-1).fail();
    clock.advance(states.at(-1)[1].delayMs);
  }
  assert.equal(client.transport, 'sse');
  const wsBefore = WebSocket.instances.length;
  client.retry();
  assert.equal(client.state, 'connecting');
  assert.equal(client.transport, 'websocket');
  assert.equal(WebSocket.instances.length, wsBefore + 1);
  harness.ws.drop();
  assert.ok(states.at(-1)[1].delayMs < 500, 'backoff starts over');
  client.close();
});

test('retry() after a terminal disconnect starts again', () => {
  const harness = setup();
  harness.client.connect();
  harness.ws.drop(4001, 'unauthorized');
  harness.client.retry();
  assert.equal(harness.WebSocket.instances.length, 2);
  harness.ws.accept();
  assert.equal(harness.client.state, 'connected');
  harness.client.close();
});

test('close() sends 1000, ends in disconnected, clears every timer and never reconnects', () => {
  const harness = setup();
  const { client, clock, WebSocket } = harness;
  client.connect();
  harness.ws.accept();
  assert.ok(clock.pending > 0);
  client.close();
  assert.equal(harness.ws.closedWith.code, 1000);
  assert.equal(client.state, 'disconnected');
  assert.deepEqual(client.stateDetail, { code: 1000, reason: 'client closed' });
  assert.equal(client.stats().timers, 0);
  assert.equal(clock.pending, 0, 'nothing left to keep a Node process alive');
  clock.advance(3_600_000);
  assert.equal(WebSocket.instances.length, 1);
  client.close();
  assert.equal(harness.states.filter(([s]) => s === 'disconnected').length, 1);
});

test('close() during the autoConnect tick prevents the connection', async () => {
  const harness = setup({ autoConnect: true });
  harness.client.close();
  await flush();
  assert.equal(harness.WebSocket.instances.length, 0);
  assert.equal(harness.client.state, 'disconnected');
});

test('a listener that throws does not break the client', () => {
  const harness = setup();
  harness.client.on('state', () => {
    throw new Error('boom');
  });
  harness.client.connect();
  harness.ws.accept();
  assert.equal(harness.client.state, 'connected');
  harness.client.close();
});

test('url handling: ws/https schemes, path prefixes and params', () => {
  const cases = [
    ['https://example.com/feed/', 'wss://example.com/feed/ws?token=t'],
    ['wss://example.com', 'wss://example.com/ws?token=t'],
    ['ws://127.0.0.1:8080', 'ws://127.0.0.1:8080/ws?token=t'],
  ];
  for (const [url, expected] of cases) {
    const harness = setup({ url, params: { token: 't' } });
    harness.client.connect();
    assert.equal(harness.ws.url, expected);
    harness.client.close();
  }
  assert.throws(() => setup({ url: undefined }), /url option is required/);
  const harness = setup({ transports: undefined, backoff: { baseMs: undefined, maxMs: 1000 } });
  harness.client.connect();
  assert.equal(harness.client.transport, 'websocket', 'undefined options keep their defaults');
  harness.ws.drop();
  assert.equal(harness.states.at(-1)[1].delayMs, 250);
  harness.client.close();
});
