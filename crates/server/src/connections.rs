//! Every accepted TCP connection, counted for its whole life, and the accept loop's defences.
//!
//! - Each accepted socket is wrapped in a [`CountedStream`] holding a [`ConnCount`], so the
//!   count covers plain HTTP, SSE, and WebSocket and Socket.IO connections after their upgrade
//!   (the upgraded I/O carries the stream along). WebSocket, SSE and Socket.IO admission
//!   compare this total with `server.max_connections` ([`Connections::over_client_limit`]).
//! - Plain HTTP requests may use [`HTTP_HEADROOM`] connections beyond the limit, so publishers
//!   and operators still get in when clients fill it; past that, a connection is answered a
//!   cheap `503 overloaded` and closed, except `/healthz`, `/readyz` and `/metrics`.
//! - When accepting fails (the process is out of file descriptors, EMFILE), [`Acceptor`]
//!   backs off exponentially, warns at most once every few seconds with a count of the errors
//!   it did not log, and uses a reserve descriptor to take one pending connection at a time,
//!   answer it (health checks 200, anything else 503) and close it, so health checks keep
//!   answering and clients are refused clearly instead of waiting in the backlog.
//! - [`HttpCounters`] are the metrics of all this, and of request timeouts and size limits.

use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderValue, Response, StatusCode, header};
use parking_lot::Mutex;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::AppState;
use crate::metrics::family;
use crate::ws::json_response;

/// Connections beyond `server.max_connections` that plain HTTP requests may still use.
pub const HTTP_HEADROOM: usize = 64;
/// Paths answered even beyond the headroom and at the file-descriptor limit.
pub const ALWAYS_ANSWERED: [&str; 3] = ["/healthz", "/readyz", "/metrics"];
/// `Retry-After` of a `503 overloaded`, in seconds.
const RETRY_AFTER_S: u64 = 1;
/// First and longest pause after a failed accept.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Shortest interval between two warnings of the same kind.
const WARN_EVERY: Duration = Duration::from_secs(5);

/// The count of open TCP connections and the HTTP-level counters.
#[derive(Debug, Default)]
pub struct Connections {
    open: Arc<AtomicUsize>,
    pub counters: HttpCounters,
    overload_warning: Mutex<Warning>,
}

/// Held for as long as one TCP connection is open.
#[derive(Debug)]
pub struct ConnCount(Arc<AtomicUsize>);

impl Drop for ConnCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Connections {
    /// Counts a newly accepted connection; returns its guard and the count including it.
    pub fn count(&self) -> (ConnCount, usize) {
        let open = self.open.fetch_add(1, Relaxed) + 1;
        (ConnCount(self.open.clone()), open)
    }

    /// Open TCP connections.
    pub fn open(&self) -> usize {
        self.open.load(Relaxed)
    }

    /// Whether a client connection (WebSocket, SSE, Socket.IO), already counted, is beyond
    /// `max`.
    pub fn over_client_limit(&self, max: usize) -> bool {
        self.open() > max
    }

    /// Whether a connection that was the `open`-th one may serve more than the
    /// [`ALWAYS_ANSWERED`] paths.
    pub fn http_allowed(open: usize, max: usize) -> bool {
        open <= max.saturating_add(HTTP_HEADROOM)
    }

    /// The `503 overloaded` answer for a request on a connection beyond the headroom.
    pub fn overloaded(&self, peer: SocketAddr, max: usize) -> Response<Body> {
        self.counters.overloaded_max_connections.fetch_add(1, Relaxed);
        let open = self.open();
        self.overload_warning.lock().warn(|suppressed| {
            tracing::warn!(
                %peer,
                open,
                max_connections = max,
                suppressed,
                "connection limit reached: answering 503 to plain HTTP requests beyond \
                 server.max_connections + {HTTP_HEADROOM} (suppressed = refusals since the \
                 last warning)"
            );
        });
        overloaded_response(&format!(
            "the server is at its connection limit ({open} open, server.max_connections is \
             {max}); retry later"
        ))
    }

