//! OHLCV candles built from trades: a pure state machine, fed trades and a clock, no I/O.
//!
//! The server routes every trade to [`CandleBuilder::on_trade`], calls
//! [`CandleBuilder::on_clock`] a few times a second with the wall-clock time, and publishes
//! the [`CandleUpdate`]s both return on `candles.SYM.1s` / `candles.SYM.1m`. Keeping time and
//! publishing outside makes the rules below testable with hand-written timestamps.
//!
//! # Rules
//!
//! - Windows are `[start, end)` in UTC Unix milliseconds, aligned to wall-clock boundaries
//!   (every second, every minute), per symbol and per configured [`Interval`].
//! - A trade updates the forming bar of its window in every interval and yields a forming
//!   update (`forming: true`, [`PublishKind::Ephemeral`]: the hub may conflate these).
//! - A window closes when a trade of the same symbol arrives for a later window, or when the
//!   clock reaches the window's end plus [`CandleConfig::grace_ms`], which gives trades
//!   delayed in transit a chance to land in their own bar. Closing yields exactly one final
//!   bar (`forming: false`, [`PublishKind::Retained`]).
//! - No bar is ever emitted for a window without trades: a gap in trading is a gap in bars,
//!   as in Massive's own aggregates.
//! - `open` and `close` are the prices of the earliest and latest trade by timestamp (the
//!   later arrival wins a tie), so trades arriving out of order within a window do not skew
//!   them. `vwap` is Σ(price·size) / Σsize, or the close when every size was zero.
//!
//! # Late trades
//!
//! A trade is late when its window is already closed. Late trades are counted in
//! [`CandleBuilder::late_ticks`] and handled by [`LatePolicy`]:
//!
//! - [`LatePolicy::Correct`] (the default): the closed bar is updated and published again as a
//!   retained bar with `correction: true`; clients replace the bar with the same `start`. A
//!   late trade for a window that had no trades yields that window's bar, also marked
//!   `correction: true` since it arrives after later bars.
//! - [`LatePolicy::Drop`]: the trade is ignored by the intervals for which it is late.
//!
//! Only the last [`CORRECTABLE_WINDOWS`] windows before a symbol's newest bar can be
//! corrected; a trade older than that, or whose window ended more than that many windows (plus
//! the grace period) before the clock, is too late and dropped, whatever the policy. Dropped
//! trades are counted in [`CandleBuilder::dropped_ticks`].
//!
//! # Memory
//!
//! State is kept per symbol and interval: the forming bar and at most
//! `CORRECTABLE_WINDOWS + 1` closed bars. A symbol whose bars are all closed and beyond
//! correction is forgotten at the next [`CandleBuilder::on_clock`], so a feed that once
//! traded thousands of option contracts does not keep them all forever.
//!
//! The builder trusts trade timestamps that run ahead of its clock: a trade stamped far in
//! the future opens a bar there, and the symbol's trades behind it become too late. Sources
//! should stamp trades with the exchange time they received, as Massive does.

use std::collections::{HashMap, VecDeque};

use crate::PublishKind;
use crate::market::{Candle, Interval, SRC_SERVER, channel_for_candle};

/// How many closed windows behind a symbol's newest bar can still be corrected by a late trade.
pub const CORRECTABLE_WINDOWS: i64 = 5;

/// Default [`CandleConfig::grace_ms`]: long enough for the transit delay of a healthy feed,
/// short enough that a quiet symbol's one-second bar is final within about a second and a half.
pub const DEFAULT_GRACE_MS: i64 = 500;

/// 9999-12-31T23:59:59.999Z. Later timestamps are certainly corrupt, and bounding them keeps
/// window arithmetic far from overflow.
const MAX_TS_MS: i64 = 253_402_300_799_999;

/// What to do with a trade whose window is already closed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LatePolicy {
    /// Update the closed bar and publish it again with `correction: true`.
    #[default]
    Correct,
    /// Ignore the trade.
    Drop,
}

/// Settings of a [`CandleBuilder`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CandleConfig {
    /// Intervals to build bars for; duplicates are ignored.
    pub intervals: Vec<Interval>,
    /// Treatment of trades for closed windows.
    pub late_ticks: LatePolicy,
    /// How long after a window's end the clock waits before closing it, in ms; negative
    /// values count as zero.
    pub grace_ms: i64,
}

impl Default for CandleConfig {
    /// One-second and one-minute bars, late trades corrected, [`DEFAULT_GRACE_MS`].
    fn default() -> Self {
        CandleConfig {
            intervals: Interval::ALL.to_vec(),
            late_ticks: LatePolicy::default(),
            grace_ms: DEFAULT_GRACE_MS,
        }
    }
}

