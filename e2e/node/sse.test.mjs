// Interop with the `eventsource` npm package (a WHATWG EventSource for Node) against /sse:
// the welcome and ack, messages with cursor ids, the control endpoint, resuming with
// Last-Event-ID (given by hand, and sent by EventSource itself when the server ends the
// stream), and a drain followed by a restarted server at the same address.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { EventSource } from 'eventsource';
import { Ferrocast, Inbox, sleep, waitFor } from './lib/server.mjs';

/** Opens an EventSource whose events (parsed data, with their lastEventId) go to an inbox. */
function open(url, { lastEventId } = {}) {
  const init = {};
  if (lastEventId !== undefined) {
    init.fetch = (input, options) =>
      fetch(input, { ...options, headers: { ...options.headers, 'Last-Event-ID': lastEventId } });
  }
  const es = new EventSource(url, init);
  const inbox = new Inbox();
  const opened = new Inbox();
  es.onopen = () => opened.push(true);
  es.onmessage = (e) => inbox.push({ id: e.lastEventId, frame: JSON.parse(e.data) });
  return { es, inbox, opened };
}

async function handshake(inbox) {
  const welcome = (await inbox.next(5000, 'the welcome')).frame;
  assert.equal(welcome.type, 'welcome');
  assert.equal(welcome.transport, 'sse');
  const ack = (await inbox.next(5000, 'the ack')).frame;
  assert.equal(ack.type, 'ack');
  return { welcome, ack };
}

async function control(server, welcome, body) {
  const r = await fetch(`${server.url}/sse/control`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ session: welcome.session, token: welcome.token, ...body }),
  });
  return { status: r.status, body: await r.json() };
}

test('eventsource: subscribe, receive, control, resume with Last-Event-ID, close', async () => {
  const server = await Ferrocast.start({ name: 'sse' });
  try {
    const { es, inbox } = open(`${server.url}/sse?channels=chat.es1`);
    const { welcome, ack } = await handshake(inbox);
    assert.equal(ack.result['chat.es1'].offset, 0);

    const p1 = await server.publish('chat.es1', { n: 1 });
    const m1 = await inbox.next(5000, 'a message');
    assert.equal(m1.frame.type, 'msg');
    assert.deepEqual(m1.frame.data, { n: 1 });
    assert.equal(m1.id, `chat.es1=${p1.epoch}:1`);

    // Control without dropping the stream: subscribe, ping, publish (allowed and refused).
    const sub = await control(server, welcome, { op: 'subscribe', id: 1, channels: ['chat.es2'] });
    assert.equal(sub.status, 200);
    assert.equal(sub.body.result['chat.es2'].offset, 0);
    assert.deepEqual((await control(server, welcome, { op: 'ping', id: 2 })).body, { type: 'pong', id: 2 });
    const pub = await control(server, welcome, { op: 'publish', id: 3, channel: 'chat.es2', data: 'hi' });
    assert.equal(pub.body.result.offset, 1);
    const m2 = await inbox.next();
    assert.equal(m2.frame.data, 'hi');
    assert.equal(m2.id, `chat.es1=${p1.epoch}:1,chat.es2=${pub.body.result.epoch}:1`);
    const refused = await control(server, welcome, { op: 'publish', id: 4, channel: 'ticks.X', data: 1 });
    assert.equal(refused.body.code, 'forbidden');
    const wrong = await control(server, { ...welcome, token: 'guess' }, { op: 'ping' });
    assert.equal(wrong.status, 403);

    // The client goes away; messages are published meanwhile.
    es.close();
    await server.publish('chat.es1', { n: 2 });
    await server.publish('chat.es2', 'there');
    await server.publish('chat.es1', { n: 3 });

    // A new EventSource sends the last id it saw: both channels resume, replay before live.
    const again = open(`${server.url}/sse?channels=chat.es1`, { lastEventId: m2.id });
    const resumed = await handshake(again.inbox);
    assert.equal(resumed.ack.result['chat.es1'].recovered, true);
    assert.equal(resumed.ack.result['chat.es1'].replayed, 2);
    assert.equal(resumed.ack.result['chat.es2'].recovered, true);
    assert.equal(resumed.ack.result['chat.es2'].replayed, 1);
    const replay = [];
    for (let i = 0; i < 3; i++) {
      const m = (await again.inbox.next()).frame;
      replay.push(`${m.channel}:${m.offset}`);
    }
    assert.deepEqual(replay.sort(), ['chat.es1:2', 'chat.es1:3', 'chat.es2:2']);
    await server.publish('chat.es2', 'live');
    assert.equal((await again.inbox.next()).frame.data, 'live');
    await again.inbox.quiet(200);
    again.es.close();
    await waitFor(
      async () => (await server.metric('ferrocast_connections', 'transport="sse"')) === 0,
      5000,
      'the stream to be closed',
    );
  } finally {
    await server.stop();
  }
});

