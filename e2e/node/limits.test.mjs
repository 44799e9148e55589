// Limits against abuse ([limits]) with Node clients: the `ws` package flooding requests gets
// `rate_limited` errors, then close 4029; the client (clients/js) refused by a connection
// limit with close 1013 waits the hint's `after_ms` and connects once a place is free.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import WebSocket from 'ws';
import { Ferrocast as Client } from '../../clients/js/ferrocast.js';
import { Ferrocast, Inbox, waitFor } from './lib/server.mjs';

test('a ws flood is refused with rate_limited, then closed with 4029', { timeout: 30000 }, async (t) => {
  const server = await Ferrocast.start({ name: 'limits-flood' });
  t.after(() => server.stop());
  const ws = new WebSocket(`${server.wsUrl}/ws`);
  const frames = new Inbox();
  const counts = { pong: 0, rate_limited: 0 };
  let firstError = null;
  ws.on('message', (data) => {
    const frame = JSON.parse(data.toString());
    if (frame.type === 'pong') counts.pong += 1;
    if (frame.type === 'error') {
      counts[frame.code] = (counts[frame.code] ?? 0) + 1;
      firstError ??= frame;
    }
    frames.push(frame);
  });
  const closed = new Promise((resolve) => ws.on('close', (code, reason) => resolve({ code, reason: reason.toString() })));
  await new Promise((resolve) => ws.once('open', resolve));
  for (let i = 1; i <= 2000 && ws.readyState === WebSocket.OPEN; i++) ws.send(JSON.stringify({ op: 'ping', id: i }));
  const { code, reason } = await closed;
  assert.equal(code, 4029);
  assert.match(reason, /rate limited/);
  // One burst (200) and what the rate refilled meanwhile went through; the rest was refused.
  assert.ok(counts.pong >= 200 && counts.pong <= 260, JSON.stringify(counts));
  assert.ok(counts.rate_limited >= 1, JSON.stringify(counts));
  assert.equal(firstError.code, 'rate_limited');
  assert.ok(firstError.id > 200, JSON.stringify(firstError));
  assert.match(firstError.message, /limits\.commands_per_s/);
  assert.ok((await server.metric('ferrocast_closes_total', 'code="4029"')) >= 1);
});

test('the client waits out a 1013 hint, then connects once a place is free', { timeout: 30000 }, async (t) => {
  const server = await Ferrocast.start({ name: 'limits-hint', sets: ['limits.connections_per_ip=1'] });
  t.after(() => server.stop());
  const holder = new WebSocket(`${server.wsUrl}/ws`);
  await new Promise((resolve) => holder.once('message', resolve));
  const states = [];
  const client = new Client({ url: server.url, WebSocket, transports: ['websocket'], backoff: { baseMs: 100, maxMs: 200 } });
  t.after(() => client.close());
  client.on('state', (state, detail) => states.push({ state, ...detail }));
  client.connect();
  const refused = await waitFor(() => states.find((s) => s.state === 'reconnecting'), 5000, 'the refusal');
  assert.equal(refused.code, 1013);
  const hint = JSON.parse(refused.reason);
  assert.equal(hint.limit, 'limits.connections_per_ip');
  // The delay is the hint's (server.reconnect_after_ms, jittered), not the 100 ms backoff.
  assert.ok(refused.delayMs >= hint.after_ms && hint.after_ms >= 1000, JSON.stringify(refused));
  holder.close();
  await waitFor(() => client.state === 'connected', 10000, 'connected after the hint');
});
