//! The HTTP side of Engine.IO, in front of `socketioxide`: ferrocast answers it itself where
//! the library's behaviour does not match the protocol or what clients need, and hands every
//! request (and every websocket connection) on to the library otherwise.
//!
//! - **Drain.** socketioxide's `SocketIo::close` sends a Socket.IO DISCONNECT and an
//!   Engine.IO close packet, which python-socketio (and socket.io-client: "io server
//!   disconnect") read as "the server ended this on purpose": they do not reconnect. So on
//!   drain the library is not asked to close anything: each socket's writer emits a `close`
//!   event (1001 and a reconnect hint), then the transports are dropped abruptly. Every
//!   websocket loses its TCP connection without a close packet once the event had
//!   [`DRAIN_NOTICE`] to leave. A polling session is refused (`503`) once a poll has carried
//!   its `close` event away ([`PollingDrain`]), however late the client comes for it, and at
//!   the latest half the shutdown grace after the drain began. New handshakes and upgrades get
//!   `503` from the start of the drain. Every Socket.IO client library reads these as a
//!   transport error and reconnects by itself.
//! - **First heartbeat.** engineioxide sends its first ping right at the handshake (its
//!   heartbeat task does not wait for the first interval); Engine.IO says the server pings
//!   after `pingInterval`. ferrocast holds that first ping (a ping within half an interval of
//!   the handshake) back from the client and answers it itself, so the library's pong timeout is satisfied and the client's first ping comes one
//!   interval after the handshake, then every interval. Over polling this filters the first
//!   poll's payload; over websocket ferrocast performs the upgrade and gives the library the
//!   connection through an [`EioStream`] (socketioxide's `(stream, request)` service), which
//!   drops the ping frame and feeds the library a pong frame at a client frame boundary.
//!
//! - **Splice.** The library writes whole websocket frames into [`EioStream`]; the stream cuts
//!   them out of its writes (an incomplete frame waits for its end) and appends them to the
//!   connection's [`Splice`], a buffer that one pump task, spawned at the upgrade, writes to
//!   the connection (the library's flush waits for its own bytes only). For a session that
//!   started on websocket (no `sid`), the [`Splice`] is also handed to the socket through the
//!   request's extensions, and ferrocast's Socket.IO writer appends its own pre-framed frames
//!   (`42["message",…]` framed once per message and shared, acks, notices, `close`) there,
//!   after the library's CONNECT (`40`) has passed: both sides append whole frames only, so
//!   they interleave at frame boundaries, and the TCP socket has one writer. This skips the
//!   library's per-socket encoding, copies and task hop (`Socket::send_raw` is private). The
//!   drain's cut stops the pump and drops both halves.
//!
//!   A session that started on polling is spliced once it has upgraded: its writer, seeing the
//!   transport turn to websocket, emits a barrier event ([`SPLICE_BARRIER_EVENT`]) through the
//!   library and stops emitting. When the barrier reaches [`EioStream`], everything the library
//!   was given before it is in the [`Splice`]; the stream drops the barrier (the client never
//!   sees it) and hands the [`Splice`] to the writer through [`SpliceHandoff`], keyed by the
//!   session id. From then on the session is spliced like one that started on websocket.
//!
//! - **WebSocket over HTTP/2.** Browsers that reach ferrocast over HTTP/2 (TLS with ALPN `h2`)
//!   open WebSockets as RFC 8441 extended CONNECT streams, which the library does not accept;
//!   ferrocast answers the CONNECT (200) and hands the library the stream like any upgrade.
//!
//! All are workarounds for socketioxide / engineioxide 0.18 / 0.17: see docs/protocol.md.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf};
use tokio::sync::{Notify, oneshot, watch};
use tower::{Service, ServiceExt};

use crate::AppState;
use crate::shutdown::ConnectionGuard;
use crate::ws::{switching_protocols, upgrade_problem};

/// How long, once draining starts, websocket sockets have to receive their `close` event
/// before their transport is dropped.
pub const DRAIN_NOTICE: Duration = Duration::from_millis(200);
/// How a socket's drain `close` event starts in a polling payload: an Engine.IO message (`4`)
/// carrying a Socket.IO EVENT (`2`) on the main namespace, `close` with code 1001 (the
/// writer emits `{"code":..,"reason":..}`; serde_json writes the keys in that order).
const DRAIN_CLOSE_PACKET: &str = r#"42["close",{"code":1001,"#;
/// Engine.IO v4 separates the packets of one polling payload with the record separator.
const SEPARATOR: char = '\u{1e}';
/// A polling session whose first poll has not come this long after its handshake is
/// forgotten (the library has closed it by then).
const FIRST_POLL_WINDOW: Duration = Duration::from_secs(120);

/// A polling session being upgraded: the front's state and the session id.
type UpgradedSession = (Arc<FrontState>, String);

/// The event an upgraded session's writer emits through the library to learn when everything
/// it emitted before has reached the connection (see [`SpliceHandoff`]). It never reaches the
/// client.
pub const SPLICE_BARRIER_EVENT: &str = "ferrocast:splice";
/// How the barrier's packet starts (the library adds its argument, `null`).
const SPLICE_BARRIER_PACKET: &[u8] = b"42[\"ferrocast:splice\"";

/// The websocket connection the library gets from ferrocast's own upgrade.
pub type UpgradedStream = EioStream<TokioIo<Upgraded>>;

/// The Engine.IO endpoint: a tower service wrapping socketioxide's.
#[derive(Debug, Clone)]
pub struct EngineFront<S> {
    inner: S,
    state: Arc<FrontState>,
}

#[derive(Debug)]
struct FrontState {
    app: Arc<AppState>,
    /// Whether the websocket transport is offered (otherwise the library refuses upgrades).
    websocket: bool,
    /// Polling sessions whose first ping has not been held back yet, with the end of the
    /// window in which a ping is the library's early one (see [`early_window`]).
    first_ping: Mutex<HashMap<String, Instant>>,
    /// `server.ping_interval_ms`.
    ping_interval: Duration,
    /// Turns true when the drain notice is over and every websocket transport is dropped.
    cut: watch::Sender<bool>,
    /// The polling sessions' side of the drain.
    polls: Arc<PollingDrain>,
    /// Whether the task that turns `cut` on has been started.
    cutter: AtomicBool,
    /// Where an upgraded session's websocket hands its [`Splice`] to the session's writer.
    handoff: Arc<SpliceHandoff>,
}

