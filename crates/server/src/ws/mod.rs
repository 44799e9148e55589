//! The native WebSocket endpoint (`/ws` and its configured aliases): the HTTP upgrade, with
//! admission control, then one task per connection ([`conn`]) speaking RFC 6455 ([`frame`])
//! over its [`socket`].
//!
//! Two handshakes lead there: the HTTP/1.1 upgrade (`GET` with `Upgrade: websocket`, answered
//! 101), on plain TCP or TLS; and, on an HTTP/2 connection (TLS with ALPN `h2`), RFC 8441's
//! extended CONNECT (`:protocol = websocket`, answered 200), which runs the WebSocket on one
//! stream of the connection. The frames and the connection task are the same for both.
//! Either may negotiate permessage-deflate ([`deflate`]) when some namespace compresses.

pub mod conn;
pub mod deflate;
pub mod frame;
pub mod socket;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use base64::Engine;
use ferrocast_protocol::CloseCode;
use hyper_util::rt::TokioIo;
use sha1::{Digest, Sha1};

use crate::AppState;
use crate::connections::CountedStream;
use crate::limits::IpSlot;
use conn::Admission;
use socket::Socket;

const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Handles a request on a WebSocket path: a 426 that explains itself when it is not an
/// upgrade, otherwise the 101 and a connection task.
pub async fn upgrade(
    State(app): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    mut req: Request<Body>,
) -> Response<Body> {
    let headers = req.headers();
    // RFC 8441: a WebSocket on a stream of an HTTP/2 connection.
    let extended_connect = req.method() == Method::CONNECT;
    let key = if extended_connect {
        if let Some(problem) = extended_connect_problem(&req) {
            app.metrics.upgrade_rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(%peer, path = req.uri().path(), "bad websocket handshake: {problem}");
            return json_response(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error":"bad_request","message":problem}),
            );
        }
        None
    } else {
        if let Some(problem) = upgrade_problem(headers) {
            app.metrics.upgrade_rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(%peer, path = req.uri().path(), "not a websocket upgrade: {problem}");
            return upgrade_required(req.uri().path(), &problem);
        }
        let key = headers.get(header::SEC_WEBSOCKET_KEY).cloned();
        match key_problem(key.as_ref()) {
            None => key,
            Some(problem) => {
                app.metrics.upgrade_rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(%peer, path = req.uri().path(), "bad websocket handshake: {problem}");
                return json_response(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error":"bad_request","message":problem}),
                );
            }
        }
    };
    let (admission, ip_slot) = match admit(&app, peer, headers) {
        Ok(slot) => (Admission::Accept, Some(slot)),
        Err(refused) => (refused, None),
    };
    if let Some(tls) = app.tls.get() {
        tls.count_websocket(extended_connect);
    }
    // Boxed: the connection task holds it until the connect step, and the task's future is
    // kept for the connection's whole life.
    let credentials =
        Box::new(crate::session::Credentials::from_request(&app, headers, req.uri().query(), peer));
    // Offered by the client, and useful: some namespace compresses its messages.
    let deflate = app.config.compresses() && deflate::negotiate(headers);
    if deflate {
        app.metrics.deflate.connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let guard = app.shutdown.track();
    let on_upgrade = hyper::upgrade::on(&mut req);
    let task_app = app.clone();
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(%peer, "upgrade did not complete: {e}");
                return;
            }
        };
        // The address keeps its place in the per-address count until the session ends.
        let mut start = conn::Start {
            admission,
            credentials,
            deflate,
            peer: peer.to_string(),
            ip_slot,
            counted: None,
        };
        // The connection is served by a task of its own, so the state of this one (the
        // upgrade, and what it was handed) is not kept for the connection's life.
        let serve = match upgraded.downcast::<TokioIo<CountedStream>>() {
            Ok(parts) => {
                // The connection keeps its place in the total until the socket closes.
                let (stream, counted) = parts.io.into_inner().into_parts();
                start.counted = Some(counted);
                conn::run(task_app, Socket::Plain(stream), parts.read_buf, start, guard)
            }
            // TLS, or a stream of an HTTP/2 connection: polled through a small buffer.
            Err(upgraded) => {
                let socket = Socket::stream(TokioIo::new(upgraded));
                conn::run(task_app, socket, bytes::Bytes::new(), start, guard)
            }
        };
        tokio::spawn(serve);
    });
    let mut response = match key {
        Some(key) => switching_protocols(key.as_bytes()),
        None => Response::new(Body::empty()),
    };
    if deflate {
        response.headers_mut().insert(header::SEC_WEBSOCKET_EXTENSIONS, deflate::response_header());
    }
    response
}

/// What is wrong with an RFC 8441 extended CONNECT, if anything.
fn extended_connect_problem(req: &Request<Body>) -> Option<String> {
    let protocol = req.extensions().get::<hyper::ext::Protocol>().map(|p| p.as_str());
    if protocol != Some("websocket") {
        return Some(format!(
            "a CONNECT here must be an RFC 8441 extended CONNECT with :protocol = websocket, \
             not {protocol:?}"
        ));
    }
    match req.headers().get(header::SEC_WEBSOCKET_VERSION).and_then(|v| v.to_str().ok()) {
        Some("13") => None,
        other => Some(format!(
            "unsupported Sec-WebSocket-Version {other:?}; this server speaks version 13"
        )),
    }
}

