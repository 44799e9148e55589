//! Binance spot market streams: combined streams at `/stream` (events wrapped as
//! `{"stream":..,"data":..}`, initial streams from `?streams=a/b`) and raw streams at
//! `/ws`; `SUBSCRIBE` / `UNSUBSCRIBE` / `LIST_SUBSCRIPTIONS` answered `{"result":..,"id":..}`;
//! `@trade` and `@bookTicker` events with string prices; a server ping every
//! [`SimOptions::ping_interval`] and a disconnect when the pong is late; and, like Binance,
//! a disconnect for a client sending more than [`SimOptions::max_incoming_per_sec`]
//! messages per second.
//!
//! [`SimOptions::ping_interval`]: super::SimOptions::ping_interval
//! [`SimOptions::max_incoming_per_sec`]: super::SimOptions::max_incoming_per_sec

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use rand::seq::IndexedRandom;
use serde_json::{Value, json};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;

use super::{Command, Prices, SimState, SimWs, send_all};
use crate::feed::now_ms;

const TICK: Duration = Duration::from_millis(50);

/// Serves one Binance client.
pub(crate) async fn serve(ws: SimWs, path: &str, query: &str, state: Arc<SimState>) {
    let (id, mut commands) = state.register(path);
    state.update(id, |c| c.authenticated = true);
    let combined = path.starts_with("/stream");
    let mut subs: BTreeSet<String> = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("streams="))
        .map(|s| s.split('/').filter(|s| !s.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default();
    let (mut tx, mut rx) = ws.split();
    let mut prices = Prices::default();
    let mut data = tokio::time::interval(TICK);
    data.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut ping = tokio::time::interval(state.opts.ping_interval);
    ping.reset();
    let mut pong_due: Option<Instant> = None;
    let mut window = (Instant::now(), 0u32);
    let mut stall = state.stall_watch();
    let (mut credit, mut trade_id, mut update_id) = (0.0, 0u64, 0u64);
    let share = |subs: &BTreeSet<String>| {
        let subs = subs.clone();
        state.update(id, |c| c.subscriptions = subs);
    };
    share(&subs);
    loop {
        let out: Vec<Message> = tokio::select! {
            msg = rx.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    let now = Instant::now();
                    if now.duration_since(window.0) >= Duration::from_secs(1) {
                        window = (now, 0);
                    }
                    window.1 += 1;
                    if window.1 > state.opts.max_incoming_per_sec {
                        state.count("rate_limited");
                        tracing::info!(conn = id, "simulator: too many messages per second, disconnecting");
                        let _ = tx.close().await;
                        break;
                    }
                    let reply = on_request(id, &mut subs, &text);
                    share(&subs);
                    vec![Message::text(reply.to_string())]
                }
                Some(Ok(Message::Pong(_))) => {
                    pong_due = None;
                    Vec::new()
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => Vec::new(),
            },
            _ = ping.tick() => {
                if pong_due.is_none() {
                    pong_due = Some(Instant::now() + state.opts.pong_timeout);
                }
                vec![Message::Ping(b"sim".to_vec().into())]
            }
            () = crate::link::sleep_until_opt(pong_due) => {
                state.count("pong_timeouts");
                tracing::info!(conn = id, "simulator: no pong in time, disconnecting");
                break;
            }
            _ = data.tick() => {
                credit += state.opts.rate * TICK.as_secs_f64();
                let n = credit.floor() as usize;
                credit -= n as f64;
                let n = if state.is_silent() { 0 } else { n };
                events(&subs, n, &mut prices, &mut trade_id, &mut update_id)
                    .into_iter()
                    .map(|(stream, data)| {
                        if state.next_frame_malformed().is_some() {
                            return Message::text("{\"stream\":");
                        }
                        let v = if combined { json!({"stream": stream, "data": data}) } else { data };
                        Message::text(v.to_string())
                    })
                    .collect()
            }
            cmd = commands.recv() => match cmd {
                Some(Command::Disconnect(_)) => {
                    let _ = tx.close().await;
                    break;
                }
                Some(Command::Drop) | None => break,
            },
            _ = stall.changed() => {
                if state.is_stalled(id) {
                    state.stalled(id).await;
                }
                Vec::new()
            }
        };
        if !send_all(&mut tx, out).await {
            break;
        }
    }
    state.unregister(id);
}

fn on_request(id: u64, subs: &mut BTreeSet<String>, text: &str) -> Value {
    let Ok(req) = serde_json::from_str::<Value>(text) else {
        return json!({"code": 3, "msg": "Invalid JSON", "id": null});
    };
    let req_id = req.get("id").cloned().unwrap_or(Value::Null);
    let params: Vec<String> = req
        .get("params")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default();
    match req.get("method").and_then(Value::as_str) {
        Some("SUBSCRIBE") => {
            for p in params {
                tracing::info!(conn = id, stream = p, "simulator: subscribe");
                subs.insert(p);
            }
            json!({"result": null, "id": req_id})
        }
        Some("UNSUBSCRIBE") => {
            for p in params {
                tracing::info!(conn = id, stream = p, "simulator: unsubscribe");
                subs.remove(&p);
            }
            json!({"result": null, "id": req_id})
        }
        Some("LIST_SUBSCRIPTIONS") => {
            json!({"result": subs.iter().collect::<Vec<_>>(), "id": req_id})
        }
        _ => json!({"code": 2, "msg": "Invalid request", "id": req_id}),
    }
}

/// `n` events for the subscribed `@trade` and `@bookTicker` streams: `(stream, payload)`.
fn events(
    subs: &BTreeSet<String>,
    n: usize,
    prices: &mut Prices,
    trade_id: &mut u64,
    update_id: &mut u64,
) -> Vec<(String, Value)> {
    let streams: Vec<&String> =
        subs.iter().filter(|s| s.ends_with("@trade") || s.ends_with("@bookTicker")).collect();
    if streams.is_empty() {
        return Vec::new();
    }
    let mut rng = rand::rng();
    (0..n)
        .map(|_| {
            let stream = *streams.choose(&mut rng).expect("non-empty");
            let (sym, kind) = stream.split_once('@').expect("filtered");
            let sym_upper = sym.to_uppercase();
            let price = prices.next(&sym_upper);
            let now = now_ms();
            let data = if kind == "trade" {
                *trade_id += 1;
                json!({"e":"trade","E":now,"s":sym_upper,"t":*trade_id,"p":format!("{price:.2}"),
                       "q":format!("{:.5}", rng.random_range(0.001..2.0)),"T":now,"m":rng.random_bool(0.5),"M":true})
            } else {
                *update_id += 1;
                json!({"u":*update_id,"s":sym_upper,"b":format!("{price:.2}"),"B":format!("{:.5}", rng.random_range(0.1..5.0)),
                       "a":format!("{:.2}", price + 0.01),"A":format!("{:.5}", rng.random_range(0.1..5.0))})
            };
            (stream.clone(), data)
        })
        .collect()
}
