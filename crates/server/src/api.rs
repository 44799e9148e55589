//! The HTTP API: publishing, channel listing and history, stats, feeds, health and metrics,
//! and clear answers for clients that knock on the wrong endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, Response, StatusCode, header};
use ferrocast_hub::{BrokerError, ChannelInfo, PublishError, PublishKind};
use ferrocast_protocol::{ErrorCode, validate_channel};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;

use crate::AppState;
use crate::access::{Scope, refuse as refuse_access};
use crate::metrics::{PublishSource, Transport};
use crate::ws::json_response;

#[derive(Deserialize)]
struct PublishItem<'a> {
    #[serde(borrow)]
    channel: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
    /// Transient update: not kept in history, conflatable (e.g. a forming bar).
    #[serde(default)]
    ephemeral: bool,
}

#[derive(Deserialize)]
struct PublishBody<'a> {
    #[serde(borrow, default)]
    messages: Option<Vec<PublishItem<'a>>>,
    #[serde(borrow, default)]
    channel: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    ephemeral: bool,
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Body> {
    json_response(status, json!({ "error": code, "message": message.into() }))
}

/// `POST /api/publish`: one message or a batch. Every message is checked (channel, nesting
/// depth of `data`) before any is published, so a bad batch publishes nothing. The body is
/// read here, not by an extractor, so `api.max_body_bytes` is the only size limit.
pub async fn publish(
    State(app): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response<Body> {
    app.metrics.http_publish_requests.fetch_add(1, Relaxed);
    let refuse = |status, code, message: String| {
        app.metrics.http_publish_rejected.fetch_add(1, Relaxed);
        if app.api_refusals.allow() {
            tracing::info!(%peer, code, "publish refused: {message}");
        }
        error(status, code, message)
    };
    if let Err(refusal) = crate::access::check(&app, peer, &headers, Scope::Publish, true) {
        app.metrics.http_publish_rejected.fetch_add(1, Relaxed);
        return crate::access::refuse(&app, peer, "publish", refusal);
    }
    let limit = app.config.api.max_body_bytes;
    let body =
        match crate::body::read(&app, peer, &headers, body, limit, "api.max_body_bytes").await {
            Ok(body) => body,
            Err(refusal) => {
                app.metrics.http_publish_rejected.fetch_add(1, Relaxed);
                return refusal.into_response();
            }
        };
    let started = Instant::now();
    let parsed: PublishBody<'_> = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("body is not valid JSON: {e}"),
            );
        }
    };
    let items: Vec<PublishItem<'_>> = match (parsed.messages, parsed.channel, parsed.data) {
        (Some(messages), None, None) => messages,
        (None, Some(channel), Some(data)) => {
            vec![PublishItem { channel, data, ephemeral: parsed.ephemeral }]
        }
        _ => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "expected {\"channel\":C,\"data\":D} or {\"messages\":[{\"channel\":C,\"data\":D},...]}".into(),
            );
        }
    };
    for (i, item) in items.iter().enumerate() {
        if let Err(e) = validate_channel(&item.channel) {
            return refuse(StatusCode::BAD_REQUEST, "invalid_channel", format!("message {i}: {e}"));
        }
        if let Err(e) = app.check_data_depth(item.data.get().as_bytes()) {
            return refuse(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("message {i}: {}", e.message),
            );
        }
    }
    // Consecutive messages to one channel go as one run (consecutive offsets, atomic with
    // Redis), and every run is handed to the broker before any answer is awaited: one node's
    // publishes keep their order, and a batch costs one round trip to Redis, not one each.
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match runs.last_mut() {
            Some((start, len))
                if items[*start].channel == item.channel
                    && items[*start].ephemeral == item.ephemeral =>
            {
                *len += 1
            }
            _ => runs.push((i, 1)),
        }
    }
    let pending: Vec<_> = runs
        .iter()
        .map(|&(start, len)| {
            let run = &items[start..start + len];
            let kind =
                if run[0].ephemeral { PublishKind::Ephemeral } else { PublishKind::Retained };
            let data: Vec<&[u8]> = run.iter().map(|item| item.data.get().as_bytes()).collect();
            app.broker.publish_run(&run[0].channel, &data, kind)
        })
        .collect();
    let mut results = Vec::with_capacity(items.len());
    for (&(start, _), answer) in runs.iter().zip(pending) {
        let channel = &items[start].channel;
        let (published, failed) = answer.wait().await;
        for p in published {
            results.push(json!({"channel": channel, "offset": p.offset, "epoch": &*p.epoch}));
        }
        let Some(e) = failed else { continue };
        let i = results.len();
        return match e {
            BrokerError::Publish(e @ PublishError::InvalidChannel(_)) => {
                refuse(StatusCode::BAD_REQUEST, "invalid_channel", e.to_string())
            }
            BrokerError::Publish(e @ PublishError::ChannelLimit(_)) => refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "channel_limit",
                format!("message {i} ({channel}): {e}; the {i} before it were published"),
            ),
            BrokerError::Unavailable(reason) => refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!(
                    "message {i} ({channel}): {reason}; the {i} before it were published, later ones may have been"
                ),
            ),
        };
    }
    let response = json_response(StatusCode::OK, json!({ "results": results }));
    app.metrics.publish_acked(PublishSource::Http, started.elapsed());
    response
}

