//! Local simulators of upstream market-data protocols, so connectors can be tested (and
//! demonstrated) with no account and no network: [`massive`] (Massive/Polygon stocks and
//! options clusters), [`binance`] (Binance combined streams) and [`coinbase`] (Coinbase
//! Exchange `ticker` and `heartbeat` channels).
//!
//! Each simulator serves WebSocket clients and a small control API on the same port:
//!
//! | request | effect |
//! | --- | --- |
//! | `GET /debug/subscriptions` | JSON: every connection with its subscriptions, the union of them, and counters |
//! | `POST /debug/stall` (`?on=0` to undo) | connections open now stop reading and writing, without closing (a frozen upstream) |
//! | `POST /debug/silent` (`?on=0` to undo) | market data stops (auth, pings, heartbeats and acks go on): a connected but silent upstream |
//! | `POST /debug/malformed?every=N` | every Nth data frame is replaced by a malformed one (0: off) |
//! | `POST /debug/disconnect?status=slow_consumer` | Massive: send that status to every connection and close it; others: close |
//! | `POST /debug/drop` | close every connection at once |
//! | `GET /v2/aggs/ticker/SYM/range/1/second\|minute/FROM/TO?apiKey=K&limit=N&sort=asc\|desc` | Massive: REST aggregates (see [`massive::aggregates`]) |
//!
//! Subscriptions and authentications are also logged (target `ferrocast_feeds::simulate`),
//! one line each, for people watching a terminal.

pub mod binance;
pub mod coinbase;
pub mod massive;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use futures_util::SinkExt;
use parking_lot::Mutex;
use rand::Rng;
use serde::Serialize;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

/// Which protocol a simulator speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// Massive (Polygon) clusters at `/stocks`, `/options`, ...
    Massive,
    /// Binance spot combined streams at `/stream` (raw at `/ws`).
    Binance,
    /// Coinbase Exchange feed at `/`.
    Coinbase,
}

/// What Massive does when a key opens more connections than allowed on a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eviction {
    /// The older connection gets `max_connections` and is closed (Massive's docs).
    Old,
    /// The new connection gets `max_connections` after authenticating and is closed
    /// (what third-party clients report seeing).
    New,
}

/// Simulator settings; the defaults suit tests.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Data events per second per connection, spread over its subscriptions.
    pub rate: f64,
    /// Massive: the only API key accepted (`None`: any non-empty key).
    pub api_key: Option<String>,
    /// Massive: eviction mode when `max_connections` is exceeded.
    pub eviction: Eviction,
    /// Massive: authenticated connections allowed per key and cluster.
    pub max_connections: usize,
    /// Massive: how long a client may take to authenticate.
    pub auth_timeout: Duration,
    /// Massive: interval of `AM` bars (a minute, shorter in tests).
    pub minute_bar_every: Duration,
    /// Every connection stalls this long after it opened (`None`: never).
    pub stall_after: Option<Duration>,
    /// Every Nth data frame is malformed (0: never).
    pub malformed_every: u64,
    /// Send no market data (authentication, pings, heartbeats and acks go on): a silent
    /// upstream. Also switchable at run time with `POST /debug/silent?on=1|0`.
    pub silent: bool,
    /// Binance: interval of server pings.
    pub ping_interval: Duration,
    /// Binance: a client that does not answer a ping this long is disconnected.
    pub pong_timeout: Duration,
    /// Binance: most client messages per second before the connection is closed.
    pub max_incoming_per_sec: u32,
    /// Coinbase: a client must subscribe within this time.
    pub subscribe_timeout: Duration,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            rate: 20.0,
            api_key: None,
            eviction: Eviction::Old,
            max_connections: 1,
            auth_timeout: Duration::from_secs(10),
            minute_bar_every: Duration::from_secs(60),
            stall_after: None,
            malformed_every: 0,
            silent: false,
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(60),
            max_incoming_per_sec: 5,
            subscribe_timeout: Duration::from_secs(5),
        }
    }
}

/// One client connection, as the control API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ConnInfo {
    /// Connection id, from 1.
    pub id: u64,
    /// Request path (`/stocks`, `/stream`).
    pub path: String,
    /// Whether the client authenticated (always true where no auth exists).
    pub authenticated: bool,
    /// The API key it authenticated with (Massive).
    #[serde(skip)]
    pub key: String,
    /// Its subscriptions, in the protocol's spelling (`T.AAPL`, `btcusdt@trade`).
    pub subscriptions: BTreeSet<String>,
}

/// Commands for connection tasks.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Command {
    /// Send this status (Massive) and close.
    Disconnect(String),
    /// Close at once.
    Drop,
}

