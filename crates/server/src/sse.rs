//! Server-Sent Events: `GET /sse?channels=a,b` streams the native protocol's frames to a plain
//! browser `EventSource`, and `POST /sse/control` changes a live stream's subscriptions.
//!
//! Every event is unnamed (the default `message` event) and its `data:` is the same JSON object
//! a `/ws` client gets: first the `welcome` (with the stream's `token` for the control
//! endpoint), then the subscribe `ack`, then `msg` frames. Each retained `msg` carries an `id:`
//! that is a cursor over every channel of the stream (`ticks.AAPL=ep1:58,quotes.AAPL=ep2:12`);
//! a browser that reconnects by itself sends it back as `Last-Event-ID`, and the server
//! resubscribes each channel with `recover`, so the replay comes before live messages and
//! nothing is delivered twice or lost. Ephemeral messages carry no `id:` and do not move the
//! cursor.
//!
//! One task per stream drains the session's queue into event text, one chunk per drain, and
//! hands it to the response body through a one-slot channel: while the client reads slowly,
//! messages wait in the byte-bounded queue (where the namespace's overflow policy applies),
//! not in an unbounded buffer. A comment line (`: ping`) keeps proxies from timing out an idle
//! stream; a client that went away is noticed when its response body is dropped.
//!
//! A client that accepts gzip gets a gzip body when some namespace compresses: large messages
//! of those namespaces travel as the compressed bytes `/ws` shares, the rest uncompressed in
//! stored blocks ([`crate::sse_gzip`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use axum::routing::{get, post};
use bytes::{BufMut, BytesMut};
use ferrocast_hub::{ConnQueue, Drained};
use ferrocast_protocol::server::{
    ChannelResult, SubscribeResults, encode_ack, encode_ack_with, encode_pong,
};
use ferrocast_protocol::{
    ClientFrame, CloseCode, ErrorCode, FrameError, PROTOCOL_VERSION, StreamPosition,
    parse_client_frame,
};
use parking_lot::Mutex;
use rand::Rng;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio::time::{Instant as TokioInstant, sleep_until};

use crate::AppState;
use crate::metrics::{LocalHistogram, Transport};
use crate::session::{Credentials, Session};
use crate::shutdown::{ConnectionGuard, Shutdown};
use crate::sse_gzip::Gzip;
use crate::users::ConnHandle;
use crate::ws::{deflate, json_response, origin_allowed};

/// The heartbeat comment sent on an idle stream.
const HEARTBEAT: &[u8] = b": ping\n\n";
/// Chunks the writer may be ahead of the socket. One is enough to overlap formatting with
/// writing; more would only move the backlog out of the byte-bounded queue.
const BODY_SLOTS: usize = 1;
/// How long the final `close` event may wait for a client that is not reading.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// The SSE routes, with their own state (the registry of live streams), to merge into the
/// main router.
pub fn routes<S: Clone + Send + Sync + 'static>(app: &Arc<AppState>) -> Router<S> {
    let state = SseState { app: app.clone(), streams: Arc::default() };
    Router::new().route("/sse", get(stream)).route("/sse/control", post(control)).with_state(state)
}

#[derive(Debug, Clone)]
struct SseState {
    app: Arc<AppState>,
    streams: Arc<Streams>,
}

/// Live streams by session id, so the control endpoint can find them.
#[derive(Debug, Default)]
struct Streams {
    by_id: Mutex<HashMap<String, Arc<SseStream>>>,
}

impl Streams {
    fn get(&self, id: &str) -> Option<Arc<SseStream>> {
        self.by_id.lock().get(id).cloned()
    }
}

/// What the stream's writer and the control endpoint share.
#[derive(Debug)]
struct SseStream {
    /// The secret a control request must present (sent in the welcome).
    token: String,
    /// `None` once the stream has ended.
    session: Mutex<Option<Session>>,
    /// Where the client stands in each subscribed channel (the `id:` of each event).
    cursor: Mutex<Cursor>,
    /// The session's shared part (its queue, its close verdict), read without the session's
    /// lock, which a control request may hold while it waits for the auth proxy or the broker.
    handle: Arc<ConnHandle>,
}

// ------------------------------------------------------------------------------------------
// GET /sse

#[derive(Debug, Deserialize)]
struct StreamQuery {
    /// Comma-separated channels to subscribe to.
    #[serde(default)]
    channels: Option<String>,
    /// Same as the `Last-Event-ID` header, for clients that cannot set headers.
    #[serde(default, rename = "lastEventId")]
    last_event_id: Option<String>,
    /// A connection token, for clients that cannot set headers (also `Authorization:
    /// Bearer` or the `auth.cookie` cookie).
    #[serde(default)]
    token: Option<String>,
    /// Subscription tokens for the URL's channels, as a JSON object `{"CHANNEL":"TOKEN"}`.
    #[serde(default)]
    tokens: Option<String>,
}

