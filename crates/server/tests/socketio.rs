//! Socket.IO over real sockets on 127.0.0.1:0, spoken at the Engine.IO v4 / Socket.IO v5
//! packet level (HTTP long-polling with raw TCP, websocket with tungstenite), so the wire
//! format itself is under test: handshake settings from our config, subscribe acks before
//! replays, `message` and per-namespace events, publish permissions, requests handled in
//! order, the admission rules, the drain, and the 404 when Socket.IO is off.

mod transports;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use transports::{TIMEOUT, TestServer, http, metric};

/// Engine.IO v4 separates packets of one polling payload with the record separator.
const SEPARATOR: char = '\u{1e}';

/// A Socket.IO client over HTTP long-polling.
struct Polling {
    addr: SocketAddr,
    sid: String,
    handshake: Value,
}

impl Polling {
    /// Opens the Engine.IO session and joins the main namespace.
    async fn connect(server: &TestServer) -> Polling {
        let r = http(server.addr, "GET", "/socket.io/?EIO=4&transport=polling", &[], None).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let text = r.text();
        let open = text.strip_prefix('0').unwrap_or_else(|| panic!("not an open packet: {text}"));
        let handshake: Value = serde_json::from_str(open).unwrap();
        let sid = handshake["sid"].as_str().unwrap().to_owned();
        let client = Polling { addr: server.addr, sid, handshake };
        client.post("40").await;
        // The namespace's connect packet (a heartbeat ping may come first).
        loop {
            let packets = client.poll().await;
            if packets.iter().any(|p| p.starts_with("40{")) {
                break;
            }
            assert!(packets.iter().all(|p| p == "2"), "{packets:?}");
            client.post("3").await;
        }
        client
    }

    fn path(&self) -> String {
        format!("/socket.io/?EIO=4&transport=polling&sid={}", self.sid)
    }

    async fn post(&self, payload: &str) {
        let r = http(self.addr, "POST", &self.path(), &[], Some(payload.as_bytes())).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }

    /// One long-poll: the packets the server had (or the next ones it sends).
    async fn poll(&self) -> Vec<String> {
        let r = http(self.addr, "GET", &self.path(), &[], None).await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.text().split(SEPARATOR).map(str::to_owned).collect()
    }

    /// Polls until `n` event/ack packets (Socket.IO types 2 and 3) have arrived, answering pings.
    async fn packets(&self, n: usize) -> Vec<Value> {
        let mut out = Vec::new();
        while out.len() < n {
            for packet in self.poll().await {
                if packet == "2" {
                    self.post("3").await;
                } else if let Some(p) = parse_packet(&packet) {
                    out.push(p);
                }
            }
        }
        out
    }
}

/// Parses a Socket.IO EVENT (`42[...]`) or ACK (`43N[...]`) carried in an Engine.IO message
/// into `{"kind": "event"|"ack", "id": N, "args": [...]}`.
fn parse_packet(packet: &str) -> Option<Value> {
    let body = packet.strip_prefix('4')?;
    let (kind, rest) = match body.chars().next()? {
        '2' => ("event", &body[1..]),
        '3' => ("ack", &body[1..]),
        '4' => ("connect_error", &body[1..]),
        _ => return None,
    };
    let split = rest.find(['[', '{']).unwrap_or(rest.len());
    let id: Option<u64> = rest[..split].parse().ok();
    let args: Value = serde_json::from_str(&rest[split..]).ok()?;
    Some(json!({"kind": kind, "id": id, "args": args}))
}

