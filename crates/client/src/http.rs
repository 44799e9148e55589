//! A deliberately tiny HTTP/1.1 client for ferrocast's HTTP API (`POST /api/publish`,
//! `GET /api/channels`, health checks) over one keep-alive `TcpStream`.
//!
//! It exists so the CLI, the load generator and tests can talk to the API without pulling in a
//! full HTTP stack. It speaks plain `http://` only and handles `Content-Length`, chunked and
//! read-to-close bodies; that is all a ferrocast server (or a proxy in front of it) sends.

use std::net::IpAddr;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::client::PublishAck;
use crate::connect::tcp_connect;
use crate::error::Error;
use crate::frame::{ServerError, scalar_to_string};

/// Largest response head accepted; anything bigger is not a ferrocast server.
const MAX_HEAD: usize = 64 * 1024;

/// An HTTP response with its body fully read.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code, e.g. 200.
    pub status: u16,
    /// Response headers in arrival order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked).
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    /// The body as (lossy) UTF-8 text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Result<Value, Error> {
        serde_json::from_slice(&self.body)
            .map_err(|e| Error::Protocol(format!("response is not JSON ({e}): {}", self.text())))
    }

    /// `Ok(self)` for a 2xx status, otherwise [`Error::Http`] with the body text.
    pub fn error_for_status(self) -> Result<Self, Error> {
        if (200..300).contains(&self.status) {
            Ok(self)
        } else {
            Err(Error::Http { status: self.status, body: self.text() })
        }
    }
}

/// A failure while exchanging one request; `fresh` says whether the server may not have seen
/// the request at all (nothing was read back), which makes a retry on a new connection safe.
struct ExchangeError {
    error: Error,
    nothing_received: bool,
}

impl From<std::io::Error> for ExchangeError {
    fn from(e: std::io::Error) -> Self {
        ExchangeError { error: Error::Io(e), nothing_received: false }
    }
}

/// A keep-alive HTTP/1.1 connection to one ferrocast server.
#[derive(Debug)]
pub struct HttpClient {
    base: url::Url,
    host_header: String,
    api_key: Option<String>,
    bind: Option<IpAddr>,
    timeout: Duration,
    conn: Option<BufReader<TcpStream>>,
}

impl HttpClient {
    /// A client for the server at `base_url` (`http://host:port`, optionally with a path
    /// prefix; `ws://` URLs are accepted and mapped to `http://` with their path dropped).
    /// Nothing is connected until the first request.
    pub fn new(base_url: &str) -> Result<HttpClient, Error> {
        let bad = |reason: &str| Error::Url { url: base_url.to_owned(), reason: reason.to_owned() };
        let mut base = url::Url::parse(base_url).map_err(|e| bad(&e.to_string()))?;
        match base.scheme() {
            "http" => {}
            // The WebSocket URL names the same server; its path (`/ws`) is not an API prefix.
            "ws" => {
                base.set_scheme("http").map_err(|()| bad("cannot rewrite scheme"))?;
                base.set_path("/");
                base.set_query(None);
            }
            "https" | "wss" => return Err(bad("TLS is not supported by this client")),
            other => return Err(bad(&format!("unsupported scheme {other:?}"))),
        }
        let host = base.host_str().ok_or_else(|| bad("missing host"))?;
        let host_header = match base.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        Ok(HttpClient {
            base,
            host_header,
            api_key: None,
            bind: None,
            timeout: Duration::from_secs(30),
            conn: None,
        })
    }

    /// Sends `Authorization: Bearer <key>` with every request.
    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Binds the client socket to this local address before connecting.
    pub fn with_bind(mut self, addr: IpAddr) -> Self {
        self.bind = Some(addr);
        self
    }

