// Dependency-free ES module client for the ferrocast push gateway: WebSocket with SSE fallback, recovery and link quality.

/** Connection states, in the order a healthy client usually visits them. */
export const STATES = Object.freeze(['connecting', 'connected', 'reconnecting', 'fallback', 'disconnected']);

/** Close codes after which the client stops instead of reconnecting. */
export const TERMINAL_CLOSE_CODES = Object.freeze([1008, 4001, 4003]);

/** Close code meaning "the token expired: get a new token, then reconnect". */
export const TOKEN_EXPIRED_CLOSE_CODE = 4011;

// A name, optionally followed by a user suffix `#USER[,USER...]` (a user channel); 255 bytes at most.
const CHANNEL_RE = /^[A-Za-z0-9_.:@-]+(#[A-Za-z0-9_.:@-]+(,[A-Za-z0-9_.:@-]+)*)?$/;
const WS_CONNECTING = 0;
const WS_OPEN = 1;
// How long a close event may lag behind an error on an open socket before the error alone ends it.
const ERROR_CLOSE_GRACE_MS = 1_000;
const DEFAULT_PING_INTERVAL_MS = 25_000;
const FIRST_PING_MS = 1_000;
const QUICK_PROBE_MS = 5_000;
const PING_WINDOW = 10;
const RECONNECT_WINDOW_MS = 5 * 60_000;
const MAX_BACKOFF_EXPONENT = 30;
const NAMED_TIMERS = ['reconnect', 'handshake', 'liveness', 'rtt', 'probe', 'probeHandshake', 'refresh'];
const noop = () => {};
const decoder = new TextDecoder();

const DEFAULTS = Object.freeze({
  transports: ['websocket', 'sse'],
  wsPath: '/ws',
  ssePath: '/sse',
  params: null,
  backoff: { baseMs: 500, maxMs: 30_000 },
  handshakeTimeoutMs: 10_000,
  fallbackAfter: 2,
  wsRetryMs: 60_000,
  pingGraceMs: 10_000,
  rttIntervalMs: 5_000,
  requestTimeoutMs: 10_000,
  maxQueue: 1_000,
  autoConnect: true,
  token: null,
  getToken: null,
  tokenRefreshMarginMs: 30_000,
});

/** Error carried by rejected publishes and by `error` events. */
export class FerrocastError extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'FerrocastError';
    this.code = code;
  }
}

/**
 * Reconnect delay with full jitter: a uniform random value in [0, min(maxMs, baseMs * 2^attempt)).
 * @param {number} attempt zero-based count of consecutive failed attempts
 * @param {{baseMs: number, maxMs: number}} backoff
 * @param {() => number} [random] uniform source in [0, 1)
 * @returns {number} whole milliseconds
 */
export function backoffDelay(attempt, { baseMs, maxMs }, random = Math.random) {
  const exponent = Math.min(Math.max(0, attempt), MAX_BACKOFF_EXPONENT);
  const cap = Math.min(maxMs, baseMs * 2 ** exponent);
  return Math.floor(random() * cap);
}

/**
 * Connection-quality score, 0 (unusable or down) to 100 (perfect):
 *
 *   quality = round(100 − P_rtt − P_jitter − P_loss − P_reconnect), clamped to [0, 100], 0 when not connected
 *   P_rtt       = min(40, max(0, srtt − 50) / 10)   smoothed RTT: nothing up to 50 ms, the full 40 at 450 ms
 *   P_jitter    = min(20, jitter / 5)               RTT variation: the full 20 at 100 ms
 *   P_loss      = min(20, 10 × missedPongs)         pings unanswered among the last 10
 *   P_reconnect = min(20, 10 × recentReconnects)    established connections lost in the last 5 minutes
 *
 * srtt and jitter are exponentially weighted as in TCP (RFC 6298): srtt += (rtt − srtt) / 8 and
 * jitter += (|rtt − srtt| − jitter) / 4, starting from srtt = first sample and jitter = 0.
 * Without an RTT sample yet, P_rtt and P_jitter are 0.
 *
 * @param {{connected?: boolean, srttMs?: number|null, jitterMs?: number|null, missedPongs?: number, recentReconnects?: number}} link
 * @returns {number} integer in [0, 100]
 */
export function qualityScore({ connected = true, srttMs = null, jitterMs = null, missedPongs = 0, recentReconnects = 0 } = {}) {
  if (!connected) return 0;
  const rttPenalty = srttMs == null ? 0 : Math.min(40, Math.max(0, srttMs - 50) / 10);
  const jitterPenalty = jitterMs == null ? 0 : Math.min(20, jitterMs / 5);
  const lossPenalty = Math.min(20, 10 * missedPongs);
  const reconnectPenalty = Math.min(20, 10 * recentReconnects);
  return Math.max(0, Math.min(100, Math.round(100 - rttPenalty - jitterPenalty - lossPenalty - reconnectPenalty)));
}

/** Round-trip statistics and recent failures feeding qualityScore. */
class LinkQuality {
  rtt = null;
  srtt = null;
  jitter = null;
  #outcomes = [];
  #drops = [];

  sample(rtt) {
    this.rtt = rtt;
    if (this.srtt == null) {
      this.srtt = rtt;
      this.jitter = 0;
    } else {
      this.jitter += (Math.abs(rtt - this.srtt) - this.jitter) / 4;
      this.srtt += (rtt - this.srtt) / 8;
    }
    this.#record(true);
  }

  miss() {
    this.#record(false);
  }

