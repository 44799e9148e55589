// Type declarations for @ferrocast/client (ferrocast.js).

export type State = 'connecting' | 'connected' | 'reconnecting' | 'fallback' | 'disconnected';
export type Transport = 'websocket' | 'sse';

/** Connection states, in the order a healthy client usually visits them. */
export const STATES: readonly State[];
/** Close codes after which the client stops instead of reconnecting (1008, 4001, 4003). */
export const TERMINAL_CLOSE_CODES: readonly number[];
/** 4011: the token expired; get a new token, then reconnect. */
export const TOKEN_EXPIRED_CLOSE_CODE: 4011;

export interface Logger {
  debug?(...args: unknown[]): void;
  info?(...args: unknown[]): void;
  warn?(...args: unknown[]): void;
  error?(...args: unknown[]): void;
}

/** Timer source; inject a fake one in tests. */
export interface Clock {
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(id: unknown): void;
  now(): number;
}

export interface FerrocastOptions {
  /** Base URL of the server, http(s) or ws(s); a path prefix is kept. Default: the page's origin. */
  url?: string;
  /** Allowed transports; WebSocket is preferred whenever listed. Default ['websocket', 'sse']. */
  transports?: Transport[];
  /** WebSocket path (for aliases such as '/ws/price'). Default '/ws'. */
  wsPath?: string;
  /** SSE path; control ops go to `${ssePath}/control`. Default '/sse'. */
  ssePath?: string;
  /** Query parameters added to the WebSocket and SSE URLs (e.g. an auth token). */
  params?: Record<string, string> | null;
  /** A connection token (JWT), sent after the welcome (WebSocket) or in the URL (SSE). */
  token?: string | null;
  /** Called before every connect and before the token expires. */
  getToken?: (() => Promise<string> | string) | null;
  tokenRefreshMarginMs?: number;
  /** Reconnect backoff: delay = random(0, min(maxMs, baseMs * 2^attempt)). Default {baseMs: 500, maxMs: 30000}. */
  backoff?: { baseMs?: number; maxMs?: number };
  /** Time allowed from opening a transport to the server's welcome. Default 10000. */
  handshakeTimeoutMs?: number;
  /** Consecutive WebSocket failures before any welcome that switch to SSE. Default 2. */
  fallbackAfter?: number;
  /** While on SSE, how often WebSocket is tried again. Default 60000. */
  wsRetryMs?: number;
  /** Silence tolerated beyond the server's ping_interval_ms before the connection is declared dead. Default 10000. */
  pingGraceMs?: number;
  /** Interval of RTT pings. Default 5000. */
  rttIntervalMs?: number;
  /** Time to wait for the reply to a publish. Default 10000. */
  requestTimeoutMs?: number;
  /** Publishes kept while disconnected; the oldest is dropped beyond this. Default 1000. */
  maxQueue?: number;
  /** Connect right after construction (in a microtask). Default true. */
  autoConnect?: boolean;
  /** WebSocket implementation. Default globalThis.WebSocket (in Node 20 pass e.g. the `ws` package's). */
  WebSocket?: unknown;
  /** EventSource implementation. Default globalThis.EventSource (in Node pass e.g. the `eventsource` package's). */
  EventSource?: unknown;
  /** fetch implementation for SSE control requests. Default globalThis.fetch. */
  fetch?: typeof fetch;
  /** Receives debug/info/warn/error calls; silent by default. Pass `console` to see them. */
  logger?: Logger;
  /** Uniform random source in [0, 1) for jitter. Default Math.random. */
  random?: () => number;
  /** Timer source. Default the global timers and Date.now. */
  clock?: Clock;
}

export interface MessageMeta {
  channel: string;
  /** Offset of the message; for ephemeral messages the offset of the last retained one. */
  offset: number | null;
  /** True for messages that are not retained (e.g. a forming candle). */
  ephemeral: boolean;
  /** The channel's epoch, from the message or else from the subscribe ack. */
  epoch: string | null;
}

export interface Latency {
  /** Last round-trip time in ms. */
  rtt: number | null;
  /** Smoothed round-trip time (EWMA, 1/8). */
  srtt: number | null;
  /** Round-trip variation (EWMA, 1/4). */
  jitter: number | null;
  /** Pings unanswered among the last 10. */
  missedPongs: number;
  /** Established connections lost in the last 5 minutes. */
  recentReconnects: number;
  /** 0-100, see qualityScore. */
  quality: number;
}

