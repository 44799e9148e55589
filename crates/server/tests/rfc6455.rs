//! RFC 6455 conformance of the native WebSocket endpoint, byte for byte: a raw TCP client on
//! 127.0.0.1 does the handshake by hand, sends masked frames built here, and checks the exact
//! close frame the server answers with and that the server then closes TCP.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod transports;
use transports::{TestServer, http, metric};

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Test timeout for "the server closes TCP": generous, and still below the 2 s a normal close
/// lingers for, so a server that waited out the linger would fail.
const CLOSE_BOUND: Duration = Duration::from_millis(1500);

/// A client speaking raw frames.
struct Raw {
    stream: TcpStream,
    /// Bytes read but not yet consumed as frames.
    buf: Vec<u8>,
}

/// A frame from the server.
#[derive(Debug)]
struct Frame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
}

/// A masked client frame; `first` is the whole first byte (FIN, RSV bits, opcode).
fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![first];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 65535 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    masked(if fin { 0x80 } else { 0 } | opcode, payload)
}

fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    p
}

impl Raw {
    /// Connects and completes the handshake, checking the 101 and the accept key.
    async fn connect(server: &TestServer) -> Raw {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
            server.addr
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Raw { stream, buf: Vec::new() };
        let end = loop {
            if let Some(i) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(raw.fill().await > 0, "connection closed during the handshake");
        };
        let head = String::from_utf8(raw.buf.drain(..end).collect()).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
        raw
    }

    /// Reads more bytes into `buf`; returns how many (0 at EOF).
    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut chunk))
            .await
            .expect("no bytes from the server within 5 s")
            .expect("read failed");
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next frame from the server (unmasked, as servers send them).
    async fn next_frame(&mut self) -> Frame {
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return frame;
            }
            assert!(self.fill().await > 0, "EOF while waiting for a frame");
        }
    }

    /// The next frame that is not a text frame (skipping the welcome and replies).
    async fn next_control(&mut self) -> Frame {
        loop {
            let f = self.next_frame().await;
            if f.opcode != OP_TEXT {
                return f;
            }
        }
    }

    /// Reads the server's close frame (skipping text frames); returns its code and reason.
    async fn expect_close(&mut self) -> (u16, String) {
        let f = self.next_control().await;
        assert_eq!(f.opcode, OP_CLOSE, "expected a close frame, got {f:?}");
        assert!(f.fin && f.payload.len() >= 2, "close frame without a code: {f:?}");
        let code = u16::from_be_bytes([f.payload[0], f.payload[1]]);
        (code, String::from_utf8(f.payload[2..].to_vec()).expect("close reason is UTF-8"))
    }

    /// Asserts that the server closes TCP (after its close frame, nothing more arrives).
    async fn expect_eof(&mut self) {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(CLOSE_BOUND, self.stream.read(&mut chunk))
            .await
            .expect("the server did not close TCP after its close frame")
            .unwrap_or(0);
        assert_eq!(n, 0, "bytes after the close frame: {:?}", &chunk[..n]);
        assert!(self.buf.is_empty(), "bytes after the close frame: {:?}", self.buf);
    }
}

fn parse_server_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[1] & 0x80, 0, "server frames must not be masked");
    assert_eq!(buf[0] & 0x70, 0, "server set reserved bits");
    let (len, pos) = match buf[1] & 0x7F {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().unwrap()) as usize, 10),
        n => (n as usize, 2),
    };
    let payload = buf.get(pos..pos + len)?.to_vec();
    Some((Frame { fin: buf[0] & 0x80 != 0, opcode: buf[0] & 0x0F, payload }, pos + len))
}

