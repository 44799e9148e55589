// Child process of e2e/test_cluster.py's rolling restart: COUNT clients of the project's JS
// client (clients/js) on one channel, all through one URL (a load balancer in front of the
// nodes), each recording what it receives.
//
// Usage: node cluster-clients.mjs URL CHANNEL COUNT. Prints {"event":"ready"} once every
// client is subscribed; answers each "report" line on stdin with one JSON line:
// {"event":"report","clients":[{n, offsets, epochs, subscribed, gaps, duplicates, reconnects,
// sessions}]}.
// Exits when stdin closes.

import { createInterface } from 'node:readline';
import WebSocket from 'ws';
import { Ferrocast } from '../../../clients/js/ferrocast.js';

const [url, channel, countArg] = process.argv.slice(2);
const print = (event) => process.stdout.write(`${JSON.stringify(event)}\n`);

const clients = [];
let ready = 0;
for (let i = 0; i < Number(countArg); i += 1) {
  const record = { n: [], offsets: [], epochs: [], subscribed: [], gaps: [], sessions: [], states: [] };
  const client = new Ferrocast({ url, WebSocket, backoff: { baseMs: 100, maxMs: 1000 } });
  client.on('subscribed', (detail) => {
    if (record.subscribed.length === 0 && (ready += 1) === clients.length) print({ event: 'ready' });
    record.subscribed.push({ recovered: detail.recovered, replayed: detail.replayed ?? null });
  });
  client.on('connected', (detail) => record.sessions.push(detail.session));
  client.on('gap', (gap) => record.gaps.push(gap));
  client.on('state', (state, detail) => record.states.push([Date.now() % 100000, state, detail?.code ?? null, detail?.reason ?? null, detail?.delayMs ?? null]));
  client.subscribe(channel, (data, meta) => {
    record.n.push(data.n);
    record.offsets.push(meta.offset);
    if (record.epochs.at(-1) !== meta.epoch) record.epochs.push(meta.epoch);
  });
  clients.push({ client, record });
}

createInterface({ input: process.stdin })
  .on('line', (line) => {
    if (line.trim() !== 'report') return;
    print({
      event: 'report',
      clients: clients.map(({ client, record }) => ({ ...record, duplicates: client.stats().duplicates, reconnects: client.stats().reconnects })),
    });
  })
  .on('close', () => {
    for (const { client } of clients) client.close();
  });
