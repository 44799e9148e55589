// Unit tests for channel subscriptions: sharing, disposal, resubscription and leak freedom.
import test from 'node:test';
import assert from 'node:assert/strict';
import { setup, flush, ackSubscribes } from './fakes.js';

function connected(options) {
  const harness = setup({ rttIntervalMs: 3_600_000, ...options });
  harness.client.connect();
  harness.ws.accept();
  return harness;
}

function assertEmpty(client, baselineEventListeners = 1) {
  const stats = client.stats();
  assert.equal(stats.channels, 0);
  assert.equal(stats.listeners, 0);
  assert.equal(stats.serverSubscriptions, 0);
  assert.equal(stats.pendingRequests, 0);
  assert.equal(stats.queued, 0);
  assert.equal(stats.eventListeners, baselineEventListeners);
}

test('listeners of one channel share one server subscription; the last disposer unsubscribes', async () => {
  const { client, ws } = connected();
  const a = [];
  const b = [];
  const disposeA = client.subscribe('ticks.AAPL', (data, meta) => a.push([data.price, meta]));
  const disposeB = client.subscribe('ticks.AAPL', (data) => b.push(data.price));
  await flush();
  assert.deepEqual(ws.ops('subscribe').map((f) => f.channels), [['ticks.AAPL']]);
  ackSubscribes(ws);
  ws.push({ type: 'msg', channel: 'ticks.AAPL', offset: 1, data: { price: 10 } });
  assert.deepEqual(a, [[10, { channel: 'ticks.AAPL', offset: 1, ephemeral: false, epoch: 'e1' }]]);
  assert.deepEqual(b, [10]);

  disposeA();
  disposeA();
  await flush();
  assert.equal(ws.ops('unsubscribe').length, 0, 'a listener remains');
  ws.push({ type: 'msg', channel: 'ticks.AAPL', offset: 2, data: { price: 11 } });
  assert.deepEqual(b, [10, 11]);
  assert.equal(a.length, 1, 'a disposed listener is not called');

  disposeB();
  await flush();
  assert.deepEqual(ws.ops('unsubscribe').map((f) => f.channels), [['ticks.AAPL']]);
  client.close();
});

test('subscribes made in one tick go out as one frame; subscribe-then-dispose sends nothing', async () => {
  const { client, ws } = connected();
  client.subscribe('ticks.AAPL', () => {});
  client.subscribe('quotes.AAPL', () => {});
  client.subscribe('ticks.MSFT', () => {})();
  await flush();
  assert.deepEqual(ws.ops('subscribe').map((f) => f.channels), [['ticks.AAPL', 'quotes.AAPL']]);
  assert.equal(ws.ops('unsubscribe').length, 0);
  client.close();
});

test('10,000 subscribe/dispose cycles while offline leave nothing behind', () => {
  const { client } = setup();
  for (let i = 0; i < 10_000; i++) {
    const channel = `ticks.S${i % 97}`;
    const first = client.subscribe(channel, () => {});
    const second = client.subscribe(channel, () => {});
    const off = client.on('gap', () => {});
    second();
    first();
    off();
  }
  assertEmpty(client);
});

test('10,000 subscribe/dispose cycles against a server leave no subscription, request or listener behind', async () => {
  const { client, ws } = connected();
  for (let i = 0; i < 10_000; i++) {
    const dispose = client.subscribe(`ticks.S${i % 20}`, () => {});
    await flush();
    ackSubscribes(ws);
    dispose();
    await flush();
    const unsubscribe = ws.sent.at(-1);
    assert.equal(unsubscribe.op, 'unsubscribe');
    ws.push({ type: 'ack', id: unsubscribe.id });
  }
  assertEmpty(client);
  assert.equal(ws.ops('subscribe').length, 10_000);
  client.close();
});

test('channels are resubscribed after a reconnect, with recovery positions', async () => {
  const harness = connected();
  const { client, clock } = harness;
  client.subscribe('ticks.AAPL', () => {});
  client.subscribe('quotes.AAPL', () => {});
  await flush();
  ackSubscribes(harness.ws, { epoch: 'ep', offset: 5 });
  harness.ws.push({ type: 'msg', channel: 'ticks.AAPL', offset: 6, data: {} });
  harness.ws.push({ type: 'msg', channel: 'ticks.AAPL', offset: 7, data: {} });
  harness.ws.drop();
  assert.equal(client.stats().serverSubscriptions, 0);
  clock.advance(client.stateDetail.delayMs);
  harness.ws.accept();
  const [resubscribe] = harness.ws.ops('subscribe');
  assert.deepEqual(resubscribe.channels, ['ticks.AAPL', 'quotes.AAPL']);
  assert.deepEqual(resubscribe.recover, { 'ticks.AAPL': { epoch: 'ep', offset: 7 }, 'quotes.AAPL': { epoch: 'ep', offset: 5 } });
  client.close();
});

test('invalid channels and listeners are rejected', () => {
  const { client } = setup();
  assert.throws(() => client.subscribe('bad channel', () => {}), TypeError);
  assert.throws(() => client.subscribe('', () => {}), TypeError);
  assert.throws(() => client.subscribe('ticks.AAPL'), TypeError);
  assert.throws(() => client.on('state'), TypeError);
});

