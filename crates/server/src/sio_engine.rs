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
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, watch};
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

impl<S> EngineFront<S> {
    pub fn new(inner: S, app: Arc<AppState>, websocket: bool, polls: Arc<PollingDrain>) -> Self {
        let state = FrontState {
            ping_interval: Duration::from_millis(app.config.server.ping_interval_ms),
            app,
            websocket,
            first_ping: Mutex::default(),
            cut: watch::channel(false).0,
            polls,
            cutter: AtomicBool::new(false),
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
            let stream = EioStream::new(TokioIo::new(upgraded), state.cut_signal(), first_ping);
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
/// Bytes buffered toward the client before writes wait.
const OUT_HIGH_WATER: usize = 64 * 1024;

/// A websocket connection as the library sees it: dropped when the drain cuts transports
/// (the library then reads end-of-stream; the client sees the TCP connection close without
/// an Engine.IO close packet), and, for a new session, without the library's first ping,
/// which it answers itself.
pub struct EioStream<S> {
    inner: Option<S>,
    cut: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// Still looking for the first ping among the server's frames.
    watching: bool,
    /// Until when a ping frame is the library's early one.
    early_until: Instant,
    /// For an upgraded polling session: its id among the sessions whose first ping is still
    /// due, which the polling side may have taken meanwhile.
    upgraded: Option<UpgradedSession>,
    /// Server bytes not yet a whole frame (while watching).
    partial: Vec<u8>,
    frames_seen: usize,
    /// Server bytes ready for the client.
    out: Vec<u8>,
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

impl<S: AsyncRead + AsyncWrite + Unpin> EioStream<S> {
    /// `first_ping`: `None` to pass every frame; `Some((until, None))` to hold back a ping
    /// written before `until`; `Some((until, Some((state, sid))))` the same, unless the
    /// polling side took that ping first.
    fn new(
        inner: S,
        cut: Pin<Box<dyn Future<Output = ()> + Send>>,
        first_ping: Option<(Instant, Option<UpgradedSession>)>,
    ) -> Self {
        let (early_until, upgraded) = match first_ping {
            Some((until, upgraded)) => (until, upgraded),
            None => (Instant::now(), None),
        };
        EioStream {
            inner: Some(inner),
            cut,
            watching: first_ping_due(&early_until),
            early_until,
            upgraded,
            partial: Vec::new(),
            frames_seen: 0,
            out: Vec::new(),
            pong_left: 0,
            input: Vec::new(),
            frame_left: 0,
            read_waker: None,
        }
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

    /// Sorts whole server frames out of `partial`: the first ping is held back.
    fn sort_frames(&mut self) {
        while let Some(len) = frame_len(&self.partial).filter(|n| *n <= self.partial.len()) {
            let is_ping = self.partial[..len] == PING_FRAME;
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
            } else if is_ping {
                // A regular ping (the early one went over polling, or never came).
                self.watching = false;
                self.out.extend_from_slice(&self.partial[..len]);
            } else {
                self.out.extend_from_slice(&self.partial[..len]);
            }
            self.partial.drain(..len);
            self.frames_seen += 1;
            if !self.watching {
                break;
            }
            if self.frames_seen >= FRAMES_BEFORE_PING || !first_ping_due(&self.early_until) {
                self.watching = false;
            }
        }
        if !self.watching {
            self.out.append(&mut self.partial);
        }
    }

    /// Writes buffered server bytes to the connection.
    fn poll_flush_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(Err(cut_error())) };
        while !self.out.is_empty() {
            match Pin::new(&mut *inner).poll_write(cx, &self.out) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.out.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
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

/// Whether the early ping may still come.
fn first_ping_due(until: &Instant) -> bool {
    Instant::now() < *until
}

fn cut_error() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "socket.io transport dropped for the drain")
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
        if this.watching {
            if this.out.len() >= OUT_HIGH_WATER && this.poll_flush_out(cx)?.is_pending() {
                return Poll::Pending;
            }
            this.partial.extend_from_slice(buf);
            this.sort_frames();
            // Written out as far as the connection takes now; the rest on the next flush.
            let _ = this.poll_flush_out(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        if this.poll_flush_out(cx)?.is_pending() {
            return Poll::Pending;
        }
        match this.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_write(cx, buf),
            None => Poll::Ready(Err(cut_error())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.check_cut(cx) {
            return Poll::Ready(Err(cut_error()));
        }
        if this.poll_flush_out(cx)?.is_pending() {
            return Poll::Pending;
        }
        match this.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_flush(cx),
            None => Poll::Ready(Err(cut_error())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.check_cut(cx) {
            return Poll::Ready(Ok(()));
        }
        if this.poll_flush_out(cx)?.is_pending() {
            return Poll::Pending;
        }
        match this.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
        let never: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(std::future::pending());
        let until = Instant::now() + Duration::from_secs(60);
        let mut stream = EioStream::new(lib_side, never, Some((until, None)));
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
}
