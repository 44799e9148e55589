//! The built-in demo market: made-up trades and quotes so `ferrocast serve` shows live data
//! with no upstream account.
//!
//! Each symbol's price follows a geometric random walk with small per-event volatility and
//! a weak pull back to its starting price, so a demo left running for days still shows
//! familiar price levels. Every event picks a symbol with a popularity skew (symbols listed
//! first trade more, as index heavyweights do), moves its price, and publishes either a quote
//! on `quotes.SYM` or, about once per two to three quotes, a trade on `ticks.SYM`, using the
//! [`crate::market`] schema with `src: "sim"`. Prices are whole cents; quotes have
//! `bid < ask` with a spread of a few cents that widens with the price; sizes are mostly round
//! lots of 100, with occasional odd lots and blocks. Timestamps are wall-clock milliseconds.
//!
//! With a seed the sequence of events is reproducible (only timestamps vary), which the
//! tests rely on.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rand::distr::weighted::WeightedIndex;
use rand::prelude::*;
use tokio::time::MissedTickBehavior;

use crate::market::{self, Quote, SRC_SIMULATOR, Trade};
use crate::{PublishKind, Sink};

/// Default event rate, across all symbols: lively on a dashboard, light on a laptop.
pub const DEFAULT_RATE: f64 = 50.0;
/// Lowest supported event rate, events per second.
pub const MIN_RATE: f64 = 1.0;
/// Highest supported event rate, events per second: enough to load-test the gateway.
pub const MAX_RATE: f64 = 100_000.0;

/// Well-known US symbols and plausible starting prices, most actively traded first.
const DEFAULT_SYMBOLS: [(&str, f64); 20] = [
    ("AAPL", 230.00),
    ("MSFT", 510.00),
    ("NVDA", 180.00),
    ("AMZN", 225.00),
    ("GOOGL", 200.00),
    ("META", 740.00),
    ("TSLA", 420.00),
    ("AMD", 165.00),
    ("NFLX", 1_200.00),
    ("JPM", 295.00),
    ("V", 345.00),
    ("BAC", 50.00),
    ("KO", 69.00),
    ("DIS", 115.00),
    ("INTC", 24.00),
    ("ORCL", 250.00),
    ("CRM", 250.00),
    ("PEP", 145.00),
    ("SPY", 645.00),
    ("QQQ", 570.00),
];

/// Share of events that are trades: about one trade per 2.3 quotes.
const TRADE_SHARE: f64 = 0.3;
/// Standard deviation of the log-price step per event.
const VOLATILITY: f64 = 3e-4;
/// Fraction of the log-distance to the starting price recovered per event. With
/// `VOLATILITY` this keeps the long-run spread of prices around ±3 % of the start.
const MEAN_REVERSION: f64 = 5e-5;
/// Typical quoted spread as a fraction of the price (1 basis point).
const SPREAD: f64 = 1e-4;
/// Exponent of the Zipf-like popularity skew: the first symbol gets about 10 times the
/// events of the twentieth.
const POPULARITY_SKEW: f64 = 0.8;
/// Shortest pacing tick: above `1 / MIN_TICK` events per second, several events go out per
/// tick instead of waking up more often.
const MIN_TICK: Duration = Duration::from_millis(5);

/// Round-lot trade sizes in hundreds of shares, repeated to weight them: one lot is the
/// most common print.
const ROUND_LOTS: [f64; 10] = [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 3.0, 4.0, 5.0, 10.0];
/// Massive exchange ids of venues that post quotes, with rough shares of quoting activity.
const QUOTE_VENUES: [(i64, f64); 7] = [
    (12, 0.25), // Nasdaq
    (11, 0.20), // NYSE Arca
    (10, 0.15), // NYSE
    (19, 0.15), // Cboe BZX
    (8, 0.10),  // Cboe EDGX
    (21, 0.10), // MEMX
    (15, 0.05), // IEX
];
/// Massive exchange ids where trades print; 4 (FINRA TRF) carries off-exchange volume.
const TRADE_VENUES: [(i64, f64); 8] =
    [(4, 0.40), (12, 0.15), (11, 0.10), (10, 0.10), (19, 0.08), (8, 0.07), (21, 0.06), (15, 0.04)];