test('a throwing listener does not stop the others', async () => {
  const { client, ws } = connected();
  const got = [];
  client.subscribe('ticks.AAPL', () => {
    throw new Error('boom');
  });
  client.subscribe('ticks.AAPL', (data) => got.push(data));
  await flush();
  ws.push({ type: 'msg', channel: 'ticks.AAPL', offset: 1, data: 1 });
  assert.deepEqual(got, [1]);
  client.close();
});

test('server-ended subscriptions and subscribe errors are reported, without a resubscribe loop', async () => {
  const { client, ws } = connected();
  const unsubscribed = [];
  const errors = [];
  client.on('unsubscribed', (event) => unsubscribed.push(event));
  client.on('error', (event) => errors.push(event));
  client.subscribe('ticks.AAPL', () => {});
  client.subscribe('secret.x', () => {});
  await flush();
  const [frame] = ws.ops('subscribe');
  ws.push({
    type: 'ack',
    id: frame.id,
    result: { 'ticks.AAPL': { epoch: 'e', offset: 1, recovered: false }, 'secret.x': { error: { code: 'forbidden', message: 'no' } } },
  });
  ws.push({ type: 'unsubscribed', channel: 'ticks.AAPL', reason: 'channel closed' });
  await flush();
  assert.deepEqual(errors, [{ code: 'forbidden', message: 'no', id: null, channels: ['secret.x'] }]);
  assert.deepEqual(unsubscribed, [{ channel: 'ticks.AAPL', reason: 'channel closed' }]);
  assert.equal(ws.ops('subscribe').length, 1);
  client.close();
});

test('subscription(channel) and the subscribed event follow the server confirmation', async () => {
  const { client, ws } = connected();
  const events = [];
  client.on('subscribed', (detail) => events.push(detail));
  assert.equal(client.subscription('ticks.AAPL'), null);
  const dispose = client.subscribe('ticks.AAPL', () => {});
  assert.deepEqual(client.subscription('ticks.AAPL'), { channel: 'ticks.AAPL', listeners: 1, subscribed: false, epoch: null, offset: null });
  await flush();
  ackSubscribes(ws, { epoch: 'e7', offset: 41 });
  assert.deepEqual(events, [{ channel: 'ticks.AAPL', epoch: 'e7', offset: 41, recovered: null }]);
  assert.deepEqual(client.subscription('ticks.AAPL'), { channel: 'ticks.AAPL', listeners: 1, subscribed: true, epoch: 'e7', offset: 41 });
  assert.equal(client.stats().confirmedSubscriptions, 1);
  ws.push({ type: 'msg', channel: 'ticks.AAPL', offset: 42, epoch: 'e7', data: 1 });
  assert.equal(client.subscription('ticks.AAPL').offset, 42);

  ws.push({ type: 'unsubscribed', channel: 'ticks.AAPL', reason: 'expired' });
  assert.equal(client.subscription('ticks.AAPL').subscribed, false, 'the server ended it');

  ws.drop(1006);
  assert.equal(client.stats().confirmedSubscriptions, 0, 'a lost connection confirms nothing');
  dispose();
  assert.equal(client.subscription('ticks.AAPL'), null);
  client.close();
});

test('a refused subscribe is not confirmed; a resubscription after a reconnect reports recovered', async () => {
  const harness = connected();
  const { client, clock } = harness;
  const events = [];
  client.on('subscribed', (detail) => events.push(detail));
  client.subscribe('ticks.AAPL', () => {});
  await flush();
  const frame = harness.ws.ops('subscribe')[0];
  harness.ws.push({ type: 'ack', id: frame.id, result: { 'ticks.AAPL': { error: { code: 'limit_exceeded', message: 'too many' } } } });
  assert.equal(client.subscription('ticks.AAPL').subscribed, false);
  assert.equal(events.length, 0);

  harness.ws.drop(1006);
  clock.advance(client.stateDetail.delayMs);
  harness.ws.accept();
  ackSubscribes(harness.ws, { epoch: 'e1', offset: 3 });
  assert.equal(client.subscription('ticks.AAPL').subscribed, true);
  harness.ws.push({ type: 'msg', channel: 'ticks.AAPL', offset: 4, epoch: 'e1', data: 1 });

  harness.ws.drop(1006);
  clock.advance(client.stateDetail.delayMs);
  harness.ws.accept();
  assert.deepEqual(harness.ws.ops('subscribe')[0].recover, { 'ticks.AAPL': { epoch: 'e1', offset: 4 } });
  ackSubscribes(harness.ws, { epoch: 'e1', offset: 4, recovered: true });
  assert.deepEqual(events.at(-1), { channel: 'ticks.AAPL', epoch: 'e1', offset: 4, recovered: true });
  client.close();
});

test('an ack that arrives after the unsubscribe went out confirms nothing', async () => {
  const { client, ws } = connected();
  const dispose = client.subscribe('ticks.AAPL', () => {});
  await flush();
  dispose();
  await flush();
  const again = client.subscribe('ticks.AAPL', () => {});
  ackSubscribes(ws); // answers the first subscribe only; the second is not sent yet
  assert.equal(client.subscription('ticks.AAPL').subscribed, false);
  await flush();
  ackSubscribes(ws);
  assert.equal(client.subscription('ticks.AAPL').subscribed, true);
  again();
  client.close();
});
