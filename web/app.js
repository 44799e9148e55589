// Dashboard logic: drives the page from the public ferrocast client and the HTTP API only.
import { Ferrocast } from '/client.js';

const STATS_POLL_MS = 2_000;
const FEEDS_POLL_MS = 5_000;
const CHANNELS_POLL_MS = 15_000;
const MAX_EVENTS = 40;
const MAX_BARS = 240;
// The chart shows 1-minute candles; `/?interval=1s` shows the 1-second ones instead, a chart that
// moves within seconds (demos, the browser tests in e2e/node/browser.test.mjs).
const CHART_INTERVAL = new URLSearchParams(location.search).get('interval') === '1s' ? '1s' : '1m';

const $ = (selector) => document.querySelector(selector);

const client = new Ferrocast({ logger: { warn: console.warn, error: console.error } });
window.ferrocast = client;

// ---------- formatting ----------

const priceFormat = new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 });
const smallPriceFormat = new Intl.NumberFormat(undefined, { minimumFractionDigits: 4, maximumFractionDigits: 4 });
const intFormat = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
const pctFormat = new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2, signDisplay: 'always' });
const signedFormat = new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2, signDisplay: 'always' });

const isNum = (value) => typeof value === 'number' && Number.isFinite(value);
const price = (value) => (isNum(value) ? (Math.abs(value) < 1 ? smallPriceFormat : priceFormat).format(value) : '–');

