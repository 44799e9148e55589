//! The Massive (formerly Polygon.io) WebSocket wire format, and its normalisation into the
//! [`crate::market`] schema. Sans I/O: strings in, typed events out.
//!
//! Every server frame is a JSON array of events, possibly of mixed types (`T` and `Q` in one
//! frame). Elements are decoded one by one, so one unknown or malformed event is counted and
//! skipped while the rest of its batch is kept. Field names follow Massive's spec; note that
//! `c` means conditions (an array) in `T`, one condition (an integer) in `Q`, and the close
//! price in `A`/`AM`, which is why the event type selects the struct.
//!
//! Wire structs keep Massive's one-letter field names, which its spec documents; they are
//! not repeated field by field here.
#![allow(missing_docs)]

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::market::{Candle, Interval, Quote, Trade, is_valid_symbol};

/// One decoded element of a frame.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "ev")]
pub enum Event {
    /// A trade.
    #[serde(rename = "T")]
    Trade(WireTrade),
    /// A quote (NBBO).
    #[serde(rename = "Q")]
    Quote(WireQuote),
    /// A per-second aggregate bar.
    #[serde(rename = "A")]
    Second(WireAgg),
    /// A per-minute aggregate bar.
    #[serde(rename = "AM")]
    Minute(WireAgg),
    /// A status message: connected, auth results, subscription acks, disconnect reasons.
    #[serde(rename = "status")]
    Status(WireStatus),
    /// An event type this connector does not handle (`LULD`, `NOI`, `FMV`, ...).
    #[serde(other)]
    Other,
}

/// `T`: a trade. Stocks add `i`, `z`, `trfi`, `trft`; options omit them.
#[derive(Debug, Deserialize, PartialEq)]
pub struct WireTrade {
    pub sym: String,
    pub p: f64,
    pub s: f64,
    pub t: i64,
    #[serde(default)]
    pub x: Option<i64>,
    #[serde(default, deserialize_with = "string_or_number")]
    pub i: Option<String>,
    #[serde(default)]
    pub c: Option<Vec<i64>>,
    #[serde(default)]
    pub q: Option<u64>,
}

/// `Q`: a quote. Stock sizes are round lots.
#[derive(Debug, Deserialize, PartialEq)]
pub struct WireQuote {
    pub sym: String,
    pub bp: f64,
    pub bs: f64,
    pub ap: f64,
    #[serde(rename = "as")]
    pub as_: f64,
    pub t: i64,
    #[serde(default)]
    pub bx: Option<i64>,
    #[serde(default)]
    pub ax: Option<i64>,
    #[serde(default)]
    pub q: Option<u64>,
}

/// `A` / `AM`: an aggregate bar over `[s, e)`.
#[derive(Debug, Deserialize, PartialEq)]
pub struct WireAgg {
    pub sym: String,
    pub o: f64,
    pub h: f64,
    pub l: f64,
    pub c: f64,
    pub v: f64,
    pub s: i64,
    pub e: i64,
    /// The window's VWAP.
    #[serde(default)]
    pub vw: Option<f64>,
    /// The window's average trade size.
    #[serde(default)]
    pub z: Option<f64>,
}

/// `status`.
#[derive(Debug, Deserialize, PartialEq)]
pub struct WireStatus {
    pub status: String,
    #[serde(default)]
    pub message: String,
}

/// Accepts a trade id sent as a string (the spec) or a number (some fixtures).
fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        S(String),
        N(serde_json::Number),
    }
    Ok(Option::<Id>::deserialize(d)?.map(|id| match id {
        Id::S(s) => s,
        Id::N(n) => n.to_string(),
    }))
}

/// Splits a frame into its elements and decodes each. `Err` means the frame itself is not
/// JSON (nothing in it can be used); per-element errors come back inside the vector.
/// A bare object instead of an array is accepted as a batch of one.
pub fn parse_frame(text: &str) -> Result<Vec<Result<Event, serde_json::Error>>, serde_json::Error> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') {
        return Ok(vec![serde_json::from_str::<Event>(text)]);
    }
    let elements: Vec<&RawValue> = serde_json::from_str(text)?;
    Ok(elements.into_iter().map(|raw| serde_json::from_str::<Event>(raw.get())).collect())
}

/// Why an event was decoded but cannot be published.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// The symbol cannot be part of a channel name.
    #[error("symbol {0:?} cannot be used in a channel name")]
    Symbol(String),
    /// A price or size is not a finite number, or negative.
    #[error("non-finite or negative number in {0} event")]
    Number(&'static str),
    /// A bar window that is not one second or one minute long.
    #[error("bar window [{0}, {1}) is not the event's interval")]
    Window(i64, i64),
}

