//! Who may use the HTTP API: API keys with scopes, the loopback trust that stands in for a
//! key when none is configured, the cross-site and DNS-rebinding defences around that trust,
//! and CORS.
//!
//! [`check`] is the one decision every API endpoint asks:
//!
//! 1. A state-changing request (publish, the server API) carrying an `Origin` is refused
//!    when that origin is outside `server.allowed_origins`, or, with an empty list and no
//!    key configured, whatever it is: a web page must not ride on the operator's loopback
//!    trust (or cookies) to publish.
//! 2. With keys configured (`api.key`, `[[api.keys]]`), `Authorization: Bearer <key>` (the
//!    scheme in any case) must name a key with the scope; `admin` also grants `read`.
//! 3. With none, only this machine is trusted: the TCP peer and every address a proxy says
//!    it forwarded for (`X-Forwarded-For`, `Forwarded`, `X-Real-IP`, `True-Client-IP`,
//!    `CF-Connecting-IP`) must be loopback, and the `Host` a loopback name or one of
//!    `server.allowed_hosts`, so a DNS-rebound name cannot borrow the trust.
//!
//! Keys are compared in constant time whatever their lengths: both sides are first turned
//! into an HMAC-SHA256 tag under a random per-process key (ring's `hmac::verify` then
//! compares fixed-size tags), so neither the content nor the length of a key leaks through
//! timing.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use axum::middleware::Next;
use ferrocast_protocol::ErrorCode;
use rand::RngCore;
use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::auth::Refusal;
use crate::config::{ApiConfig, ConfigError};

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// `POST /api/publish`.
    Publish,
    /// `GET /api/channels`, history, `/api/stats`, `/api/nodes`.
    Read,
    /// `/api/diagnostics` and the server API (`/api/users/...`); also grants `read`.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Publish => "publish",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }

    fn granted_by(self, scopes: &[Scope]) -> bool {
        scopes.contains(&self) || (self == Scope::Read && scopes.contains(&Scope::Admin))
    }
}

/// One configured key, kept only as its tag.
struct Key {
    name: String,
    tag: hmac::Tag,
    scopes: Vec<Scope>,
}

/// The configured API keys.
pub struct ApiKeys {
    mac: hmac::Key,
    keys: Vec<Key>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.keys.iter().map(|k| k.name.as_str()).collect();
        f.debug_struct("ApiKeys").field("names", &names).finish_non_exhaustive()
    }
}

impl Default for ApiKeys {
    fn default() -> Self {
        ApiKeys::new(Vec::new())
    }
}

/// Every scope: what `api.key` grants.
pub const ALL_SCOPES: [Scope; 3] = [Scope::Publish, Scope::Read, Scope::Admin];

impl ApiKeys {
    /// Keys from `(name, key, scopes)`.
    pub fn new(keys: Vec<(String, String, Vec<Scope>)>) -> Self {
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        let mac = hmac::Key::new(hmac::HMAC_SHA256, &secret);
        let keys = keys
            .into_iter()
            .map(|(name, key, scopes)| Key { name, tag: hmac::sign(&mac, key.as_bytes()), scopes })
            .collect();
        ApiKeys { mac, keys }
    }

    /// The keys of `[api]`: `api.key` (or the variable `api.key_env` names) with every
    /// scope, then each `[[api.keys]]` entry. Errors name the key.
    pub fn from_config(api: &ApiConfig, env: &[(String, String)]) -> Result<Self, ConfigError> {
        let lookup = |var: &str| {
            env.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone()).filter(|v| !v.is_empty())
        };
        let mut keys = Vec::new();
        if !api.key.is_empty() {
            keys.push(("api.key".to_owned(), api.key.clone(), ALL_SCOPES.to_vec()));
        } else if !api.key_env.is_empty() {
            let key = lookup(&api.key_env).ok_or_else(|| ConfigError {
                key: "api.key_env".into(),
                reason: format!("names {:?}, which is not set", api.key_env),
            })?;
            keys.push(("api.key".to_owned(), key, ALL_SCOPES.to_vec()));
        }
        for (i, entry) in api.keys.iter().enumerate() {
            let key = if !entry.key.is_empty() {
                entry.key.clone()
            } else {
                lookup(&entry.key_env).ok_or_else(|| ConfigError {
                    key: format!("api.keys[{i}].key_env"),
                    reason: format!("names {:?}, which is not set", entry.key_env),
                })?
            };
            keys.push((entry.name.clone(), key, entry.scopes.clone()));
        }
        Ok(ApiKeys::new(keys))
    }

    /// Whether any key is configured (then keys, not loopback, decide).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The name and scopes of the key `given` is, compared in constant time with every key.
    fn find(&self, given: &str) -> Option<(&str, &[Scope])> {
        let mut found = None;
        for key in &self.keys {
            // Every key is compared, so the time does not say which one matched.
            if hmac::verify(&self.mac, given.as_bytes(), key.tag.as_ref()).is_ok() {
                found = found.or(Some((key.name.as_str(), key.scopes.as_slice())));
            }
        }
        found
    }
}