/// A ping sent before this much of `pingInterval` has passed since the handshake is the
/// library's early one (the regular pings come a whole interval apart); later, a `2` is a
/// regular ping and passes, whether or not the early one was seen.
fn early_window(interval: Duration) -> Duration {
    interval / 2
}

impl FrontState {
    /// Takes the session `sid` off the list of those whose early ping is due: whether a ping
    /// seen now is that early ping.
    fn take_early_ping(&self, sid: &str) -> bool {
        self.first_ping.lock().remove(sid).is_some_and(|until| Instant::now() < until)
    }

    /// Starts (once, from inside the runtime) the task that cuts the websocket transports
    /// after the drain notice, then gives up on polling sessions that never came for their
    /// `close` event, half the shutdown grace after the drain began.
    fn start_cutter(&self) {
        if self.cutter.swap(true, Ordering::AcqRel) {
            return;
        }
        let shutdown = self.app.shutdown.clone();
        let cut = self.cut.clone();
        let polls = self.polls.clone();
        let window =
            (Duration::from_millis(self.app.config.server.shutdown_grace_ms) / 2).max(DRAIN_NOTICE);
        tokio::spawn(async move {
            shutdown.draining().await;
            let began = tokio::time::Instant::now();
            tokio::time::sleep(DRAIN_NOTICE).await;
            cut.send_replace(true);
            tokio::time::sleep_until(began + window).await;
            polls.over.send_replace(true);
        });
    }

    /// Resolves when the transports are cut.
    fn cut_signal(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let mut rx = self.cut.subscribe();
        Box::pin(async move {
            let _ = rx.wait_for(|cut| *cut).await;
        })
    }
}

/// The drain of polling sessions, shared by the front, which sees each session's `close`
/// event leave in a poll's answer, and the sockets' writers, which end their session then.
/// A polling client comes for its packets when it comes (a loaded client may take a while
/// between polls), so its transport is dropped after it has its `close` event, not after a
/// fixed time in which it may not have polled.
#[derive(Debug)]
pub struct PollingDrain {
    /// Sessions whose `close` event has been handed to their client.
    told: Mutex<HashSet<String>>,
    told_changed: Notify,
    /// Turns true when sessions not told yet are given up on.
    over: watch::Sender<bool>,
}

impl PollingDrain {
    pub fn new() -> Arc<PollingDrain> {
        Arc::new(PollingDrain {
            told: Mutex::default(),
            told_changed: Notify::new(),
            over: watch::channel(false).0,
        })
    }

    fn tell(&self, sid: &str) {
        self.told.lock().insert(sid.to_owned());
        self.told_changed.notify_waiters();
    }

    fn was_told(&self, sid: &str) -> bool {
        self.told.lock().contains(sid)
    }

    fn is_over(&self) -> bool {
        *self.over.borrow()
    }

    /// Resolves once a poll has carried session `sid`'s `close` event to its client (and
    /// the answer has been written), or the drain gave up on waiting for it.
    pub async fn told_or_over(&self, sid: &str) {
        let mut over = self.over.subscribe();
        loop {
            let changed = self.told_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.was_told(sid) {
                return;
            }
            tokio::select! {
                () = &mut changed => {}
                _ = over.wait_for(|over| *over) => return,
            }
        }
    }

    /// Runs `fut` unless the drain gives up on polling sessions first.
    async fn until_over<T>(&self, fut: impl Future<Output = T>) -> Option<T> {
        let mut rx = self.over.subscribe();
        tokio::select! {
            out = fut => Some(out),
            _ = rx.wait_for(|over| *over) => None,
        }
    }
}

/// Where the websocket of a session that started on polling hands its [`Splice`] to the
/// session's writer: the writer says it expects it (then emits the barrier), the connection's
/// [`EioStream`] hands it over when the barrier passes. Keyed by the Engine.IO session id,
/// which is also the socket's id.
#[derive(Debug, Default)]
pub struct SpliceHandoff {
    waiting: Mutex<HashMap<String, oneshot::Sender<Arc<Splice>>>>,
}

impl SpliceHandoff {
    pub fn new() -> Arc<SpliceHandoff> {
        Arc::default()
    }

    /// The writer of session `sid` is about to emit the barrier: the receiver resolves with
    /// the session's [`Splice`] once the barrier has passed.
    pub fn expect(&self, sid: &str) -> oneshot::Receiver<Arc<Splice>> {
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().insert(sid.to_owned(), tx);
        rx
    }

    /// The writer of session `sid` no longer waits (its socket ended).
    pub fn forget(&self, sid: &str) {
        self.waiting.lock().remove(sid);
    }

    /// The barrier of session `sid` has passed: whether its writer was waiting.
    fn hand_over(&self, sid: &str, splice: Arc<Splice>) -> bool {
        let waiting = self.waiting.lock().remove(sid);
        waiting.is_some_and(|tx| tx.send(splice).is_ok())
    }
}

impl<S> EngineFront<S> {
    pub fn new(
        inner: S,
        app: Arc<AppState>,
        websocket: bool,
        polls: Arc<PollingDrain>,
        handoff: Arc<SpliceHandoff>,
    ) -> Self {
        let state = FrontState {
            ping_interval: Duration::from_millis(app.config.server.ping_interval_ms),
            app,
            websocket,
            first_ping: Mutex::default(),
            cut: watch::channel(false).0,
            polls,
            cutter: AtomicBool::new(false),
            handoff,
        };
        EngineFront { inner, state: Arc::new(state) }
    }
}

impl<S, R> Service<Request<Body>> for EngineFront<S>
where
    S: Service<Request<Body>, Response = R, Error = Infallible>
        + Service<(UpgradedStream, Request<()>)>
        + Clone
        + Send
        + 'static,
    <S as Service<Request<Body>>>::Future: Send,
    <S as Service<(UpgradedStream, Request<()>)>>::Future: Send,
    <S as Service<(UpgradedStream, Request<()>)>>::Error: std::fmt::Display,
    R: IntoResponse,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let inner = self.inner.clone();
        let state = self.state.clone();
        Box::pin(async move { Ok(handle(inner, state, req).await) })
    }
}

/// The Engine.IO query parameters ferrocast looks at.
#[derive(Debug, Default)]
struct EioQuery {
    eio: Option<String>,
    transport: Option<String>,
    sid: Option<String>,
}

