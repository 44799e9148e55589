// Connection tokens against a real `ferrocast serve`, made by libraries we did not write:
// - the client (clients/js) over the `ws` package: getToken() is called at connect and again
//   before each short-lived token expires (over WebSocket and over SSE, whose refresh goes
//   through the control endpoint), so the connection outlives many tokens; a fixed token
//   that expires ends with 4011 and a refused one with 4001, and the client stops instead of
//   looping;
// - tokens signed by `jose` (RS256, ES256, EdDSA) with keys served as a JWKS over HTTP
//   (auth.jwks_url), presented by the official `socket.io-client` (polling and websocket) in
//   `auth: {token}`; the attacks (expired, wrong aud, alg none, unknown kid, tampered) are
//   CONNECT_ERRORs whose message carries the code, the reason and the close code.

import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { createServer } from 'node:http';
import { test } from 'node:test';
import { EventSource } from 'eventsource';
import { SignJWT, UnsecuredJWT, exportJWK, generateKeyPair } from 'jose';
import { io } from 'socket.io-client';
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

test('getToken() refreshes over SSE through the control endpoint', { timeout: 30000 }, async (t) => {
  const server = await Ferrocast.start({ sets: SETS, name: 'auth-refresh-sse' });
  t.after(() => server.stop());
  let calls = 0;
  const states = [];
  const messages = [];
  const client = new Client({
    url: server.url,
    EventSource,
    transports: ['sse'],
    getToken: async () => {
      calls += 1;
      return shortToken('42', 2);
    },
    tokenRefreshMarginMs: 1000,
  });
  t.after(() => client.close());
  client.on('state', (state) => states.push(state));
  client.subscribe('payments.eu#42', (data) => messages.push(data));
  await waitFor(() => client.state === 'fallback', 10000, 'connected over SSE');
  await sleep(5000);
  assert.ok(calls >= 3, `getToken() called at connect and before each expiry (${calls} calls)`);
  assert.deepEqual(states, ['connecting', 'fallback'], JSON.stringify(states));
  await server.publish('payments.eu#42', { amount: 2 });
  await waitFor(() => messages.length === 1, 5000, 'the user channel message');
});

test('a refused token ends with 4001 and getToken() is not called again', { timeout: 30000 }, async (t) => {
  const server = await Ferrocast.start({ sets: [...SETS, 'auth.anonymous=false', 'auth.auth_timeout_ms=500'], name: 'auth-4001' });
  t.after(() => server.stop());
  let calls = 0;
  const forged = `${shortToken('42', 60).slice(0, -4)}AAAA`;
  const client = new Client({ url: server.url, WebSocket, transports: ['websocket'], getToken: async () => {
    calls += 1;
    return forged;
  } });
  t.after(() => client.close());
  await waitFor(() => client.state === 'disconnected', 10000, 'closed');
  assert.equal(client.stateDetail.code, 4001, JSON.stringify(client.stateDetail));
  await sleep(1500);
  assert.equal(calls, 1, 'no reconnect loop');
});

// ---------------------------------------------------------------------------------------------
// jose tokens, a JWKS, socket.io-client

/** Serves `keys` as a JWKS at /jwks.json on a free port. */
async function jwksServer(keys) {
  const http = createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ keys }));
  });
  await new Promise((resolve) => http.listen(0, '127.0.0.1', resolve));
  return { url: `http://127.0.0.1:${http.address().port}/jwks.json`, close: () => http.close() };
}

const AUD = 'ferrocast-node';

async function keyPair(alg, kid, options) {
  const { publicKey, privateKey } = await generateKeyPair(alg, options);
  return { alg, kid, privateKey, jwk: { ...(await exportJWK(publicKey)), kid } };
}

function jose(key, claims = {}, { expires = '10m', audience = AUD } = {}) {
  const jwt = new SignJWT({ ...claims }).setProtectedHeader({ alg: key.alg, kid: key.kid }).setSubject(claims.sub ?? '42');
  if (audience) jwt.setAudience(audience);
  jwt.setIssuedAt().setExpirationTime(expires);
  return jwt.sign(key.privateKey);
}

/** Connects socket.io-client; resolves with the socket, or rejects with the connect_error. */
function sioConnect(server, token, transports) {
  const socket = io(server.url, { reconnection: false, timeout: 5000, transports, auth: { token } });
  return new Promise((resolve, reject) => {
    socket.once('connect', () => resolve(socket));
    socket.once('connect_error', (err) => {
      socket.close();
      reject(err);
    });
  });
}

test('jose tokens by kid through socket.io-client, and the attacks as CONNECT_ERRORs', { timeout: 60000 }, async (t) => {
  const rsa = await keyPair('RS256', 'rsa-1');
  const ec = await keyPair('ES256', 'ec-1');
  const ed = await keyPair('EdDSA', 'ed-1', { crv: 'Ed25519' });
  const attacker = await keyPair('RS256', 'evil');
  const jwks = await jwksServer([rsa.jwk, ec.jwk, ed.jwk]);
  t.after(() => jwks.close());
  const server = await Ferrocast.start({
    sets: [`auth.jwks_url=${jwks.url}`, `auth.audience=${AUD}`, 'auth.leeway_ms=1000', 'namespaces.payments.subscribe=authenticated'],
    name: 'auth-jose',
  });
  t.after(() => server.stop());

  for (const transports of [['polling'], ['websocket']]) {
    for (const key of [rsa, ec, ed]) {
      const socket = await sioConnect(server, await jose(key), transports);
      const result = await socket.timeout(5000).emitWithAck('subscribe', { channels: ['payments.eu#42', 'payments.eu#43'] });
      assert.ok(!result['payments.eu#42'].error, JSON.stringify(result));
      assert.equal(result['payments.eu#43'].error.code, 'forbidden', JSON.stringify(result));
      socket.close();
    }
    const good = await jose(rsa);
    const [head, body] = good.split('.');
    const tampered = Buffer.from(JSON.stringify({ ...JSON.parse(Buffer.from(body, 'base64url')), sub: '1' })).toString('base64url');
    const attacks = [
      ['expired', await jose(rsa, {}, { expires: Math.floor(Date.now() / 1000) - 3600 }), 'token_expired', '"exp"', 4011],
      ['wrong aud', await jose(rsa, {}, { audience: 'someone-else' }), 'unauthorized', '"aud"', 4001],
      ['alg none', new UnsecuredJWT({ sub: '42', aud: AUD }).encode(), 'unauthorized', '"none"', 4001],
      ['unknown kid', await jose(attacker), 'unauthorized', '"evil"', 4001],
      ['tampered', `${head}.${tampered}.${good.split('.')[2]}`, 'unauthorized', 'signature', 4001],
    ];
    for (const [name, token, code, words, close] of attacks) {
      const err = await sioConnect(server, token, transports).then(
        () => assert.fail(`${name}: connected`),
        (e) => e,
      );
      assert.ok(err.message.startsWith(`${code}: `), `${name}: ${err.message}`);
      assert.ok(err.message.includes(words), `${name}: ${err.message}`);
      assert.ok(err.message.endsWith(`(${close})`), `${name}: ${err.message}`);
    }
  }
  assert.ok((await server.metric('ferrocast_auth_refused_total', 'reason="unknown_kid"')) >= 2);
});
