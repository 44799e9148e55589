// The test page of react.test.mjs: React from npm, @ferrocast/react and the real client, bundled by esbuild.
//
// window.harness drives it: render({panels, strict, provider}) mounts a tree, each panel
// (`{id, channel}`) shows useChannel's status and data in <div data-panel>, the badge shows
// useConnectionState in #conn, and the logs record what the hooks saw.

import { StrictMode, createElement as h, useEffect, useState } from 'react';
import { createRoot } from 'react-dom/client';
import { flushSync } from 'react-dom';
import { Ferrocast } from '@ferrocast/client';
import { FerrocastProvider, useChannel, useClient, useConnectionState } from '@ferrocast/react';

const log = {
  states: [], // each state useConnectionState rendered, in order, without repeats
  messages: {}, // panel id -> data seen by its onMessage
  gaps: {}, // panel id -> gap reasons seen by its onGap
  statuses: {}, // panel id -> statuses rendered, without repeats
  clients: [], // every client the provider handed out
};

function pushDistinct(list, value) {
  if (list.at(-1) !== value) list.push(value);
}

function Panel({ id, channel }) {
  const { data, status, error, message } = useChannel(channel, {
    onMessage: (d) => (log.messages[id] ??= []).push(d),
    onGap: (gap) => (log.gaps[id] ??= []).push(gap.reason),
  });
  pushDistinct((log.statuses[id] ??= []), status);
  return h(
    'div',
    { 'data-panel': id, 'data-channel': channel, 'data-status': status, 'data-offset': message?.offset ?? '' },
    data === undefined ? '' : JSON.stringify(data),
    error ? h('span', { className: 'error' }, error.code) : null,
  );
}

function Badge() {
  const { state, transport } = useConnectionState();
  pushDistinct(log.states, state);
  return h('span', { id: 'conn', 'data-state': state, 'data-transport': transport ?? '' }, state);
}

function Expose() {
  const client = useClient();
  useEffect(() => {
    if (!client) return undefined;
    if (!log.clients.includes(client)) log.clients.push(client);
    window.fc = client;
    return () => {
      if (window.fc === client) window.fc = null;
    };
  }, [client]);
  return null;
}

let setTree = null;
// The gateway is on another origin, as for a Next.js app in front of a ferrocast deployment.
const GATEWAY = new URLSearchParams(location.search).get('gateway');

function App() {
  const [tree, set] = useState({ panels: [], badge: true });
  setTree = set;
  const { panels, badge } = tree;
  if (tree.unmounted) return h('p', { id: 'empty' }, 'no provider');
  const children = [h(Expose, { key: 'expose' }), badge ? h(Badge, { key: 'badge' }) : null, ...panels.map((p) => h(Panel, { key: p.id, ...p }))];
  const provider = tree.external ? { client: window.externalClient } : { url: GATEWAY, options: { backoff: { baseMs: 100, maxMs: 1000 } } };
  return h('main', null, h(FerrocastProvider, provider, children));
}

const container = document.getElementById('root');
const query = new URLSearchParams(location.search);
const strict = query.has('strict');
const root = createRoot(container);
root.render(strict ? h(StrictMode, null, h(App)) : h(App));

const tick = () => new Promise((resolve) => setTimeout(resolve, 0));

window.harness = {
  log,
  strict,
  gateway: GATEWAY,
  Ferrocast,
  /** Replaces the tree synchronously: `{panels, badge, external, unmounted}`. */
  render(tree) {
    flushSync(() => setTree({ panels: [], badge: true, ...tree }));
  },
  /** Panel id -> {status, text} as rendered. */
  panels() {
    return Object.fromEntries(
      [...document.querySelectorAll('[data-panel]')].map((el) => [
        el.dataset.panel,
        { status: el.dataset.status, text: el.firstChild?.nodeType === 3 ? el.firstChild.textContent : '', channel: el.dataset.channel },
      ]),
    );
  },
  /**
   * `cycles` times: mounts `panels`, waits until each is live, unmounts them. Returns the number
   * of panels seen live. Statuses are read from the DOM, so the hooks' renders are what counts.
   */
  async cycle(cycles, panels) {
    let live = 0;
    for (let i = 0; i < cycles; i++) {
      this.render({ panels: panels.map((p) => ({ ...p, id: `${p.id}-${i}` })) });
      const deadline = Date.now() + 5000;
      for (;;) {
        const shown = Object.values(this.panels());
        if (shown.length === panels.length && shown.every((p) => p.status === 'live')) break;
        if (Date.now() > deadline) throw new Error(`cycle ${i}: panels not live: ${JSON.stringify(this.panels())}`);
        await new Promise((resolve) => setTimeout(resolve, 5));
      }
      live += panels.length;
      this.render({ panels: [] });
      await tick();
    }
    return live;
  },
};
