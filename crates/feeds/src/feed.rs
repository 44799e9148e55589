//! What every upstream connector shares: its link state, its counters, what it needs from
//! the server ([`FeedContext`]), the demand-routing interface ([`Feed`]), and the parsing of
//! market-data channel names into symbols.
//!
//! A connector never sees the hub. It publishes through a [`crate::Sink`], asks "does this
//! channel still have subscribers?" through a probe closure, and reports its state through
//! [`FeedStats`], which the server renders in `/api/feeds`, `/readyz` and `/metrics`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};

use crate::Sink;
use crate::market::{CANDLES_NAMESPACE, Interval, QUOTES_NAMESPACE, TRADES_NAMESPACE};

/// What a data source is doing right now (also the simulator's state on the server's feed
/// board). Serialized in snake_case, as `/api/feeds` and the metrics show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// Opening the TCP/TLS/WebSocket connection.
    Connecting,
    /// Connected, waiting for the upstream to accept the credentials.
    Authenticating,
    /// Authenticated (or needing no auth) and receiving data.
    Live,
    /// Connected, but no market data for `stale_after_ms` while symbols are subscribed
    /// (an upstream that authenticates and answers pings but sends nothing). The connector
    /// reconnects; the state stays `stale` until data flows again.
    Stale,
    /// Waiting before the next connection attempt.
    BackingOff,
    /// Gave up: retrying cannot help (rejected credentials, missing key). Needs an operator.
    Failed,
    /// Stopped because the server is shutting down.
    Stopped,
    /// Not run here: another node of the cluster holds the ingest lease and runs it.
    Standby,
}

impl LinkState {
    /// Every state, for metrics that export one series per state.
    pub const ALL: [LinkState; 8] = [
        LinkState::Connecting,
        LinkState::Authenticating,
        LinkState::Live,
        LinkState::Stale,
        LinkState::BackingOff,
        LinkState::Failed,
        LinkState::Stopped,
        LinkState::Standby,
    ];

    /// The snake_case name used in the API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Authenticating => "authenticating",
            LinkState::Live => "live",
            LinkState::Stale => "stale",
            LinkState::BackingOff => "backing_off",
            LinkState::Failed => "failed",
            LinkState::Stopped => "stopped",
            LinkState::Standby => "standby",
        }
    }
}

impl fmt::Display for LinkState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Called on every state change with the new state and, when not live, the reason.
pub type StateObserver = Box<dyn Fn(LinkState, Option<&str>) + Send + Sync>;

/// Upper bounds of the upstream-latency histogram buckets, in milliseconds. Upstream
/// timestamps have millisecond resolution, and a feed's delay is dominated by the network
/// and the venue, so the buckets start at 1 ms and reach 10 s (a delayed feed shows up in
/// `+Inf`, as it should).
pub const LATENCY_BUCKETS_MS: [u64; 13] =
    [1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000];

/// Upstream event time → publish latency, a fixed-bucket histogram with atomic counts.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// One count per bucket plus the overflow (`+Inf`) bucket.
    counts: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    sum_ms: AtomicU64,
}

impl LatencyHistogram {
    /// Records one latency in milliseconds. Negative values (an upstream clock ahead of
    /// ours) count as zero rather than being dropped, so the count still matches events.
    pub fn record_ms(&self, ms: i64) {
        let ms = u64::try_from(ms).unwrap_or(0);
        let bucket =
            LATENCY_BUCKETS_MS.iter().position(|b| ms <= *b).unwrap_or(LATENCY_BUCKETS_MS.len());
        self.counts[bucket].fetch_add(1, Relaxed);
        self.sum_ms.fetch_add(ms, Relaxed);
    }

