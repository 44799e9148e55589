//! Socket.IO v4 (Engine.IO v4) on `[socketio] path` (default `/socket.io/`), through
//! `socketioxide`: long-polling, websocket and the upgrade between them, so unchanged
//! `socket.io-client` and `python-socketio` apps connect to the same channels as `/ws`.
//!
//! Each socket on the main namespace `/` gets one [`Session`] (transport `socketio`), so the
//! channels, permissions, limits and metrics are those of every other transport. Clients emit:
//!
//! | event | payload | ack (callback argument) |
//! | --- | --- | --- |
//! | `subscribe` | `"ch"`, `["a","b"]` or `{channels, recover}` | per-channel results, as the native ack's `result` |
//! | `unsubscribe` | `"ch"`, `["a","b"]` or `{channels}` | `{"unsubscribed":[...]}` |
//! | `publish` | `{channel, data}` | `{channel, offset, epoch}` |
//! | `ping` | anything | the same payload (also emitted back as `pong`) |
//!
//! A refused request is acknowledged with `{"error":{"code":..,"message":..}}`, the shape of a
//! per-channel error in a native ack. The server emits `message` with
//! `{channel, offset, epoch, data}` for every message (`ephemeral: true` added for transient
//! ones), and, where the channel's namespace sets `socketio_event` (e.g. `price_update`), that
//! event too with the data alone, so apps written for another Socket.IO server keep their
//! handlers. Before the server ends a socket it emits `close` with `{code, reason}`: 1001 with a
//! reconnect hint when draining (the transport is then dropped without an Engine.IO close
//! packet, see [`crate::sio_engine`], and clients reconnect by themselves), 4008 when the
//! socket's queue overflowed (the socket is then disconnected).
//!
//! Events are handled synchronously, in arrival order, by [`Event`] (socketioxide would
//! otherwise run each handler in a task of its own, so an `unsubscribe` could overtake the
//! `subscribe` before it). A per-socket task drains the session's queue and emits; when the
//! engine's per-socket buffer is full it backs off and retries, and meanwhile the backlog stays
//! in the byte-bounded queue where the namespace's overflow policy applies. A socket on
//! websocket has a [`Splice`] (from the start, or, for a session that started on polling, once
//! its upgrade is done and its barrier has passed, see [`crate::sio_engine`]): its writer
//! frames the packets itself (each message's `message` frame made once, in the message's shared
//! forms) and appends them to the websocket between the library's frames, waiting for the pump
//! while the buffer is above its high-water mark; its acks are queued too (so they keep request
//! order, and the subscribe ack its place before the replay).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::header;
use bytes::Bytes;
use ferrocast_hub::{Drained, Outbound};
use ferrocast_protocol::{CloseCode, ErrorCode, FrameError, StreamPosition};
use parking_lot::Mutex;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;
use socketioxide::adapter::LocalAdapter;
use socketioxide::extract::{AckSender, SocketRef, TryData};
use socketioxide::handler::{ConnectHandler, FromMessageParts, MessageHandler, Value};
use socketioxide::socket::{DisconnectReason, Socket};
use socketioxide::{SendError, SocketError, SocketIo, TransportType};
use tokio::sync::{Notify, oneshot};

use crate::AppState;
use crate::limits::IpSlot;
use crate::metrics::{LocalHistogram, Transport};
use crate::session::{Credentials, Session};
use crate::shutdown::ConnectionGuard;
use crate::sio_engine::{
    EngineFront, PollingDrain, SPLICE_BARRIER_EVENT, Splice, SpliceHandoff, text_frame,
};
use crate::sse::MsgView;
use crate::users::ConnHandle;
use crate::ws::origin_allowed;

/// Packets the engine may buffer per socket before `emit` reports it full. The real bound is
/// the session's byte-bounded queue; this only needs to cover a polling client's round trip.
const ENGINE_BUFFER_PACKETS: usize = 1024;
/// Retry delays while the engine's buffer is full.
const MIN_BACKOFF: Duration = Duration::from_millis(2);
const MAX_BACKOFF: Duration = Duration::from_millis(100);
/// How long a socket condemned for flooding (4029) keeps its transport for the replies
/// queued before its `close` event.
const RATE_CLOSE_LINGER: Duration = Duration::from_secs(1);
/// When a draining websocket socket's writer ends its session: after
/// [`crate::sio_engine::DRAIN_NOTICE`], when its transport is dropped, without waiting on the
/// library's disconnect handler. A polling socket's writer ends it once a poll has carried
/// the `close` event away ([`PollingDrain::told_or_over`]).
const DRAIN_EXIT: Duration = Duration::from_millis(500);

