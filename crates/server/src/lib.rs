//! The ferrocast server: everything between the hub and the network.
//!
//! | module | job |
//! | --- | --- |
//! | [`config`] | the configuration: file, environment, flags, validation |
//! | [`diagnostics`] | `/api/diagnostics`: what the server received after every proxy hop |
//! | [`ws`] | the native WebSocket endpoint: upgrade, framing, one task per connection |
//! | [`sse`] | Server-Sent Events at `/sse`, with `POST /sse/control` and `Last-Event-ID` resume |
//! | [`sse_gzip`] | gzip-encoded event streams sharing each compressed message with `/ws` |
//! | [`socketio`] | Socket.IO v4 (polling, websocket, upgrade) through `socketioxide` |
//! | [`sio_engine`] | Engine.IO's HTTP side in front of `socketioxide`: drain cut-off, first ping |
//! | [`session`] | the session model every transport shares: subscriptions, limits, requests |
//! | [`auth`] | connection and subscription tokens (JWT): verification, claims, refusals |
//! | [`jwks`] | keys fetched from `auth.jwks_url`, chosen by `kid`, cached and refreshed |
//! | [`proxy`] | the application's own login: connect, subscribe and publish asked over HTTP |
//! | [`permissions`] | the one decision of who may subscribe, publish and read history |
//! | [`limits`] | limits against abuse: connections per address and user, requests per connection |
//! | [`users`] | live connections by user, the part of a session other tasks may touch |
//! | [`access`] | who may use the HTTP API: keys and scopes, loopback trust, CORS |
//! | [`api`] | the HTTP API: publish, channels, history, stats, health, metrics |
//! | [`server_api`] | a user's connections on every node: list, disconnect, (un)subscribe |
//! | [`body`] | request bodies within limits of time (408) and size (413) |
//! | [`connections`] | every TCP connection counted; overload answers; accept-error defences |
//! | [`tls`] | TLS served directly (rustls), HTTP/2 by ALPN, certificate reload on SIGHUP |
//! | [`metrics`] | counters and the Prometheus exposition |
//! | [`log_throttle`] | refusals a client can repeat at will logged a few a second, with a count |
//! | [`feedboard`] | the state of each data source, for readiness and the dashboard |
//! | [`sources`] | built-in sources wired to the hub: simulator and candles |
//! | [`connectors`] | upstream market-data feeds (`[[feeds]]`) wired to the hub, readiness and metrics |
//! | [`assets`] | the embedded dashboard and browser client |
//! | [`shutdown`] | the drain signal and the count of live connections |
//! | [`ingress`] | the ingress runtime: API connections and sources, apart from the fan-out |
//!
//! [`Server::bind`] validates nothing and binds; [`Server::with_tls`] adds TLS;
//! [`Server::run`] serves until the shutdown future resolves, then drains. Tests start a real
//! server on `127.0.0.1:0` this way.
#![forbid(unsafe_code)]

pub mod access;
pub mod api;
pub mod assets;
pub mod auth;
pub mod body;
pub mod config;
pub mod connections;
pub mod connectors;
pub mod diagnostics;
pub mod feedboard;
pub mod ingress;
pub mod jwks;
pub mod limits;
pub mod log_throttle;
pub mod metrics;
pub mod permissions;
pub mod proxy;
pub mod server_api;
pub mod session;
pub mod shutdown;
pub mod sio_engine;
pub mod socketio;
pub mod sources;
pub mod sse;
pub mod sse_gzip;
pub mod tls;
pub mod users;
pub mod ws;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use axum::routing::{MethodFilter, any, get, on, post};
use config::BrokerKind;
use ferrocast_broker_redis::{RedisBroker, RedisOptions};
use ferrocast_hub::{Broker, Hub, HubOptions, Lease, MemoryBroker, Namespaces, Pending};
use ferrocast_protocol::{ErrorCode, FrameError};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tower::ServiceExt;

use connections::{Acceptor, Connections, CountedStream};

pub use config::Config;
use feedboard::FeedBoard;
use metrics::ServerMetrics;
use shutdown::Shutdown;