    /// Cumulative counts per bucket bound (ms), then the total count and the sum in ms.
    pub fn snapshot(&self) -> (Vec<(u64, u64)>, u64, u64) {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(LATENCY_BUCKETS_MS.len());
        for (i, bound) in LATENCY_BUCKETS_MS.iter().enumerate() {
            cumulative += self.counts[i].load(Relaxed);
            buckets.push((*bound, cumulative));
        }
        cumulative += self.counts[LATENCY_BUCKETS_MS.len()].load(Relaxed);
        (buckets, cumulative, self.sum_ms.load(Relaxed))
    }
}

/// One connector's state and counters. Shared between the connector task (which writes) and
/// the server (which reads for `/api/feeds`, `/readyz` and `/metrics`).
#[derive(Default)]
pub struct FeedStats {
    /// The feed's configured name, used as the `feed` label.
    pub name: String,
    /// `massive` or `generic`.
    pub kind: String,
    status: Mutex<Option<(LinkState, Option<String>)>>,
    observer: Mutex<Option<StateObserver>>,
    /// Connection attempts, the first included.
    pub connects: AtomicU64,
    /// Connection attempts after the first: each one follows a lost or failed connection.
    pub reconnects: AtomicU64,
    /// WebSocket text frames received.
    pub frames_in: AtomicU64,
    /// Upstream events received (array elements count one each), status and heartbeat
    /// messages included.
    pub messages_in: AtomicU64,
    /// Messages published into the hub.
    pub published: AtomicU64,
    /// Frames or events that could not be parsed; each was skipped, its batch kept.
    pub parse_errors: AtomicU64,
    /// Well-formed events of a type the connector does not handle (e.g. Massive `LULD`
    /// when not mapped), or that match no route of a generic feed.
    pub unknown_events: AtomicU64,
    /// Heartbeats, acks and other messages the configuration says to ignore.
    pub ignored: AtomicU64,
    /// Error messages from the upstream (a refused subscription, a bad request).
    pub upstream_errors: AtomicU64,
    /// Client subscriptions refused because the upstream would not carry them (e.g. the
    /// 1,000-contract limit of Massive options quotes).
    pub subscribe_refused: AtomicU64,
    /// Upstream subscriptions currently held (a gauge).
    pub upstream_subscriptions: AtomicU64,
    disconnects: Mutex<BTreeMap<&'static str, u64>>,
    /// Upstream event time → publish, for events that carry a timestamp.
    pub latency: LatencyHistogram,
}

impl fmt::Debug for FeedStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FeedStats")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl FeedStats {
    /// Counters for the feed `name` of `kind`, in state `connecting`.
    pub fn new(name: &str, kind: &str) -> Self {
        FeedStats { name: name.to_owned(), kind: kind.to_owned(), ..FeedStats::default() }
    }

    /// Installs the callback told about every state change (the server's feed board), and
    /// tells it the current state at once.
    pub fn set_observer(&self, observer: StateObserver) {
        let (state, reason) = self.state();
        observer(state, reason.as_deref());
        *self.observer.lock() = Some(observer);
    }

    /// The current state and, when not live, why.
    pub fn state(&self) -> (LinkState, Option<String>) {
        self.status.lock().clone().unwrap_or((LinkState::Connecting, None))
    }

    /// Moves to `state`. The observer is called only when the state or reason changed.
    pub fn set_state(&self, state: LinkState, reason: Option<String>) {
        let mut status = self.status.lock();
        if status.as_ref().is_some_and(|(s, r)| *s == state && *r == reason) {
            return;
        }
        // Called under the lock so two racing transitions reach the observer in the order
        // they were made; the observer only updates the server's board.
        if let Some(observer) = self.observer.lock().as_ref() {
            observer(state, reason.as_deref());
        }
        *status = Some((state, reason));
    }

    /// Counts a lost connection by `reason` (`read_timeout`, `closed`, `slow_consumer`, ...).
    pub fn disconnected(&self, reason: &'static str) {
        *self.disconnects.lock().entry(reason).or_default() += 1;
    }

    /// Lost connections by reason.
    pub fn disconnects(&self) -> BTreeMap<&'static str, u64> {
        self.disconnects.lock().clone()
    }

    /// Shorthand for a relaxed counter read.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}