async fn stream(
    State(st): State<SseState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<StreamQuery>,
    headers: HeaderMap,
) -> Response<Body> {
    let app = &st.app;
    if !origin_allowed(&app.config.server.allowed_origins, headers.get(header::ORIGIN)) {
        tracing::info!(%peer, "refusing event stream: origin not allowed");
        return json_response(
            StatusCode::FORBIDDEN,
            json!({"error": "forbidden", "message": "this Origin is not in server.allowed_origins"}),
        );
    }
    let refusal = if app.shutdown.is_draining() {
        Some(CloseCode::GoingAway)
    } else if app.connections.over_client_limit(app.config.server.max_connections) {
        // Every TCP connection counts, this one included.
        Some(CloseCode::TryAgainLater)
    } else {
        None
    };
    if let Some(code) = refusal {
        let (after_ms, hint) = reconnect_hint(app);
        let reason = if code == CloseCode::GoingAway { hint } else { code.reason().to_owned() };
        // A stream that says why and ends, rather than an HTTP error: EventSource gives up
        // for good on a non-200 answer, but reconnects (after `retry`) when a stream ends.
        tracing::info!(%peer, code = code.code(), "refusing event stream: {reason}");
        app.metrics.connection_opened(Transport::Sse);
        app.metrics.connection_closed(Transport::Sse, code.code());
        let mut out = BytesMut::new();
        put_close(&mut out, code.code(), &reason, after_ms);
        // The connection closes too, so it stops counting toward the limit.
        let mut resp = event_stream_response(Body::from(out.freeze()));
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }

    let address = match crate::session::admit_address(app, peer, &headers) {
        Ok(slot) => slot,
        Err(refusal) => return limited(&refusal),
    };
    let sub_tokens: BTreeMap<String, String> = match query.tokens.as_deref() {
        None | Some("") => BTreeMap::new(),
        Some(text) => match serde_json::from_str(text) {
            Ok(tokens) => tokens,
            Err(e) => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "bad_request", "message": format!("\"tokens\" must be a JSON object of channel to subscription token: {e}")}),
                );
            }
        },
    };
    let mut session = Session::new(app.clone(), Transport::Sse);
    session.hold_address(address);
    let mut credentials = Credentials::from_request(app, &headers, None, peer);
    if let Some(token) = query.token.clone().filter(|t| !t.is_empty())
        && crate::auth::bearer(&headers).is_none()
    {
        credentials.token = Some(token);
    }
    let presented = credentials.token.is_some();
    // An EventSource gives up for good on a non-200 answer, which is what a refused token
    // must mean; the body says why for clients that read it. A proxy that could not answer
    // (1013) or that disconnects gets a stream that ends with a `close` event instead.
    match session.connect(credentials).await {
        Ok(_) => {}
        Err(refusal) => {
            let retry = refusal.error.as_ref().is_none_or(|e| e.code == ErrorCode::Unavailable);
            if retry {
                app.metrics.connection_opened(Transport::Sse);
                app.metrics.connection_closed(Transport::Sse, refusal.code);
                let (after_ms, _) = reconnect_hint(app);
                let mut out = BytesMut::new();
                if let Some(e) = &refusal.error {
                    let error = json!({"type": "error", "id": null, "code": e.code.as_str(), "message": e.message});
                    put_event(&mut out, None, error.to_string().as_bytes());
                }
                put_close(&mut out, refusal.code, &refusal.reason, after_ms);
                let mut resp = event_stream_response(Body::from(out.freeze()));
                resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                return resp;
            }
            let e = refusal.error.expect("checked above");
            let status = match e.code {
                ErrorCode::Forbidden => StatusCode::FORBIDDEN,
                ErrorCode::LimitExceeded => StatusCode::TOO_MANY_REQUESTS,
                _ => StatusCode::UNAUTHORIZED,
            };
            return json_response(status, json!({"error": e.code.as_str(), "message": e.message}));
        }
    }
    if session.identity().is_none() && !app.auth.anonymous {
        app.auth.count_refusal("no_token");
        tracing::info!(%peer, presented, "refusing event stream: no token and auth.anonymous = false");
        return json_response(
            StatusCode::UNAUTHORIZED,
            json!({"error": "unauthorized", "message": "this server requires a token (auth.anonymous = false): pass ?token=..., Authorization: Bearer or the auth.cookie cookie"}),
        );
    }
    let guard = app.shutdown.track();
    let token = crate::random_id(32);
    let conn_id = session.conn_id;
    app.metrics.connection_opened(Transport::Sse);

    let mut first = BytesMut::with_capacity(512);
    let mut welcome = json!({
        "type": "welcome",
        "session": session.id(),
        "version": PROTOCOL_VERSION,
        "ping_interval_ms": app.config.server.ping_interval_ms,
        "transport": "sse",
        "token": token,
    });
    // The identity the URL's token (or the connect proxy) gave, so a client knows when to
    // send a fresh token through the control endpoint.
    if let Some(identity) = session.identity() {
        welcome["user"] = json!(identity.user);
        welcome["expires_at"] = json!(identity.expires_at);
    }
    put_event(&mut first, None, welcome.to_string().as_bytes());

    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(query.last_event_id)
        .unwrap_or_default();
    let recover = Cursor::parse(&last_event_id, app.config.server.max_subscriptions);
    let requested: Vec<String> = query
        .channels
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect();
    let mut cursor = Cursor::default();
    let ack = match initial_subscribe(&mut session, &requested, &recover, &sub_tokens) {
        Ok(results) => {
            for (channel, result) in &results {
                cursor.subscribed(channel, result, recover.get(channel));
            }
            encode_ack_with(None, &results)
        }
        Err(e) => session.error_frame(e),
    };
    put_event(&mut first, None, &ack);
    tracing::debug!(
        conn = conn_id,
        %peer,
        channels = requested.len(),
        recovering = recover.len(),
        "event stream opened"
    );

    let queue = session.queue.clone();
    let id = session.id().to_owned();
    let shared = Arc::new(SseStream {
        token,
        handle: session.conn_handle().clone(),
        session: Mutex::new(Some(session)),
        cursor: Mutex::new(cursor),
    });
    st.streams.by_id.lock().insert(id.clone(), shared.clone());

    // Gzip where it pays: some namespace compresses its large messages, and the client takes
    // gzip (browsers always do).
    let gzip = app.config.compresses()
        && headers
            .get(header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(crate::sse_gzip::accepts_gzip);
    if gzip {
        queue.want_forms();
    }
    let (tx, rx) = mpsc::channel(BODY_SLOTS);
    let writer = Writer {
        app: app.clone(),
        stream: shared,
        queue,
        tx,
        conn_id,
        last_write: TokioInstant::now(),
        gzip: gzip.then(Gzip::default),
    };
    let streams = st.streams.clone();
    tokio::spawn(async move {
        let app = writer.app.clone();
        let shared = writer.stream.clone();
        let code = writer.run(first.freeze()).await;
        streams.by_id.lock().remove(&id);
        // Dropping the session leaves every channel.
        drop(crate::lock_from_async(&shared.session).take());
        app.metrics.connection_closed(Transport::Sse, code);
        tracing::debug!(conn = conn_id, %peer, code, "event stream closed");
    });
    let body = EventStreamBody { rx, guard: Some(guard), shutdown: app.shutdown.clone() };
    let mut response = event_stream_response(Body::new(body));
    if gzip {
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    response
}

/// Subscribes the channels of the URL and those of the resume cursor. The URL is one request,
/// held to `server.max_channels_per_request` like a `/ws` subscribe; the cursor's channels
/// (which may have been added one control request at a time) are subscribed in batches.
fn initial_subscribe(
    session: &mut Session,
    requested: &[String],
    recover: &BTreeMap<String, StreamPosition>,
    tokens: &BTreeMap<String, String>,
) -> Result<SubscribeResults, FrameError> {
    let limit = session.app().config.server.max_channels_per_request;
    if requested.len() > limit {
        // Session::subscribe words the refusal exactly as /ws does.
        return session.subscribe_with_tokens(requested, recover, tokens);
    }
    let mut channels: Vec<&str> = Vec::with_capacity(requested.len() + recover.len());
    let mut seen = HashSet::new();
    for c in requested.iter().map(String::as_str).chain(recover.keys().map(String::as_str)) {
        if seen.insert(c) {
            channels.push(c);
        }
    }
    let mut results = SubscribeResults::new();
    for batch in channels.chunks(limit) {
        results.append(&mut session.subscribe_with_tokens(batch, recover, tokens)?);
    }
    Ok(results)
}

/// The answer to a stream or control request refused by a `[limits]` limit: `429` with
/// `Retry-After`, and a JSON body naming the limit.
fn limited(refusal: &crate::limits::LimitRefusal) -> Response<Body> {
    let mut resp = json_response(
        StatusCode::TOO_MANY_REQUESTS,
        json!({
            "error": "rate_limited",
            "limit": format!("limits.{}", refusal.limit),
            "message": refusal.message,
            "retry_after_ms": refusal.retry_after_ms,
        }),
    );
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(refusal.retry_after_s()));
    resp
}

