// The client (clients/js) on Node 20's built-in WebSocket (undici, `--experimental-websocket`),
// in a child process, against a port where nothing listens and then a real `ferrocast serve`
// on it. undici reports a refused connect with an `error` event and no `close`; the client must
// count that as a failed attempt at once and go on with its jittered backoff, not wait out its
// 10 s handshake timeout (which would bring every client back in one synchronized wave).
// Also: the five-line quick start of clients/js/README.md runs as written.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';
import { Ferrocast, Inbox, REPO_ROOT, freePort, sleep, waitFor } from './lib/server.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const CHILD = path.join(HERE, 'lib', 'undici-client.mjs');
// Node 20 needs the flag for the global WebSocket; later versions have it by default.
const FLAGS = typeof globalThis.WebSocket === 'function' ? [] : ['--experimental-websocket'];

test('the client on Node\'s built-in WebSocket retries a refused connect at once, then connects and receives', { timeout: 40000 }, async (t) => {
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const channel = 'node.undici';
  const child = spawn(process.execPath, [...FLAGS, CHILD, url, channel], { stdio: ['ignore', 'pipe', 'pipe'] });
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  t.after(() => child.exitCode === null && child.kill('SIGKILL'));
  let stderr = '';
  child.stderr.on('data', (chunk) => (stderr += chunk));
  const lines = [];
  const inbox = new Inbox();
  createInterface({ input: child.stdout }).on('line', (line) => {
    const event = JSON.parse(line);
    lines.push(event);
    inbox.push(event);
  });

  // Nothing listens yet: attempts fail one after another, spaced by the backoff only.
  await sleep(3000);
  const failures = lines.filter((e) => e.event === 'state' && e.state === 'reconnecting');
  assert.ok(!lines.some((e) => e.event === 'fatal'), JSON.stringify(lines) + stderr);
  assert.ok(failures.length >= 2, `at least two failed attempts within 3 s, not one per 10 s handshake timeout: ${JSON.stringify(lines)} ${stderr}`);
  assert.ok(failures.every((e) => /error event while connecting/.test(e.reason)), `each failure is the error event itself: ${JSON.stringify(failures)}`);
  assert.ok(failures.every((e) => e.delayMs >= 0 && e.delayMs <= 2000), 'jittered backoff within its cap');
  assert.ok(failures[0].t < 2000, `the first failure is reported at once (${failures[0].t} ms)`);

  // A real server on that port: the client connects by itself, subscribes and receives.
  const server = await Ferrocast.start({ port, name: 'node-websocket' });
  t.after(() => server.stop());
  const next = async (what, match) => {
    for (;;) {
      const event = await inbox.next(10000, what);
      if (match(event)) return event;
    }
  };
  await next('connected', (e) => e.event === 'state' && e.state === 'connected');
  await next('subscribed', (e) => e.event === 'subscribed' && e.channel === channel);
  await server.publish(channel, { hello: 'undici' });
  const message = await next('the message', (e) => e.event === 'message');
  assert.deepEqual(message.data, { hello: 'undici' });

  // close() in the child left nothing behind: the process ends by itself.
  const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
  const { code, signal } = await exited;
  clearTimeout(timer);
  assert.deepEqual({ code, signal }, { code: 0, signal: null }, `the child exits on its own after close(); stderr: ${stderr}`);
});

test('the README quick start runs as written on Node\'s built-in WebSocket, imported by its package name', { timeout: 30000 }, async (t) => {
  const readme = readFileSync(path.join(REPO_ROOT, 'clients', 'js', 'README.md'), 'utf8');
  const quick = readme.slice(readme.indexOf('Quick start'));
  const code = quick.slice(quick.indexOf('```js\n') + 6, quick.indexOf('```', quick.indexOf('```js\n') + 6));
  assert.equal(code.trim().split('\n').length, 5, `five lines:\n${code}`);
  assert.match(code, /from '@ferrocast\/client'/);
  const server = await Ferrocast.start({ name: 'node-readme' });
  t.after(() => server.stop());
  // An application's node_modules with the package in it, as `npm install @ferrocast/client` makes.
  const app = mkdtempSync(path.join(tmpdir(), 'ferrocast-readme-'));
  t.after(() => rmSync(app, { recursive: true, force: true }));
  mkdirSync(path.join(app, 'node_modules', '@ferrocast'), { recursive: true });
  symlinkSync(path.join(REPO_ROOT, 'clients', 'js'), path.join(app, 'node_modules', '@ferrocast', 'client'));
  writeFileSync(path.join(app, 'quick.mjs'), code.replace('https://push.example.com', server.url));
  const child = spawn(process.execPath, [...FLAGS, path.join(app, 'quick.mjs')], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.after(() => child.exitCode === null && child.kill('SIGKILL'));
  let stderr = '';
  child.stderr.on('data', (chunk) => (stderr += chunk));
  const lines = new Inbox();
  createInterface({ input: child.stdout }).on('line', (line) => lines.push(line));
  assert.equal(await lines.next(10000, 'the first state line'), 'link connecting');
  assert.equal(await lines.next(10000, `the connected line; stderr: ${stderr}`), 'link connected');
  await waitFor(async () => {
    const { channels } = await (await fetch(`${server.url}/api/channels`)).json();
    return channels.some((c) => c.channel === 'ticks.AAPL' && c.subscribers === 1);
  }, 10000, 'the subscription to ticks.AAPL');
  await server.publish('ticks.AAPL', { price: 231.25 });
  assert.equal(await lines.next(10000, 'the printed price'), '231.25');
});