/// The Socket.IO routes (the configured path and everything under it), to merge into the
/// main router. Engine.IO's heartbeat is `server.ping_interval_ms` / `server.pong_timeout_ms`
/// and its largest accepted payload is `server.max_frame_bytes`.
pub fn routes<S: Clone + Send + Sync + 'static>(app: &Arc<AppState>) -> Router<S> {
    let server = &app.config.server;
    let config = &app.config.socketio;
    let builder = SocketIo::builder()
        .req_path(config.path.clone())
        .ping_interval(Duration::from_millis(server.ping_interval_ms))
        .ping_timeout(Duration::from_millis(server.pong_timeout_ms))
        // socketioxide closes (with an Engine.IO `1` close packet) a session that has not
        // sent CONNECT in time: exactly the reference server's `connectTimeout`.
        .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
        .max_payload(server.max_frame_bytes as u64)
        .ws_max_message_size(server.max_frame_bytes)
        .ws_max_frame_size(server.max_frame_bytes)
        .max_buffer_size(ENGINE_BUFFER_PACKETS);
    let polling = config.transports.iter().any(|t| t == "polling");
    let websocket = config.transports.iter().any(|t| t == "websocket");
    let builder = match (polling, websocket) {
        (true, false) => builder.transports([TransportType::Polling]),
        (false, true) => builder.transports([TransportType::Websocket]),
        _ => builder.transports([TransportType::Polling, TransportType::Websocket]),
    };
    let (service, io) = builder.build_svc();
    // ferrocast's front handles the drain cut-off and the first heartbeat (sio_engine).
    let polls = PollingDrain::new();
    let handoff = SpliceHandoff::new();
    let service = EngineFront::new(service, app.clone(), websocket, polls.clone(), handoff.clone());
    let handoff = (polling && websocket).then_some(handoff);
    let state = Arc::new(SioState { app: app.clone(), polls, handoff });
    let admit_state = state.clone();
    // The middleware runs before socketioxide sends the connect packet, the handler after it
    // (socketioxide spawns the future the handler returns). So the event handlers are
    // registered by the middleware, in place before the client can send its first event, and
    // the writer starts once the socket is connected.
    let middleware = move |s: SocketRef, TryData(auth): TryData<serde_json::Value>| {
        let state = admit_state.clone();
        // The CONNECT packet's `auth: {token}` (socket.io-client's `auth` option).
        let token = auth.ok().and_then(|a| a.get("token")?.as_str().map(str::to_owned));
        async move {
            let address = admit(&state, &s)?;
            prepare(&state, &s, token, address).await
        }
    };
    let handler = move |s: SocketRef| {
        on_connect(state.clone(), s);
        std::future::ready(())
    };
    io.ns("/", handler.with(middleware));

    let path = config.path.trim_end_matches('/');
    Router::new()
        .route_service(path, service.clone())
        .route_service(&format!("{path}/"), service.clone())
        .route_service(&format!("{path}/{{*rest}}"), service)
}

/// State shared by the namespace's handlers. On drain nothing here closes sockets through
/// socketioxide (its close sends packets that stop clients from reconnecting): each writer
/// emits `close`, and [`EngineFront`] then drops the transports.
#[derive(Debug)]
struct SioState {
    app: Arc<AppState>,
    /// Which polling sockets have polled their drain `close` event.
    polls: Arc<PollingDrain>,
    /// Where an upgraded session's writer gets its splice (`None` unless sessions can start
    /// on polling and upgrade).
    handoff: Option<Arc<SpliceHandoff>>,
}

/// Admission, before the socket joins the namespace: the same rules as a `/ws` upgrade. A
/// refusal reaches the client as a `connect_error` whose message names the close code (and,
/// for a `[limits]` refusal, the limit and the delay before trying again).
fn admit(state: &SioState, s: &SocketRef) -> Result<IpSlot, String> {
    let app = &state.app;
    let refusal = if app.shutdown.is_draining() {
        Some((CloseCode::GoingAway, "the server is shutting down; reconnect"))
    } else if !origin_allowed(
        &app.config.server.allowed_origins,
        s.req_parts().headers.get(header::ORIGIN),
    ) {
        Some((CloseCode::PolicyViolation, "this Origin is not in server.allowed_origins"))
    } else if app.connections.over_client_limit(app.config.server.max_connections) {
        Some((CloseCode::TryAgainLater, "connection limit reached; try again later"))
    } else {
        None
    };
    let Some((code, message)) = refusal else {
        let peer = s.req_parts().extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
        let peer = peer.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        return crate::session::admit_address(app, peer, &s.req_parts().headers).map_err(
            |refusal| {
                app.metrics.connection_opened(Transport::SocketIo);
                app.metrics.connection_closed(Transport::SocketIo, 1013);
                format!("{} (retry after {} ms) (1013)", refusal.message, refusal.retry_after_ms)
            },
        );
    };
    tracing::info!(peer = %peer(s), code = code.code(), "refusing socket.io connection: {message}");
    app.metrics.connection_opened(Transport::SocketIo);
    app.metrics.connection_closed(Transport::SocketIo, code.code());
    Err(format!("{message} ({})", code.code()))
}

fn peer(s: &Socket<LocalAdapter>) -> String {
    s.req_parts()
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.to_string())
        .unwrap_or_default()
}