fn event_stream_response(body: Body) -> Response<Body> {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .header(header::CONNECTION, "keep-alive")
        .body(body)
        .expect("static response")
}

/// A random reconnect delay between `reconnect_after_ms` and twice that, and the 1001-style
/// reason text carrying it, so a fleet of clients does not come back in one wave.
fn reconnect_hint(app: &AppState) -> (u64, String) {
    let base = app.config.server.reconnect_after_ms;
    let after = rand::rng().random_range(base..=base * 2);
    (after, format!("{{\"reconnect\":true,\"after_ms\":{after}}}"))
}

// ------------------------------------------------------------------------------------------
// The writer

/// Why a stream ended before its writer chose to end it.
enum Ended {
    /// The client went away (the response body was dropped).
    Gone,
    /// The client stopped reading for longer than a heartbeat round.
    Stalled,
    /// Shutdown began while a write was waiting.
    Draining,
    /// What the client's own control requests queued stayed over budget, unread.
    Backlogged,
}

/// How often a blocked stream checks whether its client's requests are piling up.
const BACKLOG_CHECK: Duration = Duration::from_millis(500);

struct Writer {
    app: Arc<AppState>,
    stream: Arc<SseStream>,
    queue: Arc<ConnQueue>,
    tx: mpsc::Sender<Bytes>,
    conn_id: u64,
    last_write: TokioInstant,
    /// The stream is gzip-encoded ([`crate::sse_gzip`]).
    gzip: Option<Gzip>,
}

impl Writer {
    /// `text` as the stream carries it: as is, or in gzip's stored blocks.
    fn framed(&mut self, text: &[u8]) -> Bytes {
        match &mut self.gzip {
            None => Bytes::copy_from_slice(text),
            Some(gzip) => {
                let mut out = BytesMut::with_capacity(text.len() + 16);
                gzip.plain(&mut out, text);
                out.freeze()
            }
        }
    }