/// Waits (bounded) until the server has let go of every connection.
async fn expect_released(server: &TestServer) {
    let deadline = tokio::time::Instant::now() + CLOSE_BOUND;
    while server.app.shutdown.active_connections() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server still holds {} connection(s)",
            server.app.shutdown.active_connections()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn frame_errors(server: &TestServer, label: &str) -> f64 {
    let text = server.metrics().await;
    metric(&text, "ferrocast_frame_errors_total", &format!("code=\"{label}\"")).unwrap_or(0.0)
}

/// Sends `bytes` on a fresh connection and returns the close code the server answers with,
/// after checking the server closes TCP.
async fn close_code_for(server: &TestServer, bytes: &[u8]) -> (u16, String) {
    let mut c = Raw::connect(server).await;
    c.send(bytes).await;
    let close = c.expect_close().await;
    c.expect_eof().await;
    close
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_frame_with_a_one_byte_payload_is_answered_1002() {
    let server = TestServer::start(&[]).await;
    let (code, reason) = close_code_for(&server, &frame(true, OP_CLOSE, &[0x03])).await;
    assert_eq!(code, 1002, "{reason}");
    assert!(reason.contains("1-byte"), "{reason}");
    expect_released(&server).await;
    assert_eq!(frame_errors(&server, "protocol_error").await, 1.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_codes_not_allowed_on_the_wire_are_answered_1002() {
    let server = TestServer::start(&[]).await;
    let invalid = [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999];
    for code in invalid {
        let (answer, reason) =
            close_code_for(&server, &frame(true, OP_CLOSE, &close_payload(code, b""))).await;
        assert_eq!(answer, 1002, "client close code {code}: {reason}");
        assert!(reason.contains(&code.to_string()), "{reason}");
    }
    expect_released(&server).await;
    assert_eq!(frame_errors(&server, "invalid_close_code").await, invalid.len() as f64);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_close_codes_are_echoed() {
    let server = TestServer::start(&[]).await;
    for code in [1000u16, 1001, 1012, 1014, 3000, 4999] {
        let (answer, _) =
            close_code_for(&server, &frame(true, OP_CLOSE, &close_payload(code, b"bye"))).await;
        assert_eq!(answer, code);
    }
    // No code at all is answered with 1000 (1005 only ever appears in metrics, not on the wire).
    let (answer, _) = close_code_for(&server, &frame(true, OP_CLOSE, b"")).await;
    assert_eq!(answer, 1000);
    expect_released(&server).await;
    let text = server.metrics().await;
    assert_eq!(metric(&text, "ferrocast_closes_total", "code=\"1005\""), Some(1.0));
    assert_eq!(metric(&text, "ferrocast_closes_total", "code=\"4999\""), Some(1.0));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_reason_that_is_not_utf8_is_answered_1007() {
    let server = TestServer::start(&[]).await;
    let payload = close_payload(1000, b"bye \xce\xba\xe1\xbd\xb9\xed\xa0\x80");
    let (answer, _) = close_code_for(&server, &frame(true, OP_CLOSE, &payload)).await;
    assert_eq!(answer, 1007);
    expect_released(&server).await;
    assert_eq!(frame_errors(&server, "invalid_close_reason").await, 1.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_fails_at_the_first_fragment_before_the_message_ends() {
    let server = TestServer::start(&[]).await;
    let mut c = Raw::connect(&server).await;
    // Only the first, non-final fragment is sent: the server must not wait for the rest.
    c.send(&frame(false, OP_TEXT, b"{\"op\":\"\xf4\x90")).await;
    let (code, reason) = c.expect_close().await;
    assert_eq!(code, 1007, "{reason}");
    c.expect_eof().await;
    expect_released(&server).await;
    assert_eq!(frame_errors(&server, "invalid_utf8").await, 1.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn character_split_across_fragments_is_accepted() {
    let server = TestServer::start(&[]).await;
    let mut c = Raw::connect(&server).await;
    let welcome = c.next_frame().await;
    assert_eq!(welcome.opcode, OP_TEXT);
    // "€" is E2 82 AC: split over three fragments, each sent on its own.
    let text = "{\"op\":\"d€nce\",\"id\":5}".as_bytes();
    let at = text.iter().position(|&b| b == 0xE2).unwrap();
    c.send(&frame(false, OP_TEXT, &text[..at + 1])).await;
    c.send(&frame(false, OP_CONTINUATION, &text[at + 1..at + 2])).await;
    c.send(&frame(true, OP_CONTINUATION, &text[at + 2..])).await;
    let reply = c.next_frame().await;
    assert_eq!(reply.opcode, OP_TEXT);
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(reply["code"], "unknown_op", "{reply}");
    assert_eq!(reply["id"], 5, "{reply}");
    assert!(reply["message"].as_str().unwrap().contains("d€nce"), "{reply}");
    // The connection is healthy: a normal close is echoed.
    c.send(&frame(true, OP_CLOSE, &close_payload(1000, b""))).await;
    assert_eq!(c.expect_close().await.0, 1000);
    c.expect_eof().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_length_with_the_top_bit_set_is_answered_1002() {
    let server = TestServer::start(&[]).await;
    let mut bytes = vec![0x80 | OP_TEXT, 0x80 | 127];
    bytes.extend_from_slice(&(1u64 << 63 | 16).to_be_bytes());
    bytes.extend_from_slice(&[1, 2, 3, 4]);
    bytes.extend_from_slice(&[b'x'; 16]);
    let (code, reason) = close_code_for(&server, &bytes).await;
    assert_eq!(code, 1002);
    assert!(reason.contains("most significant bit"), "{reason}");
    expect_released(&server).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_violations_are_answered_1002() {
    let server = TestServer::start(&[]).await;
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for opcode in (0x3..=0x7).chain(0xB..=0xF) {
        cases.push((format!("opcode {opcode:#x}"), frame(true, opcode, b"x")));
    }
    for rsv in [0x40u8, 0x20, 0x10] {
        cases.push((format!("rsv {rsv:#x}"), masked(0x80 | rsv | OP_TEXT, b"{}")));
    }
    cases.push(("fragmented ping".into(), frame(false, OP_PING, b"p")));
    cases.push(("126-byte ping".into(), frame(true, OP_PING, &[b'p'; 126])));
    cases.push(("continuation without a message".into(), frame(true, OP_CONTINUATION, b"x")));
    let mut interleaved = frame(false, OP_TEXT, b"{\"op\":");
    interleaved.extend(frame(true, OP_TEXT, b"{}"));
    cases.push(("text inside a fragmented message".into(), interleaved));
    let mut unmasked = frame(true, OP_TEXT, b"{}");
    unmasked[1] &= 0x7F;
    unmasked.drain(2..6);
    cases.push(("unmasked frame".into(), unmasked));
    for (what, bytes) in &cases {
        let (code, reason) = close_code_for(&server, bytes).await;
        assert_eq!(code, 1002, "{what}: {reason}");
    }
    expect_released(&server).await;
    assert_eq!(frame_errors(&server, "protocol_error").await, cases.len() as f64);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_is_echoed_in_a_pong_and_pongs_with_payload_are_accepted() {
    let server = TestServer::start(&[]).await;
    let mut c = Raw::connect(&server).await;
    c.send(&frame(true, OP_PONG, b"unsolicited, with a payload")).await;
    let payload: Vec<u8> = (0..125u8).collect();
    c.send(&frame(true, OP_PING, &payload)).await;
    let pong = c.next_control().await;
    assert_eq!((pong.opcode, pong.fin), (OP_PONG, true));
    assert_eq!(pong.payload, payload);
    c.send(&frame(true, OP_PING, b"")).await;
    let pong = c.next_control().await;
    assert_eq!((pong.opcode, pong.payload.len()), (OP_PONG, 0));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_after_the_clients_close_is_ignored() {
    let server = TestServer::start(&[]).await;
    let mut c = Raw::connect(&server).await;
    let welcome = c.next_frame().await;
    assert_eq!(welcome.opcode, OP_TEXT);
    let mut bytes = frame(true, OP_CLOSE, &close_payload(1000, b""));
    bytes.extend(frame(true, OP_TEXT, b"{\"op\":\"ping\",\"id\":1}"));
    bytes.extend(frame(true, OP_PING, b"late"));
    c.send(&bytes).await;
    // The echo, then nothing: no pong, no reply to the late ping.
    let close = c.next_frame().await;
    assert_eq!(close.opcode, OP_CLOSE, "{close:?}");
    assert_eq!(u16::from_be_bytes([close.payload[0], close.payload[1]]), 1000);
    c.expect_eof().await;
    server.shutdown().await;
}

/// After failing a connection the server does not hold it for the linger: the client sees
/// EOF right after the close frame, and the server lets go when the client's close arrives,
/// or soon even when it never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_connection_closes_tcp_without_waiting_out_the_linger() {
    let server = TestServer::start(&[]).await;
    // The client answers with its close frame (after seeing ours), as RFC clients do.
    let mut c = Raw::connect(&server).await;
    c.send(&frame(true, OP_BINARY, b"\x00\x01")).await;
    assert_eq!(c.expect_close().await.0, 1003);
    c.send(&frame(true, OP_CLOSE, &close_payload(1003, b""))).await;
    c.expect_eof().await;
    expect_released(&server).await;
    // The client's close comes with the bad frame, in one write.
    let mut c = Raw::connect(&server).await;
    let mut bytes = frame(true, OP_TEXT, b"\xff");
    bytes.extend(frame(true, OP_CLOSE, &close_payload(1000, b"")));
    c.send(&bytes).await;
    assert_eq!(c.expect_close().await.0, 1007);
    c.expect_eof().await;
    expect_released(&server).await;
    // A client that stays silent and keeps its side open.
    let mut c = Raw::connect(&server).await;
    c.send(&frame(true, OP_CONTINUATION, b"x")).await;
    assert_eq!(c.expect_close().await.0, 1002);
    c.expect_eof().await;
    expect_released(&server).await;
    // Too big, refused from the header: the rest of the frame is still on its way.
    let server_small = TestServer::start(&["server.max_frame_bytes=1024"]).await;
    let mut c = Raw::connect(&server_small).await;
    let big = frame(true, OP_TEXT, &vec![b'a'; 100_000]);
    c.send(&big[..64]).await;
    assert_eq!(c.expect_close().await.0, 1009);
    c.expect_eof().await;
    expect_released(&server_small).await;
    assert_eq!(frame_errors(&server_small, "frame_too_big").await, 1.0);
    drop(c);
    server_small.shutdown().await;
    server.shutdown().await;
}

/// A server-initiated close (a drain) waits for the client's close, and closes TCP as soon as
/// it arrives rather than at the end of the linger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_close_after_ours_ends_the_connection_at_once() {
    let mut server =
        TestServer::start(&["server.reconnect_after_ms=1000", "server.shutdown_grace_ms=5000"])
            .await;
    let mut c = Raw::connect(&server).await;
    let welcome = c.next_frame().await;
    assert_eq!(welcome.opcode, OP_TEXT);
    server.begin_shutdown();
    let (code, reason) = c.expect_close().await;
    assert_eq!(code, 1001, "{reason}");
    // A ping after the server's close gets no pong; the client's close ends it.
    c.send(&frame(true, OP_PING, b"too late")).await;
    c.send(&frame(true, OP_CLOSE, &close_payload(1001, b""))).await;
    c.expect_eof().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sec_websocket_key_that_is_not_16_bytes_of_base64_is_refused_400() {
    let server = TestServer::start(&[]).await;
    let keys =
        ["abc", "AAAAAAAAAAAAAAAAAAAA", "AAAAAAAAAAAAAAAAAAAAAAA=", "dGhlIHNhbXBsZSBub25jZQ"];
    for key in keys {
        let headers = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", key),
        ];
        let r = http(server.addr, "GET", "/ws", &headers, None).await;
        assert_eq!(r.status, 400, "key {key:?}: {}", r.text());
        let body = r.json();
        assert_eq!(body["error"], "bad_request", "{body}");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains("Sec-WebSocket-Key") && message.contains(key), "{message}");
    }
    let text = server.metrics().await;
    assert_eq!(
        metric(&text, "ferrocast_upgrade_rejected_total", ""),
        Some(keys.len() as f64),
        "{text}"
    );
    server.shutdown().await;
}
