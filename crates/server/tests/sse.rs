//! Server-Sent Events over real sockets on 127.0.0.1:0, read byte for byte as a browser's
//! EventSource would: headers, the welcome and ack events, `id:` cursors, resumption with
//! `Last-Event-ID` (header and query), the control endpoint and its auth, heartbeats, the
//! connection limit and the drain.

mod transports;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use transports::{TIMEOUT, TestServer, http, metric, read_chunk, read_head};

/// One event as EventSource would dispatch it (or a comment line, for heartbeats).
#[derive(Debug, Default, Clone)]
struct SseEvent {
    id: Option<String>,
    data: String,
    retry: Option<u64>,
    comment: bool,
}

impl SseEvent {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("{e}: {:?}", self.data))
    }
}

/// A raw-TCP EventSource: the response head, then events parsed out of the chunked body.
struct SseClient {
    reader: BufReader<TcpStream>,
    status: u16,
    headers: Vec<(String, String)>,
    text: String,
    ended: bool,
}

impl SseClient {
    async fn open(server: &TestServer, path: &str, headers: &[(&str, &str)]) -> SseClient {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n",
            server.addr
        );
        for (name, value) in headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut reader = BufReader::new(stream);
        let (status, headers) = read_head(&mut reader).await;
        SseClient { reader, status, headers, text: String::new(), ended: false }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The next event or comment; `None` once the stream has ended.
    async fn next_raw(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.text.find("\n\n") {
                let block: String = self.text.drain(..end + 2).collect();
                let mut event = SseEvent::default();
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(comment) = line.strip_prefix(':') {
                        event.comment = true;
                        event.data = comment.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push(v);
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        event.id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("retry: ") {
                        event.retry = Some(v.parse().unwrap());
                    }
                }
                if !event.comment {
                    event.data = data.join("\n");
                }
                return Some(event);
            }
            if self.ended {
                return None;
            }
            let chunked = self.header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
            let read = async {
                if chunked {
                    return read_chunk(&mut self.reader).await;
                }
                // A complete (refusal) body sent with Content-Length.
                let len: usize = self.header("content-length")?.parse().ok()?;
                let mut body = vec![0; len];
                self.reader.read_exact(&mut body).await.ok()?;
                self.headers.retain(|(n, _)| n != "content-length");
                (len > 0).then_some(body)
            };
            match tokio::time::timeout(TIMEOUT, read).await.expect("an event within 5 s") {
                Some(chunk) => self.text.push_str(std::str::from_utf8(&chunk).unwrap()),
                None => self.ended = true,
            }
        }
    }

    /// The next event, heartbeats skipped.
    async fn next(&mut self) -> SseEvent {
        loop {
            let event = self.next_raw().await.expect("stream ended");
            if !event.comment {
                return event;
            }
        }
    }

    async fn next_json(&mut self) -> Value {
        self.next().await.json()
    }

    /// Reads the welcome and the ack; returns (welcome, ack).
    async fn handshake(&mut self) -> (Value, Value) {
        assert_eq!(self.status, 200);
        let welcome = self.next_json().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        let ack = self.next_json().await;
        (welcome, ack)
    }
}