/// Massive trade condition: odd lot trade.
const CONDITION_ODD_LOT: i64 = 37;
/// Massive trade condition: intermarket sweep order.
const CONDITION_INTERMARKET_SWEEP: i64 = 14;

/// Settings of the simulated market.
#[derive(Clone, Debug, PartialEq)]
pub struct SimulatorConfig {
    /// Symbols to simulate, most active first. Well-known symbols start at a plausible
    /// price; others at a made-up but stable one between 10 and 510.
    pub symbols: Vec<String>,
    /// Events (trades plus quotes) per second across all symbols, from [`MIN_RATE`] to
    /// [`MAX_RATE`].
    pub rate: f64,
    /// Seed for a reproducible event sequence; `None` draws one from the OS.
    pub seed: Option<u64>,
}

impl Default for SimulatorConfig {
    /// Twenty well-known US symbols at [`DEFAULT_RATE`], unseeded.
    fn default() -> Self {
        SimulatorConfig {
            symbols: DEFAULT_SYMBOLS.iter().map(|&(sym, _)| sym.to_owned()).collect(),
            rate: DEFAULT_RATE,
            seed: None,
        }
    }
}

/// Why a [`SimulatorConfig`] cannot run.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SimulatorConfigError {
    /// The symbol list is empty.
    #[error("the simulator needs at least one symbol")]
    NoSymbols,
    /// A symbol cannot be part of a channel name.
    #[error(
        "simulator symbol {0:?} is not 1 to {max} characters from A-Z a-z 0-9 _ . : @ -",
        max = market::MAX_SYMBOL_LEN
    )]
    InvalidSymbol(String),
    /// A symbol is listed twice.
    #[error("simulator symbol {0:?} is listed twice")]
    DuplicateSymbol(String),
    /// The rate is not a number between [`MIN_RATE`] and [`MAX_RATE`].
    #[error("simulator rate {0} is outside {MIN_RATE}..={MAX_RATE} events per second")]
    Rate(f64),
}

impl SimulatorConfig {
    /// Checks the settings, so a bad configuration is reported before the server starts.
    pub fn validate(&self) -> Result<(), SimulatorConfigError> {
        if self.symbols.is_empty() {
            return Err(SimulatorConfigError::NoSymbols);
        }
        for (i, sym) in self.symbols.iter().enumerate() {
            if !market::is_valid_symbol(sym) {
                return Err(SimulatorConfigError::InvalidSymbol(sym.clone()));
            }
            if self.symbols[..i].contains(sym) {
                return Err(SimulatorConfigError::DuplicateSymbol(sym.clone()));
            }
        }
        if !(MIN_RATE..=MAX_RATE).contains(&self.rate) {
            return Err(SimulatorConfigError::Rate(self.rate));
        }
        Ok(())
    }
}

