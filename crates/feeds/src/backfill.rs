//! Candle backfill: historical bars that give `candles.SYM.1s` / `candles.SYM.1m` a past, so
//! a chart opened right after a start (or on a symbol nobody watched yet) is not empty.
//!
//! A source that can provide history implements [`Backfill`]: the Massive connector asks
//! Massive's REST aggregates endpoint ([`crate::massive::rest`]); the demo simulator makes a
//! plausible past with [`random_walk`]. The server publishes the bars as retained messages
//! on the candle channel, oldest first, only while the channel has no history of its own, so
//! they always come before live bars.
//!
//! Every bar is closed (`forming: false`) and window-aligned, and the newest ends at or
//! before the start of the window containing `now`, the one live bars are forming.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use rand::Rng;

use crate::market::{Candle, Interval};

/// Bars per channel a source backfills unless configured otherwise (the `candles`
/// namespace keeps 500 and snapshots the last 300).
pub const DEFAULT_BACKFILL_BARS: usize = 300;

/// Most bars one backfill may ask for.
pub const MAX_BACKFILL_BARS: usize = 50_000;

/// The future a [`Backfill`] returns.
pub type BarsFuture = Pin<Box<dyn Future<Output = Result<Vec<Candle>, String>> + Send>>;

/// A source of historical bars.
pub trait Backfill: Send + Sync + fmt::Debug {
    /// Up to `count` closed `interval` bars of `sym` before the window containing `now_ms`,
    /// oldest first. An error is a sentence for the log (the server counts it).
    fn bars(&self, sym: &str, interval: Interval, count: usize, now_ms: i64) -> BarsFuture;
}

/// Keeps the closed bars of `interval` that end by the start of `now_ms`'s window, sorted by
/// start, one per window (the later one wins), at most the newest `count`.
pub fn closed_bars(
    mut bars: Vec<Candle>,
    interval: Interval,
    count: usize,
    now_ms: i64,
) -> Vec<Candle> {
    let current = interval.window_start(now_ms);
    bars.retain(|b| {
        b.interval == interval && b.start == interval.window_start(b.start) && b.end <= current
    });
    bars.sort_by_key(|b| b.start);
    bars.reverse();
    bars.dedup_by_key(|b| b.start);
    bars.truncate(count);
    bars.reverse();
    bars
}

/// What [`random_walk`] makes.
#[derive(Clone, Debug)]
pub struct Walk<'a> {
    /// Symbol of the bars.
    pub sym: &'a str,
    /// Their interval.
    pub interval: Interval,
    /// How many.
    pub count: usize,
    /// The bars end at the start of this time's window.
    pub now_ms: i64,
    /// Close of the newest bar: the live price.
    pub last_close: f64,
    /// Standard deviation of the log-return per bar.
    pub volatility: f64,
    /// `src` of the bars.
    pub src: &'a str,
}

/// `count` plausible closed bars ending just before `now_ms`'s window, the last one closing
/// at `last_close`: a geometric random walk run backwards from `last_close`, so the past
/// joins the live price without a jump. Prices are whole cents; every window has a bar.
pub fn random_walk(walk: &Walk<'_>, rng: &mut impl Rng) -> Vec<Candle> {
    let Walk { sym, interval, count, now_ms, last_close, volatility, src } = *walk;
    let cents = |p: f64| ((p * 100.0).round() / 100.0).max(0.01);
    let current = interval.window_start(now_ms);
    let step = interval.millis();
    // Closes from the newest bar back: close[k] is the close of the k-th bar before now.
    let mut closes = Vec::with_capacity(count + 1);
    let mut log_price = last_close.max(0.01).ln();
    for _ in 0..=count {
        closes.push(log_price.exp());
        log_price -= volatility * standard_normal(rng);
    }
    let mut bars = Vec::with_capacity(count);
    for k in (0..count).rev() {
        let start = current - step * (k as i64 + 1);
        let (open, close) = (cents(closes[k + 1]), cents(closes[k]));
        let high = cents(open.max(close) * wick(rng, volatility)).max(open.max(close));
        let low = cents(open.min(close) / wick(rng, volatility)).min(open.min(close));
        let trades: u64 = rng.random_range(1..=40);
        let volume = 100.0 * rng.random_range(1..=30) as f64 * trades as f64;
        let vwap = ((low + (high - low) * rng.random_range(0.25..0.75)) * 1e4).round() / 1e4;
        bars.push(Candle {
            sym: sym.to_owned(),
            interval,
            start,
            end: start + step,
            open,
            high,
            low,
            close,
            volume,
            vwap,
            trades,
            forming: false,
            src: src.to_owned(),
            correction: false,
        });
    }
    bars
}