/// Constant-time equality of two secrets of any lengths (SSE control tokens use it too).
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    static KEY: std::sync::OnceLock<hmac::Key> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(|| {
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        hmac::Key::new(hmac::HMAC_SHA256, &secret)
    });
    hmac::verify(key, a, hmac::sign(key, b).as_ref()).is_ok()
}

/// Who an accepted API request came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A configured key, by name.
    Key(String),
    /// This machine, with no key configured.
    Loopback,
}

/// Whether a request may use an endpoint needing `scope`; `state_changing` endpoints also get
/// the cross-site check. Refusals are `unauthorized` (no or wrong key, not this machine) or
/// `forbidden` (a key without the scope, a cross-site or DNS-rebound request).
pub fn check(
    app: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    scope: Scope,
    state_changing: bool,
) -> Result<Caller, Refusal> {
    let keys = &app.api_keys;
    if state_changing && let Some(origin) = headers.get(header::ORIGIN) {
        let allowed = &app.config.server.allowed_origins;
        let origin_text = String::from_utf8_lossy(origin.as_bytes());
        if allowed.is_empty() && keys.is_empty() {
            return Err(Refusal::new(
                "cross_site",
                ErrorCode::Forbidden,
                format!(
                    "a request from a web page (Origin {origin_text:?}) may not use this machine's trust: \
                     no API key is configured and server.allowed_origins is empty"
                ),
            ));
        }
        if !allowed.is_empty() && !crate::ws::origin_allowed(allowed, Some(origin)) {
            return Err(Refusal::new(
                "cross_site",
                ErrorCode::Forbidden,
                format!("Origin {origin_text:?} is not in server.allowed_origins"),
            ));
        }
    }
    if keys.is_empty() {
        return loopback_trust(app, peer, headers).map(|()| Caller::Loopback);
    }
    let Some(given) = crate::auth::bearer(headers) else {
        return Err(Refusal::new(
            "api_key",
            ErrorCode::Unauthorized,
            format!(
                "this endpoint needs an API key with the {:?} scope: send \"Authorization: Bearer <api key>\"",
                scope.as_str()
            ),
        ));
    };
    match keys.find(&given) {
        None => Err(Refusal::new(
            "api_key",
            ErrorCode::Unauthorized,
            "the API key is not one of this server's keys (api.key, api.keys)",
        )),
        Some((name, scopes)) if !scope.granted_by(scopes) => Err(Refusal::new(
            "api_scope",
            ErrorCode::Forbidden,
            format!("the API key {name:?} lacks the {:?} scope", scope.as_str()),
        )),
        Some((name, _)) => Ok(Caller::Key(name.to_owned())),
    }
}