/// Publishes simulated trades and quotes to `sink` at `cfg.rate` events per second until
/// `shutdown` completes.
///
/// An invalid configuration is logged and nothing is published; call
/// [`SimulatorConfig::validate`] first to refuse it at startup instead. When the task falls
/// behind (a busy runtime), missed ticks are skipped rather than made up in a burst.
pub async fn run(cfg: SimulatorConfig, sink: Arc<dyn Sink>, shutdown: impl Future<Output = ()>) {
    if let Err(err) = cfg.validate() {
        tracing::error!(%err, "market simulator not started");
        return;
    }
    tracing::info!(
        symbols = cfg.symbols.len(),
        rate = cfg.rate,
        seed = cfg.seed,
        "market simulator started"
    );

    let mut market = Market::new(&cfg);
    let period = MIN_TICK.max(Duration::from_secs_f64(1.0 / cfg.rate));
    let events_per_tick = cfg.rate * period.as_secs_f64();
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut shutdown = pin!(shutdown);
    // Fractional events carried over to the next tick, so rates that are not a whole number
    // of events per tick come out right on average.
    let mut credit = 0.0;
    let mut published: u64 = 0;

    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            _ = ticker.tick() => {}
        }
        credit += events_per_tick;
        // The epsilon absorbs rounding in `events_per_tick` (0.999… for 1.0).
        let due = (credit + 1e-9).floor();
        credit -= due;
        let ts = now_ms();
        for _ in 0..due as u64 {
            let (channel, data) = market.next_event(ts);
            sink.publish(channel, data, PublishKind::Retained);
        }
        published += due as u64;
    }
    tracing::info!(published, "market simulator stopped");
}

/// Wall-clock time in Unix milliseconds.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
}

/// The simulated market, without I/O or timers: each call to [`Market::next_event`] makes
/// one event.
struct Market {
    rng: StdRng,
    instruments: Vec<Instrument>,
    popularity: WeightedIndex<f64>,
    quote_venues: WeightedIndex<f64>,
    trade_venues: WeightedIndex<f64>,
}

/// One simulated symbol.
struct Instrument {
    trade_channel: String,
    quote_channel: String,
    /// Log of the starting price, which the walk drifts back to.
    anchor: f64,
    /// Log of the current mid price. The walk runs on the log so prices stay positive.
    log_price: f64,
    /// Per-symbol sequence over trades and quotes, like an exchange feed's.
    seq: u64,
    trades: u64,
    /// The last trade and quote published, updated in place so the symbol and source
    /// strings are not rebuilt for every event.
    trade: Trade,
    quote: Quote,
}

impl Market {
    /// `cfg` must be valid (see [`SimulatorConfig::validate`]).
    fn new(cfg: &SimulatorConfig) -> Self {
        let rng = match cfg.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let instruments = cfg.symbols.iter().map(|sym| Instrument::new(sym)).collect();
        let popularity = (1..=cfg.symbols.len()).map(|rank| (rank as f64).powf(-POPULARITY_SKEW));
        Market {
            rng,
            instruments,
            popularity: WeightedIndex::new(popularity)
                .expect("a validated config has at least one symbol"),
            quote_venues: WeightedIndex::new(QUOTE_VENUES.map(|(_, share)| share))
                .expect("venue shares are positive"),
            trade_venues: WeightedIndex::new(TRADE_VENUES.map(|(_, share)| share))
                .expect("venue shares are positive"),
        }
    }