    /// The metric families, for `/metrics`.
    pub fn render_metrics(&self) -> String {
        let c = &self.counters;
        let mut out = String::new();
        family(
            &mut out,
            "ferrocast_http_connections",
            "gauge",
            "Open TCP connections, every kind.",
        );
        let _ = writeln!(out, "ferrocast_http_connections {}", self.open());
        family(
            &mut out,
            "ferrocast_accept_errors_total",
            "counter",
            "Failed accepts (EMFILE and the like).",
        );
        let _ = writeln!(out, "ferrocast_accept_errors_total {}", c.accept_errors.load(Relaxed));
        family(
            &mut out,
            "ferrocast_http_overloaded_total",
            "counter",
            "Requests answered 503 overloaded, by reason.",
        );
        for (reason, n) in [
            ("max_connections", &c.overloaded_max_connections),
            ("fd_limit", &c.overloaded_fd_limit),
        ] {
            let _ = writeln!(
                out,
                "ferrocast_http_overloaded_total{{reason=\"{reason}\"}} {}",
                n.load(Relaxed)
            );
        }
        family(
            &mut out,
            "ferrocast_http_timeouts_total",
            "counter",
            "Connections closed for slowness: headers (or idle keep-alive) and bodies.",
        );
        for (phase, n) in [("header", &c.header_timeouts), ("body", &c.body_timeouts)] {
            let _ = writeln!(
                out,
                "ferrocast_http_timeouts_total{{phase=\"{phase}\"}} {}",
                n.load(Relaxed)
            );
        }
        family(
            &mut out,
            "ferrocast_http_payload_too_large_total",
            "counter",
            "Request bodies refused with 413.",
        );
        let _ = writeln!(
            out,
            "ferrocast_http_payload_too_large_total {}",
            c.payload_too_large.load(Relaxed)
        );
        family(
            &mut out,
            "ferrocast_data_too_deep_total",
            "counter",
            "Publishes refused because data nests deeper than server.max_data_depth.",
        );
        let _ = writeln!(out, "ferrocast_data_too_deep_total {}", c.data_too_deep.load(Relaxed));
        out
    }
}

/// Counters of the HTTP layer's refusals and timeouts.
#[derive(Debug, Default)]
pub struct HttpCounters {
    pub accept_errors: AtomicU64,
    pub overloaded_max_connections: AtomicU64,
    pub overloaded_fd_limit: AtomicU64,
    pub header_timeouts: AtomicU64,
    pub body_timeouts: AtomicU64,
    pub payload_too_large: AtomicU64,
    pub data_too_deep: AtomicU64,
}

fn overloaded_response(message: &str) -> Response<Body> {
    let mut resp = json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({ "error": "overloaded", "message": message, "retry_after_s": RETRY_AFTER_S }),
    );
    let headers = resp.headers_mut();
    headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// A rate-limited warning: at most one every [`WARN_EVERY`], reporting how many were skipped.
#[derive(Debug, Default)]
struct Warning {
    last: Option<Instant>,
    suppressed: u64,
}

impl Warning {
    fn warn(&mut self, log: impl FnOnce(u64)) {
        if self.last.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            self.suppressed += 1;
            return;
        }
        log(self.suppressed);
        self.last = Some(Instant::now());
        self.suppressed = 0;
    }
}

/// A TCP stream that holds its place in the connection count until it is dropped, wherever
/// it ends up (hyper's connection, or an upgraded WebSocket).
#[derive(Debug)]
pub struct CountedStream {
    stream: TcpStream,
    count: ConnCount,
}

impl CountedStream {
    pub fn new(stream: TcpStream, count: ConnCount) -> Self {
        CountedStream { stream, count }
    }

    /// The stream and its count, for a connection task that owns both from now on.
    pub fn into_parts(self) -> (TcpStream, ConnCount) {
        (self.stream, self.count)
    }
}

impl AsyncRead for CountedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accepts connections, surviving accept errors (see the module docs).
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    /// An open `/dev/null`, given up for a moment to accept one connection at the fd limit;
    /// the task answering that connection takes it back once the connection is closed.
    reserve: Arc<Mutex<Option<File>>>,
    backoff: Duration,
    warning: Warning,
}

impl Acceptor {
    pub fn new(listener: TcpListener) -> Self {
        Acceptor {
            listener,
            reserve: Arc::new(Mutex::new(open_reserve())),
            backoff: Duration::ZERO,
            warning: Warning::default(),
        }
    }

    /// The next connection to serve.
    pub async fn accept(&mut self, app: &Arc<AppState>) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => {
                    self.backoff = Duration::ZERO;
                    return accepted;
                }
                Err(e) => {
                    app.connections.counters.accept_errors.fetch_add(1, Relaxed);
                    let fd_limit = is_fd_limit(&e);
                    self.warning.warn(|suppressed| {
                        let hint = if fd_limit {
                            "; the process is out of file descriptors: raise its limit \
                             (LimitNOFILE, ulimit -n) or lower server.max_connections"
                        } else {
                            ""
                        };
                        tracing::warn!(
                            suppressed,
                            "accept failed: {e}{hint} (suppressed = failures since the last \
                             warning; see ferrocast_accept_errors_total)"
                        );
                    });
                    if fd_limit && self.shed_one(app).await {
                        self.backoff = Duration::ZERO;
                        continue;
                    }
                    self.backoff = (self.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                    tokio::time::sleep(self.backoff).await;
                }
            }
        }
    }

    /// At the fd limit: frees the reserve descriptor and accepts one pending connection in
    /// its place, to be answered by a task of its own (see [`answer_at_fd_limit`]), which
    /// takes the reserve back once that connection has closed. Returns whether a connection
    /// was taken.
    async fn shed_one(&mut self, app: &Arc<AppState>) -> bool {
        // Lost if an earlier attempt was cancelled, or taken by a connection that has closed
        // since but whose descriptor went elsewhere: get it back when a descriptor is free.
        reopen(&self.reserve);
        let Some(reserve) = self.reserve.lock().take() else { return false };
        drop(reserve);
        match tokio::time::timeout(Duration::from_millis(5), self.listener.accept()).await {
            Ok(Ok((stream, peer))) => {
                let reserve = self.reserve.clone();
                let app = app.clone();
                tokio::spawn(async move {
                    answer_at_fd_limit(&app, stream, peer).await;
                    reopen(&reserve);
                });
                true
            }
            _ => {
                reopen(&self.reserve);
                false
            }
        }
    }
}

