//! The normalised market-data schema: one set of field names for every source.
//!
//! Whatever the origin (the built-in simulator, Massive, a generic connector, or the
//! server's own candle builder), market data reaches clients as these JSON objects, so a
//! dashboard written against one source works with all of them.
//!
//! | channel | type | fields |
//! | --- | --- | --- |
//! | `ticks.SYM` | [`Trade`] | `sym`, `price`, `size`, `ts`, `exchange`?, `conditions`?, `id`?, `seq`?, `src` |
//! | `quotes.SYM` | [`Quote`] | `sym`, `bid`, `bid_size`, `ask`, `ask_size`, `ts`, `bid_exchange`?, `ask_exchange`?, `seq`?, `src` |
//! | `candles.SYM.1s`, `candles.SYM.1m` | [`Candle`] | `sym`, `interval`, `start`, `end`, `open`, `high`, `low`, `close`, `volume`, `vwap`, `trades`, `forming`, `src`, `correction`? |
//!
//! Conventions:
//! - `?` marks a field that is omitted when the source does not have it (never sent as `null`).
//! - Times (`ts`, `start`, `end`) are Unix epoch milliseconds, UTC.
//! - Prices are in the instrument's quote currency; sizes and volumes are in units of the
//!   instrument (shares, contracts), fractional where the source allows it.
//! - `exchange`, `bid_exchange`, `ask_exchange` and `conditions` carry the upstream numeric
//!   codes unchanged (Massive's exchange and condition ids).
//! - `seq` orders events of one symbol and identifies duplicates; it may skip values, so it
//!   is not a gap detector.
//! - `src` names the producer: `"sim"` (the simulator), `"massive"`, `"server"` (candles
//!   built by ferrocast from trades), or a configured connector's name.
//! - A candle covers `[start, end)`, aligned to wall-clock boundaries. `forming: true` marks
//!   an update of a window still open; the window's final bar has `forming: false`. A closed
//!   bar sent again after later trades changed it has `correction: true`.
//!
//! Symbols are kept exactly as the source spells them, including `:` in option contracts
//! (`O:TSLA230616C00150000`) and `.` in share classes (`BRK.B`); both are legal in channel
//! names, whose namespace is the part before the first `.`.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Namespace of trade channels (`ticks.SYM`).
pub const TRADES_NAMESPACE: &str = "ticks";
/// Namespace of quote channels (`quotes.SYM`).
pub const QUOTES_NAMESPACE: &str = "quotes";
/// Namespace of candle channels (`candles.SYM.1s`, `candles.SYM.1m`).
pub const CANDLES_NAMESPACE: &str = "candles";

/// `src` of trades and quotes made up by the built-in simulator.
pub const SRC_SIMULATOR: &str = "sim";
/// `src` of candles that ferrocast built itself from trades.
pub const SRC_SERVER: &str = "server";

/// Longest symbol whose every channel stays within the 255-character channel-name limit:
/// the longest channel is `candles.SYM.1m`.
pub const MAX_SYMBOL_LEN: usize = 255 - "candles.".len() - ".1m".len();

/// One trade (a print), published on `ticks.SYM`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trade {
    /// Symbol as the source spells it.
    pub sym: String,
    /// Trade price.
    pub price: f64,
    /// Trade size in units of the instrument.
    pub size: f64,
    /// Trade time, Unix ms.
    pub ts: i64,
    /// Upstream exchange id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exchange: Option<i64>,
    /// Upstream trade condition codes; omitted when there are none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<i64>,
    /// Upstream trade id (a string: venues use non-numeric ids).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Per-symbol sequence number: increasing, not necessarily contiguous.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Producer of this trade (`"sim"`, `"massive"`, ...).
    #[serde(default)]
    pub src: String,
}

/// One top-of-book quote (NBBO), published on `quotes.SYM`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Quote {
    /// Symbol as the source spells it.
    pub sym: String,
    /// Best bid price.
    pub bid: f64,
    /// Size at the best bid, in units of the instrument.
    pub bid_size: f64,
    /// Best ask price.
    pub ask: f64,
    /// Size at the best ask, in units of the instrument.
    pub ask_size: f64,
    /// Quote time, Unix ms.
    pub ts: i64,
    /// Upstream exchange id of the bid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bid_exchange: Option<i64>,
    /// Upstream exchange id of the ask.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ask_exchange: Option<i64>,
    /// Per-symbol sequence number: increasing, not necessarily contiguous.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Producer of this quote.
    #[serde(default)]
    pub src: String,
}