/// Turns wire events into the market schema.
#[derive(Clone, Debug)]
pub struct Normaliser {
    /// `src` of every event.
    pub src: String,
    /// Multiplier for quote sizes (100 for stocks, whose sizes are round lots).
    pub quote_size_multiplier: f64,
}

fn finite(values: &[f64]) -> bool {
    values.iter().all(|v| v.is_finite() && *v >= 0.0)
}

impl Normaliser {
    /// A trade.
    pub fn trade(&self, t: WireTrade) -> Result<Trade, Invalid> {
        if !is_valid_symbol(&t.sym) {
            return Err(Invalid::Symbol(t.sym));
        }
        if !finite(&[t.p, t.s]) {
            return Err(Invalid::Number("T"));
        }
        Ok(Trade {
            sym: t.sym,
            price: t.p,
            size: t.s,
            ts: t.t,
            exchange: t.x,
            conditions: t.c.unwrap_or_default(),
            id: t.i,
            seq: t.q,
            src: self.src.clone(),
        })
    }

    /// A quote, sizes multiplied by [`Normaliser::quote_size_multiplier`].
    pub fn quote(&self, q: WireQuote) -> Result<Quote, Invalid> {
        if !is_valid_symbol(&q.sym) {
            return Err(Invalid::Symbol(q.sym));
        }
        if !finite(&[q.bp, q.bs, q.ap, q.as_]) {
            return Err(Invalid::Number("Q"));
        }
        Ok(Quote {
            sym: q.sym,
            bid: q.bp,
            bid_size: q.bs * self.quote_size_multiplier,
            ask: q.ap,
            ask_size: q.as_ * self.quote_size_multiplier,
            ts: q.t,
            bid_exchange: q.bx,
            ask_exchange: q.ax,
            seq: q.q,
            src: self.src.clone(),
        })
    }