#[derive(Deserialize)]
pub struct ChannelsQuery {
    /// Only channels whose names sort after this one (the previous page's `next`).
    after: Option<String>,
    limit: Option<usize>,
}

/// Channels per page of `GET /api/channels` unless `limit` says otherwise, and the most.
const CHANNELS_PAGE_DEFAULT: usize = 1_000;
const CHANNELS_PAGE_MAX: usize = 10_000;

/// `GET /api/channels?after=NAME&limit=N`: one page of channels sorted by name, with the
/// total and the `next` cursor (null on the last page). With a cluster, every live node's
/// channels, each listed once with its subscribers summed over the nodes.
pub async fn channels(
    State(app): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<ChannelsQuery>,
) -> Response<Body> {
    if let Err(refusal) = read_allowed(&app, peer, &headers) {
        return refuse_access(&app, peer, "channel listing", refusal);
    }
    let limit = q.limit.unwrap_or(CHANNELS_PAGE_DEFAULT).clamp(1, CHANNELS_PAGE_MAX);
    let question = json!({ "op": "channels", "after": q.after, "limit": limit });
    let Some(asked) = app.broker.survey(question.to_string().as_bytes()) else {
        let page = app.hub.channels_page(q.after.as_deref(), limit);
        return json_response(
            StatusCode::OK,
            json!({ "channels": page.channels, "total": page.total, "next": page.next }),
        );
    };
    match asked.await {
        Ok(answers) => {
            let page = merge_channel_pages(&answers, limit, q.after.is_some());
            json_response(StatusCode::OK, page)
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()),
    }
}

/// One page of the cluster's channels from each node's page (same cursor and limit): the
/// union, each channel once with its subscribers summed and the most advanced position, cut
/// where a node that had more stopped (beyond, its channels are unknown). `total` is exact
/// on a first page that holds every node's channels, else a lower bound (the largest
/// node's count, or the channels seen).
fn merge_channel_pages(answers: &[Vec<u8>], limit: usize, paged: bool) -> serde_json::Value {
    let mut merged: std::collections::BTreeMap<String, ChannelInfo> = Default::default();
    let mut bound: Option<String> = None;
    let (mut truncated, mut largest) = (false, 0);
    for answer in answers {
        let Ok(page) = serde_json::from_slice::<NodeChannels>(answer) else { continue };
        largest = largest.max(page.total);
        if page.more {
            truncated = true;
            if let Some(last) = page.channels.last().map(|c| c.channel.clone()) {
                bound = Some(bound.map_or(last.clone(), |b: String| b.min(last)));
            }
        }
        for info in page.channels {
            match merged.get_mut(&info.channel) {
                Some(held) => {
                    held.subscribers += info.subscribers;
                    if info.offset > held.offset {
                        (held.offset, held.epoch) = (info.offset, info.epoch);
                    }
                }
                None => {
                    merged.insert(info.channel.clone(), info);
                }
            }
        }
    }
    let known = merged.len();
    let mut channels: Vec<ChannelInfo> =
        merged.into_values().filter(|c| bound.as_ref().is_none_or(|b| c.channel <= *b)).collect();
    let more = truncated || channels.len() > limit;
    channels.truncate(limit);
    let next = if more { channels.last().map(|c| c.channel.clone()) } else { None };
    let total = if truncated || paged { largest.max(known) } else { known };
    json!({ "channels": channels, "total": total, "next": next, "nodes": answers.len() })
}

/// A node's answer to a `channels` survey.
#[derive(Serialize, Deserialize)]
struct NodeChannels {
    channels: Vec<ChannelInfo>,
    total: usize,
    more: bool,
}

