'use client';
// React bindings for the ferrocast client: a provider that owns a connection, and hooks for channel values and connection state.
//
// Plain ES module, no JSX and no build step: `react` and `@ferrocast/client` are peer
// dependencies, imported by their package names (see README.md for in-repo use).

import { createContext, createElement, useCallback, useContext, useEffect, useMemo, useRef, useState, useSyncExternalStore } from 'react';
import { Ferrocast } from '@ferrocast/client';

const NO_PROVIDER = Symbol('ferrocast.noProvider');
const FerrocastContext = createContext(NO_PROVIDER);
FerrocastContext.displayName = 'Ferrocast';

/** Channel statuses a useChannel result can have. */
export const CHANNEL_STATUSES = Object.freeze(['idle', 'connecting', 'live', 'recovering', 'error', 'disconnected']);

/**
 * Makes a ferrocast client available to the hooks below it. With `client` it shares that
 * client and never closes it; otherwise it creates one from `url` and `options` when it
 * mounts (in an effect, so nothing connects during server rendering or a discarded render)
 * and closes it when it unmounts or `url` changes. `options` are read when the client is
 * created; change the provider's `key` to apply new ones.
 */
export function FerrocastProvider({ url, client, options, children }) {
  const [own, setOwn] = useState(null);
  const optionsRef = useRef(options);
  optionsRef.current = options;
  useEffect(() => {
    if (client) return undefined;
    const created = new Ferrocast({ ...optionsRef.current, url: url ?? optionsRef.current?.url });
    setOwn(created);
    return () => {
      created.close();
      setOwn((current) => (current === created ? null : current));
    };
  }, [client, url]);
  const value = client ?? own;
  return createElement(FerrocastContext.Provider, { value }, children);
}

/**
 * The client of the nearest FerrocastProvider: null while the provider is still creating it
 * (first render, server rendering). Throws outside a provider.
 */
export function useClient() {
  const client = useContext(FerrocastContext);
  if (client === NO_PROVIDER) throw new Error('ferrocast: useClient, useChannel and useConnectionState need a <FerrocastProvider> above them');
  return client;
}

// ---- connection state ----

const PENDING_CONNECTION = Object.freeze({ state: 'connecting', detail: null, transport: null, session: null });
const noopUnsubscribe = () => {};

/**
 * `{state, detail, transport, session}` of the client, re-rendering on every state change:
 * `state` is one of connecting, connected, reconnecting, fallback, disconnected
 * (`connecting` until the provider's client exists).
 */
export function useConnectionState() {
  const client = useClient();
  const cache = useRef(PENDING_CONNECTION);
  const subscribe = useCallback((notify) => (client ? client.on('state', notify) : noopUnsubscribe), [client]);
  const getSnapshot = useCallback(() => {
    if (!client) return PENDING_CONNECTION;
    const last = cache.current;
    const { state, stateDetail: detail, transport, session } = client;
    if (last.state === state && last.detail === detail && last.transport === transport && last.session === session) return last;
    cache.current = Object.freeze({ state, detail, transport, session });
    return cache.current;
  }, [client]);
  return useSyncExternalStore(subscribe, getSnapshot, () => PENDING_CONNECTION);
}

// ---- channels ----

/**
 * One shared subscription per client and channel, whatever the number of components that
 * read it: it holds the channel's latest message and status, and is released when the last
 * reader goes (a microtask later, so that a remount in the same commit, as React's StrictMode
 * does, keeps both the subscription and the latest value).
 */
class ChannelStore {
  snapshot;
  #client;
  #channel;
  #registry;
  #refs = 0;
  #readers = new Set();
  #disposers = [];
  #wasLive = false;
  #error = null;
  #message = null;

  constructor(client, channel, registry) {
    this.#client = client;
    this.#channel = channel;
    this.#registry = registry;
    this.snapshot = this.#compute();
  }