    /// A closed bar. Massive does not send a bar's trade count, only its average trade
    /// size `z`, so `trades` is estimated as `round(v / z)` (0 when `z` is absent).
    pub fn bar(&self, a: WireAgg, interval: Interval) -> Result<Candle, Invalid> {
        if !is_valid_symbol(&a.sym) {
            return Err(Invalid::Symbol(a.sym));
        }
        let ev = match interval {
            Interval::OneSecond => "A",
            Interval::OneMinute => "AM",
        };
        if !finite(&[a.o, a.h, a.l, a.c, a.v]) {
            return Err(Invalid::Number(ev));
        }
        if a.e - a.s != interval.millis() {
            return Err(Invalid::Window(a.s, a.e));
        }
        let trades = match a.z {
            Some(z) if z > 0.0 && z.is_finite() => (a.v / z).round() as u64,
            _ => 0,
        };
        Ok(Candle {
            sym: a.sym,
            interval,
            start: a.s,
            end: a.e,
            open: a.o,
            high: a.h,
            low: a.l,
            close: a.c,
            volume: a.v,
            vwap: a.vw.filter(|v| v.is_finite()).unwrap_or(a.c),
            trades,
            forming: false,
            src: self.src.clone(),
            correction: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(mult: f64) -> Normaliser {
        Normaliser { src: "massive".into(), quote_size_multiplier: mult }
    }

    #[test]
    fn a_mixed_batch_keeps_good_events_around_bad_ones() {
        let frame = r#"[
            {"ev":"T","sym":"MSFT","x":4,"i":"12345","z":3,"p":114.125,"s":100,"c":[0,12],"t":1536036818784,"q":3681328},
            {"ev":"Q","sym":"MSFT","bx":4,"bp":114.125,"bs":100,"ax":7,"ap":114.128,"as":160,"c":0,"i":[604],"t":1536036818784,"q":50385480,"z":3},
            {"ev":"T","sym":"MSFT","p":"oops"},
            {"ev":"LULD","T":"MSFT","h":1,"l":2},
            {"ev":"AM","sym":"GTE","v":4110,"av":9470157,"op":0.4372,"vw":0.4488,"o":0.4488,"c":0.4486,"h":0.4489,"l":0.4486,"a":0.4352,"z":685,"s":1610144640000,"e":1610144700000},
            {"ev":"status","status":"success","message":"subscribed to: T.MSFT"}
        ]"#;
        let events = parse_frame(frame).unwrap();
        assert_eq!(events.len(), 6);
        let Ok(Event::Trade(t)) = &events[0] else { panic!("{:?}", events[0]) };
        assert_eq!((t.sym.as_str(), t.p, t.i.as_deref()), ("MSFT", 114.125, Some("12345")));
        assert!(matches!(events[1], Ok(Event::Quote(_))));
        assert!(events[2].is_err());
        assert_eq!(events[3].as_ref().unwrap(), &Event::Other);
        assert!(matches!(events[4], Ok(Event::Minute(_))));
        let Ok(Event::Status(s)) = &events[5] else { panic!() };
        assert_eq!(s.status, "success");
    }

    #[test]
    fn a_frame_that_is_not_json_is_an_error() {
        assert!(parse_frame("not json").is_err());
        assert!(parse_frame("[{\"ev\":\"T\"").is_err());
        assert_eq!(parse_frame("[]").unwrap().len(), 0);
        assert_eq!(parse_frame(r#"{"ev":"status","status":"connected"}"#).unwrap().len(), 1);
    }

    #[test]
    fn stock_quote_sizes_are_round_lots() {
        let Ok(Event::Quote(q)) = serde_json::from_str::<Event>(
            r#"{"ev":"Q","sym":"MSFT","bx":4,"bp":114.125,"bs":2,"ax":7,"ap":114.128,"as":3,"t":1,"q":5}"#,
        ) else {
            panic!()
        };
        let q = n(100.0).quote(q).unwrap();
        assert_eq!(
            (q.bid_size, q.ask_size, q.bid_exchange, q.seq),
            (200.0, 300.0, Some(4), Some(5))
        );
        assert_eq!(q.src, "massive");
    }

    #[test]
    fn option_events_keep_their_symbol() {
        let Ok(Event::Trade(t)) = serde_json::from_str::<Event>(
            r#"{"ev":"T","sym":"O:AMC210827C00037000","x":65,"p":1.54,"s":1,"c":[233],"t":1629820676333,"q":651921857}"#,
        ) else {
            panic!()
        };
        let t = n(1.0).trade(t).unwrap();
        assert_eq!(t.sym, "O:AMC210827C00037000");
        assert_eq!((t.conditions.as_slice(), t.id.as_deref()), (&[233][..], None));
        let Ok(Event::Quote(q)) = serde_json::from_str::<Event>(
            r#"{"ev":"Q","sym":"O:SPY241220P00720000","bx":302,"ax":302,"bp":9.71,"ap":9.81,"bs":17,"as":24,"t":1644506128351,"q":844090872}"#,
        ) else {
            panic!()
        };
        assert_eq!(n(1.0).quote(q).unwrap().bid_size, 17.0);
    }

    #[test]
    fn bars_become_closed_candles() {
        let Ok(Event::Second(a)) = serde_json::from_str::<Event>(
            r#"{"ev":"A","sym":"SPCE","v":200,"av":8642007,"op":25.66,"vw":25.3981,"o":25.39,"c":25.39,"h":25.39,"l":25.39,"a":25.3714,"z":50,"s":1610144868000,"e":1610144869000}"#,
        ) else {
            panic!()
        };
        let c = n(100.0).bar(a, Interval::OneSecond).unwrap();
        assert_eq!((c.start, c.end, c.trades, c.vwap), (1610144868000, 1610144869000, 4, 25.3981));
        assert!(!c.forming && !c.correction);
        assert_eq!(c.src, "massive");

        let wrong = WireAgg {
            sym: "X".into(),
            o: 1.0,
            h: 1.0,
            l: 1.0,
            c: 1.0,
            v: 1.0,
            s: 0,
            e: 1_000,
            vw: None,
            z: None,
        };
        assert_eq!(n(1.0).bar(wrong, Interval::OneMinute), Err(Invalid::Window(0, 1_000)));
    }

    #[test]
    fn unusable_values_are_refused() {
        let t = WireTrade {
            sym: "BAD SYM".into(),
            p: 1.0,
            s: 1.0,
            t: 0,
            x: None,
            i: None,
            c: None,
            q: None,
        };
        assert!(matches!(n(1.0).trade(t), Err(Invalid::Symbol(_))));
        let Ok(Event::Trade(t)) =
            serde_json::from_str::<Event>(r#"{"ev":"T","sym":"A","p":-1,"s":1,"t":0,"i":7}"#)
        else {
            panic!()
        };
        assert_eq!(t.i.as_deref(), Some("7"));
        assert_eq!(n(1.0).trade(t), Err(Invalid::Number("T")));
    }
}
