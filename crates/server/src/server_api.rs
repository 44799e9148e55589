//! The server API (API key with the `admin` scope): a user's connections on every node —
//! list them, disconnect them with a close code, subscribe them to a channel, unsubscribe
//! them from one.
//!
//! | request | body | answer |
//! | --- | --- | --- |
//! | `GET /api/users/{user}/connections` | | `{"user","connections":[{"node","conn","session","transport","user","info","connected_at_ms","channels"}],"nodes"}` |
//! | `POST /api/users/{user}/disconnect` | `{"code":4003,"reason":"..."}` (both optional) | `{"user","disconnected":N,"nodes"}` |
//! | `POST /api/users/{user}/subscribe` | `{"channel":C}` | `{"user","channel","subscribed":N,"nodes"}` |
//! | `POST /api/users/{user}/unsubscribe` | `{"channel":C}` | `{"user","channel","unsubscribed":N,"nodes"}` |
//!
//! `nodes` is `{"answered":[...],"missing":[...]}`: the request is a survey question
//! ([`ferrocast_hub::Broker::survey`], the path of the cluster-wide `/api/channels` and
//! `/api/stats`) to every node, this one included; each applies it to its own connections
//! ([`crate::users`]) and answers with what it did. `missing` names the live nodes
//! (`GET /api/nodes`) that did not answer within `broker.timeout_ms`. Without a cluster
//! (memory broker) this node answers alone.
//!
//! A connection subscribed by the server gets `{"type":"subscribed","channel":C,"result":{...}}`
//! ahead of the channel's messages; one unsubscribed gets `{"type":"unsubscribed",...}`; one
//! disconnected is closed with the code after what is queued for it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, Response, StatusCode};
use ferrocast_protocol::server::{ChannelResult, encode_subscribed, encode_unsubscribed};
use ferrocast_protocol::{ErrorCode, validate_channel};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::AppState;
use crate::access::{self, Scope};
use crate::users::ConnHandle;
use crate::ws::json_response;

/// Largest request body.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// Close code of a disconnect that names none: "forbidden: do not retry with the same token".
const DEFAULT_DISCONNECT_CODE: u16 = 4003;

/// The survey question every node answers: do `op` to `user`'s connections there.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Question {
    user: String,
    #[serde(flatten)]
    op: Op,
}

/// What a node is asked to do to a user's connections.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Op {
    Connections,
    Disconnect { code: u16, reason: String },
    Subscribe { channel: String },
    Unsubscribe { channel: String },
}