impl EioQuery {
    fn parse(query: Option<&str>) -> EioQuery {
        let mut q = EioQuery::default();
        for pair in query.unwrap_or_default().split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = Some(v.to_owned());
            match k {
                "EIO" => q.eio = v,
                "transport" => q.transport = v,
                "sid" => q.sid = v,
                _ => {}
            }
        }
        q
    }
}

async fn handle<S, R>(mut inner: S, state: Arc<FrontState>, mut req: Request<Body>) -> Response
where
    S: Service<Request<Body>, Response = R, Error = Infallible>
        + Service<(UpgradedStream, Request<()>)>
        + Clone
        + Send
        + 'static,
    <S as Service<Request<Body>>>::Future: Send,
    <S as Service<(UpgradedStream, Request<()>)>>::Future: Send,
    <S as Service<(UpgradedStream, Request<()>)>>::Error: std::fmt::Display,
    R: IntoResponse,
{
    state.start_cutter();
    let q = EioQuery::parse(req.uri().query());
    let is_get = req.method() == Method::GET;
    let transport = q.transport.as_deref();
    let polling_get = is_get && transport == Some("polling");
    if state.app.shutdown.is_draining()
        && (q.sid.is_none()
            || transport != Some("polling")
            || state.polls.is_over()
            || (polling_get && q.sid.as_deref().is_some_and(|sid| state.polls.was_told(sid))))
    {
        return draining();
    }
    // The 101 of an HTTP/1.1 upgrade needs the client's key; an HTTP/2 extended CONNECT
    // (RFC 8441) is answered 200 without one.
    let handshake = if is_get && upgrade_problem(req.headers()).is_none() {
        req.headers().get(header::SEC_WEBSOCKET_KEY).cloned().map(Some)
    } else if is_extended_connect(&req) {
        Some(None)
    } else {
        None
    };
    if transport == Some("websocket")
        && q.eio.as_deref() == Some("4")
        && state.websocket
        && let Some(key) = handshake
    {
        if let Some(tls) = state.app.tls.get() {
            tls.count_websocket(key.is_none());
        }
        let on_upgrade = hyper::upgrade::on(&mut req);
        let (mut parts, _) = req.into_parts();
        // The library opens sessions on GET only.
        parts.method = Method::GET;
        // A new websocket session holds its first ping back. An upgraded polling session
        // does too if that ping was not polled yet (python-socketio upgrades before its
        // first poll): the library then flushes it over the websocket.
        let early_until = Instant::now() + early_window(state.ping_interval);
        // A session that starts on websocket is one ferrocast's writer may splice into at
        // once; an upgraded one, after its barrier.
        let direct = q.sid.is_none();
        let barrier = q.sid.clone().map(|sid| (state.handoff.clone(), sid));
        let first_ping = match q.sid {
            None => Some((early_until, None)),
            Some(sid) => {
                let until = state.first_ping.lock().get(&sid).copied();
                until.map(|until| (until, Some((state.clone(), sid))))
            }
        };
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => return tracing::debug!("socket.io upgrade did not complete: {e}"),
            };
            let (cut, pump_cut) = (state.cut_signal(), state.cut_signal());
            let stream = EioStream::new(TokioIo::new(upgraded), cut, pump_cut, first_ping, barrier);
            if direct {
                parts.extensions.insert(stream.splice());
            }
            let req = Request::from_parts(parts, ());
            let call = async {
                ServiceExt::<(UpgradedStream, Request<()>)>::ready(&mut inner).await?;
                inner.call((stream, req)).await
            };
            if let Err(e) = call.await {
                tracing::debug!("socket.io websocket refused: {e}");
            }
        });
        return match key {
            Some(key) => switching_protocols(key.as_bytes()),
            None => Response::new(Body::empty()),
        };
    }
    let Some(sid) = q.sid.filter(|_| polling_get) else {
        let handshake = polling_get;
        let Some(res) = state.polls.until_over(call_http(&mut inner, req)).await else {
            return draining();
        };
        return if handshake { note_handshake(&state, res).await } else { res };
    };
    if !state.first_ping.lock().contains_key(&sid) {
        let Some(res) = state.polls.until_over(call_http(&mut inner, req)).await else {
            return draining();
        };
        if !state.app.shutdown.is_draining() || res.status() != StatusCode::OK {
            return res;
        }
        let (head, body) = res.into_parts();
        let Ok(bytes) = body.collect().await.map(|b| b.to_bytes()) else {
            return draining();
        };
        return answer_poll(&state, &sid, head, bytes);
    }
    // The session's first poll: hold its first ping back (answering it), polling again when
    // nothing else was in the payload.
    let (parts, _) = req.into_parts();
    loop {
        let req = Request::from_parts(parts.clone(), Body::empty());
        let Some(res) = state.polls.until_over(call_http(&mut inner, req)).await else {
            return draining();
        };
        if res.status() != StatusCode::OK {
            return res;
        }
        let (mut head, body) = res.into_parts();
        let Ok(bytes) = body.collect().await.map(|b| b.to_bytes()) else {
            return draining();
        };
        let text = String::from_utf8_lossy(&bytes);
        let mut packets: Vec<&str> = text.split(SEPARATOR).collect();
        let Some(ping) = packets.iter().position(|p| *p == "2") else {
            return answer_poll(&state, &sid, head, bytes);
        };
        if !state.take_early_ping(&sid) {
            // A regular ping (the early one went over an upgrade, or never came).
            return answer_poll(&state, &sid, head, bytes);
        }
        packets.remove(ping);
        let pong = Request::builder()
            .method(Method::POST)
            .uri(parts.uri.clone())
            .header(header::CONTENT_TYPE, "text/plain;charset=UTF-8")
            .body(Body::from("3"))
            .expect("static request");
        let answered = call_http(&mut inner, pong).await;
        if answered.status() != StatusCode::OK {
            tracing::debug!(%sid, status = %answered.status(), "held-back first ping not answered");
        }
        if !packets.is_empty() {
            head.headers.remove(header::CONTENT_LENGTH);
            return answer_poll(&state, &sid, head, packets.join("\u{1e}").into());
        }
    }
}

/// A poll's answer as the client gets it. While draining, an answer that carries the
/// session's `close` event marks the session told (its later polls are refused) and holds a
/// connection guard until written, so the server does not exit with it unsent.
fn answer_poll(
    state: &FrontState,
    sid: &str,
    head: http::response::Parts,
    bytes: Bytes,
) -> Response {
    if !state.app.shutdown.is_draining() || !carries_drain_close(&bytes) {
        return Response::from_parts(head, Body::from(bytes));
    }
    let guard: ConnectionGuard = state.app.shutdown.track();
    state.polls.tell(sid);
    tracing::debug!(%sid, "socket.io drain: close event polled");
    let body = Full::new(bytes).map_frame(move |frame| {
        let _written_first = &guard;
        frame
    });
    Response::from_parts(head, Body::new(body))
}

