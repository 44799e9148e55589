//! Massive's REST aggregates, for candle backfill:
//! `GET {rest_url}/v2/aggs/ticker/{ticker}/range/1/{second|minute}/{from}/{to}` with
//! `sort=desc&limit=N&apiKey=KEY`, answered with `{"status":"OK","results":[{"o","h","l",
//! "c","v","vw","n","t"}]}` where `t` is the window start in Unix ms.
//!
//! Asking for the newest `N` bars of a generous range (a week of minutes, four days of
//! seconds) returns the latest session's bars even on a weekend or before the open.

use std::time::Duration;

use serde::Deserialize;

use crate::backfill::{Backfill, BarsFuture, closed_bars};
use crate::market::{Candle, Interval};

use super::SRC_MASSIVE;

/// Massive's REST base URL.
pub const DEFAULT_REST_URL: &str = "https://api.massive.com";

/// The REST base for a feed whose WebSocket is `ws_url` and whose `rest_url` is unset:
/// Massive's API for Massive's (and Polygon's) hosts; for any other host, a local simulator
/// or a relay, the same host and port over `http` (`ws://`) or `https` (`wss://`), which is
/// where `ferrocast simulate massive` serves it.
pub fn default_rest_url(ws_url: &str) -> String {
    let Ok(url) = url::Url::parse(ws_url) else { return DEFAULT_REST_URL.to_owned() };
    let host = url.host_str().unwrap_or_default();
    let upstream = ["massive.com", "polygon.io"]
        .iter()
        .any(|d| host == *d || host.ends_with(&format!(".{d}")));
    if upstream || host.is_empty() {
        return DEFAULT_REST_URL.to_owned();
    }
    let scheme = if url.scheme() == "wss" { "https" } else { "http" };
    match url.port() {
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    }
}

/// Deadline of one backfill request, connecting included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest response accepted (50,000 bars are about 5 MB).
const MAX_BODY: usize = 16 * 1024 * 1024;

/// The aggregates URL for the newest `count` bars of `sym` before `now_ms`.
pub fn aggs_url(
    base: &str,
    sym: &str,
    interval: Interval,
    count: usize,
    now_ms: i64,
    key: &str,
) -> String {
    let (timespan, lookback_ms) = match interval {
        Interval::OneSecond => ("second", 4 * 86_400_000),
        Interval::OneMinute => ("minute", 7 * 86_400_000),
    };
    let (from, to) = ((now_ms - lookback_ms).to_string(), now_ms.to_string());
    let count = count.to_string();
    let Ok(mut url) = url::Url::parse(base) else { return base.to_owned() };
    if let Ok(mut path) = url.path_segments_mut() {
        // The url crate percent-encodes what a path segment cannot hold; `O:SPY…` stays as is.
        path.pop_if_empty()
            .extend(["v2", "aggs", "ticker", sym, "range", "1", timespan, &from, &to]);
    }
    url.query_pairs_mut()
        .append_pair("adjusted", "true")
        .append_pair("sort", "desc")
        .append_pair("limit", &count)
        .append_pair("apiKey", key);
    url.into()
}

#[derive(Deserialize)]
struct AggsResponse {
    #[serde(default)]
    status: String,
    #[serde(default)]
    results: Vec<Agg>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
struct Agg {
    o: f64,
    h: f64,
    l: f64,
    c: f64,
    #[serde(default)]
    v: f64,
    #[serde(default)]
    vw: Option<f64>,
    #[serde(default)]
    n: Option<u64>,
    t: i64,
}

/// The closed bars of an aggregates response, oldest first, at most `count`. `status` is the
/// HTTP status; anything but a 200 with `status` `OK` (or `DELAYED`) is an error carrying
/// Massive's message.
pub fn parse_aggs(
    status: u16,
    body: &[u8],
    sym: &str,
    interval: Interval,
    count: usize,
    now_ms: i64,
) -> Result<Vec<Candle>, String> {
    let parsed: Result<AggsResponse, _> = serde_json::from_slice(body);
    let reason = |r: &AggsResponse| r.error.clone().or(r.message.clone()).unwrap_or_default();
    let resp = match parsed {
        Ok(r) if status == 200 && matches!(r.status.as_str(), "OK" | "DELAYED") => r,
        Ok(r) => return Err(format!("HTTP {status}, status {:?}: {}", r.status, reason(&r))),
        Err(e) if status == 200 => return Err(format!("unreadable aggregates: {e}")),
        Err(_) => {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return Err(format!("HTTP {status}: {text}"));
        }
    };
    let bars = resp
        .results
        .into_iter()
        .filter(|a| [a.o, a.h, a.l, a.c, a.v].iter().all(|x| x.is_finite()))
        .map(|a| Candle {
            sym: sym.to_owned(),
            interval,
            start: a.t,
            end: a.t + interval.millis(),
            open: a.o,
            high: a.h,
            low: a.l,
            close: a.c,
            volume: a.v,
            vwap: a.vw.filter(|v| v.is_finite()).unwrap_or(a.c),
            trades: a.n.unwrap_or(0),
            forming: false,
            src: SRC_MASSIVE.to_owned(),
            correction: false,
        })
        .collect();
    Ok(closed_bars(bars, interval, count, now_ms))
}

/// Backfill from Massive's REST API.
#[derive(Clone)]
pub struct RestBackfill {
    /// Base URL (`https://api.massive.com`).
    pub base: String,
    /// The API key.
    pub key: String,
}

impl std::fmt::Debug for RestBackfill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestBackfill").field("base", &self.base).finish_non_exhaustive()
    }
}

