//! The Massive (formerly Polygon.io) connector: one WebSocket per configured feed (a cluster
//! such as `wss://socket.massive.com/stocks` or `.../options`, real-time or delayed host),
//! subscribed to exactly what clients watch, normalised to the [`crate::market`] schema.
//!
//! Lifecycle of a connection:
//! 1. connect; send `{"action":"auth","params":KEY}` at once (Massive's JS client does not
//!    wait for the `connected` status either); wait for `auth_success`;
//! 2. subscribe to everything in demand plus `always`, as `T.AAPL,Q.AAPL,...`;
//! 3. read batched frames, publish each event; ping every `ping_interval_ms`; follow demand
//!    changes with `subscribe` / `unsubscribe`; a connection silent for `read_timeout_ms`
//!    (no data, no pong) is presumed dead and replaced; one that sends no market data for
//!    `stale_after_ms` while symbols are subscribed (but still answers pings) is marked
//!    `stale` and replaced, and stays `stale` until data flows again;
//! 4. on loss, back off (exponential, full jitter) and start again at 1, which resubscribes
//!    everything in demand.
//!
//! What stops or slows the retries, because retrying would not help or would make it worse:
//! `auth_failed` (and a missing key) ends in state `failed` with the reason and no further
//! attempt; `max_connections` (another client took the key's one connection per cluster)
//! waits `max_connections_backoff_ms`. `slow_consumer` and `force_disconnect` are counted,
//! logged and followed by a normal reconnect.
//!
//! Channel → upstream mapping: `ticks.SYM` → `T.SYM`, `quotes.SYM` → `Q.SYM`,
//! `candles.SYM.1s` → `A.SYM` and `candles.SYM.1m` → `AM.SYM` (each only when that event is
//! configured; a candle channel falls back to `T.SYM`, from which the server builds bars).
//! Upstream bars are published closed (`forming: false`, retained) with `src: "massive"`,
//! and the symbol is marked in [`UpstreamBars`] so the server's own builder stays quiet.
//! Stock quote sizes are multiplied by 100 (Massive documents them in round lots); see
//! `quote_size_multiplier`.

pub mod protocol;
pub mod rest;

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::time::{Instant, MissedTickBehavior};

use crate::PublishKind;
use crate::backoff::Backoff;
use crate::config::{FeedConfig, Problem};
use crate::feed::{
    Feed, FeedContext, FeedStats, LinkState, MarketChannel, STALE_TAG, Staleness, SymbolFilter,
    UpstreamBars, now_ms,
};
use crate::interest::{Demand, Interest};
use crate::link::{self, Message, Throttle, WsTx, close_text, sleep_until_opt, tick};
use crate::market::{self, Interval};
use crate::supervise::{SessionEnd, Upstream, supervise};
use protocol::{Event, Normaliser};

/// `src` of everything the Massive connector publishes.
pub const SRC_MASSIVE: &str = "massive";

/// The event types the connector maps to channels.
pub const EVENTS: [&str; 4] = ["T", "Q", "A", "AM"];

/// Massive's limit on option contracts with quotes on one connection.
pub const OPTIONS_QUOTE_LIMIT: usize = 1_000;

/// Params per subscribe or unsubscribe message: Massive documents no limit, so stay well
/// below any plausible frame-size cap.
const PARAMS_PER_MESSAGE: usize = 500;

/// How long an admitted-but-not-yet-subscribed quote channel holds its slot under the limit.
const RESERVATION_HOLD: Duration = Duration::from_secs(10);

/// A Massive cluster, from the URL path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Market {
    /// `/stocks`.
    Stocks,
    /// `/options`: contracts `O:…`, at most 1,000 with quotes per connection.
    Options,
    /// `/indices` (`I:…`), `/forex` (`C:…`), `/crypto` (`X:…`), `/futures…`.
    Other(&'static str),
}

impl Market {
    fn from_url(url: &url::Url) -> Option<Market> {
        match url.path_segments()?.next()? {
            "stocks" => Some(Market::Stocks),
            "options" => Some(Market::Options),
            "indices" => Some(Market::Other("I:*")),
            "forex" => Some(Market::Other("C:*")),
            "crypto" => Some(Market::Other("X:*")),
            "futures" => Some(Market::Other("")),
            _ => None,
        }
    }