/// An admitted socket, about to join the namespace: give it a session (authenticated with
/// the CONNECT packet's token, or by the connect proxy, which sees the handshake's headers)
/// and its event handlers. A refusal is a CONNECT_ERROR whose message gives the error code,
/// the reason and the close code.
async fn prepare(
    state: &SioState,
    s: &SocketRef,
    token: Option<String>,
    address: IpSlot,
) -> Result<(), String> {
    let app = state.app.clone();
    let mut session = Session::new(app.clone(), Transport::SocketIo);
    // Each message's event is encoded once, for every socket (see `emit_frame`).
    session.queue.want_forms();
    session.hold_address(address);
    let parts = s.req_parts();
    let peer_addr = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)), |ConnectInfo(addr)| *addr);
    let mut credentials = Credentials::from_request(&app, &parts.headers, None, peer_addr);
    // The CONNECT packet's token, not one from the handshake's headers.
    credentials.token = token;
    let refusal = match session.connect(credentials).await {
        Err(refusal) => Some((refusal.connect_error_message(), refusal.code)),
        Ok(_) if session.identity().is_none() && !app.auth.anonymous => {
            app.auth.count_refusal("no_token");
            let code = CloseCode::Unauthorized;
            let message = format!(
                "unauthorized: this server requires a token (auth.anonymous = false): pass auth: {{token}} ({})",
                code.code()
            );
            Some((message, code.code()))
        }
        Ok(_) => None,
    };
    if let Some((message, code)) = refusal {
        tracing::info!(conn = session.conn_id, peer = %peer(s), "refusing socket.io connection: {message}");
        app.metrics.connection_opened(Transport::SocketIo);
        app.metrics.connection_closed(Transport::SocketIo, code);
        return Err(message);
    }
    // Present only for a session that started on websocket (see `sio_engine`).
    let splice = s.req_parts().extensions.get::<Arc<Splice>>().cloned();
    let conn = Arc::new(Conn {
        framed_replies: Mutex::new(splice.is_some()),
        splice,
        handle: session.conn_handle().clone(),
        session: Mutex::new(Some(session)),
        disconnected: Notify::new(),
        reason: Mutex::new(None),
        app,
    });
    for (event, op) in [
        ("subscribe", Op::Subscribe),
        ("unsubscribe", Op::Unsubscribe),
        ("publish", Op::Publish),
        ("ping", Op::Ping),
        ("auth", Op::Auth),
    ] {
        s.on(event, Event { conn: conn.clone(), op });
    }
    let on_disconnect = conn.clone();
    s.on_disconnect(move |reason: DisconnectReason| {
        let conn = on_disconnect.clone();
        async move {
            *conn.reason.lock() = Some(reason);
            conn.disconnected.notify_one();
        }
    });
    s.extensions.insert(conn);
    Ok(())
}

/// A socket joined the namespace: start its writer.
fn on_connect(state: Arc<SioState>, s: SocketRef) {
    let Some(conn) = s.extensions.remove::<Arc<Conn>>() else { return };
    let app = &state.app;
    let guard = app.shutdown.track();
    app.metrics.connection_opened(Transport::SocketIo);
    tracing::debug!(
        conn = conn.handle.conn_id,
        sid = %s.id,
        peer = %peer(&s),
        transport = ?s.transport_type(),
        "socket.io connected"
    );
    tokio::spawn(run_socket(conn, s, state.clone(), guard));
}

/// One socket's state, shared by its event handlers and its writer.
#[derive(Debug)]
struct Conn {
    app: Arc<AppState>,
    /// The session's shared part (its id, its queue, its close verdict), read without the
    /// session's lock, which an event handler may hold while it waits for the auth proxy or
    /// the broker.
    handle: Arc<ConnHandle>,
    /// `None` once the socket has ended.
    session: Mutex<Option<Session>>,
    disconnected: Notify,
    reason: Mutex<Option<DisconnectReason>>,
    /// The websocket's outgoing side, for a session that started on websocket: the writer
    /// writes its frames there itself instead of through `emit` (an upgraded session's writer
    /// is handed its splice later, see `Writer::begin_splice`).
    splice: Option<Arc<Splice>>,
    /// Whether acks and pongs are queued, framed, for the writer to splice (`true` from the
    /// start with a splice; from the barrier on for an upgraded session), rather than handed
    /// to the library. Held while a reply goes to the library, so none can follow the barrier.
    framed_replies: Mutex<bool>,
}

// ------------------------------------------------------------------------------------------
// Client events

#[derive(Debug, Clone, Copy)]
enum Op {
    Subscribe,
    Unsubscribe,
    Publish,
    Ping,
    Auth,
}

/// The handler of one client event. It runs synchronously where socketioxide receives the
/// packet, so a socket's requests are carried out in the order they were sent.
#[derive(Debug, Clone)]
struct Event {
    conn: Arc<Conn>,
    op: Op,
}

/// Type marker for [`Event`]'s [`MessageHandler`] implementation.
#[derive(Debug)]
pub struct InOrder;

