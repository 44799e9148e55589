//! Exercises `ferrocast-client` over real sockets against a scripted in-process mock server:
//! welcome handling, ack correlation with buffered messages, batches, heartbeats, close codes,
//! and the HTTP API client.

use std::future::Future;
use std::time::Duration;

use ferrocast_client::{Client, ConnectOptions, Error, Event, HttpClient};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

type Ws = WebSocketStream<TcpStream>;

const WELCOME: &str = r#"{"type":"welcome","session":"s-1","version":1,"ping_interval_ms":500}"#;

/// Starts a one-connection WebSocket server running `script`; returns its URL.
async fn mock<F, Fut>(script: F) -> String
where
    F: FnOnce(Ws) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        script(ws).await;
    });
    format!("ws://{addr}/ws")
}

async fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.into())).await.unwrap();
}

/// The next text frame from the client, parsed.
async fn recv(ws: &mut Ws) -> Value {
    loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Close(_) => panic!("client closed"),
            _ => continue,
        }
    }
}

async fn close(ws: &mut Ws, code: u16, reason: &str) {
    ws.send(Message::Close(Some(CloseFrame { code: code.into(), reason: reason.into() })))
        .await
        .unwrap();
    // Wait for the client's close reply so the close frame is not lost to a reset.
    while let Some(Ok(_)) = ws.next().await {}
}

fn offset(event: Option<Event>) -> u64 {
    match event {
        Some(Event::Msg(m)) => m.offset,
        other => panic!("expected a message, got {other:?}"),
    }
}