    fn default_filter(self) -> SymbolFilter {
        match self {
            Market::Stocks | Market::Other("") => SymbolFilter::Unprefixed,
            Market::Options => SymbolFilter::Patterns(vec!["O:*".into()]),
            Market::Other(prefix) => SymbolFilter::Patterns(vec![prefix.into()]),
        }
    }
}

/// Which event types are subscribed per symbol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventSet {
    /// `T`.
    pub trades: bool,
    /// `Q`.
    pub quotes: bool,
    /// `A`.
    pub second_bars: bool,
    /// `AM`.
    pub minute_bars: bool,
}

impl EventSet {
    fn prefixes(self) -> impl Iterator<Item = &'static str> {
        [(self.trades, "T"), (self.quotes, "Q"), (self.second_bars, "A"), (self.minute_bars, "AM")]
            .into_iter()
            .filter_map(|(on, p)| on.then_some(p))
    }
}

/// A validated Massive feed.
#[derive(Clone, Debug)]
pub struct MassiveConfig {
    /// Feed name.
    pub name: String,
    /// WebSocket URL.
    pub url: String,
    /// Cluster.
    pub market: Market,
    /// API key, or why there is none (the feed then fails at start with that reason).
    pub api_key: Result<String, String>,
    /// Events per symbol.
    pub events: EventSet,
    /// Symbols always subscribed (`*` for all).
    pub always: Vec<String>,
    /// Symbols served.
    pub symbols: SymbolFilter,
    /// Linger after the last client left.
    pub linger: Duration,
    /// Connect deadline.
    pub connect_timeout: Duration,
    /// Ping interval (`None`: no pings).
    pub ping_interval: Option<Duration>,
    /// Silence after which the connection is presumed dead.
    pub read_timeout: Duration,
    /// No market data this long, in ms, with symbols subscribed: `stale` (0: never).
    pub stale_after_ms: u64,
    /// Reconnect backoff.
    pub backoff_initial: Duration,
    /// Reconnect backoff cap.
    pub backoff_max: Duration,
    /// Wait after `max_connections`.
    pub max_connections_backoff: Duration,
    /// Quote size factor.
    pub quote_size_multiplier: f64,
    /// Most symbols with quotes.
    pub quote_limit: Option<usize>,
    /// REST base URL for backfill.
    pub rest_url: String,
    /// Bars to backfill per candle channel (0: none).
    pub backfill_bars: usize,
}

impl MassiveConfig {
    /// Problems of a `kind = "massive"` feed table (keys relative to the feed).
    pub fn problems(cfg: &FeedConfig) -> Vec<Problem> {
        let mut problems = Vec::new();
        let parsed = url::Url::parse(&cfg.url).ok();
        let market = parsed.as_ref().and_then(Market::from_url);
        if parsed.is_some() && market.is_none() {
            problems.push((
                "url".into(),
                format!(
                    "{:?} does not name a Massive cluster: expected wss://HOST/stocks, /options, \
                     /indices, /forex, /crypto or /futures",
                    cfg.url
                ),
            ));
        }
        if cfg.events.is_empty() {
            problems.push(("events".into(), "list at least one of T, Q, A, AM".into()));
        }
        for (i, ev) in cfg.events.iter().enumerate() {
            if !EVENTS.contains(&ev.as_str()) {
                problems
                    .push((format!("events[{i}]"), format!("{ev:?} is not one of T, Q, A, AM")));
            }
        }
        let quotes = cfg.events.iter().any(|e| e == "Q");
        let delayed =
            parsed.as_ref().and_then(|u| u.host_str()).is_some_and(|h| h.starts_with("delayed."));
        if quotes && delayed {
            problems.push((
                "events".into(),
                "Q (quotes) is real-time only: the delayed host does not carry it".into(),
            ));
        }
        if quotes && market == Some(Market::Options) && cfg.always.iter().any(|s| s == "*") {
            problems.push((
                "always".into(),
                "options quotes cannot be subscribed with the * wildcard (Massive allows 1,000 \
                 named contracts per connection)"
                    .into(),
            ));
        }
        let limit =
            cfg.quote_limit.or((market == Some(Market::Options)).then_some(OPTIONS_QUOTE_LIMIT));
        if let Some(limit) = limit {
            if quotes && cfg.always.len() > limit {
                problems.push((
                    "always".into(),
                    format!("{} symbols exceed the quote limit of {limit}", cfg.always.len()),
                ));
            }
            if limit == 0 {
                problems.push(("quote_limit".into(), "must be at least 1".into()));
            }
        }
        if let Some(m) = cfg.quote_size_multiplier
            && !(m.is_finite() && m > 0.0)
        {
            problems.push(("quote_size_multiplier".into(), format!("{m} must be above 0")));
        }
        if cfg.max_connections_backoff_ms > 3_600_000 {
            problems.push(("max_connections_backoff_ms".into(), "must be at most 3600000".into()));
        }
        if !cfg.rest_url.is_empty() {
            match url::Url::parse(&cfg.rest_url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {}
                _ => problems.push((
                    "rest_url".into(),
                    format!("{:?} is not an http:// or https:// URL with a host", cfg.rest_url),
                )),
            }
        }
        if cfg.backfill_bars > crate::backfill::MAX_BACKFILL_BARS {
            problems.push((
                "backfill_bars".into(),
                format!("must be at most {}", crate::backfill::MAX_BACKFILL_BARS),
            ));
        }
        problems
    }