/// State shared by every handler and connection.
#[derive(Debug)]
pub struct AppState {
    pub config: Arc<Config>,
    pub hub: Arc<Hub>,
    /// Where offsets come from: this hub (`memory`) or Redis shared by many nodes. Every
    /// publish goes through it, and every subscribe asks it to prepare the channel.
    pub broker: Arc<dyn Broker>,
    /// This node's id among the cluster's nodes (`GET /api/nodes`).
    pub node_id: String,
    /// Whether this node runs the cluster's ingestion (simulator, feeds, candle building):
    /// one lease for all of it, so the candle builder sits with the feeds whose upstream
    /// bars it must leave alone. Always held with the memory broker.
    pub ingest: Lease,
    pub metrics: ServerMetrics,
    pub feeds: FeedBoard,
    /// Candles built from trades on `ticks.*`.
    pub candles: sources::Candles,
    pub shutdown: Shutdown,
    /// Every open TCP connection, and the HTTP layer's counters.
    pub connections: Connections,
    /// The API keys and their scopes (none: loopback clients are trusted instead).
    pub api_keys: access::ApiKeys,
    /// Token verification (`[auth]`).
    pub auth: auth::Auth,
    /// Per-address, per-user and per-connection limits (`[limits]`).
    pub limits: limits::Limits,
    /// TLS, when served directly (set once by [`Server::with_tls`]).
    pub tls: OnceLock<tls::Tls>,
    /// The application's connect, subscribe and publish proxy (`[proxy]`).
    pub proxy: proxy::Proxy,
    /// Live connections by user (the server API's reach on this node).
    pub users: users::Users,
    /// Server API requests made on this node, by action (a metric).
    pub server_api_requests: server_api::Requests,
    /// The log lines of refused HTTP API requests (publish, API keys, body size), throttled.
    pub api_refusals: log_throttle::LogThrottle,
    pub started: Instant,
    pub next_conn_id: AtomicU64,
    /// The ingress runtime (set once by `ferrocast serve`; without it, everything runs on
    /// the current runtime): see [`ingress`].
    pub ingress: OnceLock<tokio::runtime::Handle>,
}

impl AppState {
    /// Builds the state for a validated config; `api_key`, when given, replaces `api.key`.
    /// `[auth]` and `[api]` are built without an environment (`*_env` names unresolved):
    /// the binary uses [`AppState::with_auth`].
    /// With `broker.kind = "redis"` this starts the broker's tasks, so it must be called
    /// inside a multi-threaded tokio runtime.
    pub fn new(config: Config, api_key: Option<String>) -> Arc<Self> {
        let auth = auth::Auth::from_config(&config.auth, &[]).unwrap_or_else(|e| {
            tracing::error!("{e}; no token will be accepted");
            auth::Auth::default()
        });
        let mut api = config.api.clone();
        if let Some(key) = api_key {
            api.key = key;
        }
        let keys = access::ApiKeys::from_config(&api, &[]).unwrap_or_else(|e| {
            tracing::error!("{e}; only api.key is in use");
            access::ApiKeys::new(vec![(
                "api.key".into(),
                api.key.clone(),
                access::ALL_SCOPES.to_vec(),
            )])
        });
        AppState::with_auth(config, keys, auth)
    }