/// This node's answer to another node's (or its own) cluster-wide question.
pub async fn survey_answer(app: &Arc<AppState>, question: &[u8]) -> Vec<u8> {
    /// The cluster-wide figures.
    #[derive(Deserialize)]
    #[serde(tag = "op", rename_all = "snake_case")]
    enum Figures {
        Channels { after: Option<String>, limit: usize },
        Stats,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Question {
        Figures(Figures),
        User(crate::server_api::Question),
    }
    let answer = match serde_json::from_slice::<Question>(question) {
        Ok(Question::Figures(Figures::Channels { after, limit })) => {
            let page = app.hub.channels_page(after.as_deref(), limit.clamp(1, CHANNELS_PAGE_MAX));
            let more = page.next.is_some();
            serde_json::to_value(NodeChannels { channels: page.channels, total: page.total, more })
                .unwrap_or_default()
        }
        Ok(Question::Figures(Figures::Stats)) => node_stats(app),
        Ok(Question::User(question)) => crate::server_api::answer(app, question).await,
        Err(e) => json!({ "error": e.to_string() }),
    };
    answer.to_string().into_bytes()
}

#[derive(Deserialize)]
pub struct HistoryQuery {
    #[serde(default)]
    since: u64,
    limit: Option<usize>,
}

/// Most messages one history request returns.
const HISTORY_LIMIT_MAX: usize = 10_000;

/// `GET /api/channels/{channel}/history?since=OFFSET&limit=N`.
pub async fn history(
    State(app): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(channel): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Response<Body> {
    if let Err(e) = validate_channel(&channel) {
        return error(StatusCode::BAD_REQUEST, "invalid_channel", e.to_string());
    }
    if let Err(refusal) = history_allowed(&app, peer, &headers, &channel).await {
        return refuse_access(&app, peer, &format!("history of {channel:?}"), refusal);
    }
    let limit = q.limit.unwrap_or(100).min(HISTORY_LIMIT_MAX);
    let page = match app.broker.history(&channel, q.since, limit).wait().await {
        Ok(Some(page)) => page,
        Ok(None) => {
            return error(
                StatusCode::NOT_FOUND,
                "unknown_channel",
                format!("no channel {channel:?} is held"),
            );
        }
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()),
    };
    // Build the body by hand so each message's data is copied verbatim, not re-parsed.
    let mut body = format!(
        "{{\"channel\":{},\"epoch\":\"{}\",\"offset\":{},\"messages\":[",
        serde_json::Value::String(page.channel),
        page.epoch,
        page.offset
    );
    for (i, (offset, data)) in page.messages.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!("{{\"offset\":{offset},\"data\":"));
        body.push_str(std::str::from_utf8(data).unwrap_or("null"));
        body.push('}');
    }
    body.push_str("]}");
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .expect("static response")
}

