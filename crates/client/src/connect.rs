//! Opening a WebSocket to a ferrocast server: URL handling, optional source-address binding,
//! the HTTP upgrade with extra headers, and reading the welcome frame.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

use crate::error::{CloseInfo, Error};
use crate::frame::{ServerFrame, Welcome, decode_text};

/// The raw WebSocket stream type this crate uses (plain TCP: TLS is not supported).
pub type WsStream = WebSocketStream<TcpStream>;

/// How to connect. `ConnectOptions::default()` is what [`crate::Client::connect`] uses.
///
/// Fields are public so struct-update syntax works
/// (`ConnectOptions { auto_pong: false, ..Default::default() }`); the builder methods do the same.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// `Origin` header to send with the upgrade (servers may enforce an allow-list: close 1008).
    pub origin: Option<String>,
    /// Extra upgrade request headers, e.g. `("Authorization", "Bearer ...")`.
    pub headers: Vec<(String, String)>,
    /// Answer server `{"type":"ping"}` frames with `{"op":"pong"}` automatically (default on).
    /// Turn off to exercise the server's heartbeat timeout (close 4009).
    pub auto_pong: bool,
    /// Local address to bind the socket to before connecting (e.g. `127.0.0.2`), so one host can
    /// open more connections than a single source address has ephemeral ports.
    pub bind: Option<IpAddr>,
    /// Limit for TCP connect + upgrade + welcome.
    pub connect_timeout: Duration,
    /// Limit for each request/ack round trip (subscribe, publish, ping, ...).
    pub request_timeout: Duration,
    /// Largest message accepted from the server (`None`: unlimited).
    pub max_message_size: Option<usize>,
    /// Initial read buffer per connection; small values keep thousands of connections cheap.
    pub read_buffer_size: usize,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            origin: None,
            headers: Vec::new(),
            auto_pong: true,
            bind: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            max_message_size: Some(64 << 20),
            read_buffer_size: 16 * 1024,
        }
    }
}

impl ConnectOptions {
    /// Sets the `Origin` header.
    pub fn origin(mut self, origin: impl Into<String>) -> Self {
        self.origin = Some(origin.into());
        self
    }

    /// Adds an upgrade request header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Turns automatic pong replies on or off.
    pub fn auto_pong(mut self, on: bool) -> Self {
        self.auto_pong = on;
        self
    }

    /// Binds the client socket to this local address before connecting.
    pub fn bind(mut self, addr: IpAddr) -> Self {
        self.bind = Some(addr);
        self
    }

    /// Sets both the connect and the request timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self.request_timeout = timeout;
        self
    }

    fn ws_config(&self) -> WebSocketConfig {
        // Write each frame straight through (no coalescing buffer) and start with a small read
        // buffer: tungstenite's 128 KiB defaults cost gigabytes at 20,000 connections.
        WebSocketConfig::default()
            .read_buffer_size(self.read_buffer_size.max(1024))
            .write_buffer_size(0)
            .max_message_size(self.max_message_size)
            .max_frame_size(self.max_message_size)
    }
}

/// Normalises a server URL to `ws://host:port/path?query`.
///
/// `http://` is accepted as a synonym of `ws://` (same server, same port); a URL with an empty
/// path gets `/ws`. `wss://`/`https://` are rejected because this client has no TLS.
pub fn normalize_ws_url(raw: &str) -> Result<url::Url, Error> {
    let bad = |reason: &str| Error::Url { url: raw.to_owned(), reason: reason.to_owned() };
    let mut url = url::Url::parse(raw).map_err(|e| bad(&e.to_string()))?;
    match url.scheme() {
        "ws" => {}
        "http" => url.set_scheme("ws").map_err(|()| bad("cannot rewrite scheme"))?,
        "wss" | "https" => {
            return Err(bad(
                "TLS is not supported by this client; connect with ws:// (e.g. behind the TLS terminator)",
            ));
        }
        other => return Err(bad(&format!("unsupported scheme {other:?}, expected ws://"))),
    }
    if url.host().is_none() {
        return Err(bad("missing host"));
    }
    if url.path().is_empty() || url.path() == "/" {
        url.set_path("/ws");
    }
    Ok(url)
}

/// Resolves `url`'s host and opens a TCP connection, binding to `bind` first if given.
pub(crate) async fn tcp_connect(url: &url::Url, bind: Option<IpAddr>) -> Result<TcpStream, Error> {
    let host = match url.host() {
        Some(url::Host::Domain(d)) => d.to_owned(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        None => {
            return Err(Error::Url { url: url.to_string(), reason: "missing host".into() });
        }
    };
    let port = url.port_or_known_default().unwrap_or(80);
    let target = format!("{host}:{port}");
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|source| Error::Connect { addr: target.clone(), source })?
        // A bound socket can only reach addresses of its own family.
        .filter(|a| bind.is_none_or(|b| a.is_ipv4() == b.is_ipv4()))
        .collect();
    let mut last_err = std::io::Error::new(std::io::ErrorKind::NotFound, "no usable address");
    for addr in addrs {
        match connect_one(addr, bind).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last_err = e,
        }
    }
    Err(Error::Connect { addr: target, source: last_err })
}

