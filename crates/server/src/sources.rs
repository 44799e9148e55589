//! Built-in sources wired to the hub: the market simulator, candles built from every
//! trade published on `ticks.*`, whatever its origin, and candle backfill (historical bars
//! published into a candle channel that has no history yet).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ferrocast_feeds::candles::{CandleBuilder, CandleConfig, CandleUpdate};
use ferrocast_feeds::feed::UpstreamBars;
use ferrocast_feeds::market::{self, Candle, Interval, Trade};
use ferrocast_feeds::simulator::{self, SimulatorConfig};
use ferrocast_hub::{Broker, Lease, Pending, PublishKind};
use futures_util::FutureExt;
use std::fmt::Write;

use parking_lot::Mutex;

use crate::AppState;
use crate::metrics::{PublishSource, family};
use ferrocast_feeds::feed::LinkState;

/// Publishes through the broker on behalf of a source, without waiting for the answer (the
/// broker keeps the order; a Redis outage is counted in the broker's metrics).
#[derive(Debug)]
pub struct HubSink(pub Arc<AppState>);

impl ferrocast_feeds::Sink for HubSink {
    fn publish(&self, channel: &str, data: Bytes, kind: PublishKind) {
        let started = Instant::now();
        match self.0.broker.publish(channel, &data, kind) {
            Pending::Ready(Err(e)) => tracing::warn!(channel, "source publish refused: {e}"),
            Pending::Ready(Ok(_)) => {
                self.0.metrics.publish_acked(PublishSource::Feed, started.elapsed());
            }
            Pending::Later(_) => {}
        }
    }
}

/// Starts the simulator when enabled. It stops when the server drains.
///
/// It runs while this node holds the ingest lease (always, with the memory broker): with the
/// Redis broker every node may enable it, one node runs it and the others stand by, taking
/// over when that node goes away, so the cluster carries one stream.
pub fn start_simulator(app: &Arc<AppState>, ingest: &Lease) {
    let cfg = &app.config.simulator;
    if !cfg.enabled {
        return;
    }
    let mut sim = SimulatorConfig { rate: cfg.rate, ..SimulatorConfig::default() };
    if !cfg.symbols.is_empty() {
        sim.symbols = cfg.symbols.clone();
    }
    let mut lease = ingest.clone();
    let mut backfilled = false;
    if lease.is_held() {
        app.feeds.set("sim", "simulator", false, LinkState::Live, None);
        // The memory broker answers at once, so the past is published before the accept
        // loop starts and the first dashboard already sees it.
        backfilled = backfill_simulator(app, &sim).now_or_never().is_some();
    } else {
        app.feeds.set("sim", "simulator", false, LinkState::Standby, Some(STANDBY.into()));
    }
    let sink: Arc<HubSink> = Arc::new(HubSink(app.clone()));
    let shutdown = app.shutdown.clone();
    let app = app.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = lease.acquired() => {}
                _ = shutdown.draining() => break,
            }
            app.feeds.set("sim", "simulator", false, LinkState::Live, None);
            if !backfilled {
                backfill_simulator(&app, &sim).await;
                backfilled = true;
            }
            tracing::info!(
                symbols = sim.symbols.len(),
                rate = sim.rate,
                "demo market simulator publishing on ticks.* and quotes.*"
            );
            let mut watch = lease.clone();
            let stop = async {
                tokio::select! {
                    _ = shutdown.draining() => {}
                    _ = watch.lost() => {}
                }
            };
            simulator::run(sim.clone(), sink.clone(), stop).await;
            if shutdown.is_draining() {
                break;
            }
            tracing::info!("ingest lease lost: another node runs the simulator now");
            app.feeds.set("sim", "simulator", false, LinkState::Standby, Some(STANDBY.into()));
        }
        app.feeds.set("sim", "simulator", false, LinkState::Stopped, None);
    });
}

/// The reason shown for a source another node runs.
pub const STANDBY: &str = "another node holds the ingest lease and runs it";

/// Publishes the simulator's made-up past into its candle channels that have no history
/// yet (in the broker: another node may have published it already).
async fn backfill_simulator(app: &AppState, sim: &SimulatorConfig) {
    let bars_per_channel = app.config.simulator.backfill_bars;
    if bars_per_channel == 0 {
        return;
    }
    let now = now_ms();
    let per_symbol = sim.rate / sim.symbols.len().max(1) as f64;
    let mut published = 0;
    for sym in &sim.symbols {
        for interval in Interval::ALL {
            let channel = market::channel_for_candle(sym, interval);
            let bars = simulator::backfill(sym, interval, bars_per_channel, now, per_symbol);
            published +=
                publish_backfill(&*app.broker, &channel, &bars, &app.candles.backfill).await;
        }
    }
    tracing::info!(bars = published, "demo candles backfilled with a made-up past");
}

/// Counters of candle backfill, for `/metrics`.
#[derive(Debug, Default)]
pub struct BackfillStats {
    /// Bars published into candle channels.
    pub bars: AtomicU64,
    /// Backfill requests that failed (upstream error, timeout, bad answer).
    pub errors: AtomicU64,
    /// Backfills not published because the channel had history by the time they arrived.
    pub skipped: AtomicU64,
}