/// State shared by a simulator's connections and its control API.
pub struct SimState {
    pub(crate) protocol: Protocol,
    pub(crate) opts: SimOptions,
    next_id: AtomicU64,
    conns: Mutex<BTreeMap<u64, ConnInfo>>,
    /// Per-connection command mailboxes.
    mailboxes: Mutex<HashMap<u64, tokio::sync::mpsc::UnboundedSender<Command>>>,
    /// Connections with an id up to this value are stalled (0: none).
    stall_upto: watch::Sender<u64>,
    malformed_every: AtomicU64,
    silent: AtomicBool,
    frames: AtomicU64,
    counters: Mutex<BTreeMap<&'static str, u64>>,
    /// Completes every connection when the simulator shuts down.
    closed: watch::Sender<bool>,
}

impl std::fmt::Debug for SimState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimState").field("protocol", &self.protocol).finish_non_exhaustive()
    }
}

impl SimState {
    fn new(protocol: Protocol, opts: SimOptions) -> Arc<Self> {
        Arc::new(SimState {
            protocol,
            malformed_every: AtomicU64::new(opts.malformed_every),
            silent: AtomicBool::new(opts.silent),
            opts,
            next_id: AtomicU64::new(1),
            conns: Mutex::new(BTreeMap::new()),
            mailboxes: Mutex::new(HashMap::new()),
            stall_upto: watch::Sender::new(0),
            frames: AtomicU64::new(0),
            counters: Mutex::new(BTreeMap::new()),
            closed: watch::Sender::new(false),
        })
    }

    /// Adds one to a counter (`connections`, `auth_ok`, `auth_failed`, `evicted`, ...).
    pub(crate) fn count(&self, name: &'static str) {
        *self.counters.lock().entry(name).or_default() += 1;
    }

    /// A counter's value.
    pub fn counter(&self, name: &str) -> u64 {
        self.counters.lock().get(name).copied().unwrap_or(0)
    }

    pub(crate) fn register(
        &self,
        path: &str,
    ) -> (u64, tokio::sync::mpsc::UnboundedReceiver<Command>) {
        let id = self.next_id.fetch_add(1, Relaxed);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.conns.lock().insert(
            id,
            ConnInfo {
                id,
                path: path.to_owned(),
                authenticated: false,
                key: String::new(),
                subscriptions: BTreeSet::new(),
            },
        );
        self.mailboxes.lock().insert(id, tx);
        self.count("connections");
        (id, rx)
    }

    pub(crate) fn unregister(&self, id: u64) {
        self.conns.lock().remove(&id);
        self.mailboxes.lock().remove(&id);
    }

    pub(crate) fn update(&self, id: u64, f: impl FnOnce(&mut ConnInfo)) {
        if let Some(c) = self.conns.lock().get_mut(&id) {
            f(c);
        }
    }

    pub(crate) fn send_command(&self, id: u64, cmd: Command) {
        if let Some(tx) = self.mailboxes.lock().get(&id) {
            let _ = tx.send(cmd);
        }
    }

    /// Every connection now open.
    pub fn connections(&self) -> Vec<ConnInfo> {
        self.conns.lock().values().cloned().collect()
    }

    /// The union of every connection's subscriptions.
    pub fn subscriptions(&self) -> BTreeSet<String> {
        self.conns.lock().values().flat_map(|c| c.subscriptions.iter().cloned()).collect()
    }

    /// Stalls every connection open now (`true`), or releases them.
    pub fn stall(&self, on: bool) {
        let upto = if on { self.next_id.load(Relaxed) - 1 } else { 0 };
        self.stall_upto.send_replace(upto);
    }

    /// Sets how often data frames are malformed (0: never).
    pub fn set_malformed_every(&self, every: u64) {
        self.malformed_every.store(every, Relaxed);
    }

    /// Stops (`true`) or resumes market data on every connection.
    pub fn set_silent(&self, on: bool) {
        self.silent.store(on, Relaxed);
    }

    /// Whether market data is withheld.
    pub(crate) fn is_silent(&self) -> bool {
        self.silent.load(Relaxed)
    }

    /// Massive: sends every connection the disconnect `status` (`slow_consumer`,
    /// `force_disconnect`, `max_connections`) and closes it; other protocols just close.
    pub fn disconnect_all(&self, status: &str) {
        self.broadcast(Command::Disconnect(status.to_owned()));
    }

    /// Closes every connection at once, without a status or a close frame.
    pub fn drop_all(&self) {
        self.broadcast(Command::Drop);
    }