  drop(now) {
    this.#drops.push(now);
    if (this.#drops.length > PING_WINDOW) this.#drops.shift();
  }

  missedPongs() {
    return this.#outcomes.filter((answered) => !answered).length;
  }

  recentReconnects(now) {
    while (this.#drops.length && now - this.#drops[0] > RECONNECT_WINDOW_MS) this.#drops.shift();
    return this.#drops.length;
  }

  snapshot(connected, now) {
    const missedPongs = this.missedPongs();
    const recentReconnects = this.recentReconnects(now);
    return {
      rtt: this.rtt,
      srtt: this.srtt,
      jitter: this.jitter,
      missedPongs,
      recentReconnects,
      quality: qualityScore({ connected, srttMs: this.srtt, jitterMs: this.jitter, missedPongs, recentReconnects }),
    };
  }

  #record(answered) {
    this.#outcomes.push(answered);
    if (this.#outcomes.length > PING_WINDOW) this.#outcomes.shift();
  }
}

/** Splits one transport payload (a JSON object or an array of them) into frames. */
function parseFrames(text, log) {
  let parsed;
  try {
    parsed = JSON.parse(text);
  } catch {
    log.warn('ferrocast: ignoring a frame that is not JSON');
    return [];
  }
  const frames = Array.isArray(parsed) ? parsed : [parsed];
  return frames.filter((frame) => frame !== null && typeof frame === 'object');
}

/** One native WebSocket session; reports frames and exactly one end. */
class WsConnection {
  transport = 'websocket';
  welcome = null;
  #ws = null;
  #done = false;
  #errorTimer = null;
  #clock;
  #onFrame;
  #onEnd;
  #log;

  constructor(url, WebSocketImpl, { clock, onFrame, onEnd, log }) {
    this.#clock = clock;
    this.#onFrame = onFrame;
    this.#onEnd = onEnd;
    this.#log = log;
    try {
      const ws = new WebSocketImpl(url);
      ws.binaryType = 'arraybuffer';
      ws.onmessage = (event) => this.#receive(event.data);
      ws.onclose = (event) => this.#end({ code: event.code ?? null, reason: event.reason ?? '', wasClean: Boolean(event.wasClean) });
      ws.onerror = () => this.#onError();
      this.#ws = ws;
    } catch (err) {
      queueMicrotask(() => this.#end({ code: null, reason: String(err?.message ?? err) }));
    }
  }

  /**
   * Browsers follow every error with a close event (1006), which carries the code. Node 20's
   * built-in WebSocket (undici) fires only `error` after a refused connect and stays CONNECTING:
   * waiting for a close, or for the handshake timeout, would hold every client for the same
   * fixed time and bring them back in synchronized waves. So an error while CONNECTING ends
   * the attempt at once, and one on an open socket does when no close follows shortly.
   */
  #onError() {
    if (this.#done) return;
    if (this.#ws.readyState === WS_CONNECTING) {
      this.#fail('connection failed (error event while connecting)');
    } else if (this.#errorTimer === null) {
      this.#errorTimer = this.#clock.setTimeout(() => this.#fail('connection failed (error event without close)'), ERROR_CLOSE_GRACE_MS);
    }
  }

  #fail(reason) {
    const ws = this.#ws;
    this.#end({ code: 1006, reason, wasClean: false });
    ws.onerror = null;
    try {
      ws.close();
    } catch (err) {
      this.#log.debug('ferrocast: closing a failed WebSocket failed', err);
    }
  }

  send(frame) {
    if (this.#done || this.#ws?.readyState !== WS_OPEN) return false;
    this.#ws.send(JSON.stringify(frame));
    return true;
  }

  close(code = 1000, reason = '') {
    if (this.#done) return;
    this.#done = true;
    this.#cancelErrorTimer();
    const ws = this.#ws;
    if (!ws) return;
    ws.onmessage = null;
    ws.onclose = null;
    ws.onerror = null;
    try {
      ws.close(code, reason);
    } catch (err) {
      this.#log.debug('ferrocast: closing the WebSocket failed', err);
    }
  }

  #receive(data) {
    const text = typeof data === 'string' ? data : decoder.decode(data);
    for (const frame of parseFrames(text, this.#log)) {
      if (this.#done) return;
      this.#onFrame(this, frame);
    }
  }

  #end(info) {
    if (this.#done) return;
    this.#done = true;
    this.#cancelErrorTimer();
    if (this.#ws) {
      this.#ws.onmessage = null;
      this.#ws.onclose = null;
    }
    this.#onEnd(this, info);
  }

  #cancelErrorTimer() {
    if (this.#errorTimer === null) return;
    this.#clock.clearTimeout(this.#errorTimer);
    this.#errorTimer = null;
  }
}

/** One SSE session: an EventSource for server frames and POST /sse/control for client ops. */
class SseConnection {
  transport = 'sse';
  welcome = null;
  #es = null;
  #done = false;
  #controlUrl;
  #fetch;
  #clock;
  #timeoutMs;
  #onFrame;
  #onEnd;
  #log;

  constructor(url, controlUrl, { EventSource, fetch, clock, timeoutMs, onFrame, onEnd, log }) {
    this.#controlUrl = controlUrl;
    this.#fetch = fetch;
    this.#clock = clock;
    this.#timeoutMs = timeoutMs;
    this.#onFrame = onFrame;
    this.#onEnd = onEnd;
    this.#log = log;
    try {
      const es = new EventSource(url);
      es.onmessage = (event) => this.#receive(event.data);
      // EventSource would reconnect by itself at a fixed pace; the client owns reconnection instead.
      es.onerror = () => this.#end({ code: null, reason: 'event stream error' });
      this.#es = es;
    } catch (err) {
      queueMicrotask(() => this.#end({ code: null, reason: String(err?.message ?? err) }));
    }
  }

  send(frame) {
    if (this.#done || !this.welcome) return false;
    // The stream's secret also travels as a header, so an `auth` frame's own `token` can take the body's.
    const body = JSON.stringify({ session: this.welcome.session, token: this.welcome.token, ...frame });
    const abort = new AbortController();
    const timer = this.#clock.setTimeout(() => abort.abort(), this.#timeoutMs);
    this.#fetch(this.#controlUrl, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'x-ferrocast-stream-token': this.welcome.token },
      body,
      signal: abort.signal,
      cache: 'no-store',
    })
      .then(async (res) => {
        if (res.status === 404 || res.status === 403) {
          this.#end({ code: null, status: res.status, reason: res.status === 404 ? 'unknown SSE session' : 'SSE session token refused' });
          return;
        }
        const text = await res.text();
        const replies = res.ok ? parseFrames(text, this.#log) : [controlError(res, text, frame.id)];
        // Replies are delivered even after close(): a publish sent before a transport switch still resolves.
        for (const reply of replies) this.#onFrame(this, reply);
      })
      .catch((err) => this.#end({ code: null, reason: `control request failed: ${err?.message ?? err}` }))
      .finally(() => this.#clock.clearTimeout(timer));
    return true;
  }

  close() {
    if (this.#done) return;
    this.#done = true;
    if (!this.#es) return;
    this.#es.onmessage = null;
    this.#es.onerror = null;
    this.#es.close();
  }

  #receive(data) {
    for (const frame of parseFrames(data, this.#log)) {
      if (this.#done) return;
      // The last event of a stream the server ends carries what a WebSocket close frame would.
      if (frame.type === 'close') this.#end({ code: frame.code ?? null, reason: frame.reason ?? '' });
      else this.#onFrame(this, frame);
    }
  }

  #end(info) {
    if (this.#done) return;
    this.close();
    this.#onEnd(this, info);
  }
}

/** The error frame of a non-200 control reply: the gateway's own (400, 413, …) or one made from the status. */
function controlError(res, text, id) {
  let reply = null;
  try {
    reply = JSON.parse(text);
  } catch {
    // not JSON: a proxy or another server answered
  }
  if (reply?.type !== 'error') reply = { type: 'error', code: `http_${res.status}`, message: text || res.statusText || 'control request failed' };
  return { ...reply, id: reply.id ?? id ?? null };
}

/** Parses the JSON reconnect hint a server puts in the reason of a 1001 or 1013 close. */
function parseReconnectHint(reason) {
  if (!reason) return null;
  try {
    const hint = JSON.parse(reason);
    return hint !== null && typeof hint === 'object' ? hint : null;
  } catch {
    return null;
  }
}

/** Fills in missing logger methods with no-ops. */
function normalizeLogger(logger) {
  const log = {};
  for (const level of ['debug', 'info', 'warn', 'error']) {
    log[level] = typeof logger?.[level] === 'function' ? logger[level].bind(logger) : noop;
  }
  return log;
}

/** Derives the WebSocket URL, SSE URL base and control URL from the base URL option. */
function resolveEndpoints(url, { wsPath, ssePath, params }) {
  const location = globalThis.location;
  if (url == null && !location) throw new TypeError('ferrocast: the url option is required outside a browser');
  const base = new URL(url ?? location.href, location?.href);
  const secure = base.protocol === 'https:' || base.protocol === 'wss:';
  const prefix = url == null ? '' : base.pathname.replace(/\/+$/, '');
  const query = params ? new URLSearchParams(params).toString() : '';
  const http = `${secure ? 'https' : 'http'}://${base.host}${prefix}`;
  return {
    ws: `${secure ? 'wss' : 'ws'}://${base.host}${prefix}${wsPath}${query ? `?${query}` : ''}`,
    sse: `${http}${ssePath}`,
    sseQuery: query,
    control: `${http}${ssePath}/control`,
  };
}

/** Drops undefined fields so that they fall back to the defaults. */
function withoutUndefined(object = {}) {
  return Object.fromEntries(Object.entries(object).filter(([, value]) => value !== undefined));
}

function validateChannel(channel) {
  if (typeof channel !== 'string' || channel.length > 255 || !CHANNEL_RE.test(channel)) {
    throw new TypeError(`ferrocast: invalid channel name ${JSON.stringify(channel)}`);
  }
}

/**
 * The ferrocast client. Connects over WebSocket, falls back to SSE, reconnects with jittered
 * backoff, recovers channel positions and measures link quality. See README.md for the full API.
 */
export class Ferrocast {
  #opts;
  #clock;
  #random;
  #log;
  #WebSocket;
  #EventSource;
  #fetch;
  #endpoints;

  #state = 'disconnected';
  #stateDetail = null;
  #stopped = true;
  #transport = null;
  #mode = null;
  #sseSince = 0;
  #wsWorked = false;
  #conn = null;
  #probe = null;
  #attempt = 0;
  #wsFailures = 0;
  #timers = new Map();
  #pingIntervalMs = DEFAULT_PING_INTERVAL_MS;
  #lastFrameAt = 0;

  #nextId = 1;
  #pending = new Map();
  #rttPing = null;
  #queue = [];
  #link = new LinkQuality();
  #counters = { messages: 0, duplicates: 0, gaps: 0, reconnects: 0, dropped: 0 };

  #events = new Map();
  #channels = new Map();
  #serverSubs = new Set();
  #confirmed = new Set();
  #reconcileQueued = false;
  /** The connection token in use, and the getToken() call a pending open waits for. */
  #token = null;
  #tokenAttempt = null;

  /**
   * @param {object} [options] see README.md; every field is optional in a browser
   */
  constructor(options = {}) {
    const given = withoutUndefined(options);
    const opts = { ...DEFAULTS, ...given, backoff: { ...DEFAULTS.backoff, ...withoutUndefined(given.backoff) } };
    this.#opts = opts;
    this.#log = normalizeLogger(opts.logger);
    this.#random = opts.random ?? Math.random;
    this.#clock = opts.clock ?? {
      setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
      clearTimeout: (id) => globalThis.clearTimeout(id),
      now: () => Date.now(),
    };
    this.#WebSocket = opts.WebSocket ?? globalThis.WebSocket;
    this.#EventSource = opts.EventSource ?? globalThis.EventSource;
    this.#fetch = opts.fetch ?? globalThis.fetch?.bind(globalThis);
    this.#endpoints = resolveEndpoints(opts.url, opts);
    if (!this.#can('websocket') && !this.#can('sse')) {
      throw new TypeError('ferrocast: no usable transport (pass WebSocket, or EventSource and fetch)');
    }
    if (opts.autoConnect) {
      this.#state = 'connecting';
      queueMicrotask(() => {
        if (this.#stopped && this.#state === 'connecting') this.connect();
      });
    }
  }

  /** Current state: one of STATES. */
  get state() {
    return this.#state;
  }

  /** Detail object of the last state event (for `disconnected`: `{code, reason}`). */
  get stateDetail() {
    return this.#stateDetail;
  }

  /** Transport of the current or pending connection: "websocket", "sse" or null before the first attempt. */
  get transport() {
    return this.#transport;
  }

  /** Session id from the server's welcome, or null while not connected. */
  get session() {
    return this.#conn?.welcome?.session ?? null;
  }

  /** Last measured round-trip time in ms, or null. */
  get rtt() {
    return this.#link.rtt;
  }

  /** Connection-quality score 0-100 (see qualityScore). */
  get quality() {
    return this.#latency().quality;
  }

  /** Starts connecting (automatic unless `autoConnect: false`); a no-op while running. */
  connect() {
    if (!this.#stopped) return;
    this.#stopped = false;
    this.#restart();
  }

  /** Reconnects now: drops the current connection, resets the backoff and prefers WebSocket again. */
  retry() {
    this.#stopped = false;
    this.#teardown(new FerrocastError('retry', 'connection restarted by retry()'));
    this.#restart();
  }

  /** Closes with code 1000, stops reconnecting and clears every timer; queued publishes are rejected. */
  close() {
    if (this.#stopped && this.#state === 'disconnected') return;
    this.#halt({ code: 1000, reason: 'client closed' });
  }

  /**
   * Adds a listener for a client event; returns a function that removes it.
   * Events: connecting, connected, reconnecting, fallback, disconnected, state, latency, subscribed, gap, error, unsubscribed.
   */
  on(event, listener) {
    if (typeof listener !== 'function') throw new TypeError('ferrocast: listener must be a function');
    let listeners = this.#events.get(event);
    if (!listeners) {
      listeners = new Set();
      this.#events.set(event, listeners);
    }
    listeners.add(listener);
    return () => this.off(event, listener);
  }

  /** Removes a listener added with on(). */
  off(event, listener) {
    const listeners = this.#events.get(event);
    if (!listeners) return;
    listeners.delete(listener);
    if (listeners.size === 0) this.#events.delete(event);
  }

  /**
   * Calls `listener(data, meta)` for each message on `channel`; returns an idempotent disposer.
   * Listeners of one channel share one server subscription, dropped with the last disposer.
   * `meta` is `{channel, offset, ephemeral, epoch}`.
   */
  subscribe(channel, listener) {
    validateChannel(channel);
    if (typeof listener !== 'function') throw new TypeError('ferrocast: listener must be a function');
    let entry = this.#channels.get(channel);
    if (!entry) {
      entry = { listeners: new Set(), epoch: null, last: null, ackOffset: null, recovering: false };
      this.#channels.set(channel, entry);
      this.#scheduleReconcile();
    }
    const registration = { listener };
    entry.listeners.add(registration);
    let active = true;
    return () => {
      if (!active) return;
      active = false;
      entry.listeners.delete(registration);
      if (entry.listeners.size === 0 && this.#channels.get(channel) === entry) {
        this.#channels.delete(channel);
        this.#scheduleReconcile();
      }
    };
  }

  /**
   * Publishes `data` on `channel`; resolves with the server's ack (e.g. `{offset, epoch}`).
   * While disconnected the publish waits in a bounded queue (oldest dropped and rejected first).
   */
  publish(channel, data) {
    validateChannel(channel);
    return new Promise((resolve, reject) => {
      const frame = { op: 'publish', channel, data };
      if (this.#conn?.welcome) {
        this.#request(frame, 'publish', resolve, reject);
      } else if (this.#stopped) {
        reject(new FerrocastError('closed', 'client is not connected'));
      } else {
        this.#queue.push({ frame, resolve, reject });
        if (this.#queue.length > this.#opts.maxQueue) {
          this.#counters.dropped += 1;
          this.#queue.shift().reject(new FerrocastError('dropped', 'outgoing queue full: oldest publish dropped'));
        }
      }
    });
  }

  /**
   * What the client knows of one channel: null without listeners, else `{channel, listeners,
   * subscribed, epoch, offset}`. `subscribed` is true once the server has confirmed the
   * subscription on the current connection (the `subscribed` event), false while it is pending,
   * refused or lost; `offset` is the last retained offset seen (or the one the ack reported).
   */
  subscription(channel) {
    const entry = this.#channels.get(channel);
    if (!entry) return null;
    return {
      channel,
      listeners: entry.listeners.size,
      subscribed: this.#confirmed.has(channel),
      epoch: entry.epoch,
      offset: entry.last ?? entry.ackOffset,
    };
  }

  /** Sizes of every internal collection plus counters and link figures, for dashboards and leak tests. */
  stats() {
    let listeners = 0;
    for (const entry of this.#channels.values()) listeners += entry.listeners.size;
    let eventListeners = 0;
    for (const set of this.#events.values()) eventListeners += set.size;
    return {
      state: this.#state,
      transport: this.#transport,
      session: this.session,
      channels: this.#channels.size,
      listeners,
      serverSubscriptions: this.#serverSubs.size,
      confirmedSubscriptions: this.#confirmed.size,
      pendingRequests: this.#pending.size,
      queued: this.#queue.length,
      eventListeners,
      timers: this.#timers.size,
      ...this.#counters,
      ...this.#latency(),
    };
  }

  // ---- connection lifecycle ----

  #can(transport) {
    if (!this.#opts.transports.includes(transport)) return false;
    return transport === 'websocket' ? typeof this.#WebSocket === 'function' : typeof this.#EventSource === 'function' && typeof this.#fetch === 'function';
  }

  #restart() {
    this.#attempt = 0;
    this.#wsFailures = 0;
    this.#setMode(this.#can('websocket') ? 'websocket' : 'sse');
    this.#setState('connecting', { transport: this.#mode });
    this.#open();
  }

  #setMode(mode) {
    if (mode === 'sse' && this.#mode !== 'sse') this.#sseSince = this.#clock.now();
    this.#mode = mode;
  }

  /** Opens the next connection; with `getToken`, asks for a token first (every connect). */
  #open() {
    const { getToken } = this.#opts;
    if (typeof getToken !== 'function') {
      this.#openWith(this.#opts.token ?? null);
      return;
    }
    this.#transport = this.#mode;
    const attempt = {};
    this.#tokenAttempt = attempt;
    Promise.resolve()
      .then(() => getToken())
      .then(
        (token) => {
          if (this.#tokenAttempt !== attempt || this.#stopped) return;
          this.#openWith(token ?? null);
        },
        (err) => {
          if (this.#tokenAttempt !== attempt || this.#stopped) return;
          this.#log.warn('ferrocast: getToken() failed', err);
          this.#emit('error', { code: 'token_error', message: `getToken() failed: ${err?.message ?? err}`, id: null, channels: [] });
          const delayMs = backoffDelay(this.#attempt++, this.#opts.backoff, this.#random);
          this.#setState('reconnecting', { attempt: this.#attempt, delayMs, code: null, reason: 'getToken() failed', transport: this.#mode });
          this.#after('reconnect', delayMs, () => this.#open());
        },
      );
  }

  #openWith(token) {
    this.#tokenAttempt = null;
    this.#token = token;
    this.#transport = this.#mode;
    const conn = this.#mode === 'websocket' ? this.#openWs() : this.#openSse();
    this.#conn = conn;
    this.#after('handshake', this.#opts.handshakeTimeoutMs, () => this.#onEnd(conn, { code: null, reason: 'handshake timeout' }));
  }

  #openWs() {
    return new WsConnection(this.#endpoints.ws, this.#WebSocket, {
      clock: this.#clock,
      onFrame: (conn, frame) => this.#onFrame(conn, frame),
      onEnd: (conn, info) => this.#onEnd(conn, info),
      log: this.#log,
    });
  }

  #openSse() {
    // Channels without a position join through the URL; the others are recovered by a control subscribe after the welcome.
    const fresh = [...this.#channels].filter(([, entry]) => !this.#position(entry)).map(([channel]) => channel);
    const query = [
      this.#endpoints.sseQuery,
      fresh.length ? `channels=${fresh.map(encodeURIComponent).join(',')}` : '',
      this.#token ? `token=${encodeURIComponent(this.#token)}` : '',
    ]
      .filter(Boolean)
      .join('&');
    const conn = new SseConnection(`${this.#endpoints.sse}${query ? `?${query}` : ''}`, this.#endpoints.control, {
      EventSource: this.#EventSource,
      fetch: this.#fetch,
      clock: this.#clock,
      timeoutMs: this.#opts.pingGraceMs,
      onFrame: (c, frame) => this.#onFrame(c, frame),
      onEnd: (c, info) => this.#onEnd(c, info),
      log: this.#log,
    });
    conn.initialChannels = fresh;
    return conn;
  }

  #onWelcome(conn, welcome) {
    conn.welcome = welcome;
    this.#cancel('handshake');
    this.#pingIntervalMs = welcome.ping_interval_ms > 0 ? welcome.ping_interval_ms : DEFAULT_PING_INTERVAL_MS;
    this.#attempt = 0;
    if (conn.transport === 'websocket') this.#wsFailures = 0;
    this.#lastFrameAt = this.#clock.now();
    for (const channel of conn.initialChannels ?? []) this.#serverSubs.add(channel);
    // The token goes first, so the server knows the user before any subscribe (SSE sent it in the URL,
    // and its welcome says when the token expires).
    if (this.#token && conn.transport === 'websocket') this.#request({ op: 'auth', token: this.#token }, 'auth');
    else if (this.#token) this.#scheduleRefresh(welcome.expires_at);
    this.#armLiveness();
    this.#reconcile();
    for (const { frame, resolve, reject } of this.#queue.splice(0)) this.#request(frame, 'publish', resolve, reject);
    this.#startRtt();
    if (conn.transport === 'websocket') this.#wsWorked = true;
    // Landing on SSE after WebSocket has worked usually means an outage ended, not a blocking proxy: probe soon.
    else this.#scheduleProbe(this.#wsWorked ? Math.min(QUICK_PROBE_MS, this.#opts.wsRetryMs) : this.#opts.wsRetryMs);
    const state = conn.transport === 'websocket' ? 'connected' : 'fallback';
    this.#setState(state, { transport: conn.transport, session: welcome.session ?? null });
  }

  #onEnd(conn, info) {
    if (conn === this.#probe) {
      this.#onProbeEnd(info);
      return;
    }
    if (conn !== this.#conn) return;
    const welcomed = Boolean(conn.welcome);
    this.#teardown(new FerrocastError('connection_lost', `connection lost: ${info.reason || info.code || 'closed'}`));
    if (welcomed) {
      this.#link.drop(this.#clock.now());
      this.#counters.reconnects += 1;
    } else if (conn.transport === 'websocket') {
      this.#wsFailures += 1;
    }
    this.#log.info(`ferrocast: ${conn.transport} connection ended`, info);

    if (TERMINAL_CLOSE_CODES.includes(info.code)) {
      this.#halt({ code: info.code, reason: info.reason || 'terminated by server' });
      return;
    }
    // An expired token: reconnect with a new one from getToken(); a fixed token would only expire again.
    if (info.code === TOKEN_EXPIRED_CLOSE_CODE && typeof this.#opts.getToken !== 'function') {
      this.#halt({ code: info.code, reason: info.reason || 'token expired' });
      return;
    }
    // 1001 (draining) and 1013 (a connection limit) may say when to come back.
    const hint = info.code === 1001 || info.code === 1013 ? parseReconnectHint(info.reason) : null;
    if (hint?.reconnect === false) {
      this.#halt({ code: info.code, reason: info.reason });
      return;
    }
    this.#chooseNextMode(conn.transport, welcomed);
    const { backoff } = this.#opts;
    const delayMs = Number.isFinite(hint?.after_ms)
      ? Math.max(0, hint.after_ms) + backoffDelay(0, backoff, this.#random)
      : backoffDelay(this.#attempt++, backoff, this.#random);
    this.#setState('reconnecting', { attempt: this.#attempt, delayMs, code: info.code, reason: info.reason, transport: this.#mode });
    this.#after('reconnect', delayMs, () => this.#open());
  }

  #chooseNextMode(transport, welcomed) {
    if (!this.#can('websocket') || !this.#can('sse')) return;
    const { fallbackAfter, wsRetryMs } = this.#opts;
    if (transport === 'websocket') {
      if (!welcomed && this.#wsFailures >= fallbackAfter) {
        this.#log.warn(`ferrocast: WebSocket failed ${this.#wsFailures} times, falling back to SSE`);
        this.#setMode('sse');
      }
    } else if (!welcomed) {
      // SSE failing as well points at an outage rather than a network hostile to WebSocket.
      this.#wsFailures = 0;
      this.#setMode('websocket');
    } else if (this.#clock.now() - this.#sseSince >= wsRetryMs) {
      // One WebSocket attempt; a single failure sends the client back to SSE.
      this.#wsFailures = fallbackAfter - 1;
      this.#setMode('websocket');
    }
  }

  /** Drops the connection, probe, timers and per-session state; pending publishes are rejected with `err`. */
  #teardown(err) {
    for (const name of NAMED_TIMERS) this.#cancel(name);
    const conn = this.#conn;
    this.#conn = null;
    conn?.close(1000, 'client closing');
    this.#probe?.close(1000, 'client closing');
    this.#probe = null;
    this.#resetSession(err);
  }

  /** Forgets what the server knew about this client; keeps publishes pending when `err` is null. */
  #resetSession(err) {
    this.#serverSubs.clear();
    this.#confirmed.clear();
    this.#rttPing = null;
    for (const entry of this.#channels.values()) entry.recovering = false;
    for (const [id, req] of this.#pending) {
      if (req.kind === 'publish' && !err) continue;
      this.#clock.clearTimeout(req.timer);
      this.#pending.delete(id);
      if (req.kind === 'publish') req.reject(err);
    }
  }

  #halt(detail) {
    this.#stopped = true;
    const err = new FerrocastError('closed', `disconnected: ${detail.reason}`);
    this.#teardown(err);
    for (const { reject } of this.#queue.splice(0)) reject(err);
    this.#setState('disconnected', detail);
  }

  #setState(state, detail) {
    this.#state = state;
    this.#stateDetail = detail;
    this.#emit(state, detail);
    this.#emit('state', state, detail);
  }

  // ---- liveness, RTT and the WebSocket probe while on SSE ----

  #armLiveness() {
    const limit = this.#pingIntervalMs + this.#opts.pingGraceMs;
    const check = () => {
      const idle = this.#clock.now() - this.#lastFrameAt;
      if (idle >= limit) this.#onEnd(this.#conn, { code: null, reason: 'heartbeat timeout' });
      else this.#after('liveness', limit - idle, check);
    };
    this.#after('liveness', limit, check);
  }

  /** Pings every rttIntervalMs; the first after at most a second, once the welcome's subscribe burst has settled. */
  #startRtt() {
    const tick = () => {
      this.#sendPing();
      this.#after('rtt', this.#opts.rttIntervalMs, tick);
    };
    this.#after('rtt', Math.min(FIRST_PING_MS, this.#opts.rttIntervalMs), tick);
  }

  #sendPing() {
    if (this.#rttPing) {
      this.#link.miss();
      this.#emit('latency', this.#latency());
    }
    const id = this.#nextId++;
    this.#rttPing = { id, sentAt: this.#clock.now() };
    this.#conn.send({ op: 'ping', id });
  }

  #onPong(frame) {
    const ping = this.#rttPing;
    if (!ping || frame.id !== ping.id) return;
    this.#rttPing = null;
    this.#link.sample(this.#clock.now() - ping.sentAt);
    this.#emit('latency', this.#latency());
  }

  #latency() {
    const connected = this.#state === 'connected' || this.#state === 'fallback';
    return this.#link.snapshot(connected, this.#clock.now());
  }

  #scheduleProbe(delayMs) {
    if (!this.#can('websocket')) return;
    this.#after('probe', delayMs, () => {
      const probe = this.#openWs();
      this.#probe = probe;
      this.#after('probeHandshake', this.#opts.handshakeTimeoutMs, () => this.#onEnd(probe, { code: null, reason: 'handshake timeout' }));
    });
  }

  #onProbeEnd(info) {
    this.#log.info('ferrocast: WebSocket still unavailable, staying on SSE', info);
    this.#probe.close();
    this.#probe = null;
    this.#cancel('probeHandshake');
    this.#scheduleProbe(this.#opts.wsRetryMs);
  }

  /** Switches from SSE to a probe WebSocket that has been welcomed; channels resume from their positions. */
  #promote(probe, welcome) {
    this.#cancel('probeHandshake');
    this.#cancel('rtt');
    this.#probe = null;
    this.#conn.close();
    this.#conn = probe;
    this.#resetSession(null);
    this.#transport = 'websocket';
    this.#setMode('websocket');
    this.#log.info('ferrocast: WebSocket available again, leaving SSE');
    this.#onWelcome(probe, welcome);
  }

  // ---- frames ----

  #onFrame(conn, frame) {
    if (conn === this.#probe) {
      if (frame.type === 'welcome') this.#promote(conn, frame);
      return;
    }
    if (conn !== this.#conn) {
      // A retired connection may still answer a publish sent through it.
      if ((frame.type === 'ack' || frame.type === 'error') && this.#pending.get(frame.id)?.kind === 'publish') this.#onReply(frame);
      return;
    }
    this.#lastFrameAt = this.#clock.now();
    if (!conn.welcome) {
      if (frame.type === 'welcome') this.#onWelcome(conn, frame);
      else this.#log.warn('ferrocast: ignoring a frame received before the welcome', frame);
      return;
    }
    switch (frame.type) {
      case 'msg':
        this.#onMessage(frame);
        break;
      case 'ping':
        conn.send({ op: 'pong' });
        break;
      case 'pong':
        this.#onPong(frame);
        break;
      case 'ack':
      case 'error':
        this.#onReply(frame);
        break;
      case 'unsubscribed':
        this.#confirmed.delete(frame.channel);
        this.#emit('unsubscribed', { channel: frame.channel, reason: frame.reason ?? null });
        break;
      default:
        this.#log.debug('ferrocast: ignoring frame', frame);
    }
  }

  #onReply(frame) {
    const req = frame.id == null ? null : this.#takePending(frame.id);
    const err = frame.type === 'error' ? new FerrocastError(frame.code ?? 'error', frame.message ?? 'server error') : null;
    if (req?.kind === 'auth') {
      if (err) this.#emit('error', { code: err.code, message: err.message, id: frame.id ?? null, channels: [] });
      else this.#scheduleRefresh(frame.result?.expires_at);
      return;
    }
    if (req?.kind === 'publish') {
      const { type, id, ...rest } = frame;
      if (err) req.reject(err);
      else req.resolve(frame.result ?? rest);
      return;
    }
    if (err) {
      this.#emit('error', { code: err.code, message: err.message, id: frame.id ?? null, channels: req?.channels ?? [] });
    } else if (frame.result !== null && typeof frame.result === 'object') {
      // Per-channel results answer a subscribe, even one whose request has timed out here.
      for (const [channel, result] of Object.entries(frame.result)) this.#applySubscribeResult(channel, result);
    }
    for (const channel of req?.channels ?? []) {
      const entry = this.#channels.get(channel);
      if (entry) entry.recovering = false;
    }
  }

  /** With `getToken`, sends a fresh token `tokenRefreshMarginMs` before `expiresAt` (seconds). */
  #scheduleRefresh(expiresAt) {
    const { getToken, tokenRefreshMarginMs } = this.#opts;
    if (typeof getToken !== 'function' || !Number.isFinite(expiresAt)) return;
    const conn = this.#conn;
    const lifetimeMs = expiresAt * 1000 - this.#clock.now();
    const delayMs = Math.max(0, lifetimeMs - Math.min(tokenRefreshMarginMs, lifetimeMs / 2));
    this.#after('refresh', delayMs, () => {
      Promise.resolve()
        .then(() => getToken())
        .then(
          (token) => {
            if (conn !== this.#conn || !conn?.welcome || !token) return;
            this.#token = token;
            this.#request({ op: 'auth', token }, 'auth');
          },
          (err) => this.#emit('error', { code: 'token_error', message: `getToken() failed: ${err?.message ?? err}`, id: null, channels: [] }),
        );
    });
  }

  #applySubscribeResult(channel, result) {
    const entry = this.#channels.get(channel);
    if (!entry || result === null || typeof result !== 'object') return;
    const recovering = entry.recovering;
    entry.recovering = false;
    if (result.error) {
      this.#confirmed.delete(channel);
      this.#emit('error', { code: result.error.code ?? 'error', message: result.error.message ?? 'subscribe failed', id: null, channels: [channel] });
      return;
    }
    if (recovering && result.recovered === false) {
      this.#gap(channel, { reason: 'not_recovered', epoch: result.epoch ?? null, previousEpoch: entry.epoch });
      entry.last = null;
    }
    entry.epoch = result.epoch ?? entry.epoch;
    entry.ackOffset = Number.isInteger(result.offset) ? result.offset : entry.ackOffset;
    // Only a subscription this connection still holds counts (a late ack may follow an unsubscribe).
    if (!this.#serverSubs.has(channel)) return;
    this.#confirmed.add(channel);
    const detail = { channel, epoch: entry.epoch, offset: entry.ackOffset, recovered: recovering ? result.recovered !== false : null };
    if (Number.isInteger(result.replayed)) detail.replayed = result.replayed;
    if (result.snapshot) detail.snapshot = result.snapshot;
    this.#emit('subscribed', detail);
  }

  #onMessage(frame) {
    const entry = this.#channels.get(frame.channel);
    if (!entry) return;
    const { offset } = frame;
    const ephemeral = frame.ephemeral === true;
    if (typeof frame.epoch === 'string' && frame.epoch !== entry.epoch && entry.epoch !== null && !entry.recovering) {
      // The channel's history was reset under a live subscription: a new sequence starts here.
      this.#gap(frame.channel, { reason: 'epoch', epoch: frame.epoch, previousEpoch: entry.epoch });
      entry.epoch = frame.epoch;
      entry.last = null;
    }
    if (!ephemeral && Number.isInteger(offset)) {
      if (entry.recovering || entry.last == null) {
        // Before a recovery ack (SSE replies may overtake the stream) the offset cannot be judged yet.
        entry.last = offset;
      } else if (offset <= entry.last) {
        this.#counters.duplicates += 1;
        return;
      } else {
        if (offset !== entry.last + 1) this.#gap(frame.channel, { reason: 'offset', expected: entry.last + 1, received: offset });
        entry.last = offset;
      }
    }
    this.#counters.messages += 1;
    const meta = { channel: frame.channel, offset: offset ?? null, ephemeral, epoch: frame.epoch ?? entry.epoch };
    for (const { listener } of entry.listeners) {
      try {
        listener(frame.data, meta);
      } catch (err) {
        this.#log.error(`ferrocast: listener for ${frame.channel} threw`, err);
      }
    }
  }

  #gap(channel, info) {
    this.#counters.gaps += 1;
    this.#emit('gap', { channel, ...info });
  }