function bytes(perSecond) {
  const units = ['B/s', 'kB/s', 'MB/s', 'GB/s'];
  let value = perSecond;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

function duration(seconds) {
  const d = Math.floor(seconds / 86_400);
  const h = Math.floor((seconds % 86_400) / 3_600);
  const m = Math.floor((seconds % 3_600) / 60);
  const s = Math.floor(seconds % 60);
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  return m ? `${m}m ${s}s` : `${s}s`;
}

/** Timestamps may be epoch seconds, epoch milliseconds or ISO strings. */
function toMs(value) {
  if (isNum(value)) return value < 1e11 ? value * 1000 : value;
  if (typeof value === 'string') {
    const parsed = Date.parse(value);
    return Number.isNaN(parsed) ? null : parsed;
  }
  return null;
}

const clockTime = (ms) =>
  new Date(ms).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', ...(CHART_INTERVAL === '1s' && { second: '2-digit' }), hour12: false });

// ---------- connection status ----------

function describeState(state, detail) {
  switch (state) {
    case 'connected':
      return 'live';
    case 'fallback':
      return 'live (SSE fallback)';
    case 'reconnecting':
      return detail.attempt ? `reconnecting (attempt ${detail.attempt})` : 'reconnecting';
    case 'disconnected':
      return `disconnected${detail?.reason ? `: ${detail.reason}` : ''}`;
    default:
      return state;
  }
}

function renderLatency() {
  const { srtt, quality } = client.stats();
  const live = client.state === 'connected' || client.state === 'fallback';
  $('#rtt').textContent = live && isNum(srtt) ? `${srtt < 10 ? srtt.toFixed(1) : Math.round(srtt)} ms` : '–';
  const qualityEl = $('#quality');
  qualityEl.textContent = live ? String(quality) : '–';
  qualityEl.dataset.level = !live ? 'none' : quality >= 80 ? 'good' : quality >= 50 ? 'fair' : 'poor';
}

function logEvent(text, kind = 'info') {
  const list = $('#events');
  const item = document.createElement('li');
  item.dataset.kind = kind;
  const time = document.createElement('time');
  time.textContent = new Date().toLocaleTimeString([], { hour12: false });
  item.append(time, ` ${text}`);
  list.prepend(item);
  while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
}

function closeReason({ code, reason }) {
  if (code === 1001) return 'server draining';
  return [code, reason].filter(Boolean).join(' ') || 'no close code';
}

function logState(state, detail) {
  switch (state) {
    case 'connected':
    case 'fallback':
      logEvent(`connected over ${detail.transport}`, 'ok');
      break;
    case 'reconnecting':
      logEvent(`connection closed (${closeReason(detail)}); next try over ${detail.transport} in ${(detail.delayMs / 1000).toFixed(1)} s`, 'warn');
      break;
    case 'disconnected':
      logEvent(describeState(state, detail), 'error');
      break;
  }
}

client.on('state', (state, detail) => {
  $('#status').dataset.state = state;
  $('#status-text').textContent = describeState(state, detail);
  $('#transport').textContent = client.transport ?? '–';
  renderLatency();
  logState(state, detail);
});
client.on('latency', renderLatency);

// Gaps arrive per channel, often all at once after a server restart: report them as one line.
const pendingGaps = new Map();
client.on('gap', ({ channel, reason }) => {
  if (channel === chart.channel) {
    chart.bars = [];
    loadCandleHistory(channel);
  }
  if (!pendingGaps.size) queueMicrotask(reportGaps);
  pendingGaps.set(channel, reason);
});

function reportGaps() {
  const channels = [...pendingGaps.keys()];
  const reasons = [...new Set(pendingGaps.values())].join(', ');
  pendingGaps.clear();
  const which = channels.length > 3 ? `${channels.length} channels` : channels.join(', ');
  logEvent(`missed messages on ${which} (${reasons})`, 'warn');
}

client.on('error', ({ code, message, channels }) => logEvent(`server error ${code}: ${message}${channels.length ? ` [${channels.join(', ')}]` : ''}`, 'error'));
client.on('unsubscribed', ({ channel, reason }) => logEvent(`server ended ${channel}${reason ? `: ${reason}` : ''}`, 'warn'));

$('#retry').addEventListener('click', () => {
  logEvent('manual retry');
  client.retry();
});

// ---------- ticker table ----------

const rows = new Map();
const dirtyRows = new Set();
let rowFrame = 0;

function cell(className) {
  const td = document.createElement('td');
  td.className = className;
  td.textContent = '–';
  return td;
}

function addSymbol(sym) {
  if (rows.has(sym)) return;
  const tr = document.createElement('tr');
  tr.dataset.sym = sym;
  tr.tabIndex = 0;
  const symCell = document.createElement('th');
  symCell.scope = 'row';
  symCell.textContent = sym;
  const row = {
    sym,
    tr,
    last: null,
    reference: null,
    size: null,
    bid: null,
    ask: null,
    direction: null,
    flash: 'a',
    cells: {
      last: cell('num last'),
      change: cell('num change'),
      changePct: cell('num change'),
      bid: cell('num bid'),
      ask: cell('num ask'),
      size: cell('num size'),
    },
  };
  tr.append(symCell, ...Object.values(row.cells));
  tr.addEventListener('click', () => selectSymbol(sym));
  tr.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' || event.key === ' ') {
      event.preventDefault();
      selectSymbol(sym);
    }
  });

  const body = $('#tickers tbody');
  const before = [...body.rows].find((other) => other.dataset.sym > sym) ?? null;
  body.insertBefore(tr, before);
  rows.set(sym, row);
  $('#tickers-empty').hidden = true;

  client.subscribe(`ticks.${sym}`, (trade) => onTrade(row, trade));
  client.subscribe(`quotes.${sym}`, (quote) => onQuote(row, quote));
}

function onTrade(row, trade) {
  if (!isNum(trade?.price)) return;
  if (row.last !== null && trade.price !== row.last) {
    row.direction = trade.price > row.last ? 'up' : 'down';
    row.flash = row.flash === 'a' ? 'b' : 'a';
  }
  row.last = trade.price;
  row.reference ??= trade.price;
  row.size = isNum(trade.size) ? trade.size : row.size;
  markDirty(row);
}

function onQuote(row, quote) {
  row.bid = isNum(quote?.bid) ? quote.bid : row.bid;
  row.ask = isNum(quote?.ask) ? quote.ask : row.ask;
  markDirty(row);
}

function markDirty(row) {
  dirtyRows.add(row);
  rowFrame ||= requestAnimationFrame(renderRows);
}