    /// Sends `cmd` to every connection.
    pub(crate) fn broadcast(&self, cmd: Command) {
        for tx in self.mailboxes.lock().values() {
            let _ = tx.send(cmd.clone());
        }
    }

    /// Whether the next data frame should be malformed; counts frames.
    pub(crate) fn next_frame_malformed(&self) -> Option<u64> {
        let n = self.frames.fetch_add(1, Relaxed) + 1;
        let every = self.malformed_every.load(Relaxed);
        (every > 0 && n.is_multiple_of(every)).then(|| {
            self.count("malformed_sent");
            n / every
        })
    }

    /// Completes once connection `id` is stalled, and holds the caller (which must not
    /// touch its socket meanwhile) until the stall is lifted. Returns at once otherwise.
    pub(crate) async fn stalled(&self, id: u64) {
        let mut rx = self.stall_upto.subscribe();
        let _ = rx.wait_for(|upto| id > *upto).await;
    }

    /// A receiver that changes when stalls change, for `select!`.
    pub(crate) fn stall_watch(&self) -> watch::Receiver<u64> {
        self.stall_upto.subscribe()
    }

    pub(crate) fn is_stalled(&self, id: u64) -> bool {
        id <= *self.stall_upto.borrow()
    }

    pub(crate) fn closed_watch(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }

    fn snapshot_json(&self) -> serde_json::Value {
        json!({
            "protocol": format!("{:?}", self.protocol).to_lowercase(),
            "connections": self.connections(),
            "subscriptions": self.subscriptions(),
            "counters": *self.counters.lock(),
        })
    }
}