/// One OHLCV bar, published on `candles.SYM.1s` or `candles.SYM.1m`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candle {
    /// Symbol as the source spells it.
    pub sym: String,
    /// Window length.
    pub interval: Interval,
    /// Window start, inclusive, Unix ms, a multiple of the interval.
    pub start: i64,
    /// Window end, exclusive, Unix ms (`start` + the interval).
    pub end: i64,
    /// Price of the window's first trade.
    pub open: f64,
    /// Highest trade price in the window.
    pub high: f64,
    /// Lowest trade price in the window.
    pub low: f64,
    /// Price of the window's last trade.
    pub close: f64,
    /// Sum of trade sizes.
    pub volume: f64,
    /// Volume-weighted average price: Σ(price·size) / Σsize.
    pub vwap: f64,
    /// Number of trades in the window.
    pub trades: u64,
    /// True while the window is still open and the bar may change.
    pub forming: bool,
    /// Producer: `"server"` when built by ferrocast, `"massive"` when taken from upstream.
    #[serde(default)]
    pub src: String,
    /// True on a closed bar sent again because a late trade changed it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub correction: bool,
}

/// Length of a candle window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Interval {
    /// One second.
    #[serde(rename = "1s")]
    OneSecond,
    /// One minute.
    #[serde(rename = "1m")]
    OneMinute,
}

impl Interval {
    /// Every supported interval, shortest first.
    pub const ALL: [Interval; 2] = [Interval::OneSecond, Interval::OneMinute];

    /// Window length in milliseconds.
    pub const fn millis(self) -> i64 {
        match self {
            Interval::OneSecond => 1_000,
            Interval::OneMinute => 60_000,
        }
    }

    /// Wire name, also the last segment of the candle channel: `"1s"` or `"1m"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Interval::OneSecond => "1s",
            Interval::OneMinute => "1m",
        }
    }

    /// Start of the window containing `ts_ms`. Windows are aligned to the Unix epoch, so
    /// minute bars start on wall-clock minutes (UTC); this also holds for times before 1970.
    pub const fn window_start(self, ts_ms: i64) -> i64 {
        ts_ms - ts_ms.rem_euclid(self.millis())
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text given for an interval is not one of `1s`, `1m`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown candle interval {0:?}: expected \"1s\" or \"1m\"")]
pub struct UnknownInterval(pub String);

impl FromStr for Interval {
    type Err = UnknownInterval;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Interval::ALL
            .into_iter()
            .find(|interval| interval.as_str() == s)
            .ok_or_else(|| UnknownInterval(s.to_owned()))
    }
}

/// Channel carrying the trades of `sym`: `ticks.SYM`.
pub fn channel_for_trade(sym: &str) -> String {
    format!("{TRADES_NAMESPACE}.{sym}")
}

/// Channel carrying the quotes of `sym`: `quotes.SYM`.
pub fn channel_for_quote(sym: &str) -> String {
    format!("{QUOTES_NAMESPACE}.{sym}")
}

/// Channel carrying the `interval` candles of `sym`: `candles.SYM.1s` or `candles.SYM.1m`.
pub fn channel_for_candle(sym: &str, interval: Interval) -> String {
    format!("{CANDLES_NAMESPACE}.{sym}.{interval}")
}

/// Whether `sym` can be used in channel names: 1 to [`MAX_SYMBOL_LEN`] characters from
/// `[A-Za-z0-9_.:@-]`, the channel-name alphabet.
pub fn is_valid_symbol(sym: &str) -> bool {
    !sym.is_empty()
        && sym.len() <= MAX_SYMBOL_LEN
        && sym
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'-'))
}

