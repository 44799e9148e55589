// Transport benchmark: N subscribers on one channel over /ws, /sse and Socket.IO
// (websocket and polling transports), messages published through the HTTP batch API, and for each
// transport the delivered messages per second and the server's CPU time per million
// deliveries (utime + stime from /proc/PID/stat).
//
//   node e2e/node/bench-transports.mjs [--subscribers 1000] [--messages 2000] [--batch 100]
//        [--size 100] [--shape pad|tick|doc] [--compress-min 0]
//        [--transports ws,ws-deflate,sse,sse-gzip,socketio,socketio-upgrade,socketio-polling]
//        [--json out.json]
//
// `--shape tick` publishes market-data trades shaped like the simulator's ticks (~100 B of
// data), `--shape doc` 2 KiB JSON documents (rows of an order book), `pad` (the default) a
// counter and `--size` bytes of padding. `ws-deflate` is /ws with permessage-deflate offered by
// the client (Node ws inflates every compressed frame) and `namespaces.bench.compress = true`
// with `compress_min_bytes = --compress-min` on the server; `sse-gzip` is /sse asking for
// `Accept-Encoding: gzip` against the same server settings. For the WebSocket and SSE
// transports the bytes the clients' sockets read (TCP payload: frame headers included) are
// reported per delivery.
//
// The server is $FERROCAST_BIN (build it with `cargo build --release -p ferrocast` and point
// FERROCAST_BIN at target/release/ferrocast: debug builds say little about CPU cost). It runs
// on this machine next to the clients, so messages/s is bounded by the clients as much as by
// the server; CPU per delivery is the figure to compare. Publishing is closed-loop: a new
// batch goes out only while the slowest subscriber is at most `--window` batches behind, so
// no queue overflows and every subscriber gets every message.

import { readFileSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import zlib from 'node:zlib';
import { parseArgs } from 'node:util';
import { io } from 'socket.io-client';
import WebSocket from 'ws';
import { Ferrocast, sleep, waitFor } from './lib/server.mjs';

const { values: args } = parseArgs({
  options: {
    subscribers: { type: 'string', default: '1000' },
    messages: { type: 'string', default: '2000' },
    batch: { type: 'string', default: '100' },
    size: { type: 'string', default: '100' },
    shape: { type: 'string', default: 'pad' },
    'compress-min': { type: 'string', default: '0' },
    window: { type: 'string', default: '4' },
    transports: { type: 'string', default: 'ws,sse,socketio,socketio-polling' },
    json: { type: 'string' },
  },
});
const N = Number(args.subscribers);
const M = Number(args.messages);
const BATCH = Number(args.batch);
const SIZE = Number(args.size);
const SHAPE = args.shape;
const COMPRESS_MIN = Number(args['compress-min']);
const WINDOW = Number(args.window);
const CHANNEL = 'bench.fanout';
const TICKS = 100; // USER_HZ on Linux

/** Server CPU seconds so far (user + system). */
function cpuSeconds(pid) {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / TICKS;
}

function rssMiB(pid) {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  return Number(status.match(/VmRSS:\s+(\d+)/)[1]) / 1024;
}

/** Counts occurrences of `needle` across chunk boundaries. */
function counter(needle) {
  const n = Buffer.from(needle);
  let tail = Buffer.alloc(0);
  return (chunk) => {
    const buf = tail.length ? Buffer.concat([tail, chunk]) : chunk;
    let count = 0;
    for (let i = buf.indexOf(n); i !== -1; i = buf.indexOf(n, i + n.length)) count++;
    tail = buf.subarray(Math.max(0, buf.length - (n.length - 1)));
    return count;
  };
}

// --- subscribers, one kind per transport; each exposes `count` and `close()` -----------------

async function wsSubscriber(server, _agent, deflate = false) {
  const ws = new WebSocket(`ws://127.0.0.1:${server.port}/ws`, { perMessageDeflate: deflate });
  const sub = { count: 0, close: () => ws.terminate(), bytesRead: () => ws._socket?.bytesRead ?? 0 };
  await new Promise((resolve, reject) => {
    ws.once('error', reject);
    ws.on('message', (data) => {
      if (data[9] === 0x6d /* {"type":"m */) sub.count++;
      else if (data.includes('"type":"ack"')) resolve();
      else if (data.includes('"type":"welcome"')) {
        ws.send(JSON.stringify({ op: 'subscribe', id: 1, channels: [CHANNEL] }));
      } else if (data.includes('"type":"ping"')) ws.send('{"op":"pong"}');
    });
  });
  return sub;
}

async function sseSubscriber(server, agent, gzip = false) {
  const sub = { count: 0, close: () => req.destroy(), bytesRead: () => req.socket?.bytesRead ?? 0 };
  const count = counter('"type":"msg"');
  let req;
  await new Promise((resolve, reject) => {
    const headers = gzip ? { 'accept-encoding': 'gzip' } : {};
    req = http.get(
      { host: '127.0.0.1', port: server.port, path: `/sse?channels=${CHANNEL}`, agent, headers },
      (response) => {
        if (gzip && response.headers['content-encoding'] !== 'gzip') {
          reject(new Error('the event stream is not gzip-encoded'));
          return;
        }
        // Node's zlib inflates each chunk as it arrives (sync flush).
        const res = gzip ? response.pipe(zlib.createGunzip({ flush: zlib.constants.Z_SYNC_FLUSH })) : response;
        let acked = false;
        res.on('data', (chunk) => {
          if (!acked && chunk.includes('"type":"ack"')) {
            acked = true;
            resolve();
          }
          sub.count += count(chunk);
        });
      },
    );
    req.once('error', reject);
  });
  return sub;
}

async function socketioSubscriber(server, transport) {
  const transports = transport === 'upgrade' ? ['polling', 'websocket'] : [transport];
  const socket = io(server.url, { transports, forceNew: true, reconnection: false });
  const sub = { count: 0, close: () => socket.close() };
  socket.on('message', () => sub.count++);
  await new Promise((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('connect_error', reject);
  });
  if (transport === 'upgrade' && socket.io.engine.transport.name !== 'websocket') {
    await new Promise((resolve) => socket.io.engine.once('upgrade', resolve));
  }
  await socket.timeout(30000).emitWithAck('subscribe', CHANNEL);
  return sub;
}

const TRANSPORTS = {
  ws: { label: '/ws (native WebSocket)', open: wsSubscriber },
  'ws-deflate': {
    label: '/ws with permessage-deflate',
    open: (server, agent) => wsSubscriber(server, agent, true),
    sets: ['namespaces.bench.compress=true', `namespaces.bench.compress_min_bytes=${COMPRESS_MIN}`],
  },
  sse: { label: '/sse (Server-Sent Events)', open: sseSubscriber },
  'sse-gzip': {
    label: '/sse gzip-encoded',
    open: (server, agent) => sseSubscriber(server, agent, true),
    sets: ['namespaces.bench.compress=true', `namespaces.bench.compress_min_bytes=${COMPRESS_MIN}`],
  },
  socketio: {
    label: 'Socket.IO (websocket transport)',
    open: (server) => socketioSubscriber(server, 'websocket'),
  },
  'socketio-upgrade': {
    label: 'Socket.IO (polling, upgraded to websocket)',
    open: (server) => socketioSubscriber(server, 'upgrade'),
  },
  'socketio-polling': {
    label: 'Socket.IO (polling transport)',
    open: (server) => socketioSubscriber(server, 'polling'),
  },
};

// --- one run ----------------------------------------------------------------------------------

const SYMBOLS = ['AAPL', 'MSFT', 'NVDA', 'AMZN', 'GOOGL', 'META', 'TSLA', 'AMD'];

/** The data of message `i` in the chosen shape. */
function payload(i) {
  if (SHAPE === 'tick') {
    // The simulator's trade: {"sym","price","size","ts","exchange","id","seq","src"}.
    const price = +(180 + ((i * 7919) % 5000) / 100).toFixed(2);
    return { sym: SYMBOLS[i % 8], price, size: 100 * (1 + (i % 10)), ts: 1796470871358 + i, exchange: [4, 11, 12, 21][i % 4], id: String(i), seq: i, src: 'sim' };
  }
  if (SHAPE === 'doc') {
    // About 2 KiB: one side of an order book with 48 levels.
    const rows = Array.from({ length: 48 }, (_, k) => ({ price: +(180 + k * 0.01 + (i % 100) / 100).toFixed(2), size: 100 * (1 + ((i + k) % 17)), orders: 1 + ((i * k) % 9) }));
    return { i, sym: SYMBOLS[i % 8], ts: 1796470871358 + i, side: i % 2 ? 'bid' : 'ask', levels: rows };
  }
  return { i, p: 'x'.repeat(Math.max(0, SIZE - 20)) };
}

async function publishBatch(server, from, n) {
  const messages = Array.from({ length: n }, (_, i) => ({ channel: CHANNEL, data: payload(from + i) }));
  const r = await fetch(`${server.url}/api/publish`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ messages }),
  });
  if (r.status !== 200) throw new Error(`publish answered ${r.status}: ${await r.text()}`);
}