/** Writes only the changed cells of changed rows, once per animation frame. */
function renderRows() {
  rowFrame = 0;
  for (const row of dirtyRows) {
    const { cells } = row;
    setText(cells.last, price(row.last));
    if (row.direction) {
      cells.last.dataset.dir = row.direction;
      cells.last.dataset.flash = `${row.direction}-${row.flash}`;
    }
    if (row.last !== null) {
      const change = row.last - row.reference;
      const sign = change > 0 ? 'up' : change < 0 ? 'down' : 'flat';
      setText(cells.change, signedFormat.format(change));
      setText(cells.changePct, `${pctFormat.format((change / row.reference) * 100)}%`);
      cells.change.dataset.dir = sign;
      cells.changePct.dataset.dir = sign;
    }
    setText(cells.bid, price(row.bid));
    setText(cells.ask, price(row.ask));
    setText(cells.size, isNum(row.size) ? intFormat.format(row.size) : '–');
  }
  dirtyRows.clear();
}

function setText(element, text) {
  if (element.textContent !== text) element.textContent = text;
}

// ---------- candle chart ----------

const chart = { sym: null, channel: null, bars: [], dispose: null, frame: 0 };
const canvas = $('#chart');
const intervalName = CHART_INTERVAL === '1s' ? '1-second' : '1-minute';
$('#chart-interval').textContent = intervalName;
canvas.setAttribute('aria-label', `${intervalName} candle chart`);

function selectSymbol(sym) {
  if (!rows.has(sym) || chart.sym === sym) return;
  for (const tr of document.querySelectorAll('#tickers tr[aria-selected]')) tr.removeAttribute('aria-selected');
  rows.get(sym).tr.setAttribute('aria-selected', 'true');
  history.replaceState(null, '', `#${sym}`);

  chart.dispose?.();
  chart.sym = sym;
  chart.channel = `candles.${sym}.${CHART_INTERVAL}`;
  chart.bars = [];
  $('#chart-symbol').textContent = sym;
  const channel = chart.channel;
  chart.dispose = client.subscribe(channel, (bar) => {
    if (chart.channel === channel) upsertBar(bar);
  });
  loadCandleHistory(channel);
  scheduleChart();
}

async function loadCandleHistory(channel) {
  try {
    const res = await fetch(`/api/channels/${encodeURIComponent(channel)}/history?limit=${MAX_BARS}`, { cache: 'no-store' });
    if (!res.ok) return;
    const { messages = [] } = await res.json();
    if (chart.channel !== channel) return;
    for (const { data } of messages) upsertBar(data);
  } catch (err) {
    console.warn('ferrocast dashboard: candle history unavailable', err);
  }
}

/** Inserts or replaces a bar by its start time; a forming bar is replaced by each update and by its closed version. */
function upsertBar(data) {
  const start = toMs(data?.start);
  if (start === null || ![data.open, data.high, data.low, data.close].every(isNum)) return;
  const bar = { start, open: data.open, high: data.high, low: data.low, close: data.close, volume: isNum(data.volume) ? data.volume : 0, forming: data.forming === true };
  const { bars } = chart;
  let index = bars.length;
  while (index > 0 && bars[index - 1].start > start) index -= 1;
  if (index > 0 && bars[index - 1].start === start) {
    if (bar.forming && !bars[index - 1].forming) return;
    bars[index - 1] = bar;
  } else {
    bars.splice(index, 0, bar);
    if (bars.length > MAX_BARS) bars.splice(0, bars.length - MAX_BARS);
  }
  scheduleChart();
}

function scheduleChart() {
  chart.frame ||= requestAnimationFrame(drawChart);
}

const palette = () => {
  const style = getComputedStyle(document.documentElement);
  const read = (name) => style.getPropertyValue(name).trim();
  return { up: read('--up'), down: read('--down'), grid: read('--grid'), text: read('--muted'), line: read('--accent'), bg: read('--panel') };
};

function niceStep(range, targetTicks) {
  const raw = range / targetTicks;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const residual = raw / magnitude;
  return (residual > 5 ? 10 : residual > 2 ? 5 : residual > 1 ? 2 : 1) * magnitude;
}

