//! Test harness shared by the connector tests: a capturing sink, a fake hub demand (the
//! probe), feed construction against a local simulator, and polling helpers.

#![allow(dead_code)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferrocast_feeds::config::FeedConfig;
use ferrocast_feeds::feed::{Feed, FeedContext, FeedStats, LinkState, UpstreamBars};
use ferrocast_feeds::{PublishKind, Sink};
use parking_lot::Mutex;
use tokio::sync::watch;

/// Everything a connector published.
#[derive(Default)]
pub struct Capture(pub Mutex<Vec<(String, Bytes, PublishKind)>>);

impl Sink for Capture {
    fn publish(&self, channel: &str, data: Bytes, kind: PublishKind) {
        self.0.lock().push((channel.to_owned(), data, kind));
    }
}

impl Capture {
    /// JSON of every message published on `channel`.
    pub fn on(&self, channel: &str) -> Vec<serde_json::Value> {
        self.0
            .lock()
            .iter()
            .filter(|(c, _, _)| c == channel)
            .map(|(_, d, _)| serde_json::from_slice(d).expect("published JSON"))
            .collect()
    }

    pub fn channels(&self) -> HashSet<String> {
        self.0.lock().iter().map(|(c, _, _)| c.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.0.lock().len()
    }

    pub fn clear(&self) {
        self.0.lock().clear();
    }
}

/// Stands in for the hub: which channels have subscribers.
#[derive(Default)]
pub struct Watched(pub Mutex<HashSet<String>>);

/// A connector under test.
pub struct Harness {
    pub capture: Arc<Capture>,
    pub watched: Arc<Watched>,
    pub bars: Arc<UpstreamBars>,
    pub stats: Arc<FeedStats>,
    stop: watch::Sender<bool>,
}

impl Harness {
    pub fn new(name: &str, kind: &str) -> (Harness, FeedContext) {
        let capture = Arc::new(Capture::default());
        let watched = Arc::new(Watched::default());
        let bars = Arc::new(UpstreamBars::default());
        let stats = Arc::new(FeedStats::new(name, kind));
        let probe_watched = watched.clone();
        let ctx = FeedContext {
            sink: capture.clone(),
            probe: Arc::new(move |c: &str| probe_watched.0.lock().contains(c)),
            bars: bars.clone(),
            stats: stats.clone(),
        };
        let (stop, _) = watch::channel(false);
        (Harness { capture, watched, bars, stats, stop }, ctx)
    }

    /// A future that completes when [`Harness::stop`] is called.
    pub fn shutdown(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.stop.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// A client subscribes to `channel` (first subscriber) or leaves it (last one).
    pub fn watch(&self, feed: &dyn Feed, channel: &str, on: bool) {
        if on {
            self.watched.0.lock().insert(channel.to_owned());
        } else {
            self.watched.0.lock().remove(channel);
        }
        feed.demand(channel, on);
    }

    pub fn state(&self) -> (LinkState, Option<String>) {
        self.stats.state()
    }

    pub async fn wait_state(&self, want: LinkState, within: Duration) -> Option<String> {
        let stats = self.stats.clone();
        wait_for(&format!("state {want}"), within, || {
            let (s, _) = stats.state();
            s == want
        })
        .await;
        self.stats.state().1
    }
}

/// Polls `cond` every 20 ms until it holds, panicking after `within`.
pub async fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Test-friendly timings on top of `base`.
pub fn fast(mut base: FeedConfig) -> FeedConfig {
    base.connect_timeout_ms = 2_000;
    base.ping_interval_ms = 200;
    base.read_timeout_ms = 1_000;
    base.backoff_initial_ms = 50;
    base.backoff_max_ms = 200;
    base.linger_ms = 200;
    base
}

pub fn counter(stats: &FeedStats, c: &std::sync::atomic::AtomicU64) -> u64 {
    let _ = stats;
    FeedStats::get(c)
}

pub const SECS: fn(u64) -> Duration = Duration::from_secs;
