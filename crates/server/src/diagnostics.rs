//! `GET /api/diagnostics`: what this server actually received, after every proxy hop, so
//! `ferrocast doctor` can compare it with what it sent.
//!
//! A plain request is answered with a JSON report: the client address and the addresses
//! proxies forwarded, the HTTP version and every request header as it arrived (values of
//! credentials redacted), whether the request was a usable WebSocket upgrade, and the
//! settings a client needs to judge the path (WebSocket paths, heartbeat, frame limit).
//!
//! A WebSocket upgrade to the same path gets the same report as its first text frame. The
//! connection then stays completely silent, with no heartbeat, for `?hold_ms=N` (at most
//! [`MAX_HOLD`]) and closes with 1000: the doctor uses it to find how long an intermediary
//! lets an idle connection live. Text frames sent on it are echoed, which measures the largest
//! message that passes in both directions.
//!
//! Access is decided by `diagnostics.allow` (see [`DiagnosticsAccess`]); the default answers
//! only loopback and private-network clients, or any client presenting the API key.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, Request, Response, StatusCode, header};
use ferrocast_protocol::CloseCode;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::AppState;
use crate::config::DiagnosticsAccess;
use crate::ws::frame::{self, Decoder, Incoming};
use crate::ws::{json_response, switching_protocols, upgrade_problem};

/// Longest a diagnostic WebSocket is held open, whatever the client asks.
pub const MAX_HOLD: Duration = Duration::from_secs(30 * 60);
/// Most diagnostic WebSockets open at once; more are answered 503, so the endpoint cannot be
/// used to pile up idle connections.
const MAX_OPEN: usize = 32;
/// How long to wait for the client's close frame after sending ours.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Diagnostic WebSockets open right now (all servers in the process share the budget).
static OPEN: AtomicUsize = AtomicUsize::new(0);

/// Header names whose values are never echoed back: credentials and anything named like one.
const SECRET_MARKERS: &[&str] =
    &["authorization", "cookie", "token", "secret", "password", "api-key", "apikey", "session"];

#[derive(Debug, Deserialize)]
pub struct DiagnosticsQuery {
    /// For a WebSocket: how long to keep the connection open and silent, in milliseconds.
    #[serde(default)]
    hold_ms: u64,
}

/// `GET /api/diagnostics` (plain or WebSocket upgrade).
pub async fn handle(
    State(app): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<DiagnosticsQuery>,
    mut req: Request<Body>,
) -> Response<Body> {
    if app.config.diagnostics.allow == DiagnosticsAccess::Off {
        return json_response(
            StatusCode::NOT_FOUND,
            json!({"error": "not_found", "message": "diagnostics are turned off (diagnostics.allow = \"off\")"}),
        );
    }
    if let Err(refusal) = check_access(&app, peer, req.headers()) {
        return crate::access::refuse(&app, peer, "diagnostics", refusal);
    }
    let problem = upgrade_problem(req.headers());
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let (Some(key), None) = (key, &problem) else {
        return json_response(StatusCode::OK, report(&app, peer, &req, problem.as_deref()));
    };
    if let Some(bad_key) = crate::ws::key_problem(Some(&key)) {
        app.metrics.upgrade_rejected.fetch_add(1, Ordering::Relaxed);
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "bad_request", "message": bad_key}),
        );
    }
    if OPEN.fetch_add(1, Ordering::AcqRel) >= MAX_OPEN {
        OPEN.fetch_sub(1, Ordering::AcqRel);
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "busy", "message": format!("{MAX_OPEN} diagnostic connections are open already")}),
        );
    }
    let mut report = report(&app, peer, &req, None);
    report["transport"] = json!("websocket");
    let hold = Duration::from_millis(query.hold_ms).min(MAX_HOLD);
    let guard = app.shutdown.track();
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let io = TokioIo::new(upgraded);
                if let Err(e) = hold_silent(&app, io, &report.to_string(), hold).await {
                    tracing::debug!(%peer, "diagnostic websocket ended: {e}");
                }
            }
            Err(e) => tracing::debug!(%peer, "diagnostic upgrade did not complete: {e}"),
        }
        drop(guard);
        OPEN.fetch_sub(1, Ordering::AcqRel);
    });
    switching_protocols(key.as_bytes())
}

/// Whether this request may read diagnostics, or why not. With API keys configured, a key
/// with the `admin` scope is needed (`allow = "local"` or `"key"`); under `allow = "local"`
/// without keys, loopback and private-network clients may. The `Host` is not checked here:
/// the doctor reaches the endpoint through proxies under the site's public name, and the
/// report holds no secret.
fn check_access(
    app: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<(), crate::auth::Refusal> {
    use crate::access::{self, Scope};
    use crate::auth::Refusal;
    use ferrocast_protocol::ErrorCode;
    let allow = app.config.diagnostics.allow;
    if allow == DiagnosticsAccess::All {
        return Ok(());
    }
    if !app.api_keys.is_empty() || allow != DiagnosticsAccess::Local {
        if app.api_keys.is_empty() {
            return Err(Refusal::new(
                "api_key",
                ErrorCode::Forbidden,
                "diagnostics.allow = \"key\" and no API key is configured (api.key, api.keys)",
            ));
        }
        return access::check(app, peer, headers, Scope::Admin, false).map(|_| ());
    }
    let remote = std::iter::once(peer.ip().to_string())
        .chain(access::forwarded_clients(headers))
        .find(|addr| !access::parse_ip(addr).is_some_and(is_local));
    match remote {
        None => Ok(()),
        Some(addr) => Err(Refusal::new(
            "not_local",
            ErrorCode::Forbidden,
            format!(
                "diagnostics answer loopback and private-network clients only, and {addr} is \
                 neither (diagnostics.allow = \"local\"): configure an API key with the admin scope \
                 and send it (ferrocast doctor --api-key), or set diagnostics.allow = \"all\" while you debug"
            ),
        )),
    }
}

/// Loopback, private (RFC 1918, RFC 6598 shared, IPv6 unique-local) or link-local.
pub fn is_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_local(IpAddr::V4(v4)),
            None => {
                let first = v6.segments()[0];
                v6.is_loopback() || (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80
            }
        },
    }
}