impl MessageHandler<LocalAdapter, InOrder> for Event {
    fn call(&self, s: Arc<Socket<LocalAdapter>>, mut v: Value, ack_id: Option<i64>) {
        let Ok(TryData(payload)) =
            TryData::<serde_json::Value>::from_message_parts(&s, &mut v, &ack_id);
        let Ok(ack) = AckSender::<LocalAdapter>::from_message_parts(&s, &mut v, &ack_id);
        let conn = &self.conn;
        let mut guard = crate::lock_from_async(&conn.session);
        let Some(session) = guard.as_mut() else { return };
        let payload = match payload {
            Ok(payload) => payload,
            Err(e) if matches!(self.op, Op::Publish) => {
                // socketioxide parses the payload with serde_json, which gives up beyond 128
                // levels of nesting, before server.max_data_depth can apply.
                let e = bad_request(format!("the event's payload could not be read: {e}"));
                let reply = refused(session, e);
                drop(guard);
                send_ack(conn, ack, ack_id, &reply);
                return;
            }
            Err(_) => serde_json::Value::Null,
        };
        if let Err(e) = session.admit_request() {
            // A condemned socket's requests go unanswered: it is being closed with 4029.
            let closing = session.must_close().is_some();
            let reply = refused(session, e);
            drop(guard);
            if !closing {
                send_ack(conn, ack, ack_id, &reply);
            }
            return;
        }
        let reply = match self.op {
            Op::Subscribe => {
                // The ack must reach the client before the replay the subscribe queues: hold
                // the writer at this point of the queue until the ack is handed to the engine.
                let reservation = conn.handle.queue.reserve();
                let reply = match parse_subscribe(&payload) {
                    Ok((channels, recover, tokens)) => {
                        match session.subscribe_with_tokens(&channels, &recover, &tokens) {
                            Ok(results) => serde_json::to_value(&results).unwrap_or_default(),
                            Err(e) => refused(session, e),
                        }
                    }
                    Err(e) => refused(session, e),
                };
                drop(guard);
                let framed = conn.framed_replies.lock();
                match (*framed, ack_id) {
                    // The writer splices the ack itself, in its place in the queue.
                    (true, Some(id)) => {
                        conn.handle.queue.fill(reservation, ack_frame(id, &reply).into());
                    }
                    _ => {
                        send_ack_locked(conn, &framed, ack, ack_id, &reply);
                        drop(framed);
                        conn.handle.queue.fill(reservation, Bytes::new());
                    }
                }
                return;
            }
            Op::Unsubscribe => match parse_channels(&payload, "unsubscribe") {
                Ok(channels) => match session.unsubscribe(&channels) {
                    Ok(()) => json!({ "unsubscribed": channels }),
                    Err(e) => refused(session, e),
                },
                Err(e) => refused(session, e),
            },
            Op::Publish => match parse_publish(&payload) {
                Ok((channel, data)) => match session.publish(&channel, data.get().as_bytes()) {
                    Ok(result) => serde_json::to_value(&result).unwrap_or_default(),
                    Err(e) => refused(session, e),
                },
                Err(e) => refused(session, e),
            },
            Op::Auth => match payload.get("token").and_then(|t| t.as_str()) {
                Some(token) => match session.authenticate(token) {
                    Ok(result) => serde_json::to_value(&result).unwrap_or_default(),
                    Err(e) => refused(session, e),
                },
                None => refused(session, bad_request("\"auth\" takes {\"token\":T}")),
            },
            Op::Ping => {
                let size = serde_json::to_vec(&payload).map_or(usize::MAX, |v| v.len());
                if size > MAX_PING_ECHO_BYTES {
                    refused(
                        session,
                        bad_request(format!(
                            "ping payload of {size} bytes is not echoed; the limit is {MAX_PING_ECHO_BYTES}"
                        )),
                    )
                } else {
                    drop(guard);
                    let framed = conn.framed_replies.lock();
                    if *framed {
                        // Queued like the ack that follows it, so the two keep their order.
                        let pong = event_frame("pong", payload.to_string().as_bytes());
                        conn.handle.queue.push_control(pong.into());
                    } else if let Err(e) = s.emit("pong", &payload) {
                        tracing::debug!(conn = conn.handle.conn_id, "pong not sent: {e}");
                    }
                    send_ack_locked(conn, &framed, ack, ack_id, &payload);
                    return;
                }
            }
        };
        drop(guard);
        send_ack(conn, ack, ack_id, &reply);
    }
}

/// Sends an event's ack. On a spliced socket it is queued, framed, like a reply on `/ws`, so
/// acks keep the order of the requests (and the subscribe acks, which must be queued, their
/// place among the others). Otherwise acks go straight to the engine's per-socket buffer,
/// outside the session's queue; that buffer is full only when the client has stopped reading
/// while it keeps sending, and such a client is closed with 4008 like on every other transport.
fn send_ack(
    conn: &Conn,
    ack: AckSender<LocalAdapter>,
    ack_id: Option<i64>,
    reply: &serde_json::Value,
) {
    send_ack_locked(conn, &conn.framed_replies.lock(), ack, ack_id, reply);
}

/// [`send_ack`], with [`Conn::framed_replies`] held by the caller.
fn send_ack_locked(
    conn: &Conn,
    framed: &bool,
    ack: AckSender<LocalAdapter>,
    ack_id: Option<i64>,
    reply: &serde_json::Value,
) {
    if *framed {
        let Some(id) = ack_id else { return };
        if !conn.handle.queue.push_control(ack_frame(id, reply).into()) {
            // The queue overflowed (now or before): the writer closes with 4008.
            tracing::debug!(conn = conn.handle.conn_id, "socket.io ack not queued: overflowed");
        }
        return;
    }
    match ack.send(reply) {
        Ok(()) => {}
        Err(SendError::Socket(SocketError::InternalChannelFull)) => {
            if !conn.handle.queue.is_overflowed() {
                tracing::info!(
                    conn = conn.handle.conn_id,
                    "the client sends events but does not read the replies; closing with 4008"
                );
                conn.handle.queue.mark_overflowed();
            }
        }
        Err(e) => tracing::debug!(conn = conn.handle.conn_id, "socket.io ack not sent: {e}"),
    }
}

/// The websocket frame of the ack `id` with the one argument `reply` (`43<id>[reply]`).
fn ack_frame(id: i64, reply: &serde_json::Value) -> Vec<u8> {
    text_frame(format!("43{id}[{reply}]").as_bytes())
}

/// Largest `ping` payload echoed back (as the ack and the `pong` event), serialized.
const MAX_PING_ECHO_BYTES: usize = 1024;

/// Counts and logs a refused request like every transport does, and shapes it as the error
/// object of a native ack.
fn refused(session: &mut Session, e: FrameError) -> serde_json::Value {
    let value = json!({ "error": { "code": e.code.as_str(), "message": e.message } });
    session.error_frame(e);
    value
}

fn bad_request(message: impl Into<String>) -> FrameError {
    FrameError::new(None, ErrorCode::BadRequest, message)
}

