//! The application's own login: connect, subscribe and publish decided by HTTP calls to the
//! application (`[proxy]`), so an app with a session cookie or an OAuth header keeps it.
//!
//! ferrocast POSTs a JSON object to the configured URL:
//!
//! ```json
//! {"transport":"websocket","client":"203.0.113.7","headers":{"Cookie":"session=..."},
//!  "token":"...","user":"42","session":"k2...","channel":"payments.eu","data":{...}}
//! ```
//!
//! (`headers` holds the request headers named by `proxy.forward_headers`, taken from the
//! connection's opening request, which are also sent as headers of the call itself, so the
//! application's own session middleware (a Flask session cookie, an OAuth header) reads them
//! as usual; `token` whatever token the client presented, unverified;
//! `user`, `info` and `session` once known; `channel` for subscribe and publish; `data` for
//! publish.) The application answers `{"result":{...}}` (connect: `user`, `info`,
//! `channels`, `expire_at`; publish: optionally `data`, which replaces the data published),
//! `{"error":{"code":...,"message":...}}` or `{"disconnect":{"code":4003,"reason":...}}`.
//! HTTP 401 and 403 answers count as `unauthorized` and `forbidden`; a timeout
//! (`proxy.timeout_ms`), a 5xx or any other answer is `unavailable`, never a hang. Every call
//! is counted by kind and result.
//!
//! Connections to the application are kept alive and reused (a few per origin), so a
//! reconnect wave costs requests, not TCP handshakes.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::Bytes;
use ferrocast_protocol::ErrorCode;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::auth::Refusal;
use crate::config::ConfigError;

/// Largest answer read from the application, in bytes.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;
/// Idle connections kept per origin.
const IDLE_PER_ORIGIN: usize = 32;
/// Longest message or reason taken from the application's answer.
const MAX_MESSAGE_CHARS: usize = 200;
/// Headers of the call that forwarding never replaces: they describe the call itself.
const OWN_HEADERS: &[&str] = &[
    "host",
    "content-type",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "accept",
];

/// The `[proxy]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Asked at every new connection who it is (empty: tokens decide).
    pub connect_url: String,
    /// Asked at every subscribe to a namespace with `subscribe = "proxy"`.
    pub subscribe_url: String,
    /// Asked at every client publish to a namespace with `publish = "proxy"`.
    pub publish_url: String,
    /// Longest wait for an answer, in milliseconds; past it the request is `unavailable`.
    pub timeout_ms: u64,
    /// Request headers of the connection passed on to the application.
    pub forward_headers: Vec<String>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect_url: String::new(),
            subscribe_url: String::new(),
            publish_url: String::new(),
            timeout_ms: 1_000,
            forward_headers: vec![
                "Cookie".into(),
                "Authorization".into(),
                "X-Forwarded-For".into(),
            ],
        }
    }
}

impl ProxyConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, url) in [
            ("proxy.connect_url", &self.connect_url),
            ("proxy.subscribe_url", &self.subscribe_url),
            ("proxy.publish_url", &self.publish_url),
        ] {
            if url.is_empty() {
                continue;
            }
            let ok = url::Url::parse(url)
                .is_ok_and(|u| ["http", "https"].contains(&u.scheme()) && u.host_str().is_some());
            if !ok {
                return Err(ConfigError {
                    key: key.into(),
                    reason: format!("{url:?} is not an http:// or https:// URL"),
                });
            }
        }
        if !(10..=60_000).contains(&self.timeout_ms) {
            return Err(ConfigError {
                key: "proxy.timeout_ms".into(),
                reason: format!("{} is outside 10..=60000", self.timeout_ms),
            });
        }
        for (i, name) in self.forward_headers.iter().enumerate() {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(ConfigError {
                    key: format!("proxy.forward_headers[{i}]"),
                    reason: format!("{name:?} is not a header name"),
                });
            }
        }
        Ok(())
    }
}

/// Which call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Connect,
    Subscribe,
    Publish,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Connect => "connect",
            Kind::Subscribe => "subscribe",
            Kind::Publish => "publish",
        }
    }
}

/// What the application is told (see the module documentation).
#[derive(Debug, Default, Serialize)]
pub struct Request<'a> {
    pub transport: &'static str,
    pub client: &'a str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<&'a serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a RawValue>,
}