/// A candle to publish: `candle` serialized as JSON on `channel`, kept in history or not
/// according to `kind`.
#[derive(Clone, Debug, PartialEq)]
pub struct CandleUpdate {
    /// `candles.SYM.1s` or `candles.SYM.1m`.
    pub channel: String,
    /// The bar as it stands.
    pub candle: Candle,
    /// [`PublishKind::Ephemeral`] for a forming bar, [`PublishKind::Retained`] for a final or
    /// corrected one.
    pub kind: PublishKind,
}

/// Builds candles for every symbol it sees. See the module documentation for the rules.
#[derive(Debug)]
pub struct CandleBuilder {
    intervals: Vec<Interval>,
    late_policy: LatePolicy,
    grace_ms: i64,
    /// One series per configured interval, in `intervals` order.
    symbols: HashMap<String, Vec<Series>>,
    /// Latest time given to `on_clock`; it never goes back, so a clock stepped backwards
    /// cannot reopen closed windows.
    clock: i64,
    /// No forming bar is due to close and no symbol is due to be forgotten before this time,
    /// so `on_clock` can skip scanning every symbol until then. May be early, never late.
    next_deadline: i64,
    late_ticks: u64,
    dropped_ticks: u64,
}

impl CandleBuilder {
    /// A builder with no symbols yet.
    pub fn new(config: CandleConfig) -> Self {
        let mut intervals = Vec::with_capacity(config.intervals.len());
        for interval in config.intervals {
            if !intervals.contains(&interval) {
                intervals.push(interval);
            }
        }
        CandleBuilder {
            intervals,
            late_policy: config.late_ticks,
            grace_ms: config.grace_ms.max(0),
            symbols: HashMap::new(),
            clock: i64::MIN,
            next_deadline: i64::MAX,
            late_ticks: 0,
            dropped_ticks: 0,
        }
    }

    /// Forgets every forming bar (the counters stay): the node stops building candles, and
    /// whoever builds them next starts from its own first trade.
    pub fn forget(&mut self) {
        self.symbols.clear();
        self.next_deadline = i64::MAX;
    }

    /// Adds one trade and returns the updates it causes, in interval order: for each interval,
    /// the final bar of a window it closes, then the forming (or corrected) bar it updated.
    ///
    /// A trade with a non-finite price, a negative or non-finite size, or a timestamp outside
    /// years 1970 to 9999 is dropped.
    pub fn on_trade(&mut self, sym: &str, price: f64, size: f64, ts_ms: i64) -> Vec<CandleUpdate> {
        let mut updates = Vec::new();
        if !price.is_finite()
            || !size.is_finite()
            || size < 0.0
            || !(0..=MAX_TS_MS).contains(&ts_ms)
        {
            self.dropped_ticks += 1;
            return updates;
        }
        let tick = Tick { price, size, ts: ts_ms };
        let rules =
            Rules { late_policy: self.late_policy, grace_ms: self.grace_ms, clock: self.clock };

        let series = match self.symbols.get_mut(sym) {
            Some(series) => series,
            // Allocate the key only for a symbol seen for the first time.
            None => self.symbols.entry(sym.to_owned()).or_insert_with(|| {
                self.intervals.iter().map(|&interval| Series::new(sym, interval)).collect()
            }),
        };
        let (mut late, mut dropped) = (false, false);
        for s in series.iter_mut() {
            match s.on_trade(sym, tick, rules, &mut updates) {
                Fate::OnTime => {
                    let deadline = s.window_end(ts_ms).saturating_add(rules.grace_ms);
                    self.next_deadline = self.next_deadline.min(deadline);
                }
                Fate::Corrected => late = true,
                Fate::TooLate => (late, dropped) = (true, true),
            }
        }
        // A new symbol whose first trade was too late everywhere must not linger.
        let nothing_kept = series.iter().all(Series::is_empty);
        if nothing_kept {
            self.symbols.remove(sym);
        }

        self.late_ticks += u64::from(late);
        self.dropped_ticks += u64::from(dropped);
        updates
    }

