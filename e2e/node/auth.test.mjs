// The client (clients/js) with connection tokens against a real `ferrocast serve`, over the
// `ws` package: getToken() is called at connect and again before each short-lived token
// expires, so the connection outlives many tokens without a reconnect; a fixed token that
// expires ends with close code 4011 and the client stops instead of looping.

import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { test } from 'node:test';
import WebSocket from 'ws';
import { Ferrocast as Client } from '../../clients/js/ferrocast.js';
import { Ferrocast, sleep, waitFor } from './lib/server.mjs';

const SECRET = 'node-e2e-secret-0123456789abcdef0123';
const SETS = [
  `auth.hmac_secret=${SECRET}`,
  'auth.leeway_ms=0',
  'auth.expiry_grace_ms=200',
  'namespaces.payments.subscribe=authenticated',
];

const b64 = (value) => Buffer.from(typeof value === 'string' ? value : JSON.stringify(value)).toString('base64url');

/** An HS256 JWT (RFC 7515 compact form) signed with node:crypto. */
function sign(claims) {
  const input = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${input}.${createHmac('sha256', SECRET).update(input).digest('base64url')}`;
}

const shortToken = (sub = '42', seconds = 2) => sign({ sub, exp: Math.floor(Date.now() / 1000) + seconds });

test('getToken() refreshes short-lived tokens on the open connection', { timeout: 30000 }, async (t) => {
  const server = await Ferrocast.start({ sets: SETS, name: 'auth-refresh' });
  t.after(() => server.stop());
  let calls = 0;
  const states = [];
  const messages = [];
  const client = new Client({
    url: server.url,
    WebSocket,
    transports: ['websocket'],
    getToken: async () => {
      calls += 1;
      return shortToken('42', 2);
    },
    tokenRefreshMarginMs: 1000,
  });
  t.after(() => client.close());
  client.on('state', (state, detail) => states.push([state, detail?.code ?? null]));
  client.subscribe('payments.eu#42', (data) => messages.push(data));
  await waitFor(() => client.state === 'connected', 10000, 'connected');
  // Several token lifetimes: each is refreshed before its exp, so the server never closes.
  await sleep(5000);
  assert.ok(calls >= 3, `getToken() called at connect and before each expiry (${calls} calls)`);
  assert.deepEqual(states.map(([s]) => s), ['connecting', 'connected'], JSON.stringify(states));
  await server.publish('payments.eu#42', { amount: 1 });
  await waitFor(() => messages.length === 1, 5000, 'the user channel message');
  assert.deepEqual(messages[0], { amount: 1 });
});

test('a fixed token that expires ends with 4011 and the client does not loop', { timeout: 30000 }, async (t) => {
  const server = await Ferrocast.start({ sets: SETS, name: 'auth-expiry' });
  t.after(() => server.stop());
  const client = new Client({ url: server.url, WebSocket, transports: ['websocket'], token: shortToken('42', 1) });
  t.after(() => client.close());
  await waitFor(() => client.state === 'connected', 10000, 'connected');
  await waitFor(() => client.state === 'disconnected', 10000, 'closed after exp');
  assert.equal(client.stateDetail.code, 4011, JSON.stringify(client.stateDetail));
  await sleep(1500);
  assert.equal(client.state, 'disconnected', 'no reconnect with the same expired token');
});
