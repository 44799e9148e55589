//! A Massive (Polygon) WebSocket cluster: `connected` on open, `auth` with one accepted key,
//! `subscribe`/`unsubscribe` with one `success` status per param (as Massive's own mock
//! server answers), batched arrays of mixed `T`/`Q` events for subscribed symbols only,
//! `A` bars every second and `AM` bars every [`SimOptions::minute_bar_every`],
//! `max_connections` eviction in both modes, `auth_timeout`, the options rules (no `Q.*`,
//! at most 1,000 contracts with quotes), and the test controls of [`super`]. On the same
//! port it answers Massive's REST aggregates request ([`aggregates`]) with generated bars,
//! for candle backfill.
//!
//! [`SimOptions::minute_bar_every`]: super::SimOptions::minute_bar_every

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use rand::seq::IndexedRandom;
use serde_json::{Value, json};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::{Command, Eviction, Prices, SimState, SimWs, send_all};
use crate::feed::now_ms;
use crate::massive::OPTIONS_QUOTE_LIMIT;

/// Symbols that a `*` subscription streams, per cluster.
const STOCK_SYMBOLS: [&str; 5] = ["AAPL", "MSFT", "NVDA", "TSLA", "SPY"];
const OPTION_SYMBOLS: [&str; 3] =
    ["O:SPY241220P00720000", "O:TSLA230616C00150000", "O:AAPL250117C00200000"];
/// Largest batch in one frame.
const MAX_BATCH: usize = 100;
/// Data pacing tick.
const TICK: Duration = Duration::from_millis(50);

fn status(status: &str, message: &str) -> Message {
    Message::text(json!([{"ev": "status", "status": status, "message": message}]).to_string())
}

/// Per-connection session state.
struct Session {
    id: u64,
    options: bool,
    authenticated: bool,
    subs: BTreeSet<String>,
    prices: Prices,
    seq: u64,
}