    /// Streams until the client leaves, the queue overflows or the server drains; returns the
    /// close code recorded in the metrics.
    async fn run(mut self, first: Bytes) -> u16 {
        let mut drain_rx = self.app.shutdown.subscribe();
        let first = if self.gzip.is_some() { self.framed(&first) } else { first };
        if let Err(end) = self.send(first, &mut drain_rx).await {
            return self.ended(end);
        }
        let ping_interval = Duration::from_millis(self.app.config.server.ping_interval_ms);
        let mut drained = Drained::default();
        loop {
            if *drain_rx.borrow() {
                let (after_ms, reason) = reconnect_hint(&self.app);
                tracing::debug!(conn = self.conn_id, "draining: ending event stream with 1001");
                return self.close(CloseCode::GoingAway.code(), &reason, after_ms).await;
            }
            if let Some((code, reason)) = self.stream.handle.must_close() {
                tracing::info!(
                    conn = self.conn_id,
                    code = code.code(),
                    "ending event stream: {reason}"
                );
                let (after_ms, _) = reconnect_hint(&self.app);
                return self.close(code.code(), reason, after_ms).await;
            }
            // Read each turn: an `auth` on the control endpoint may have moved it.
            let auth = self.stream.handle.auth_deadline();
            if let Some((due, code, reason)) = auth
                && due <= std::time::Instant::now()
            {
                tracing::info!(
                    conn = self.conn_id,
                    code = code.code(),
                    "ending event stream: {reason}"
                );
                self.app.auth.count_refusal(match code {
                    CloseCode::TokenExpired => "expired_connection",
                    _ => "auth_timeout",
                });
                return self.close(code.code(), reason, 0).await;
            }
            let auth_due = auth.map(|(due, ..)| {
                TokioInstant::now() + due.saturating_duration_since(std::time::Instant::now())
            });
            tokio::select! {
                _ = async {
                    match auth_due {
                        Some(at) => sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {}
                _ = self.queue.notified() => {
                    drained.frames.clear();
                    self.queue.drain_into(&mut drained);
                    let chunk = self.format(&mut drained);
                    if !chunk.is_empty()
                        && let Err(end) = self.send(chunk, &mut drain_rx).await
                    {
                        return self.ended(end);
                    }
                    if let Some((code, reason)) = drained.close.take() {
                        tracing::info!(conn = self.conn_id, code, "ending event stream as the server asked: {reason}");
                        return self.close(code, &reason, 0).await;
                    }
                    if drained.overflowed {
                        tracing::info!(conn = self.conn_id, "slow consumer: outbound queue overflowed, ending event stream with 4008");
                        let (after_ms, _) = reconnect_hint(&self.app);
                        let code = CloseCode::SlowConsumer;
                        return self.close(code.code(), code.reason(), after_ms).await;
                    }
                    if drained.frames.capacity() > 1024 {
                        drained.frames = Vec::new();
                    }
                }
                _ = sleep_until(self.last_write + ping_interval) => {
                    let beat = if self.gzip.is_some() { self.framed(HEARTBEAT) } else { Bytes::from_static(HEARTBEAT) };
                    if let Err(end) = self.send(beat, &mut drain_rx).await {
                        return self.ended(end);
                    }
                }
                _ = drain_rx.changed() => {}
                _ = self.tx.closed() => return self.ended(Ended::Gone),
            }
        }
    }

    /// Hands one chunk to the response body, waiting while the client reads. A client that
    /// takes no chunk for a whole heartbeat round (interval plus timeout) is given up on: with
    /// a conflating namespace its queue never overflows, so this is what frees it.
    async fn send(
        &mut self,
        chunk: Bytes,
        drain_rx: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), Ended> {
        let server = &self.app.config.server;
        let stall = Duration::from_millis(server.ping_interval_ms + server.pong_timeout_ms);
        let stall_at = TokioInstant::now() + stall;
        // A client that keeps sending control requests while it reads nothing is given up on
        // sooner: once what its requests queued stays over budget for a pong timeout.
        let backlog_grace = Duration::from_millis(server.pong_timeout_ms);
        let mut backlogged_since: Option<TokioInstant> = None;
        let mut check = tokio::time::interval(BACKLOG_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let permit = loop {
            tokio::select! {
                permit = self.tx.reserve() => break permit.map_err(|_| Ended::Gone)?,
                _ = sleep_until(stall_at) => return Err(Ended::Stalled),
                _ = check.tick() => {
                    let now = TokioInstant::now();
                    if !self.queue.replies_over_budget() {
                        backlogged_since = None;
                    } else if now - *backlogged_since.get_or_insert(now) >= backlog_grace {
                        return Err(Ended::Backlogged);
                    }
                }
                _ = drain_rx.wait_for(|d| *d), if !*drain_rx.borrow() => return Err(Ended::Draining),
            }
        };
        permit.send(chunk);
        self.last_write = TokioInstant::now();
        Ok(())
    }

    fn ended(&self, end: Ended) -> u16 {
        match end {
            Ended::Gone => CloseCode::Normal.code(),
            Ended::Draining => CloseCode::GoingAway.code(),
            Ended::Stalled => {
                tracing::info!(
                    conn = self.conn_id,
                    "client stopped reading the event stream; ending it with 4009"
                );
                CloseCode::HeartbeatTimeout.code()
            }
            Ended::Backlogged => {
                tracing::info!(
                    conn = self.conn_id,
                    "client sends control requests but does not read the event stream; ending it with 4008"
                );
                CloseCode::SlowConsumer.code()
            }
        }
    }

    /// Sends the final `close` event (with `retry:` so EventSource waits `after_ms` before it
    /// reconnects) and ends the stream.
    async fn close(&mut self, code: u16, reason: &str, after_ms: u64) -> u16 {
        let mut out = BytesMut::new();
        put_close(&mut out, code, reason, after_ms);
        let last = match &mut self.gzip {
            None => out.freeze(),
            Some(gzip) => {
                let mut body = BytesMut::with_capacity(out.len() + 32);
                gzip.plain(&mut body, &out);
                gzip.finish(&mut body);
                body.freeze()
            }
        };
        // Best effort: a client that does not take it within a second misses it.
        let _ = tokio::time::timeout(CLOSE_LINGER, self.tx.send(last)).await;
        code
    }

    /// Turns drained queue entries into event text, updating the cursor and the metrics.
    /// On a gzip stream, large messages of compressing namespaces go as the compressed bytes
    /// `/ws` shares, the rest in stored blocks.
    fn format(&mut self, drained: &mut Drained) -> Bytes {
        let now = Instant::now();
        let mut latency = LocalHistogram::default();
        let mut messages = 0u64;
        let size: usize = drained.frames.iter().map(|f| f.bytes.len() + 16).sum();
        let mut out = BytesMut::with_capacity(size);
        let mut zipped = self.gzip.as_ref().map(|_| BytesMut::with_capacity(size / 2 + 64));
        let (mut deflated, mut deflated_plain, mut deflated_wire) = (0u64, 0u64, 0u64);
        let stream = self.stream.clone();
        let mut cursor = stream.cursor.lock();
        for frame in drained.frames.drain(..) {
            if frame.bytes.is_empty() {
                continue;
            }
            if !frame.is_message() {
                cursor.notice(&frame.bytes);
                put_event(&mut out, None, &frame.bytes);
                continue;
            }
            messages += 1;
            if let Some(at) = frame.published_at {
                latency.record(now.saturating_duration_since(at));
            }
            let retained = match MsgView::parse(&frame.bytes) {
                Some(msg) if !msg.ephemeral => {
                    cursor.advance(msg.channel, msg.epoch, msg.offset);
                    true
                }
                _ => false,
            };
            let id = retained.then_some(&*cursor);
            // The shared compressed bytes, for a one-line frame of a compressing namespace.
            let shared = match (&mut zipped, frame.forms.as_ref().filter(|f| f.compress)) {
                (Some(_), Some(forms))
                    if !frame.bytes.iter().any(|b| matches!(b, b'\n' | b'\r')) =>
                {
                    let metrics = &self.app.metrics.deflate;
                    let z = forms.get_or_compress(|| deflate::compress(&frame.bytes, metrics));
                    (!z.is_empty()).then(|| z.clone())
                }
                _ => None,
            };
            let (Some(zipped), Some(gzip), Some(z)) = (&mut zipped, &mut self.gzip, shared) else {
                put_event(&mut out, id, &frame.bytes);
                continue;
            };
            // The event's own lines up to its data in stored blocks, the data compressed.
            put_event_head(&mut out, id);
            gzip.plain(zipped, &out);
            out.clear();
            gzip.compressed(zipped, &frame.bytes, &z);
            out.put_slice(b"\n\n");
            deflated += 1;
            deflated_plain += frame.bytes.len() as u64;
            deflated_wire += z.len() as u64;
        }
        drop(cursor);
        let out = match (zipped, &mut self.gzip) {
            (Some(mut zipped), Some(gzip)) => {
                if !out.is_empty() {
                    gzip.plain(&mut zipped, &out);
                }
                zipped
            }
            _ => out,
        };
        latency.flush_into(&self.app.metrics.delivery_latency);
        self.app.metrics.delivered(Transport::Sse, messages, out.len() as u64);
        if deflated != 0 {
            let d = &self.app.metrics.deflate;
            d.frames.fetch_add(deflated, std::sync::atomic::Ordering::Relaxed);
            d.plain_bytes.fetch_add(deflated_plain, std::sync::atomic::Ordering::Relaxed);
            d.wire_bytes.fetch_add(deflated_wire, std::sync::atomic::Ordering::Relaxed);
        }
        out.freeze()
    }
}

/// The response body: chunks from the writer, ended when the writer drops its sender. When
/// the client goes away hyper drops the body, and the writer sees its channel closed.
///
/// The body, not the writer, holds the stream's place in the connection count: the count
/// may reach zero (and a draining server exit) only once hyper has taken the last event.
struct EventStreamBody {
    rx: mpsc::Receiver<Bytes>,
    guard: Option<ConnectionGuard>,
    shutdown: Shutdown,
}

/// How long a drained stream keeps counting after hyper dropped its body: hyper drops the
/// body before it writes the end of the chunked response and flushes, and a server that
/// drains would otherwise exit with the final `close` event still in its buffer.
const FLUSH_GRACE: Duration = Duration::from_millis(100);

impl Drop for EventStreamBody {
    fn drop(&mut self) {
        let Some(guard) = self.guard.take() else { return };
        if self.shutdown.is_draining()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                tokio::time::sleep(FLUSH_GRACE).await;
                drop(guard);
            });
        }
    }
}