/// What the application granted (`result`).
#[derive(Debug, Default, Deserialize)]
pub struct Granted {
    /// Connect: the user (empty or absent: anonymous).
    #[serde(default)]
    pub user: Option<String>,
    /// Connect: attached to the connection.
    #[serde(default)]
    pub info: Option<serde_json::Value>,
    /// Connect: channels the server subscribes the connection to.
    #[serde(default)]
    pub channels: Vec<String>,
    /// Connect: when the connection's grant runs out (seconds since the epoch).
    #[serde(default)]
    pub expire_at: Option<u64>,
    /// Publish: the data to publish instead of the client's.
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
}

/// Why the application (or the call) said no.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// An error for the client (`unauthorized`, `forbidden`, `token_expired`, or
    /// `unavailable` when the application could not answer).
    Refused(Refusal),
    /// Close the connection with this code and reason.
    Disconnect { code: u16, reason: String },
}

#[derive(Deserialize)]
struct Answer {
    result: Option<Granted>,
    error: Option<AppError>,
    disconnect: Option<AppDisconnect>,
}

#[derive(Deserialize)]
struct AppError {
    #[serde(default)]
    code: serde_json::Value,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
struct AppDisconnect {
    code: u16,
    #[serde(default)]
    reason: Option<String>,
}

/// The proxy client: configuration, kept-alive connections and counters.
pub struct Proxy {
    config: ProxyConfig,
    idle: Mutex<HashMap<String, Vec<SendRequest<Full<Bytes>>>>>,
    counts: Mutex<BTreeMap<(Kind, &'static str), u64>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Proxy {
    pub fn new(config: ProxyConfig) -> Self {
        Proxy { config, idle: Mutex::new(HashMap::new()), counts: Mutex::new(BTreeMap::new()) }
    }

    fn url(&self, kind: Kind) -> &str {
        match kind {
            Kind::Connect => &self.config.connect_url,
            Kind::Subscribe => &self.config.subscribe_url,
            Kind::Publish => &self.config.publish_url,
        }
    }

    /// Whether this call is configured.
    pub fn enabled(&self, kind: Kind) -> bool {
        !self.url(kind).is_empty()
    }

    /// Whether any call is configured (then connections keep their forwarded headers).
    pub fn any(&self) -> bool {
        [Kind::Connect, Kind::Subscribe, Kind::Publish].iter().any(|k| self.enabled(*k))
    }

    /// The headers of `headers` named by `proxy.forward_headers`, under their configured
    /// names; several values of one header are joined (`; ` for cookies, `, ` otherwise).
    pub fn forwarded(&self, headers: &http::HeaderMap) -> Vec<(String, String)> {
        if !self.any() {
            return Vec::new();
        }
        self.config
            .forward_headers
            .iter()
            .filter_map(|name| {
                let values: Vec<String> = headers
                    .get_all(name.as_str())
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect();
                let sep = if name.eq_ignore_ascii_case("cookie") { "; " } else { ", " };
                (!values.is_empty()).then(|| (name.clone(), values.join(sep)))
            })
            .collect()
    }

    /// Asks the application; see the module documentation.
    pub async fn call(&self, kind: Kind, request: &Request<'_>) -> Result<Granted, Denied> {
        let timeout = Duration::from_millis(self.config.timeout_ms);
        let outcome = match tokio::time::timeout(timeout, self.exchange(kind, request)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(unavailable(format!(
                "the {} proxy did not answer within {} ms (proxy.timeout_ms)",
                kind.as_str(),
                timeout.as_millis()
            ))),
        };
        let label = match &outcome {
            Ok(_) => "ok",
            Err(Denied::Disconnect { .. }) => "disconnect",
            Err(Denied::Refused(r)) if r.code == ErrorCode::Unavailable => "unavailable",
            Err(Denied::Refused(_)) => "error",
        };
        *self.counts.lock().entry((kind, label)).or_default() += 1;
        if label == "unavailable"
            && let Err(Denied::Refused(r)) = &outcome
        {
            tracing::warn!(kind = kind.as_str(), "auth proxy unavailable: {}", r.message);
        }
        outcome
    }

    async fn exchange(&self, kind: Kind, request: &Request<'_>) -> Result<Granted, Denied> {
        let url =
            url::Url::parse(self.url(kind)).map_err(|e| unavailable(format!("proxy URL: {e}")))?;
        let origin = format!(
            "{}://{}:{}",
            url.scheme(),
            url.host_str().unwrap_or_default(),
            url.port_or_known_default().unwrap_or(0)
        );
        let body = Bytes::from(serde_json::to_vec(request).unwrap_or_default());
        let what = kind.as_str();
        let (response, sender) = loop {
            let pooled = self.take_idle(&origin);
            let reused = pooled.is_some();
            let mut sender = match pooled {
                Some(sender) => sender,
                None => ferrocast_feeds::http::open(&url)
                    .await
                    .map_err(|e| unavailable(format!("the {what} proxy cannot be reached: {e}")))?,
            };
            let target = match url.query() {
                Some(q) => format!("{}?{q}", url.path()),
                None => url.path().to_owned(),
            };
            let host = match url.port() {
                Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
                None => url.host_str().unwrap_or_default().to_owned(),
            };
            let mut req = http::Request::post(target)
                .header(http::header::HOST, host)
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(http::header::ACCEPT, "application/json")
                .header(http::header::USER_AGENT, concat!("ferrocast/", env!("CARGO_PKG_VERSION")))
                .body(Full::new(body.clone()))
                .map_err(|e| unavailable(format!("building the {what} proxy request: {e}")))?;
            for (name, value) in &request.headers {
                if OWN_HEADERS.iter().any(|own| name.eq_ignore_ascii_case(own)) {
                    continue;
                }
                if let (Ok(name), Ok(value)) = (
                    http::HeaderName::from_bytes(name.as_bytes()),
                    http::HeaderValue::from_str(value),
                ) {
                    req.headers_mut().insert(name, value);
                }
            }
            match sender.send_request(req).await {
                Ok(response) => break (response, sender),
                // A kept-alive connection the application closed meanwhile: once more on a
                // fresh one.
                Err(_) if reused => continue,
                Err(e) => {
                    return Err(unavailable(format!("the {what} proxy request failed: {e}")));
                }
            }
        };
        let status = response.status().as_u16();
        let body = ferrocast_feeds::http::read_body(response, MAX_ANSWER_BYTES)
            .await
            .map_err(|e| unavailable(format!("the {what} proxy's answer: {e}")))?;
        self.put_idle(origin, sender);
        match status {
            200..=299 => {}
            401 => return Err(refused(kind, ErrorCode::Unauthorized, None)),
            403 => return Err(refused(kind, ErrorCode::Forbidden, None)),
            _ => return Err(unavailable(format!("the {what} proxy answered HTTP {status}"))),
        }
        let answer: Answer = serde_json::from_slice(&body).map_err(|e| {
            unavailable(format!(
                "the {what} proxy's answer is not {{\"result\"|\"error\"|\"disconnect\":...}}: {e}"
            ))
        })?;
        if let Some(d) = answer.disconnect {
            let code =
                if d.code == 1000 || (3000..=4999).contains(&d.code) { d.code } else { 4003 };
            let reason = d.reason.map_or_else(|| format!("disconnected by the {what} proxy"), clip);
            return Err(Denied::Disconnect { code, reason });
        }
        if let Some(e) = answer.error {
            let code = match (&e.code, e.code.as_u64()) {
                (serde_json::Value::String(s), _) if s == "unauthorized" => ErrorCode::Unauthorized,
                (serde_json::Value::String(s), _) if s == "token_expired" => {
                    ErrorCode::TokenExpired
                }
                (_, Some(401)) => ErrorCode::Unauthorized,
                _ => ErrorCode::Forbidden,
            };
            return Err(refused(kind, code, e.message));
        }
        answer.result.ok_or_else(|| {
            unavailable(format!(
                "the {what} proxy's answer has none of \"result\", \"error\", \"disconnect\""
            ))
        })
    }

    fn take_idle(&self, origin: &str) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock();
        let list = idle.get_mut(origin)?;
        while let Some(sender) = list.pop() {
            if sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    fn put_idle(&self, origin: String, sender: SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock();
        let list = idle.entry(origin).or_default();
        if list.len() < IDLE_PER_ORIGIN {
            list.push(sender);
        }
    }

    /// The `ferrocast_proxy_requests_total` family.
    pub fn render_metrics(&self) -> String {
        let mut out = String::new();
        if !self.any() {
            return out;
        }
        crate::metrics::family(
            &mut out,
            "ferrocast_proxy_requests_total",
            "counter",
            "Calls to the auth proxy (proxy.*_url), by kind and result (ok, error, disconnect, unavailable).",
        );
        for ((kind, result), n) in self.counts.lock().iter() {
            out.push_str(&format!(
                "ferrocast_proxy_requests_total{{kind=\"{}\",result=\"{result}\"}} {n}\n",
                kind.as_str()
            ));
        }
        out
    }
}

fn clip(text: String) -> String {
    if text.chars().count() <= MAX_MESSAGE_CHARS {
        return text;
    }
    text.chars().take(MAX_MESSAGE_CHARS).collect()
}

fn unavailable(message: String) -> Denied {
    Denied::Refused(Refusal::new("proxy_unavailable", ErrorCode::Unavailable, message))
}

fn refused(kind: Kind, code: ErrorCode, message: Option<String>) -> Denied {
    let message = message
        .map(clip)
        .unwrap_or_else(|| format!("refused by the application ({} proxy)", kind.as_str()));
    Denied::Refused(Refusal::new("proxy_refused", code, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An HTTP server answering each request on its connections with `answer(body)`; returns
    /// its URL and the bodies it received.
    async fn app(
        answer: fn(&str) -> (u16, String),
    ) -> (String, std::sync::Arc<Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/rt", listener.local_addr().unwrap());
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let n = s.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).into_owned();
                        let Some(end) = text.find("\r\n\r\n") else { continue };
                        let len: usize = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length: ")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if buf.len() < end + 4 + len {
                            continue;
                        }
                        let body = text[end + 4..end + 4 + len].to_owned();
                        buf.drain(..end + 4 + len);
                        log.lock().push(body.clone());
                        let (status, reply) = answer(&body);
                        let head = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                            reply.len()
                        );
                        s.write_all(head.as_bytes()).await.unwrap();
                        s.write_all(reply.as_bytes()).await.unwrap();
                    }
                });
            }
        });
        (url, seen)
    }

    fn proxy(url: &str) -> Proxy {
        Proxy::new(ProxyConfig {
            connect_url: url.into(),
            subscribe_url: url.into(),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn answers_map_to_grants_refusals_and_disconnects() {
        let (url, seen) = app(|body| {
            let reply = if body.contains("\"token\":\"good\"") {
                r#"{"result":{"user":"42","info":{"name":"Ada"},"channels":["a.b"],"expire_at":99}}"#
            } else if body.contains("\"token\":\"banned\"") {
                r#"{"disconnect":{"code":4003,"reason":"banned"}}"#
            } else if body.contains("\"token\":\"crash\"") {
                return (500, "oops".into());
            } else if body.contains("\"token\":\"odd\"") {
                r#"{"something":1}"#
            } else {
                r#"{"error":{"code":"unauthorized","message":"log in first"}}"#
            };
            (200, reply.into())
        })
        .await;
        let p = proxy(&url);
        let ask = |token: &'static str| Request {
            transport: "websocket",
            client: "127.0.0.1",
            token: Some(token),
            ..Default::default()
        };
        let granted = p.call(Kind::Connect, &ask("good")).await.unwrap();
        assert_eq!(granted.user.as_deref(), Some("42"));
        assert_eq!((granted.channels, granted.expire_at), (vec!["a.b".to_string()], Some(99)));
        assert_eq!(
            p.call(Kind::Connect, &ask("banned")).await.unwrap_err(),
            Denied::Disconnect { code: 4003, reason: "banned".into() }
        );
        let Err(Denied::Refused(r)) = p.call(Kind::Connect, &ask("nope")).await else { panic!() };
        assert_eq!((r.code, r.message.as_str()), (ErrorCode::Unauthorized, "log in first"));
        for token in ["crash", "odd"] {
            let Err(Denied::Refused(r)) = p.call(Kind::Connect, &ask(token)).await else {
                panic!()
            };
            assert_eq!(r.code, ErrorCode::Unavailable, "{token}: {}", r.message);
        }
        assert!(seen.lock()[0].contains("\"transport\":\"websocket\""));
        let metrics = p.render_metrics();
        assert!(metrics.contains("kind=\"connect\",result=\"unavailable\"} 2"), "{metrics}");
        assert!(metrics.contains("kind=\"connect\",result=\"ok\"} 1"), "{metrics}");
    }

    #[tokio::test]
    async fn a_silent_application_is_unavailable_within_the_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/rt", listener.local_addr().unwrap());
        let p = Proxy::new(ProxyConfig { connect_url: url, timeout_ms: 200, ..Default::default() });
        let started = std::time::Instant::now();
        let Err(Denied::Refused(r)) = p.call(Kind::Connect, &Request::default()).await else {
            panic!()
        };
        assert!(r.message.contains("within 200 ms"), "{}", r.message);
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(listener);
    }
}