#[tokio::test]
async fn messages_arriving_before_the_ack_are_buffered_in_order() {
    let url = mock(|mut ws| async move {
        send(&mut ws, WELCOME).await;
        let op = recv(&mut ws).await;
        assert_eq!(op["op"], "subscribe");
        assert_eq!(op["channels"], json!(["a", "b"]));
        let id = op["id"].as_u64().unwrap();
        // A live message slips in before the ack, then the ack and a batch in one frame each.
        send(&mut ws, r#"{"type":"msg","channel":"a","offset":1,"data":{"n":1}}"#).await;
        let ack = json!({"type":"ack","id":id,"result":{
            "a":{"epoch":"e","offset":0,"recovered":false},
            "b":{"error":{"code":"forbidden","message":"no"}}}});
        send(&mut ws, &ack.to_string()).await;
        send(
            &mut ws,
            r#"[{"type":"msg","channel":"a","offset":2,"data":2},{"type":"msg","channel":"a","offset":3,"data":3}]"#,
        )
        .await;
        close(&mut ws, 1000, "").await;
    })
    .await;

    let mut client = Client::connect(&url).await.unwrap();
    assert_eq!(client.session(), "s-1");
    assert_eq!(client.ping_interval_ms(), 500);
    let ack = client.subscribe(&["a", "b"]).await.unwrap();
    assert_eq!(ack.get("a").unwrap().epoch, "e");
    assert_eq!(ack.error("b").unwrap().code, "forbidden");

    assert_eq!(offset(client.next_event().await), 1);
    let m = client.next_message().await.unwrap();
    assert_eq!((m.offset, m.data.get()), (2, "2"));
    assert_eq!(offset(client.next_event().await), 3);
    match client.next_event().await {
        Some(Event::Closed(info)) => assert_eq!(info.code, 1000),
        other => panic!("{other:?}"),
    }
    assert!(client.next_event().await.is_none());
    assert_eq!(client.close_info().unwrap().code, 1000);
}

#[tokio::test]
async fn publish_ping_and_request_errors() {
    let url = mock(|mut ws| async move {
        send(&mut ws, WELCOME).await;
        let publish = recv(&mut ws).await;
        assert_eq!(publish["data"], json!({"x": 1}));
        let id = &publish["id"];
        let reply = json!({"type":"ack","id":id,"result":{"channel":"chat.lobby","offset":42,"epoch":"e7"}});
        send(&mut ws, &reply.to_string()).await;

        let forbidden = recv(&mut ws).await;
        let reply = json!({"type":"error","id":forbidden["id"],"code":"forbidden","message":"read-only"});
        send(&mut ws, &reply.to_string()).await;

        let ping = recv(&mut ws).await;
        assert_eq!(ping["op"], "ping");
        // A stale pong for another id must not satisfy this ping.
        send(&mut ws, r#"{"type":"pong","id":999}"#).await;
        send(&mut ws, &json!({"type":"pong","id":ping["id"]}).to_string()).await;

        let raw = recv(&mut ws).await;
        assert_eq!(raw, json!({"op": "bogus"}));
        send(&mut ws, r#"{"type":"error","id":null,"code":"bad_request","message":"unknown op"}"#).await;
        close(&mut ws, 1000, "").await;
    })
    .await;

    let mut client = Client::connect(&url).await.unwrap();
    let ack = client.publish("chat.lobby", json!({"x": 1})).await.unwrap();
    assert_eq!((ack.offset, ack.epoch.as_deref()), (42, Some("e7")));
    let err = client.publish("ticks.AAPL", json!(1)).await.unwrap_err();
    assert_eq!(err.server_code(), Some("forbidden"));
    assert!(client.ping().await.unwrap() < Duration::from_secs(5));
    client.send_raw(r#"{"op":"bogus"}"#).await.unwrap();
    match client.next_event().await {
        Some(Event::Error(e)) => assert_eq!((e.id, e.code.as_str()), (None, "bad_request")),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn server_pings_are_answered_automatically() {
    let url = mock(|mut ws| async move {
        send(&mut ws, WELCOME).await;
        send(&mut ws, r#"{"type":"ping"}"#).await;
        assert_eq!(recv(&mut ws).await, json!({"op": "pong"}));
        close(&mut ws, 1001, r#"{"reconnect":true,"after_ms":1200}"#).await;
    })
    .await;
    let mut client = Client::connect(&url).await.unwrap();
    assert!(matches!(client.next_event().await, Some(Event::Ping)));
    let info = client.wait_closed().await;
    assert_eq!(info.code, 1001);
    assert!(info.reason.contains("after_ms"));
}

#[tokio::test]
async fn heartbeat_timeout_close_code_is_reported_when_auto_pong_is_off() {
    let url = mock(|mut ws| async move {
        send(&mut ws, WELCOME).await;
        send(&mut ws, r#"{"type":"ping"}"#).await;
        // No pong may arrive: the next thing the client sends would be a bug.
        let waited = tokio::time::timeout(Duration::from_millis(300), ws.next()).await;
        assert!(waited.is_err(), "client answered: {waited:?}");
        close(&mut ws, 4009, "heartbeat timeout").await;
    })
    .await;
    let opts = ConnectOptions::default().auto_pong(false);
    let mut client = Client::connect_with(&url, opts).await.unwrap();
    let info = client.wait_closed().await;
    assert_eq!((info.code, info.reason.as_str()), (4009, "heartbeat timeout"));
    // Requests after the close fail with the same close info.
    let err = client.subscribe(&["a"]).await.unwrap_err();
    assert_eq!(err.close_code(), Some(4009));
}

#[tokio::test]
async fn close_before_welcome_is_a_connect_error_with_the_code() {
    let url = mock(|mut ws| async move {
        close(&mut ws, 1013, "connection limit reached").await;
    })
    .await;
    let err = Client::connect(&url).await.unwrap_err();
    assert_eq!(err.close_code(), Some(1013), "{err}");
}

#[tokio::test]
// The handshake callback's error type is tungstenite's, large by design.
#[allow(clippy::result_large_err)]
async fn origin_and_headers_are_sent() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut seen = None;
        let callback = |req: &tokio_tungstenite::tungstenite::handshake::server::Request, resp| {
            seen = Some((
                req.headers()["origin"].to_str().unwrap().to_owned(),
                req.headers()["authorization"].to_str().unwrap().to_owned(),
            ));
            Ok(resp)
        };
        let mut ws = tokio_tungstenite::accept_hdr_async(stream, callback).await.unwrap();
        send(&mut ws, WELCOME).await;
        close(&mut ws, 1008, "origin not allowed").await;
        seen.unwrap()
    });
    let opts = ConnectOptions::default()
        .origin("https://app.example")
        .header("Authorization", "Bearer t0k");
    let mut client = Client::connect_with(&url, opts).await.unwrap();
    assert_eq!(client.wait_closed().await.code, 1008);
    let (origin, auth) = server.await.unwrap();
    assert_eq!((origin.as_str(), auth.as_str()), ("https://app.example", "Bearer t0k"));
}

#[tokio::test]
async fn rejected_upgrade_reports_the_http_status() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 2048];
        let _ = stream.read(&mut buf).await;
        let body = "origin not allowed";
        let response =
            format!("HTTP/1.1 403 Forbidden\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        stream.write_all(response.as_bytes()).await.unwrap();
    });
    match Client::connect(&url).await.unwrap_err() {
        Error::Rejected { status, body } => {
            assert_eq!(status, 403);
            assert_eq!(body, "origin not allowed");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn http_publish_reuses_one_keep_alive_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        // Exactly one connection serves both requests.
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut requests = Vec::new();
        for offset in [5, 6] {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read until the head and the whole body (Content-Length) are in.
            loop {
                let n = stream.read(&mut chunk).await.unwrap();
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).into_owned();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .unwrap()
                        .parse()
                        .unwrap();
                    if body.len() >= len {
                        requests.push(text);
                        break;
                    }
                }
            }
            let body =
                format!(r#"{{"results":[{{"channel":"c","offset":{offset},"epoch":"e"}}]}}"#);
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(response.as_bytes()).await.unwrap();
        }
        requests
    });
    let mut http = HttpClient::new(&base).unwrap().with_api_key("secret");
    assert_eq!(http.publish("c", json!({"a": 1})).await.unwrap().offset, 5);
    assert_eq!(http.publish("c", "two").await.unwrap().offset, 6);
    let requests = server.await.unwrap();
    assert!(requests[0].starts_with("POST /api/publish HTTP/1.1\r\n"));
    assert!(requests[0].contains("Authorization: Bearer secret\r\n"));
    assert!(requests[0].ends_with(r#"{"channel":"c","data":{"a":1}}"#));
    assert!(requests[1].ends_with(r#"{"channel":"c","data":"two"}"#));
}

#[tokio::test]
async fn lean_conn_reads_batches_fragments_pings_and_close() {
    use ferrocast_client::{LeanConn, LeanFrame};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

    let url = mock(|mut ws| async move {
        send(&mut ws, WELCOME).await;
        // Several frames back to back, so one read sees them all.
        send(&mut ws, r#"{"type":"msg","channel":"a","offset":1,"data":1}"#).await;
        let big = format!(
            r#"{{"type":"msg","channel":"a","offset":2,"data":"{}"}}"#,
            "x".repeat(100_000)
        );
        send(&mut ws, &big).await;
        // A fragmented text message.
        for (part, fin) in
            [(r#"{"type":"msg","#, false), (r#""channel":"a","offset":3,"data":3}"#, true)]
        {
            let op = if part.starts_with('{') {
                OpCode::Data(Data::Text)
            } else {
                OpCode::Data(Data::Continue)
            };
            ws.send(Message::Frame(Frame::message(part.as_bytes().to_vec(), op, fin)))
                .await
                .unwrap();
        }
        // A WebSocket-level ping must be answered with a pong carrying its payload.
        ws.send(Message::Ping(b"hb".to_vec().into())).await.unwrap();
        match ws.next().await.unwrap().unwrap() {
            Message::Pong(p) => assert_eq!(&p[..], b"hb"),
            other => panic!("{other:?}"),
        }
        // Text sent by the lean client arrives intact (it is masked on the wire).
        assert_eq!(recv(&mut ws).await, json!({"op": "pong"}));
        close(&mut ws, 4008, "slow consumer").await;
    })
    .await;

    let opts = ConnectOptions { read_buffer_size: 1024, ..ConnectOptions::default() };
    let (mut conn, welcome) = LeanConn::connect(&url, &opts).await.unwrap();
    assert_eq!(welcome.session, "s-1");
    let mut texts: Vec<String> = Vec::new();
    let mut close_code = None;
    while texts.len() < 3 {
        conn.read_batch(|frame| match frame {
            LeanFrame::Text(t) => texts.push(String::from_utf8(t.to_vec()).unwrap()),
            other => panic!("{other:?}"),
        })
        .await
        .unwrap();
    }
    assert!(texts[0].contains(r#""offset":1"#));
    let envelope = r#"{"type":"msg","channel":"a","offset":2,"data":""}"#;
    assert_eq!(texts[1].len(), envelope.len() + 100_000);
    assert_eq!(texts[2], r#"{"type":"msg","channel":"a","offset":3,"data":3}"#);
    conn.send_text(r#"{"op":"pong"}"#).await.unwrap();
    let err = loop {
        let result = conn
            .read_batch(|frame| {
                if let LeanFrame::Close(info) = frame {
                    close_code = Some(info.code);
                }
            })
            .await;
        if let Err(e) = result {
            break e;
        }
    };
    assert_eq!(err.close_code(), Some(4008));
    assert_eq!(close_code, Some(4008));
    assert_eq!(conn.close_info().unwrap().reason, "slow consumer");
}