impl hyper::body::Body for EventStreamBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|chunk| chunk.map(|c| Ok(hyper::body::Frame::data(c))))
    }
}

/// Appends what precedes a one-line event's frame: its optional `id:` line, then `data: `.
fn put_event_head(out: &mut BytesMut, id: Option<&Cursor>) {
    if let Some(cursor) = id {
        out.put_slice(b"id: ");
        cursor.write_to(out);
        out.put_u8(b'\n');
    }
    out.put_slice(b"data: ");
}

/// Appends one event: an optional `id:` line (the cursor), then the frame as `data:` lines.
/// JSON may contain line breaks only as whitespace, and EventSource joins `data:` lines with
/// `\n`, so splitting a pretty-printed payload at its line breaks keeps it intact.
fn put_event(out: &mut BytesMut, id: Option<&Cursor>, frame: &[u8]) {
    if let Some(cursor) = id {
        out.put_slice(b"id: ");
        cursor.write_to(out);
        out.put_u8(b'\n');
    }
    if !frame.iter().any(|b| *b == b'\n' || *b == b'\r') {
        out.put_slice(b"data: ");
        out.put_slice(frame);
        out.put_u8(b'\n');
    } else {
        let mut rest = frame;
        loop {
            let end = rest.iter().position(|b| *b == b'\n' || *b == b'\r').unwrap_or(rest.len());
            out.put_slice(b"data: ");
            out.put_slice(&rest[..end]);
            out.put_u8(b'\n');
            if end == rest.len() {
                break;
            }
            let skip = if rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n') { 2 } else { 1 };
            rest = &rest[end + skip..];
        }
    }
    out.put_u8(b'\n');
}

/// The last event of a stream the server ends: `retry:` then a `close` frame.
fn put_close(out: &mut BytesMut, code: u16, reason: &str, after_ms: u64) {
    out.put_slice(format!("retry: {after_ms}\n").as_bytes());
    let frame = json!({"type": "close", "code": code, "reason": reason}).to_string();
    put_event(out, None, frame.as_bytes());
}

// ------------------------------------------------------------------------------------------
// The resume cursor

/// A stream's position in each of its channels, rendered as the events' `id:` and parsed
/// back from `Last-Event-ID`: `channel=epoch:offset` pairs joined by commas (channel names
/// never contain `=` or `,`; epochs never contain `:`).
#[derive(Debug, Default)]
struct Cursor {
    positions: BTreeMap<String, StreamPosition>,
}

impl Cursor {
    /// Parses a `Last-Event-ID`, keeping at most `limit` channels. Malformed pairs are skipped:
    /// the channel is then simply not resumed.
    fn parse(text: &str, limit: usize) -> BTreeMap<String, StreamPosition> {
        text.split(',')
            .filter_map(|pair| {
                let (channel, position) = pair.trim().split_once('=')?;
                let (epoch, offset) = position.rsplit_once(':')?;
                ferrocast_protocol::validate_channel(channel).ok()?;
                if epoch.is_empty() {
                    return None;
                }
                let offset = offset.parse().ok()?;
                Some((channel.to_owned(), StreamPosition { epoch: epoch.to_owned(), offset }))
            })
            .take(limit)
            .collect()
    }