    /// Resolves a validated feed table; `env` supplies `api_key_env`.
    pub fn from_feed(cfg: &FeedConfig, env: &[(String, String)]) -> MassiveConfig {
        let market = url::Url::parse(&cfg.url)
            .ok()
            .as_ref()
            .and_then(Market::from_url)
            .unwrap_or(Market::Stocks);
        let has = |e: &str| cfg.events.iter().any(|x| x == e);
        let api_key = match cfg.resolve_api_key(env) {
            Ok(Some(key)) => Ok(key),
            Ok(None) => Err("no API key configured: set api_key_env (or api_key)".to_owned()),
            Err(reason) => Err(reason),
        };
        let ms = Duration::from_millis;
        MassiveConfig {
            name: cfg.name.clone(),
            url: cfg.url.clone(),
            market,
            api_key,
            events: EventSet {
                trades: has("T"),
                quotes: has("Q"),
                second_bars: has("A"),
                minute_bars: has("AM"),
            },
            always: cfg.always.clone(),
            symbols: if cfg.symbols.is_empty() {
                market.default_filter()
            } else {
                SymbolFilter::Patterns(cfg.symbols.clone())
            },
            linger: ms(cfg.linger_ms),
            connect_timeout: ms(cfg.connect_timeout_ms),
            ping_interval: (cfg.ping_interval_ms > 0).then(|| ms(cfg.ping_interval_ms)),
            read_timeout: ms(cfg.read_timeout_ms),
            stale_after_ms: cfg.stale_after_ms,
            backoff_initial: ms(cfg.backoff_initial_ms),
            backoff_max: ms(cfg.backoff_max_ms),
            max_connections_backoff: ms(cfg.max_connections_backoff_ms),
            quote_size_multiplier: cfg.quote_size_multiplier.unwrap_or(match market {
                Market::Stocks => 100.0,
                _ => 1.0,
            }),
            quote_limit: cfg
                .quote_limit
                .or((market == Market::Options).then_some(OPTIONS_QUOTE_LIMIT)),
            rest_url: if cfg.rest_url.is_empty() {
                rest::default_rest_url(&cfg.url)
            } else {
                cfg.rest_url.clone()
            },
            backfill_bars: cfg.backfill_bars,
        }
    }
}

/// How a connection ended.
#[derive(Debug)]
enum End {
    /// Retrying cannot help.
    Fatal(String),
    /// Reconnect after a delay.
    Retry {
        reason: String,
        /// Metric label of the cause.
        tag: &'static str,
        /// Wait `max_connections_backoff` instead of the usual backoff.
        long: bool,
    },
}

