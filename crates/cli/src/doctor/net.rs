//! The doctor's network layer: the target URL, fresh TCP (and TLS) connections to it, one
//! HTTP/1.1 exchange per connection through hyper, and WebSocket upgrades whose refusals are
//! kept whole (status, headers, body) so they can be diagnosed.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use url::Url;

/// What kind of endpoint the URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointKind {
    /// A native WebSocket path (`/ws`, or an alias such as `/ws/price`).
    Native,
    /// A Socket.IO path (`/socket.io/...`, or any URL with `EIO=` in its query).
    SocketIo,
    /// No path: the origin of a deployment; the doctor picks the server's WebSocket path.
    Origin,
}

/// The URL under test, split into what each check needs.
#[derive(Debug, Clone)]
pub struct Target {
    pub secure: bool,
    pub host: String,
    pub port: u16,
    /// The `Host` header: the host, with the port when it is not the scheme's default.
    pub authority: String,
    /// The path (and query) the user gave, if any.
    pub path: Option<String>,
    pub kind: EndpointKind,
}

impl Target {
    /// Parses `ws://`, `wss://`, `http://` or `https://` URLs; a bare `host[:port][/path]`
    /// is taken as `http://`.
    pub fn parse(raw: &str) -> Result<Target, String> {
        let with_scheme =
            if raw.contains("://") { raw.to_owned() } else { format!("http://{raw}") };
        let url = Url::parse(&with_scheme).map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
        let secure = match url.scheme() {
            "ws" | "http" => false,
            "wss" | "https" => true,
            other => {
                return Err(format!(
                    "unsupported scheme {other:?}: use ws://, wss://, http:// or https://"
                ));
            }
        };
        let host = url.host_str().ok_or_else(|| format!("{raw:?} has no host"))?;
        // IPv6 literals come bracketed from the URL parser; sockets and SNI want them bare.
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = url.port_or_known_default().unwrap_or(if secure { 443 } else { 80 });
        let default_port = if secure { 443 } else { 80 };
        let host_for_header = if host.contains(':') { format!("[{host}]") } else { host.clone() };
        let authority = if port == default_port {
            host_for_header
        } else {
            format!("{host_for_header}:{port}")
        };
        let path = match (url.path(), url.query()) {
            ("/" | "", None) => None,
            (p, None) => Some(p.to_owned()),
            (p, Some(q)) => Some(format!("{p}?{q}")),
        };
        let kind = match &path {
            None => EndpointKind::Origin,
            Some(p) if p.starts_with("/socket.io") || p.contains("EIO=") => EndpointKind::SocketIo,
            Some(_) => EndpointKind::Native,
        };
        Ok(Target { secure, host, port, authority, path, kind })
    }
}

/// Anything a connection can be: plain TCP or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// Why a connection or exchange failed, kept apart so checks can diagnose each.
#[derive(Debug)]
pub enum NetError {
    Connect(SocketAddr, io::Error),
    Tls(io::Error),
    Timeout(&'static str, Duration),
    Http(hyper::Error),
    /// The server answered 101 but not with a valid WebSocket handshake.
    BadHandshake(String),
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetError::Connect(addr, e) => write!(f, "TCP connect to {addr} failed: {e}"),
            NetError::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            NetError::Timeout(what, after) => {
                write!(f, "no answer within {} s ({what})", after.as_secs_f32())
            }
            NetError::Http(e) => match std::error::Error::source(e) {
                Some(source) => write!(f, "HTTP exchange failed: {e}: {source}"),
                None => write!(f, "HTTP exchange failed: {e}"),
            },
            NetError::BadHandshake(why) => write!(f, "broken WebSocket handshake: {why}"),
        }
    }
}

impl NetError {
    /// Whether the peer (or something in between) closed the connection without answering.
    pub fn is_closed_without_answer(&self) -> bool {
        matches!(self, NetError::Http(e) if e.is_incomplete_message() || e.is_canceled())
            || matches!(self, NetError::Http(e) if io_kind(e).is_some_and(|k| matches!(k, io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof | io::ErrorKind::BrokenPipe)))
    }
}

fn io_kind(e: &hyper::Error) -> Option<io::ErrorKind> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return Some(io.kind());
        }
        source = s.source();
    }
    None
}

