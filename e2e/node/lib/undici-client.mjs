// Child process of node-websocket.test.mjs: the real client on Node's built-in (undici) WebSocket.
//
// Usage: node [--experimental-websocket] undici-client.mjs URL CHANNEL. Prints one JSON line per
// state change, subscription and message; closes the client after the first message, and the
// process must then exit by itself (no timer or socket left).

import { Ferrocast } from '../../../clients/js/ferrocast.js';

const [url, channel] = process.argv.slice(2);
const started = Date.now();
const print = (event) => process.stdout.write(`${JSON.stringify({ t: Date.now() - started, ...event })}\n`);

if (typeof globalThis.WebSocket !== 'function') {
  print({ event: 'fatal', message: 'no global WebSocket (Node 20 needs --experimental-websocket)' });
  process.exit(2);
}

// No WebSocket option: the client picks up the global one, as an application would.
const client = new Ferrocast({ url, backoff: { baseMs: 500, maxMs: 2000 } });
client.on('state', (state, detail) => print({ event: 'state', state, reason: detail?.reason ?? null, delayMs: detail?.delayMs ?? null }));
client.on('subscribed', (detail) => print({ event: 'subscribed', channel: detail.channel }));
client.subscribe(channel, (data) => {
  print({ event: 'message', data });
  client.close();
});