fn retry(tag: &'static str, reason: impl Into<String>) -> End {
    End::Retry { reason: reason.into(), tag, long: false }
}

impl Upstream for MassiveFeed {
    async fn run_session(&self, live_since: &mut Option<Instant>) -> SessionEnd {
        match self.session(live_since).await {
            End::Fatal(reason) => SessionEnd::Fatal(reason),
            End::Retry { reason, tag, long } => {
                // Jitter on top of the fixed wait, so two gateways sharing a key do not
                // keep evicting each other in lockstep.
                let wait = long.then(|| {
                    let max = self.cfg.max_connections_backoff;
                    max + Duration::from_millis(rand::random_range(0..=max.as_millis() as u64 / 4))
                });
                SessionEnd::Retry { tag, reason, wait }
            }
        }
    }

    fn session_ended(&self) {
        self.clear_upstream();
    }
}

/// A running Massive feed: the demand side ([`Feed`]) and the connection task ([`run`]).
///
/// [`run`]: MassiveFeed::run
pub struct MassiveFeed {
    cfg: MassiveConfig,
    ctx: FeedContext,
    interest: Interest,
    normaliser: Normaliser,
    /// Params currently subscribed upstream on the live connection.
    upstream: Mutex<BTreeSet<String>>,
    parse_log: Mutex<Throttle>,
    /// The last session ended stale: the feed stays `stale` until market data flows again.
    stale: AtomicBool,
}

impl std::fmt::Debug for MassiveFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MassiveFeed").field("name", &self.cfg.name).finish_non_exhaustive()
    }
}

impl MassiveFeed {
    /// A feed ready to [`run`](MassiveFeed::run).
    pub fn new(cfg: MassiveConfig, ctx: FeedContext) -> Arc<Self> {
        let normaliser = Normaliser {
            src: SRC_MASSIVE.to_owned(),
            quote_size_multiplier: cfg.quote_size_multiplier,
        };
        Arc::new(MassiveFeed {
            interest: Interest::new(cfg.linger),
            cfg,
            ctx,
            normaliser,
            upstream: Mutex::new(BTreeSet::new()),
            parse_log: Mutex::new(Throttle::new(5)),
            stale: AtomicBool::new(false),
        })
    }

    /// This feed's state and counters.
    pub fn stats(&self) -> &Arc<FeedStats> {
        &self.ctx.stats
    }

    /// Upstream params (`T.AAPL`) for one channel, given the configured events.
    fn params_for(&self, channel: &str) -> Vec<String> {
        let ev = self.cfg.events;
        let Some(mc) = MarketChannel::parse(channel) else { return Vec::new() };
        let sym = mc.symbol();
        let prefix = match mc {
            MarketChannel::Trades(_) if ev.trades => "T",
            MarketChannel::Quotes(_) if ev.quotes => "Q",
            MarketChannel::Candles(_, Interval::OneSecond) if ev.second_bars => "A",
            MarketChannel::Candles(_, Interval::OneMinute) if ev.minute_bars => "AM",
            MarketChannel::Candles(..) if ev.trades => "T",
            _ => return Vec::new(),
        };
        vec![format!("{prefix}.{sym}")]
    }

    /// Everything that should be subscribed upstream now.
    fn desired(&self) -> BTreeSet<String> {
        let mut out: BTreeSet<String> =
            self.interest.channels().iter().flat_map(|c| self.params_for(c)).collect();
        for sym in &self.cfg.always {
            for prefix in self.cfg.events.prefixes() {
                out.insert(format!("{prefix}.{sym}"));
            }
        }
        out
    }

    /// Params currently subscribed upstream (empty while disconnected).
    pub fn upstream_params(&self) -> BTreeSet<String> {
        self.upstream.lock().clone()
    }