/// Serves one Massive client.
pub(crate) async fn serve(ws: SimWs, path: &str, state: Arc<SimState>) {
    let (id, mut commands) = state.register(path);
    let (mut tx, mut rx) = ws.split();
    let mut s = Session {
        id,
        options: path.trim_start_matches('/').starts_with("options"),
        authenticated: false,
        subs: BTreeSet::new(),
        prices: Prices::default(),
        seq: 0,
    };
    let opened = Instant::now();
    if tx.send(status("connected", "Connected Successfully")).await.is_err() {
        state.unregister(id);
        return;
    }
    let mut data = tokio::time::interval(TICK);
    data.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut second_bars = tokio::time::interval(Duration::from_secs(1));
    let mut minute_bars = tokio::time::interval(state.opts.minute_bar_every);
    for t in [&mut second_bars, &mut minute_bars] {
        t.set_missed_tick_behavior(MissedTickBehavior::Skip);
        t.reset();
    }
    let mut stall = state.stall_watch();
    let stall_at = state.opts.stall_after.map(|d| opened + d);
    let mut credit = 0.0;
    loop {
        let out: Vec<Message> = tokio::select! {
            msg = rx.next() => match msg {
                Some(Ok(Message::Text(text))) => match on_request(&mut s, &state, &text) {
                    Reply::Frames(frames) => frames,
                    Reply::Close(frames) => {
                        for f in frames {
                            let _ = tx.send(f).await;
                        }
                        let _ = tx.close().await;
                        break;
                    }
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => Vec::new(),
            },
            () = tokio::time::sleep_until(opened + state.opts.auth_timeout), if !s.authenticated => {
                let _ = tx.send(status("auth_timeout", "No authentication request received.")).await;
                let _ = tx.close().await;
                break;
            }
            _ = data.tick(), if s.authenticated => {
                credit += state.opts.rate * TICK.as_secs_f64();
                let n = credit.floor() as usize;
                credit -= n as f64;
                if state.is_silent() { Vec::new() } else { data_frames(&mut s, &state, n) }
            }
            _ = second_bars.tick(), if s.authenticated && !state.is_silent() => bar_frame(&mut s, "A", 1_000).into_iter().collect(),
            _ = minute_bars.tick(), if s.authenticated && !state.is_silent() => bar_frame(&mut s, "AM", 60_000).into_iter().collect(),
            cmd = commands.recv() => match cmd {
                Some(Command::Disconnect(st)) => {
                    state.count("disconnects_sent");
                    let _ = tx.send(status(&st, &format!("simulated {st}"))).await;
                    let _ = tx.close().await;
                    break;
                }
                Some(Command::Drop) | None => break,
            },
            _ = stall.changed() => {
                if state.is_stalled(id) {
                    tracing::info!(conn = id, "simulator: connection stalled");
                    state.stalled(id).await;
                }
                Vec::new()
            }
            () = crate::link::sleep_until_opt(stall_at) => {
                tracing::info!(conn = id, "simulator: connection stalled (stall_after)");
                tokio::time::sleep(Duration::from_secs(600)).await;
                break;
            }
        };
        if !send_all(&mut tx, out).await {
            break;
        }
    }
    state.unregister(id);
    tracing::info!(conn = id, "simulator: connection closed");
}

enum Reply {
    Frames(Vec<Message>),
    Close(Vec<Message>),
}

fn on_request(s: &mut Session, state: &SimState, text: &str) -> Reply {
    let Ok(req) = serde_json::from_str::<Value>(text) else {
        return Reply::Frames(vec![status("error", "invalid JSON")]);
    };
    let action = req.get("action").and_then(Value::as_str).unwrap_or_default();
    let params = req.get("params").and_then(Value::as_str).unwrap_or_default();
    match action {
        "auth" => auth(s, state, params),
        "subscribe" | "unsubscribe" if !s.authenticated => {
            Reply::Frames(vec![status("auth_required", "authentication required")])
        }
        "subscribe" => Reply::Frames(subscribe(s, state, params)),
        "unsubscribe" => {
            let mut frames = Vec::new();
            for param in params.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                s.subs.remove(param);
                tracing::info!(conn = s.id, param, "simulator: unsubscribe");
                frames.push(status("success", &format!("unsubscribed to: {param}")));
            }
            let subs = s.subs.clone();
            state.update(s.id, |c| c.subscriptions = subs);
            Reply::Frames(frames)
        }
        other => Reply::Frames(vec![status("error", &format!("unknown action {other:?}"))]),
    }
}

fn auth(s: &mut Session, state: &SimState, key: &str) -> Reply {
    let accepted = match &state.opts.api_key {
        Some(expected) => key == expected,
        None => !key.is_empty(),
    };
    if !accepted {
        state.count("auth_failed");
        tracing::info!(conn = s.id, "simulator: auth failed");
        return Reply::Close(vec![status("auth_failed", "authentication failed")]);
    }
    state.count("auth_ok");
    s.authenticated = true;
    let path = state.connections().into_iter().find(|c| c.id == s.id).map(|c| c.path);
    state.update(s.id, |c| {
        c.authenticated = true;
        c.key = key.to_owned();
    });
    tracing::info!(conn = s.id, "simulator: authenticated");
    let ok = status("auth_success", "authenticated");
    // One connection per key and cluster (configurable): evict the oldest or the newest.
    let mut peers: Vec<u64> = state
        .connections()
        .into_iter()
        .filter(|c| c.authenticated && c.key == key && Some(&c.path) == path.as_ref())
        .map(|c| c.id)
        .collect();
    peers.sort_unstable();
    if peers.len() <= state.opts.max_connections {
        return Reply::Frames(vec![ok]);
    }
    state.count("evicted");
    match state.opts.eviction {
        Eviction::Old => {
            let oldest = peers[0];
            tracing::info!(
                conn = oldest,
                "simulator: evicting the older connection (max_connections)"
            );
            state.send_command(oldest, Command::Disconnect("max_connections".into()));
            Reply::Frames(vec![ok])
        }
        Eviction::New => {
            tracing::info!(conn = s.id, "simulator: evicting the new connection (max_connections)");
            Reply::Close(vec![
                ok,
                status("max_connections", "Maximum number of websocket connections exceeded."),
                Message::Close(Some(CloseFrame {
                    code: CloseCode::Policy,
                    reason: "max_connections".into(),
                })),
            ])
        }
    }
}