    /// Moves one symbol's price and returns the channel and JSON of the resulting trade or
    /// quote, stamped `ts`.
    fn next_event(&mut self, ts: i64) -> (&str, Bytes) {
        let rng = &mut self.rng;
        let instrument = &mut self.instruments[self.popularity.sample(rng)];
        instrument.log_price += MEAN_REVERSION * (instrument.anchor - instrument.log_price)
            + VOLATILITY * standard_normal(rng);
        instrument.seq += 1;

        // Whole cents, at least one: the bid is the mid less half the spread.
        let mid_cents = instrument.log_price.exp() * 100.0;
        let spread_cents = (mid_cents * SPREAD * rng.random_range(0.5..1.5)).round().max(1.0);
        let bid_cents = (mid_cents - spread_cents / 2.0).round().max(1.0);
        let ask_cents = bid_cents + spread_cents;

        if rng.random_bool(TRADE_SHARE) {
            // Most trades take the bid or the ask; some print at the midpoint.
            let price_cents = match rng.random_range(0..20) {
                0..9 => bid_cents,
                9..18 => ask_cents,
                _ => ((bid_cents + ask_cents) / 2.0).floor(),
            };
            let trade = &mut instrument.trade;
            instrument.trades += 1;
            trade.price = price_cents / 100.0;
            trade.ts = ts;
            trade.exchange = Some(TRADE_VENUES[self.trade_venues.sample(rng)].0);
            trade.id = Some(instrument.trades.to_string());
            trade.seq = Some(instrument.seq);
            trade.conditions.clear();
            let lots = rng.random::<f64>();
            trade.size = if lots < 0.15 {
                trade.conditions.push(CONDITION_ODD_LOT);
                f64::from(rng.random_range(1..100_u32))
            } else if lots < 0.97 {
                if rng.random_bool(0.05) {
                    trade.conditions.push(CONDITION_INTERMARKET_SWEEP);
                }
                100.0 * ROUND_LOTS[rng.random_range(0..ROUND_LOTS.len())]
            } else {
                100.0 * f64::from(rng.random_range(10..=50_u32))
            };
            (&instrument.trade_channel, market::encode(trade))
        } else {
            let quote = &mut instrument.quote;
            quote.bid = bid_cents / 100.0;
            quote.ask = ask_cents / 100.0;
            quote.bid_size = quote_size(rng);
            quote.ask_size = quote_size(rng);
            quote.bid_exchange = Some(QUOTE_VENUES[self.quote_venues.sample(rng)].0);
            quote.ask_exchange = Some(QUOTE_VENUES[self.quote_venues.sample(rng)].0);
            quote.ts = ts;
            quote.seq = Some(instrument.seq);
            (&instrument.quote_channel, market::encode(quote))
        }
    }
}

impl Instrument {
    fn new(sym: &str) -> Self {
        let start = starting_price(sym);
        Instrument {
            trade_channel: market::channel_for_trade(sym),
            quote_channel: market::channel_for_quote(sym),
            anchor: start.ln(),
            log_price: start.ln(),
            seq: 0,
            trades: 0,
            trade: Trade {
                sym: sym.to_owned(),
                price: start,
                size: 0.0,
                ts: 0,
                exchange: None,
                conditions: Vec::new(),
                id: None,
                seq: None,
                src: SRC_SIMULATOR.to_owned(),
            },
            quote: Quote {
                sym: sym.to_owned(),
                bid: start,
                bid_size: 0.0,
                ask: start,
                ask_size: 0.0,
                ts: 0,
                bid_exchange: None,
                ask_exchange: None,
                seq: None,
                src: SRC_SIMULATOR.to_owned(),
            },
        }
    }
}

/// The price `sym` starts at: a plausible one for the well-known symbols, otherwise
/// [`made_up_price`]. The backfilled past ends here, so charts join the live walk.
pub fn starting_price(sym: &str) -> f64 {
    DEFAULT_SYMBOLS
        .iter()
        .find(|&&(known, _)| known == sym)
        .map_or_else(|| made_up_price(sym), |&(_, price)| price)
}

/// A plausible past for `sym`: `count` closed `interval` bars (`src: "sim"`) ending just
/// before `now_ms`'s window at the symbol's starting price, with the volatility the live
/// walk has at `events_per_sec` events for this symbol.
pub fn backfill(
    sym: &str,
    interval: crate::market::Interval,
    count: usize,
    now_ms: i64,
    events_per_sec: f64,
) -> Vec<crate::market::Candle> {
    let events_per_bar = events_per_sec * interval.millis() as f64 / 1000.0;
    let walk = crate::backfill::Walk {
        sym,
        interval,
        count,
        now_ms,
        last_close: starting_price(sym),
        volatility: crate::backfill::bar_volatility(VOLATILITY, events_per_bar),
        src: SRC_SIMULATOR,
    };
    crate::backfill::random_walk(&walk, &mut rand::rng())
}

/// A starting price between 10.00 and 509.99 derived from the symbol, stable across runs
/// and platforms (FNV-1a), so a custom symbol opens where it did last time.
fn made_up_price(sym: &str) -> f64 {
    let hash = sym.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    10.0 + (hash % 50_000) as f64 / 100.0
}