/// Watches one connection for staleness: symbols subscribed upstream, yet no market data for
/// `limit`. The window opens at the first subscription (so a new subscription has the whole
/// limit to produce data) and restarts with every data event; it closes while nothing is
/// subscribed.
#[derive(Debug, Clone)]
pub struct Staleness {
    limit: Option<std::time::Duration>,
    since: Option<tokio::time::Instant>,
}

/// The metric tag (`ferrocast_feed_disconnects_total{reason}`) of a stale reconnect.
pub const STALE_TAG: &str = "stale";

impl Staleness {
    /// A watch with `stale_after_ms` (0: never stale).
    pub fn new(stale_after_ms: u64) -> Self {
        let limit = (stale_after_ms > 0).then(|| std::time::Duration::from_millis(stale_after_ms));
        Staleness { limit, since: None }
    }

    /// The upstream subscriptions changed; `any` says whether at least one is held.
    pub fn subscribed(&mut self, any: bool, now: tokio::time::Instant) {
        match (any, self.since) {
            (true, None) => self.since = Some(now),
            (false, _) => self.since = None,
            (true, Some(_)) => {}
        }
    }

    /// Market data arrived.
    pub fn data(&mut self, now: tokio::time::Instant) {
        if self.since.is_some() {
            self.since = Some(now);
        }
    }

    /// When the connection becomes stale, if nothing arrives before.
    pub fn deadline(&self) -> Option<tokio::time::Instant> {
        Some(self.since? + self.limit?)
    }

    /// The reason recorded when the deadline passes.
    pub fn reason(&self, subscriptions: usize) -> String {
        format!(
            "no market data for {} ms with {subscriptions} upstream subscription(s): the upstream \
             is connected but silent; reconnecting",
            self.limit.unwrap_or_default().as_millis()
        )
    }
}

/// Answers "does `channel` have subscribers right now?". Implemented by the server over the
/// hub; connectors use it to confirm a demand change before unsubscribing upstream, because
/// first-subscriber and last-subscriber notifications may reach them out of order.
pub type DemandProbe = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// What a connector needs from the server.
#[derive(Clone)]
pub struct FeedContext {
    /// Where normalised market data goes.
    pub sink: Arc<dyn Sink>,
    /// Whether a channel still has subscribers.
    pub probe: DemandProbe,
    /// Symbols whose bars come from upstream, so the server's candle builder stays quiet.
    pub bars: Arc<UpstreamBars>,
    /// This feed's state and counters.
    pub stats: Arc<FeedStats>,
}

impl fmt::Debug for FeedContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FeedContext").field("stats", &self.stats).finish_non_exhaustive()
    }
}