  /** Adds a reader: `notify` is called after each change, `handlers.current` gets the messages and gaps. */
  retain(notify, handlers) {
    const reader = { notify, handlers };
    this.#readers.add(reader);
    this.#refs += 1;
    if (this.#refs === 1 && this.#disposers.length === 0) this.#start();
    let active = true;
    return () => {
      if (!active) return;
      active = false;
      this.#readers.delete(reader);
      this.#refs -= 1;
      if (this.#refs === 0) queueMicrotask(() => this.#stopIfUnused());
    };
  }

  #start() {
    const client = this.#client;
    const channel = this.#channel;
    const mine = (detail) => detail?.channel === channel;
    this.#disposers = [
      client.subscribe(channel, (data, meta) => this.#onMessage(data, meta)),
      client.on('state', () => this.#update()),
      client.on('subscribed', (detail) => {
        if (!mine(detail)) return;
        this.#error = null;
        this.#update();
      }),
      client.on('error', (detail) => {
        if (!detail?.channels?.includes(channel)) return;
        this.#error = { code: detail.code, message: detail.message };
        this.#update();
      }),
      client.on('unsubscribed', (detail) => {
        if (!mine(detail)) return;
        this.#error = { code: 'unsubscribed', message: detail.reason ?? 'the server ended the subscription' };
        this.#update();
      }),
      client.on('gap', (detail) => {
        if (!mine(detail)) return;
        for (const { handlers } of [...this.#readers]) call(handlers.current?.onGap, detail);
      }),
    ];
    this.#update();
  }

  #stopIfUnused() {
    if (this.#refs > 0 || this.#disposers.length === 0) return;
    for (const dispose of this.#disposers.splice(0)) dispose();
    if (this.#registry.get(this.#channel) === this) this.#registry.delete(this.#channel);
  }

  #onMessage(data, meta) {
    this.#message = Object.freeze({ data, ...meta });
    this.#error = null;
    for (const { handlers } of [...this.#readers]) call(handlers.current?.onMessage, data, meta);
    this.#update();
  }

  #compute() {
    const client = this.#client;
    const sub = client.subscription(this.#channel);
    let status;
    if (client.state === 'disconnected') status = 'disconnected';
    else if (this.#error) status = 'error';
    else if ((client.state === 'connected' || client.state === 'fallback') && sub?.subscribed) status = 'live';
    else status = this.#wasLive ? 'recovering' : 'connecting';
    if (status === 'live') this.#wasLive = true;
    let error = this.#error;
    if (status === 'disconnected') {
      const detail = client.stateDetail;
      error = detail && detail.code !== 1000 ? { code: 'disconnected', message: detail.reason ?? '', closeCode: detail.code ?? null } : null;
    }
    const message = this.#message;
    return Object.freeze({ data: message?.data, message, status, error });
  }

  #update() {
    const next = this.#compute();
    const last = this.snapshot;
    if (last.message === next.message && last.status === next.status && sameError(last.error, next.error)) return;
    this.snapshot = next;
    for (const { notify } of [...this.#readers]) notify();
  }
}

function sameError(a, b) {
  return a === b || (a != null && b != null && a.code === b.code && a.message === b.message && a.closeCode === b.closeCode);
}

function call(fn, ...args) {
  if (typeof fn !== 'function') return;
  try {
    fn(...args);
  } catch (err) {
    // A throwing callback must not stop the other readers; surface it without breaking the stream.
    queueMicrotask(() => {
      throw err;
    });
  }
}

/** Client -> channel -> ChannelStore; weak, so a dropped client takes its stores with it. */
const registries = new WeakMap();

function storeFor(client, channel, create) {
  let registry = registries.get(client);
  if (!registry) {
    if (!create) return null;
    registry = new Map();
    registries.set(client, registry);
  }
  let store = registry.get(channel) ?? null;
  if (!store && create) {
    store = new ChannelStore(client, channel, registry);
    registry.set(channel, store);
  }
  return store;
}

const IDLE = Object.freeze({ data: undefined, message: null, status: 'idle', error: null });
const CONNECTING = Object.freeze({ data: undefined, message: null, status: 'connecting', error: null });

/**
 * The latest value of `channel` and the state of its subscription:
 * `{data, message, status, error}`. `data` is the latest message's data (`initialData` until
 * one arrives); `message` is `{data, channel, offset, ephemeral, epoch}`; `status` is
 * idle (disabled or no channel), connecting, live (the server confirmed the subscription),
 * recovering (it was live and the connection or subscription is being restored), error
 * (`error` says why: a refused subscribe or a subscription the server ended) or disconnected
 * (the client stopped; `error` carries a terminal close code). Components reading the same
 * channel share one subscription and see the same latest value at once.
 *
 * Options: `enabled` (default true), `onMessage(data, meta)` and `onGap(gap)` called for
 * every message and gap (the latest callbacks are used, no need to memoize them),
 * `initialData`, and `client` to use a client other than the provider's.
 */
export function useChannel(channel, options = {}) {
  const { enabled = true, initialData, client: explicitClient } = options;
  const contextClient = useContext(FerrocastContext);
  if (explicitClient == null && contextClient === NO_PROVIDER) {
    throw new Error('ferrocast: useChannel needs a <FerrocastProvider> above it or a client option');
  }
  const client = explicitClient ?? contextClient;
  const handlers = useRef(options);
  useEffect(() => {
    handlers.current = options;
  });
  const active = Boolean(client && enabled && channel);

  const subscribe = useCallback(
    (notify) => (active ? storeFor(client, channel, true).retain(notify, handlers) : noopUnsubscribe),
    [active, client, channel],
  );
  const getSnapshot = useCallback(() => {
    if (!enabled || !channel) return IDLE;
    if (!client) return CONNECTING;
    return storeFor(client, channel, false)?.snapshot ?? CONNECTING;
  }, [enabled, client, channel]);
  const snapshot = useSyncExternalStore(subscribe, getSnapshot, () => (enabled && channel ? CONNECTING : IDLE));

  return useMemo(
    () => (snapshot.message || initialData === undefined ? snapshot : { ...snapshot, data: initialData }),
    [snapshot, initialData],
  );
}

/** A stable function publishing on `channel` through the provider's client (see client.publish). */
export function usePublish(channel) {
  const client = useClient();
  return useCallback(
    (data) => (client ? client.publish(channel, data) : Promise.reject(new Error('ferrocast: the client is not ready yet'))),
    [client, channel],
  );
}
