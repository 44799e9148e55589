//! Helpers shared by the transport integration tests (ws, SSE, Socket.IO): a real server on 127.0.0.1:0,
//! and a deliberately small HTTP/1.1 client over raw TCP, so what is tested is the bytes a
//! browser or proxy would see.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferrocast_server::config::{Config, Sources};
use ferrocast_server::{AppState, Server};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const TIMEOUT: Duration = Duration::from_secs(5);

pub struct TestServer {
    pub addr: SocketAddr,
    pub app: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl TestServer {
    /// Starts a server with the simulator off and `sets` applied (`key=value`).
    pub async fn start(sets: &[&str]) -> TestServer {
        let mut all = vec!["simulator.enabled=false".to_string()];
        all.extend(sets.iter().map(|s| s.to_string()));
        let config =
            Config::load(&Sources { sets: all, ..Default::default() }).expect("valid test config");
        let app = AppState::new(config, None);
        let server = Server::bind(app.clone(), Some("127.0.0.1:0".parse().unwrap())).await.unwrap();
        let addr = server.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        TestServer { addr, app, stop: Some(stop), task }
    }

    /// The native WebSocket endpoint's URL.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Starts draining without waiting for it to finish.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Triggers a graceful shutdown and waits (bounded) for the server to finish draining.
    pub async fn shutdown(mut self) {
        self.begin_shutdown();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("server drained within 20 s")
            .unwrap();
    }

    /// Publishes through the HTTP API (loopback needs no key); returns the result entry.
    pub async fn publish(&self, channel: &str, data: Value) -> Value {
        let body = serde_json::json!({ "channel": channel, "data": data }).to_string();
        let r = http(self.addr, "POST", "/api/publish", &[], Some(body.as_bytes())).await;
        assert_eq!(r.status, 200, "publish answered {}: {}", r.status, r.text());
        r.json()["results"][0].clone()
    }

    pub async fn publish_ephemeral(&self, channel: &str, data: Value) {
        let body =
            serde_json::json!({ "channel": channel, "data": data, "ephemeral": true }).to_string();
        let r = http(self.addr, "POST", "/api/publish", &[], Some(body.as_bytes())).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }

    pub async fn metrics(&self) -> String {
        http(self.addr, "GET", "/metrics", &[], None).await.text()
    }
}

/// A fully read HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// One request on a fresh connection (`Connection: close`); the body is read to the end.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> HttpResponse {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    if let Some(body) = body {
        stream.write_all(body).await.unwrap();
    }
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader).await;
    let chunked = headers.iter().any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        while let Some(chunk) = read_chunk(&mut reader).await {
            body.extend_from_slice(&chunk);
        }
    } else {
        tokio::time::timeout(TIMEOUT, reader.read_to_end(&mut body))
            .await
            .expect("response body within 5 s")
            .unwrap();
    }
    HttpResponse { status, headers, body }
}

/// Reads a response head: the status and the (lower-cased) headers.
pub async fn read_head(reader: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    tokio::time::timeout(TIMEOUT, reader.read_line(&mut line))
        .await
        .expect("response within 5 s")
        .unwrap();
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("bad status line {line:?}"))
        .parse()
        .unwrap();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap();
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    (status, headers)
}

/// Reads one chunk of a chunked body; `None` at the terminating chunk or at EOF.
pub async fn read_chunk(reader: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut line = String::new();
    let n = reader.read_line(&mut line).await.ok()?;
    if n == 0 {
        return None;
    }
    let size = usize::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
    if size == 0 {
        let mut end = String::new();
        let _ = reader.read_line(&mut end).await;
        return None;
    }
    let mut chunk = vec![0; size + 2];
    reader.read_exact(&mut chunk).await.ok()?;
    chunk.truncate(size);
    Some(chunk)
}

/// The value of the first metric sample named `name` whose labels contain `labels`.
pub fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (lbls, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        lbls.contains(labels).then(|| value.trim().parse().ok()).flatten()
    })
}