/// The demand side of a running connector, as the server's demand router sees it.
pub trait Feed: Send + Sync {
    /// The configured feed name.
    fn name(&self) -> &str;
    /// Whether this feed serves the market channel `channel` (by its symbol). The router
    /// gives each channel to the first feed, in configuration order, that claims it.
    fn claims(&self, channel: &MarketChannel<'_>) -> bool;
    /// Before a client is added to `channel`: `Err(reason)` refuses the subscription because
    /// the upstream could not carry it (a per-connection limit). Admitting may reserve
    /// upstream capacity for the channel until its subscriber shows up.
    fn admit(&self, channel: &str) -> Result<(), String>;
    /// `channel` gained its first subscriber (`wanted`) or lost its last one.
    fn demand(&self, channel: &str, wanted: bool);
    /// Where this feed's historical candles come from, and how many bars per channel to
    /// fetch; `None` when it has none (or backfill is off).
    fn backfill(&self) -> Option<(Arc<dyn crate::backfill::Backfill>, usize)> {
        None
    }
}

/// A market-data channel, split into its parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarketChannel<'a> {
    /// `ticks.SYM`.
    Trades(&'a str),
    /// `quotes.SYM`.
    Quotes(&'a str),
    /// `candles.SYM.1s` or `candles.SYM.1m`.
    Candles(&'a str, Interval),
}

impl<'a> MarketChannel<'a> {
    /// Parses `ticks.SYM`, `quotes.SYM` or `candles.SYM.INTERVAL`; anything else is `None`.
    /// Symbols may contain dots (`ticks.BRK.B`), so a candle's interval is the part after
    /// the last dot.
    pub fn parse(channel: &'a str) -> Option<Self> {
        let (ns, rest) = channel.split_once('.')?;
        if rest.is_empty() {
            return None;
        }
        match ns {
            TRADES_NAMESPACE => Some(MarketChannel::Trades(rest)),
            QUOTES_NAMESPACE => Some(MarketChannel::Quotes(rest)),
            CANDLES_NAMESPACE => {
                let (sym, interval) = rest.rsplit_once('.')?;
                let interval = interval.parse().ok()?;
                (!sym.is_empty()).then_some(MarketChannel::Candles(sym, interval))
            }
            _ => None,
        }
    }

    /// The symbol the channel carries.
    pub fn symbol(&self) -> &'a str {
        match *self {
            MarketChannel::Trades(s) | MarketChannel::Quotes(s) | MarketChannel::Candles(s, _) => s,
        }
    }
}

/// Which symbols a feed serves, from its `symbols` patterns: `*` (any), `PREFIX*`,
/// `*SUFFIX`, or an exact symbol. Massive feeds default to their market's symbols (see the connector).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SymbolFilter {
    /// Any symbol matching one of the patterns.
    Patterns(Vec<String>),
    /// Symbols without a one-letter market prefix such as `O:` or `X:` (stocks).
    Unprefixed,
}

impl SymbolFilter {
    /// Whether `sym` passes the filter.
    pub fn matches(&self, sym: &str) -> bool {
        match self {
            SymbolFilter::Unprefixed => {
                let b = sym.as_bytes();
                !(b.len() >= 2 && b[0].is_ascii_uppercase() && b[1] == b':')
            }
            SymbolFilter::Patterns(patterns) => {
                patterns.iter().any(|p| match (p.strip_suffix('*'), p.strip_prefix('*')) {
                    (Some(prefix), _) => sym.starts_with(prefix),
                    (None, Some(suffix)) => sym.ends_with(suffix),
                    (None, None) => p == sym,
                })
            }
        }
    }
}

/// Symbols (and intervals) whose closed bars come from an upstream feed.
///
/// The server builds candles from every trade on `ticks.*`; for a symbol whose bars Massive
/// delivers (`A` per second, `AM` per minute), those built bars would duplicate and disagree
/// with the upstream's (which only count qualifying trades). A connector marks a symbol and
/// interval here when it subscribes to the upstream bars or receives one, and unmarks it when
/// it unsubscribes; the server's candle tap drops its own bars for marked pairs.
#[derive(Debug, Default)]
pub struct UpstreamBars {
    /// Fast path for the tap on every trade: false until anything is marked.
    any: AtomicBool,
    /// Symbol → bitmask of intervals (bit per [`Interval::ALL`] index).
    marked: RwLock<HashMap<String, u8>>,
}

fn interval_bit(interval: Interval) -> u8 {
    match interval {
        Interval::OneSecond => 1,
        Interval::OneMinute => 2,
    }
}

impl UpstreamBars {
    /// Whether the `interval` bars of `sym` come from upstream.
    pub fn covers(&self, sym: &str, interval: Interval) -> bool {
        self.any.load(Relaxed)
            && self.marked.read().get(sym).is_some_and(|m| m & interval_bit(interval) != 0)
    }

    /// Marks the `interval` bars of `sym` as coming from upstream.
    pub fn mark(&self, sym: &str, interval: Interval) {
        if self.covers(sym, interval) {
            return;
        }
        *self.marked.write().entry(sym.to_owned()).or_default() |= interval_bit(interval);
        self.any.store(true, Relaxed);
    }