/// A running simulator.
#[derive(Debug)]
pub struct Simulator {
    state: Arc<SimState>,
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl Simulator {
    /// Serves `protocol` on `listener` until [`Simulator::shutdown`] or drop.
    pub fn start(protocol: Protocol, listener: TcpListener, opts: SimOptions) -> Simulator {
        let addr = listener.local_addr().expect("bound listener has an address");
        let state = SimState::new(protocol, opts);
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        Simulator { state, addr, accept }
    }

    /// Binds `addr` and starts; see [`Simulator::start`].
    pub async fn bind(protocol: Protocol, addr: &str, opts: SimOptions) -> std::io::Result<Self> {
        Ok(Simulator::start(protocol, TcpListener::bind(addr).await?, opts))
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The shared state: connections, subscriptions, counters, controls.
    pub fn state(&self) -> &Arc<SimState> {
        &self.state
    }

    /// Stops accepting and closes every connection at once (like a crashed upstream).
    pub fn shutdown(&self) {
        self.accept.abort();
        self.state.closed.send_replace(true);
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<SimState>) {
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                tokio::spawn(async move {
                    let mut closed = state.closed_watch();
                    tokio::select! {
                        () = serve_connection(stream, state.clone()) => {}
                        _ = closed.wait_for(|c| *c) => {}
                    }
                });
            }
            Err(e) => {
                tracing::warn!("simulator accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads the request head without consuming it, so a WebSocket upgrade can be handed to
/// tungstenite intact. Returns the head's text.
async fn peek_head(stream: &TcpStream) -> Option<String> {
    let mut buf = vec![0u8; 8192];
    for _ in 0..100 {
        let n = stream.peek(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        if let Some(end) = buf[..n].windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(String::from_utf8_lossy(&buf[..end + 4]).into_owned());
        }
        if n == buf.len() {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

async fn serve_connection(mut stream: TcpStream, state: Arc<SimState>) {
    let Ok(Some(head)) = tokio::time::timeout(Duration::from_secs(5), peek_head(&stream)).await
    else {
        return;
    };
    let is_upgrade = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("upgrade:") && l.contains("websocket")
    });
    if !is_upgrade {
        // Consume the head (and any small body) and answer the control request.
        let mut discard = vec![0u8; head.len()];
        if stream.read_exact(&mut discard).await.is_err() {
            return;
        }
        let request_line = head.lines().next().unwrap_or_default().to_owned();
        let (status, body) = control(&state, &request_line);
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
        return;
    }
    let mut target = String::new();
    // tungstenite's callback signature fixes the large error type; it is never built here.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| {
        target = req.uri().to_string();
        Ok(resp)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else { return };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), q.to_owned()),
        None => (target.clone(), String::new()),
    };
    match state.protocol {
        Protocol::Massive => massive::serve(ws, &path, state).await,
        Protocol::Binance => binance::serve(ws, &path, &query, state).await,
        Protocol::Coinbase => coinbase::serve(ws, state).await,
    }
}

/// Query parameter `name` of a request target.
fn query_param<'a>(target: &'a str, name: &str) -> Option<&'a str> {
    let query = target.split_once('?')?.1;
    query.split('&').find_map(|kv| match kv.split_once('=') {
        Some((k, v)) if k == name => Some(v),
        None if kv == name => Some(""),
        _ => None,
    })
}

/// Answers one control request: `(status line, JSON body)`.
fn control(state: &SimState, request_line: &str) -> (&'static str, String) {
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let ok = |v: serde_json::Value| ("200 OK", v.to_string());
    match (method, path) {
        ("GET", p) if state.protocol == Protocol::Massive && p.starts_with("/v2/aggs/ticker/") => {
            massive::aggregates(state, target)
        }
        ("GET", "/debug/subscriptions") => ok(state.snapshot_json()),
        ("POST" | "GET", "/debug/stall") => {
            let on = query_param(target, "on").is_none_or(|v| v != "0" && v != "false");
            state.stall(on);
            tracing::info!(on, "simulator: stall");
            ok(json!({"stalled": on}))
        }
        ("POST" | "GET", "/debug/silent") => {
            let on = query_param(target, "on").is_none_or(|v| v != "0" && v != "false");
            state.set_silent(on);
            tracing::info!(on, "simulator: silent (no market data)");
            ok(json!({"silent": on}))
        }
        ("POST" | "GET", "/debug/malformed") => {
            let every = query_param(target, "every").and_then(|v| v.parse().ok()).unwrap_or(1);
            state.set_malformed_every(every);
            tracing::info!(every, "simulator: malformed frames");
            ok(json!({"malformed_every": every}))
        }
        ("POST" | "GET", "/debug/disconnect") => {
            let status = query_param(target, "status").unwrap_or("force_disconnect").to_owned();
            tracing::info!(status, "simulator: disconnecting every connection");
            state.broadcast(Command::Disconnect(status.clone()));
            ok(json!({"disconnect": status}))
        }
        ("POST" | "GET", "/debug/drop") => {
            state.broadcast(Command::Drop);
            ok(json!({"dropped": true}))
        }
        _ => (
            "404 Not Found",
            json!({"error": "unknown control endpoint", "endpoints": [
                "GET /debug/subscriptions", "POST /debug/stall?on=1|0",
                "POST /debug/malformed?every=N", "POST /debug/silent?on=1|0", "POST /debug/disconnect?status=S", "POST /debug/drop"
            ]})
            .to_string(),
        ),
    }
}

/// A simulated WebSocket connection.
pub(crate) type SimWs = WebSocketStream<TcpStream>;

/// Sends `frames` in order; false once the client is gone (the connection then ends).
pub(crate) async fn send_all(
    tx: &mut futures_util::stream::SplitSink<SimWs, Message>,
    frames: Vec<Message>,
) -> bool {
    for frame in frames {
        if tx.send(frame).await.is_err() {
            return false;
        }
    }
    true
}

/// Random-walk prices per symbol.
#[derive(Debug, Default)]
pub(crate) struct Prices(HashMap<String, f64>);

impl Prices {
    /// The next price of `sym`, in whole cents, moving a few basis points per call.
    pub(crate) fn next(&mut self, sym: &str) -> f64 {
        let mut rng = rand::rng();
        let p = self.0.entry(sym.to_owned()).or_insert_with(|| start_price(sym));
        *p *= 1.0 + rng.random_range(-0.0005..0.0005);
        (*p * 100.0).round() / 100.0
    }
}

/// A stable starting price per symbol between 10 and 510.
pub(crate) fn start_price(sym: &str) -> f64 {
    let hash = sym
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    10.0 + (hash % 50_000) as f64 / 100.0
}

/// Formats Unix ms as RFC 3339 with microseconds, as Coinbase does.
pub(crate) fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil date from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}000Z",
        sod / 3_600,
        sod % 3_600 / 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_with_the_generic_parser() {
        for ms in [0, 1_666_222_102_061, 1_709_208_000_500, 951_782_400_000] {
            let s = rfc3339(ms);
            assert_eq!(crate::generic::rfc3339_ms(&s), Some(ms), "{s}");
        }
        assert_eq!(rfc3339(1_666_222_102_061), "2022-10-19T23:28:22.061000Z");
    }

    #[test]
    fn query_params() {
        assert_eq!(query_param("/debug/stall?on=0", "on"), Some("0"));
        assert_eq!(query_param("/debug/malformed?x=1&every=3", "every"), Some("3"));
        assert_eq!(query_param("/debug/stall", "on"), None);
    }
}