/// The `101 Switching Protocols` answer to a WebSocket upgrade with client key `key`.
pub(crate) fn switching_protocols(key: &[u8]) -> Response<Body> {
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept_key(key))
        .body(Body::empty())
        .expect("static response")
}

/// Decides, before the handshake completes, whether the connection will be served. Refused
/// connections still complete the handshake so the client sees a close code it can act on
/// (browsers hide HTTP statuses of failed upgrades).
fn admit(
    app: &AppState,
    peer: std::net::SocketAddr,
    headers: &HeaderMap,
) -> Result<IpSlot, Admission> {
    if app.shutdown.is_draining() {
        return Err(Admission::Refuse(CloseCode::GoingAway));
    }
    if !origin_allowed(&app.config.server.allowed_origins, headers.get(header::ORIGIN)) {
        return Err(Admission::Refuse(CloseCode::PolicyViolation));
    }
    // Every TCP connection counts, this one included.
    if app.connections.over_client_limit(app.config.server.max_connections) {
        return Err(Admission::Refuse(CloseCode::TryAgainLater));
    }
    crate::session::admit_address(app, peer, headers).map_err(Admission::Limited)
}

/// Whether the request's Origin is in the allowlist (an empty list or `*` allows any;
/// requests without an Origin, from non-browser clients, are allowed).
pub fn origin_allowed(allowed: &[String], origin: Option<&HeaderValue>) -> bool {
    if allowed.is_empty() || allowed.iter().any(|a| a == "*") {
        return true;
    }
    let Some(origin) = origin.and_then(|o| o.to_str().ok()) else { return true };
    allowed.iter().any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin))
}

/// What is wrong with a request that should have been a WebSocket upgrade, if anything.
pub(crate) fn upgrade_problem(headers: &HeaderMap) -> Option<String> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has_token(header::UPGRADE, "websocket") {
        return Some("the request has no \"Upgrade: websocket\" header".into());
    }
    if !has_token(header::CONNECTION, "upgrade") {
        return Some("the request has no \"Connection: Upgrade\" header".into());
    }
    match headers.get(header::SEC_WEBSOCKET_VERSION).and_then(|v| v.to_str().ok()) {
        Some("13") => None,
        other => Some(format!(
            "unsupported Sec-WebSocket-Version {other:?}; this server speaks version 13"
        )),
    }
}

/// What is wrong with a `Sec-WebSocket-Key`, if anything: RFC 6455 requires the base64
/// encoding of 16 bytes.
pub(crate) fn key_problem(key: Option<&HeaderValue>) -> Option<String> {
    let Some(key) = key else { return Some("missing Sec-WebSocket-Key header".into()) };
    match base64::engine::general_purpose::STANDARD.decode(key.as_bytes()) {
        Ok(nonce) if nonce.len() == 16 => None,
        Ok(nonce) => Some(format!(
            "Sec-WebSocket-Key must be the base64 encoding of 16 bytes; {:?} decodes to {} bytes",
            String::from_utf8_lossy(key.as_bytes()),
            nonce.len()
        )),
        Err(_) => Some(format!(
            "Sec-WebSocket-Key must be the base64 encoding of 16 bytes; {:?} is not base64",
            String::from_utf8_lossy(key.as_bytes())
        )),
    }
}

fn upgrade_required(path: &str, problem: &str) -> Response<Body> {
    let body = serde_json::json!({
        "error": "upgrade_required",
        "message": format!(
            "{path} is ferrocast's native WebSocket endpoint and needs a WebSocket upgrade: {problem}. \
             A browser or WebSocket client does this by itself; if one reached here through a proxy, \
             the proxy is not forwarding the Upgrade and Connection headers \
             (nginx: proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; \
             proxy_set_header Connection \"upgrade\"). Clients that cannot use WebSocket can use \
             /sse (Server-Sent Events) or /socket.io/."
        ),
        "websocket": path,
        "fallbacks": ["/sse", "/socket.io/"],
    });
    let mut resp = json_response(StatusCode::UPGRADE_REQUIRED, body);
    resp.headers_mut().insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    resp.headers_mut().insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
    resp
}

pub(crate) fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("static response")
}

/// `Sec-WebSocket-Accept` for a client key.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_6455_example() {
        assert_eq!(accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn key_must_be_base64_of_16_bytes() {
        let check = |k: &'static str| key_problem(Some(&HeaderValue::from_static(k)));
        assert_eq!(check("dGhlIHNhbXBsZSBub25jZQ=="), None);
        let problem = check("abc").expect("not base64 of 16 bytes");
        assert!(problem.contains("\"abc\""), "{problem}");
        // 15 and 17 bytes are well-formed base64 but the wrong size.
        assert!(check("AAAAAAAAAAAAAAAAAAAA").unwrap().contains("15 bytes"));
        assert!(check("AAAAAAAAAAAAAAAAAAAAAAA=").unwrap().contains("17 bytes"));
        assert!(check("dGhlIHNhbXBsZSBub25jZQ").is_some(), "padding is required");
        assert!(key_problem(None).unwrap().contains("missing"));
    }

    #[test]
    fn origin_allowlist() {
        let allowed = vec!["https://app.example.com".to_string()];
        let ok = HeaderValue::from_static("https://app.example.com");
        let bad = HeaderValue::from_static("https://evil.example.com");
        assert!(origin_allowed(&allowed, Some(&ok)));
        assert!(!origin_allowed(&allowed, Some(&bad)));
        assert!(origin_allowed(&allowed, None));
        assert!(origin_allowed(&[], Some(&bad)));
    }
}