    /// The upstream no longer sends these bars: the server builds them again.
    pub fn unmark(&self, sym: &str, interval: Interval) {
        let mut marked = self.marked.write();
        if let Some(m) = marked.get_mut(sym) {
            *m &= !interval_bit(interval);
            if *m == 0 {
                marked.remove(sym);
            }
        }
    }
}

/// Wall-clock time in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn market_channels_parse() {
        assert_eq!(MarketChannel::parse("ticks.AAPL"), Some(MarketChannel::Trades("AAPL")));
        assert_eq!(MarketChannel::parse("quotes.BRK.B"), Some(MarketChannel::Quotes("BRK.B")));
        assert_eq!(
            MarketChannel::parse("candles.BRK.B.1m"),
            Some(MarketChannel::Candles("BRK.B", Interval::OneMinute))
        );
        assert_eq!(
            MarketChannel::parse("candles.O:TSLA230616C00150000.1s").map(|c| c.symbol()),
            Some("O:TSLA230616C00150000")
        );
        for bad in ["ticks", "ticks.", "candles.AAPL", "candles.AAPL.5m", "chat.room", "x.y"] {
            assert_eq!(MarketChannel::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn symbol_filters() {
        let stocks = SymbolFilter::Unprefixed;
        assert!(stocks.matches("AAPL") && stocks.matches("BRK.B"));
        assert!(!stocks.matches("O:SPY241220P00720000") && !stocks.matches("X:BTCUSD"));
        let options = SymbolFilter::Patterns(vec!["O:*".into()]);
        assert!(options.matches("O:SPY241220P00720000") && !options.matches("AAPL"));
        let list = SymbolFilter::Patterns(vec!["BTCUSDT".into(), "ETH*".into()]);
        assert!(list.matches("BTCUSDT") && list.matches("ETHUSDT") && !list.matches("BTC"));
        assert!(SymbolFilter::Patterns(vec!["*".into()]).matches("anything"));
        let quote = SymbolFilter::Patterns(vec!["*USDT".into(), "*-USD".into()]);
        assert!(quote.matches("BTCUSDT") && quote.matches("ETH-USD") && !quote.matches("ETH-EUR"));
    }

    #[test]
    fn upstream_bars_mark_and_unmark() {
        let bars = UpstreamBars::default();
        assert!(!bars.covers("AAPL", Interval::OneMinute));
        bars.mark("AAPL", Interval::OneMinute);
        assert!(bars.covers("AAPL", Interval::OneMinute));
        assert!(!bars.covers("AAPL", Interval::OneSecond));
        bars.mark("AAPL", Interval::OneSecond);
        bars.unmark("AAPL", Interval::OneMinute);
        assert!(!bars.covers("AAPL", Interval::OneMinute));
        assert!(bars.covers("AAPL", Interval::OneSecond));
    }

    #[test]
    fn latency_histogram_is_cumulative() {
        let h = LatencyHistogram::default();
        for ms in [-5, 0, 3, 40, 20_000] {
            h.record_ms(ms);
        }
        let (buckets, count, sum) = h.snapshot();
        assert_eq!(count, 5);
        assert_eq!(sum, 20_043);
        assert_eq!(buckets[0], (1, 2));
        assert_eq!(buckets[2], (5, 3));
        assert_eq!(buckets.last().unwrap(), &(10_000, 4));
    }

    #[test]
    fn observer_sees_changes_once() {
        let stats = FeedStats::new("f", "massive");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        stats.set_observer(Box::new(move |state, reason| {
            s.lock().push((state, reason.map(str::to_owned)));
        }));
        stats.set_state(LinkState::Live, None);
        stats.set_state(LinkState::Live, None);
        stats.set_state(LinkState::Failed, Some("bad key".into()));
        assert_eq!(
            *seen.lock(),
            vec![
                (LinkState::Connecting, None),
                (LinkState::Live, None),
                (LinkState::Failed, Some("bad key".into()))
            ]
        );
    }
}