/** Draws candles, volume, a price axis, time labels and the last-close line. */
function drawChart() {
  chart.frame = 0;
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext('2d');
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);

  const { bars } = chart;
  canvas.dataset.bars = String(bars.length);
  // The newest bar's start: with a backfilled past the count stays at MAX_BARS, so tests
  // (and curious people) watch this move instead.
  canvas.dataset.lastStart = String(bars.at(-1)?.start ?? '');
  const status = $('#chart-status');
  status.hidden = bars.length > 0;
  if (!bars.length) {
    status.textContent = chart.sym ? `waiting for candles on ${chart.channel}` : 'waiting for candles';
    return;
  }

  const colors = palette();
  const axisWidth = 64;
  const timeHeight = 20;
  const plot = { left: 8, top: 10, right: width - axisWidth, bottom: height - timeHeight };
  const plotWidth = plot.right - plot.left;
  const volumeHeight = (plot.bottom - plot.top) * 0.18;
  const priceBottom = plot.bottom - volumeHeight - 6;

  const spacing = Math.max(4, Math.min(16, plotWidth / Math.min(bars.length, 60)));
  const visible = bars.slice(-Math.floor(plotWidth / spacing));
  const bodyWidth = Math.max(1, Math.floor(spacing * 0.7));
  let low = Infinity;
  let high = -Infinity;
  let maxVolume = 0;
  for (const bar of visible) {
    low = Math.min(low, bar.low);
    high = Math.max(high, bar.high);
    maxVolume = Math.max(maxVolume, bar.volume);
  }
  const pad = (high - low || Math.abs(high) * 0.01 || 1) * 0.08;
  low -= pad;
  high += pad;
  const y = (value) => plot.top + ((high - value) / (high - low)) * (priceBottom - plot.top);
  const x = (index) => plot.right - (visible.length - index - 0.5) * spacing;

  ctx.font = '11px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace';
  ctx.textBaseline = 'middle';
  ctx.lineWidth = 1;
  const last = visible.at(-1);
  const lastY = Math.round(y(last.close)) + 0.5;
  const step = niceStep(high - low, 5);
  for (let tick = Math.ceil(low / step) * step; tick <= high; tick += step) {
    const ty = Math.round(y(tick)) + 0.5;
    ctx.strokeStyle = colors.grid;
    ctx.beginPath();
    ctx.moveTo(plot.left, ty);
    ctx.lineTo(plot.right, ty);
    ctx.stroke();
    if (Math.abs(ty - lastY) < 14) continue; // the last-close label takes this spot
    ctx.fillStyle = colors.text;
    ctx.fillText(price(tick), plot.right + 6, ty);
  }

  const labelEvery = Math.max(1, Math.ceil(64 / spacing));
  ctx.textAlign = 'center';
  visible.forEach((bar, index) => {
    const cx = Math.round(x(index)) + 0.5;
    const color = bar.close >= bar.open ? colors.up : colors.down;
    ctx.strokeStyle = color;
    ctx.fillStyle = color;
    ctx.globalAlpha = bar.forming ? 0.6 : 1;
    ctx.beginPath();
    ctx.moveTo(cx, Math.round(y(bar.high)));
    ctx.lineTo(cx, Math.round(y(bar.low)));
    ctx.stroke();
    const top = Math.round(y(Math.max(bar.open, bar.close)));
    const bodyHeight = Math.max(1, Math.round(y(Math.min(bar.open, bar.close))) - top);
    ctx.fillRect(Math.round(cx - bodyWidth / 2), top, bodyWidth, bodyHeight);
    if (maxVolume > 0) {
      const vh = (bar.volume / maxVolume) * volumeHeight;
      ctx.globalAlpha = bar.forming ? 0.25 : 0.4;
      ctx.fillRect(Math.round(cx - bodyWidth / 2), plot.bottom - vh, bodyWidth, vh);
    }
    ctx.globalAlpha = 1;
    if ((visible.length - 1 - index) % labelEvery === 0) {
      ctx.fillStyle = colors.text;
      ctx.fillText(clockTime(bar.start), cx, height - timeHeight / 2);
    }
  });

  ctx.strokeStyle = colors.line;
  ctx.setLineDash([4, 3]);
  ctx.beginPath();
  ctx.moveTo(plot.left, lastY);
  ctx.lineTo(plot.right, lastY);
  ctx.stroke();
  ctx.setLineDash([]);
  ctx.fillStyle = colors.line;
  ctx.fillRect(plot.right + 2, lastY - 8, axisWidth - 4, 16);
  ctx.fillStyle = colors.bg;
  ctx.textAlign = 'left';
  ctx.fillText(price(last.close), plot.right + 6, lastY);
}

new ResizeObserver(scheduleChart).observe(canvas);

