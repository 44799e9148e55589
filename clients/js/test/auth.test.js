// Unit tests for connection tokens: a fixed token or getToken() at every connect, the auth op
// before any subscribe, the refresh before expiry, 4011 (get a new token) and 4001 (stop).
import test from 'node:test';
import assert from 'node:assert/strict';
import { setup, flush, fakeEventSourceClass, fakeFetch } from './fakes.js';

test('a fixed token is sent in an auth op right after the welcome, before subscribes', async () => {
  const harness = setup({ token: 'tok-1' });
  const { client } = harness;
  client.subscribe('payments.eu#42', () => {});
  client.connect();
  harness.ws.accept();
  await flush();
  assert.equal(harness.ws.sent[0].op, 'auth');
  assert.equal(harness.ws.sent[0].token, 'tok-1');
  assert.ok(harness.ws.sent.findIndex((f) => f.op === 'subscribe') > 0, harness.ws.sent);
  client.close();
});

test('getToken() is called at every connect, and again on close code 4011', async () => {
  let calls = 0;
  const harness = setup({ getToken: async () => `tok-${++calls}` });
  const { client, clock } = harness;
  client.connect();
  assert.equal(harness.WebSocket.instances.length, 0, 'the socket waits for the token');
  await flush();
  assert.equal(harness.WebSocket.instances.length, 1);
  harness.ws.accept();
  assert.deepEqual(harness.ws.ops('auth').map((f) => f.token), ['tok-1']);
  harness.ws.drop(4011, 'token expired: get a new token, then reconnect');
  assert.equal(client.state, 'reconnecting');
  clock.advance(60_000);
  await flush();
  assert.equal(harness.WebSocket.instances.length, 2);
  harness.ws.accept();
  assert.deepEqual(harness.ws.ops('auth').map((f) => f.token), ['tok-2']);
  assert.equal(calls, 2);
  client.close();
});

test('4011 with a fixed token stops: reconnecting would present the same expired token', () => {
  const harness = setup({ token: 'old' });
  harness.client.connect();
  harness.ws.accept();
  harness.ws.drop(4011, 'token expired: get a new token, then reconnect');
  assert.equal(harness.client.state, 'disconnected');
  assert.equal(harness.client.stateDetail.code, 4011);
});

test('4001 and 4003 never loop, with or without getToken', async () => {
  for (const code of [4001, 4003]) {
    let calls = 0;
    const harness = setup({ getToken: async () => `tok-${++calls}` });
    harness.client.connect();
    await flush();
    harness.ws.accept();
    harness.ws.drop(code, 'unauthorized');
    assert.equal(harness.client.state, 'disconnected', `code ${code}`);
    harness.clock.advance(120_000);
    await flush();
    assert.equal(harness.WebSocket.instances.length, 1, `no reconnect after ${code}`);
    assert.equal(calls, 1);
  }
});

test('the token is refreshed before it expires', async () => {
  let calls = 0;
  const harness = setup({ getToken: async () => `tok-${++calls}`, tokenRefreshMarginMs: 30_000 });
  const { client, clock } = harness;
  client.connect();
  await flush();
  harness.ws.accept();
  const [auth] = harness.ws.ops('auth');
  // The fake clock starts at 0: this token expires in a minute, so it is refreshed after 30 s.
  harness.ws.push({ type: 'ack', id: auth.id, result: { user: '42', expires_at: 60 } });
  clock.advance(29_000);
  await flush();
  assert.equal(harness.ws.ops('auth').length, 1, 'not yet');
  clock.advance(2_000);
  await flush();
  assert.deepEqual(harness.ws.ops('auth').map((f) => f.token), ['tok-1', 'tok-2']);
  client.close();
});

test('a refused auth is reported as an error event with its code', async () => {
  const harness = setup({ token: 'bad' });
  const errors = [];
  harness.client.on('error', (e) => errors.push(e));
  harness.client.connect();
  harness.ws.accept();
  const [auth] = harness.ws.ops('auth');
  harness.ws.push({ type: 'error', id: auth.id, code: 'unauthorized', message: 'the token\'s signature does not verify' });
  assert.equal(errors.length, 1);
  assert.equal(errors[0].code, 'unauthorized');
  harness.client.close();
});

test('over SSE the token goes in the URL', async () => {
  const EventSource = fakeEventSourceClass();
  const harness = setup({ transports: ['sse'], EventSource, fetch: fakeFetch(), token: 'a b' });
  harness.client.connect();
  assert.match(EventSource.instances[0].url, /[?&]token=a%20b(&|$)/);
  harness.client.close();
});
