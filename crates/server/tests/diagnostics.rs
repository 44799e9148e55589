//! `/api/diagnostics` over real sockets on 127.0.0.1:0: the report of what arrived (HTTP
//! version, headers as received, forwarded addresses, redaction), the access rules, and the
//! silent WebSocket variant (report, echo, no heartbeat, close 1000 after the hold, 1001 on
//! drain).

use std::time::{Duration, Instant};

use ferrocast_server::config::{Config, Sources};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

struct TestServer {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl TestServer {
    async fn start(sets: &[&str], api_key: Option<&str>) -> TestServer {
        let mut all = vec!["simulator.enabled=false".to_string()];
        all.extend(sets.iter().map(|s| s.to_string()));
        let config =
            Config::load(&Sources { sets: all, ..Default::default() }).expect("valid test config");
        let app = ferrocast_server::AppState::new(config, api_key.map(str::to_owned));
        let server = ferrocast_server::Server::bind(app, Some("127.0.0.1:0".parse().unwrap()))
            .await
            .unwrap();
        let addr = server.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        TestServer { addr, stop: Some(stop), task }
    }

    /// Sends `head` (request line and headers, without the final blank line) and returns
    /// the status code and the JSON body.
    async fn raw(&self, head: &str) -> (u16, Value) {
        let mut tcp = TcpStream::connect(self.addr).await.unwrap();
        tcp.write_all(format!("{head}\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
            .await
            .expect("answer in time")
            .unwrap();
        let text = String::from_utf8(answer).unwrap();
        let status = text[9..12].parse().unwrap();
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
    }
}

fn header<'a>(report: &'a Value, name: &str) -> Option<&'a str> {
    report["request"]["headers"].as_array()?.iter().find(|h| h[0] == name)?[1].as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_what_arrived_as_it_arrived() {
    let server = TestServer::start(&["server.ws_paths=[\"/ws\",\"/ws/price\"]"], None).await;
    let (status, report) = server
        .raw(
            "GET /api/diagnostics?x=1 HTTP/1.0\r\nHost: push.example.com\r\n\
             X-Forwarded-For: 10.1.2.3\r\nX-Forwarded-Proto: https\r\n\
             Authorization: Bearer s3cret\r\nX-Api-Token: t0ken\r\nConnection: close",
        )
        .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["server"], "ferrocast");
    assert_eq!(report["transport"], "http");
    assert_eq!(report["request"]["http_version"], "HTTP/1.0");
    assert_eq!(report["request"]["query"], "x=1");
    assert_eq!(header(&report, "host"), Some("push.example.com"));
    assert_eq!(header(&report, "x-forwarded-proto"), Some("https"));
    assert_eq!(report["forwarded_for"], serde_json::json!(["10.1.2.3"]));
    // Credentials are never echoed, only their length.
    assert_eq!(header(&report, "authorization"), Some("<redacted: 13 bytes>"));
    assert_eq!(header(&report, "x-api-token"), Some("<redacted: 5 bytes>"));
    // A plain GET is not a usable upgrade, and the report says why.
    assert_eq!(report["websocket_upgrade"]["usable"], false);
    assert!(report["websocket_upgrade"]["problem"].as_str().unwrap().contains("Upgrade"));
    let settings = &report["settings"];
    assert_eq!(settings["ws_paths"], serde_json::json!(["/ws", "/ws/price"]));
    assert_eq!(settings["ping_interval_ms"], 25_000);
    assert_eq!(settings["max_frame_bytes"], 65_536);
    assert_eq!(settings["client_publish_namespaces"], serde_json::json!(["chat"]));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_follows_diagnostics_allow() {
    const GET: &str = "GET /api/diagnostics HTTP/1.1\r\nHost: x";
    // Default "local" with no key: loopback and private peers, unless a proxy says the client
    // is remote.
    let server = TestServer::start(&[], None).await;
    assert_eq!(server.raw(GET).await.0, 200);
    assert_eq!(server.raw(&format!("{GET}\r\nX-Forwarded-For: 192.168.1.9")).await.0, 200);
    let (status, body) = server.raw(&format!("{GET}\r\nX-Forwarded-For: 203.0.113.7")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["message"].as_str().unwrap().contains("203.0.113.7"), "{body}");
    // A forged entry on the left does not help: the nearest proxy's entry counts.
    let forged = format!("{GET}\r\nX-Forwarded-For: 127.0.0.1, 203.0.113.7");
    assert_eq!(server.raw(&forged).await.0, 403);
    let forwarded = format!("{GET}\r\nForwarded: for=\"[2001:db8::1]:4711\"");
    assert_eq!(server.raw(&forwarded).await.0, 403);
    for name in ["X-Real-IP", "True-Client-IP", "CF-Connecting-IP"] {
        assert_eq!(server.raw(&format!("{GET}\r\n{name}: 203.0.113.7")).await.0, 403, "{name}");
    }
    server.shutdown().await;

    // With keys configured, "local" needs a key with the admin scope, even on loopback; the
    // key opens it from anywhere.
    let keys = "api.keys=[{name=\"reader\",key=\"r3ad\",scopes=[\"read\"]}]";
    let server = TestServer::start(&[keys], Some("k3y")).await;
    assert_eq!(server.raw(GET).await.0, 401);
    let keyed = format!("{GET}\r\nX-Forwarded-For: 203.0.113.7\r\nAuthorization: Bearer k3y");
    assert_eq!(server.raw(&keyed).await.0, 200);
    let (status, body) = server.raw(&format!("{GET}\r\nAuthorization: bearer r3ad")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["message"].as_str().unwrap().contains("\"admin\" scope"), "{body}");
    server.shutdown().await;

    let server = TestServer::start(&["diagnostics.allow=key"], Some("k3y")).await;
    assert_eq!(server.raw(GET).await.0, 401);
    assert_eq!(server.raw(&format!("{GET}\r\nAuthorization: Bearer k3y")).await.0, 200);
    assert_eq!(server.raw(&format!("{GET}\r\nAuthorization: Bearer nope")).await.0, 401);
    server.shutdown().await;

    let server = TestServer::start(&["diagnostics.allow=all"], None).await;
    assert_eq!(server.raw(&format!("{GET}\r\nX-Forwarded-For: 203.0.113.7")).await.0, 200);
    server.shutdown().await;

    let server = TestServer::start(&["diagnostics.allow=off"], None).await;
    let (status, body) = server.raw(GET).await;
    assert_eq!(status, 404);
    assert!(body["message"].as_str().unwrap().contains("turned off"), "{body}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_variant_reports_echoes_and_stays_silent_for_the_hold() {
    let server = TestServer::start(&["server.ping_interval_ms=100"], None).await;
    let url = format!("ws://{}/api/diagnostics?hold_ms=700", server.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let started = Instant::now();
    let Some(Ok(Message::Text(first))) = ws.next().await else { panic!("no report") };
    let report: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(report["transport"], "websocket");
    assert_eq!(header(&report, "upgrade"), Some("websocket"));
    assert_eq!(report["websocket_upgrade"]["usable"], true);

    ws.send(Message::text("echo me")).await.unwrap();
    let Some(Ok(Message::Text(echo))) = ws.next().await else { panic!("no echo") };
    assert_eq!(echo.as_str(), "echo me");
    // Nothing else until the hold is over, although the server's heartbeat is 100 ms:
    // this connection has none.
    match ws.next().await {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(frame.code, CloseCode::Normal);
            assert_eq!(frame.reason.as_str(), "hold over");
        }
        other => panic!("expected the close after the hold, got {other:?}"),
    }
    let held = started.elapsed();
    assert!(held >= Duration::from_millis(650) && held < Duration::from_secs(3), "{held:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_closes_held_connections_with_1001() {
    let server = TestServer::start(&[], None).await;
    let url = format!("ws://{}/api/diagnostics?hold_ms=600000", server.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    assert!(matches!(ws.next().await, Some(Ok(Message::Text(_)))));
    let shutdown = tokio::spawn(server.shutdown());
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Close(Some(frame))))) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected 1001, got {other:?}"),
    }
    drop(ws);
    tokio::time::timeout(Duration::from_secs(10), shutdown).await.unwrap().unwrap();
}
