// Unit tests for the full-jitter exponential backoff and its use by the reconnect loop.
import test from 'node:test';
import assert from 'node:assert/strict';
import { backoffDelay } from '../ferrocast.js';
import { setup } from './fakes.js';

const backoff = { baseMs: 500, maxMs: 30_000 };
const almostOne = () => 0.999999;

test('the delay is random(0, min(max, base * 2^attempt))', () => {
  assert.equal(backoffDelay(0, backoff, () => 0), 0);
  for (let attempt = 0; attempt < 12; attempt++) {
    const cap = Math.min(backoff.maxMs, backoff.baseMs * 2 ** attempt);
    const high = backoffDelay(attempt, backoff, almostOne);
    assert.ok(high < cap && high >= cap - 1, `attempt ${attempt}: ${high} vs cap ${cap}`);
    assert.equal(backoffDelay(attempt, backoff, () => 0.5), Math.floor(cap / 2));
  }
});

test('the cap never exceeds maxMs, even after very many attempts', () => {
  for (const attempt of [6, 7, 50, 1_000, 1e9]) {
    const delay = backoffDelay(attempt, backoff, almostOne);
    assert.ok(Number.isFinite(delay) && delay < backoff.maxMs && delay >= backoff.maxMs - 1);
  }
  assert.equal(backoffDelay(-3, backoff, almostOne), backoff.baseMs - 1);
});

test('full jitter covers the whole range and stays inside it', () => {
  const cap = backoff.baseMs * 2 ** 3;
  const samples = Array.from({ length: 5_000 }, () => backoffDelay(3, backoff));
  assert.ok(samples.every((delay) => Number.isInteger(delay) && delay >= 0 && delay < cap));
  assert.ok(Math.min(...samples) < cap * 0.05, 'some delays are near zero');
  assert.ok(Math.max(...samples) > cap * 0.95, 'some delays are near the cap');
  const mean = samples.reduce((sum, delay) => sum + delay, 0) / samples.length;
  assert.ok(Math.abs(mean - cap / 2) < cap * 0.05, `mean ${mean} is about cap/2`);
});

test('the client grows the delay per failed attempt, caps it, and resets it after a welcome', () => {
  const { client, WebSocket, clock, states } = setup({ transports: ['websocket'], random: almostOne, backoff: { baseMs: 100, maxMs: 1_000 } });
  client.connect();
  const delays = [];
  for (let i = 0; i < 6; i++) {
    WebSocket.instances.at(-1).drop();
    const [state, detail] = states.at(-1);
    assert.equal(state, 'reconnecting');
    delays.push(detail.delayMs);
    clock.advance(detail.delayMs);
  }
  assert.deepEqual(delays, [99, 199, 399, 799, 999, 999]);

  WebSocket.instances.at(-1).accept();
  assert.equal(client.state, 'connected');
  WebSocket.instances.at(-1).drop();
  assert.equal(states.at(-1)[1].delayMs, 99, 'back to the first step after a successful session');
  client.close();
});

test('reconnect attempts are never a tight loop, even when every attempt fails at once', () => {
  const { client, WebSocket, clock } = setup({ transports: ['websocket'], random: () => 0.5, backoff: { baseMs: 500, maxMs: 30_000 } });
  client.connect();
  for (let elapsed = 0; elapsed < 120_000; elapsed += 10) {
    const ws = WebSocket.instances.at(-1);
    if (ws.readyState === 0) ws.drop();
    clock.advance(10);
  }
  // Waits of 0.25, 0.5, 1, 2, 4, 8 s, then 15 s each: 13 attempts in two minutes, not thousands.
  assert.equal(WebSocket.instances.length, 13);
  client.close();
});
