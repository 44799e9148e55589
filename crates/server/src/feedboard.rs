//! The state of every data source (simulator, upstream connectors), for `/api/feeds`,
//! `/readyz` and `/metrics`.
//!
//! Upstream connectors also register their counters here ([`FeedBoard::register`]), which
//! `/metrics` renders as `ferrocast_feed_*` families, and share the [`UpstreamBars`] marks
//! that keep the server's candle builder quiet for symbols whose bars come from upstream.

use std::fmt::Write;
use std::sync::Arc;

use ferrocast_feeds::feed::{FeedStats, LinkState, UpstreamBars};
use parking_lot::Mutex;
use serde::Serialize;

use crate::metrics::family;

/// One feed's public status.
#[derive(Debug, Clone, Serialize)]
pub struct FeedStatus {
    pub name: String,
    pub kind: String,
    pub state: LinkState,
    /// Why the feed is not live, in words a person can act on.
    pub reason: Option<String>,
    /// Whether readiness depends on this feed.
    pub required: bool,
}

/// Every feed's status.
#[derive(Debug, Default)]
pub struct FeedBoard {
    feeds: Mutex<Vec<FeedStatus>>,
    /// Counters of upstream connectors, in configuration order.
    stats: Mutex<Vec<Arc<FeedStats>>>,
    /// Symbols whose candles come from an upstream feed; consulted by the candle tap.
    pub upstream_bars: Arc<UpstreamBars>,
}

impl FeedBoard {
    /// Adds a feed or updates its state.
    pub fn set(
        &self,
        name: &str,
        kind: &str,
        required: bool,
        state: LinkState,
        reason: Option<String>,
    ) {
        let mut feeds = self.feeds.lock();
        match feeds.iter_mut().find(|f| f.name == name) {
            Some(f) => {
                f.state = state;
                f.reason = reason;
            }
            None => feeds.push(FeedStatus {
                name: name.into(),
                kind: kind.into(),
                state,
                reason,
                required,
            }),
        }
    }

    /// Adds an upstream connector's counters to `/metrics`. Its state reaches the board
    /// through [`FeedBoard::set`], called by the connector's state observer.
    pub fn register(&self, stats: &Arc<FeedStats>) {
        self.stats.lock().push(stats.clone());
    }

    pub fn snapshot(&self) -> Vec<FeedStatus> {
        self.feeds.lock().clone()
    }

    /// Why the server is not ready because of a feed, if it is not.
    pub fn not_ready_reason(&self) -> Option<String> {
        // A feed in standby runs on another node: this one cannot make it live.
        let down = |f: &&FeedStatus| {
            f.required && !matches!(f.state, LinkState::Live | LinkState::Standby)
        };
        self.feeds.lock().iter().find(down).map(|f| {
            format!(
                "feed {:?} is {}{}",
                f.name,
                f.state.as_str(),
                f.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
            )
        })
    }

    /// `ferrocast_feed_state{feed,state}` gauges, one per feed and state.
    pub fn render_metrics(&self) -> String {
        let mut out = String::new();
        family(&mut out, "ferrocast_feed_state", "gauge", "1 for the state each feed is in.");
        for f in self.feeds.lock().iter() {
            for s in LinkState::ALL {
                let _ = writeln!(
                    out,
                    "ferrocast_feed_state{{feed=\"{}\",kind=\"{}\",state=\"{}\"}} {}",
                    f.name,
                    f.kind,
                    s.as_str(),
                    u8::from(f.state == s)
                );
            }
        }
        render_connector_metrics(&mut out, &self.stats.lock());
        out
    }
}

/// The `ferrocast_feed_*` families of upstream connectors.
fn render_connector_metrics(out: &mut String, feeds: &[Arc<FeedStats>]) {
    if feeds.is_empty() {
        return;
    }
    type Counter = fn(&FeedStats) -> u64;
    let counters: [(&str, &str, &str, Counter); 10] = [
        ("ferrocast_feed_connects_total", "counter", "Upstream connection attempts.", |f| {
            FeedStats::get(&f.connects)
        }),
        (
            "ferrocast_feed_reconnects_total",
            "counter",
            "Upstream connection attempts after a lost or failed connection.",
            |f| FeedStats::get(&f.reconnects),
        ),
        (
            "ferrocast_feed_frames_in_total",
            "counter",
            "WebSocket text frames received from upstream.",
            |f| FeedStats::get(&f.frames_in),
        ),
        (
            "ferrocast_feed_messages_in_total",
            "counter",
            "Upstream events received (each element of a batch counts).",
            |f| FeedStats::get(&f.messages_in),
        ),
        (
            "ferrocast_feed_published_total",
            "counter",
            "Messages published into the hub from upstream.",
            |f| FeedStats::get(&f.published),
        ),
        (
            "ferrocast_feed_parse_errors_total",
            "counter",
            "Upstream frames or events that could not be parsed (skipped).",
            |f| FeedStats::get(&f.parse_errors),
        ),
        (
            "ferrocast_feed_unknown_events_total",
            "counter",
            "Upstream events of an unhandled type or matching no route.",
            |f| FeedStats::get(&f.unknown_events),
        ),
        (
            "ferrocast_feed_upstream_errors_total",
            "counter",
            "Error messages sent by the upstream.",
            |f| FeedStats::get(&f.upstream_errors),
        ),
        (
            "ferrocast_feed_subscribe_refused_total",
            "counter",
            "Client subscriptions refused because the upstream would not carry them.",
            |f| FeedStats::get(&f.subscribe_refused),
        ),
        (
            "ferrocast_feed_upstream_subscriptions",
            "gauge",
            "Subscriptions currently held upstream.",
            |f| FeedStats::get(&f.upstream_subscriptions),
        ),
    ];
    for (name, kind, help, value) in counters {
        family(out, name, kind, help);
        for f in feeds {
            let _ = writeln!(out, "{name}{{feed=\"{}\"}} {}", f.name, value(f));
        }
    }
    family(
        out,
        "ferrocast_feed_disconnects_total",
        "counter",
        "Lost upstream connections by cause (read_timeout, closed, slow_consumer, max_connections, ...).",
    );
    for f in feeds {
        for (reason, n) in f.disconnects() {
            let _ = writeln!(
                out,
                "ferrocast_feed_disconnects_total{{feed=\"{}\",reason=\"{reason}\"}} {n}",
                f.name
            );
        }
    }
    let name = "ferrocast_feed_latency_seconds";
    family(
        out,
        name,
        "histogram",
        "Upstream event timestamp to publish into the hub, for events that carry a timestamp.",
    );
    for f in feeds {
        let (buckets, count, sum_ms) = f.latency.snapshot();
        for (bound_ms, cumulative) in buckets {
            let _ = writeln!(
                out,
                "{name}_bucket{{feed=\"{}\",le=\"{}\"}} {cumulative}",
                f.name,
                bound_ms as f64 / 1e3
            );
        }
        let _ = writeln!(out, "{name}_bucket{{feed=\"{}\",le=\"+Inf\"}} {count}", f.name);
        let _ = writeln!(out, "{name}_sum{{feed=\"{}\"}} {}", f.name, sum_ms as f64 / 1e3);
        let _ = writeln!(out, "{name}_count{{feed=\"{}\"}} {count}", f.name);
    }
}