// ---------- HTTP API polling ----------

/** Calls onData with the parsed JSON of `path` now and then every interval() ms; one request at a time. */
function poll(path, interval, onData, onError) {
  const run = async () => {
    try {
      const res = await fetch(path, { cache: 'no-store' });
      if (!res.ok) throw new Error(`${path}: HTTP ${res.status}`);
      onData(await res.json());
    } catch (err) {
      onError(err);
    } finally {
      setTimeout(run, interval());
    }
  };
  run();
}

let previousStats = null;

function renderStats(stats) {
  const now = performance.now();
  const { ws = 0, sse = 0, socketio = 0 } = stats.connections ?? {};
  $('#stats-connections').textContent = intFormat.format(ws + sse + socketio);
  $('#stats-transports').textContent = `ws ${ws} · sse ${sse} · sio ${socketio}`;
  $('#stats-subscriptions').textContent = intFormat.format(stats.subscriptions ?? 0);
  $('#stats-uptime').textContent = duration(stats.uptime_s ?? 0);
  const previous = previousStats;
  previousStats = { at: now, stats };
  const seconds = previous ? (now - previous.at) / 1000 : 0;
  const rate = (field) => (stats[field] - previous.stats[field]) / seconds;
  if (!previous || seconds <= 0 || rate('messages_out') < 0) return;
  $('#stats-rate').textContent = intFormat.format(rate('messages_out'));
  $('#stats-rate-in').textContent = intFormat.format(Math.max(0, rate('messages_in')));
  $('#stats-bandwidth').textContent = bytes(Math.max(0, rate('bytes_out')));
}

function staleStats() {
  previousStats = null;
  for (const id of ['#stats-connections', '#stats-transports', '#stats-rate', '#stats-rate-in', '#stats-bandwidth', '#stats-subscriptions', '#stats-uptime']) $(id).textContent = '–';
}

let feedsJson = '';

function renderFeeds({ feeds = [] }) {
  const json = JSON.stringify(feeds);
  if (json === feedsJson) return;
  feedsJson = json;
  const items = feeds.map(({ name, kind, state, reason }) => {
    const li = document.createElement('li');
    li.dataset.feed = name;
    li.dataset.state = state;
    const dot = document.createElement('span');
    dot.className = 'dot';
    const label = document.createElement('strong');
    label.textContent = name;
    const meta = document.createElement('span');
    meta.className = 'meta';
    meta.textContent = `${kind} · ${state}`;
    li.append(dot, label, meta);
    if (reason) {
      const why = document.createElement('small');
      why.textContent = reason;
      li.append(why);
    }
    return li;
  });
  if (!items.length) {
    const li = document.createElement('li');
    li.className = 'placeholder';
    li.textContent = 'no feeds configured';
    items.push(li);
  }
  $('#feeds').replaceChildren(...items);
}

function feedsUnavailable() {
  feedsJson = '';
  const li = document.createElement('li');
  li.className = 'placeholder';
  li.textContent = 'unavailable';
  $('#feeds').replaceChildren(li);
}

// Channel-list polls in a row that found no new symbol: on a fresh server symbols appear as
// they first trade, so the list is polled quickly until it settles, then slowly.
let stableChannelPolls = 0;

function discoverSymbols({ channels = [] }) {
  const symbols = channels.map(({ channel }) => /^ticks\.(.+)$/.exec(channel)?.[1]).filter(Boolean).sort();
  const before = rows.size;
  for (const sym of symbols) addSymbol(sym);
  stableChannelPolls = rows.size > before || rows.size === 0 ? 0 : stableChannelPolls + 1;
  if (!chart.sym && symbols.length) {
    const wanted = decodeURIComponent(location.hash.slice(1));
    selectSymbol(rows.has(wanted) ? wanted : symbols[0]);
  }
}

poll('/api/stats', () => STATS_POLL_MS, renderStats, staleStats);
poll('/api/feeds', () => FEEDS_POLL_MS, renderFeeds, feedsUnavailable);
poll('/api/channels', () => (stableChannelPolls >= 3 ? CHANNELS_POLL_MS : STATS_POLL_MS), discoverSymbols, (err) =>
  console.warn('ferrocast dashboard: channel list unavailable', err),
);
scheduleChart();