/// Serializes a market-data value to the JSON bytes handed to a [`crate::Sink`], once per
/// event, so every subscriber shares the same buffer.
pub fn encode<T: Serialize>(value: &T) -> Bytes {
    // The schema types hold only strings, numbers, booleans and arrays, and writing into a
    // `Vec` cannot fail, so serialization has no error case to report.
    let json = serde_json::to_vec(value).expect("market-data types always serialize to JSON");
    Bytes::from(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_keep_symbols_as_is() {
        assert_eq!(channel_for_trade("AAPL"), "ticks.AAPL");
        assert_eq!(channel_for_quote("BRK.B"), "quotes.BRK.B");
        assert_eq!(
            channel_for_candle("O:TSLA230616C00150000", Interval::OneMinute),
            "candles.O:TSLA230616C00150000.1m"
        );
        assert_eq!(channel_for_candle("AAPL", Interval::OneSecond), "candles.AAPL.1s");
    }

    #[test]
    fn symbol_validation_follows_the_channel_alphabet() {
        assert!(is_valid_symbol("AAPL"));
        assert!(is_valid_symbol("O:TSLA230616C00150000"));
        assert!(is_valid_symbol("BRK.B"));
        assert!(is_valid_symbol("X:BTC-USD"));
        assert!(!is_valid_symbol(""));
        assert!(!is_valid_symbol("AA PL"));
        assert!(!is_valid_symbol("ÄPL"));
        assert!(is_valid_symbol(&"A".repeat(MAX_SYMBOL_LEN)));
        assert!(!is_valid_symbol(&"A".repeat(MAX_SYMBOL_LEN + 1)));
        assert_eq!(channel_for_candle(&"A".repeat(MAX_SYMBOL_LEN), Interval::OneMinute).len(), 255);
    }

    #[test]
    fn intervals_align_to_wall_clock() {
        assert_eq!(Interval::OneSecond.window_start(1_700_000_000_999), 1_700_000_000_000);
        // 2023-11-14T22:13:59.999Z and 22:14:00.000Z fall in different minutes.
        assert_eq!(Interval::OneMinute.window_start(1_700_000_039_999), 1_699_999_980_000);
        assert_eq!(Interval::OneMinute.window_start(1_700_000_040_000), 1_700_000_040_000);
        assert_eq!(Interval::OneMinute.window_start(-1), -60_000);
        assert_eq!("1m".parse::<Interval>(), Ok(Interval::OneMinute));
        assert_eq!("1s".parse::<Interval>(), Ok(Interval::OneSecond));
        assert!("5m".parse::<Interval>().is_err());
    }

    #[test]
    fn optional_fields_are_omitted_not_null() {
        let trade = Trade {
            sym: "MSFT".into(),
            price: 114.125,
            size: 100.0,
            ts: 1_536_036_818_784,
            exchange: None,
            conditions: Vec::new(),
            id: None,
            seq: None,
            src: "massive".into(),
        };
        let json = String::from_utf8(encode(&trade).to_vec()).unwrap();
        assert_eq!(
            json,
            r#"{"sym":"MSFT","price":114.125,"size":100.0,"ts":1536036818784,"src":"massive"}"#
        );
        assert_eq!(serde_json::from_str::<Trade>(&json).unwrap(), trade);

        let full = Trade {
            exchange: Some(4),
            conditions: vec![0, 12],
            id: Some("12345".into()),
            seq: Some(3_681_328),
            ..trade
        };
        let json = String::from_utf8(encode(&full).to_vec()).unwrap();
        assert_eq!(
            json,
            r#"{"sym":"MSFT","price":114.125,"size":100.0,"ts":1536036818784,"exchange":4,"conditions":[0,12],"id":"12345","seq":3681328,"src":"massive"}"#
        );
        assert_eq!(serde_json::from_str::<Trade>(&json).unwrap(), full);
    }

    #[test]
    fn quote_and_candle_round_trip() {
        let quote = Quote {
            sym: "O:SPY241220P00720000".into(),
            bid: 9.71,
            bid_size: 17.0,
            ask: 9.81,
            ask_size: 24.0,
            ts: 1_644_506_128_351,
            bid_exchange: Some(302),
            ask_exchange: Some(302),
            seq: Some(844_090_872),
            src: "massive".into(),
        };
        let json = encode(&quote);
        assert_eq!(serde_json::from_slice::<Quote>(&json).unwrap(), quote);

        let candle = Candle {
            sym: "AAPL".into(),
            interval: Interval::OneMinute,
            start: 1_700_000_040_000,
            end: 1_700_000_100_000,
            open: 1.0,
            high: 2.0,
            low: 0.5,
            close: 1.5,
            volume: 300.0,
            vwap: 1.25,
            trades: 3,
            forming: false,
            src: SRC_SERVER.into(),
            correction: false,
        };
        let json = String::from_utf8(encode(&candle).to_vec()).unwrap();
        assert!(json.contains(r#""interval":"1m""#), "{json}");
        assert!(!json.contains("correction"), "{json}");
        assert_eq!(serde_json::from_str::<Candle>(&json).unwrap(), candle);

        let corrected = Candle { correction: true, ..candle };
        let json = String::from_utf8(encode(&corrected).to_vec()).unwrap();
        assert!(json.ends_with(r#""correction":true}"#), "{json}");
        assert_eq!(serde_json::from_str::<Candle>(&json).unwrap(), corrected);
    }
}