async fn control(server: &TestServer, body: Value) -> (u16, Value) {
    let r = http(server.addr, "POST", "/sse/control", &[], Some(body.to_string().as_bytes())).await;
    (r.status, r.json())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_sends_welcome_ack_and_messages_with_cursor_ids() {
    let server = TestServer::start(&[]).await;
    server.publish("chat.sse", json!({"n": 1})).await;
    server.publish("chat.sse", json!({"n": 2})).await;
    let mut es = SseClient::open(&server, "/sse?channels=chat.sse,bad%20name", &[]).await;
    assert_eq!(es.status, 200);
    assert_eq!(es.header("content-type"), Some("text/event-stream"));
    assert_eq!(es.header("cache-control"), Some("no-cache"));
    assert_eq!(es.header("x-accel-buffering"), Some("no"));
    assert_eq!(es.header("connection"), Some("keep-alive"));

    let (welcome, ack) = es.handshake().await;
    assert_eq!(welcome["version"], 1);
    assert_eq!(welcome["transport"], "sse");
    assert_eq!(welcome["ping_interval_ms"], 25_000);
    assert!(welcome["session"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(welcome["token"].as_str().is_some_and(|s| s.len() >= 32));
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["id"], Value::Null);
    let epoch = ack["result"]["chat.sse"]["epoch"].as_str().unwrap().to_owned();
    assert_eq!(ack["result"]["chat.sse"]["offset"], 2);
    assert_eq!(ack["result"]["bad name"]["error"]["code"], "invalid_channel");

    server.publish("chat.sse", json!({"n": 3})).await;
    let event = es.next().await;
    assert_eq!(event.id.as_deref(), Some(format!("chat.sse={epoch}:3").as_str()));
    assert_eq!(
        event.json(),
        json!({"type":"msg","channel":"chat.sse","offset":3,"epoch":epoch,"data":{"n":3}})
    );

    // Ephemeral messages carry no id: they are not a position to resume from.
    server.publish_ephemeral("chat.sse", json!({"forming": true})).await;
    let event = es.next().await;
    assert_eq!(event.id, None);
    assert_eq!(event.json()["ephemeral"], true);

    // A pretty-printed payload arrives as several data: lines that join back into JSON.
    let r = http(
        server.addr,
        "POST",
        "/api/publish",
        &[],
        Some(b"{\"channel\":\"chat.sse\",\"data\":{\n  \"multi\": [1,\r\n 2]\n}}"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let event = es.next().await;
    assert_eq!(event.json()["data"], json!({"multi": [1, 2]}));
    assert_eq!(event.id.as_deref(), Some(format!("chat.sse={epoch}:4").as_str()));

    let metrics = server.metrics().await;
    assert_eq!(metric(&metrics, "ferrocast_connections", "transport=\"sse\""), Some(1.0));
    assert!(metric(&metrics, "ferrocast_messages_out_total", "transport=\"sse\"").unwrap() >= 3.0);
    drop(es);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_resumes_every_channel_exactly_once() {
    let server = TestServer::start(&[]).await;
    let mut es = SseClient::open(&server, "/sse?channels=chat.r1", &[]).await;
    let (welcome, _) = es.handshake().await;
    // A second channel joins through the control endpoint: it is in the cursor too.
    let (status, reply) = control(
        &server,
        json!({"session": welcome["session"], "token": welcome["token"], "op": "subscribe",
               "id": 1, "channels": ["chat.r2"]}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    for i in 1..=3 {
        server.publish("chat.r1", json!(i)).await;
        server.publish("chat.r2", json!(i * 10)).await;
    }
    let mut last_id = String::new();
    for _ in 0..6 {
        last_id = es.next().await.id.unwrap();
    }
    let e1 = server.publish("chat.r1", json!(4)).await["epoch"].as_str().unwrap().to_owned();
    let e2 = server.publish("chat.r2", json!(40)).await["epoch"].as_str().unwrap().to_owned();
    // 4 and 40 reach the stream but are never read: the client's last id still says 3.
    assert_eq!(last_id, format!("chat.r1={e1}:3,chat.r2={e2}:3"));
    drop(es);

    server.publish("chat.r1", json!(5)).await;
    // Reconnect the way a browser does: same URL, Last-Event-ID header.
    let mut es =
        SseClient::open(&server, "/sse?channels=chat.r1", &[("Last-Event-ID", &last_id)]).await;
    let (_, ack) = es.handshake().await;
    assert_eq!(ack["result"]["chat.r1"]["recovered"], true, "{ack}");
    assert_eq!(ack["result"]["chat.r1"]["replayed"], 2);
    assert_eq!(ack["result"]["chat.r2"]["recovered"], true, "{ack}");
    assert_eq!(ack["result"]["chat.r2"]["replayed"], 1);
    let mut got: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let event = es.next().await;
        let msg = event.json();
        got.entry(msg["channel"].as_str().unwrap().to_owned())
            .or_default()
            .push(msg["data"].as_i64().unwrap());
        ids.push(event.id.unwrap());
    }
    assert_eq!(got["chat.r1"], vec![4, 5]);
    assert_eq!(got["chat.r2"], vec![40]);
    assert_eq!(ids.last().unwrap(), &format!("chat.r1={e1}:5,chat.r2={e2}:4"));
    server.publish("chat.r2", json!(50)).await;
    assert_eq!(es.next_json().await["data"], 50, "live messages follow the replay");
    drop(es);

    // The query form, without channels= at all: the cursor alone says what to resume.
    let path = format!("/sse?lastEventId={}", ids.last().unwrap().replace(',', "%2C"));
    let mut es = SseClient::open(&server, &path, &[]).await;
    let (_, ack) = es.handshake().await;
    assert_eq!(ack["result"]["chat.r1"]["replayed"], 0, "{ack}");
    assert_eq!(ack["result"]["chat.r2"]["replayed"], 1, "{ack}");
    assert_eq!(es.next_json().await["data"], 50);
    drop(es);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_endpoint_changes_a_live_stream_for_the_token_holder_only() {
    let server = TestServer::start(&[]).await;
    let mut es = SseClient::open(&server, "/sse", &[]).await;
    let (welcome, ack) = es.handshake().await;
    assert_eq!(ack["result"], json!({}));
    let (session, token) = (welcome["session"].clone(), welcome["token"].clone());

    let (status, reply) =
        control(&server, json!({"session": session, "token": "nope", "op": "ping", "id": 1})).await;
    assert_eq!((status, reply["code"].as_str()), (403, Some("forbidden")));
    let (status, reply) =
        control(&server, json!({"session": "nosuch", "token": token, "op": "ping"})).await;
    assert_eq!((status, reply["code"].as_str()), (404, Some("unknown_session")));

    let (status, reply) =
        control(&server, json!({"session": session, "token": token, "op": "ping", "id": 7})).await;
    assert_eq!((status, reply), (200, json!({"type": "pong", "id": 7})));

    server.publish("chat.ctl", json!("before")).await;
    let (status, reply) = control(
        &server,
        json!({"session": session, "token": token, "op": "subscribe", "id": 2,
               "channels": ["chat.ctl"], "recover": {}}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(reply["type"], "ack");
    assert_eq!(reply["id"], 2);
    assert_eq!(reply["result"]["chat.ctl"]["offset"], 1);

    let (status, reply) = control(
        &server,
        json!({"session": session, "token": token, "op": "publish", "id": 3,
               "channel": "chat.ctl", "data": {"from": "control"}}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(reply["result"]["offset"], 2, "{reply}");
    let event = es.next().await;
    assert_eq!(event.json()["data"], json!({"from": "control"}));
    assert!(event.id.unwrap().starts_with("chat.ctl="));

    let (status, reply) = control(
        &server,
        json!({"session": session, "token": token, "op": "publish", "id": 4,
               "channel": "ticks.NOPE", "data": 1}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("forbidden"))
    );
    assert_eq!(reply["id"], 4);

    let (status, reply) =
        control(&server, json!({"session": session, "token": token, "op": "dance", "id": 5})).await;
    assert_eq!((status, reply["code"].as_str()), (400, Some("unknown_op")));

    let (status, reply) = control(
        &server,
        json!({"session": session, "token": token, "op": "unsubscribe", "id": 6,
               "channels": ["chat.ctl"]}),
    )
    .await;
    assert_eq!((status, reply), (200, json!({"type": "ack", "id": 6})));
    server.publish("chat.ctl", json!("after")).await;
    // Subscribed again under another name to prove the stream is alive but chat.ctl is gone.
    control(
        &server,
        json!({"session": session, "token": token, "op": "subscribe", "channels": ["chat.other"]}),
    )
    .await;
    server.publish("chat.other", json!("other")).await;
    let event = es.next().await;
    assert_eq!(event.json()["channel"], "chat.other");
    let id = event.id.unwrap();
    assert!(!id.contains("chat.ctl"), "an unsubscribed channel leaves the cursor: {id}");

    let big = "x".repeat(70_000);
    let (status, _) =
        control(&server, json!({"session": session, "token": token, "op": "ping", "pad": big}))
            .await;
    assert_eq!(status, 413);
    drop(es);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_stream_gets_heartbeat_comments() {
    let server = TestServer::start(&["server.ping_interval_ms=150"]).await;
    let mut es = SseClient::open(&server, "/sse?channels=chat.hb", &[]).await;
    es.handshake().await;
    for _ in 0..2 {
        let event = es.next_raw().await.unwrap();
        assert!(event.comment, "{event:?}");
        assert_eq!(event.data, "ping");
    }
    drop(es);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_ends_the_stream_with_a_close_event_and_retry() {
    let mut server = TestServer::start(&["server.reconnect_after_ms=500"]).await;
    let mut es = SseClient::open(&server, "/sse?channels=chat.drain", &[]).await;
    es.handshake().await;
    server.begin_shutdown();
    let event = es.next().await;
    let retry = event.retry.expect("a retry: line");
    assert!((500..=1000).contains(&retry), "{retry}");
    let close = event.json();
    assert_eq!(close["type"], "close");
    assert_eq!(close["code"], 1001);
    let hint: Value = serde_json::from_str(close["reason"].as_str().unwrap()).unwrap();
    assert_eq!(hint, json!({"reconnect": true, "after_ms": retry}));
    assert!(es.next_raw().await.is_none(), "the stream ends after the close event");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_count_toward_the_connection_limit() {
    let server =
        TestServer::start(&["server.max_connections=1", "server.ping_interval_ms=100"]).await;
    let mut first = SseClient::open(&server, "/sse?channels=chat.lim", &[]).await;
    first.handshake().await;
    let mut second = SseClient::open(&server, "/sse?channels=chat.lim", &[]).await;
    assert_eq!(second.status, 200);
    let event = second.next().await;
    assert!(event.retry.is_some());
    assert_eq!(event.json()["code"], 1013);
    assert!(second.next_raw().await.is_none());
    drop(first);
    drop(second);
    // A client that left is noticed at the next write (here a heartbeat); then a new stream
    // is admitted. Its TCP connection leaves the count when hyper has closed it, which may
    // be a moment after the stream's own metric: until then a new stream still gets 1013.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut third = loop {
        assert!(tokio::time::Instant::now() < deadline, "no stream admitted after the first left");
        let mut client = SseClient::open(&server, "/sse?channels=chat.lim", &[]).await;
        assert_eq!(client.status, 200);
        let event = client.next_json().await;
        if event["type"] == "welcome" {
            break client;
        }
        assert_eq!(event["code"], 1013, "{event}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(third.next_json().await["type"], "ack");
    assert_eq!(
        metric(&server.metrics().await, "ferrocast_connections", "transport=\"sse\""),
        Some(1.0)
    );
    drop(third);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_origin_requests_follow_the_allowlist() {
    let server = TestServer::start(&["server.allowed_origins=[\"https://app.example.com\"]"]).await;
    let es = SseClient::open(&server, "/sse", &[("Origin", "https://evil.example.com")]).await;
    assert_eq!(es.status, 403);
    let mut es = SseClient::open(&server, "/sse", &[("Origin", "https://app.example.com")]).await;
    assert_eq!(es.header("access-control-allow-origin"), Some("https://app.example.com"));
    es.handshake().await;
    let preflight = http(
        server.addr,
        "OPTIONS",
        "/sse/control",
        &[
            ("Origin", "https://app.example.com"),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "content-type"),
        ],
        None,
    )
    .await;
    assert_eq!(preflight.status, 204);
    assert_eq!(preflight.header("access-control-allow-origin"), Some("https://app.example.com"));
    assert!(preflight.header("access-control-allow-methods").unwrap().contains("POST"));
    drop(es);
    server.shutdown().await;
}