fn subscribe(s: &mut Session, state: &SimState, params: &str) -> Vec<Message> {
    let mut frames = Vec::new();
    for param in params.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((ev, sym)) = param.split_once('.') else {
            frames.push(status("error", &format!("invalid subscription {param:?}")));
            continue;
        };
        if s.options && ev == "Q" {
            if sym == "*" {
                frames.push(status(
                    "error",
                    "wildcard subscriptions are not allowed for options quotes",
                ));
                continue;
            }
            let quotes = s.subs.iter().filter(|p| p.starts_with("Q.")).count();
            if !s.subs.contains(param) && quotes >= OPTIONS_QUOTE_LIMIT {
                state.count("quote_limit_refused");
                frames.push(status(
                    "error",
                    &format!("maximum of {OPTIONS_QUOTE_LIMIT} option contracts with quotes per connection exceeded"),
                ));
                continue;
            }
        }
        s.subs.insert(param.to_owned());
        state.count("subscribes");
        tracing::info!(conn = s.id, param, "simulator: subscribe");
        frames.push(status("success", &format!("subscribed to: {param}")));
    }
    let subs = s.subs.clone();
    state.update(s.id, |c| c.subscriptions = subs);
    frames
}

/// `(ev, sym)` pairs a subscription set streams, wildcards expanded.
fn streams(s: &Session, events: &[&str]) -> Vec<(String, String)> {
    let all: &[&str] = if s.options { &OPTION_SYMBOLS } else { &STOCK_SYMBOLS };
    let mut out = BTreeSet::new();
    for param in &s.subs {
        let Some((ev, sym)) = param.split_once('.') else { continue };
        if !events.contains(&ev) {
            continue;
        }
        if sym == "*" {
            out.extend(all.iter().map(|a| (ev.to_owned(), (*a).to_owned())));
        } else {
            out.insert((ev.to_owned(), sym.to_owned()));
        }
    }
    out.into_iter().collect()
}

/// `n` trade/quote events for subscribed symbols, batched into frames.
fn data_frames(s: &mut Session, state: &SimState, n: usize) -> Vec<Message> {
    let pairs = streams(s, &["T", "Q"]);
    if pairs.is_empty() || n == 0 {
        return Vec::new();
    }
    let mut rng = rand::rng();
    let now = now_ms();
    let events: Vec<Value> = (0..n)
        .map(|_| {
            let (ev, sym) = pairs.choose(&mut rng).expect("non-empty");
            s.seq += 1;
            let price = s.prices.next(sym);
            if ev == "T" {
                let mut t = json!({"ev":"T","sym":sym,"x":4,"p":price,"s":rng.random_range(1..10)*100,"c":[0],"t":now,"q":s.seq});
                if !s.options {
                    t["i"] = json!(s.seq.to_string());
                    t["z"] = json!(3);
                }
                t
            } else {
                json!({"ev":"Q","sym":sym,"bx":12,"bp":price,"bs":rng.random_range(1..20),"ax":11,"ap":((price + 0.01) * 100.0).round() / 100.0,"as":rng.random_range(1..20),"t":now,"q":s.seq})
            }
        })
        .collect();
    events
        .chunks(MAX_BATCH)
        .map(|batch| match state.next_frame_malformed() {
            Some(k) => malformed(k, batch),
            None => Message::text(Value::from(batch.to_vec()).to_string()),
        })
        .collect()
}

