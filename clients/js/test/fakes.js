// Test doubles (clock, WebSocket, EventSource, fetch) that drive the client without timers or a network.
import { Ferrocast } from '../ferrocast.js';

/** Lets queued microtasks (the client's subscription reconcile) and promise callbacks run. */
export const flush = () => new Promise((resolve) => setImmediate(resolve));

/** Advances the clock in steps, letting promise callbacks (fake fetch replies) run in between. */
export async function advanceAsync(clock, ms, step = 1000) {
  for (let elapsed = 0; elapsed < ms; elapsed += step) {
    clock.advance(Math.min(step, ms - elapsed));
    await flush();
  }
}

/** Manual clock: timers fire only inside advance(), in deadline order. */
export class FakeClock {
  #now = 0;
  #nextId = 1;
  #timers = new Map();

  now = () => this.#now;

  setTimeout = (fn, ms) => {
    const id = this.#nextId++;
    this.#timers.set(id, { at: this.#now + Math.max(0, ms), fn });
    return id;
  };

  clearTimeout = (id) => {
    this.#timers.delete(id);
  };

  get pending() {
    return this.#timers.size;
  }

  advance(ms) {
    const end = this.#now + ms;
    for (;;) {
      let nextId = null;
      for (const [id, timer] of this.#timers) {
        if (timer.at <= end && (nextId === null || timer.at < this.#timers.get(nextId).at)) nextId = id;
      }
      if (nextId === null) break;
      const timer = this.#timers.get(nextId);
      this.#timers.delete(nextId);
      this.#now = timer.at;
      timer.fn();
    }
    this.#now = end;
  }
}

/** A fresh fake WebSocket class per test; instances are scripted from the server side. */
export function fakeWebSocketClass() {
  return class FakeWebSocket {
    static instances = [];
    readyState = 0;
    sent = [];
    closedWith = null;

    constructor(url) {
      this.url = url;
      FakeWebSocket.instances.push(this);
    }

    send(text) {
      this.sent.push(JSON.parse(text));
    }

    close(code, reason) {
      this.closedWith = { code, reason };
      this.readyState = 3;
    }

    accept(welcome = {}) {
      this.readyState = 1;
      this.onopen?.({});
      this.push({ type: 'welcome', session: `s${FakeWebSocket.instances.length}`, version: 1, ping_interval_ms: 25_000, ...welcome });
    }

    push(frame) {
      this.onmessage?.({ data: JSON.stringify(frame) });
    }

    drop(code = 1006, reason = '') {
      this.readyState = 3;
      this.onerror?.({});
      this.onclose?.({ code, reason, wasClean: code !== 1006 });
    }

    ops(op) {
      return this.sent.filter((frame) => frame.op === op);
    }
  };
}

/** A fresh fake EventSource class per test. */
export function fakeEventSourceClass() {
  return class FakeEventSource {
    static instances = [];
    closed = false;

    constructor(url) {
      this.url = url;
      FakeEventSource.instances.push(this);
    }

    close() {
      this.closed = true;
    }

    push(frame) {
      this.onmessage?.({ data: JSON.stringify(frame) });
    }

    welcome() {
      this.push({ type: 'welcome', session: 'sse1', version: 1, ping_interval_ms: 25_000, transport: 'sse', token: 'tok' });
    }

    fail() {
      this.onerror?.({});
    }
  };
}

/**
 * Fake fetch for POST /sse/control: answers like a server (ack, pong) unless `reply` overrides.
 * `reply(body)` may return `{status, body}`; calls are recorded in `fetch.calls`.
 */
export function fakeFetch(reply = () => null) {
  const fetch = async (url, init) => {
    const body = JSON.parse(init.body);
    fetch.calls.push({ url, body });
    const answer = reply(body) ?? defaultControlReply(body);
    const text = typeof answer.body === 'string' ? answer.body : JSON.stringify(answer.body);
    return { status: answer.status ?? 200, ok: (answer.status ?? 200) < 300, statusText: '', text: async () => text };
  };
  fetch.calls = [];
  return fetch;
}

function defaultControlReply(body) {
  if (body.op === 'ping') return { body: { type: 'pong', id: body.id } };
  if (body.op === 'subscribe') {
    const result = {};
    for (const channel of body.channels) {
      const recover = body.recover?.[channel];
      result[channel] = { epoch: recover?.epoch ?? 'e1', offset: recover?.offset ?? 0, recovered: Boolean(recover) };
    }
    return { body: { type: 'ack', id: body.id, result } };
  }
  return { body: { type: 'ack', id: body.id } };
}

/** A client on fake transports with autoConnect off, deterministic jitter and a state log. */
export function setup(options = {}) {
  const clock = new FakeClock();
  const WebSocket = fakeWebSocketClass();
  const client = new Ferrocast({ url: 'http://gw.test', WebSocket, clock, random: () => 0.5, autoConnect: false, ...options });
  const states = [];
  client.on('state', (state, detail) => states.push([state, detail]));
  return {
    clock,
    WebSocket,
    client,
    states,
    get ws() {
      return WebSocket.instances.at(-1);
    },
  };
}

/** Answers every subscribe the socket has received so far with a fresh position per channel. */
export function ackSubscribes(ws, { epoch = 'e1', offset = 0, recovered } = {}) {
  for (const frame of ws.ops('subscribe').filter((f) => !f.acked)) {
    frame.acked = true;
    const result = {};
    for (const channel of frame.channels) {
      result[channel] = { epoch, offset, recovered: recovered ?? Boolean(frame.recover?.[channel]) };
    }
    ws.push({ type: 'ack', id: frame.id, result });
  }
}