    /// Records a subscribe outcome: a recovered channel stands where the client said it was
    /// (the replay follows); any other stands at the channel's top when it subscribed (what
    /// comes next is live, or a snapshot the client does not need again after a reconnect).
    fn subscribed(
        &mut self,
        channel: &str,
        result: &ChannelResult,
        recover: Option<&StreamPosition>,
    ) {
        let ChannelResult::Subscribed { epoch, offset, recovered, .. } = result else {
            self.positions.remove(channel);
            return;
        };
        let target = match (recovered, recover) {
            (Some(true), Some(pos)) => pos.clone(),
            _ => StreamPosition { epoch: epoch.clone(), offset: *offset },
        };
        match self.positions.get_mut(channel) {
            Some(current) if current.epoch == target.epoch => {
                current.offset = current.offset.max(target.offset)
            }
            Some(current) => *current = target,
            None => {
                self.positions.insert(channel.to_owned(), target);
            }
        }
    }

    /// Follows the server's own subscription changes (`subscribed` and `unsubscribed`
    /// notices: a token's channels, the server API), so a resumed stream keeps them.
    fn notice(&mut self, frame: &[u8]) {
        #[derive(Deserialize)]
        struct Notice<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            channel: Option<String>,
            result: Option<Position>,
        }
        #[derive(Deserialize)]
        struct Position {
            epoch: Option<String>,
            offset: Option<u64>,
        }
        let Ok(notice) = serde_json::from_slice::<Notice<'_>>(frame) else { return };
        let Some(channel) = notice.channel else { return };
        match (notice.kind, notice.result) {
            ("subscribed", Some(Position { epoch: Some(epoch), offset: Some(offset) })) => {
                let result = ChannelResult::Subscribed {
                    epoch,
                    offset,
                    recovered: None,
                    replayed: None,
                    snapshot: None,
                };
                self.subscribed(&channel, &result, None);
            }
            ("unsubscribed", _) => {
                self.positions.remove(&channel);
            }
            _ => {}
        }
    }

    /// Moves `channel` to a delivered message. Channels not in the cursor (unsubscribed) are
    /// left out, so a message still queued after an unsubscribe does not bring them back.
    fn advance(&mut self, channel: &str, epoch: &str, offset: u64) {
        if let Some(current) = self.positions.get_mut(channel) {
            if current.epoch == epoch {
                current.offset = current.offset.max(offset);
            } else {
                current.epoch.clear();
                current.epoch.push_str(epoch);
                current.offset = offset;
            }
        }
    }

    fn write_to(&self, out: &mut BytesMut) {
        let mut digits = [0u8; 20];
        for (i, (channel, pos)) in self.positions.iter().enumerate() {
            if i > 0 {
                out.put_u8(b',');
            }
            out.put_slice(channel.as_bytes());
            out.put_u8(b'=');
            out.put_slice(pos.epoch.as_bytes());
            out.put_u8(b':');
            out.put_slice(format_u64(&mut digits, pos.offset));
        }
    }
}

/// Formats `n` in decimal into `buf`, without allocating.
fn format_u64(buf: &mut [u8; 20], mut n: u64) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

// ------------------------------------------------------------------------------------------
// Reading msg frames

/// The parts of a hub `msg` frame that transports other than `/ws` need, borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MsgView<'a> {
    pub channel: &'a str,
    pub offset: u64,
    pub epoch: &'a str,
    pub ephemeral: bool,
    /// The message's data, one JSON value, verbatim.
    pub data: &'a [u8],
}

impl<'a> MsgView<'a> {
    /// Reads a `msg` frame. Frames from [`ferrocast_protocol::server::encode_msg`] are read
    /// from their fixed layout without scanning the data; anything else goes through a JSON
    /// parser. `None` when the frame is not a `msg`.
    pub(crate) fn parse(frame: &'a [u8]) -> Option<Self> {
        Self::parse_encoded(frame).or_else(|| Self::parse_json(frame))
    }

