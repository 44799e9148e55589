//! The Coinbase Exchange WebSocket feed, `ticker` and `heartbeat` channels: a client must
//! subscribe within [`SimOptions::subscribe_timeout`] or is closed; `subscribe` /
//! `unsubscribe` take `product_ids` with channel names or `{"name","product_ids"}` objects
//! and are answered with a `subscriptions` message listing the full current set; each
//! heartbeat product gets a `heartbeat` every second and ticker products `ticker` messages
//! (string prices, RFC 3339 `time`, `sequence`, `trade_id`).
//!
//! [`SimOptions::subscribe_timeout`]: super::SimOptions::subscribe_timeout

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use rand::seq::IndexedRandom;
use serde_json::{Value, json};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;

use super::{Command, Prices, SimState, SimWs, rfc3339, send_all};
use crate::feed::now_ms;

const TICK: Duration = Duration::from_millis(50);

/// Serves one Coinbase client.
pub(crate) async fn serve(ws: SimWs, state: Arc<SimState>) {
    let (id, mut commands) = state.register("/");
    state.update(id, |c| c.authenticated = true);
    let (mut tx, mut rx) = ws.split();
    // (channel, product) pairs.
    let mut subs: BTreeSet<(String, String)> = BTreeSet::new();
    let mut subscribed_once = false;
    let opened = Instant::now();
    let mut prices = Prices::default();
    let mut data = tokio::time::interval(TICK);
    data.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
    heartbeat.reset();
    let mut stall = state.stall_watch();
    let mut credit = 0.0;
    let mut sequence: BTreeMap<String, u64> = BTreeMap::new();
    let mut trade_id = 0u64;
    loop {
        let out: Vec<Message> = tokio::select! {
            msg = rx.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    let reply = on_request(id, &mut subs, &text);
                    subscribed_once |= !subs.is_empty();
                    let shared = subs.iter().map(|(c, p)| format!("{c}:{p}")).collect();
                    state.update(id, |c| c.subscriptions = shared);
                    vec![Message::text(reply.to_string())]
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => Vec::new(),
            },
            () = tokio::time::sleep_until(opened + state.opts.subscribe_timeout), if !subscribed_once => {
                let msg = json!({"type":"error","message":"Failed to subscribe","reason":"subscribe within 5 seconds of connecting"});
                let _ = tx.send(Message::text(msg.to_string())).await;
                let _ = tx.close().await;
                break;
            }
            _ = heartbeat.tick() => subs
                .iter()
                .filter(|(c, _)| c == "heartbeat")
                .map(|(_, product)| {
                    let seq = sequence.get(product).copied().unwrap_or(0);
                    Message::text(json!({"type":"heartbeat","sequence":seq,"last_trade_id":trade_id,
                                         "product_id":product,"time":rfc3339(now_ms())}).to_string())
                })
                .collect(),
            _ = data.tick() => {
                credit += state.opts.rate * TICK.as_secs_f64();
                let n = credit.floor() as usize;
                credit -= n as f64;
                let n = if state.is_silent() { 0 } else { n };
                let products: Vec<&String> = subs.iter().filter(|(c, _)| c == "ticker").map(|(_, p)| p).collect();
                let mut rng = rand::rng();
                let mut out = Vec::new();
                for _ in 0..n {
                    let Some(product) = products.choose(&mut rng) else { break };
                    if state.next_frame_malformed().is_some() {
                        out.push(Message::text("{\"type\":\"ticker\",\"price\":"));
                        continue;
                    }
                    let price = prices.next(product);
                    let seq = sequence.entry((*product).clone()).or_default();
                    *seq += 1;
                    trade_id += 1;
                    out.push(Message::text(json!({
                        "type":"ticker","sequence":*seq,"product_id":product,"price":format!("{price:.2}"),
                        "open_24h":"100.00","volume_24h":"1234.5","low_24h":"90.00","high_24h":"110.00",
                        "volume_30d":"98765.4","best_bid":format!("{:.2}", price - 0.01),
                        "best_bid_size":format!("{:.8}", rng.random_range(0.01..3.0)),
                        "best_ask":format!("{:.2}", price + 0.01),
                        "best_ask_size":format!("{:.8}", rng.random_range(0.01..3.0)),
                        "side": if rng.random_bool(0.5) { "buy" } else { "sell" },
                        "time":rfc3339(now_ms()),"trade_id":trade_id,
                        "last_size":format!("{:.8}", rng.random_range(0.0001..1.0)),
                    }).to_string()));
                }
                out
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

/// Applies a subscribe or unsubscribe and returns the reply.
fn on_request(id: u64, subs: &mut BTreeSet<(String, String)>, text: &str) -> Value {
    let Ok(req) = serde_json::from_str::<Value>(text) else {
        return json!({"type":"error","message":"Malformed JSON"});
    };
    let subscribing = match req.get("type").and_then(Value::as_str) {
        Some("subscribe") => true,
        Some("unsubscribe") => false,
        _ => {
            return json!({"type":"error","message":"Failed to subscribe","reason":"type must be subscribe or unsubscribe"});
        }
    };
    let strings = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let products = strings(req.get("product_ids"));
    let mut pairs = Vec::new();
    for channel in req.get("channels").and_then(Value::as_array).into_iter().flatten() {
        match channel {
            Value::String(name) => pairs.extend(products.iter().map(|p| (name.clone(), p.clone()))),
            Value::Object(o) => {
                let name = o.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
                let own = strings(o.get("product_ids"));
                let list = if own.is_empty() { &products } else { &own };
                pairs.extend(list.iter().map(|p| (name.clone(), p.clone())));
            }
            _ => {}
        }
    }
    for pair in pairs {
        tracing::info!(
            conn = id,
            channel = pair.0,
            product = pair.1,
            "simulator: {}",
            if subscribing { "subscribe" } else { "unsubscribe" }
        );
        if subscribing {
            subs.insert(pair);
        } else {
            subs.remove(&pair);
        }
    }
    let mut by_channel: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (c, p) in subs.iter() {
        by_channel.entry(c).or_default().push(p);
    }
    let channels: Vec<Value> = by_channel
        .into_iter()
        .map(|(name, products)| json!({"name": name, "product_ids": products}))
        .collect();
    json!({"type": "subscriptions", "channels": channels})
}