    /// Builds the state with API keys made by [`access::ApiKeys::from_config`] and a verifier
    /// made by [`auth::Auth::from_config`].
    pub fn with_auth(config: Config, api_keys: access::ApiKeys, auth: auth::Auth) -> Arc<Self> {
        let namespaces =
            Namespaces::new(config.namespaces.clone(), config.namespace_defaults.clone());
        let hub = Arc::new(Hub::new(
            namespaces,
            HubOptions { max_channels: config.server.max_channels, ..HubOptions::default() },
        ));
        let mut node_id = random_id(12);
        let broker: Arc<dyn Broker> = match config.broker.kind {
            BrokerKind::Memory => Arc::new(MemoryBroker::new(hub.clone())),
            BrokerKind::Redis => {
                let b = &config.broker;
                let options = RedisOptions {
                    url: b.url.clone(),
                    prefix: b.prefix.clone(),
                    timeout: Duration::from_millis(b.timeout_ms),
                    position_check: Duration::from_millis(b.position_check_ms),
                    meta_ttl: Duration::from_millis(b.meta_ttl_ms),
                    ready_grace: Duration::from_millis(b.ready_grace_ms),
                    tls_ca: b.tls_ca().expect("validated broker.tls_ca_file"),
                    cluster_urls: b.cluster_urls.clone(),
                    sentinels: b.sentinels.clone(),
                    sentinel_master: b.sentinel_master.clone(),
                };
                // The URL was validated with the same parser, so this cannot fail.
                let broker =
                    RedisBroker::start(hub.clone(), options).expect("validated broker.url");
                node_id = broker.node_id().to_owned();
                broker
            }
        };
        let limits = limits::Limits::new(&config.limits, config.server.reconnect_after_ms);
        let proxy = proxy::Proxy::new(config.proxy.clone());
        let ingest = broker.lease("ingest");
        let app = Arc::new(AppState {
            hub,
            broker,
            node_id,
            ingest,
            config: Arc::new(config),
            metrics: ServerMetrics::default(),
            feeds: FeedBoard::default(),
            candles: sources::Candles::default(),
            shutdown: Shutdown::default(),
            connections: Connections::default(),
            api_keys,
            auth,
            limits,
            tls: OnceLock::new(),
            proxy,
            users: users::Users::default(),
            server_api_requests: server_api::Requests::default(),
            api_refusals: log_throttle::LogThrottle::new("refused HTTP API requests"),
            started: Instant::now(),
            next_conn_id: AtomicU64::new(1),
            ingress: OnceLock::new(),
        });
        // Weak: the broker lives in the state it would otherwise keep alive.
        let weak = Arc::downgrade(&app);
        app.broker.answer_surveys(Arc::new(move |question| {
            let weak = weak.clone();
            Box::pin(async move {
                match weak.upgrade() {
                    Some(app) => api::survey_answer(&app, &question).await,
                    None => Vec::new(),
                }
            })
        }));
        app
    }

    /// Checks that published `data` nests at most `server.max_data_depth` levels, counting a
    /// refusal; every ingress calls it before publishing.
    pub fn check_data_depth(&self, data: &[u8]) -> Result<(), FrameError> {
        let max = self.config.server.max_data_depth;
        ferrocast_protocol::check_depth(data, max).map_err(|e| {
            self.connections.counters.data_too_deep.fetch_add(1, Relaxed);
            FrameError::new(
                None,
                ErrorCode::BadRequest,
                format!("\"data\" {e} (server.max_data_depth)"),
            )
        })
    }
}

/// Waits for a broker's answer from synchronous code. The memory broker always answers at
/// once; the Redis broker's answers are awaited with the worker thread handed over to the
/// runtime's other tasks meanwhile (bounded by `broker.timeout_ms`), which needs the
/// multi-threaded runtime `ferrocast serve` runs on.
pub fn wait_for_broker<T>(pending: Pending<T>) -> T {
    match pending {
        Pending::Ready(value) => value,
        Pending::Later(future) => {
            tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
        }
    }
}

/// Waits for `future` from synchronous code (a session request that asks the auth proxy or
/// fetches the JWKS): on the multi-threaded runtime `ferrocast serve` runs on, the worker
/// thread is handed over to the runtime's other tasks meanwhile; elsewhere (unit tests) the
/// future runs on a thread of its own.
pub fn block_on<F>(future: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| handle.block_on(future))
        }
        _ => std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a runtime for one blocking wait")
                        .block_on(future)
                })
                .join()
                .expect("the blocking wait does not panic")
        }),
    }
}

/// Locks a session's mutex from async code (a writer ending its connection, a control
/// request). Its holder may be a request waiting on the auth proxy or the broker (see
/// [`block_on`]), whose answer needs the runtime's workers: when the lock is taken, this
/// worker thread is handed over to the runtime meanwhile instead of parking with it.
pub fn lock_from_async<T>(mutex: &parking_lot::Mutex<T>) -> parking_lot::MutexGuard<'_, T> {
    if let Some(guard) = mutex.try_lock() {
        return guard;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| mutex.lock())
        }
        _ => mutex.lock(),
    }
}