/// Whether a read endpoint (channels, stats, nodes) may answer: a key with the `read` scope
/// (or, with no key configured, this machine's trust), or anyone with `api.public_read`.
fn read_allowed(
    app: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<(), crate::auth::Refusal> {
    if app.config.api.public_read {
        return Ok(());
    }
    crate::access::check(app, peer, headers, Scope::Read, false).map(|_| ())
}

/// Whether a history read may go ahead: a key with the `read` scope (or, with no key
/// configured, this machine's trust) always may; otherwise, with `history = "subscribe"`,
/// a user's connection token in `Authorization: Bearer` that passes the channel's subscribe
/// rule, the subscribe proxy's yes for a `"proxy"` rule (the application sees the forwarded
/// headers), or, with `api.public_read`, an anonymous request the rule admits.
async fn history_allowed(
    app: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    channel: &str,
) -> Result<(), crate::auth::Refusal> {
    use crate::permissions::{Action, Verdict, Who, decide};
    let by_key = match crate::access::check(app, peer, headers, Scope::Read, false) {
        Ok(_) => return Ok(()),
        Err(refusal) => refusal,
    };
    let ns = app.hub.namespace(channel);
    // A bearer is a user's connection token, or else a (wrong) API key.
    let identity = match crate::auth::bearer(headers) {
        Some(token) if app.auth.enabled() && token.matches('.').count() == 2 => {
            Some(app.auth.verify_connection(&token)?)
        }
        Some(_) => return Err(by_key),
        None => None,
    };
    if identity.is_none()
        && !app.config.api.public_read
        && ns.subscribe != ferrocast_hub::SubscribeRule::Proxy
    {
        return Err(by_key);
    }
    let who = Who { user: identity.as_ref().map(|i| i.user.as_str()) };
    let verdict = decide(&app.auth, ns, who, channel, Action::History { token: None })?;
    if verdict == Verdict::AskProxy {
        if !app.proxy.enabled(crate::proxy::Kind::Subscribe) {
            return Err(by_key);
        }
        let forwarded = app.proxy.forwarded(headers);
        let client = peer.ip().to_string();
        let request = crate::proxy::Request {
            transport: "http",
            client: &client,
            headers: forwarded.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
            user: who.user.filter(|u| !u.is_empty()),
            channel: Some(channel),
            ..Default::default()
        };
        return match app.proxy.call(crate::proxy::Kind::Subscribe, &request).await {
            Ok(_) => Ok(()),
            Err(crate::proxy::Denied::Refused(refusal)) => Err(refusal),
            Err(crate::proxy::Denied::Disconnect { reason, .. }) => {
                Err(crate::auth::Refusal::new("proxy_refused", ErrorCode::Forbidden, reason))
            }
        };
    }
    Ok(())
}

/// `GET /api/stats`: a JSON summary for dashboards. With a cluster, the figures of every
/// live node summed (`nodes` says how many answered); `uptime_s` is this node's.
pub async fn stats(
    State(app): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response<Body> {
    if let Err(refusal) = read_allowed(&app, peer, &headers) {
        return refuse_access(&app, peer, "stats", refusal);
    }
    let mut summary = match app.broker.survey(br#"{"op":"stats"}"#) {
        None => node_stats(&app),
        Some(asked) => match asked.await {
            Ok(answers) => {
                let mut sum = json!({});
                for answer in &answers {
                    if let Ok(node) = serde_json::from_slice::<serde_json::Value>(answer) {
                        add_numbers(&mut sum, &node);
                    }
                }
                sum["nodes"] = json!(answers.len());
                sum
            }
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()),
        },
    };
    summary["uptime_s"] = json!(app.started.elapsed().as_secs());
    summary["broker"] = json!(app.broker.kind());
    json_response(StatusCode::OK, summary)
}

/// This node's own figures: connections by transport, subscriptions, channels held,
/// messages published through it, messages and bytes sent to its clients.
fn node_stats(app: &AppState) -> serde_json::Value {
    let m = &app.metrics;
    let hub = app.hub.metrics();
    json!({
        "connections": {
            "ws": m.open_connections(Transport::Ws),
            "sse": m.open_connections(Transport::Sse),
            "socketio": m.open_connections(Transport::SocketIo),
        },
        "subscriptions": hub.subscriptions.load(Relaxed),
        "channels": hub.channels.load(Relaxed),
        "messages_in": app.broker.published().unwrap_or_else(|| hub.messages_in.load(Relaxed)),
        "messages_out": m.messages_out_total(),
        "bytes_out": m.bytes_out_total(),
    })
}

/// Adds every number of `node` into `sum`, object by object.
fn add_numbers(sum: &mut serde_json::Value, node: &serde_json::Value) {
    let serde_json::Value::Object(fields) = node else { return };
    for (key, value) in fields {
        match value {
            serde_json::Value::Number(n) => {
                let held = sum[key].as_u64().unwrap_or(0);
                sum[key] = json!(held + n.as_u64().unwrap_or(0));
            }
            serde_json::Value::Object(_) => {
                if !sum[key].is_object() {
                    sum[key] = json!({});
                }
                add_numbers(&mut sum[key], value);
            }
            _ => {}
        }
    }
}

/// What this node tells the others about itself (`GET /api/nodes`).
pub fn node_info(app: &AppState) -> serde_json::Value {
    let m = &app.metrics;
    json!({
        "node": app.node_id,
        "listen": app.config.server.listen,
        "connections": {
            "ws": m.open_connections(Transport::Ws),
            "sse": m.open_connections(Transport::Sse),
            "socketio": m.open_connections(Transport::SocketIo),
        },
        "subscriptions": app.hub.metrics().subscriptions.load(Relaxed),
        "uptime_s": app.started.elapsed().as_secs(),
        "draining": app.shutdown.is_draining(),
        "ingest": app.ingest.is_held(),
    })
}

/// `GET /api/nodes`: the live nodes of the cluster (this one alone with the memory broker),
/// each as it last advertised itself (every 2 s; a node silent for 6 s is left out).
pub async fn nodes(
    State(app): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response<Body> {
    if let Err(refusal) = read_allowed(&app, peer, &headers) {
        return refuse_access(&app, peer, "node listing", refusal);
    }
    let Some(listed) = app.broker.nodes() else {
        return json_response(StatusCode::OK, json!({ "nodes": [node_info(&app)] }));
    };
    match listed.await {
        Ok(nodes) => {
            let mut nodes: Vec<serde_json::Value> =
                nodes.iter().filter_map(|n| serde_json::from_str(n).ok()).collect();
            // This node as it is now, not as it last advertised itself (it may not have yet).
            nodes.retain(|n| n["node"] != app.node_id.as_str());
            nodes.push(node_info(&app));
            nodes.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
            json_response(StatusCode::OK, json!({ "nodes": nodes }))
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()),
    }
}

/// `GET /api/feeds`.
pub async fn feeds(State(app): State<Arc<AppState>>) -> Response<Body> {
    json_response(StatusCode::OK, json!({ "feeds": app.feeds.snapshot() }))
}

/// `GET /healthz`: 200 while the process serves.
pub async fn healthz() -> Response<Body> {
    json_response(StatusCode::OK, json!({ "status": "ok" }))
}

/// `GET /readyz`: 503 with a reason while draining or while a required feed is down.
pub async fn readyz(State(app): State<Arc<AppState>>) -> Response<Body> {
    let (status, body) = readiness(&app);
    json_response(status, body)
}

/// The status and body of `/readyz` (also answered at the file-descriptor limit).
pub fn readiness(app: &AppState) -> (StatusCode, serde_json::Value) {
    if app.shutdown.is_draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "ready": false, "reason": "draining for shutdown" }),
        );
    }
    if let Some(reason) = app.feeds.not_ready_reason() {
        return (StatusCode::SERVICE_UNAVAILABLE, json!({ "ready": false, "reason": reason }));
    }
    if let Err(reason) = app.broker.ready() {
        return (StatusCode::SERVICE_UNAVAILABLE, json!({ "ready": false, "reason": reason }));
    }
    (StatusCode::OK, json!({ "ready": true }))
}