    fn parse_encoded(frame: &'a [u8]) -> Option<Self> {
        fn until_quote(s: &[u8]) -> Option<(&str, &[u8])> {
            let end = s.iter().position(|b| *b == b'"')?;
            Some((std::str::from_utf8(&s[..end]).ok()?, &s[end..]))
        }
        let rest = frame.strip_prefix(br#"{"type":"msg","channel":""#.as_slice())?;
        let (channel, rest) = until_quote(rest)?;
        let rest = rest.strip_prefix(br#"","offset":"#.as_slice())?;
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let offset = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
        let rest = rest[digits..].strip_prefix(br#","epoch":""#.as_slice())?;
        let (epoch, rest) = until_quote(rest)?;
        let (ephemeral, rest) = match rest.strip_prefix(br#"","ephemeral":true,"data":"#.as_slice())
        {
            Some(rest) => (true, rest),
            None => (false, rest.strip_prefix(br#"","data":"#.as_slice())?),
        };
        let data = rest.strip_suffix(b"}".as_slice())?;
        Some(MsgView { channel, offset, epoch, ephemeral, data })
    }

    fn parse_json(frame: &'a [u8]) -> Option<Self> {
        #[derive(Deserialize)]
        struct Raw<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            channel: &'a str,
            offset: u64,
            epoch: &'a str,
            #[serde(default)]
            ephemeral: bool,
            #[serde(borrow)]
            data: &'a RawValue,
        }
        let raw: Raw<'a> = serde_json::from_slice(frame).ok()?;
        (raw.kind == "msg").then_some(MsgView {
            channel: raw.channel,
            offset: raw.offset,
            epoch: raw.epoch,
            ephemeral: raw.ephemeral,
            data: raw.data.get().as_bytes(),
        })
    }
}

// ------------------------------------------------------------------------------------------
// POST /sse/control

#[derive(Deserialize)]
struct ControlAuth<'a> {
    #[serde(borrow)]
    session: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    token: std::borrow::Cow<'a, str>,
}

/// The header that may carry the stream's secret instead of the body's `token`, which then
/// belongs to the request (an `auth` op's connection token).
pub const STREAM_TOKEN_HEADER: &str = "x-ferrocast-stream-token";

/// `POST /sse/control`: one native request (`subscribe`, `unsubscribe`, `publish`, `ping`,
/// `auth`) for a live stream, with the stream's `session` id and its secret (the body's
/// `token`, or the [`STREAM_TOKEN_HEADER`] header). The reply frame is the response body;
/// replayed messages go onto the stream.
async fn control(
    State(st): State<SseState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response<Body> {
    let app = &st.app;
    let limit = app.config.server.max_frame_bytes;
    let body =
        match crate::body::read(app, peer, &headers, body, limit, "server.max_frame_bytes").await {
            Ok(body) => body,
            Err(refusal) => {
                if refusal.status == StatusCode::PAYLOAD_TOO_LARGE {
                    app.metrics.frame_error("frame_too_big");
                }
                let mut resp = control_error(refusal.status, None, refusal.code, &refusal.message);
                resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                return resp;
            }
        };
    let Ok(text) = std::str::from_utf8(&body) else {
        return control_error(StatusCode::BAD_REQUEST, None, "bad_request", "body is not UTF-8");
    };
    let auth: ControlAuth<'_> = match serde_json::from_str(text) {
        Ok(a) => a,
        Err(e) => {
            app.metrics.frame_error(ErrorCode::BadRequest.as_str());
            return control_error(
                StatusCode::BAD_REQUEST,
                None,
                "bad_request",
                &format!(
                    "expected a JSON object with \"session\", \"token\" and \"op\" fields: {e}"
                ),
            );
        }
    };
    let Some(stream) = st.streams.get(&auth.session) else {
        return control_error(
            StatusCode::NOT_FOUND,
            None,
            "unknown_session",
            "no open event stream has this session id (it ended, or was opened on another server)",
        );
    };
    let secret = match headers.get(STREAM_TOKEN_HEADER) {
        Some(value) => value.as_bytes(),
        None => auth.token.as_bytes(),
    };
    if !crate::access::secrets_equal(secret, stream.token.as_bytes()) {
        app.metrics.frame_error(ErrorCode::Forbidden.as_str());
        return control_error(
            StatusCode::FORBIDDEN,
            None,
            "forbidden",
            "wrong token for this session: use the token from the stream's welcome event",
        );
    }
    if stream.handle.queue.replies_over_budget() {
        // The stream has not taken what earlier requests queued on it: stop taking more
        // until it does (its queue closes it with 4008 if it never does).
        app.metrics.frame_error("backpressure");
        return control_error(
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            "backpressure",
            "this event stream has not read what earlier requests queued on it \
             (server.queue_max_bytes); read the stream, then retry",
        );
    }
    let frame = parse_client_frame(text);
    // Every request counts against the stream's budget, even a malformed one; pongs are free.
    if !matches!(frame, Ok(ClientFrame::Pong)) {
        let id = frame.as_ref().map_or_else(|e| e.id, ClientFrame::id);
        if let Some(reply) = admit_control(&stream, id) {
            let mut resp = Response::new(Body::from(reply));
            *resp.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            let headers = resp.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            headers.insert(header::RETRY_AFTER, HeaderValue::from(1));
            return resp;
        }
    }
    let (status, reply) = match frame {
        Ok(frame) => match handle_control(&stream, frame) {
            Some(reply) => (StatusCode::OK, reply),
            None => {
                return control_error(
                    StatusCode::NOT_FOUND,
                    None,
                    "unknown_session",
                    "the event stream has ended",
                );
            }
        },
        Err(e) => {
            let mut guard = crate::lock_from_async(&stream.session);
            let Some(session) = guard.as_mut() else {
                return control_error(
                    StatusCode::NOT_FOUND,
                    None,
                    "unknown_session",
                    "the event stream has ended",
                );
            };
            (StatusCode::BAD_REQUEST, session.error_frame(e))
        }
    };
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(reply))
        .expect("static response")
}

/// Counts a control request against the stream's request budget; the `rate_limited` error
/// reply when it is over.
fn admit_control(stream: &SseStream, id: Option<u64>) -> Option<Bytes> {
    let mut guard = crate::lock_from_async(&stream.session);
    let session = guard.as_mut()?;
    let e = session.admit_request().err()?;
    Some(session.error_frame(FrameError { id, ..e }))
}

/// Carries out one request on a stream; `None` when the stream has ended meanwhile.
fn handle_control(stream: &SseStream, frame: ClientFrame<'_>) -> Option<Bytes> {
    match frame {
        ClientFrame::Subscribe { id, channels, recover, tokens } => {
            // Channels new to the cursor get a placeholder first, so messages the writer
            // drains before this request finishes already move them.
            let mut added = Vec::new();
            {
                let mut cursor = stream.cursor.lock();
                for channel in &channels {
                    if !cursor.positions.contains_key(channel.as_ref()) {
                        let start = recover
                            .get(channel.as_ref())
                            .cloned()
                            .unwrap_or(StreamPosition { epoch: String::new(), offset: 0 });
                        cursor.positions.insert(channel.to_string(), start);
                        added.push(channel.to_string());
                    }
                }
            }
            let mut guard = crate::lock_from_async(&stream.session);
            let Some(session) = guard.as_mut() else {
                let mut cursor = stream.cursor.lock();
                for channel in &added {
                    cursor.positions.remove(channel);
                }
                return None;
            };
            let outcome = session.subscribe_with_tokens(&channels, &recover, &tokens);
            let subscribed: HashSet<String> = session.subscribed_channels().into_iter().collect();
            let reply = match &outcome {
                Ok(results) => encode_ack_with(id, results),
                Err(e) => session.error_frame(FrameError { id, ..e.clone() }),
            };
            drop(guard);
            let mut cursor = stream.cursor.lock();
            for channel in &added {
                match outcome.as_ref().ok().and_then(|r| r.get(channel)) {
                    Some(result) if subscribed.contains(channel) => {
                        cursor.subscribed(channel, result, recover.get(channel))
                    }
                    _ => {
                        cursor.positions.remove(channel);
                    }
                }
            }
            Some(reply)
        }
        ClientFrame::Unsubscribe { id, channels } => {
            let mut guard = crate::lock_from_async(&stream.session);
            let session = guard.as_mut()?;
            let reply = match session.unsubscribe(&channels) {
                Ok(()) => {
                    let mut cursor = stream.cursor.lock();
                    for channel in &channels {
                        cursor.positions.remove(channel.as_ref());
                    }
                    encode_ack(id)
                }
                Err(e) => session.error_frame(FrameError { id, ..e }),
            };
            Some(reply)
        }
        ClientFrame::Publish { id, channel, data } => {
            let mut guard = crate::lock_from_async(&stream.session);
            let session = guard.as_mut()?;
            Some(match session.publish(&channel, data.get().as_bytes()) {
                Ok(result) => encode_ack_with(id, &result),
                Err(e) => session.error_frame(FrameError { id, ..e }),
            })
        }
        ClientFrame::Auth { id, token } => {
            let mut guard = crate::lock_from_async(&stream.session);
            let session = guard.as_mut()?;
            Some(match session.authenticate(&token) {
                Ok(result) => encode_ack_with(id, &result),
                Err(e) => session.error_frame(FrameError { id, ..e }),
            })
        }
        ClientFrame::Ping { id } => {
            crate::lock_from_async(&stream.session).as_ref()?;
            Some(encode_pong(id))
        }
        // Nothing asks an SSE client for a pong; accept one anyway.
        ClientFrame::Pong => {
            crate::lock_from_async(&stream.session).as_ref()?;
            Some(encode_ack(None))
        }
    }
}

fn control_error(status: StatusCode, id: Option<u64>, code: &str, message: &str) -> Response<Body> {
    json_response(status, json!({"type": "error", "id": id, "code": code, "message": message}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrocast_protocol::server::encode_msg;

    #[test]
    fn msg_view_reads_encoded_frames_without_a_parser() {
        let frame = encode_msg("ticks.AAPL", 58, "ep1", br#"{"p":1}"#, false);
        let v = MsgView::parse_encoded(&frame).unwrap();
        assert_eq!(
            v,
            MsgView {
                channel: "ticks.AAPL",
                offset: 58,
                epoch: "ep1",
                ephemeral: false,
                data: br#"{"p":1}"#
            }
        );
        let frame = encode_msg("candles.X.1m", 3, "e", b"[1,2]", true);
        let v = MsgView::parse(&frame).unwrap();
        assert!(v.ephemeral);
        assert_eq!(v.data, b"[1,2]");
    }

    #[test]
    fn msg_view_falls_back_to_json() {
        let frame = br#"{"channel":"a.b","data":{"x":"}"},"epoch":"e","offset":2,"type":"msg"}"#;
        assert!(MsgView::parse_encoded(frame).is_none());
        let v = MsgView::parse(frame).unwrap();
        assert_eq!((v.channel, v.offset, v.epoch), ("a.b", 2, "e"));
        assert_eq!(v.data, br#"{"x":"}"}"#);
        assert!(MsgView::parse(br#"{"type":"ack","id":1}"#).is_none());
    }

    #[test]
    fn cursor_round_trips_and_skips_garbage() {
        let parsed = Cursor::parse("ticks.AAPL=ep1:58, quotes.AAPL=ep2:12,bad,x=:1,y=e:z", 10);
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed["ticks.AAPL"], StreamPosition { epoch: "ep1".into(), offset: 58 });
        let cursor = Cursor { positions: parsed };
        let mut out = BytesMut::new();
        cursor.write_to(&mut out);
        assert_eq!(&out[..], b"quotes.AAPL=ep2:12,ticks.AAPL=ep1:58");
        assert_eq!(Cursor::parse("a=e:1,b=e:2,c=e:3", 2).len(), 2);
        // Channel names may contain ':'; the epoch is what follows the '='.
        assert_eq!(Cursor::parse("chat:x=e:7", 1)["chat:x"].offset, 7);
    }

    #[test]
    fn cursor_moves_forward_only_within_an_epoch() {
        let mut c = Cursor::default();
        let subscribed = ChannelResult::Subscribed {
            epoch: "e".into(),
            offset: 10,
            recovered: Some(true),
            replayed: Some(5),
            snapshot: None,
        };
        let from = StreamPosition { epoch: "e".into(), offset: 5 };
        c.subscribed("a", &subscribed, Some(&from));
        assert_eq!(c.positions["a"].offset, 5, "a recovered channel starts where the client was");
        c.advance("a", "e", 6);
        c.advance("a", "e", 4);
        assert_eq!(c.positions["a"].offset, 6);
        c.advance("a", "f", 1);
        assert_eq!(c.positions["a"], StreamPosition { epoch: "f".into(), offset: 1 });
        c.advance("gone", "e", 1);
        assert!(!c.positions.contains_key("gone"));
        let fresh = ChannelResult::Subscribed {
            epoch: "g".into(),
            offset: 9,
            recovered: None,
            replayed: None,
            snapshot: None,
        };
        c.subscribed("b", &fresh, None);
        assert_eq!(c.positions["b"].offset, 9);
    }

    #[test]
    fn events_split_multiline_data() {
        let mut out = BytesMut::new();
        put_event(&mut out, None, b"{\"a\":\r\n 1,\n\"b\":2}");
        assert_eq!(&out[..], b"data: {\"a\":\ndata:  1,\ndata: \"b\":2}\n\n");
        let mut out = BytesMut::new();
        put_event(&mut out, None, b"{}");
        assert_eq!(&out[..], b"data: {}\n\n");
    }
}