/// Whether a polling payload carries a drain `close` event.
fn carries_drain_close(payload: &[u8]) -> bool {
    payload
        .split(|b| *b == SEPARATOR as u8)
        .any(|packet| packet.starts_with(DRAIN_CLOSE_PACKET.as_bytes()))
}

/// Whether `req` opens a WebSocket on an HTTP/2 stream (RFC 8441 extended CONNECT).
fn is_extended_connect(req: &Request<Body>) -> bool {
    req.method() == Method::CONNECT
        && req.extensions().get::<hyper::ext::Protocol>().is_some_and(|p| p.as_str() == "websocket")
        && req.headers().get(header::SEC_WEBSOCKET_VERSION).is_some_and(|v| v == "13")
}

async fn call_http<S, R>(inner: &mut S, req: Request<Body>) -> Response
where
    S: Service<Request<Body>, Response = R, Error = Infallible>,
    R: IntoResponse,
{
    let Ok(ready) = ServiceExt::<Request<Body>>::ready(inner).await;
    let Ok(res) = ready.call(req).await;
    res.into_response()
}

/// Remembers a new polling session, whose first poll will carry the library's early ping.
async fn note_handshake(state: &FrontState, res: Response) -> Response {
    if res.status() != StatusCode::OK {
        return res;
    }
    let (head, body) = res.into_parts();
    let Ok(bytes) = body.collect().await.map(|b| b.to_bytes()) else {
        return StatusCode::BAD_GATEWAY.into_response();
    };
    #[derive(serde::Deserialize)]
    struct Open {
        sid: String,
    }
    if let Some(open) = bytes.strip_prefix(b"0")
        && let Ok(Open { sid }) = serde_json::from_slice(open)
    {
        let now = Instant::now();
        let mut pending = state.first_ping.lock();
        pending.retain(|_, until| now < *until + FIRST_POLL_WINDOW);
        pending.insert(sid, now + early_window(state.ping_interval));
    }
    Response::from_parts(head, Body::from(bytes))
}

/// The answer to Engine.IO requests once the drain cuts them (and to handshakes while
/// draining): an error status, which every client library treats as a transport error and
/// reconnects from (an Engine.IO close packet would stop it).
fn draining() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::CONNECTION, "close"), (header::RETRY_AFTER, "1")],
        "the server is shutting down (1001); reconnect",
    )
        .into_response()
}

// ------------------------------------------------------------------------------------------
// The websocket connection handed to the library

/// The masked client text frame `3` (a pong), with the all-zero mask.
const PONG_FRAME: [u8; 7] = [0x81, 0x81, 0, 0, 0, 0, b'3'];
/// The unmasked server text frame `2` (a ping).
const PING_FRAME: [u8; 3] = [0x81, 0x01, b'2'];
/// Frames the library may send before its first ping (the open packet, a namespace connect)
/// before ferrocast stops looking for it.
const FRAMES_BEFORE_PING: usize = 16;
/// Bytes buffered toward the client (written, not yet on the connection) before the library's
/// writes and ferrocast's splicing wait for the pump.
pub const OUT_HIGH_WATER: usize = 64 * 1024;
/// A pump buffer larger than this is not kept for the next batch.
const PUMP_BUFFER_KEPT: usize = 256 * 1024;
/// How long, once the library is done with a connection, the pump may take to write what is
/// left before the connection is dropped (a client that stopped reading must not keep it).
const SHUTDOWN_LINGER: Duration = Duration::from_secs(2);