/// A random id of `len` characters from `[a-z0-9]`.
pub fn random_id(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

/// Every route, on one port.
pub fn router(app: Arc<AppState>) -> Router {
    let mut r = Router::new()
        .route("/api/publish", post(api::publish))
        .route("/api/channels", get(api::channels))
        .route("/api/channels/{channel}/history", get(api::history))
        .route("/api/stats", get(api::stats))
        .route("/api/nodes", get(api::nodes))
        .route("/api/feeds", get(api::feeds))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(api::metrics))
        .route("/api/diagnostics", get(diagnostics::handle))
        .route("/api/users/{user}/connections", get(server_api::connections))
        .route("/api/users/{user}/{action}", post(server_api::act))
        .merge(sse::routes(&app));
    if app.config.socketio.enabled {
        r = r.merge(socketio::routes(&app));
    } else {
        r = r
            .route("/socket.io", any(api::socketio_disabled))
            .route("/socket.io/", any(api::socketio_disabled))
            .route("/socket.io/{*rest}", any(api::socketio_disabled));
    }
    for path in &app.config.server.ws_paths {
        // CONNECT: a WebSocket over HTTP/2 (RFC 8441).
        r = r.route(path, on(MethodFilter::GET.or(MethodFilter::CONNECT), ws::upgrade));
    }
    if app.config.server.dashboard {
        for path in assets::paths() {
            r = r.route(path, get(move || async move { assets::serve(path) }));
        }
    }
    r.layer(axum::middleware::from_fn_with_state(app.clone(), access::cors))
        .layer(axum::middleware::from_fn_with_state(app.clone(), body::deadline))
        .with_state(app)
}

/// Pending-connection queue length requested from the kernel.
const LISTEN_BACKLOG: u32 = 8192;
/// How long, once draining starts, an idle keep-alive HTTP connection stays open for a
/// request already on its way. Closing it at once would reset such a request: a Socket.IO
/// long-poll, sent again the moment the previous one is answered, would fail before the
/// server could give it the client's `close` event.
const DRAIN_LINGER: Duration = Duration::from_secs(1);

/// A bound, not yet serving, server.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    app: Arc<AppState>,
}

impl Server {
    /// Binds the configured address (or `addr` when given, e.g. `127.0.0.1:0` in tests).
    pub async fn bind(app: Arc<AppState>, addr: Option<SocketAddr>) -> std::io::Result<Server> {
        let addr = addr.unwrap_or_else(|| app.config.listen_addr());
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        // A deep backlog absorbs reconnect waves (a fleet coming back after a deploy) without
        // SYN retransmits; the kernel caps it at net.core.somaxconn.
        let listener = socket.listen(LISTEN_BACKLOG)?;
        Ok(Server { listener, app })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    pub fn app(&self) -> &Arc<AppState> {
        &self.app
    }

    /// Serves TLS (`wss://`, `https://`, HTTP/2 by ALPN) with `tls` on this server's port.
    pub fn with_tls(self, tls: tls::Tls) -> Self {
        if self.app.tls.set(tls).is_err() {
            tracing::warn!("TLS was set already; keeping the first configuration");
        }
        self
    }

    /// Serves until `stop` resolves, then drains: readiness turns 503, no new connection is
    /// accepted, every WebSocket is closed with 1001 and a jittered reconnect hint, and the
    /// call returns once every connection has closed or the grace period has passed.
    pub async fn run(self, stop: impl Future<Output = ()>) {
        let Server { listener, app } = self;
        {
            // Sources publish from the ingress runtime, when there is one (see [`ingress`]).
            let _ingress = app.ingress.get().map(tokio::runtime::Handle::enter);
            sources::start_simulator(&app, &app.ingest);
            sources::start_candles(&app, &app.ingest);
            connectors::start(&app, &app.ingest);
        }
        spawn_sweeper(&app);
        spawn_advertiser(&app);
        if let Some(jwks) = &app.auth.jwks {
            tokio::spawn(jwks.clone().keep_fresh());
        }
        let router = router(app.clone());
        let mut acceptor = Acceptor::new(listener);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                (stream, peer) = acceptor.accept(&app) => {
                    spawn_http(stream, peer, router.clone(), app.clone());
                }
                _ = &mut stop => break,
            }
        }
        let grace = Duration::from_millis(app.config.server.shutdown_grace_ms);
        tracing::info!(
            connections = app.shutdown.active_connections(),
            grace_ms = grace.as_millis() as u64,
            "draining: readiness is 503, closing clients with 1001"
        );
        app.shutdown.trigger();
        // Keep answering plain HTTP while draining, so load balancers and operators can see
        // /readyz turn 503; new WebSocket and SSE clients are refused with a reconnect hint,
        // and every connection accepted now serves one request and closes.
        let drained = async {
            if app.shutdown.wait_idle(grace).await {
                tracing::info!("drained; exiting");
            } else {
                tracing::warn!(
                    left = app.shutdown.active_connections(),
                    "grace period over; exiting with connections open"
                );
            }
        };
        tokio::pin!(drained);
        loop {
            tokio::select! {
                _ = &mut drained => break,
                (stream, peer) = acceptor.accept(&app) => {
                    spawn_http(stream, peer, router.clone(), app.clone());
                }
            }
        }
        if let Some(closed) = app.broker.close() {
            closed.await;
        }
    }
}