test('eventsource reconnects by itself after a 4008 and recovers exactly once', async () => {
  // A tiny queue: a burst overflows it, the server ends the stream with a close event, and
  // EventSource comes back with Last-Event-ID and gets the rest from history.
  const server = await Ferrocast.start({
    sets: ['server.queue_max_bytes=1024', 'server.reconnect_after_ms=50'],
    name: 'sse-4008',
  });
  try {
    const { es, inbox, opened } = open(`${server.url}/sse?channels=chat.burst`);
    await opened.next(5000, 'the stream to open');
    await handshake(inbox);
    const pad = 'x'.repeat(400);
    const messages = Array.from({ length: 60 }, (_, i) => ({ channel: 'chat.burst', data: { i, pad } }));
    const r = await fetch(`${server.url}/api/publish`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ messages }),
    });
    assert.equal(r.status, 200);
    const seen = [];
    let closes = 0;
    let reopened = 0;
    while (seen.length < 60) {
      const { frame } = await inbox.next(10000, `message ${seen.length + 1} of 60`);
      if (frame.type === 'msg') seen.push(frame.data.i);
      else if (frame.type === 'close') {
        assert.equal(frame.code, 4008);
        closes += 1;
      } else if (frame.type === 'welcome') reopened += 1;
      else if (frame.type === 'ack') {
        assert.equal(frame.result['chat.burst'].recovered, true, JSON.stringify(frame));
      }
    }
    assert.deepEqual(seen, Array.from({ length: 60 }, (_, i) => i), 'every message once, in order');
    assert.ok(closes >= 1, 'the burst overflowed the queue at least once');
    assert.equal(reopened, closes, 'EventSource reconnected after every close');
    es.close();
  } finally {
    await server.stop();
  }
});

test('a drain ends the stream with retry; EventSource resumes on the restarted server', async () => {
  const first = await Ferrocast.start({ sets: ['server.reconnect_after_ms=300'], name: 'sse-drain' });
  const port = first.port;
  const { es, inbox } = open(`${first.url}/sse?channels=chat.restart`);
  let second;
  try {
    const { welcome } = await handshake(inbox);
    await control(first, welcome, { op: 'subscribe', channels: ['chat.extra'] });
    await first.publish('chat.restart', 1);
    const last = await inbox.next();
    assert.ok(last.id.includes('chat.extra='), last.id);

    first.drain();
    const close = (await inbox.next(5000, 'the close event')).frame;
    assert.equal(close.type, 'close');
    assert.equal(close.code, 1001);
    const hint = JSON.parse(close.reason);
    assert.equal(hint.reconnect, true);
    await first.exited;

    // Same address, new process: EventSource reconnects by itself with its Last-Event-ID;
    // history did not survive the restart, so the channels come back unrecovered.
    second = await Ferrocast.start({ port, name: 'sse-drain-restarted' });
    const { ack } = await handshake(inbox);
    assert.deepEqual(Object.keys(ack.result).sort(), ['chat.extra', 'chat.restart']);
    assert.equal(ack.result['chat.restart'].recovered, false);
    await second.publish('chat.extra', 'back');
    assert.equal((await inbox.next()).frame.data, 'back');
  } finally {
    es.close();
    await first.stop();
    await second?.stop();
    await sleep(10);
  }
});
