// Unit tests for publishing: acks, errors, the bounded offline queue and rejection on close.
import test from 'node:test';
import assert from 'node:assert/strict';
import { setup, flush, fakeEventSourceClass, fakeFetch } from './fakes.js';

test('a publish resolves with the ack and rejects with a server error', async () => {
  const harness = setup({ rttIntervalMs: 3_600_000 });
  harness.client.connect();
  harness.ws.accept();
  const ok = harness.client.publish('chat.lobby', { text: 'hi' });
  const denied = harness.client.publish('ticks.AAPL', { price: 1 });
  const [first, second] = harness.ws.ops('publish');
  assert.deepEqual(first, { op: 'publish', channel: 'chat.lobby', data: { text: 'hi' }, id: first.id });
  harness.ws.push({ type: 'ack', id: first.id, result: { offset: 3, epoch: 'e' } });
  harness.ws.push({ type: 'error', id: second.id, code: 'forbidden', message: 'namespace is read-only' });
  assert.deepEqual(await ok, { offset: 3, epoch: 'e' });
  await assert.rejects(denied, { name: 'FerrocastError', code: 'forbidden' });
  assert.equal(harness.client.stats().pendingRequests, 0);
  harness.client.close();
});

test('a publish without a reply times out', async () => {
  const harness = setup({ rttIntervalMs: 3_600_000, requestTimeoutMs: 2_000 });
  harness.client.connect();
  harness.ws.accept();
  const pending = harness.client.publish('chat.lobby', 1);
  harness.clock.advance(2_000);
  await assert.rejects(pending, { code: 'timeout' });
  assert.equal(harness.client.stats().pendingRequests, 0);
  harness.client.close();
});

test('while disconnected publishes queue up to maxQueue, dropping the oldest, and flush on the welcome', async () => {
  const harness = setup({ maxQueue: 3, rttIntervalMs: 3_600_000 });
  const { client } = harness;
  client.connect();
  const outcomes = [1, 2, 3, 4, 5].map((n) => client.publish('chat.lobby', n).then(
    () => `ok ${n}`,
    (err) => `${err.code} ${n}`,
  ));
  assert.equal(client.stats().queued, 3);
  assert.equal(client.stats().dropped, 2);
  harness.ws.accept();
  assert.equal(client.stats().queued, 0);
  const published = harness.ws.ops('publish');
  assert.deepEqual(published.map((f) => f.data), [3, 4, 5]);
  for (const frame of published) harness.ws.push({ type: 'ack', id: frame.id, offset: frame.data });
  assert.deepEqual(await Promise.all(outcomes), ['dropped 1', 'dropped 2', 'ok 3', 'ok 4', 'ok 5']);
  client.close();
});

test('close() rejects queued and in-flight publishes; publishing after close() rejects at once', async () => {
  const harness = setup({ rttIntervalMs: 3_600_000 });
  const { client } = harness;
  client.connect();
  const queued = client.publish('chat.lobby', 1);
  client.close();
  await assert.rejects(queued, { code: 'closed' });
  await assert.rejects(client.publish('chat.lobby', 2), { code: 'closed' });
  await flush();
  assert.equal(client.stats().pendingRequests + client.stats().queued, 0);
});

test('a lost connection rejects in-flight publishes instead of leaving them hanging', async () => {
  const harness = setup({ rttIntervalMs: 3_600_000 });
  harness.client.connect();
  harness.ws.accept();
  const inFlight = harness.client.publish('chat.lobby', 1);
  harness.ws.drop();
  await assert.rejects(inFlight, { code: 'connection_lost' });
  harness.client.close();
});

test('over SSE a publish goes through the control endpoint; HTTP errors reject it with the best code known', async () => {
  const EventSource = fakeEventSourceClass();
  const fetch = fakeFetch((body) => {
    if (body.op === 'publish' && body.data === 2) return { status: 502, body: 'bad gateway' };
    if (body.op === 'publish' && body.data === 3) return { status: 413, body: { type: 'error', id: null, code: 'too_large', message: 'too big' } };
    return null;
  });
  const harness = setup({ EventSource, fetch, transports: ['sse'], rttIntervalMs: 3_600_000 });
  harness.client.connect();
  EventSource.instances[0].welcome();
  const ok = harness.client.publish('chat.lobby', 1);
  const failed = harness.client.publish('chat.lobby', 2);
  const tooLarge = harness.client.publish('chat.lobby', 3);
  assert.deepEqual(await ok, {});
  await assert.rejects(failed, { code: 'http_502', message: 'bad gateway' });
  await assert.rejects(tooLarge, { code: 'too_large', message: 'too big' });
  assert.deepEqual(fetch.calls[0].body, { session: 'sse1', token: 'tok', op: 'publish', channel: 'chat.lobby', data: 1, id: fetch.calls[0].body.id });
  assert.equal(harness.client.state, 'fallback');
  harness.client.close();
});