fn event(name: &str, args: &Value) -> Value {
    json!({"kind": "event", "id": null, "args": [name, args]})
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A Socket.IO client over the websocket transport (no polling first).
async fn ws_connect(server: &TestServer) -> Ws {
    let url = format!("ws://{}/socket.io/?EIO=4&transport=websocket", server.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let open = ws_text(&mut ws).await;
    assert!(open.starts_with("0{"), "{open}");
    ws.send(Message::Text("40".into())).await.unwrap();
    let connected = ws_text(&mut ws).await;
    assert!(connected.starts_with("40{"), "{connected}");
    ws
}

async fn ws_text(ws: &mut Ws) -> String {
    loop {
        let msg = tokio::time::timeout(TIMEOUT, ws.next())
            .await
            .expect("a packet within 5 s")
            .expect("websocket open")
            .unwrap();
        match msg {
            Message::Text(t) if t.as_str() == "2" => {
                ws.send(Message::Text("3".into())).await.unwrap();
            }
            Message::Text(t) => return t.as_str().to_owned(),
            Message::Close(c) => panic!("websocket closed: {c:?}"),
            _ => {}
        }
    }
}

async fn ws_packet(ws: &mut Ws) -> Value {
    let text = ws_text(ws).await;
    parse_packet(&text).unwrap_or_else(|| panic!("not an event or ack: {text}"))
}

async fn ws_emit(ws: &mut Ws, ack_id: Option<u64>, name: &str, args: Value) {
    let id = ack_id.map(|i| i.to_string()).unwrap_or_default();
    let text = format!("42{id}{}", json!([name, args]));
    ws.send(Message::Text(text.into())).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_handshake_follows_config_and_delivers_messages() {
    let server = TestServer::start(&[
        "server.ping_interval_ms=20000",
        "server.pong_timeout_ms=5000",
        "server.max_frame_bytes=32768",
        "namespaces.prices.socketio_event=price_update",
    ])
    .await;
    let client = Polling::connect(&server).await;
    assert_eq!(client.handshake["pingInterval"], 20000);
    assert_eq!(client.handshake["pingTimeout"], 5000);
    assert_eq!(client.handshake["maxPayload"], 32768);
    assert_eq!(client.handshake["upgrades"], json!(["websocket"]));

    server.publish("prices.AAPL", json!({"p": 1})).await;
    client.post(r#"421["subscribe",["prices.AAPL","chat.poll"]]"#).await;
    let ack = &client.packets(1).await[0];
    assert_eq!(ack["kind"], "ack");
    assert_eq!(ack["id"], 1);
    let result = &ack["args"][0];
    assert_eq!(result["prices.AAPL"]["offset"], 1, "{result}");
    assert_eq!(result["chat.poll"]["offset"], 0);
    let epoch = result["prices.AAPL"]["epoch"].as_str().unwrap().to_owned();

    server.publish("prices.AAPL", json!({"p": 2})).await;
    let packets = client.packets(2).await;
    assert_eq!(
        packets[0],
        event("message", &json!({"channel":"prices.AAPL","offset":2,"epoch":epoch,"data":{"p":2}}))
    );
    assert_eq!(packets[1], event("price_update", &json!({"p": 2})));

    // chat allows client publishing; ticks does not.
    client.post(r#"422["publish",{"channel":"chat.poll","data":{"text":"hi"}}]"#).await;
    client.post(r#"423["publish",{"channel":"ticks.X","data":1}]"#).await;
    let packets = client.packets(3).await;
    let ack2 = packets.iter().find(|p| p["id"] == 2).unwrap();
    assert_eq!(ack2["args"][0]["offset"], 1, "{ack2}");
    assert_eq!(ack2["args"][0]["channel"], "chat.poll");
    let ack3 = packets.iter().find(|p| p["id"] == 3).unwrap();
    assert_eq!(ack3["args"][0]["error"]["code"], "forbidden", "{ack3}");
    let msg = packets.iter().find(|p| p["kind"] == "event").unwrap();
    assert_eq!(msg["args"][1]["data"], json!({"text": "hi"}));

    let metrics = server.metrics().await;
    assert_eq!(metric(&metrics, "ferrocast_connections", "transport=\"socketio\""), Some(1.0));
    assert!(
        metric(&metrics, "ferrocast_messages_out_total", "transport=\"socketio\"").unwrap() >= 2.0
    );
    // A clean disconnect leaves the namespace and closes the session.
    client.post("41").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let metrics = server.metrics().await;
    assert_eq!(metric(&metrics, "ferrocast_connections", "transport=\"socketio\""), Some(0.0));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_recovery_acks_before_the_replay_and_keeps_request_order() {
    let server = TestServer::start(&[]).await;
    let mut first = None;
    for i in 1..=5 {
        let p = server.publish("chat.ws", json!(i)).await;
        first.get_or_insert(p);
    }
    let epoch = first.unwrap()["epoch"].as_str().unwrap().to_owned();
    let mut ws = ws_connect(&server).await;
    ws_emit(
        &mut ws,
        Some(1),
        "subscribe",
        json!({"channels": ["chat.ws"], "recover": {"chat.ws": {"epoch": epoch, "offset": 2}}}),
    )
    .await;
    let ack = ws_packet(&mut ws).await;
    assert_eq!(ack["kind"], "ack", "the ack comes before the replay: {ack}");
    assert_eq!(ack["args"][0]["chat.ws"]["recovered"], true);
    assert_eq!(ack["args"][0]["chat.ws"]["replayed"], 3);
    for offset in 3..=5 {
        let msg = ws_packet(&mut ws).await;
        assert_eq!(msg["args"][0], "message");
        assert_eq!(msg["args"][1]["offset"], offset);
        assert_eq!(msg["args"][1]["data"], offset);
    }

    // Back-to-back requests are carried out in the order sent.
    ws_emit(&mut ws, Some(2), "unsubscribe", json!("chat.ws")).await;
    ws_emit(&mut ws, Some(3), "subscribe", json!("chat.ws")).await;
    ws_emit(&mut ws, Some(4), "unsubscribe", json!(["chat.ws"])).await;
    ws_emit(&mut ws, Some(5), "subscribe", json!("chat.ws")).await;
    let mut acks = Vec::new();
    for _ in 0..4 {
        let p = ws_packet(&mut ws).await;
        assert_eq!(p["kind"], "ack", "{p}");
        acks.push(p["id"].as_u64().unwrap());
    }
    assert_eq!(acks, vec![2, 3, 4, 5]);
    server.publish("chat.ws", json!(6)).await;
    let msg = ws_packet(&mut ws).await;
    assert_eq!(msg["args"][1]["offset"], 6, "still subscribed after the last request");

    // A bad request is answered, and the socket stays usable.
    ws_emit(&mut ws, Some(6), "subscribe", json!(42)).await;
    let bad = ws_packet(&mut ws).await;
    assert_eq!(bad["args"][0]["error"]["code"], "bad_request", "{bad}");
    ws_emit(&mut ws, Some(7), "ping", json!({"t": 1})).await;
    let mut got = [ws_packet(&mut ws).await, ws_packet(&mut ws).await];
    got.sort_by_key(|p| p["kind"].as_str().unwrap().to_owned());
    assert_eq!(got[0], json!({"kind": "ack", "id": 7, "args": [{"t": 1}]}));
    assert_eq!(got[1], event("pong", &json!({"t": 1})));
    ws.close(None).await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_tells_sockets_to_reconnect_and_closes_the_transport() {
    let mut server = TestServer::start(&["server.reconnect_after_ms=300"]).await;
    let mut ws = ws_connect(&server).await;
    ws_emit(&mut ws, Some(1), "subscribe", json!("chat.drain")).await;
    ws_packet(&mut ws).await;
    server.begin_shutdown();
    let close = ws_packet(&mut ws).await;
    assert_eq!(close["args"][0], "close", "{close}");
    assert_eq!(close["args"][1]["code"], 1001);
    let hint: Value = serde_json::from_str(close["args"][1]["reason"].as_str().unwrap()).unwrap();
    assert_eq!(hint["reconnect"], true);
    // Then the transport is dropped: no Engine.IO close packet (`1`) and no namespace
    // disconnect (`41`), either of which would stop clients from reconnecting.
    let end = tokio::time::timeout(TIMEOUT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    assert!(!["1", "41"].contains(&t.as_str()), "a deliberate close: {t}")
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return "socket closed",
                _ => {}
            }
        }
    })
    .await
    .expect("transport closed within 5 s");
    assert_eq!(end, "socket closed");
    server.shutdown().await;
}

/// The drain `close` event among polled packets (answering pings on the way).
async fn poll_drain_close(client: &Polling) -> Value {
    for packet in client.packets(1).await {
        if packet["args"][0] == "close" {
            return packet["args"][1].clone();
        }
    }
    panic!("no close event in the first packet after the drain")
}

/// A polling client is not on a timer: one that comes for its packets late (here 600 ms
/// after the drain began, later than the websocket transports are cut) still gets its
/// `close` event; its next poll is then refused at once (a transport error, so it reconnects
/// elsewhere), and the drain ends once every client has had its `close`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_late_polling_clients_to_take_their_close_event() {
    // Half the grace (10 s) is how long the drain would wait for a client that never polls.
    let mut server =
        TestServer::start(&["server.reconnect_after_ms=300", "server.shutdown_grace_ms=20000"])
            .await;
    let late = Polling::connect(&server).await;
    let later = Polling::connect(&server).await;
    for client in [&late, &later] {
        client.post(r#"421["subscribe","chat.late"]"#).await;
        assert_eq!(client.packets(1).await[0]["kind"], "ack");
    }
    server.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let close = poll_drain_close(&late).await;
    assert_eq!(close["code"], 1001, "{close}");
    let hint: Value = serde_json::from_str(close["reason"].as_str().unwrap()).unwrap();
    assert_eq!(hint["reconnect"], true);
    // While `later` keeps the server up, `late`'s next poll is refused within TIMEOUT (5 s),
    // not held for the 10 s the drain would wait for a session not told yet.
    let r = http(server.addr, "GET", &late.path(), &[], None).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(poll_drain_close(&later).await["code"], 1001);
    server.shutdown().await;
}

/// A long-poll is sent again the moment the previous one is answered, on the same keep-alive
/// connection. One that is on its way when the drain begins is answered, with its `close`
/// event and `Connection: close`, not cut off with the idle connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_on_a_keep_alive_connection_gets_the_drain_close() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};

    /// One answer on the kept-alive connection: status, headers and body.
    async fn read_answer(conn: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>, String) {
        let (status, headers) = transports::read_head(conn).await;
        let length = headers.iter().find(|(n, _)| n == "content-length").expect("a length");
        let mut body = vec![0; length.1.parse().unwrap()];
        conn.read_exact(&mut body).await.unwrap();
        (status, headers, String::from_utf8(body).unwrap())
    }

    let mut server = TestServer::start(&["server.reconnect_after_ms=300"]).await;
    let client = Polling::connect(&server).await;
    client.post(r#"421["subscribe","chat.keepalive"]"#).await;
    assert_eq!(client.packets(1).await[0]["kind"], "ack");
    let get = format!("GET {} HTTP/1.1\r\nHost: {}\r\n\r\n", client.path(), server.addr);
    let mut conn = BufReader::new(TcpStream::connect(server.addr).await.unwrap());
    // One long-poll answered on the connection, which then stays open, idle.
    conn.get_mut().write_all(get.as_bytes()).await.unwrap();
    server.publish("chat.keepalive", json!({"n": 1})).await;
    let (status, headers, body) = read_answer(&mut conn).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""data":{"n":1}"#), "{body}");
    assert!(!headers.iter().any(|(n, v)| n == "connection" && v == "close"), "{headers:?}");
    server.begin_shutdown();
    // The drain has begun (readiness says so), and only now does the next poll go out.
    for _ in 0..100 {
        if http(server.addr, "GET", "/readyz", &[], None).await.status == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    conn.get_mut().write_all(get.as_bytes()).await.unwrap();
    let (status, headers, body) = read_answer(&mut conn).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#"42["close",{"code":1001,"#), "{body}");
    assert!(headers.iter().any(|(n, v)| n == "connection" && v == "close"), "{headers:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_count_toward_the_connection_limit() {
    let server = TestServer::start(&["server.max_connections=1"]).await;
    let mut ws = ws_connect(&server).await;
    let url = format!("ws://{}/socket.io/?EIO=4&transport=websocket", server.addr);
    let (mut second, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert!(ws_text(&mut second).await.starts_with('0'));
    second.send(Message::Text("40".into())).await.unwrap();
    let refused = parse_packet(&ws_text(&mut second).await).unwrap();
    assert_eq!(refused["kind"], "connect_error");
    assert!(refused["args"]["message"].as_str().unwrap().contains("1013"), "{refused}");
    ws_emit(&mut ws, Some(1), "subscribe", json!("chat.limit")).await;
    assert_eq!(ws_packet(&mut ws).await["kind"], "ack");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_socketio_answers_404_with_a_pointer() {
    let server = TestServer::start(&["socketio.enabled=false"]).await;
    let r = http(server.addr, "GET", "/socket.io/?EIO=4&transport=polling", &[], None).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "socketio_disabled");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_path_and_websocket_only() {
    let server = TestServer::start(&["socketio.path=/rt", "socketio.transports=websocket"]).await;
    let r = http(server.addr, "GET", "/rt/?EIO=4&transport=polling", &[], None).await;
    assert_eq!(r.status, 400, "polling is not offered: {}", r.text());
    let url = format!("ws://{}/rt/?EIO=4&transport=websocket", server.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let open = ws_text(&mut ws).await;
    let handshake: Value = serde_json::from_str(&open[1..]).unwrap();
    assert_eq!(handshake["upgrades"], json!([]));
    server.shutdown().await;
}