/// Server API requests made on this node, by action.
#[derive(Debug, Default)]
pub struct Requests(Mutex<BTreeMap<&'static str, u64>>);

impl Requests {
    fn count(&self, action: &'static str) {
        *self.0.lock().entry(action).or_default() += 1;
    }

    /// The `ferrocast_server_api_requests_total` family.
    pub fn render_metrics(&self) -> String {
        let mut out = String::new();
        crate::metrics::family(
            &mut out,
            "ferrocast_server_api_requests_total",
            "counter",
            "Server API requests accepted on this node (/api/users/...), by action.",
        );
        for (action, n) in self.0.lock().iter() {
            out.push_str(&format!(
                "ferrocast_server_api_requests_total{{action=\"{action}\"}} {n}\n"
            ));
        }
        out
    }
}

/// This node's answer to `question`: what it did, and its id.
pub async fn answer(app: &Arc<AppState>, question: Question) -> Value {
    let mut answer = apply(app, &question.user, &question.op).await;
    answer["node"] = json!(app.node_id);
    answer
}

/// Carries out `op` on `user`'s connections on this node.
async fn apply(app: &Arc<AppState>, user: &str, op: &Op) -> Value {
    let handles = app.users.connections(user);
    match op {
        Op::Connections => {
            let list: Vec<Value> = handles
                .iter()
                .map(|h| {
                    let mut d = h.describe();
                    d["node"] = json!(app.node_id);
                    d
                })
                .collect();
            json!({ "connections": list })
        }
        Op::Disconnect { code, reason } => {
            for handle in &handles {
                tracing::info!(
                    conn = handle.conn_id,
                    user,
                    code,
                    "disconnected by the server API: {reason}"
                );
                handle.queue.request_close(*code, reason);
            }
            json!({ "count": handles.len() })
        }
        Op::Subscribe { channel } => {
            if !handles.is_empty()
                && let Some(prepared) = app.broker.prepare_subscribe(channel, None)
                && let Err(e) = prepared.await
            {
                return json!({ "count": 0, "error": e.to_string() });
            }
            let count = handles.iter().filter(|h| subscribe(app, h, channel)).count();
            json!({ "count": count })
        }
        Op::Unsubscribe { channel } => {
            let mut count = 0;
            for handle in &handles {
                let mut state = handle.lock();
                if state.subscriptions.remove(channel) {
                    app.hub.unsubscribe(channel, handle.conn_id);
                    drop(state);
                    let notice = encode_unsubscribed(channel, "unsubscribed by the server");
                    handle.queue.push_control(notice);
                    count += 1;
                }
            }
            json!({ "count": count })
        }
    }
}

/// Subscribes one connection (prepared by the broker already); whether it now is.
fn subscribe(app: &AppState, handle: &ConnHandle, channel: &str) -> bool {
    // The notice takes its place before anything the subscription queues.
    let reservation = handle.queue.reserve();
    let mut state = handle.lock();
    let max = app.config.server.max_subscriptions;
    let result = if state.closed || state.subscriptions.contains(channel) {
        None
    } else if state.subscriptions.len() >= max {
        Some(ChannelResult::failed(
            ErrorCode::LimitExceeded,
            format!("this connection already holds {max} subscriptions (server.max_subscriptions)"),
        ))
    } else {
        let sub = app.hub.subscribe(channel, &handle.queue, None);
        if sub.added {
            state.subscriptions.insert(channel.to_owned());
        }
        Some(sub.result)
    };
    let added = state.subscriptions.contains(channel) && !state.closed;
    drop(state);
    let notice = result.map_or_else(bytes::Bytes::new, |r| encode_subscribed(channel, &r));
    handle.queue.fill(reservation, notice);
    added
}

/// Asks every node to do `op` to `user`'s connections: the `nodes` part of the answer, and
/// the answers of the nodes that answered.
async fn ask(app: &Arc<AppState>, user: &str, op: Op) -> Result<(Value, Vec<Value>), String> {
    let question = Question { user: user.to_owned(), op };
    let text = serde_json::to_vec(&question).unwrap_or_default();
    let Some(asked) = app.broker.survey(&text) else {
        let answer = answer(app, question).await;
        return Ok((json!({ "answered": [app.node_id], "missing": [] }), vec![answer]));
    };
    let live = async {
        let Some(nodes) = app.broker.nodes() else { return Vec::new() };
        let nodes = nodes.await.unwrap_or_default();
        let ids = nodes.iter().filter_map(|node| serde_json::from_str::<Value>(node).ok());
        ids.filter_map(|n| n["node"].as_str().map(str::to_owned)).collect()
    };
    let (answers, live): (_, Vec<String>) = tokio::join!(asked, live);
    let answers: Vec<Value> = answers
        .map_err(|e| e.to_string())?
        .iter()
        .filter_map(|a| serde_json::from_slice::<Value>(a).ok())
        .filter(|a| a["node"].is_string())
        .collect();
    let answered: BTreeSet<&str> = answers.iter().filter_map(|a| a["node"].as_str()).collect();
    let mut expected: BTreeSet<String> = live.into_iter().collect();
    expected.insert(app.node_id.clone());
    let missing: Vec<&String> =
        expected.iter().filter(|n| !answered.contains(n.as_str())).collect();
    if !missing.is_empty() {
        tracing::warn!(?missing, "server API: some nodes did not answer in time");
    }
    Ok((json!({ "answered": answered, "missing": missing }), answers))
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Body> {
    json_response(status, json!({ "error": code, "message": message.into() }))
}

/// Checks the caller (admin scope) and the user name; `None` when the request may go on.
fn refused(
    app: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    user: &str,
    state_changing: bool,
) -> Option<Response<Body>> {
    if let Err(refusal) = access::check(app, peer, headers, Scope::Admin, state_changing) {
        return Some(access::refuse(app, peer, "server API request", refusal));
    }
    if user.is_empty() || user.len() > 255 {
        return Some(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the user id must be 1 to 255 bytes",
        ));
    }
    None
}

/// `GET /api/users/{user}/connections`.
pub async fn connections(
    State(app): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> Response<Body> {
    if let Some(refusal) = refused(&app, peer, &headers, &user, false) {
        return refusal;
    }
    app.server_api_requests.count("connections");
    match ask(&app, &user, Op::Connections).await {
        Ok((nodes, results)) => {
            let connections: Vec<Value> = results
                .into_iter()
                .flat_map(|r| r["connections"].as_array().cloned().unwrap_or_default())
                .collect();
            json_response(
                StatusCode::OK,
                json!({ "user": user, "connections": connections, "nodes": nodes }),
            )
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    code: Option<u16>,
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelBody {
    channel: String,
}

/// `POST /api/users/{user}/{action}` for `disconnect`, `subscribe` and `unsubscribe`.
pub async fn act(
    State(app): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path((user, action)): Path<(String, String)>,
    body: Body,
) -> Response<Body> {
    if let Some(refusal) = refused(&app, peer, &headers, &user, true) {
        return refusal;
    }
    let body = match crate::body::read(
        &app,
        peer,
        &headers,
        body,
        MAX_BODY_BYTES,
        "the server API's 64 KiB",
    )
    .await
    {
        Ok(body) => body,
        Err(refusal) => return refusal.into_response(),
    };
    let bad = |message: String| error(StatusCode::BAD_REQUEST, "bad_request", message);
    let (op, counted, channel) = match action.as_str() {
        "disconnect" => {
            let parsed: DisconnectBody = if body.iter().all(u8::is_ascii_whitespace) {
                DisconnectBody::default()
            } else {
                match serde_json::from_slice(&body) {
                    Ok(b) => b,
                    Err(e) => {
                        return bad(format!(
                            "expected {{\"code\":4003,\"reason\":\"...\"}} (both optional): {e}"
                        ));
                    }
                }
            };
            let code = parsed.code.unwrap_or(DEFAULT_DISCONNECT_CODE);
            if !(code == 1000 || (3000..=4999).contains(&code)) {
                return bad(format!("close code {code} is not 1000 or 3000-4999"));
            }
            let reason = parsed.reason.unwrap_or_else(|| "disconnected by the server".into());
            if reason.len() > 120 {
                return bad(
                    "the reason is longer than 120 bytes (a close frame carries at most 123)"
                        .into(),
                );
            }
            (Op::Disconnect { code, reason }, "disconnected", None)
        }
        "subscribe" | "unsubscribe" => {
            let parsed: ChannelBody = match serde_json::from_slice(&body) {
                Ok(b) => b,
                Err(e) => return bad(format!("expected {{\"channel\":\"...\"}}: {e}")),
            };
            if let Err(e) = validate_channel(&parsed.channel) {
                return error(StatusCode::BAD_REQUEST, "invalid_channel", e.to_string());
            }
            let channel = parsed.channel.clone();
            if action == "subscribe" {
                (Op::Subscribe { channel: parsed.channel }, "subscribed", Some(channel))
            } else {
                (Op::Unsubscribe { channel: parsed.channel }, "unsubscribed", Some(channel))
            }
        }
        other => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no server API action {other:?}: use disconnect, subscribe or unsubscribe"),
            );
        }
    };
    app.server_api_requests.count(counted);
    match ask(&app, &user, op).await {
        Ok((nodes, results)) => {
            let count: u64 = results.iter().filter_map(|r| r["count"].as_u64()).sum();
            let errors: Vec<&str> = results.iter().filter_map(|r| r["error"].as_str()).collect();
            let mut answer = json!({ "user": user, counted: count, "nodes": nodes });
            if let Some(channel) = channel {
                answer["channel"] = json!(channel);
            }
            if !errors.is_empty() {
                answer["errors"] = json!(errors);
            }
            json_response(StatusCode::OK, answer)
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e),
    }
}