/// Displayed quote size: 1 to 20 round lots, small sizes most common.
fn quote_size(rng: &mut StdRng) -> f64 {
    let u = rng.random::<f64>();
    100.0 * (1.0 + (20.0 * u * u).floor())
}

/// A standard normal sample (Box-Muller), to avoid a dependency for one distribution.
fn standard_normal(rng: &mut StdRng) -> f64 {
    // `1 - u` lies in (0, 1], so the logarithm is finite.
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;
    use crate::market::Interval;

    /// Keeps everything published, for inspection.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(String, Bytes, PublishKind)>>);

    impl Sink for Recorder {
        fn publish(&self, channel: &str, data: Bytes, kind: PublishKind) {
            self.0.lock().unwrap().push((channel.to_owned(), data, kind));
        }
    }

    impl Recorder {
        fn len(&self) -> usize {
            self.0.lock().unwrap().len()
        }
    }

    fn seeded(seed: u64) -> SimulatorConfig {
        SimulatorConfig { seed: Some(seed), ..SimulatorConfig::default() }
    }

    /// A trade or a quote parsed back from the simulator's output.
    enum Event {
        Trade(Trade),
        Quote(Quote),
    }

    /// Parses an event with the schema types and checks that its channel names its symbol.
    fn parse(channel: &str, data: &[u8]) -> Event {
        if let Some(sym) = channel.strip_prefix("ticks.") {
            let trade: Trade = serde_json::from_slice(data).expect("a trade");
            assert_eq!(trade.sym, sym);
            Event::Trade(trade)
        } else if let Some(sym) = channel.strip_prefix("quotes.") {
            let quote: Quote = serde_json::from_slice(data).expect("a quote");
            assert_eq!(quote.sym, sym);
            Event::Quote(quote)
        } else {
            panic!("unexpected channel {channel}");
        }
    }

    fn is_cents(price: f64) -> bool {
        let cents = price * 100.0;
        (cents - cents.round()).abs() < 1e-6
    }

    #[test]
    fn backfill_ends_at_the_starting_price() {
        let now = 1_760_000_123_456;
        for (sym, interval) in [("AAPL", Interval::OneMinute), ("ZZZZ", Interval::OneSecond)] {
            let bars = backfill(sym, interval, 50, now, 2.5);
            assert_eq!(bars.len(), 50);
            let last = bars.last().unwrap();
            assert_eq!(last.close, (starting_price(sym) * 100.0).round() / 100.0);
            assert_eq!(last.end, interval.window_start(now));
            assert!(bars.iter().all(|b| b.src == SRC_SIMULATOR && b.sym == sym && !b.forming));
        }
        assert_eq!(starting_price("AAPL"), 230.0);
        assert_eq!(starting_price("ZZZZ"), made_up_price("ZZZZ"));
    }

    #[test]
    fn default_config_is_twenty_known_symbols_at_fifty_per_second() {
        let cfg = SimulatorConfig::default();
        assert_eq!(cfg.symbols.len(), 20);
        assert_eq!(&cfg.symbols[..3], ["AAPL", "MSFT", "NVDA"]);
        assert!(cfg.symbols.iter().any(|s| s == "QQQ"));
        assert_eq!(cfg.rate, 50.0);
        assert_eq!(cfg.validate(), Ok(()));
    }

    #[test]
    fn invalid_configs_are_reported() {
        let with = |symbols: &[&str], rate: f64| SimulatorConfig {
            symbols: symbols.iter().map(|s| s.to_string()).collect(),
            rate,
            seed: None,
        };
        use SimulatorConfigError as E;
        assert_eq!(with(&[], 50.0).validate(), Err(E::NoSymbols));
        assert_eq!(
            with(&["AAPL", "BAD SYM"], 50.0).validate(),
            Err(E::InvalidSymbol("BAD SYM".into()))
        );
        assert_eq!(
            with(&["AAPL", "MSFT", "AAPL"], 50.0).validate(),
            Err(E::DuplicateSymbol("AAPL".into()))
        );
        for rate in [0.0, 0.5, -1.0, 100_001.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(with(&["AAPL"], rate).validate(), Err(E::Rate(_))));
        }
        assert_eq!(with(&["O:TSLA230616C00150000", "BRK.B"], 1.0).validate(), Ok(()));
        assert_eq!(with(&["AAPL"], 100_000.0).validate(), Ok(()));
    }

    #[test]
    fn prices_stay_positive_in_cents_and_near_the_start() {
        let cfg = seeded(1);
        let mut market = Market::new(&cfg);
        let start: HashMap<String, f64> =
            DEFAULT_SYMBOLS.iter().map(|&(sym, price)| (sym.to_owned(), price)).collect();
        let (mut trades, mut quotes) = (0, 0);
        let mut last_seq: HashMap<String, u64> = HashMap::new();

        for _ in 0..100_000 {
            let (channel, data) = market.next_event(1_700_000_000_000);
            let (sym, seq, prices) = match parse(channel, &data) {
                Event::Trade(t) => {
                    trades += 1;
                    assert!(t.size >= 1.0 && t.size.fract() == 0.0, "{t:?}");
                    assert_eq!(t.size < 100.0, t.conditions == [CONDITION_ODD_LOT], "{t:?}");
                    assert!(t.exchange.is_some() && t.id.is_some(), "{t:?}");
                    assert_eq!((t.src.as_str(), t.ts), ("sim", 1_700_000_000_000));
                    (t.sym, t.seq, vec![t.price])
                }
                Event::Quote(q) => {
                    quotes += 1;
                    assert!(q.bid < q.ask, "{q:?}");
                    assert!(q.ask - q.bid < 0.01 * q.bid, "spread too wide: {q:?}");
                    for size in [q.bid_size, q.ask_size] {
                        assert!(size >= 100.0 && size % 100.0 == 0.0, "{q:?}");
                    }
                    assert!(q.bid_exchange.is_some() && q.ask_exchange.is_some(), "{q:?}");
                    assert_eq!(q.src, "sim");
                    (q.sym, q.seq, vec![q.bid, q.ask])
                }
            };
            for price in prices {
                assert!(price > 0.0 && is_cents(price), "{sym} at {price}");
                let ratio = price / start[&sym];
                assert!((0.8..1.25).contains(&ratio), "{sym} drifted to {price}");
            }
            let seq = seq.expect("simulated events carry a sequence");
            let previous = last_seq.insert(sym, seq);
            assert!(previous < Some(seq), "sequence must grow per symbol");
        }
        // Roughly one trade per two to three quotes.
        let quotes_per_trade = f64::from(quotes) / f64::from(trades);
        assert!((2.0..3.0).contains(&quotes_per_trade), "{quotes_per_trade}");
    }

    #[test]
    fn the_walk_stays_near_its_start_over_a_long_run() {
        // Ten times the walk's relaxation time (1 / MEAN_REVERSION events).
        let cfg = SimulatorConfig { symbols: vec!["AAPL".into()], ..seeded(11) };
        let mut market = Market::new(&cfg);
        let start = market.instruments[0].anchor;
        let mut widest: f64 = 0.0;
        for _ in 0..200_000 {
            market.next_event(0);
            widest = widest.max((market.instruments[0].log_price - start).abs());
        }
        // The pull keeps the log-price's spread near 0.03; without it, the walk's spread
        // would grow to about 0.13 over this many steps.
        assert!(widest < 0.15, "log-price strayed {widest} from the start");
    }

    #[test]
    fn popular_symbols_trade_more() {
        let mut market = Market::new(&seeded(2));
        let mut counts: HashMap<String, u32> = HashMap::new();
        for _ in 0..20_000 {
            let (channel, _) = market.next_event(0);
            let sym = channel.split_once('.').unwrap().1;
            *counts.entry(sym.to_owned()).or_default() += 1;
        }
        assert_eq!(counts.len(), 20, "every symbol gets events");
        assert!(counts["AAPL"] > 5 * counts["QQQ"], "{counts:?}");
        assert!(counts["AAPL"] > counts["NVDA"] && counts["NVDA"] > counts["KO"]);
    }

    #[test]
    fn a_seed_makes_the_stream_reproducible() {
        let stream = |seed| {
            let mut market = Market::new(&seeded(seed));
            (0..500)
                .map(|_| {
                    let (channel, data) = market.next_event(42);
                    (channel.to_owned(), data)
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(stream(3), stream(3));
        assert_ne!(stream(3), stream(4));
    }

    #[test]
    fn custom_symbols_get_stable_plausible_prices() {
        let price = made_up_price("O:TSLA230616C00150000");
        assert_eq!(price, made_up_price("O:TSLA230616C00150000"));
        assert!((10.0..510.0).contains(&price) && is_cents(price));
        assert_ne!(made_up_price("ABC"), made_up_price("ABD"));

        let cfg = SimulatorConfig {
            symbols: vec!["O:TSLA230616C00150000".into()],
            rate: 10.0,
            seed: Some(5),
        };
        let mut market = Market::new(&cfg);
        let (channel, data) = market.next_event(0);
        assert!(channel.ends_with(".O:TSLA230616C00150000"), "{channel}");
        parse(channel, &data);
    }

    /// Runs the simulator for `secs` of paused (simulated) time and returns what it published.
    async fn run_for(rate: f64, secs: u64) -> Vec<(String, Bytes, PublishKind)> {
        let sink = Arc::new(Recorder::default());
        let cfg = SimulatorConfig { rate, ..seeded(9) };
        run(cfg, sink.clone(), tokio::time::sleep(Duration::from_secs(secs))).await;
        Arc::try_unwrap(sink).ok().expect("run has returned").0.into_inner().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn pacing_matches_the_rate_in_simulated_time() {
        for (rate, secs) in [(1.0, 30), (3.0, 20), (50.0, 10), (333.0, 10), (5_000.0, 2)] {
            let events = run_for(rate, secs).await.len() as f64;
            let expected = rate * secs as f64;
            assert!(
                (events - expected).abs() <= (expected * 0.01).max(1.0),
                "rate {rate}: {events} events in {secs} s, expected {expected}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_top_rate_is_reached_with_several_events_per_tick() {
        let events = run_for(MAX_RATE, 1).await;
        let expected = MAX_RATE;
        assert!(
            (events.len() as f64 - expected).abs() <= expected * 0.01,
            "{} events",
            events.len()
        );
        // All retained, all parseable, stamped with the wall clock.
        let now = now_ms();
        for (channel, data, kind) in events.iter().step_by(97) {
            assert_eq!(*kind, PublishKind::Retained);
            let ts = match parse(channel, data) {
                Event::Trade(t) => t.ts,
                Event::Quote(q) => q.ts,
            };
            assert!((now - 60_000..=now).contains(&ts), "{ts} is not wall-clock ms");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_publishing() {
        let sink = Arc::new(Recorder::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run(seeded(1), sink.clone(), async {
            let _ = stopped.await;
        }));
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.send(()).unwrap();
        task.await.unwrap();
        let published = sink.len();
        assert!(published > 0);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(sink.len(), published);
    }

    #[tokio::test(start_paused = true)]
    async fn an_invalid_config_publishes_nothing() {
        let sink = Arc::new(Recorder::default());
        let cfg = SimulatorConfig { symbols: Vec::new(), ..SimulatorConfig::default() };
        // Returns at once although the shutdown signal never fires.
        run(cfg, sink.clone(), std::future::pending()).await;
        assert_eq!(sink.len(), 0);
    }
}