/// Serves one TCP connection: its TLS handshake first when TLS is on, then HTTP/1.1 (and
/// hands WebSocket upgrades over) or, when ALPN chose it, HTTP/2. The connection counts
/// toward the total from here until its socket closes, upgrades included.
fn spawn_http(stream: TcpStream, peer: SocketAddr, router: Router, app: Arc<AppState>) {
    let _ = stream.set_nodelay(true);
    let (count, open) = app.connections.count();
    let max = app.config.server.max_connections;
    let http_allowed = Connections::http_allowed(open, max);
    let stream = CountedStream::new(stream, count);
    tokio::spawn(async move {
        let Some(tls) = app.tls.get() else {
            return serve_plain(stream, peer, router, app, http_allowed).await;
        };
        // A handshake is held to the same deadline as a request's headers.
        let header_timeout = Duration::from_millis(app.config.server.header_read_timeout_ms);
        match tokio::time::timeout(header_timeout, tls.accept(stream)).await {
            Ok(Ok((stream, negotiated))) => {
                let io = TokioIo::new(stream);
                serve_connection(io, peer, Some(negotiated), router, app, http_allowed).await;
            }
            Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
            Err(_) => {
                tls.count_handshake_timeout();
                tracing::debug!(%peer, "closing connection: no TLS handshake in time");
            }
        }
    });
}

/// Serves a plain-TCP connection, on the ingress runtime when there is one and its first
/// request is for the API (see [`ingress`]).
async fn serve_plain(
    stream: CountedStream,
    peer: SocketAddr,
    router: Router,
    app: Arc<AppState>,
    http_allowed: bool,
) {
    if let Some(handle) = app.ingress.get().cloned() {
        let header_timeout = Duration::from_millis(app.config.server.header_read_timeout_ms);
        let (tcp, count) = stream.into_parts();
        match ingress::route(&tcp, header_timeout).await {
            ingress::Route::Ingress => {
                let serve = move |tcp| {
                    let io = TokioIo::new(CountedStream::new(tcp, count));
                    serve_connection(io, peer, None, router, app, http_allowed)
                };
                if let Err(e) = ingress::hand_over(&handle, tcp, serve) {
                    tracing::debug!(%peer, "closing connection: {e}");
                }
                return;
            }
            ingress::Route::Silent => {
                app.connections.counters.header_timeouts.fetch_add(1, Relaxed);
                tracing::debug!(%peer, "closing connection: no request in time");
                return;
            }
            ingress::Route::Egress => {
                let io = TokioIo::new(CountedStream::new(tcp, count));
                return serve_connection(io, peer, None, router, app, http_allowed).await;
            }
        }
    }
    serve_connection(TokioIo::new(stream), peer, None, router, app, http_allowed).await
}