impl Backfill for RestBackfill {
    fn bars(&self, sym: &str, interval: Interval, count: usize, now_ms: i64) -> BarsFuture {
        let url = aggs_url(&self.base, sym, interval, count, now_ms, &self.key);
        let sym = sym.to_owned();
        Box::pin(async move {
            let resp = crate::http::get(&url, REQUEST_TIMEOUT, MAX_BODY).await?;
            parse_aggs(resp.status, &resp.body, &sym, interval, count, now_ms)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_760_000_123_456;

    #[test]
    fn rest_defaults_to_massive_or_the_websocket_s_host() {
        assert_eq!(default_rest_url("wss://socket.massive.com/stocks"), DEFAULT_REST_URL);
        assert_eq!(default_rest_url("wss://delayed.massive.com/options"), DEFAULT_REST_URL);
        assert_eq!(default_rest_url("wss://socket.polygon.io/stocks"), DEFAULT_REST_URL);
        assert_eq!(default_rest_url("ws://127.0.0.1:9100/stocks"), "http://127.0.0.1:9100");
        assert_eq!(default_rest_url("wss://relay.example/stocks"), "https://relay.example");
    }

    #[test]
    fn url_asks_for_the_newest_bars() {
        let u =
            aggs_url("https://api.massive.com/", "O:SPY/1", Interval::OneMinute, 300, NOW, "k&y");
        assert_eq!(
            u,
            format!(
                "https://api.massive.com/v2/aggs/ticker/O:SPY%2F1/range/1/minute/{}/{NOW}?adjusted=true&sort=desc&limit=300&apiKey=k%26y",
                NOW - 7 * 86_400_000
            )
        );
        let prefixed =
            aggs_url("http://relay.example/massive", "AAPL", Interval::OneMinute, 1, NOW, "k");
        assert!(
            prefixed.starts_with("http://relay.example/massive/v2/aggs/ticker/AAPL/"),
            "{prefixed}"
        );
        assert!(
            aggs_url("http://h", "A", Interval::OneSecond, 5, NOW, "k")
                .contains("/range/1/second/")
        );
    }

    #[test]
    fn parses_results_newest_first_into_closed_bars() {
        let t = Interval::OneMinute.window_start(NOW);
        let body = format!(
            r#"{{"ticker":"AAPL","status":"OK","resultsCount":3,"results":[
                {{"o":2,"h":3,"l":1,"c":2.5,"v":100,"vw":2.2,"n":4,"t":{t}}},
                {{"o":1,"h":2,"l":0.5,"c":1.5,"v":50,"vw":1.1,"n":2,"t":{}}},
                {{"o":1,"h":1,"l":1,"c":1,"v":10,"t":{}}}]}}"#,
            t - 60_000,
            t - 120_000
        );
        let bars = parse_aggs(200, body.as_bytes(), "AAPL", Interval::OneMinute, 300, NOW).unwrap();
        // The window containing NOW is still forming: left out.
        assert_eq!(bars.len(), 2);
        assert_eq!((bars[0].start, bars[1].start), (t - 120_000, t - 60_000));
        let b = &bars[1];
        assert_eq!(
            (b.open, b.high, b.low, b.close, b.volume, b.vwap, b.trades),
            (1.0, 2.0, 0.5, 1.5, 50.0, 1.1, 2)
        );
        assert_eq!((b.end, b.src.as_str(), b.forming), (t, "massive", false));
        assert_eq!(bars[0].vwap, 1.0, "no vw: the close");

        let one = parse_aggs(200, body.as_bytes(), "AAPL", Interval::OneMinute, 1, NOW).unwrap();
        assert_eq!(one[0].start, t - 60_000, "the newest are kept");
        let empty = parse_aggs(
            200,
            br#"{"status":"OK","resultsCount":0}"#,
            "A",
            Interval::OneSecond,
            5,
            NOW,
        );
        assert_eq!(empty.unwrap(), vec![]);
    }

    #[test]
    fn errors_carry_massive_s_message() {
        let e = parse_aggs(
            401,
            br#"{"status":"ERROR","error":"Unknown API Key"}"#,
            "A",
            Interval::OneMinute,
            5,
            NOW,
        )
        .unwrap_err();
        assert!(e.contains("401") && e.contains("Unknown API Key"), "{e}");
        let e = parse_aggs(502, b"<html>bad gateway</html>", "A", Interval::OneMinute, 5, NOW)
            .unwrap_err();
        assert!(e.contains("502") && e.contains("bad gateway"), "{e}");
        let e = parse_aggs(200, b"not json", "A", Interval::OneMinute, 5, NOW).unwrap_err();
        assert!(e.contains("unreadable"), "{e}");
    }
}