/// Channels given as `"ch"`, `["a","b"]` or `{"channels": ...}`.
fn parse_channels(payload: &serde_json::Value, event: &str) -> Result<Vec<String>, FrameError> {
    let list = match payload {
        serde_json::Value::Object(map) => map.get("channels").unwrap_or(&serde_json::Value::Null),
        other => other,
    };
    match list {
        serde_json::Value::String(c) => Ok(vec![c.clone()]),
        serde_json::Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad_request(format!("\"{event}\": every channel must be a string"))),
        _ => Err(bad_request(format!(
            "\"{event}\" takes a channel name, an array of them, or {{\"channels\":[...]}}"
        ))),
    }
}

type SubscribeRequest = (Vec<String>, BTreeMap<String, StreamPosition>, BTreeMap<String, String>);

fn parse_subscribe(payload: &serde_json::Value) -> Result<SubscribeRequest, FrameError> {
    let channels = parse_channels(payload, "subscribe")?;
    let recover = match payload.get("recover") {
        None | Some(serde_json::Value::Null) => BTreeMap::new(),
        Some(r) => serde_json::from_value(r.clone()).map_err(|e| {
            bad_request(format!(
                "\"recover\" must map channels to {{\"epoch\":E,\"offset\":N}}: {e}"
            ))
        })?,
    };
    let tokens = match payload.get("tokens") {
        None | Some(serde_json::Value::Null) => BTreeMap::new(),
        Some(t) => serde_json::from_value(t.clone()).map_err(|e| {
            bad_request(format!("\"tokens\" must map channels to subscription tokens: {e}"))
        })?,
    };
    Ok((channels, recover, tokens))
}

fn parse_publish(payload: &serde_json::Value) -> Result<(String, Box<RawValue>), FrameError> {
    let (Some(channel), Some(data)) =
        (payload.get("channel").and_then(|c| c.as_str()), payload.get("data"))
    else {
        return Err(bad_request("\"publish\" takes {\"channel\":C,\"data\":D}"));
    };
    let data = serde_json::value::to_raw_value(data)
        .map_err(|e| bad_request(format!("\"data\" cannot be encoded: {e}")))?;
    Ok((channel.to_owned(), data))
}

// ------------------------------------------------------------------------------------------
// The writer

/// What a socket is told about a message: the native `msg` frame without its `type`.
#[derive(Serialize)]
struct SioMessage<'a> {
    channel: &'a str,
    offset: u64,
    epoch: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    ephemeral: bool,
    data: &'a RawValue,
}

/// The outcome of handing queued frames to the engine.
enum Flush {
    /// Everything pending was emitted.
    Done,
    /// The engine's buffer is full: retry later.
    Full,
    /// The socket is closed.
    Closed,
}

/// How far the front pending message got: `message` emitted, the namespace's own event not.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Start,
    MessageSent,
}

struct Writer {
    conn: Arc<Conn>,
    socket: SocketRef,
    polls: Arc<PollingDrain>,
    pending: VecDeque<Outbound>,
    stage: Stage,
    /// Some namespace sets `socketio_event`, so each message's channel must be looked at.
    named_events: bool,
    /// Where the frames go once the socket is on websocket (`None`: `emit`).
    splice: Option<Arc<Splice>>,
    /// Where a session that started on polling gets its splice once upgraded (`None` when it
    /// cannot upgrade, or already has one).
    handoff: Option<Arc<SpliceHandoff>>,
    /// The barrier is on its way: nothing is emitted until the splice comes.
    switching: Option<oneshot::Receiver<Arc<Splice>>>,
    /// The engine's session id, which is the socket's (the `sid` of its polling requests).
    sid: String,
}

async fn run_socket(
    conn: Arc<Conn>,
    socket: SocketRef,
    state: Arc<SioState>,
    guard: ConnectionGuard,
) {
    let app = conn.app.clone();
    let conn_id = conn.handle.conn_id;
    let sid = socket.id;
    let mut writer = Writer {
        conn: conn.clone(),
        socket,
        polls: state.polls.clone(),
        pending: VecDeque::new(),
        stage: Stage::Start,
        named_events: app.config.socketio_events(),
        splice: conn.splice.clone(),
        handoff: state.handoff.clone().filter(|_| conn.splice.is_none()),
        switching: None,
        sid: sid.to_string(),
    };
    let code = writer.run().await;
    if writer.switching.is_some()
        && let Some(handoff) = &writer.handoff
    {
        handoff.forget(&writer.sid);
    }
    drop(writer);
    // Dropping the session leaves every channel.
    drop(crate::lock_from_async(&conn.session).take());
    app.metrics.connection_closed(Transport::SocketIo, code);
    tracing::debug!(conn = conn_id, %sid, code, "socket.io closed");
    drop(guard);
}