    /// Limit for one whole request/response exchange (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// `GET path`.
    pub async fn get(&mut self, path: &str) -> Result<HttpResponse, Error> {
        self.request("GET", path, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(&mut self, path: &str, body: &[u8]) -> Result<HttpResponse, Error> {
        self.request("POST", path, Some(body)).await
    }

    /// Publishes one message through `POST /api/publish`.
    pub async fn publish(
        &mut self,
        channel: &str,
        data: impl Serialize,
    ) -> Result<PublishAck, Error> {
        let body = serde_json::to_vec(&json!({
            "channel": channel,
            "data": serde_json::to_value(data)
                .map_err(|e| Error::Protocol(format!("publish data is not JSON: {e}")))?,
        }))
        .expect("a JSON value serializes");
        let response = self.post_json("/api/publish", &body).await?.error_for_status()?;
        let json = response.json()?;
        let result = json.get("results").and_then(|r| r.get(0)).unwrap_or(&json);
        if let Some(err) = result.get("error") {
            return Err(Error::Server(ServerError {
                id: None,
                code: err
                    .get("code")
                    .and_then(scalar_to_string)
                    .unwrap_or_else(|| "unknown".into()),
                message: err.get("message").and_then(Value::as_str).unwrap_or_default().to_owned(),
            }));
        }
        PublishAck::from_json(result, channel)
            .ok_or_else(|| Error::Protocol(format!("publish response without offset: {json}")))
    }

    /// Sends one request and reads the whole response. A stale keep-alive connection (closed by
    /// the server while idle) is replaced and the request retried once.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<HttpResponse, Error> {
        let request = self.encode_request(method, path, body);
        let head_only = method.eq_ignore_ascii_case("HEAD");
        let reused = self.conn.is_some();
        match self.exchange(&request, head_only).await {
            Ok(response) => Ok(response),
            Err(e) if reused && e.nothing_received => {
                self.exchange(&request, head_only).await.map_err(|e| e.error)
            }
            Err(e) => Err(e.error),
        }
    }

    fn encode_request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Vec<u8> {
        let prefix = self.base.path().trim_end_matches('/');
        let mut out = Vec::with_capacity(256 + body.map_or(0, <[u8]>::len));
        out.extend_from_slice(
            format!(
                "{method} {prefix}{path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ferrocast-client\r\nAccept: application/json\r\n",
                self.host_header
            )
            .as_bytes(),
        );
        if let Some(key) = &self.api_key {
            out.extend_from_slice(format!("Authorization: Bearer {key}\r\n").as_bytes());
        }
        if let Some(body) = body {
            out.extend_from_slice(
                format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len())
                    .as_bytes(),
            );
        }
        out.extend_from_slice(b"\r\n");
        if let Some(body) = body {
            out.extend_from_slice(body);
        }
        out
    }

    async fn exchange(
        &mut self,
        request: &[u8],
        head_only: bool,
    ) -> Result<HttpResponse, ExchangeError> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.exchange_inner(request, head_only)).await {
            Ok(result) => {
                if result.is_err() {
                    self.conn = None;
                }
                result
            }
            Err(_) => {
                self.conn = None;
                Err(ExchangeError {
                    error: Error::Timeout("the HTTP response"),
                    nothing_received: false,
                })
            }
        }
    }

    async fn exchange_inner(
        &mut self,
        request: &[u8],
        head_only: bool,
    ) -> Result<HttpResponse, ExchangeError> {
        if self.conn.is_none() {
            let stream = tcp_connect(&self.base, self.bind)
                .await
                .map_err(|error| ExchangeError { error, nothing_received: false })?;
            self.conn = Some(BufReader::with_capacity(64 * 1024, stream));
        }
        let conn = self.conn.as_mut().expect("connected above");
        conn.get_mut()
            .write_all(request)
            .await
            .map_err(|e| ExchangeError { error: Error::Io(e), nothing_received: true })?;
        let (response, keep_alive) = read_response(conn, head_only).await?;
        if !keep_alive {
            self.conn = None;
        }
        Ok(response)
    }
}

/// Reads one response; returns it and whether the connection can be reused.
async fn read_response<R: tokio::io::AsyncBufRead + Unpin>(
    conn: &mut R,
    head_only: bool,
) -> Result<(HttpResponse, bool), ExchangeError> {
    loop {
        let mut head = Vec::with_capacity(512);
        let mut first = true;
        loop {
            let before = head.len();
            let n = conn.read_until(b'\n', &mut head).await.map_err(|e| ExchangeError {
                nothing_received: first && head.is_empty(),
                error: Error::Io(e),
            })?;
            if n == 0 {
                return Err(ExchangeError {
                    error: Error::Io(std::io::ErrorKind::UnexpectedEof.into()),
                    nothing_received: head.is_empty(),
                });
            }
            first = false;
            if head.len() > MAX_HEAD {
                return Err(protocol("response head too large"));
            }
            let line = &head[before..];
            if line == b"\r\n" || line == b"\n" {
                break;
            }
        }
        let (status, version_11, headers) = parse_head(&head)?;
        // 1xx interim responses (100 Continue) precede the real one.
        if (100..200).contains(&status) {
            continue;
        }
        let find = |name: &str| {
            headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.to_ascii_lowercase())
        };
        let connection = find("connection").unwrap_or_default();
        let mut keep_alive = if version_11 {
            !connection.contains("close")
        } else {
            connection.contains("keep-alive")
        };
        let mut body = Vec::new();
        if head_only || status == 204 || status == 304 {
            // No body by definition.
        } else if find("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
            read_chunked(conn, &mut body).await?;
        } else if let Some(len) = find("content-length") {
            let len: usize = len.trim().parse().map_err(|_| protocol("bad Content-Length"))?;
            body.resize(len, 0);
            conn.read_exact(&mut body).await?;
        } else {
            conn.read_to_end(&mut body).await?;
            keep_alive = false;
        }
        return Ok((HttpResponse { status, headers, body }, keep_alive));
    }
}

