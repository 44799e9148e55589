// Unit tests for sockets that report a failure with `error` alone (Node 20's built-in WebSocket, undici).
import test from 'node:test';
import assert from 'node:assert/strict';
import { setup, fakeWebSocketClass } from './fakes.js';

/** Like undici after a refused connect: `error` fires, readyState stays CONNECTING, no `close` ever. */
function refusing(FakeWebSocket) {
  return class RefusedWebSocket extends FakeWebSocket {
    refuse() {
      this.onerror?.({ type: 'error' });
    }
  };
}

test('an error while CONNECTING with no close ends the attempt at once, then the jittered backoff applies', () => {
  const WebSocket = refusing(fakeWebSocketClass());
  const { client, clock, states } = setup({ WebSocket, transports: ['websocket'], handshakeTimeoutMs: 10_000 });
  client.connect();
  WebSocket.instances[0].refuse();
  assert.equal(client.state, 'reconnecting', 'no wait for the 10 s handshake timeout');
  const [, detail] = states.at(-1);
  assert.equal(detail.code, 1006);
  assert.match(detail.reason, /error event while connecting/);
  assert.equal(detail.delayMs, 250, 'random 0.5 of the 500 ms first step');
  assert.ok(WebSocket.instances[0].closedWith, 'the failed socket is closed');

  clock.advance(250);
  assert.equal(WebSocket.instances.length, 2, 'the second attempt comes after the backoff, not after 10 s');
  WebSocket.instances[1].refuse();
  assert.equal(states.at(-1)[1].delayMs, 500, 'the backoff grows per failed attempt');
  clock.advance(500);
  WebSocket.instances[2].accept();
  assert.equal(client.state, 'connected');
  client.close();
  assert.equal(clock.pending, 0);
});

test('a close event that follows the error still wins: its code is kept, one attempt is counted once', () => {
  const WebSocket = fakeWebSocketClass();
  const { client, states } = setup({ WebSocket });
  client.connect();
  WebSocket.instances[0].accept();
  WebSocket.instances[0].drop(4001, 'unauthorized'); // error (readyState CLOSED), then close 4001
  assert.equal(client.state, 'disconnected');
  assert.deepEqual(client.stateDetail, { code: 4001, reason: 'unauthorized' });
  assert.equal(states.filter(([s]) => s === 'reconnecting').length, 0);
});

test('an error on an open socket with no close ends it after a short grace', () => {
  const WebSocket = fakeWebSocketClass();
  const { client, clock, states } = setup({ WebSocket, rttIntervalMs: 3_600_000 });
  client.connect();
  const ws = WebSocket.instances[0];
  ws.accept();
  ws.onerror({ type: 'error' });
  assert.equal(client.state, 'connected', 'a close event may still follow');
  clock.advance(999);
  assert.equal(client.state, 'connected');
  clock.advance(1);
  assert.equal(client.state, 'reconnecting');
  assert.match(states.at(-1)[1].reason, /error event without close/);
  ws.onclose?.({ code: 1006, reason: '' }); // a late close changes nothing
  assert.equal(states.filter(([s]) => s === 'reconnecting').length, 1);
  client.close();
  assert.equal(clock.pending, 0, 'no grace timer left behind');
});

test('closing the client during the error grace clears the grace timer', () => {
  const WebSocket = fakeWebSocketClass();
  const { client, clock } = setup({ WebSocket });
  client.connect();
  WebSocket.instances[0].accept();
  WebSocket.instances[0].onerror({ type: 'error' });
  client.close();
  assert.equal(clock.pending, 0);
  assert.equal(client.state, 'disconnected');
});