/// A future that resolves when the drain cuts the websocket transports.
type Cut = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The outgoing side of one websocket connection, shared by the library (its whole frames,
/// cut out of what it writes into [`EioStream`]) and ferrocast's Socket.IO writer (whole
/// frames it encoded itself, see `socketio::Writer`: from the library's CONNECT on for a
/// session that started on websocket, from the barrier on for an upgraded one). Each side appends whole frames only, so the two never interleave
/// inside a frame; one pump task writes the buffer to the connection, so the socket has one
/// writer and one set of wakers.
#[derive(Debug)]
pub struct Splice {
    state: Mutex<SpliceState>,
    /// Wakes the pump: bytes appended or shutdown asked (`notify_one`: a permit is kept when
    /// the pump is busy writing).
    pump: Notify,
    /// Wakes ferrocast's writer: room made, the library's CONNECT passed, or closed.
    changed: Notify,
    /// Wakes the pump's linger timer: the library is done.
    done: Notify,
}

#[derive(Debug, Default)]
struct SpliceState {
    /// Bytes waiting for the pump.
    out: Vec<u8>,
    /// Bytes appended and bytes written to the connection since the start.
    appended: u64,
    written: u64,
    /// Where the library's last write ended: its flush is done once `written` passes it.
    lib_mark: u64,
    /// The library's Socket.IO CONNECT (a text frame `40...`), or an upgraded session's
    /// barrier, has been appended: ferrocast splices nothing before it.
    connected: bool,
    /// The pump has ended (connection error, cut, or shut down): nothing more is written.
    closed: bool,
    /// The library is done writing: the pump writes what is left, then shuts the connection.
    shutdown: bool,
    /// The library's tasks waiting for room or for their flush.
    wakers: Vec<Waker>,
}

impl SpliceState {
    fn queued(&self) -> u64 {
        self.appended - self.written
    }

    fn register(&mut self, waker: &Waker) {
        if !self.wakers.iter().any(|w| w.will_wake(waker)) {
            self.wakers.push(waker.clone());
        }
    }

    /// Appends `frames`; whether the pump must be woken (it had nothing to write).
    fn append(&mut self, frames: &[u8]) -> bool {
        let was_empty = self.out.is_empty();
        self.out.extend_from_slice(frames);
        self.appended += frames.len() as u64;
        was_empty && !frames.is_empty()
    }
}

impl Splice {
    fn new() -> Arc<Splice> {
        Arc::new(Splice {
            state: Mutex::default(),
            pump: Notify::new(),
            changed: Notify::new(),
            done: Notify::new(),
        })
    }

    /// Whether ferrocast may splice a frame now: `None` once the connection is gone,
    /// `Some(false)` before the library's CONNECT passed or while the buffer is above its
    /// high-water mark.
    pub fn ready(&self) -> Option<bool> {
        let st = self.state.lock();
        if st.closed {
            return None;
        }
        Some(st.connected && st.queued() < OUT_HIGH_WATER as u64)
    }

    /// Whether the library's CONNECT has passed (and the connection is still open).
    pub fn connected(&self) -> bool {
        let st = self.state.lock();
        !st.closed && st.connected
    }

    /// Resolves when [`Splice::ready`] is no longer `Some(false)`.
    pub async fn writable(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.ready() != Some(false) {
                return;
            }
            changed.await;
        }
    }

    /// Appends one whole websocket frame after everything written so far (whatever the
    /// high-water mark: callers look at [`Splice::ready`] first). `false` once closed.
    pub fn push(&self, frame: &[u8]) -> bool {
        let mut st = self.state.lock();
        if st.closed {
            return false;
        }
        let wake = st.append(frame);
        drop(st);
        if wake {
            self.pump.notify_one();
        }
        true
    }

    /// The library's whole frames (`connect`: they carry its Socket.IO CONNECT).
    fn push_library(&self, frames: &[u8], connect: bool) {
        let mut st = self.state.lock();
        let wake = st.append(frames);
        st.lib_mark = st.appended;
        let newly_connected = connect && !st.connected;
        st.connected |= connect;
        drop(st);
        if wake {
            self.pump.notify_one();
        }
        if newly_connected {
            self.changed.notify_waiters();
        }
    }

    /// Ready when the library may write (the buffer is under its high-water mark).
    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.state.lock();
        if st.closed {
            return Poll::Ready(Err(closed_error()));
        }
        if st.queued() < OUT_HIGH_WATER as u64 {
            return Poll::Ready(Ok(()));
        }
        st.register(cx.waker());
        Poll::Pending
    }

    /// Ready when everything the library wrote is on the connection.
    fn poll_flushed(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.state.lock();
        if st.written >= st.lib_mark {
            return Poll::Ready(Ok(()));
        }
        if st.closed {
            return Poll::Ready(Err(closed_error()));
        }
        st.register(cx.waker());
        Poll::Pending
    }

    /// The library is done: the pump writes what is left and shuts the connection.
    fn shut_down(&self) {
        self.state.lock().shutdown = true;
        self.pump.notify_one();
        self.done.notify_waiters();
    }

    /// Resolves [`SHUTDOWN_LINGER`] after the library is done with the connection.
    async fn linger_over(&self) {
        loop {
            let done = self.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.state.lock().shutdown {
                break;
            }
            done.await;
        }
        tokio::time::sleep(SHUTDOWN_LINGER).await;
    }

    /// The pump wrote `n` bytes (or ended, `closed`): wake whoever waits for room.
    fn advanced(&self, n: usize, closed: bool) {
        let mut st = self.state.lock();
        st.written += n as u64;
        st.closed |= closed;
        let wakers = std::mem::take(&mut st.wakers);
        drop(st);
        for w in wakers {
            w.wake();
        }
        self.changed.notify_waiters();
    }

    /// Writes the buffer to the connection until the library shuts it down, the connection
    /// fails, or the drain cuts it (then the write half is dropped at once, as it is when what
    /// is left after the library is done takes longer than [`SHUTDOWN_LINGER`]).
    async fn pump<W: AsyncWrite + Unpin>(self: Arc<Self>, mut conn: W, cut: Cut) {
        let work = async {
            let mut batch = Vec::new();
            loop {
                {
                    let mut st = self.state.lock();
                    if !st.out.is_empty() {
                        std::mem::swap(&mut st.out, &mut batch);
                    } else if st.shutdown {
                        break;
                    }
                }
                if batch.is_empty() {
                    self.pump.notified().await;
                    continue;
                }
                conn.write_all(&batch).await?;
                conn.flush().await?;
                self.advanced(batch.len(), false);
                batch.clear();
                if batch.capacity() > PUMP_BUFFER_KEPT {
                    batch = Vec::new();
                }
            }
            conn.shutdown().await
        };
        tokio::select! {
            result = work => if let Err(e) = result {
                tracing::debug!("socket.io websocket write failed: {e}");
            },
            () = cut => {}
            () = self.linger_over() => {}
        }
        self.advanced(0, true);
    }
}

/// A websocket connection as the library sees it: dropped when the drain cuts transports
/// (the library then reads end-of-stream; the client sees the TCP connection close without
/// an Engine.IO close packet), and, for a new session, without the library's first ping,
/// which it answers itself. Its writes go, as whole frames, to the connection's [`Splice`].
pub struct EioStream<S> {
    /// The connection's read half (the pump owns the write half).
    inner: Option<ReadHalf<S>>,
    cut: Cut,
    splice: Arc<Splice>,
    /// Still looking for the first ping among the server's frames.
    watching: bool,
    /// Until when a ping frame is the library's early one.
    early_until: Instant,
    /// For an upgraded polling session: its id among the sessions whose first ping is still
    /// due, which the polling side may have taken meanwhile.
    upgraded: Option<UpgradedSession>,
    /// For an upgraded polling session whose writer has not been handed the splice yet: where
    /// to hand it, and the session id.
    barrier: Option<(Arc<SpliceHandoff>, String)>,
    /// Server bytes not yet a whole frame.
    partial: Vec<u8>,
    frames_seen: usize,
    /// Whole server frames sorted out of `partial`, about to be appended to the splice.
    out: Vec<u8>,
    /// The library's CONNECT has been seen among its frames.
    connect_seen: bool,
    /// How much of the pong frame is still to be handed to the library, once the ping is held.
    pong_left: usize,
    /// Client bytes read but not yet handed to the library (while tracking frame boundaries).
    input: Vec<u8>,
    /// Bytes of the current client frame not yet handed to the library.
    frame_left: usize,
    read_waker: Option<Waker>,
}

impl<S> std::fmt::Debug for EioStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EioStream")
            .field("open", &self.inner.is_some())
            .field("watching", &self.watching)
            .finish()
    }
}