impl Writer {
    /// Emits queued messages until the socket ends; returns the close code for the metrics.
    async fn run(&mut self) -> u16 {
        let app = self.conn.app.clone();
        let queue = self.conn.handle.queue.clone();
        let mut drain_rx = app.shutdown.subscribe();
        let mut drained = Drained::default();
        let mut backoff = MIN_BACKOFF;
        let mut told_draining = false;
        let mut drain_exit = None;
        let mut polled_away = false;
        let sid = self.sid.clone();
        let mut missed_push = false;
        loop {
            match self.flush() {
                Flush::Done => backoff = MIN_BACKOFF,
                Flush::Full => {}
                Flush::Closed => {
                    // The disconnect handler is on its way; wait for the reason it carries.
                    let notified = self.conn.disconnected.notified();
                    let _ = tokio::time::timeout(Duration::from_secs(5), notified).await;
                    return self.disconnect_code();
                }
            }
            if let Some((code, reason)) = drained.close.take() {
                tracing::info!(
                    conn = self.conn.handle.conn_id,
                    code,
                    "disconnecting socket.io client as the server asked: {reason}"
                );
                self.emit_close(code, &reason);
                let _ = self.socket.clone().disconnect();
                return code;
            }
            if drained.overflowed || queue.is_overflowed() {
                if queue.replies_over_budget() {
                    tracing::info!(
                        conn = self.conn.handle.conn_id,
                        "the client sends events but does not read the replies; closing with 4008"
                    );
                } else {
                    tracing::info!(
                        conn = self.conn.handle.conn_id,
                        "slow consumer: outbound queue overflowed, disconnecting socket.io client (4008)"
                    );
                }
                let code = CloseCode::SlowConsumer;
                self.emit_close(code.code(), code.reason());
                let _ = self.socket.clone().disconnect();
                return code.code();
            }
            if !told_draining && *drain_rx.borrow() {
                told_draining = true;
                let base = app.config.server.reconnect_after_ms;
                let after = rand::rng().random_range(base..=base * 2);
                let hint = format!("{{\"reconnect\":true,\"after_ms\":{after}}}");
                self.emit_close(CloseCode::GoingAway.code(), &hint);
                if self.socket.transport_type() == TransportType::Polling {
                    polled_away = true;
                } else {
                    drain_exit = Some(tokio::time::Instant::now() + DRAIN_EXIT);
                }
            }
            if let Some((code, reason)) = self.conn.handle.must_close() {
                tracing::info!(
                    conn = self.conn.handle.conn_id,
                    code = code.code(),
                    "disconnecting socket.io client: {reason}"
                );
                self.emit_close(code.code(), reason);
                // A flood leaves many replies queued in the engine, ahead of `close`: let a
                // client that reads get them before the transport goes. Its further events
                // are dropped unanswered meanwhile.
                let gone = self.conn.disconnected.notified();
                let _ = tokio::time::timeout(RATE_CLOSE_LINGER, gone).await;
                let _ = self.socket.clone().disconnect();
                return code.code();
            }
            // Read each turn: an `auth` event may have moved it.
            let auth = self.conn.handle.auth_deadline();
            if let Some((due, code, reason)) = auth
                && due <= Instant::now()
            {
                tracing::info!(
                    conn = self.conn.handle.conn_id,
                    code = code.code(),
                    "disconnecting socket.io client: {reason}"
                );
                app.auth.count_refusal(match code {
                    CloseCode::TokenExpired => "expired_connection",
                    _ => "auth_timeout",
                });
                self.emit_close(code.code(), reason);
                let _ = self.socket.clone().disconnect();
                return code.code();
            }
            let auth_due = auth.map(|(due, ..)| {
                tokio::time::Instant::now() + due.saturating_duration_since(Instant::now())
            });
            // A push seen while frames were pending: take the queue now they are out.
            if missed_push && self.pending.is_empty() {
                missed_push = false;
                queue.wake();
            }
            if self.splice.is_none() && self.switching.is_none() {
                self.begin_splice();
            }
            let splice = self.splice.clone();
            let switching = self.switching.is_some();
            tokio::select! {
                _ = sleep_until_some(auth_due) => {}
                _ = self.conn.disconnected.notified() => return self.disconnect_code(),
                // A spliced socket whose client stopped reading waits for room with frames
                // pending (as one waiting for its splice does); a push must still wake it, to
                // notice the queue overflowing.
                _ = queue.notified(), if self.pending.is_empty() || splice.is_some() || switching => {
                    if !self.pending.is_empty() {
                        missed_push = true;
                        continue;
                    }
                    drained.frames.clear();
                    queue.drain_into(&mut drained);
                    self.pending.extend(drained.frames.drain(..));
                    if drained.frames.capacity() > 1024 {
                        drained.frames = Vec::new();
                    }
                }
                _ = tokio::time::sleep(backoff), if !self.pending.is_empty() && splice.is_none() && !switching => {
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                () = writable(splice.as_deref()), if !self.pending.is_empty() => {}
                handed = async { self.switching.as_mut().expect("switching").await }, if switching => {
                    self.switching = None;
                    let Ok(splice) = handed else {
                        // The handoff let go of the writer: the session is ending.
                        return self.disconnect_code();
                    };
                    tracing::debug!(conn = self.conn.handle.conn_id, "socket.io session spliced after its upgrade");
                    self.splice = Some(splice);
                }
                _ = drain_rx.changed(), if !told_draining => {}
                _ = sleep_until_some(drain_exit) => return CloseCode::GoingAway.code(),
                () = self.polls.told_or_over(&sid), if polled_away => {
                    return CloseCode::GoingAway.code();
                }
            }
        }
    }

    /// Once a session that started on polling is on websocket, emits the splice barrier
    /// through the library; from then on replies are queued framed and nothing is emitted,
    /// until the barrier has passed the connection and the splice is handed over.
    fn begin_splice(&mut self) {
        let Some(handoff) = &self.handoff else { return };
        if self.stage != Stage::Start || self.socket.transport_type() != TransportType::Websocket {
            return;
        }
        let handed = handoff.expect(&self.sid);
        let mut framed = self.conn.framed_replies.lock();
        *framed = true;
        match self.socket.emit(SPLICE_BARRIER_EVENT, &()) {
            Ok(()) => self.switching = Some(handed),
            Err(e) => {
                // Tried again on the next turn (the engine's buffer was full), or the socket
                // is closing.
                *framed = false;
                handoff.forget(&self.sid);
                tracing::debug!(
                    conn = self.conn.handle.conn_id,
                    "socket.io splice barrier not sent: {e}"
                );
            }
        }
    }

    fn disconnect_code(&self) -> u16 {
        if self.conn.app.shutdown.is_draining() {
            // The drain dropped the transport on purpose.
            return CloseCode::GoingAway.code();
        }
        match *self.conn.reason.lock() {
            Some(DisconnectReason::ClosingServer) => CloseCode::GoingAway.code(),
            Some(DisconnectReason::HeartbeatTimeout) => CloseCode::HeartbeatTimeout.code(),
            Some(
                DisconnectReason::PacketParsingError | DisconnectReason::MultipleHttpPollingError,
            ) => CloseCode::ProtocolError.code(),
            Some(DisconnectReason::TransportError) | None => 1006,
            Some(_) => CloseCode::Normal.code(),
        }
    }

    fn emit_close(&self, code: u16, reason: &str) {
        let body = json!({ "code": code, "reason": reason });
        if let Some(splice) = self.splice.as_ref().filter(|s| s.connected())
            && splice.push(&event_frame("close", body.to_string().as_bytes()))
        {
            self.conn.app.metrics.socketio_spliced_frames.fetch_add(1, Relaxed);
            return;
        }
        let _ = self.socket.emit("close", &body);
    }

    /// Splices pending frames after the library's, in order, while the buffer has room.
    fn flush_spliced(&mut self, splice: &Splice) -> Flush {
        let app = &self.conn.app;
        let now = Instant::now();
        let mut latency = LocalHistogram::default();
        let (mut messages, mut bytes, mut frames) = (0u64, 0u64, 0u64);
        let mut outcome = Flush::Done;
        while let Some(front) = self.pending.front() {
            match splice.ready() {
                None => {
                    outcome = Flush::Closed;
                    break;
                }
                Some(false) => {
                    outcome = Flush::Full;
                    break;
                }
                Some(true) => {}
            }
            let Some(n) = splice_frame(splice, app, front, self.named_events) else {
                outcome = Flush::Closed;
                break;
            };
            if n > 0 && front.is_message() {
                messages += 1;
                bytes += front.bytes.len() as u64;
                if let Some(at) = front.published_at {
                    latency.record(now.saturating_duration_since(at));
                }
            }
            frames += n;
            self.pending.pop_front();
        }
        if self.pending.capacity() > 1024 && self.pending.is_empty() {
            self.pending = VecDeque::new();
        }
        latency.flush_into(&app.metrics.delivery_latency);
        app.metrics.delivered(Transport::SocketIo, messages, bytes);
        if frames > 0 {
            app.metrics.socketio_spliced_frames.fetch_add(frames, Relaxed);
        }
        outcome
    }

    /// Hands pending frames to the engine, in order, until done or the engine pushes back.
    fn flush(&mut self) -> Flush {
        if let Some(splice) = self.splice.clone() {
            return self.flush_spliced(&splice);
        }
        if self.switching.is_some() {
            return Flush::Full;
        }
        let app = &self.conn.app;
        let now = Instant::now();
        let mut latency = LocalHistogram::default();
        let (mut messages, mut bytes) = (0u64, 0u64);
        let mut outcome = Flush::Done;
        while let Some(front) = self.pending.front() {
            match emit_frame(&self.socket, app, front, &mut self.stage, self.named_events) {
                Ok(sent) => {
                    if sent && front.is_message() {
                        messages += 1;
                        bytes += front.bytes.len() as u64;
                        if let Some(at) = front.published_at {
                            latency.record(now.saturating_duration_since(at));
                        }
                    }
                    self.stage = Stage::Start;
                    self.pending.pop_front();
                }
                Err(SocketError::InternalChannelFull) => {
                    outcome = Flush::Full;
                    break;
                }
                Err(SocketError::Closed) => {
                    outcome = Flush::Closed;
                    break;
                }
            }
        }
        if self.pending.capacity() > 1024 && self.pending.is_empty() {
            self.pending = VecDeque::new();
        }
        latency.flush_into(&app.metrics.delivery_latency);
        app.metrics.delivered(Transport::SocketIo, messages, bytes);
        outcome
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Resolves when the splice can take frames again (never without one).
async fn writable(splice: Option<&Splice>) {
    match splice {
        Some(splice) => splice.writable().await,
        None => std::future::pending().await,
    }
}

/// The websocket frame of the Socket.IO event `event` with the one argument `arg` (JSON): the
/// Engine.IO message `42["event",arg]` on the main namespace.
fn event_frame(event: &str, arg: &[u8]) -> Vec<u8> {
    let name = serde_json::to_string(event).unwrap_or_else(|_| "\"\"".to_owned());
    let mut packet = Vec::with_capacity(6 + name.len() + arg.len());
    packet.extend_from_slice(b"42[");
    packet.extend_from_slice(name.as_bytes());
    packet.push(b',');
    packet.extend_from_slice(arg);
    packet.push(b']');
    text_frame(&packet)
}

/// The websocket frame of the `message` event for a native `msg` frame.
fn message_frame(frame: &[u8]) -> Option<Bytes> {
    let body = message_body(frame)?;
    Some(event_frame("message", body.get().as_bytes()).into())
}

/// Splices one queued frame: how many websocket frames it took (0 when it was skipped:
/// empty placeholder, unreadable), `None` once the connection is gone. A control frame that
/// starts with a text frame header is already framed (the subscribe ack); any other is a
/// server notice such as {"type":"unsubscribed",...}, sent under its type.
fn splice_frame(
    splice: &Splice,
    app: &AppState,
    frame: &Outbound,
    named_events: bool,
) -> Option<u64> {
    let push = |bytes: &[u8]| splice.push(bytes).then_some(1u64);
    if frame.bytes.is_empty() {
        return Some(0);
    }
    if !frame.is_message() {
        if frame.bytes[0] == 0x81 {
            return push(&frame.bytes);
        }
        let Some(kind) = notice_type(&frame.bytes) else { return Some(0) };
        return push(&event_frame(kind, &frame.bytes));
    }
    // Made once per message for every socket that gets it (a replayed message, which has no
    // shared forms, is framed here).
    let own;
    let framed = match &frame.forms {
        Some(forms) => forms.get_or_frame_socketio(|| message_frame(&frame.bytes)),
        None => {
            own = message_frame(&frame.bytes);
            own.as_ref()
        }
    };
    let Some(framed) = framed else { return Some(0) };
    let mut n = push(framed)?;
    if named_events
        && let Some(msg) = MsgView::parse(&frame.bytes)
        && let event = &app.hub.namespace(msg.channel).socketio_event
        && !event.is_empty()
        && serde_json::from_slice::<&RawValue>(msg.data).is_ok()
    {
        n += push(&event_frame(event, msg.data))?;
    }
    Some(n)
}

/// The `type` of a server notice such as {"type":"unsubscribed",...}: the Socket.IO event it
/// is sent as (`None` if the frame is not one).
fn notice_type(frame: &[u8]) -> Option<&str> {
    #[derive(Deserialize)]
    struct Notice<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
    }
    serde_json::from_slice::<Notice<'_>>(frame).ok().map(|n| n.kind)
}

/// Emits one queued frame. `Ok(false)` when it was skipped (empty placeholder, unreadable).
fn emit_frame(
    socket: &SocketRef,
    app: &AppState,
    frame: &Outbound,
    stage: &mut Stage,
    named_events: bool,
) -> Result<bool, SocketError> {
    if frame.bytes.is_empty() {
        return Ok(false);
    }
    if !frame.is_message() {
        // A server notice such as {"type":"unsubscribed",...}: emitted under its type.
        let Some(kind) = notice_type(&frame.bytes) else { return Ok(false) };
        let Ok(body) = serde_json::from_slice::<&RawValue>(&frame.bytes) else { return Ok(false) };
        return emitted(socket.emit(kind, body)).map(|()| true);
    }
    if *stage == Stage::Start {
        // Encoded once per message for every socket that gets it (a replayed message, which
        // has no shared forms, is encoded here).
        let own;
        let body = match &frame.forms {
            Some(forms) => forms.get_or_encode_socketio(|| message_body(&frame.bytes)),
            None => {
                own = message_body(&frame.bytes);
                own.as_deref()
            }
        };
        let Some(body) = body else { return Ok(false) };
        emitted(socket.emit("message", body))?;
        *stage = Stage::MessageSent;
    }
    if !named_events {
        return Ok(true);
    }
    let Some(msg) = MsgView::parse(&frame.bytes) else { return Ok(true) };
    let event = &app.hub.namespace(msg.channel).socketio_event;
    if !event.is_empty() {
        let Ok(data) = serde_json::from_slice::<&RawValue>(msg.data) else { return Ok(true) };
        emitted(socket.emit(event, data))?;
    }
    Ok(true)
}

/// The argument of the `message` event for a native `msg` frame (`None` if it is not one).
fn message_body(frame: &[u8]) -> Option<Box<RawValue>> {
    let msg = MsgView::parse(frame)?;
    let data = serde_json::from_slice::<&RawValue>(msg.data).ok()?;
    let body = SioMessage {
        channel: msg.channel,
        offset: msg.offset,
        epoch: msg.epoch,
        ephemeral: msg.ephemeral,
        data,
    };
    serde_json::value::to_raw_value(&body).ok()
}

/// Maps an emit result: serialization failures cannot happen for these payloads (they are
/// valid JSON already) and are treated as sent, so one bad frame cannot wedge the socket.
fn emitted(result: Result<(), SendError>) -> Result<(), SocketError> {
    match result {
        Ok(()) => Ok(()),
        Err(SendError::Socket(e)) => Err(e),
        Err(SendError::Serialize(e)) => {
            tracing::debug!("socket.io emit skipped: {e}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_payload_forms() {
        let p = |v| parse_channels(&v, "subscribe").map_err(|e| e.code);
        assert_eq!(p(json!("a.b")), Ok(vec!["a.b".to_string()]));
        assert_eq!(p(json!(["a", "b"])), Ok(vec!["a".to_string(), "b".to_string()]));
        assert_eq!(p(json!({"channels": "a"})), Ok(vec!["a".to_string()]));
        assert_eq!(p(json!([1])), Err(ErrorCode::BadRequest));
        assert_eq!(p(json!(null)), Err(ErrorCode::BadRequest));
        let (channels, recover, _) =
            parse_subscribe(&json!({"channels":["x"],"recover":{"x":{"epoch":"e","offset":3}}}))
                .unwrap();
        assert_eq!(channels, vec!["x"]);
        assert_eq!(recover["x"].offset, 3);
        assert!(parse_subscribe(&json!({"channels":["x"],"recover":{"x":1}})).is_err());
    }

    #[test]
    fn publish_payload() {
        let (channel, data) =
            parse_publish(&json!({"channel":"chat.a","data":{"t":"hi"}})).unwrap();
        assert_eq!(channel, "chat.a");
        assert_eq!(data.get(), r#"{"t":"hi"}"#);
        assert!(parse_publish(&json!({"channel":"chat.a"})).is_err());
    }
}