/// The trust given to this machine when no key is configured: see the module documentation.
pub fn loopback_trust(
    app: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<(), Refusal> {
    if let Some(addr) = remote_address(peer, headers) {
        return Err(Refusal::new(
            "not_loopback",
            ErrorCode::Unauthorized,
            format!(
                "no API key is configured, so only clients on this machine are trusted, and {addr} is \
                 not one (requests a proxy forwarded for another address count as that address); set api.key"
            ),
        ));
    }
    if !host_allowed(&app.config.server.allowed_hosts, headers) {
        let host = headers.get(header::HOST).map(|h| String::from_utf8_lossy(h.as_bytes()));
        return Err(Refusal::new(
            "host",
            ErrorCode::Forbidden,
            format!(
                "Host {:?} is neither a loopback name nor in server.allowed_hosts: this machine's trust \
                 is not lent to other names (DNS rebinding)",
                host.unwrap_or_default()
            ),
        ));
    }
    Ok(())
}

/// The first address, among the TCP peer and what proxies forwarded, that is not loopback.
fn remote_address(peer: SocketAddr, headers: &HeaderMap) -> Option<String> {
    std::iter::once(peer.ip().to_string())
        .chain(forwarded_clients(headers))
        .find(|addr| !parse_ip(addr).is_some_and(|ip| ip.is_loopback()))
}

/// Whether a request comes from this machine: the TCP peer is loopback and so is every
/// client a proxy says it forwarded for (a same-host proxy makes internet clients look
/// loopback).
pub fn is_loopback_request(peer: SocketAddr, headers: &HeaderMap) -> bool {
    remote_address(peer, headers).is_none()
}

/// Headers in which a proxy names the client it forwards for, one address each.
const SINGLE_ADDRESS_HEADERS: [&str; 3] = ["x-real-ip", "true-client-ip", "cf-connecting-ip"];

/// The client addresses proxies say they forwarded for: the rightmost entry of
/// `X-Forwarded-For` and of `Forwarded`, the ones the nearest proxy wrote (entries further
/// left come from the client and can be forged), and the value of each of `X-Real-IP`,
/// `True-Client-IP` and `CF-Connecting-IP`.
pub fn forwarded_clients(headers: &HeaderMap) -> Vec<String> {
    let joined = |name: &str| {
        let values: Vec<&str> =
            headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
        (!values.is_empty()).then(|| values.join(","))
    };
    let mut out = Vec::new();
    if let Some(xff) = joined("x-forwarded-for") {
        out.push(xff.rsplit(',').next().unwrap_or_default().trim().to_owned());
    }
    if let Some(fwd) = joined("forwarded") {
        let last = fwd.rsplit(',').next().unwrap_or_default();
        let node = last.split(';').find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            k.trim().eq_ignore_ascii_case("for").then(|| v.trim().trim_matches('"').to_owned())
        });
        out.push(node.unwrap_or_default());
    }
    for name in SINGLE_ADDRESS_HEADERS {
        for value in headers.get_all(name) {
            out.push(String::from_utf8_lossy(value.as_bytes()).trim().to_owned());
        }
    }
    out
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:5678`, `[2001:db8::1]:80`, `::1`.
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    s.strip_prefix('[').and_then(|r| r.split(']').next()).and_then(|ip| ip.parse().ok())
}

/// Whether the request's `Host` is a loopback name (`localhost`, `*.localhost`, a loopback
/// address) or one of `allowed` (compared without the port, case-insensitively). A request
/// without `Host` (HTTP/1.0 tools) has no name to rebind and passes.
pub fn host_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return true;
    };
    let name = strip_port(host).to_ascii_lowercase();
    let name = name.trim_end_matches('.');
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    if parse_ip(name).is_some_and(|ip| ip.is_loopback()) {
        return true;
    }
    allowed.iter().any(|a| strip_port(a).trim_end_matches('.').eq_ignore_ascii_case(name))
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// The status for a refusal of an HTTP request.
pub fn status_of(refusal: &Refusal) -> StatusCode {
    match refusal.code {
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        _ => StatusCode::UNAUTHORIZED,
    }
}

/// Counts, logs and answers a refused API request: `{"error":CODE,"message":...}`. The
/// request's body is not read, so the connection closes after the answer (a kept-alive
/// connection would otherwise carry the unread body into the next request).
pub fn refuse(app: &AppState, peer: SocketAddr, what: &str, refusal: Refusal) -> Response<Body> {
    app.auth.count_refusal(refusal.reason);
    if app.api_refusals.allow() {
        tracing::info!(%peer, reason = refusal.reason, "{what} refused: {}", refusal.message);
    }
    let mut response = crate::ws::json_response(
        status_of(&refusal),
        serde_json::json!({ "error": refusal.code.as_str(), "message": refusal.message }),
    );
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

// ------------------------------------------------------------------------------------------
// CORS

/// Request headers a cross-origin page may send: the ones the API and transports read.
const ALLOWED_HEADERS: &str =
    "authorization, content-type, last-event-id, x-ferrocast-stream-token";

/// Cross-origin access to every HTTP endpoint. An origin listed in `server.allowed_origins`
/// is echoed back with credentials allowed; with no list (or `"*"`) any page may read the
/// answers, but without credentials (`Access-Control-Allow-Origin: *`), so a browser never
/// sends a user's cookies to a page the operator did not name. Preflights are answered here,
/// allowing only the headers the API uses.
pub async fn cors(
    State(app): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response<Body> {
    let allowed = &app.config.server.allowed_origins;
    let open = allowed.is_empty() || allowed.iter().any(|a| a == "*");
    let origin = request.headers().get(header::ORIGIN).cloned();
    let grant = match &origin {
        None => None,
        Some(o)
            if allowed.iter().any(|a| {
                a != "*" && crate::ws::origin_allowed(std::slice::from_ref(a), Some(o))
            }) =>
        {
            Some(Grant::Named(o.clone()))
        }
        Some(_) if open => Some(Grant::Any),
        Some(_) => None,
    };
    if request.method() == Method::OPTIONS
        && request.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        let mut response = Response::builder()
            .status(if grant.is_some() { StatusCode::NO_CONTENT } else { StatusCode::FORBIDDEN })
            .body(Body::empty())
            .expect("static response");
        if let Some(grant) = grant {
            let h = response.headers_mut();
            grant.apply(h);
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, OPTIONS"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(ALLOWED_HEADERS),
            );
            h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        }
        return response;
    }
    let mut response = next.run(request).await;
    if let Some(grant) = grant {
        grant.apply(response.headers_mut());
    }
    response
}

enum Grant {
    /// A configured origin: echoed, with credentials.
    Named(HeaderValue),
    /// Any origin, without credentials.
    Any,
}

impl Grant {
    fn apply(self, h: &mut HeaderMap) {
        match self {
            Grant::Named(origin) => {
                h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
                h.insert(
                    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    HeaderValue::from_static("true"),
                );
            }
            Grant::Any => {
                h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
            }
        }
        h.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn keys_match_by_content_whatever_the_length() {
        let keys = ApiKeys::new(vec![
            ("pub".into(), "publisher-key".into(), vec![Scope::Publish]),
            ("ops".into(), "admin-key-0123456789".into(), vec![Scope::Admin]),
        ]);
        assert_eq!(keys.find("publisher-key").map(|k| k.0), Some("pub"));
        assert_eq!(keys.find("admin-key-0123456789").map(|k| k.0), Some("ops"));
        for wrong in ["", "publisher-ke", "publisher-key-", "x".repeat(10_000).as_str()] {
            assert!(keys.find(wrong).is_none(), "{wrong}");
        }
        assert!(Scope::Read.granted_by(&[Scope::Admin]));
        assert!(!Scope::Publish.granted_by(&[Scope::Admin, Scope::Read]));
        assert!(secrets_equal(b"abc", b"abc"));
        assert!(!secrets_equal(b"abc", b"abcd"));
    }

    #[test]
    fn every_forwarding_header_narrows_trust() {
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        assert!(is_loopback_request(peer, &headers(&[("x-forwarded-for", "1.2.3.4, 127.0.0.1")])));
        for name in ["x-forwarded-for", "x-real-ip", "true-client-ip", "cf-connecting-ip"] {
            let h = headers(&[(name, "203.0.113.7")]);
            assert!(!is_loopback_request(peer, &h), "{name}");
            let h = headers(&[(name, "::1")]);
            assert!(is_loopback_request(peer, &h), "{name}");
        }
        let h = headers(&[("forwarded", "for=127.0.0.1, for=\"[2001:db8::1]:4711\"")]);
        assert!(!is_loopback_request(peer, &h));
        assert!(!is_loopback_request("10.0.0.1:1".parse().unwrap(), &HeaderMap::new()));
        assert_eq!(parse_ip("10.0.0.1:80"), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(parse_ip("unknown"), None);
    }

    #[test]
    fn host_names_that_keep_loopback_trust() {
        let allowed = vec!["ferrocast.internal".to_string()];
        for host in [
            "localhost",
            "localhost:8080",
            "app.localhost",
            "127.0.0.1:8080",
            "127.9.9.9",
            "[::1]:8080",
            "FERROCAST.internal:80",
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
            assert!(host_allowed(&allowed, &h), "{host}");
        }
        for host in ["evil.example", "evil.example:8080", "localhost.evil.example", "10.0.0.1"] {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
            assert!(!host_allowed(&allowed, &h), "{host}");
        }
        assert!(host_allowed(&[], &HeaderMap::new()));
    }
}