/// Opens fresh connections to the target: TCP to the address that answered first, then TLS
/// when the scheme asks for it.
#[derive(Clone)]
pub struct Connector {
    pub target: Arc<Target>,
    pub addrs: Vec<SocketAddr>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub timeout: Duration,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("addrs", &self.addrs)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Connector {
    /// A new connection, ready for HTTP.
    pub async fn connect(&self) -> Result<Box<dyn Io>, NetError> {
        let mut last = None;
        for addr in &self.addrs {
            match tokio::time::timeout(self.timeout, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => {
                    let _ = tcp.set_nodelay(true);
                    return self.wrap(tcp).await;
                }
                Ok(Err(e)) => last = Some(NetError::Connect(*addr, e)),
                Err(_) => last = Some(NetError::Timeout("TCP connect", self.timeout)),
            }
        }
        Err(last.unwrap_or(NetError::Timeout("no address to connect to", self.timeout)))
    }

    async fn wrap(&self, tcp: TcpStream) -> Result<Box<dyn Io>, NetError> {
        let Some(config) = &self.tls else { return Ok(Box::new(tcp)) };
        let name = server_name(&self.target.host).map_err(NetError::Tls)?;
        let handshake = TlsConnector::from(config.clone()).connect(name, tcp);
        match tokio::time::timeout(self.timeout, handshake).await {
            Ok(Ok(tls)) => Ok(Box::new(tls)),
            Ok(Err(e)) => Err(NetError::Tls(e)),
            Err(_) => Err(NetError::Timeout("TLS handshake", self.timeout)),
        }
    }

    /// Sends one request on a fresh connection and returns the response head with a
    /// streaming body. The connection lives as long as the body (and any upgrade).
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<Response<Incoming>, NetError> {
        let io = self.connect().await?;
        let exchange = async {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .map_err(NetError::Http)?;
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
            sender.send_request(req).await.map_err(NetError::Http)
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(NetError::Timeout("HTTP response", self.timeout)),
        }
    }

    /// A request to `path` on the target with the doctor's standard headers.
    pub fn request(&self, method: &str, path: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.target.authority)
            .header(http::header::USER_AGENT, user_agent())
    }

    /// `GET path` with `headers`; the body is read whole (up to `BODY_CAP`).
    pub async fn get(&self, path: &str, headers: &[(&str, String)]) -> Result<HttpReply, NetError> {
        let mut builder = self.request("GET", path);
        for (k, v) in headers {
            builder = builder.header(*k, v);
        }
        let resp = self.send(builder.body(Full::new(Bytes::new())).expect("valid request")).await?;
        HttpReply::read(resp, self.timeout).await
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
        headers: &[(&str, String)],
    ) -> Result<HttpReply, NetError> {
        let mut builder =
            self.request("POST", path).header(http::header::CONTENT_TYPE, "application/json");
        for (k, v) in headers {
            builder = builder.header(*k, v);
        }
        let req = builder.body(Full::new(Bytes::from(body.to_string()))).expect("valid request");
        let resp = self.send(req).await?;
        HttpReply::read(resp, self.timeout).await
    }

    /// `POST path` with a text body (an Engine.IO polling payload).
    pub async fn post_text(
        &self,
        path: &str,
        body: &str,
        headers: &[(&str, String)],
    ) -> Result<HttpReply, NetError> {
        let mut builder = self
            .request("POST", path)
            .header(http::header::CONTENT_TYPE, "text/plain; charset=UTF-8");
        for (k, v) in headers {
            builder = builder.header(*k, v);
        }
        let req = builder.body(Full::new(Bytes::from(body.to_owned()))).expect("valid request");
        let resp = self.send(req).await?;
        HttpReply::read(resp, self.timeout).await
    }

    /// Attempts a WebSocket upgrade of `path` with `extra` headers. A refusal is not an
    /// error: it comes back as [`Upgrade::Refused`] with the whole answer.
    pub async fn upgrade(&self, path: &str, extra: &[(&str, String)]) -> Result<Upgrade, NetError> {
        let key = websocket_key();
        let mut builder = self
            .request("GET", path)
            .header(http::header::UPGRADE, "websocket")
            .header(http::header::CONNECTION, "Upgrade")
            .header(http::header::SEC_WEBSOCKET_KEY, &key)
            .header(http::header::SEC_WEBSOCKET_VERSION, "13");
        for (k, v) in extra {
            builder = builder.header(*k, v);
        }
        let started = Instant::now();
        let resp = self.send(builder.body(Full::new(Bytes::new())).expect("valid request")).await?;
        let elapsed = started.elapsed();
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Ok(Upgrade::Refused(HttpReply::read(resp, self.timeout).await?));
        }
        let expected = ferrocast_server::ws::accept_key(key.as_bytes());
        let got =
            resp.headers().get(http::header::SEC_WEBSOCKET_ACCEPT).and_then(|v| v.to_str().ok());
        if got != Some(expected.as_str()) {
            return Err(NetError::BadHandshake(format!(
                "Sec-WebSocket-Accept is {got:?}, expected {expected:?}: something between rewrote the handshake"
            )));
        }
        let upgraded = match tokio::time::timeout(self.timeout, hyper::upgrade::on(resp)).await {
            Ok(Ok(u)) => u,
            Ok(Err(e)) => return Err(NetError::Http(e)),
            Err(_) => return Err(NetError::Timeout("upgrade", self.timeout)),
        };
        let config = WebSocketConfig::default().max_message_size(None).max_frame_size(None);
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, Some(config))
                .await;
        Ok(Upgrade::Upgraded { ws: Box::new(ws), handshake: elapsed })
    }
}

