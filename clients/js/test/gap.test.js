// Unit tests for offset tracking: gap detection, ephemeral messages, duplicates and recovery acks.
import test from 'node:test';
import assert from 'node:assert/strict';
import { setup, flush, ackSubscribes, fakeEventSourceClass, fakeFetch } from './fakes.js';

async function subscribed(channel = 'ticks.AAPL', ack = { epoch: 'e1', offset: 10 }) {
  const harness = setup({ rttIntervalMs: 3_600_000 });
  const { client } = harness;
  const received = [];
  const gaps = [];
  client.on('gap', (gap) => gaps.push(gap));
  client.subscribe(channel, (data, meta) => received.push(meta.offset));
  client.connect();
  harness.ws.accept();
  ackSubscribes(harness.ws, ack);
  await flush();
  const push = (offset, extra = {}) => harness.ws.push({ type: 'msg', channel, offset, data: { offset }, ...extra });
  return Object.assign(harness, { received, gaps, push });
}

test('consecutive offsets raise no gap; a jump raises one and tracking continues', async () => {
  const { client, received, gaps, push } = await subscribed();
  push(11);
  push(12);
  push(15);
  push(16);
  assert.deepEqual(received, [11, 12, 15, 16]);
  assert.deepEqual(gaps, [{ channel: 'ticks.AAPL', reason: 'offset', expected: 13, received: 15 }]);
  assert.equal(client.stats().gaps, 1);
  client.close();
});

test('ephemeral messages carry the last retained offset and neither advance nor check it', async () => {
  const { client, received, gaps, push } = await subscribed('candles.AAPL.1m');
  push(11);
  push(11, { ephemeral: true });
  push(11, { ephemeral: true });
  push(12);
  push(12, { ephemeral: true });
  assert.deepEqual(received, [11, 11, 11, 12, 12]);
  assert.deepEqual(gaps, []);
  client.close();
});

test('a retained message at or below the last offset is a duplicate and is dropped', async () => {
  const { client, received, gaps, push } = await subscribed();
  push(11);
  push(12);
  push(12);
  push(9);
  push(13);
  assert.deepEqual(received, [11, 12, 13]);
  assert.deepEqual(gaps, []);
  assert.equal(client.stats().duplicates, 2);
  client.close();
});

test('an ack with recovered:false after a reconnect raises a gap; recovered:true does not', async () => {
  const harness = await subscribed();
  const { client, clock, gaps, push } = harness;
  push(11);
  harness.ws.drop();
  clock.advance(client.stateDetail.delayMs);
  harness.ws.accept();
  assert.deepEqual(harness.ws.ops('subscribe')[0].recover, { 'ticks.AAPL': { epoch: 'e1', offset: 11 } });
  ackSubscribes(harness.ws, { epoch: 'e1', offset: 14, recovered: true });
  push(12);
  push(13);
  push(14);
  assert.deepEqual(gaps, []);

  harness.ws.drop();
  clock.advance(client.stateDetail.delayMs);
  harness.ws.accept();
  assert.deepEqual(harness.ws.ops('subscribe')[0].recover, { 'ticks.AAPL': { epoch: 'e1', offset: 14 } });
  ackSubscribes(harness.ws, { epoch: 'e2', offset: 3, recovered: false });
  assert.deepEqual(gaps, [{ channel: 'ticks.AAPL', reason: 'not_recovered', epoch: 'e2', previousEpoch: 'e1' }]);
  push(4);
  push(5);
  assert.equal(gaps.length, 1, 'the new epoch starts a fresh sequence');
  client.close();
});

test('without any message, recovery starts from the offset of the subscribe ack', async () => {
  const harness = await subscribed('ticks.AAPL', { epoch: 'e1', offset: 41 });
  harness.ws.drop();
  harness.clock.advance(harness.client.stateDetail.delayMs);
  harness.ws.accept();
  assert.deepEqual(harness.ws.ops('subscribe')[0].recover, { 'ticks.AAPL': { epoch: 'e1', offset: 41 } });
  harness.client.close();
});

test('over SSE, known positions are recovered with a control subscribe and fresh channels join by URL', async () => {
  const EventSource = fakeEventSourceClass();
  const fetch = fakeFetch();
  const harness = setup({ EventSource, fetch, transports: ['sse'], rttIntervalMs: 3_600_000 });
  const { client, clock } = harness;
  const gaps = [];
  const received = [];
  client.on('gap', (gap) => gaps.push(gap));
  client.subscribe('ticks.AAPL', (data, meta) => received.push(meta.offset));
  client.connect();
  let es = EventSource.instances[0];
  assert.equal(es.url, 'http://gw.test/sse?channels=ticks.AAPL');
  es.welcome();
  es.push({ type: 'ack', id: null, result: { 'ticks.AAPL': { epoch: 'e1', offset: 5, recovered: false } } });
  es.push({ type: 'msg', channel: 'ticks.AAPL', offset: 6, data: {} });
  client.subscribe('quotes.AAPL', () => {});
  await flush();
  assert.deepEqual(fetch.calls.at(-1).body, { session: 'sse1', token: 'tok', op: 'subscribe', channels: ['quotes.AAPL'], id: fetch.calls.at(-1).body.id });

  es.fail();
  clock.advance(client.stateDetail.delayMs);
  es = EventSource.instances[1];
  assert.equal(es.url, 'http://gw.test/sse', 'every channel has a position to recover');
  es.welcome();
  // The stream may deliver replayed messages before the control reply arrives.
  es.push({ type: 'msg', channel: 'ticks.AAPL', offset: 7, data: {} });
  await flush();
  const control = fetch.calls.find((call) => call.body.recover);
  assert.deepEqual(control.body.recover, { 'ticks.AAPL': { epoch: 'e1', offset: 6 }, 'quotes.AAPL': { epoch: 'e1', offset: 0 } });
  es.push({ type: 'msg', channel: 'ticks.AAPL', offset: 8, data: {} });
  assert.deepEqual(received, [6, 7, 8]);
  assert.deepEqual(gaps, []);
  client.close();
});

test('a message with a new epoch under a live subscription raises a gap and starts a fresh sequence', async () => {
  const { client, received, gaps, push } = await subscribed();
  push(11, { epoch: 'e1' });
  push(3, { epoch: 'e2' });
  push(4, { epoch: 'e2' });
  assert.deepEqual(received, [11, 3, 4]);
  assert.deepEqual(gaps, [{ channel: 'ticks.AAPL', reason: 'epoch', epoch: 'e2', previousEpoch: 'e1' }]);
  client.close();
});

test('a snapshot at the ack offset is delivered as the start of the sequence', async () => {
  const harness = setup({ rttIntervalMs: 3_600_000 });
  const received = [];
  harness.client.subscribe('quotes.AAPL', (data, meta) => received.push(meta.offset));
  harness.client.connect();
  harness.ws.accept();
  const [frame] = harness.ws.ops('subscribe');
  harness.ws.push({ type: 'ack', id: frame.id, result: { 'quotes.AAPL': { epoch: 'e', offset: 189, snapshot: { count: 1, kind: 'latest' } } } });
  harness.ws.push({ type: 'msg', channel: 'quotes.AAPL', offset: 189, epoch: 'e', data: {} });
  harness.ws.push({ type: 'msg', channel: 'quotes.AAPL', offset: 190, epoch: 'e', data: {} });
  assert.deepEqual(received, [189, 190]);
  assert.equal(harness.client.stats().gaps + harness.client.stats().duplicates, 0);
  harness.client.close();
});