    /// Advances the clock to `now_ms` (Unix ms) and returns the final bars of the windows
    /// whose end plus the grace period it reached. Also forgets symbols whose bars are all
    /// closed and beyond correction.
    pub fn on_clock(&mut self, now_ms: i64) -> Vec<CandleUpdate> {
        self.clock = self.clock.max(now_ms);
        let now = self.clock;
        let mut updates = Vec::new();
        if now < self.next_deadline {
            return updates;
        }

        let grace_ms = self.grace_ms;
        let mut next_deadline = i64::MAX;
        self.symbols.retain(|sym, series| {
            let mut close_at = i64::MAX;
            let mut forget_at = i64::MIN;
            for s in series.iter_mut() {
                if s.forming.as_ref().is_some_and(|bar| now >= bar.end.saturating_add(grace_ms)) {
                    s.close_forming(sym, &mut updates);
                }
                match (&s.forming, s.newest_end()) {
                    (Some(bar), _) => close_at = close_at.min(bar.end.saturating_add(grace_ms)),
                    (None, Some(end)) => forget_at = forget_at.max(s.forget_after(end, grace_ms)),
                    (None, None) => {}
                }
            }
            let deadline = if close_at < i64::MAX {
                close_at
            } else if forget_at <= now {
                return false;
            } else {
                forget_at
            };
            next_deadline = next_deadline.min(deadline);
            true
        });
        self.next_deadline = next_deadline;
        updates
    }

    /// Trades received for windows already closed (corrected or dropped), since creation.
    pub fn late_ticks(&self) -> u64 {
        self.late_ticks
    }

    /// Trades that were left out of at least one interval's bars: invalid, too late, or late
    /// under [`LatePolicy::Drop`]. Since creation.
    pub fn dropped_ticks(&self) -> u64 {
        self.dropped_ticks
    }

    /// Symbols currently holding state: a measure of the builder's memory.
    pub fn tracked_symbols(&self) -> usize {
        self.symbols.len()
    }
}

/// The fields of a trade a candle needs.
#[derive(Clone, Copy, Debug)]
struct Tick {
    price: f64,
    size: f64,
    ts: i64,
}

/// The builder-wide settings a series applies to one trade.
#[derive(Clone, Copy, Debug)]
struct Rules {
    late_policy: LatePolicy,
    grace_ms: i64,
    clock: i64,
}

/// What became of a trade in one series.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// Added to the forming bar of its window.
    OnTime,
    /// Late, and added to a closed bar that was published again.
    Corrected,
    /// Late and not applied.
    TooLate,
}

/// The bars of one symbol in one interval.
#[derive(Debug)]
struct Series {
    interval: Interval,
    /// Built once per symbol so that updates only clone it.
    channel: String,
    forming: Option<Bar>,
    /// Closed bars within the correction horizon, oldest first, at most
    /// `CORRECTABLE_WINDOWS + 1` of them.
    closed: VecDeque<Bar>,
    /// Windows starting before this are closed: a trade for one of them is late.
    open_from: i64,
}

impl Series {
    fn new(sym: &str, interval: Interval) -> Self {
        Series {
            interval,
            channel: channel_for_candle(sym, interval),
            forming: None,
            closed: VecDeque::new(),
            open_from: i64::MIN,
        }
    }

    fn is_empty(&self) -> bool {
        self.forming.is_none() && self.closed.is_empty()
    }

    fn window_end(&self, ts: i64) -> i64 {
        self.interval.window_start(ts) + self.interval.millis()
    }

    /// Start of the newest window with a bar, forming or closed.
    fn newest_start(&self) -> Option<i64> {
        self.forming.as_ref().or(self.closed.back()).map(|bar| bar.start)
    }

    fn newest_end(&self) -> Option<i64> {
        self.forming.as_ref().or(self.closed.back()).map(|bar| bar.end)
    }

    /// Oldest window start still open to correction.
    fn horizon(&self) -> Option<i64> {
        let span = CORRECTABLE_WINDOWS * self.interval.millis();
        self.newest_start().map(|newest| newest - span)
    }

    /// When the clock may forget a series whose newest bar, closed, ended at `newest_end`:
    /// from then on every trade this series could still correct counts as too late anyway.
    fn forget_after(&self, newest_end: i64, grace_ms: i64) -> i64 {
        newest_end
            .saturating_add(CORRECTABLE_WINDOWS * self.interval.millis())
            .saturating_add(grace_ms)
    }