    /// Runs the connection loop until `shutdown` completes (or forever after a fatal error,
    /// in state `failed`, until shutdown).
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        let backoff = Backoff::new(self.cfg.backoff_initial, self.cfg.backoff_max);
        supervise(&*self, &self.cfg.url, &self.ctx.stats, backoff, shutdown).await;
    }

    fn clear_upstream(&self) {
        let mut upstream = self.upstream.lock();
        for param in upstream.iter() {
            self.set_bar_mark(param, false);
        }
        upstream.clear();
        self.ctx.stats.upstream_subscriptions.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// One connection, from connect to loss.
    async fn session(&self, live_since: &mut Option<Instant>) -> End {
        let stats = &self.ctx.stats;
        let name = self.cfg.name.as_str();
        let api_key = match &self.cfg.api_key {
            Ok(key) => key.clone(),
            Err(reason) => return End::Fatal(reason.clone()),
        };
        stats.set_state(LinkState::Connecting, None);
        let ws = match link::connect(&self.cfg.url, &Default::default(), self.cfg.connect_timeout)
            .await
        {
            Ok(ws) => ws,
            Err(reason) => return retry("connect_failed", reason),
        };
        let (mut tx, mut rx) = ws.split();
        stats.set_state(LinkState::Authenticating, None);
        let auth = serde_json::json!({"action": "auth", "params": api_key}).to_string();
        if let Err(e) = link::send(&mut tx, Message::text(auth), self.cfg.read_timeout).await {
            return retry("write_failed", e);
        }

        // Authentication: only status frames matter until `auth_success`.
        let deadline = Instant::now() + self.cfg.read_timeout;
        'auth: loop {
            let msg = match tokio::time::timeout_at(deadline, rx.next()).await {
                Err(_) => {
                    return retry(
                        "auth_timeout",
                        format!(
                            "no auth_success within {} ms of connecting",
                            self.cfg.read_timeout.as_millis()
                        ),
                    );
                }
                Ok(None) => return retry("closed", "connection closed during authentication"),
                Ok(Some(Err(e))) => return retry("read_failed", format!("read failed: {e}")),
                Ok(Some(Ok(msg))) => msg,
            };
            let text = match msg {
                Message::Text(text) => text,
                Message::Close(frame) => {
                    return retry(
                        "closed",
                        format!("closed by upstream during authentication ({})", close_text(frame)),
                    );
                }
                _ => continue,
            };
            FeedStats::add(&stats.frames_in, 1);
            let Ok(events) = protocol::parse_frame(&text) else {
                FeedStats::add(&stats.parse_errors, 1);
                continue;
            };
            for event in events {
                FeedStats::add(&stats.messages_in, 1);
                let Ok(Event::Status(status)) = event else { continue };
                match status.status.as_str() {
                    "connected" => tracing::debug!(feed = name, "upstream: {}", status.message),
                    "auth_success" => break 'auth,
                    "auth_failed" => {
                        let source = if self.cfg.api_key.is_ok() {
                            "check the key in api_key / the variable named by api_key_env"
                        } else {
                            ""
                        };
                        return End::Fatal(format!(
                            "Massive rejected the API key (auth_failed: {:?}); {source}",
                            status.message
                        ));
                    }
                    other => {
                        if let Some(end) = self.disconnect_status(other, &status.message) {
                            return end;
                        }
                        tracing::info!(feed = name, status = other, "upstream: {}", status.message);
                    }
                }
            }
        }

        let now = Instant::now();
        *live_since = Some(now);
        if self.stale.load(Relaxed) {
            stats.set_state(
                LinkState::Stale,
                Some("reconnected after going stale; waiting for market data".into()),
            );
            tracing::info!(feed = name, url = %self.cfg.url, "feed reconnected: authenticated, still stale until data flows");
        } else {
            stats.set_state(LinkState::Live, None);
            tracing::info!(feed = name, url = %self.cfg.url, "feed live: authenticated");
        }
        if let Err(end) = self.reconcile(&mut tx).await {
            return end;
        }
        let mut staleness = Staleness::new(self.cfg.stale_after_ms);
        staleness.subscribed(!self.upstream.lock().is_empty(), Instant::now());

        let mut ping = self.cfg.ping_interval.map(|period| {
            let mut t = tokio::time::interval_at(now + period, period);
            t.set_missed_tick_behavior(MissedTickBehavior::Delay);
            t
        });
        let mut last_rx = now;
        loop {
            let linger_deadline = self.interest.next_deadline();
            tokio::select! {
                msg = rx.next() => {
                    last_rx = Instant::now();
                    match msg {
                        None => return retry("closed", "connection closed by upstream"),
                        Some(Err(e)) => return retry("read_failed", format!("read failed: {e}")),
                        Some(Ok(Message::Text(text))) => {
                            let published = FeedStats::get(&stats.published);
                            if let Some(end) = self.on_frame(&text) {
                                return end;
                            }
                            if FeedStats::get(&stats.published) > published {
                                staleness.data(last_rx);
                                if self.stale.swap(false, Relaxed) {
                                    stats.set_state(LinkState::Live, None);
                                    tracing::info!(feed = name, "feed live again: market data is flowing");
                                }
                            }
                        }
                        Some(Ok(Message::Close(frame))) => {
                            return retry("closed", format!("closed by upstream ({})", close_text(frame)));
                        }
                        // Pings are answered by tungstenite while reading; pongs and binary
                        // frames only prove the link alive.
                        Some(Ok(_)) => {}
                    }
                }
                () = tokio::time::sleep_until(last_rx + self.cfg.read_timeout) => {
                    return retry(
                        "read_timeout",
                        format!(
                            "nothing received for {} ms (no data, no pong): the connection is presumed dead",
                            self.cfg.read_timeout.as_millis()
                        ),
                    );
                }
                () = sleep_until_opt(staleness.deadline()) => {
                    let reason = staleness.reason(self.upstream.lock().len());
                    self.stale.store(true, Relaxed);
                    stats.set_state(LinkState::Stale, Some(reason.clone()));
                    return retry(STALE_TAG, reason);
                }
                _ = tick(&mut ping) => {
                    if let Err(e) = link::send(&mut tx, Message::Ping(Default::default()), self.cfg.read_timeout).await {
                        return retry("write_failed", e);
                    }
                }
                () = self.interest.changed() => {
                    if let Err(end) = self.reconcile(&mut tx).await {
                        return end;
                    }
                    staleness.subscribed(!self.upstream.lock().is_empty(), Instant::now());
                }
                () = sleep_until_opt(linger_deadline) => {
                    if let Err(end) = self.reconcile(&mut tx).await {
                        return end;
                    }
                    staleness.subscribed(!self.upstream.lock().is_empty(), Instant::now());
                }
            }
        }
    }

    /// Resolves expired lingers, then brings the upstream subscriptions in line with demand:
    /// unsubscribes first, so a quote limit is never exceeded upstream in between.
    async fn reconcile(&self, tx: &mut WsTx) -> Result<(), End> {
        let probe = self.ctx.probe.clone();
        self.interest.settle(Instant::now(), |c| probe(c));
        let desired = self.desired();
        let (remove, add) = {
            let upstream = self.upstream.lock();
            let remove: Vec<String> = upstream.difference(&desired).cloned().collect();
            let add: Vec<String> = desired.difference(&upstream).cloned().collect();
            (remove, add)
        };
        for (action, params) in [("unsubscribe", &remove), ("subscribe", &add)] {
            for chunk in params.chunks(PARAMS_PER_MESSAGE) {
                let joined = chunk.join(",");
                let msg = serde_json::json!({"action": action, "params": joined}).to_string();
                link::send(tx, Message::text(msg), self.cfg.read_timeout)
                    .await
                    .map_err(|e| retry("write_failed", e))?;
                tracing::info!(feed = %self.cfg.name, "upstream {action}: {joined}");
            }
            let mut upstream = self.upstream.lock();
            for param in params.iter() {
                if action == "subscribe" {
                    upstream.insert(param.clone());
                } else {
                    upstream.remove(param);
                }
                self.set_bar_mark(param, action == "subscribe");
            }
            self.ctx
                .stats
                .upstream_subscriptions
                .store(upstream.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// Marks or unmarks a bar param's symbol in [`UpstreamBars`].
    fn set_bar_mark(&self, param: &str, on: bool) {
        let (interval, sym) = match param.split_once('.') {
            Some(("A", sym)) => (Interval::OneSecond, sym),
            Some(("AM", sym)) => (Interval::OneMinute, sym),
            _ => return,
        };
        if sym == "*" {
            return;
        }
        let bars: &UpstreamBars = &self.ctx.bars;
        if on {
            bars.mark(sym, interval);
        } else {
            bars.unmark(sym, interval);
        }
    }

    /// Handles one data frame; `Some` ends the connection.
    fn on_frame(&self, text: &str) -> Option<End> {
        let stats = &self.ctx.stats;
        FeedStats::add(&stats.frames_in, 1);
        let events = match protocol::parse_frame(text) {
            Ok(events) => events,
            Err(e) => {
                FeedStats::add(&stats.parse_errors, 1);
                self.log_parse_error(&format!("frame is not a JSON array: {e}"), text);
                return None;
            }
        };
        let sink = &self.ctx.sink;
        for event in events {
            FeedStats::add(&stats.messages_in, 1);
            let published = match event {
                Ok(Event::Trade(t)) => self.normaliser.trade(t).map(|t| {
                    let ts = t.ts;
                    sink.publish(
                        &market::channel_for_trade(&t.sym),
                        market::encode(&t),
                        PublishKind::Retained,
                    );
                    stats.latency.record_ms(now_ms() - ts);
                }),
                Ok(Event::Quote(q)) => self.normaliser.quote(q).map(|q| {
                    let ts = q.ts;
                    sink.publish(
                        &market::channel_for_quote(&q.sym),
                        market::encode(&q),
                        PublishKind::Retained,
                    );
                    stats.latency.record_ms(now_ms() - ts);
                }),
                Ok(Event::Second(a)) => self.publish_bar(a, Interval::OneSecond),
                Ok(Event::Minute(a)) => self.publish_bar(a, Interval::OneMinute),
                Ok(Event::Status(status)) => {
                    if let Some(end) = self.on_status(&status.status, &status.message) {
                        return Some(end);
                    }
                    continue;
                }
                Ok(Event::Other) => {
                    FeedStats::add(&stats.unknown_events, 1);
                    continue;
                }
                Err(e) => {
                    FeedStats::add(&stats.parse_errors, 1);
                    self.log_parse_error(&format!("event skipped: {e}"), text);
                    continue;
                }
            };
            match published {
                Ok(()) => FeedStats::add(&stats.published, 1),
                Err(invalid) => {
                    FeedStats::add(&stats.parse_errors, 1);
                    self.log_parse_error(&format!("event skipped: {invalid}"), text);
                }
            }
        }
        None
    }

    fn publish_bar(
        &self,
        a: protocol::WireAgg,
        interval: Interval,
    ) -> Result<(), protocol::Invalid> {
        let candle = self.normaliser.bar(a, interval)?;
        // Covers wildcard subscriptions too, where no param names the symbol.
        self.ctx.bars.mark(&candle.sym, interval);
        self.ctx.sink.publish(
            &market::channel_for_candle(&candle.sym, interval),
            market::encode(&candle),
            PublishKind::Retained,
        );
        Ok(())
    }

    fn log_parse_error(&self, what: &str, frame: &str) {
        if let Some(suppressed) = self.parse_log.lock().allow() {
            let sample: String = frame.chars().take(200).collect();
            tracing::warn!(
                feed = %self.cfg.name,
                suppressed,
                "malformed upstream data ({what}); frame starts {sample:?}"
            );
        }
    }

    /// A status frame on a live connection; `Some` ends the connection.
    fn on_status(&self, status: &str, message: &str) -> Option<End> {
        let name = self.cfg.name.as_str();
        match status {
            "success" | "connected" | "auth_success" => {
                tracing::debug!(feed = name, "upstream: {message}");
                None
            }
            "error" => {
                FeedStats::add(&self.ctx.stats.upstream_errors, 1);
                tracing::warn!(feed = name, "upstream reported an error: {message}");
                None
            }
            "auth_required" => Some(retry(
                "auth_required",
                format!("upstream says authentication is required ({message})"),
            )),
            other => self.disconnect_status(other, message).or_else(|| {
                tracing::info!(feed = name, status = other, "upstream: {message}");
                None
            }),
        }
    }

    /// The statuses that announce a disconnect, at any point of the connection.
    fn disconnect_status(&self, status: &str, message: &str) -> Option<End> {
        let wait_s = self.cfg.max_connections_backoff.as_secs();
        match status {
            "max_connections" => Some(End::Retry {
                reason: format!(
                    "Massive closed the connection: max_connections ({message:?}). Another \
                     client is using the same API key on this cluster (the plan allows one \
                     connection per cluster); waiting {wait_s} s before trying again"
                ),
                tag: "max_connections",
                long: true,
            }),
            "slow_consumer" => Some(retry(
                "slow_consumer",
                format!(
                    "Massive dropped the connection as a slow consumer ({message:?}): this \
                     gateway did not read fast enough; subscribe to fewer symbols or give it \
                     more CPU"
                ),
            )),
            "force_disconnect" => Some(retry(
                "force_disconnect",
                format!("Massive forced a disconnect ({message:?})"),
            )),
            "auth_timeout" => Some(retry(
                "auth_timeout",
                format!("Massive timed out the authentication ({message:?})"),
            )),
            _ => None,
        }
    }

    /// Admission of a new quote channel under the per-connection quote limit; see
    /// [`Feed::admit`]. A lingering quote channel is given up early to make room.
    fn admit_quote(&self, channel: &str, sym: &str, limit: usize) -> Result<(), String> {
        if self.cfg.always.iter().any(|s| s == sym) {
            return Ok(());
        }
        self.interest.with(|channels| {
            if channels.contains_key(channel) {
                return Ok(());
            }
            let quote_channels: Vec<(&String, Demand)> = channels
                .iter()
                .filter(|(c, _)| matches!(MarketChannel::parse(c), Some(MarketChannel::Quotes(_))))
                .map(|(c, d)| (c, *d))
                .collect();
            let always_extra = self
                .cfg
                .always
                .iter()
                .filter(|s| !channels.contains_key(&market::channel_for_quote(s)))
                .count();
            let now = Instant::now();
            if quote_channels.len() + always_extra >= limit {
                let victim = quote_channels
                    .iter()
                    .filter_map(|(c, d)| match d {
                        Demand::Lingering { until } => Some((*until, (*c).clone())),
                        _ => None,
                    })
                    .min();
                match victim {
                    Some((_, victim)) => {
                        tracing::info!(
                            feed = %self.cfg.name,
                            "quote limit of {limit} reached: dropping lingering {victim} early for {channel}"
                        );
                        channels.remove(&victim);
                    }
                    None => {
                        return Err(format!(
                            "feed {:?} already carries quotes for {limit} symbols, the upstream's \
                             per-connection limit (Massive allows 1,000 option contracts with \
                             quotes); unsubscribe from another symbol's quotes first",
                            self.cfg.name
                        ));
                    }
                }
            }
            channels.insert(channel.to_owned(), Demand::Reserved { until: now + RESERVATION_HOLD });
            Ok(())
        })
    }
}

impl Feed for MassiveFeed {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn claims(&self, channel: &MarketChannel<'_>) -> bool {
        self.cfg.symbols.matches(channel.symbol())
    }

    fn admit(&self, channel: &str) -> Result<(), String> {
        let Some(limit) = self.cfg.quote_limit else { return Ok(()) };
        match MarketChannel::parse(channel) {
            Some(MarketChannel::Quotes(sym)) if self.cfg.events.quotes => {
                let verdict = self.admit_quote(channel, sym, limit);
                if verdict.is_err() {
                    FeedStats::add(&self.ctx.stats.subscribe_refused, 1);
                }
                verdict
            }
            _ => Ok(()),
        }
    }

    fn demand(&self, channel: &str, wanted: bool) {
        self.interest.set(channel, wanted);
    }

    fn backfill(&self) -> Option<(Arc<dyn crate::backfill::Backfill>, usize)> {
        let key = self.cfg.api_key.as_ref().ok()?;
        (self.cfg.backfill_bars > 0).then(|| {
            let rest = rest::RestBackfill { base: self.cfg.rest_url.clone(), key: key.clone() };
            (Arc::new(rest) as Arc<dyn crate::backfill::Backfill>, self.cfg.backfill_bars)
        })
    }
}