/// The report: what arrived, from whom, and the settings a client needs to judge the path.
fn report(
    app: &AppState,
    peer: SocketAddr,
    req: &Request<Body>,
    upgrade_problem: Option<&str>,
) -> Value {
    let headers: Vec<Value> = req
        .headers()
        .iter()
        .map(|(name, value)| {
            let shown = if SECRET_MARKERS.iter().any(|m| name.as_str().contains(m)) {
                format!("<redacted: {} bytes>", value.len())
            } else {
                String::from_utf8_lossy(value.as_bytes()).into_owned()
            };
            json!([name.as_str(), shown])
        })
        .collect();
    let s = &app.config.server;
    let publishable: Vec<&str> = app
        .config
        .namespaces
        .iter()
        .filter(|(_, ns)| ns.publish_rule() != ferrocast_hub::PublishRule::None)
        .map(|(name, _)| name.as_str())
        .collect();
    json!({
        "server": "ferrocast",
        "version": env!("CARGO_PKG_VERSION"),
        "transport": "http",
        "peer": peer.to_string(),
        "forwarded_for": crate::access::forwarded_clients(req.headers()),
        "request": {
            "method": req.method().as_str(),
            "path": req.uri().path(),
            "query": req.uri().query(),
            "http_version": format!("{:?}", req.version()),
            "headers": headers,
        },
        "websocket_upgrade": {
            "usable": upgrade_problem.is_none() && req.headers().contains_key(header::SEC_WEBSOCKET_KEY),
            "problem": upgrade_problem,
        },
        "settings": {
            "ws_paths": s.ws_paths,
            "ping_interval_ms": s.ping_interval_ms,
            "pong_timeout_ms": s.pong_timeout_ms,
            "max_frame_bytes": s.max_frame_bytes,
            "client_publish_namespaces": publishable,
            "client_publish_default": app.config.namespace_defaults.publish_rule()
                != ferrocast_hub::PublishRule::None,
            "socketio": { "enabled": app.config.socketio.enabled, "path": app.config.socketio.path },
            "max_hold_ms": MAX_HOLD.as_millis() as u64,
        },
    })
}

/// Sends the report, then keeps the connection silent for `hold`: no heartbeat, only echoes
/// of the client's text frames and answers to its pings. Closes with 1000 when the hold is
/// over, 1001 when the server drains.
async fn hold_silent<S>(
    app: &AppState,
    mut io: S,
    report: &str,
    hold: Duration,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    write_frame(&mut io, frame::OP_TEXT, report.as_bytes()).await?;
    let deadline = tokio::time::sleep(hold);
    tokio::pin!(deadline);
    let draining = app.shutdown.draining();
    tokio::pin!(draining);
    let mut decoder = Decoder::new(app.config.server.max_frame_bytes);
    let mut buf = vec![0u8; 8192];
    let mut incoming = Vec::new();
    let (code, reason) = loop {
        tokio::select! {
            _ = &mut deadline => break (CloseCode::Normal.code(), "hold over"),
            _ = &mut draining => break (CloseCode::GoingAway.code(), "server draining"),
            n = io.read(&mut buf) => {
                let n = n?;
                if n == 0 {
                    return Ok(());
                }
                let result = decoder.feed(&buf[..n], &mut incoming);
                for frame in incoming.drain(..) {
                    match frame {
                        Incoming::Text(text) => write_frame(&mut io, frame::OP_TEXT, text.as_bytes()).await?,
                        Incoming::Ping(payload) => io.write_all(&frame::control_frame(frame::OP_PONG, &payload)).await?,
                        Incoming::Pong => {}
                        Incoming::Close(code) => {
                            io.write_all(&frame::close_frame(code.unwrap_or(1000), "")).await?;
                            return io.shutdown().await;
                        }
                    }
                }
                if let Err(violation) = result {
                    break (violation.code.code(), violation.code.reason());
                }
            }
        }
    };
    io.write_all(&frame::close_frame(code, reason)).await?;
    // Give the client a moment to answer with its close frame, then drop the connection.
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        while matches!(io.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    Ok(())
}

async fn write_frame<S: AsyncWrite + Unpin>(
    io: &mut S,
    opcode: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut header = [0u8; 10];
    let len = frame::encode_header(opcode, payload.len(), &mut header);
    io.write_all(&header[..len]).await?;
    io.write_all(payload).await?;
    io.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_addresses() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_local(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "172.32.0.1", "100.128.0.1", "2001:db8::1", "::ffff:8.8.8.8"] {
            assert!(!is_local(ip.parse().unwrap()), "{ip}");
        }
    }
}