    fn on_trade(
        &mut self,
        sym: &str,
        tick: Tick,
        rules: Rules,
        out: &mut Vec<CandleUpdate>,
    ) -> Fate {
        let start = self.interval.window_start(tick.ts);
        let end = start + self.interval.millis();

        // Once the clock is past this point the series may have been forgotten, so a bar
        // built now could silently replace one already published.
        if self.forget_after(end, rules.grace_ms) <= rules.clock {
            return Fate::TooLate;
        }

        if let Some(bar) = &mut self.forming
            && bar.start == start
        {
            bar.add(tick);
            out.push(candle_update(&self.channel, self.interval, sym, bar, Emit::Forming));
            return Fate::OnTime;
        }

        if start >= self.open_from {
            // A later window: it closes the forming bar (whose start is `open_from`) and
            // every empty window before it.
            self.close_forming(sym, out);
            self.open_from = start;
            let bar = self.forming.insert(Bar::new(start, end, tick));
            out.push(candle_update(&self.channel, self.interval, sym, bar, Emit::Forming));
            self.trim();
            return Fate::OnTime;
        }

        if rules.late_policy == LatePolicy::Drop || self.horizon().is_none_or(|h| start < h) {
            return Fate::TooLate;
        }
        let bar: &Bar = match self.closed.binary_search_by_key(&start, |bar| bar.start) {
            Ok(index) => {
                let bar = &mut self.closed[index];
                bar.add(tick);
                bar
            }
            Err(index) => {
                self.closed.insert(index, Bar::new(start, end, tick));
                &self.closed[index]
            }
        };
        out.push(candle_update(&self.channel, self.interval, sym, bar, Emit::Correction));
        Fate::Corrected
    }

    /// Moves the forming bar, if any, to the closed bars and emits its final version.
    fn close_forming(&mut self, sym: &str, out: &mut Vec<CandleUpdate>) {
        if let Some(bar) = self.forming.take() {
            out.push(candle_update(&self.channel, self.interval, sym, &bar, Emit::Final));
            self.open_from = bar.end;
            self.closed.push_back(bar);
            self.trim();
        }
    }

    /// Drops closed bars that fell behind the correction horizon.
    fn trim(&mut self) {
        if let Some(horizon) = self.horizon() {
            while self.closed.front().is_some_and(|bar| bar.start < horizon) {
                self.closed.pop_front();
            }
        }
    }
}

/// Which version of a bar an update carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Emit {
    /// The window is open; the bar may still change.
    Forming,
    /// The window just closed.
    Final,
    /// A closed bar changed by a late trade.
    Correction,
}

/// The update publishing `bar` of `sym` on `channel`.
fn candle_update(
    channel: &str,
    interval: Interval,
    sym: &str,
    bar: &Bar,
    emit: Emit,
) -> CandleUpdate {
    CandleUpdate {
        channel: channel.to_owned(),
        candle: Candle {
            sym: sym.to_owned(),
            interval,
            start: bar.start,
            end: bar.end,
            open: bar.open,
            high: bar.high,
            low: bar.low,
            close: bar.close,
            volume: bar.volume,
            vwap: if bar.volume > 0.0 { bar.turnover / bar.volume } else { bar.close },
            trades: bar.trades,
            forming: emit == Emit::Forming,
            src: SRC_SERVER.to_owned(),
            correction: emit == Emit::Correction,
        },
        kind: match emit {
            Emit::Forming => PublishKind::Ephemeral,
            Emit::Final | Emit::Correction => PublishKind::Retained,
        },
    }
}

/// Running totals of one window.
#[derive(Clone, Debug)]
struct Bar {
    start: i64,
    end: i64,
    open: f64,
    high: f64,
    low: f64,
    close: f64,
    volume: f64,
    /// Σ(price·size), the VWAP numerator.
    turnover: f64,
    trades: u64,
    /// Timestamps of the trades that set `open` and `close`.
    first_ts: i64,
    last_ts: i64,
}

impl Bar {
    fn new(start: i64, end: i64, tick: Tick) -> Self {
        Bar {
            start,
            end,
            open: tick.price,
            high: tick.price,
            low: tick.price,
            close: tick.price,
            volume: tick.size,
            turnover: tick.price * tick.size,
            trades: 1,
            first_ts: tick.ts,
            last_ts: tick.ts,
        }
    }