type Head = (u16, bool, Vec<(String, String)>);

fn parse_head(head: &[u8]) -> Result<Head, ExchangeError> {
    let text = std::str::from_utf8(head).map_err(|_| protocol("response head is not UTF-8"))?;
    let mut lines = text.split("\r\n").flat_map(|l| l.split('\n'));
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(protocol("not an HTTP/1.x response"));
    }
    let status: u16 =
        parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| protocol("bad status line"))?;
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok((status, version == "HTTP/1.1", headers))
}

async fn read_chunked<R: tokio::io::AsyncBufRead + Unpin>(
    conn: &mut R,
    body: &mut Vec<u8>,
) -> Result<(), ExchangeError> {
    let mut line = String::new();
    loop {
        line.clear();
        conn.read_line(&mut line).await?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| protocol("bad chunk size"))?;
        if size == 0 {
            // Skip trailers up to the blank line.
            loop {
                line.clear();
                if conn.read_line(&mut line).await? == 0 || line.trim().is_empty() {
                    return Ok(());
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        conn.read_exact(&mut body[start..]).await?;
        line.clear();
        conn.read_line(&mut line).await?;
    }
}

fn protocol(msg: &str) -> ExchangeError {
    ExchangeError { error: Error::Protocol(format!("HTTP: {msg}")), nothing_received: false }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(raw: &str) -> (HttpResponse, bool) {
        let mut reader = BufReader::new(raw.as_bytes());
        match read_response(&mut reader, false).await {
            Ok(r) => r,
            Err(e) => panic!("{}", e.error),
        }
    }

    #[tokio::test]
    async fn content_length_keep_alive() {
        let (r, keep) = parse(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"results\":1}extra",
        )
        .await;
        assert_eq!(r.status, 200);
        assert!(keep);
        assert_eq!(r.json().unwrap()["results"], 1);
        assert_eq!(r.header("Content-Type"), Some("application/json"));
    }

    #[tokio::test]
    async fn chunked_and_interim_responses() {
        let (r, keep) = parse(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n4;x=y\r\nabcd\r\n2\r\nef\r\n0\r\n\r\n",
        )
        .await;
        assert_eq!((r.status, r.text().as_str(), keep), (503, "abcdef", false));
        assert!(r.error_for_status().is_err());
    }

    #[tokio::test]
    async fn body_until_close() {
        let (r, keep) = parse("HTTP/1.0 200 OK\r\n\r\nhello").await;
        assert_eq!((r.text().as_str(), keep), ("hello", false));
    }

    #[tokio::test]
    async fn eof_before_anything_is_retryable() {
        let mut reader = BufReader::new(&b""[..]);
        let err = read_response(&mut reader, false).await.err().unwrap();
        assert!(err.nothing_received);
    }

    #[test]
    fn base_urls() {
        let c = HttpClient::new("ws://127.0.0.1:8080/ws").unwrap();
        let req = c.encode_request("POST", "/api/publish", Some(b"{}"));
        let text = String::from_utf8(req).unwrap();
        assert!(text.starts_with("POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"));
        assert!(text.ends_with("Content-Length: 2\r\n\r\n{}"));
        let c = HttpClient::new("http://h/prefix/").unwrap().with_api_key("k");
        let text = String::from_utf8(c.encode_request("GET", "/healthz", None)).unwrap();
        assert!(text.starts_with("GET /prefix/healthz HTTP/1.1\r\nHost: h\r\n"));
        assert!(text.contains("Authorization: Bearer k\r\n"));
        assert!(HttpClient::new("https://h").is_err());
    }
}