/// Serves HTTP on one connection until it ends. With TLS, `negotiated` says what the
/// handshake chose (every request carries it as an extension); ALPN `h2` gets HTTP/2, with
/// RFC 8441's extended CONNECT enabled for WebSockets, anything else HTTP/1.1.
async fn serve_connection<I>(
    io: I,
    peer: SocketAddr,
    negotiated: Option<tls::Negotiated>,
    router: Router,
    app: Arc<AppState>,
    http_allowed: bool,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let max = app.config.server.max_connections;
    let is_h2 = negotiated.is_some_and(|n| n.is_h2());
    let service_app = app.clone();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        if let Some(negotiated) = negotiated {
            req.extensions_mut().insert(negotiated);
        }
        let router = router.clone();
        let app = service_app.clone();
        async move {
            let path = req.uri().path();
            if !http_allowed && !connections::ALWAYS_ANSWERED.contains(&path) {
                return Ok::<_, Infallible>(app.connections.overloaded(peer, max));
            }
            let mut res = router.oneshot(req).await?;
            // While draining, every HTTP/1.1 answer ends its connection (an upgrade's is
            // taken over; HTTP/2 winds down with its GOAWAY instead).
            if app.shutdown.is_draining()
                && !is_h2
                && res.status() != http::StatusCode::SWITCHING_PROTOCOLS
            {
                res.headers_mut()
                    .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
            }
            Ok(res)
        }
    });
    // A connection accepted while draining serves one request (e.g. /readyz) and closes;
    // so does one beyond the limit.
    let wind_down = app.shutdown.is_draining() || !http_allowed;
    let server = &app.config.server;
    let result = if is_h2 {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .enable_connect_protocol()
            .keep_alive_interval(Duration::from_millis(server.ping_interval_ms))
            .keep_alive_timeout(Duration::from_millis(server.pong_timeout_ms));
        let conn = builder.serve_connection(io, service);
        tokio::pin!(conn);
        // HTTP/2 winds down with a GOAWAY, which lets the requests already sent finish.
        let start = if wind_down { Start::GoAway } else { Start::Serve };
        drive(conn, start, &app, |c| c.graceful_shutdown()).await
    } else {
        let header_timeout = Duration::from_millis(server.header_read_timeout_ms);
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(header_timeout)
            .keep_alive(!wind_down)
            .serve_connection(io, service)
            .with_upgrades();
        tokio::pin!(conn);
        // Without keep-alive, HTTP/1.1 winds down after its first request by itself.
        let start = if app.shutdown.is_draining() { Start::Finish } else { Start::Serve };
        drive(conn, start, &app, |c| c.graceful_shutdown()).await
    };
    if let Err(e) = result {
        if e.is_timeout() {
            // Also how idle keep-alive connections end: hyper times the wait for the
            // next request's headers too.
            app.connections.counters.header_timeouts.fetch_add(1, Relaxed);
            tracing::debug!(%peer, "closing connection: no complete request headers in time");
        } else {
            tracing::debug!(%peer, "connection ended with an error: {e}");
        }
    }
}

/// How [`drive`] starts a connection.
enum Start {
    /// Serve, and shut down gracefully when the server starts draining.
    Serve,
    /// Serve until the connection ends by itself.
    Finish,
    /// Shut down gracefully at once.
    GoAway,
}

/// Runs a hyper connection to its end.
async fn drive<C>(
    mut conn: std::pin::Pin<&mut C>,
    start: Start,
    app: &AppState,
    graceful_shutdown: impl FnOnce(std::pin::Pin<&mut C>),
) -> Result<(), hyper::Error>
where
    C: Future<Output = Result<(), hyper::Error>>,
{
    match start {
        Start::Serve => {}
        Start::Finish => return conn.await,
        Start::GoAway => {
            graceful_shutdown(conn.as_mut());
            return conn.await;
        }
    }
    tokio::select! {
        result = conn.as_mut() => result,
        _ = app.shutdown.draining() => {
            // Requests already on their way are answered (with `Connection: close`) before
            // an idle connection is shut.
            match tokio::time::timeout(DRAIN_LINGER, conn.as_mut()).await {
                Ok(result) => result,
                Err(_) => {
                    graceful_shutdown(conn.as_mut());
                    conn.await
                }
            }
        }
    }
}

/// With a cluster broker, tells the other nodes about this one every 2 s (`/api/nodes`).
fn spawn_advertiser(app: &Arc<AppState>) {
    if app.broker.kind() == "memory" {
        return;
    }
    let app = app.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = tick.tick() => app.broker.advertise(api::node_info(&app).to_string()),
                _ = app.shutdown.draining() => return,
            }
        }
    });
}

/// Periodically forgets idle channels and idle client addresses so memory stays bounded.
fn spawn_sweeper(app: &Arc<AppState>) {
    let hub = app.hub.clone();
    let limits = app.limits.clone();
    let shutdown = app.shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    limits.sweep();
                    let removed = hub.sweep(Instant::now());
                    if removed > 0 {
                        tracing::debug!(removed, "expired idle channels");
                    }
                }
                _ = shutdown.draining() => return,
            }
        }
    });
}