    fn add(&mut self, tick: Tick) {
        if tick.ts < self.first_ts {
            self.first_ts = tick.ts;
            self.open = tick.price;
        }
        if tick.ts >= self.last_ts {
            self.last_ts = tick.ts;
            self.close = tick.price;
        }
        self.high = self.high.max(tick.price);
        self.low = self.low.min(tick.price);
        self.volume += tick.size;
        self.turnover += tick.price * tick.size;
        self.trades += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2023-11-14T22:13:20Z: a whole second, not a whole minute.
    const T0: i64 = 1_700_000_000_000;
    const GRACE: i64 = 200;

    fn one_second_bars(late_ticks: LatePolicy) -> CandleBuilder {
        CandleBuilder::new(CandleConfig {
            intervals: vec![Interval::OneSecond],
            late_ticks,
            grace_ms: GRACE,
        })
    }

    /// What a test expects of one update; `ohlc` is `[open, high, low, close]`.
    struct Expect {
        start: i64,
        ohlc: [f64; 4],
        volume: f64,
        vwap: f64,
        trades: u64,
    }

    impl Expect {
        fn check(&self, update: &CandleUpdate, emit: Emit) {
            let c = &update.candle;
            let interval = c.interval;
            assert_eq!(update.channel, channel_for_candle("AAPL", interval));
            assert_eq!(c.sym, "AAPL");
            assert_eq!((c.start, c.end), (self.start, self.start + interval.millis()));
            assert_eq!([c.open, c.high, c.low, c.close], self.ohlc, "OHLC of {c:?}");
            assert_eq!(c.volume, self.volume, "volume of {c:?}");
            assert!((c.vwap - self.vwap).abs() < 1e-9, "vwap {} != {}", c.vwap, self.vwap);
            assert_eq!(c.trades, self.trades, "trade count of {c:?}");
            assert_eq!(c.src, "server");
            let expected = match emit {
                Emit::Forming => (true, false, PublishKind::Ephemeral),
                Emit::Final => (false, false, PublishKind::Retained),
                Emit::Correction => (false, true, PublishKind::Retained),
            };
            assert_eq!((c.forming, c.correction, update.kind), expected, "{c:?}");
        }
    }

    #[test]
    fn bars_across_three_windows_with_an_empty_one_between() {
        let mut b = one_second_bars(LatePolicy::Correct);
        let w0 = |ohlc, volume, vwap, trades| Expect { start: T0, ohlc, volume, vwap, trades };
        let w0_full = w0([10.0, 10.5, 9.9, 9.9], 350.0, 3595.0 / 350.0, 3);
        let w1_first =
            Expect { start: T0 + 1_000, ohlc: [10.2; 4], volume: 100.0, vwap: 10.2, trades: 1 };
        let w1_full = Expect {
            start: T0 + 1_000,
            ohlc: [10.2, 10.4, 10.2, 10.4],
            volume: 400.0,
            vwap: 10.35,
            trades: 2,
        };
        let w3 = Expect { start: T0 + 3_000, ohlc: [10.1; 4], volume: 10.0, vwap: 10.1, trades: 1 };

        let u = b.on_trade("AAPL", 10.0, 100.0, T0 + 100);
        assert_eq!(u.len(), 1);
        w0([10.0; 4], 100.0, 10.0, 1).check(&u[0], Emit::Forming);

        let u = b.on_trade("AAPL", 10.5, 200.0, T0 + 400);
        assert_eq!(u.len(), 1);
        w0([10.0, 10.5, 10.0, 10.5], 300.0, 3100.0 / 300.0, 2).check(&u[0], Emit::Forming);

        let u = b.on_trade("AAPL", 9.9, 50.0, T0 + 999);
        assert_eq!(u.len(), 1);
        w0_full.check(&u[0], Emit::Forming);

        // The first trade of the next window closes the previous one.
        let u = b.on_trade("AAPL", 10.2, 100.0, T0 + 1_000);
        assert_eq!(u.len(), 2);
        w0_full.check(&u[0], Emit::Final);
        w1_first.check(&u[1], Emit::Forming);

        let u = b.on_trade("AAPL", 10.4, 300.0, T0 + 1_500);
        assert_eq!(u.len(), 1);
        w1_full.check(&u[0], Emit::Forming);

        // Nothing traded in [T0+2000, T0+3000): no bar for that window, ever.
        let u = b.on_trade("AAPL", 10.1, 10.0, T0 + 3_200);
        assert_eq!(u.len(), 2);
        w1_full.check(&u[0], Emit::Final);
        w3.check(&u[1], Emit::Forming);

        let u = b.on_clock(T0 + 4_000 + GRACE);
        assert_eq!(u.len(), 1);
        w3.check(&u[0], Emit::Final);

        assert!(b.on_clock(T0 + 10_000).is_empty());
        assert_eq!((b.late_ticks(), b.dropped_ticks()), (0, 0));
    }

    /// Trades at T0+100 (10 × 100) and T0+900 (11 × 100), then one at T0+1100 that closes
    /// the first window.
    fn two_windows(b: &mut CandleBuilder) {
        b.on_trade("AAPL", 10.0, 100.0, T0 + 100);
        b.on_trade("AAPL", 11.0, 100.0, T0 + 900);
        assert_eq!(b.on_trade("AAPL", 12.0, 100.0, T0 + 1_100).len(), 2);
    }

    #[test]
    fn late_trade_corrects_the_closed_bar() {
        let mut b = one_second_bars(LatePolicy::Correct);
        two_windows(&mut b);

        // Stamped between the two trades: a new low, but open and close stay put.
        let u = b.on_trade("AAPL", 9.0, 200.0, T0 + 500);
        assert_eq!(u.len(), 1);
        Expect {
            start: T0,
            ohlc: [10.0, 11.0, 9.0, 11.0],
            volume: 400.0,
            vwap: 3900.0 / 400.0,
            trades: 3,
        }
        .check(&u[0], Emit::Correction);
        assert_eq!((b.late_ticks(), b.dropped_ticks()), (1, 0));

        // The forming bar is untouched by the correction.
        let u = b.on_clock(T0 + 2_000 + GRACE);
        assert_eq!(u.len(), 1);
        Expect { start: T0 + 1_000, ohlc: [12.0; 4], volume: 100.0, vwap: 12.0, trades: 1 }
            .check(&u[0], Emit::Final);
    }

    #[test]
    fn late_trade_is_dropped_under_the_drop_policy() {
        let mut b = one_second_bars(LatePolicy::Drop);
        two_windows(&mut b);

        assert!(b.on_trade("AAPL", 9.0, 200.0, T0 + 500).is_empty());
        assert_eq!((b.late_ticks(), b.dropped_ticks()), (1, 1));

        let u = b.on_clock(T0 + 2_000 + GRACE);
        assert_eq!(u.len(), 1);
        assert_eq!((u[0].candle.start, u[0].candle.trades), (T0 + 1_000, 1));
    }

    #[test]
    fn late_trade_for_an_empty_window_yields_that_bar_as_a_correction() {
        let mut b = one_second_bars(LatePolicy::Correct);
        b.on_trade("AAPL", 10.0, 100.0, T0 + 100);
        b.on_trade("AAPL", 10.3, 100.0, T0 + 3_100);

        let u = b.on_trade("AAPL", 10.2, 50.0, T0 + 2_100);
        assert_eq!(u.len(), 1);
        Expect { start: T0 + 2_000, ohlc: [10.2; 4], volume: 50.0, vwap: 10.2, trades: 1 }
            .check(&u[0], Emit::Correction);

        // A second late trade for that window corrects the bar just made.
        let u = b.on_trade("AAPL", 10.25, 50.0, T0 + 2_200);
        assert_eq!(u.len(), 1);
        Expect {
            start: T0 + 2_000,
            ohlc: [10.2, 10.25, 10.2, 10.25],
            volume: 100.0,
            vwap: 10.225,
            trades: 2,
        }
        .check(&u[0], Emit::Correction);
        assert_eq!((b.late_ticks(), b.dropped_ticks()), (2, 0));
    }

    #[test]
    fn trades_beyond_the_correction_horizon_are_dropped() {
        let mut b = one_second_bars(LatePolicy::Correct);
        b.on_trade("AAPL", 10.0, 100.0, T0 + 100);
        // The newest bar is now window 7, so windows 2 to 6 can still be corrected.
        b.on_trade("AAPL", 10.0, 100.0, T0 + 7_100);

        assert!(b.on_trade("AAPL", 10.0, 100.0, T0 + 1_100).is_empty());
        assert!(b.on_trade("AAPL", 10.0, 100.0, T0 + 500).is_empty());
        assert_eq!((b.late_ticks(), b.dropped_ticks()), (2, 2));

        let u = b.on_trade("AAPL", 10.0, 100.0, T0 + 2_100);
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].candle.start, T0 + 2_000);
        assert!(u[0].candle.correction);
        assert_eq!((b.late_ticks(), b.dropped_ticks()), (3, 2));
    }

    #[test]
    fn the_clock_closes_a_window_once_after_the_grace_period() {
        let mut b = one_second_bars(LatePolicy::Correct);
        b.on_trade("AAPL", 10.0, 100.0, T0 + 100);

        assert!(b.on_clock(T0 + 1_000).is_empty());
        assert!(b.on_clock(T0 + 1_000 + GRACE - 1).is_empty());
        let u = b.on_clock(T0 + 1_000 + GRACE);
        assert_eq!(u.len(), 1);
        Expect { start: T0, ohlc: [10.0; 4], volume: 100.0, vwap: 10.0, trades: 1 }
            .check(&u[0], Emit::Final);
        assert!(b.on_clock(T0 + 1_000 + GRACE + 1).is_empty());
        // A clock stepped backwards does not reopen the window.
        assert!(b.on_clock(T0 + 500).is_empty());

        // The window is closed now, so another trade for it is a correction.
        let u = b.on_trade("AAPL", 10.5, 100.0, T0 + 900);
        assert_eq!(u.len(), 1);
        Expect { start: T0, ohlc: [10.0, 10.5, 10.0, 10.5], volume: 200.0, vwap: 10.25, trades: 2 }
            .check(&u[0], Emit::Correction);
        assert_eq!(b.late_ticks(), 1);
    }

    #[test]
    fn a_quiet_symbols_delayed_trade_still_gets_its_bar() {
        // The clock is past this window's end plus grace, but the symbol had no bar there:
        // the trade opens one, which the next clock call closes.
        let mut b = one_second_bars(LatePolicy::Correct);
        b.on_clock(T0 + 1_500);
        let u = b.on_trade("AAPL", 10.0, 100.0, T0 + 100);
        assert_eq!(u.len(), 1);
        assert!(u[0].candle.forming);
        let u = b.on_clock(T0 + 1_600);
        assert_eq!(u.len(), 1);
        assert!(!u[0].candle.forming && !u[0].candle.correction);
        assert_eq!(b.late_ticks(), 0);
    }

    #[test]
    fn minute_bars_align_to_wall_clock_minutes() {
        // 2023-11-14T22:14:00Z.
        const M: i64 = 1_700_000_040_000;
        let mut b = CandleBuilder::new(CandleConfig {
            intervals: vec![Interval::OneMinute],
            ..CandleConfig::default()
        });

        let u = b.on_trade("AAPL", 10.0, 100.0, M - 1);
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].channel, "candles.AAPL.1m");
        assert_eq!((u[0].candle.start, u[0].candle.end), (M - 60_000, M));
        assert_eq!(u[0].candle.interval, Interval::OneMinute);

        let u = b.on_trade("AAPL", 11.0, 100.0, M);
        assert_eq!(u.len(), 2);
        assert_eq!((u[0].candle.start, u[0].candle.forming), (M - 60_000, false));
        assert_eq!((u[1].candle.start, u[1].candle.end), (M, M + 60_000));

        let u = b.on_trade("AAPL", 12.0, 100.0, M + 59_999);
        assert_eq!(u.len(), 1);
        Expect { start: M, ohlc: [11.0, 12.0, 11.0, 12.0], volume: 200.0, vwap: 11.5, trades: 2 }
            .check(&u[0], Emit::Forming);
        assert!(b.on_clock(M + 60_000 + DEFAULT_GRACE_MS - 1).is_empty());
        assert_eq!(b.on_clock(M + 60_000 + DEFAULT_GRACE_MS).len(), 1);
    }

    #[test]
    fn a_trade_updates_every_interval_in_order() {
        let mut b = CandleBuilder::new(CandleConfig {
            intervals: vec![Interval::OneSecond, Interval::OneMinute, Interval::OneSecond],
            ..CandleConfig::default()
        });
        let sym = "O:TSLA230616C00150000";
        let u = b.on_trade(sym, 1.54, 1.0, T0 + 100);
        let channels: Vec<_> = u.iter().map(|u| u.channel.as_str()).collect();
        assert_eq!(
            channels,
            ["candles.O:TSLA230616C00150000.1s", "candles.O:TSLA230616C00150000.1m"]
        );
        assert!(u.iter().all(|u| u.kind == PublishKind::Ephemeral && u.candle.sym == sym));
    }

    #[test]
    fn out_of_order_trades_in_a_window_keep_open_and_close_by_timestamp() {
        let mut b = one_second_bars(LatePolicy::Correct);
        b.on_trade("AAPL", 10.0, 100.0, T0 + 500);
        b.on_trade("AAPL", 9.0, 100.0, T0 + 100);
        let u = b.on_trade("AAPL", 11.0, 100.0, T0 + 300);
        Expect { start: T0, ohlc: [9.0, 11.0, 9.0, 10.0], volume: 300.0, vwap: 10.0, trades: 3 }
            .check(&u[0], Emit::Forming);
    }

    #[test]
    fn zero_volume_window_reports_the_close_as_vwap() {
        let mut b = one_second_bars(LatePolicy::Correct);
        b.on_trade("AAPL", 10.0, 0.0, T0 + 100);
        let u = b.on_trade("AAPL", 10.5, 0.0, T0 + 200);
        assert_eq!((u[0].candle.volume, u[0].candle.vwap), (0.0, 10.5));
    }

    #[test]
    fn invalid_trades_are_dropped_and_leave_no_state() {
        let mut b = CandleBuilder::new(CandleConfig::default());
        assert!(b.on_trade("AAPL", f64::NAN, 100.0, T0).is_empty());
        assert!(b.on_trade("AAPL", f64::INFINITY, 100.0, T0).is_empty());
        assert!(b.on_trade("AAPL", 10.0, -1.0, T0).is_empty());
        assert!(b.on_trade("AAPL", 10.0, 100.0, -1).is_empty());
        assert!(b.on_trade("AAPL", 10.0, 100.0, i64::MAX).is_empty());
        assert_eq!((b.dropped_ticks(), b.late_ticks()), (5, 0));
        assert_eq!(b.tracked_symbols(), 0);
    }

    #[test]
    fn idle_symbols_are_forgotten_and_stale_trades_refused() {
        let mut b = CandleBuilder::new(CandleConfig::default());
        b.on_trade("AAPL", 10.0, 100.0, T0 + 100);
        b.on_trade("MSFT", 20.0, 100.0, T0 + 100);
        assert_eq!(b.tracked_symbols(), 2);

        // The minute bar (window [T0-20s, T0+40s)) closes at T0+40.5s and can be corrected
        // for five more minutes.
        let minute_end = Interval::OneMinute.window_start(T0) + 60_000;
        let finals = b.on_clock(minute_end + DEFAULT_GRACE_MS);
        assert_eq!(finals.len(), 4, "1s and 1m finals of both symbols: {finals:?}");
        let forget_at = minute_end + 5 * 60_000 + DEFAULT_GRACE_MS;
        assert!(b.on_clock(forget_at - 1).is_empty());
        assert_eq!(b.tracked_symbols(), 2);
        b.on_trade("MSFT", 20.0, 100.0, forget_at);
        assert!(b.on_clock(forget_at).is_empty());
        assert_eq!(b.tracked_symbols(), 1, "AAPL forgotten, MSFT still trading");

        // A trade for AAPL's old window would replace a bar already published: refused.
        assert!(b.on_trade("AAPL", 11.0, 100.0, T0 + 200).is_empty());
        assert_eq!(b.tracked_symbols(), 1);
        assert_eq!((b.late_ticks(), b.dropped_ticks()), (1, 1));
    }

    /// In-order trades at random times for a few symbols, with the clock ticking between
    /// them: every window with trades gets exactly one final bar, equal to the window's
    /// trades aggregated from scratch, and no other window gets one.
    #[test]
    fn in_order_streams_yield_one_exact_final_bar_per_traded_window() {
        use rand::prelude::*;
        use std::collections::BTreeMap;

        let mut rng = StdRng::seed_from_u64(7);
        let mut b = CandleBuilder::new(CandleConfig::default());
        let syms = ["AAPL", "MSFT", "O:SPY241220P00720000"];
        // Trades (price, size) of each window, and its final bar, by (sym, interval, start).
        let mut windows = BTreeMap::<_, Vec<(f64, f64)>>::new();
        let mut finals = BTreeMap::<(String, Interval, i64), Candle>::new();
        let mut record = |updates: Vec<CandleUpdate>| {
            for u in updates {
                assert!(!u.candle.correction, "in-order trades are never late");
                if !u.candle.forming {
                    let key = (u.candle.sym.clone(), u.candle.interval, u.candle.start);
                    assert!(finals.insert(key, u.candle).is_none(), "second final bar");
                }
            }
        };

        let mut now = T0;
        for _ in 0..5_000 {
            // Mostly a few ms apart, sometimes a quiet spell of seconds.
            now += if rng.random_bool(0.02) {
                rng.random_range(1_000..5_000)
            } else {
                rng.random_range(0..40)
            };
            let sym = syms[rng.random_range(0..syms.len())];
            let price = f64::from(rng.random_range(9_000..11_000_u32)) / 100.0;
            let size = f64::from(rng.random_range(1..=10_u32)) * 100.0;
            for interval in Interval::ALL {
                windows
                    .entry((sym.to_owned(), interval, interval.window_start(now)))
                    .or_default()
                    .push((price, size));
            }
            record(b.on_trade(sym, price, size, now));
            if rng.random_bool(0.1) {
                record(b.on_clock(now));
            }
        }
        record(b.on_clock(now + 120_000));
        assert_eq!(b.late_ticks(), 0);

        assert_eq!(finals.len(), windows.len());
        for ((sym, interval, start), trades) in &windows {
            let c = &finals[&(sym.clone(), *interval, *start)];
            let volume: f64 = trades.iter().map(|t| t.1).sum();
            let turnover: f64 = trades.iter().map(|t| t.0 * t.1).sum();
            assert_eq!(c.open, trades[0].0);
            assert_eq!(c.close, trades[trades.len() - 1].0);
            assert_eq!(c.high, trades.iter().map(|t| t.0).fold(f64::MIN, f64::max));
            assert_eq!(c.low, trades.iter().map(|t| t.0).fold(f64::MAX, f64::min));
            assert_eq!(c.trades, trades.len() as u64);
            assert!((c.volume - volume).abs() < 1e-6);
            assert!((c.vwap - turnover / volume).abs() < 1e-9);
            assert_eq!(c.end - c.start, interval.millis());
        }
    }
}
