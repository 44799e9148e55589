// Unit tests for the connection-quality score and the RTT measurement that feeds it.
import test from 'node:test';
import assert from 'node:assert/strict';
import { qualityScore } from '../ferrocast.js';
import { setup } from './fakes.js';

test('the formula: 100 minus capped RTT, jitter, loss and reconnect penalties', () => {
  assert.equal(qualityScore({}), 100);
  assert.equal(qualityScore({ srttMs: 50, jitterMs: 0 }), 100);
  assert.equal(qualityScore({ srttMs: 250, jitterMs: 0 }), 80);
  assert.equal(qualityScore({ srttMs: 450, jitterMs: 0 }), 60);
  assert.equal(qualityScore({ srttMs: 5_000, jitterMs: 0 }), 60, 'RTT costs at most 40');
  assert.equal(qualityScore({ srttMs: 20, jitterMs: 50 }), 90);
  assert.equal(qualityScore({ srttMs: 20, jitterMs: 1_000 }), 80, 'jitter costs at most 20');
  assert.equal(qualityScore({ missedPongs: 1 }), 90);
  assert.equal(qualityScore({ missedPongs: 7 }), 80, 'loss costs at most 20');
  assert.equal(qualityScore({ recentReconnects: 1 }), 90);
  assert.equal(qualityScore({ recentReconnects: 9 }), 80, 'reconnects cost at most 20');
  assert.equal(qualityScore({ srttMs: 1_000, jitterMs: 500, missedPongs: 5, recentReconnects: 5 }), 0);
  assert.equal(qualityScore({ connected: false, srttMs: 1 }), 0);
});

test('the score never rises when any input gets worse', () => {
  let previous = 101;
  for (let rtt = 0; rtt <= 1_000; rtt += 10) {
    const score = qualityScore({ srttMs: rtt, jitterMs: rtt / 4 });
    assert.ok(Number.isInteger(score) && score >= 0 && score <= 100);
    assert.ok(score <= previous);
    previous = score;
  }
});

test('the client pings a second after the welcome and then every rttIntervalMs, and measures RTT from the pong', () => {
  const harness = setup({ rttIntervalMs: 5_000 });
  const { client, clock } = harness;
  const samples = [];
  client.on('latency', (latency) => samples.push(latency));
  client.connect();
  const ws = harness.ws;
  ws.accept();
  clock.advance(999);
  assert.equal(ws.ops('ping').length, 0);
  clock.advance(1);
  const [first] = ws.ops('ping');
  assert.ok(Number.isInteger(first.id));
  clock.advance(40);
  ws.push({ type: 'pong', id: first.id });
  assert.equal(client.rtt, 40);
  assert.deepEqual(samples.at(-1), { rtt: 40, srtt: 40, jitter: 0, missedPongs: 0, recentReconnects: 0, quality: 100 });

  clock.advance(4_960);
  const second = ws.ops('ping')[1];
  clock.advance(360);
  ws.push({ type: 'pong', id: second.id });
  assert.equal(client.rtt, 360);
  assert.equal(samples.at(-1).srtt, 40 + (360 - 40) / 8);
  assert.equal(samples.at(-1).jitter, 320 / 4);
  assert.equal(client.quality, qualityScore({ srttMs: 80, jitterMs: 80 }));
  ws.push({ type: 'pong', id: 999 });
  assert.equal(client.rtt, 360, 'an unexpected pong is ignored');
  client.close();
});

test('missed pongs and lost connections lower the score; being down scores 0', () => {
  const harness = setup({ rttIntervalMs: 1_000, pingGraceMs: 3_600_000 });
  const { client, clock } = harness;
  client.connect();
  harness.ws.accept();
  assert.equal(client.quality, 100);
  clock.advance(3_000);
  assert.equal(client.stats().missedPongs, 2);
  assert.equal(client.quality, 80);

  harness.ws.drop();
  assert.equal(client.quality, 0, 'reconnecting');
  clock.advance(client.stateDetail.delayMs);
  harness.ws.accept();
  const { recentReconnects, missedPongs } = client.stats();
  assert.equal(recentReconnects, 1);
  assert.equal(client.quality, qualityScore({ missedPongs, recentReconnects }));
  clock.advance(5 * 60_000);
  harness.ws.push({ type: 'ping' });
  assert.equal(client.stats().recentReconnects, 0, 'reconnects older than five minutes no longer count');
  client.close();
});