export interface ConnectingDetail {
  transport: Transport;
}
export interface ConnectedDetail {
  transport: Transport;
  session: string | null;
}
export interface ReconnectingDetail {
  attempt: number;
  delayMs: number;
  code: number | null;
  reason: string;
  transport: Transport;
}
export interface DisconnectedDetail {
  code: number | null;
  reason: string;
}
export type StateDetail = ConnectingDetail | ConnectedDetail | ReconnectingDetail | DisconnectedDetail;

export interface GapEvent {
  channel: string;
  /**
   * 'offset': a retained message skipped offsets; 'not_recovered': the server could not replay after a reconnect;
   * 'epoch': a message arrived with a new epoch under a live subscription.
   */
  reason: 'offset' | 'not_recovered' | 'epoch';
  expected?: number;
  received?: number;
  epoch?: string | null;
  previousEpoch?: string | null;
}

export interface ErrorEvent {
  code: string;
  message: string;
  id: number | null;
  channels: string[];
}

export interface SubscribedEvent {
  channel: string;
  epoch: string | null;
  /** The channel's top offset when the subscription started (from the ack). */
  offset: number | null;
  /** For a resubscription with a recovery position: whether every missed message follows; null otherwise. */
  recovered: boolean | null;
  /** How many missed messages follow the ack, when the server says. */
  replayed?: number;
  /** What the server sends first instead of, or besides, recovery (a namespace's snapshot setting). */
  snapshot?: { kind: 'last' | 'latest'; count: number };
}

/** What the client knows of one channel that has listeners (`client.subscription(channel)`). */
export interface SubscriptionInfo {
  channel: string;
  /** Listeners registered with subscribe() and not yet disposed. */
  listeners: number;
  /** True once the server confirmed the subscription on the current connection. */
  subscribed: boolean;
  epoch: string | null;
  /** Last retained offset seen, else the offset the subscribe ack reported. */
  offset: number | null;
}

export interface UnsubscribedEvent {
  channel: string;
  reason: string | null;
}

export interface EventMap {
  connecting: [ConnectingDetail];
  connected: [ConnectedDetail];
  reconnecting: [ReconnectingDetail];
  fallback: [ConnectedDetail];
  disconnected: [DisconnectedDetail];
  state: [State, StateDetail];
  latency: [Latency];
  subscribed: [SubscribedEvent];
  gap: [GapEvent];
  error: [ErrorEvent];
  unsubscribed: [UnsubscribedEvent];
}

export interface ClientStats extends Latency {
  state: State;
  transport: Transport | null;
  session: string | null;
  channels: number;
  listeners: number;
  serverSubscriptions: number;
  /** Server subscriptions the server has confirmed on the current connection. */
  confirmedSubscriptions: number;
  pendingRequests: number;
  queued: number;
  eventListeners: number;
  timers: number;
  messages: number;
  duplicates: number;
  gaps: number;
  reconnects: number;
  dropped: number;
}

export class FerrocastError extends Error {
  constructor(code: string, message: string);
  readonly code: string;
}

export class Ferrocast {
  constructor(options?: FerrocastOptions);
  readonly state: State;
  readonly stateDetail: StateDetail | null;
  readonly transport: Transport | null;
  readonly session: string | null;
  readonly rtt: number | null;
  readonly quality: number;
  connect(): void;
  retry(): void;
  close(): void;
  on<E extends keyof EventMap>(event: E, listener: (...args: EventMap[E]) => void): () => void;
  off<E extends keyof EventMap>(event: E, listener: (...args: EventMap[E]) => void): void;
  subscribe<T = unknown>(channel: string, listener: (data: T, meta: MessageMeta) => void): () => void;
  publish(channel: string, data: unknown): Promise<Record<string, unknown>>;
  /** null when the channel has no listener. */
  subscription(channel: string): SubscriptionInfo | null;
  stats(): ClientStats;
}

/** Full-jitter backoff: random(0, min(maxMs, baseMs * 2^attempt)), whole ms. */
export function backoffDelay(attempt: number, backoff: { baseMs: number; maxMs: number }, random?: () => number): number;

/** Connection-quality score 0-100; see the README for the formula. */
export function qualityScore(link?: {
  connected?: boolean;
  srttMs?: number | null;
  jitterMs?: number | null;
  missedPongs?: number;
  recentReconnects?: number;
}): number;