/// `GET /metrics`.
pub async fn metrics(State(app): State<Arc<AppState>>) -> Response<Body> {
    let mut extra = app.feeds.render_metrics()
        + &app.candles.render_metrics()
        + &app.connections.render_metrics();
    // The same answer as /readyz, for alerting on instances that take no new connections.
    let ready = readiness(&app).0 == StatusCode::OK;
    app.broker.render_metrics(&mut extra);
    crate::metrics::family(
        &mut extra,
        "ferrocast_ready",
        "gauge",
        "1 when /readyz answers 200 (not draining, every required feed live, the broker reachable).",
    );
    extra.push_str(&format!("ferrocast_ready {}\n", u8::from(ready)));
    extra.push_str(&app.auth.render_metrics());
    extra.push_str(&app.limits.render_metrics());
    if let Some(tls) = app.tls.get() {
        extra.push_str(&tls.render_metrics());
    }
    extra.push_str(&app.proxy.render_metrics());
    extra.push_str(&app.server_api_requests.render_metrics());
    let text = app.metrics.render(app.hub.metrics(), &extra);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")
        .body(Body::from(text))
        .expect("static response")
}

/// Answers `/socket.io/` while Socket.IO is off: a 404 that says so and points to `/ws`,
/// with a warning logged at most once a minute however hard a client retries.
pub async fn socketio_disabled(
    State(app): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response<Body> {
    app.metrics.wrong_endpoint("/socket.io/");
    static LAST_WARNING: Mutex<Option<Instant>> = Mutex::new(None);
    {
        let mut last = LAST_WARNING.lock();
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            *last = Some(Instant::now());
            tracing::warn!(
                %peer,
                "a Socket.IO client is requesting /socket.io/ but Socket.IO is turned off; it is being \
                 answered 404 with a pointer to /ws (this warning repeats at most once a minute; \
                 see ferrocast_wrong_endpoint_total)"
            );
        }
    }
    error(
        StatusCode::NOT_FOUND,
        "socketio_disabled",
        "This ferrocast server has Socket.IO turned off. Connect a native WebSocket to /ws \
         (or Server-Sent Events to /sse), or enable Socket.IO in the server config.",
    )
}