/// A malformed frame, cycling through the kinds a connector must survive: not JSON at
/// all; a batch with one element of the wrong shape; a batch with an unknown event type.
/// The last two keep the real events, which must still be published.
fn malformed(k: u64, batch: &[Value]) -> Message {
    let mut events = batch.to_vec();
    match k % 3 {
        1 => return Message::text("[{\"ev\":\"T\",\"sym\":\"AAPL\",\"p\":"),
        2 => events.insert(0, json!({"ev":"T","sym":"AAPL","p":"not a number"})),
        _ => events.insert(0, json!({"ev":"XQ","sym":"AAPL","mystery":true})),
    }
    Message::text(Value::from(events).to_string())
}

/// One bar per subscribed symbol for the window that just ended.
fn bar_frame(s: &mut Session, ev: &str, window_ms: i64) -> Option<Message> {
    let pairs = streams(s, &[ev]);
    if pairs.is_empty() {
        return None;
    }
    let end = now_ms() / window_ms * window_ms;
    let start = end - window_ms;
    let bars: Vec<Value> = pairs
        .iter()
        .map(|(_, sym)| {
            let (o, c) = (s.prices.next(sym), s.prices.next(sym));
            let (h, l) = (o.max(c) + 0.01, (o.min(c) - 0.01).max(0.01));
            json!({"ev":ev,"sym":sym,"v":500,"av":100000,"op":o,"vw":((o + c) / 2.0 * 100.0).round() / 100.0,
                   "o":o,"c":c,"h":h,"l":l,"a":o,"z":100,"s":start,"e":end})
        })
        .collect();
    Some(Message::text(Value::from(bars).to_string()))
}