/// Publishes `bars` (oldest first) on `channel` as retained candles, unless the channel
/// already has history (in the broker, so a cluster backfills each channel once): backfill
/// must come before live bars, and history is in publish order. Returns how many were
/// published.
///
/// The check and the publishes are not one atomic step: a live bar landing in between (the
/// backfill of a feed's channel arrives within milliseconds of its first subscriber, a live
/// bar at a window's end) would come before the past. The window is small, and a client
/// that orders bars by `start`, as the dashboard does, still draws the right chart.
pub async fn publish_backfill(
    broker: &dyn Broker,
    channel: &str,
    bars: &[Candle],
    stats: &BackfillStats,
) -> usize {
    if bars.is_empty() {
        return 0;
    }
    let has_history = match broker.history(channel, 0, 1).wait().await {
        Ok(page) => page.is_some_and(|page| !page.messages.is_empty()),
        Err(e) => {
            stats.errors.fetch_add(1, Relaxed);
            tracing::warn!(channel, "backfill skipped: cannot read the channel's history: {e}");
            return 0;
        }
    };
    if has_history {
        stats.skipped.fetch_add(1, Relaxed);
        tracing::debug!(channel, "backfill skipped: the channel already has history");
        return 0;
    }
    let mut published = 0;
    for bar in bars {
        match broker.publish(channel, &market::encode(bar), PublishKind::Retained) {
            Pending::Ready(Ok(_)) | Pending::Later(_) => published += 1,
            Pending::Ready(Err(e)) => {
                tracing::warn!(channel, "backfill publish failed: {e}");
                break;
            }
        }
    }
    stats.bars.fetch_add(published as u64, Relaxed);
    published
}

/// The server's candle builder, shared by the trade tap and the clock task, and the
/// backfill counters.
#[derive(Debug)]
pub struct Candles {
    builder: Arc<Mutex<CandleBuilder>>,
    /// Backfill counters, shared with the feed router.
    pub backfill: Arc<BackfillStats>,
}

impl Default for Candles {
    fn default() -> Self {
        Candles {
            builder: Arc::new(Mutex::new(CandleBuilder::new(CandleConfig::default()))),
            backfill: Arc::default(),
        }
    }
}

impl Candles {
    /// Late-trade counters for `/metrics`.
    pub fn render_metrics(&self) -> String {
        let (late, dropped) = {
            let b = self.builder.lock();
            (b.late_ticks(), b.dropped_ticks())
        };
        let mut out = String::new();
        family(
            &mut out,
            "ferrocast_candle_late_trades_total",
            "counter",
            "Trades for a candle window that had already closed (corrected or dropped).",
        );
        let _ = writeln!(out, "ferrocast_candle_late_trades_total {late}");
        family(
            &mut out,
            "ferrocast_candle_dropped_trades_total",
            "counter",
            "Trades left out of a candle: invalid, too late to correct, or late under the drop policy.",
        );
        let _ = writeln!(out, "ferrocast_candle_dropped_trades_total {dropped}");
        let b = &self.backfill;
        for (name, help, value) in [
            (
                "ferrocast_candle_backfill_bars_total",
                "Historical bars published into candle channels that had no history (backfill).",
                b.bars.load(Relaxed),
            ),
            (
                "ferrocast_candle_backfill_errors_total",
                "Candle backfill requests that failed (upstream error, timeout, unreadable answer).",
                b.errors.load(Relaxed),
            ),
            (
                "ferrocast_candle_backfill_skipped_total",
                "Candle backfills left out because the channel had live history by the time they arrived.",
                b.skipped.load(Relaxed),
            ),
        ] {
            family(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {value}");
        }
        out
    }
}

/// Builds `candles.SYM.1s` and `candles.SYM.1m` from every trade on `ticks.*`: forming bars
/// as ephemeral updates, closed bars as retained messages.
///
/// Once per cluster: the node holding the ingest lease follows every node's trades (its
/// broker feeds the hub's taps with them) and publishes the bars; when it loses the lease it
/// stops following and forgets its forming bars. With the memory broker the lease is always
/// held and the taps see every local publish.
///
/// Upstream bars take precedence: for a symbol and interval marked in the feed board's
/// [`ferrocast_feeds::feed::UpstreamBars`] (an upstream feed delivers those bars, e.g.
/// Massive `AM`), the built bars are dropped, so the channel carries one consistent series.
/// The feeds run under the same lease, so the marks are this node's.
pub fn start_candles(app: &Arc<AppState>, ingest: &Lease) {
    let builder = app.candles.builder.clone();
    let broker = app.broker.clone();
    let bars = app.feeds.upstream_bars.clone();
    let tap_bars = bars.clone();
    let tap_builder = builder.clone();
    let tap_broker = broker.clone();
    app.hub.add_tap(
        market::TRADES_NAMESPACE,
        Arc::new(move |_channel, data| {
            // Trades that do not follow the schema (other apps' ticks.*) simply get no candles.
            let Ok(trade) = serde_json::from_slice::<Trade>(data) else { return };
            let updates =
                tap_builder.lock().on_trade(&trade.sym, trade.price, trade.size, trade.ts);
            publish_candles(&tap_broker, &tap_bars, updates);
        }),
    );
    let shutdown = app.shutdown.clone();
    let mut lease = ingest.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = lease.acquired() => {}
                _ = shutdown.draining() => return,
            }
            broker.follow_taps(true);
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut watch = lease.clone();
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let updates = builder.lock().on_clock(now_ms());
                        publish_candles(&broker, &bars, updates);
                    }
                    _ = watch.lost() => break,
                    _ = shutdown.draining() => return,
                }
            }
            broker.follow_taps(false);
            builder.lock().forget();
            tracing::info!("ingest lease lost: another node builds the candles now");
        }
    });
}

fn publish_candles(broker: &Arc<dyn Broker>, upstream: &UpstreamBars, updates: Vec<CandleUpdate>) {
    for u in updates {
        if upstream.covers(&u.candle.sym, u.candle.interval) {
            continue;
        }
        let _ = broker.publish(&u.channel, &market::encode(&u.candle), u.kind);
    }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