impl<S> Drop for EioStream<S> {
    fn drop(&mut self) {
        self.splice.shut_down();
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> EioStream<S> {
    /// Splits `inner` and spawns the pump that writes its outgoing side. `cut` and `pump_cut`
    /// resolve when the drain cuts the transports (one for each half). `first_ping`: `None`
    /// to pass every frame; `Some((until, None))` to hold back a ping written before `until`;
    /// `Some((until, Some((state, sid))))` the same, unless the polling side took that ping
    /// first. `barrier`: for an upgraded session, where to hand the splice over when its
    /// writer's barrier passes.
    fn new(
        inner: S,
        cut: Cut,
        pump_cut: Cut,
        first_ping: Option<(Instant, Option<UpgradedSession>)>,
        barrier: Option<(Arc<SpliceHandoff>, String)>,
    ) -> Self {
        let (early_until, upgraded) = match first_ping {
            Some((until, upgraded)) => (until, upgraded),
            None => (Instant::now(), None),
        };
        let (read, write) = tokio::io::split(inner);
        let splice = Splice::new();
        tokio::spawn(splice.clone().pump(write, pump_cut));
        EioStream {
            inner: Some(read),
            cut,
            splice,
            watching: first_ping_due(&early_until),
            early_until,
            upgraded,
            barrier,
            partial: Vec::new(),
            frames_seen: 0,
            out: Vec::new(),
            connect_seen: false,
            pong_left: 0,
            input: Vec::new(),
            frame_left: 0,
            read_waker: None,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> EioStream<S> {
    /// The connection's outgoing side, for ferrocast's own frames.
    pub fn splice(&self) -> Arc<Splice> {
        self.splice.clone()
    }

    /// Whether the drain has cut this connection (dropping it on the first look).
    fn check_cut(&mut self, cx: &mut Context<'_>) -> bool {
        if self.inner.is_some() && self.cut.as_mut().poll(cx).is_ready() {
            self.inner = None;
        }
        self.inner.is_none()
    }

    /// Whether client frame boundaries still matter (a pong may still be due).
    fn tracking(&self) -> bool {
        self.watching || self.pong_left > 0
    }

    /// Sorts whole server frames out of `partial` into `out`: the first ping is held back, and
    /// at the splice barrier the frames before it are appended and the splice handed over. An
    /// incomplete frame stays in `partial`.
    fn sort_frames(&mut self) {
        let mut at = 0;
        while let Some(len) =
            frame_len(&self.partial[at..]).filter(|n| *n <= self.partial.len() - at)
        {
            let frame = &self.partial[at..at + len];
            at += len;
            if self.barrier.is_some() && is_barrier(frame) {
                self.pass_barrier();
                continue;
            }
            if !self.watching {
                self.out.extend_from_slice(frame);
                continue;
            }
            let is_ping = frame == PING_FRAME;
            let first = is_ping
                && match self.upgraded.take() {
                    None => Instant::now() < self.early_until,
                    Some((state, sid)) => state.take_early_ping(&sid),
                };
            if first {
                self.watching = false;
                self.pong_left = PONG_FRAME.len();
                if let Some(w) = self.read_waker.take() {
                    w.wake();
                }
            } else {
                // A regular ping (the early one went over polling, or never came) stops
                // the watch too.
                self.watching &= !is_ping;
                self.out.extend_from_slice(frame);
            }
            self.frames_seen += 1;
            if self.frames_seen >= FRAMES_BEFORE_PING || !first_ping_due(&self.early_until) {
                self.watching = false;
            }
        }
        self.partial.drain(..at);
    }

    /// The writer's barrier has come: appends the library's frames before it, opens the
    /// splice to the writer and hands it over.
    fn pass_barrier(&mut self) {
        let Some((handoff, sid)) = self.barrier.take() else { return };
        self.connect_seen = true;
        self.splice.push_library(&self.out, true);
        self.out.clear();
        if !handoff.hand_over(&sid, self.splice.clone()) {
            tracing::debug!(%sid, "socket.io splice barrier passed with no writer waiting");
        }
    }

    /// Appends whole library frames to the splice, noting its CONNECT (an upgraded session's
    /// splice opens at its barrier instead).
    fn push_frames(&mut self, frames: &[u8]) {
        let connect = !self.connect_seen && self.barrier.is_none() && carries_connect(frames);
        self.connect_seen |= connect;
        self.splice.push_library(frames, connect);
    }

    /// Reads more client bytes into `input`; `Ok(false)` at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(Ok(false)) };
        let mut chunk = [0u8; 4096];
        let mut buf = ReadBuf::new(&mut chunk);
        match Pin::new(inner).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                self.input.extend_from_slice(buf.filled());
                Poll::Ready(Ok(!buf.filled().is_empty()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Whether the first ping may still come.
fn first_ping_due(until: &Instant) -> bool {
    Instant::now() < *until
}

fn cut_error() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "socket.io transport dropped for the drain")
}

fn closed_error() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "socket.io websocket connection closed")
}

/// The total length of the websocket frame at the start of `buf`, once its header is there.
fn frame_len(buf: &[u8]) -> Option<usize> {
    let second = *buf.get(1)?;
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    let (header, payload) = match second & 0x7f {
        126 => (4, u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as u64),
        127 => (10, u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?)),
        n => (2, n as u64),
    };
    usize::try_from(payload).ok()?.checked_add(header + mask)
}

/// How many bytes at the start of `buf` are whole frames.
fn whole_frames(buf: &[u8]) -> usize {
    let mut at = 0;
    while let Some(len) = frame_len(&buf[at..]).filter(|n| *n <= buf.len() - at) {
        at += len;
    }
    at
}

/// Whether one of the whole server frames in `frames` is a Socket.IO CONNECT: an unmasked,
/// final text frame whose payload starts with `40` (Engine.IO message, Socket.IO CONNECT).
fn carries_connect(frames: &[u8]) -> bool {
    let mut at = 0;
    while let Some(len) = frame_len(&frames[at..]).filter(|n| *n <= frames.len() - at) {
        let frame = &frames[at..at + len];
        let header = match frame[1] & 0x7f {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        if frame[0] == 0x81 && frame[1] & 0x80 == 0 && frame[header..].starts_with(b"40") {
            return true;
        }
        at += len;
    }
    false
}

/// Whether a whole server frame is a writer's splice barrier: an unmasked, final, short text
/// frame carrying the [`SPLICE_BARRIER_EVENT`] packet.
fn is_barrier(frame: &[u8]) -> bool {
    frame.len() < 64
        && frame[0] == 0x81
        && frame[1] & 0x80 == 0
        && frame[2..].starts_with(SPLICE_BARRIER_PACKET)
}

/// A whole unmasked websocket text frame carrying `payload`.
pub fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut header = [0u8; 10];
    let n = crate::ws::frame::encode_header(crate::ws::frame::OP_TEXT, payload.len(), &mut header);
    let mut frame = Vec::with_capacity(n + payload.len());
    frame.extend_from_slice(&header[..n]);
    frame.extend_from_slice(payload);
    frame
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for EioStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.check_cut(cx) {
            return Poll::Ready(Ok(()));
        }
        while this.tracking() {
            if this.frame_left == 0 {
                if this.pong_left > 0 {
                    let start = PONG_FRAME.len() - this.pong_left;
                    let n = this.pong_left.min(buf.remaining());
                    buf.put_slice(&PONG_FRAME[start..start + n]);
                    this.pong_left -= n;
                    return Poll::Ready(Ok(()));
                }
                match frame_len(&this.input) {
                    Some(len) => this.frame_left = len,
                    None => match this.poll_fill(cx) {
                        Poll::Ready(Ok(true)) => continue,
                        Poll::Ready(Ok(false)) => break,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {
                            this.read_waker = Some(cx.waker().clone());
                            return Poll::Pending;
                        }
                    },
                }
            }
            if this.input.is_empty() {
                match this.poll_fill(cx) {
                    Poll::Ready(Ok(true)) => continue,
                    Poll::Ready(Ok(false)) => return Poll::Ready(Ok(())),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        this.read_waker = Some(cx.waker().clone());
                        return Poll::Pending;
                    }
                }
            }
            let n = this.input.len().min(this.frame_left).min(buf.remaining());
            buf.put_slice(&this.input[..n]);
            this.input.drain(..n);
            this.frame_left -= n;
            return Poll::Ready(Ok(()));
        }
        if !this.input.is_empty() {
            let n = this.input.len().min(buf.remaining());
            buf.put_slice(&this.input[..n]);
            this.input.drain(..n);
            return Poll::Ready(Ok(()));
        }
        match this.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_read(cx, buf),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for EioStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.check_cut(cx) {
            return Poll::Ready(Err(cut_error()));
        }
        if this.splice.poll_room(cx)?.is_pending() {
            return Poll::Pending;
        }
        if this.watching || this.barrier.is_some() || !this.partial.is_empty() {
            this.partial.extend_from_slice(buf);
            this.sort_frames();
            let out = std::mem::take(&mut this.out);
            this.push_frames(&out);
            this.out = out;
            this.out.clear();
        } else {
            // Whole frames go on as they are; an incomplete one waits for its end.
            let whole = whole_frames(buf);
            this.push_frames(&buf[..whole]);
            this.partial.extend_from_slice(&buf[whole..]);
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.check_cut(cx) {
            return Poll::Ready(Err(cut_error()));
        }
        this.splice.poll_flushed(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.check_cut(cx) {
            return Poll::Ready(Ok(()));
        }
        if this.splice.poll_flushed(cx)?.is_pending() {
            return Poll::Pending;
        }
        this.splice.shut_down();
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn never() -> Cut {
        Box::pin(std::future::pending())
    }

    /// The frames a client reads, parsed from the connection.
    async fn read_frames(client: &mut tokio::io::DuplexStream, n: usize) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        let mut buf = Vec::new();
        while frames.len() < n {
            while let Some(len) = frame_len(&buf).filter(|len| *len <= buf.len()) {
                frames.push(buf.drain(..len).collect());
            }
            if frames.len() >= n {
                break;
            }
            let mut chunk = [0u8; 256];
            let got = client.read(&mut chunk).await.unwrap();
            assert!(got > 0, "connection closed after {} frames", frames.len());
            buf.extend_from_slice(&chunk[..got]);
        }
        frames
    }

    #[test]
    fn frame_lengths() {
        assert_eq!(frame_len(&PING_FRAME), Some(3));
        assert_eq!(frame_len(&PONG_FRAME), Some(7));
        assert_eq!(frame_len(&[0x81]), None);
        assert_eq!(frame_len(&[0x82, 126, 0x01]), None);
        assert_eq!(frame_len(&[0x82, 126, 0x01, 0x00]), Some(4 + 256));
        assert_eq!(frame_len(&[0x82, 0xfe, 0x01, 0x00]), Some(8 + 256));
    }

    /// The first ping frame never reaches the client; the library reads a pong between
    /// whole client frames; everything else passes unchanged.
    #[tokio::test]
    async fn first_ping_is_held_and_answered() {
        let (lib_side, mut client) = tokio::io::duplex(1024);
        let until = Instant::now() + Duration::from_secs(60);
        let mut stream = EioStream::new(lib_side, never(), never(), Some((until, None)), None);
        let open = [0x81, 0x03, b'0', b'{', b'}'];
        // The client's `40`, masked with zeros, arrives split around the ping.
        client.write_all(&[0x81, 0x82, 0, 0]).await.unwrap();
        stream.write_all(&open).await.unwrap();
        stream.write_all(&PING_FRAME[..1]).await.unwrap();
        stream.write_all(&PING_FRAME[1..]).await.unwrap();
        stream.write_all(&[0x81, 0x01, b'2']).await.unwrap(); // a later ping passes
        stream.flush().await.unwrap();
        client.write_all(&[0, 0, b'4', b'0']).await.unwrap();
        let mut got = vec![0u8; 8];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [0x81, 0x03, b'0', b'{', b'}', 0x81, 0x01, b'2']);
        // The ping was held before the library read anything: the pong comes first, then
        // the client's frame whole.
        let mut lib = vec![0u8; 8 + PONG_FRAME.len()];
        stream.read_exact(&mut lib).await.unwrap();
        assert_eq!(&lib[..7], &PONG_FRAME);
        assert_eq!(&lib[7..], &[0x81, 0x82, 0, 0, 0, 0, b'4', b'0']);
    }

    /// Nothing may be spliced before the library's CONNECT has passed, even written in odd
    /// chunks; then spliced frames go out after it.
    #[tokio::test]
    async fn nothing_spliced_before_connect() {
        let (lib_side, mut client) = tokio::io::duplex(64 * 1024);
        let mut stream = EioStream::new(lib_side, never(), never(), None, None);
        let splice = stream.splice();
        assert_eq!(splice.ready(), Some(false));
        let open = text_frame(br#"0{"sid":"s"}"#);
        stream.write_all(&open).await.unwrap();
        stream.flush().await.unwrap();
        assert_eq!(splice.ready(), Some(false), "an open packet is not the CONNECT");
        let connect = text_frame(br#"40{"sid":"n"}"#);
        stream.write_all(&connect[..3]).await.unwrap();
        assert_eq!(splice.ready(), Some(false), "half a CONNECT has not passed");
        let waiter = tokio::spawn({
            let splice = splice.clone();
            async move { splice.writable().await }
        });
        stream.write_all(&connect[3..]).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
        assert_eq!(splice.ready(), Some(true));
        let message = text_frame(br#"42["message",1]"#);
        assert!(splice.push(&message));
        let frames = read_frames(&mut client, 3).await;
        assert_eq!(frames, vec![open, connect, message]);
    }

    /// Library frames written in odd chunks and spliced frames interleave only at frame
    /// boundaries, each side in its own order.
    #[tokio::test]
    async fn spliced_frames_go_between_library_frames() {
        let (lib_side, mut client) = tokio::io::duplex(1024 * 1024);
        let mut stream = EioStream::new(lib_side, never(), never(), None, None);
        let splice = stream.splice();
        stream.write_all(&text_frame(b"40")).await.unwrap();
        let mut expected = vec![text_frame(b"40")];
        let mut library = Vec::new();
        let mut spliced = Vec::new();
        for i in 0..200usize {
            // Library frames of every length class, written 1, 2, 3... bytes at a time.
            let body = format!("42[\"lib\",{i},\"{}\"]", "x".repeat(i * 37 % 400));
            let frame = text_frame(body.as_bytes());
            let step = i % 7 + 1;
            for (k, chunk) in frame.chunks(step).enumerate() {
                stream.write_all(chunk).await.unwrap();
                if k == 1 {
                    // In the middle of a library frame.
                    let mine = text_frame(format!("42[\"spliced\",{i}]").as_bytes());
                    assert!(splice.push(&mine));
                    spliced.push(mine);
                }
            }
            library.push(frame);
        }
        stream.flush().await.unwrap();
        let frames = read_frames(&mut client, 1 + library.len() + spliced.len()).await;
        assert_eq!(frames[0], expected.remove(0));
        let (mut got_lib, mut got_spliced) = (Vec::new(), Vec::new());
        for f in &frames[1..] {
            if f.windows(9).any(|w| w == b"\"spliced\"") {
                got_spliced.push(f.clone());
            } else {
                got_lib.push(f.clone());
            }
        }
        assert_eq!(got_lib, library, "library frames whole and in order");
        assert_eq!(got_spliced, spliced, "spliced frames whole and in order");
        // Each spliced frame went out before the library frame it was pushed in the middle of.
        let first_spliced = frames.iter().position(|f| *f == spliced[0]).unwrap();
        let first_lib = frames.iter().position(|f| *f == library[0]).unwrap();
        assert!(first_spliced < first_lib);
    }

    /// An upgraded session's barrier never reaches the client: when it passes, the library's
    /// frames before it are appended, the splice is handed over and opened, and what is spliced
    /// then follows them.
    #[tokio::test]
    async fn the_barrier_hands_the_splice_over_after_the_frames_before_it() {
        let (lib_side, mut client) = tokio::io::duplex(64 * 1024);
        let handoff = SpliceHandoff::new();
        let barrier = Some((handoff.clone(), "s1".to_owned()));
        let mut stream = EioStream::new(lib_side, never(), never(), None, barrier);
        let splice = stream.splice();
        let handed = handoff.expect("s1");
        let before = text_frame(br#"42["message",1]"#);
        let barrier = text_frame(br#"42["ferrocast:splice",null]"#);
        let after = text_frame(b"2");
        // The library's CONNECT came over polling: a `40` here is no reason to splice.
        let mut write = text_frame(br#"40{"sid":"n"}"#);
        write.extend_from_slice(&before);
        write.extend_from_slice(&barrier[..4]);
        stream.write_all(&write).await.unwrap();
        assert_eq!(splice.ready(), Some(false), "nothing spliced before the barrier");
        let mut rest = barrier[4..].to_vec();
        rest.extend_from_slice(&after);
        stream.write_all(&rest).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), handed).await.unwrap().unwrap();
        assert!(Arc::ptr_eq(&got, &splice));
        assert_eq!(splice.ready(), Some(true));
        let mine = text_frame(br#"42["message",2]"#);
        assert!(splice.push(&mine));
        let frames = read_frames(&mut client, 4).await;
        assert_eq!(frames, vec![text_frame(br#"40{"sid":"n"}"#), before, after, mine]);
    }

    #[test]
    fn only_the_barrier_packet_is_a_barrier() {
        assert!(is_barrier(&text_frame(br#"42["ferrocast:splice",null]"#)));
        assert!(is_barrier(&text_frame(br#"42["ferrocast:splice"]"#)));
        assert!(!is_barrier(&text_frame(br#"42["message",{"d":"42[\"ferrocast:splice\""}]"#)));
        assert!(!is_barrier(&text_frame(br#"42["ferrocast:splicer",null]"#[..21].as_ref())));
        let mut masked = text_frame(br#"42["ferrocast:splice",null]"#);
        masked[1] |= 0x80;
        assert!(!is_barrier(&masked));
    }

    /// Dropping the stream (the library is done) writes what is left, then closes.
    #[tokio::test]
    async fn drop_flushes_then_closes() {
        let (lib_side, mut client) = tokio::io::duplex(64 * 1024);
        let mut stream = EioStream::new(lib_side, never(), never(), None, None);
        let splice = stream.splice();
        stream.write_all(&text_frame(b"40")).await.unwrap();
        assert!(splice.push(&text_frame(b"42[\"close\",{}]")));
        drop(stream);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        let mut expected = text_frame(b"40");
        expected.extend_from_slice(&text_frame(b"42[\"close\",{}]"));
        assert_eq!(rest, expected);
        tokio::time::timeout(Duration::from_secs(5), splice.writable()).await.unwrap();
        assert_eq!(splice.ready(), None);
        assert!(!splice.push(b"\x81\x01x"));
    }

    /// A client that stops reading does not keep its connection once the library is done:
    /// the pump gives up on what is left after the linger.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_reads_nothing_is_dropped_after_the_linger() {
        let (lib_side, client) = tokio::io::duplex(64);
        let mut stream = EioStream::new(lib_side, never(), never(), None, None);
        let splice = stream.splice();
        stream.write_all(&text_frame(b"40")).await.unwrap();
        assert!(splice.push(&text_frame(&[b'x'; 4000])));
        drop(stream);
        let closed = async {
            while splice.ready().is_some() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(SHUTDOWN_LINGER * 2, closed).await.expect("the pump let go");
        drop(client);
    }
}