fn open_reserve() -> Option<File> {
    File::open("/dev/null").ok()
}

/// Takes the reserve descriptor back, if it is not held already.
fn reopen(reserve: &Mutex<Option<File>>) {
    let mut reserve = reserve.lock();
    if reserve.is_none() {
        *reserve = open_reserve();
    }
}

fn is_fd_limit(e: &io::Error) -> bool {
    // EMFILE (the process's limit) and ENFILE (the system's).
    matches!(e.raw_os_error(), Some(24) | Some(23))
}

/// How long a connection taken at the fd limit has to send its request head.
const FD_LIMIT_REQUEST_WAIT: Duration = Duration::from_millis(250);

/// Answers one connection taken with the reserve descriptor: a health check (whose request
/// head arrives within [`FD_LIMIT_REQUEST_WAIT`]) gets its answer, anything else a 503.
/// Then the connection is closed, which frees the reserve.
async fn answer_at_fd_limit(app: &AppState, mut stream: TcpStream, peer: SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = Vec::with_capacity(1024);
    let read_head = async {
        let mut buf = [0u8; 2048];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(FD_LIMIT_REQUEST_WAIT, read_head).await;
    let path = request_path(&request);
    let (status, body) = match path {
        Some("/healthz") => (StatusCode::OK, json!({ "status": "ok" }).to_string()),
        Some("/readyz") => {
            let (status, body) = crate::api::readiness(app);
            (status, body.to_string())
        }
        _ => {
            app.connections.counters.overloaded_fd_limit.fetch_add(1, Relaxed);
            tracing::debug!(%peer, ?path, "answering 503: the process is out of file descriptors");
            let body = json!({
                "error": "overloaded",
                "message": "the server is out of file descriptors; retry later",
                "retry_after_s": RETRY_AFTER_S,
            });
            (StatusCode::SERVICE_UNAVAILABLE, body.to_string())
        }
    };
    let retry = if status == StatusCode::SERVICE_UNAVAILABLE {
        format!("Retry-After: {RETRY_AFTER_S}\r\n")
    } else {
        String::new()
    };
    let response = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{retry}\
         Connection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    let write = async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    };
    let _ = tokio::time::timeout(FD_LIMIT_REQUEST_WAIT, write).await;
}

/// The path of a request's first line (`GET /healthz HTTP/1.1`), without its query.
fn request_path(request: &[u8]) -> Option<&str> {
    let line = request.split(|&b| b == b'\r' || b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    let (_method, target) = (parts.next()?, parts.next()?);
    Some(target.split('?').next().unwrap_or(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_paths() {
        assert_eq!(request_path(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"), Some("/healthz"));
        assert_eq!(request_path(b"GET /readyz?full=1 HTTP/1.1\r\n"), Some("/readyz"));
        assert_eq!(request_path(b""), None);
        assert_eq!(request_path(b"GET"), None);
    }

    #[test]
    fn counts_follow_guards() {
        let c = Connections::default();
        let (a, n) = c.count();
        assert_eq!(n, 1);
        let (b, n) = c.count();
        assert_eq!(n, 2);
        assert!(c.over_client_limit(1));
        assert!(!c.over_client_limit(2));
        drop(a);
        assert_eq!(c.open(), 1);
        drop(b);
        assert_eq!(c.open(), 0);
        assert!(Connections::http_allowed(10 + HTTP_HEADROOM, 10));
        assert!(!Connections::http_allowed(11 + HTTP_HEADROOM, 10));
    }

    #[test]
    fn warnings_are_rate_limited_with_a_count() {
        let mut w = Warning::default();
        let mut logged = Vec::new();
        for _ in 0..5 {
            w.warn(|s| logged.push(s));
        }
        assert_eq!(logged, vec![0]);
        assert_eq!(w.suppressed, 4);
        w.last = Some(Instant::now() - WARN_EVERY);
        w.warn(|s| logged.push(s));
        assert_eq!(logged, vec![0, 4]);
    }
}