/// Massive's REST aggregates, `GET /v2/aggs/ticker/SYM/range/1/{second|minute}/FROM/TO`
/// with `apiKey` (checked like the WebSocket's key), `limit` (default 5000, at most 50000)
/// and `sort` (`asc` default, or `desc`). `FROM` and `TO` are Unix ms. The bars are a random
/// walk ending at the symbol's starting price (where the WebSocket's prices start), one per
/// window up to the last closed window before `min(TO, now)` and not before `FROM`. Other
/// multipliers, timespans and date-formatted bounds answer 400.
pub(crate) fn aggregates(state: &SimState, target: &str) -> (&'static str, String) {
    let error = |status: &'static str, message: &str| {
        (status, json!({"status": "ERROR", "request_id": "sim", "error": message}).to_string())
    };
    let key = super::query_param(target, "apiKey").unwrap_or("");
    let key_ok = match &state.opts.api_key {
        Some(expected) => key == expected,
        None => !key.is_empty(),
    };
    if !key_ok {
        state.count("rest_auth_failed");
        return error("401 Unauthorized", "Unknown API Key");
    }
    let path = target.split('?').next().unwrap_or("");
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let ["v2", "aggs", "ticker", ticker, "range", multiplier, timespan, from, to] = parts[..]
    else {
        return error(
            "400 Bad Request",
            "expected /v2/aggs/ticker/SYM/range/MULT/TIMESPAN/FROM/TO",
        );
    };
    let interval = match (multiplier, timespan) {
        ("1", "second") => crate::market::Interval::OneSecond,
        ("1", "minute") => crate::market::Interval::OneMinute,
        _ => {
            return error(
                "400 Bad Request",
                "the simulator serves multiplier 1, timespan second or minute",
            );
        }
    };
    let (Ok(from), Ok(to)) = (from.parse::<i64>(), to.parse::<i64>()) else {
        return error("400 Bad Request", "the simulator takes FROM and TO as Unix milliseconds");
    };
    let limit = match super::query_param(target, "limit").map(str::parse::<usize>) {
        None => 5_000,
        Some(Ok(n)) if (1..=50_000).contains(&n) => n,
        Some(_) => return error("400 Bad Request", "limit must be 1 to 50000"),
    };
    // Percent-decoded; a `+` in a path is itself, not a space.
    let sym: String =
        url::form_urlencoded::parse(format!("s={}", ticker.replace('+', "%2B")).as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
    let end = to.min(now_ms());
    let step = interval.millis();
    let newest_end = interval.window_start(end);
    let in_range = ((newest_end - from.max(0)) / step).max(0) as usize;
    let walk = crate::backfill::Walk {
        sym: &sym,
        interval,
        count: limit.min(in_range),
        now_ms: end,
        last_close: super::start_price(&sym),
        volatility: crate::backfill::bar_volatility(0.0005, step as f64 / 1000.0),
        src: "massive",
    };
    let mut bars = crate::backfill::random_walk(&walk, &mut rand::rng());
    if super::query_param(target, "sort") == Some("desc") {
        bars.reverse();
    }
    state.count("rest_aggs");
    let results: Vec<Value> = bars
        .iter()
        .map(|b| {
            json!({"o": b.open, "h": b.high, "l": b.low, "c": b.close, "v": b.volume,
                   "vw": b.vwap, "n": b.trades, "t": b.start})
        })
        .collect();
    tracing::info!(sym, interval = %interval, bars = results.len(), "simulator: REST aggregates");
    let body = json!({
        "ticker": sym, "adjusted": true, "queryCount": results.len(),
        "resultsCount": results.len(), "status": "OK", "request_id": "sim", "results": results,
    });
    ("200 OK", body.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::{Protocol, SimOptions};
    use super::*;
    use crate::market::Interval;
    use crate::massive::rest::{aggs_url, parse_aggs};

    fn sim() -> Arc<SimState> {
        SimState::new(
            Protocol::Massive,
            SimOptions { api_key: Some("k".into()), ..SimOptions::default() },
        )
    }

    /// The connector's own request, answered by the simulator and parsed by the connector.
    #[test]
    fn aggregates_answer_the_connector_s_request() {
        let state = sim();
        let now = now_ms();
        for interval in Interval::ALL {
            let url = aggs_url("http://sim", "AAPL", interval, 120, now, "k");
            let target = url.strip_prefix("http://sim").unwrap();
            let (status, body) = aggregates(&state, target);
            assert_eq!(status, "200 OK", "{body}");
            let bars = parse_aggs(200, body.as_bytes(), "AAPL", interval, 120, now).unwrap();
            assert_eq!(bars.len(), 120, "{interval}");
            let last = bars.last().unwrap();
            // The walk ends where the WebSocket's prices start.
            assert_eq!(last.close, (super::super::start_price("AAPL") * 100.0).round() / 100.0);
            assert!(last.end <= interval.window_start(now) + interval.millis());
            assert!(bars.windows(2).all(|w| w[1].start - w[0].start == interval.millis()));
        }
        assert_eq!(state.counter("rest_aggs"), 2);
        let url = aggs_url("http://sim", "O:SPY241220P00720000", Interval::OneMinute, 3, now, "k");
        let (_, body) = aggregates(&state, url.strip_prefix("http://sim").unwrap());
        assert!(body.contains(r#""ticker":"O:SPY241220P00720000""#), "{body}");
    }

    #[test]
    fn aggregates_check_the_key_and_the_request() {
        let state = sim();
        let (status, body) = aggregates(&state, "/v2/aggs/ticker/A/range/1/minute/0/1?apiKey=no");
        assert_eq!(status, "401 Unauthorized");
        assert!(body.contains("Unknown API Key"));
        assert_eq!(state.counter("rest_auth_failed"), 1);
        let bad = aggregates(&state, "/v2/aggs/ticker/A/range/5/minute/0/1?apiKey=k");
        assert_eq!(bad.0, "400 Bad Request");
        let dates =
            aggregates(&state, "/v2/aggs/ticker/A/range/1/minute/2024-01-01/2024-01-02?apiKey=k");
        assert_eq!(dates.0, "400 Bad Request");
        // A range in the distant past before FROM holds nothing.
        let (status, body) =
            aggregates(&state, "/v2/aggs/ticker/A/range/1/minute/100000/100000?apiKey=k");
        assert_eq!(status, "200 OK");
        assert!(body.contains("\"resultsCount\":0"), "{body}");
    }
}