  // ---- subscriptions and requests ----

  #position(entry) {
    const offset = entry.last ?? entry.ackOffset;
    return entry.epoch != null && offset != null ? { epoch: entry.epoch, offset } : null;
  }

  #scheduleReconcile() {
    if (this.#reconcileQueued) return;
    this.#reconcileQueued = true;
    queueMicrotask(() => this.#reconcile());
  }

  /** Brings the server's subscriptions in line with the channels that have listeners. */
  #reconcile() {
    this.#reconcileQueued = false;
    if (!this.#conn?.welcome) return;
    const stale = [...this.#serverSubs].filter((channel) => !this.#channels.has(channel));
    if (stale.length) {
      for (const channel of stale) {
        this.#serverSubs.delete(channel);
        this.#confirmed.delete(channel);
      }
      this.#request({ op: 'unsubscribe', channels: stale }, 'unsubscribe');
    }
    const wanted = [...this.#channels.keys()].filter((channel) => !this.#serverSubs.has(channel));
    if (!wanted.length) return;
    const recover = {};
    for (const channel of wanted) {
      this.#serverSubs.add(channel);
      const entry = this.#channels.get(channel);
      const position = this.#position(entry);
      if (position) {
        recover[channel] = position;
        entry.recovering = true;
      }
    }
    const frame = { op: 'subscribe', channels: wanted };
    if (Object.keys(recover).length) frame.recover = recover;
    this.#request(frame, 'subscribe', null, null, wanted);
  }

  #request(frame, kind, resolve = null, reject = null, channels = null) {
    const id = this.#nextId++;
    const timer = this.#clock.setTimeout(() => {
      if (!this.#pending.delete(id)) return;
      if (reject) reject(new FerrocastError('timeout', `no reply to ${frame.op} within ${this.#opts.requestTimeoutMs} ms`));
      else this.#log.warn(`ferrocast: no reply to ${frame.op} ${id}`);
    }, this.#opts.requestTimeoutMs);
    this.#pending.set(id, { kind, resolve, reject, timer, channels });
    this.#conn.send({ ...frame, id });
  }

  #takePending(id) {
    const req = this.#pending.get(id);
    if (!req) return null;
    this.#pending.delete(id);
    this.#clock.clearTimeout(req.timer);
    return req;
  }

  // ---- timers and events ----

  #after(name, ms, fn) {
    this.#cancel(name);
    const id = this.#clock.setTimeout(() => {
      this.#timers.delete(name);
      fn();
    }, ms);
    this.#timers.set(name, id);
  }

  #cancel(name) {
    const id = this.#timers.get(name);
    if (id === undefined) return;
    this.#clock.clearTimeout(id);
    this.#timers.delete(name);
  }

  #emit(event, ...args) {
    const listeners = this.#events.get(event);
    if (!listeners) return;
    for (const listener of listeners) {
      try {
        listener(...args);
      } catch (err) {
        this.#log.error(`ferrocast: ${event} listener threw`, err);
      }
    }
  }
}