/// An open WebSocket from [`Connector::upgrade`].
pub type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// The answer to an upgrade request.
pub enum Upgrade {
    Upgraded { ws: Box<Ws>, handshake: Duration },
    Refused(HttpReply),
}

/// Most body bytes kept from an answer.
const BODY_CAP: usize = 64 * 1024;

/// A whole (capped) HTTP answer.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl HttpReply {
    async fn read(resp: Response<Incoming>, timeout: Duration) -> Result<HttpReply, NetError> {
        let (parts, mut body) = resp.into_parts();
        let mut collected = Vec::new();
        let read = async {
            while collected.len() < BODY_CAP {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            collected.extend_from_slice(data);
                        }
                    }
                    Some(Err(e)) => return Err(NetError::Http(e)),
                    None => break,
                }
            }
            Ok(())
        };
        // A streaming answer (an event stream, say) never ends: keep what came in time.
        match tokio::time::timeout(timeout.min(Duration::from_secs(3)), read).await {
            Ok(Err(e)) if collected.is_empty() => return Err(e),
            _ => {}
        }
        collected.truncate(BODY_CAP);
        Ok(HttpReply { status: parts.status, headers: parts.headers, body: Bytes::from(collected) })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The first line of the body, shortened, for messages.
    pub fn snippet(&self) -> String {
        let text = self.text();
        let compact: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if compact.chars().count() > 160 {
            format!("{}…", compact.chars().take(160).collect::<String>())
        } else {
            compact
        }
    }

    /// The proxy this answer passed through or came from, by its `Server` header or the
    /// signature of its HTML error page (nginx, HAProxy, a CDN, a load balancer).
    pub fn proxy_name(&self) -> Option<String> {
        let server = self.header("server").unwrap_or_default().to_ascii_lowercase();
        let body = self.text().to_ascii_lowercase();
        for name in [
            "nginx",
            "haproxy",
            "cloudflare",
            "awselb",
            "envoy",
            "traefik",
            "caddy",
            "apache",
            "openresty",
        ] {
            if server.contains(name) || (body.contains("<html") && body.contains(name)) {
                return Some(name.to_owned());
            }
        }
        None
    }

    /// Whether the proxy wrote this answer itself (an error page) rather than passing on the
    /// application's (JSON, from ferrocast).
    pub fn written_by_proxy(&self) -> bool {
        self.proxy_name().is_some() && self.json().is_none()
    }

    /// `" from nginx"` for a proxy's own answer, `" via nginx"` for a passed-on one.
    pub fn origin_note(&self) -> String {
        match self.proxy_name() {
            Some(p) if self.written_by_proxy() => format!(" from {p}"),
            Some(p) => format!(" via {p}"),
            None => String::new(),
        }
    }
}

pub fn user_agent() -> String {
    format!("ferrocast-doctor/{}", env!("CARGO_PKG_VERSION"))
}

fn websocket_key() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>())
}

pub fn server_name(host: &str) -> Result<ServerName<'static>, io::Error> {
    ServerName::try_from(host.to_owned()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{host:?} is not a valid TLS server name: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = Target::parse("wss://push.example.com/ws/price?x=1").unwrap();
        assert!(t.secure);
        assert_eq!(
            (t.host.as_str(), t.port, t.authority.as_str()),
            ("push.example.com", 443, "push.example.com")
        );
        assert_eq!(t.path.as_deref(), Some("/ws/price?x=1"));
        assert_eq!(t.kind, EndpointKind::Native);

        let t = Target::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            (t.port, t.authority.as_str(), t.kind),
            (8080, "127.0.0.1:8080", EndpointKind::Origin)
        );

        let t = Target::parse("localhost:9000/socket.io/").unwrap();
        assert!(!t.secure);
        assert_eq!(t.kind, EndpointKind::SocketIo);

        let t = Target::parse("ws://[::1]:8080/ws").unwrap();
        assert_eq!((t.host.as_str(), t.authority.as_str()), ("::1", "[::1]:8080"));

        assert!(Target::parse("ftp://x").is_err());
    }
}