async fn connect_one(addr: SocketAddr, bind: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let stream = match bind {
        None => TcpStream::connect(addr).await?,
        Some(local) => {
            let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            socket.bind(SocketAddr::new(local, 0))?;
            socket.connect(addr).await?
        }
    };
    // Frames are small and latency matters more than packet count.
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Opens the WebSocket and reads the welcome frame, returning the raw stream.
///
/// This is the building block of [`crate::Client`]; tools that want to handle raw frames
/// themselves (the load generator) use it directly. Frames that arrive in the same batch as the
/// welcome are returned too so nothing is lost.
pub async fn connect_raw(
    url: &str,
    opts: &ConnectOptions,
) -> Result<(WsStream, Welcome, Vec<ServerFrame>), Error> {
    let url = normalize_ws_url(url)?;
    tokio::time::timeout(opts.connect_timeout, connect_inner(url, opts))
        .await
        .map_err(|_| Error::Timeout("connect and welcome"))?
}

async fn connect_inner(
    url: url::Url,
    opts: &ConnectOptions,
) -> Result<(WsStream, Welcome, Vec<ServerFrame>), Error> {
    let stream = tcp_connect(&url, opts.bind).await?;
    let mut request = url.as_str().into_client_request()?;
    let headers = request.headers_mut();
    if let Some(origin) = &opts.origin {
        headers.insert("origin", header_value(origin)?);
    }
    for (name, value) in &opts.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| Error::Protocol(format!("invalid header name {name:?}: {e}")))?;
        headers.append(name, header_value(value)?);
    }
    let (mut ws, _response) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(opts.ws_config()))
            .await?;

    let welcome = loop {
        let Some(message) = ws.next().await else {
            return Err(Error::Closed(CloseInfo::abnormal(
                "connection closed before the welcome frame",
            )));
        };
        match message? {
            WsMessage::Text(text) => {
                let mut frames = decode_text(text.as_str())?.into_iter();
                match frames.next() {
                    Some(ServerFrame::Welcome(welcome)) => break (welcome, frames.collect()),
                    Some(other) => {
                        return Err(Error::Protocol(format!(
                            "expected a welcome frame first, got {other:?}"
                        )));
                    }
                    None => continue,
                }
            }
            WsMessage::Close(frame) => return Err(Error::Closed(close_info(frame))),
            // Control frames are answered by tungstenite itself.
            WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => continue,
            WsMessage::Binary(_) => {
                return Err(Error::Protocol("binary frame before the welcome".into()));
            }
        }
    };
    Ok((ws, welcome.0, welcome.1))
}

fn header_value(value: &str) -> Result<HeaderValue, Error> {
    HeaderValue::from_str(value)
        .map_err(|e| Error::Protocol(format!("invalid header value {value:?}: {e}")))
}

/// Converts a received close frame into a [`CloseInfo`].
pub fn close_info(frame: Option<tungstenite::protocol::CloseFrame>) -> CloseInfo {
    match frame {
        Some(frame) => {
            CloseInfo { code: u16::from(frame.code), reason: frame.reason.as_str().to_owned() }
        }
        None => CloseInfo { code: CloseInfo::NO_STATUS, reason: String::new() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalised() {
        assert_eq!(
            normalize_ws_url("ws://127.0.0.1:8080/ws").unwrap().as_str(),
            "ws://127.0.0.1:8080/ws"
        );
        assert_eq!(
            normalize_ws_url("http://localhost:9000").unwrap().as_str(),
            "ws://localhost:9000/ws"
        );
        assert_eq!(
            normalize_ws_url("ws://h/ws/price?token=a").unwrap().as_str(),
            "ws://h/ws/price?token=a"
        );
        assert!(normalize_ws_url("wss://h/ws").is_err());
        assert!(normalize_ws_url("ftp://h/ws").is_err());
        assert!(normalize_ws_url("nonsense").is_err());
    }

    #[test]
    fn close_frames_convert() {
        use tungstenite::protocol::CloseFrame;
        use tungstenite::protocol::frame::coding::CloseCode;
        let info =
            close_info(Some(CloseFrame { code: CloseCode::from(4008), reason: "slow".into() }));
        assert_eq!((info.code, info.reason.as_str()), (4008, "slow"));
        assert_eq!(close_info(None).code, 1005);
    }
}