async function run(name) {
  const { label, open, sets = [] } = TRANSPORTS[name];
  const server = await Ferrocast.start({ name: `bench-${name}`, sets: ['server.max_connections=100000', ...sets] });
  const agent = new http.Agent({ keepAlive: false, maxSockets: Infinity });
  const subs = [];
  try {
    const t = Date.now();
    for (let i = 0; i < N; i += 50) {
      const n = Math.min(50, N - i);
      subs.push(...(await Promise.all(Array.from({ length: n }, () => open(server, agent)))));
    }
    const connectS = (Date.now() - t) / 1000;
    await sleep(300);
    const idleRss = rssMiB(server.proc.pid);
    const min = () => subs.reduce((m, s) => Math.min(m, s.count), Infinity);

    const readBytes = () => subs.reduce((sum, x) => sum + (x.bytesRead ? x.bytesRead() : 0), 0);
    const read0 = readBytes();
    const cpu0 = cpuSeconds(server.proc.pid);
    const t0 = process.hrtime.bigint();
    let published = 0;
    while (published < M) {
      while (published - min() > WINDOW * BATCH) await sleep(1);
      const n = Math.min(BATCH, M - published);
      await publishBatch(server, published, n);
      published += n;
    }
    await waitFor(() => min() >= M, 120000, `every subscriber to receive ${M} messages`);
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    const cpu = cpuSeconds(server.proc.pid) - cpu0;
    const deliveries = subs.reduce((s, x) => s + x.count, 0);
    const read = readBytes() - read0;
    const result = {
      transport: name,
      label,
      subscribers: N,
      messages: M,
      deliveries,
      seconds: +seconds.toFixed(3),
      deliveries_per_s: Math.round(deliveries / seconds),
      server_cpu_s: +cpu.toFixed(2),
      server_cpu_s_per_million: +((cpu / deliveries) * 1e6).toFixed(3),
      server_cpu_share: +(cpu / seconds).toFixed(2),
      shape: SHAPE,
      wire_bytes_per_delivery: read ? +(read / deliveries).toFixed(1) : null,
      rss_idle_mib: +idleRss.toFixed(1),
      rss_kib_per_connection: +(((idleRss * 1024) / N)).toFixed(1),
      connect_s: +connectS.toFixed(2),
    };
    console.log(JSON.stringify(result));
    return result;
  } finally {
    for (const s of subs) s.close();
    agent.destroy();
    await server.stop();
  }
}

const results = [];
for (const name of args.transports.split(',')) results.push(await run(name.trim()));
const what = SHAPE === 'pad' ? `~${SIZE} B` : SHAPE === 'tick' ? 'market-data ticks' : '2 KiB JSON documents';
console.log(
  `\n${N} subscribers on one channel, ${M} messages (${what}) in batches of ${BATCH}, ` +
    `${os.cpus().length} CPUs shared by server and clients\n`,
);
console.log('transport                         deliveries/s   server CPU s per 1M deliveries   wire bytes per delivery');
for (const r of results) {
  console.log(
    `${r.label.padEnd(34)}${String(r.deliveries_per_s).padStart(12)}   ${r.server_cpu_s_per_million.toFixed(3).padStart(10)}` +
      `${String(r.wire_bytes_per_delivery ?? '-').padStart(28)}`,
  );
}
if (args.json) writeFileSync(args.json, JSON.stringify(results, null, 2));