/// Per-bar volatility that matches a per-event one when a bar holds `events_per_bar` events.
pub fn bar_volatility(per_event: f64, events_per_bar: f64) -> f64 {
    per_event * events_per_bar.max(1.0).sqrt()
}

/// How far a bar's high (low) reaches beyond its open and close, as a factor.
fn wick(rng: &mut impl Rng, volatility: f64) -> f64 {
    1.0 + volatility * 0.5 * rng.random::<f64>() * standard_normal(rng).abs()
}

/// A standard normal sample (Box-Muller).
fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const NOW: i64 = 1_760_000_123_456;

    fn walk(
        sym: &'static str,
        interval: Interval,
        count: usize,
        last_close: f64,
        volatility: f64,
        rng: &mut StdRng,
    ) -> Vec<Candle> {
        let spec = Walk { sym, interval, count, now_ms: NOW, last_close, volatility, src: "sim" };
        random_walk(&spec, rng)
    }

    #[test]
    fn random_walk_bars_are_closed_aligned_and_join_the_live_price() {
        let mut rng = StdRng::seed_from_u64(7);
        for interval in Interval::ALL {
            let bars = walk("AAPL", interval, 300, 230.0, 0.002, &mut rng);
            assert_eq!(bars.len(), 300);
            let step = interval.millis();
            let current = interval.window_start(NOW);
            assert_eq!(bars.last().unwrap().end, current, "the newest ends where live bars begin");
            assert_eq!(bars.last().unwrap().close, 230.0);
            for pair in bars.windows(2) {
                assert_eq!(pair[1].start, pair[0].start + step, "consecutive windows");
                assert_eq!(pair[1].open, pair[0].close, "each bar opens at the last close");
            }
            for b in &bars {
                assert_eq!(b.start % step, 0);
                assert_eq!(b.end - b.start, step);
                assert!(!b.forming && b.src == "sim" && b.sym == "AAPL");
                assert!(b.low <= b.open.min(b.close) && b.high >= b.open.max(b.close), "{b:?}");
                assert!(b.low <= b.vwap && b.vwap <= b.high, "{b:?}");
                assert!(b.volume > 0.0 && b.trades > 0);
                assert_eq!((b.close * 100.0).round() / 100.0, b.close, "whole cents");
            }
            // Plausible: 300 bars at 0.2 % per bar stay within a few tens of percent.
            let first = bars[0].open;
            assert!((150.0..350.0).contains(&first), "{first}");
        }
    }

    #[test]
    fn zero_bars_is_empty() {
        let mut rng = StdRng::seed_from_u64(1);
        assert!(walk("X", Interval::OneMinute, 0, 10.0, 0.01, &mut rng).is_empty());
    }

    #[test]
    fn closed_bars_drops_forming_misaligned_and_duplicates() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut bars = walk("A", Interval::OneMinute, 10, 50.0, 0.01, &mut rng);
        let newest = bars.last().unwrap().clone();
        let mut forming = newest.clone();
        forming.start = newest.end;
        forming.end = newest.end + 60_000;
        let mut misaligned = newest.clone();
        misaligned.start += 1;
        let mut duplicate = bars[3].clone();
        duplicate.close = 1.0;
        bars.extend([forming, misaligned, duplicate]);
        bars.reverse();
        let kept = closed_bars(bars, Interval::OneMinute, 5, NOW);
        assert_eq!(kept.len(), 5);
        assert_eq!(kept.last().unwrap().start, newest.start);
        assert!(kept.windows(2).all(|w| w[0].start < w[1].start));
        assert!(closed_bars(kept, Interval::OneSecond, 5, NOW).is_empty(), "other interval");
    }
}
