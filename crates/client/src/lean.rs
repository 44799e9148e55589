//! [`LeanConn`]: a minimal, allocation-free WebSocket reader for load generation.
//!
//! A load generator shares the CPU with the server it measures, so every cycle it spends is a
//! cycle the server does not get. `LeanConn` reads straight from the socket into one reusable
//! buffer and hands out borrowed frame payloads: no per-message allocation, no UTF-8 validation,
//! no task wake-up per frame (one `read` usually yields many frames). It does its own HTTP
//! upgrade (the `Sec-WebSocket-Accept` check is skipped: it only talks to ferrocast) and
//! supports exactly what ferrocast sends: unmasked text/binary frames, fragmentation, ping/pong
//! and close. Use [`crate::Client`] for anything else.
//!
//! When the upgrade offers permessage-deflate (an extra `Sec-WebSocket-Extensions` header in
//! the options) and the server accepts it, compressed messages (RSV1) are inflated into one
//! reusable buffer before they are handed out; this connection never compresses what it sends.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::connect::{ConnectOptions, normalize_ws_url, tcp_connect};
use crate::error::{CloseInfo, Error};
use crate::frame::{ServerFrame, Welcome, decode_text};

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// One frame handed to the [`LeanConn::read_batch`] callback; payloads borrow the read buffer.
#[derive(Debug)]
pub enum LeanFrame<'a> {
    /// A complete text message (fragments already joined). Not UTF-8 validated.
    Text(&'a [u8]),
    /// A complete binary message.
    Binary(&'a [u8]),
    /// The server closed the connection; the close has been answered.
    Close(CloseInfo),
}

/// A raw client WebSocket connection (see the module docs).
#[derive(Debug)]
pub struct LeanConn {
    stream: TcpStream,
    /// Read buffer; bytes `start..end` are received but not yet consumed.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// A message being reassembled from fragments, with its opcode.
    fragments: Option<(u8, Vec<u8>)>,
    max_message: usize,
    mask_state: u64,
    closed: Option<CloseInfo>,
    /// permessage-deflate was negotiated.
    deflate: Option<Inflate>,
}

/// A negotiated permessage-deflate's inflater and the buffer messages are inflated into.
struct Inflate {
    state: flate2::Decompress,
    /// The server compresses each message on its own (`server_no_context_takeover`).
    reset: bool,
    out: Vec<u8>,
    /// The message being assembled is compressed (RSV1 on its first frame).
    pending: bool,
}

impl std::fmt::Debug for Inflate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflate").field("reset", &self.reset).finish()
    }
}

impl Inflate {
    /// Inflates one message (the sync flush's tail appended) into `out`.
    fn message(&mut self, compressed: &[u8], max: usize) -> Result<(), Error> {
        use flate2::{FlushDecompress, Status};
        if self.reset {
            self.state.reset(false);
        }
        self.out.clear();
        for mut input in [compressed, &[0x00, 0x00, 0xff, 0xff][..]] {
            loop {
                if self.out.len() == self.out.capacity() {
                    self.out.reserve(self.out.capacity().max(256));
                }
                let before = self.state.total_in();
                let status = self
                    .state
                    .decompress_vec(input, &mut self.out, FlushDecompress::Sync)
                    .map_err(|e| Error::Protocol(format!("bad compressed message: {e}")))?;
                input = &input[(self.state.total_in() - before) as usize..];
                if self.out.len() > max {
                    return Err(Error::Protocol("inflated message exceeds the limit".into()));
                }
                if status == Status::StreamEnd
                    || (input.is_empty() && self.out.len() < self.out.capacity())
                {
                    break;
                }
            }
        }
        Ok(())
    }
}

impl LeanConn {
    /// Connects, upgrades and reads the welcome frame.
    ///
    /// Honours `bind`, `origin`, `headers`, `connect_timeout`, `read_buffer_size` and
    /// `max_message_size` from `opts`. Frames that arrive right after the welcome stay buffered
    /// for the first [`LeanConn::read_batch`].
    pub async fn connect(url: &str, opts: &ConnectOptions) -> Result<(LeanConn, Welcome), Error> {
        let url = normalize_ws_url(url)?;
        tokio::time::timeout(opts.connect_timeout, Self::connect_inner(url, opts))
            .await
            .map_err(|_| Error::Timeout("connect and welcome"))?
    }

    async fn connect_inner(
        url: url::Url,
        opts: &ConnectOptions,
    ) -> Result<(LeanConn, Welcome), Error> {
        let stream = tcp_connect(&url, opts.bind).await?;
        let mut conn = LeanConn {
            stream,
            buf: vec![0; opts.read_buffer_size.max(1024)],
            start: 0,
            end: 0,
            fragments: None,
            max_message: opts.max_message_size.unwrap_or(usize::MAX),
            mask_state: seed(),
            closed: None,
            deflate: None,
        };
        conn.upgrade(&url, opts).await?;

        // The welcome is the first text frame.
        let mut welcome = None;
        let mut problem = None;
        while welcome.is_none() && problem.is_none() {
            conn.read_batch_limit(1, |frame| match frame {
                LeanFrame::Text(bytes) => {
                    let text = String::from_utf8_lossy(bytes);
                    match decode_text(&text).map(|f| f.into_iter().next()) {
                        Ok(Some(ServerFrame::Welcome(w))) => welcome = Some(w),
                        Ok(other) => {
                            problem = Some(Error::Protocol(format!(
                                "expected a welcome frame first, got {other:?}"
                            )));
                        }
                        Err(e) => problem = Some(e.into()),
                    }
                }
                LeanFrame::Binary(_) => {
                    problem = Some(Error::Protocol("binary frame before the welcome".into()));
                }
                LeanFrame::Close(info) => problem = Some(Error::Closed(info)),
            })
            .await?;
        }
        match (welcome, problem) {
            (Some(welcome), _) => Ok((conn, welcome)),
            (None, Some(problem)) => Err(problem),
            (None, None) => unreachable!("the loop ends with one of them set"),
        }
    }

    async fn upgrade(&mut self, url: &url::Url, opts: &ConnectOptions) -> Result<(), Error> {
        let mut path = url.path().to_owned();
        if let Some(query) = url.query() {
            path.push('?');
            path.push_str(query);
        }
        let host = match url.port() {
            Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_owned(),
        };
        let key_bytes: [u8; 16] = {
            let a = self.next_mask().to_le_bytes();
            let b = self.next_mask().to_le_bytes();
            let mut k = [0; 16];
            k[..8].copy_from_slice(&a);
            k[8..].copy_from_slice(&b);
            k
        };
        let mut request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n",
            base64(&key_bytes)
        );
        if let Some(origin) = &opts.origin {
            request.push_str(&format!("Origin: {origin}\r\n"));
        }
        for (name, value) in &opts.headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        self.stream.write_all(request.as_bytes()).await?;

        // Read the response head; whatever follows it is already WebSocket frames.
        loop {
            if let Some(pos) = find(&self.buf[..self.end], b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..pos]).into_owned();
                self.start = pos + 4;
                let status: u16 = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| Error::Protocol(format!("bad upgrade response: {head}")))?;
                if status != 101 {
                    // Best effort: whatever part of the body has arrived explains the refusal.
                    let _ = tokio::time::timeout(Duration::from_millis(100), self.fill()).await;
                    let body = String::from_utf8_lossy(&self.buf[self.start..self.end]);
                    return Err(Error::Rejected { status, body: body.into_owned() });
                }
                let extension = head.lines().find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.trim().eq_ignore_ascii_case("sec-websocket-extensions").then_some(value)
                });
                if let Some(ext) = extension.filter(|v| v.contains("permessage-deflate")) {
                    self.deflate = Some(Inflate {
                        state: flate2::Decompress::new(false),
                        reset: ext.contains("server_no_context_takeover"),
                        out: Vec::new(),
                        pending: false,
                    });
                }
                return Ok(());
            }
            if self.end == self.buf.len() {
                return Err(Error::Protocol("upgrade response head too large".into()));
            }
            if self.fill().await? == 0 {
                return Err(Error::Closed(CloseInfo::abnormal(
                    "connection closed during the upgrade",
                )));
            }
        }
    }

    /// How the connection ended, once it has.
    pub fn close_info(&self) -> Option<&CloseInfo> {
        self.closed.as_ref()
    }

    /// Waits for data, then calls `each` for every complete message now buffered.
    ///
    /// WebSocket pings are answered internally. Returns `Err(Error::Closed)` once the connection
    /// has ended (after `each` saw the `Close` frame, if the server sent one). Cancel-safe: no
    /// data is lost if the future is dropped while waiting.
    pub async fn read_batch(&mut self, each: impl FnMut(LeanFrame<'_>)) -> Result<(), Error> {
        self.read_batch_limit(usize::MAX, each).await
    }

    async fn read_batch_limit(
        &mut self,
        limit: usize,
        mut each: impl FnMut(LeanFrame<'_>),
    ) -> Result<(), Error> {
        if let Some(info) = &self.closed {
            return Err(Error::Closed(info.clone()));
        }
        let mut delivered = 0;
        let mut pongs: Vec<Vec<u8>> = Vec::new();
        loop {
            match self.parse_one()? {
                Parsed::NeedMore => {
                    if delivered > 0 || !pongs.is_empty() {
                        break;
                    }
                    match self.fill().await {
                        Ok(0) | Err(_) => {
                            let info =
                                CloseInfo::abnormal("connection closed without a close frame");
                            self.closed = Some(info.clone());
                            return Err(Error::Closed(info));
                        }
                        Ok(_) => {}
                    }
                }
                Parsed::Control(OP_PING, payload) => pongs.push(payload),
                Parsed::Control(..) => {}
                Parsed::Message(opcode, range) => {
                    let payload = match (&self.fragments, &self.deflate) {
                        (_, Some(inflate)) if inflate.pending => inflate.out.as_slice(),
                        (Some((_, joined)), _) if range.is_empty() => joined.as_slice(),
                        _ => &self.buf[range],
                    };
                    each(if opcode == OP_TEXT {
                        LeanFrame::Text(payload)
                    } else {
                        LeanFrame::Binary(payload)
                    });
                    self.fragments = None;
                    delivered += 1;
                    if delivered >= limit {
                        break;
                    }
                }
                Parsed::Closed(info) => {
                    // Echo the close (RFC 6455 §5.5.1); the server may already be gone.
                    let _ = self.write_frame(OP_CLOSE, &info.code.to_be_bytes()).await;
                    self.closed = Some(info.clone());
                    each(LeanFrame::Close(info.clone()));
                    return Err(Error::Closed(info));
                }
            }
        }
        for payload in pongs {
            self.write_frame(OP_PONG, &payload).await?;
        }
        Ok(())
    }

    /// Sends a text message.
    pub async fn send_text(&mut self, text: &str) -> Result<(), Error> {
        self.write_frame(OP_TEXT, text.as_bytes()).await
    }

    /// Sends a close frame with `code` (the connection should be dropped afterwards).
    pub async fn send_close(&mut self, code: u16) -> Result<(), Error> {
        self.write_frame(OP_CLOSE, &code.to_be_bytes()).await
    }

    /// Reads more bytes into the buffer, compacting or growing it as needed.
    async fn fill(&mut self) -> std::io::Result<usize> {
        if self.start > 0 && self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let grown = self.buf.len() * 2;
                self.buf.resize(grown, 0);
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// Parses the next frame in the buffer, if complete.
    fn parse_one(&mut self) -> Result<Parsed, Error> {
        let avail = &self.buf[self.start..self.end];
        if avail.len() < 2 {
            return Ok(Parsed::NeedMore);
        }
        let fin = avail[0] & 0x80 != 0;
        let compressed = avail[0] & 0x40 != 0;
        let opcode = avail[0] & 0x0F;
        let masked = avail[1] & 0x80 != 0;
        let (len, mut header) = match avail[1] & 0x7F {
            126 if avail.len() >= 4 => (u64::from(u16::from_be_bytes([avail[2], avail[3]])), 4),
            127 if avail.len() >= 10 => {
                let mut b = [0; 8];
                b.copy_from_slice(&avail[2..10]);
                (u64::from_be_bytes(b), 10)
            }
            126 | 127 => return Ok(Parsed::NeedMore),
            n => (u64::from(n), 2),
        };
        let mask = if masked {
            if avail.len() < header + 4 {
                return Ok(Parsed::NeedMore);
            }
            let m = [avail[header], avail[header + 1], avail[header + 2], avail[header + 3]];
            header += 4;
            Some(m)
        } else {
            None
        };
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > self.max_message {
            return Err(Error::Protocol(format!(
                "frame of {len} bytes exceeds the {} byte limit",
                self.max_message
            )));
        }
        if avail.len() < header + len {
            // Make sure the whole frame can fit once it has arrived.
            let needed = header + len;
            if needed > self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                self.buf.resize(needed.next_power_of_two(), 0);
            }
            return Ok(Parsed::NeedMore);
        }
        let payload = self.start + header..self.start + header + len;
        self.start += header + len;
        if let Some(mask) = mask {
            for (i, b) in self.buf[payload.clone()].iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        if let Some(inflate) = &mut self.deflate {
            if matches!(opcode, OP_TEXT | OP_BINARY) {
                inflate.pending = compressed;
            }
            if inflate.pending && fin && matches!(opcode, OP_TEXT | OP_BINARY | OP_CONTINUATION) {
                let first = match &mut self.fragments {
                    Some((first, joined)) => {
                        joined.extend_from_slice(&self.buf[payload]);
                        inflate.message(joined, self.max_message)?;
                        *first
                    }
                    None => {
                        inflate.message(&self.buf[payload], self.max_message)?;
                        opcode
                    }
                };
                return Ok(Parsed::Message(first, 0..0));
            }
        } else if compressed {
            return Err(Error::Protocol("RSV1 set without permessage-deflate".into()));
        }
        match opcode {
            OP_TEXT | OP_BINARY if fin && self.fragments.is_none() => {
                Ok(Parsed::Message(opcode, payload))
            }
            OP_TEXT | OP_BINARY => {
                self.fragments = Some((opcode, self.buf[payload].to_vec()));
                if fin {
                    Ok(Parsed::Message(opcode, 0..0))
                } else {
                    Ok(Parsed::Control(OP_CONTINUATION, Vec::new()))
                }
            }
            OP_CONTINUATION => {
                let Some((first, joined)) = &mut self.fragments else {
                    return Err(Error::Protocol("continuation frame without a start".into()));
                };
                joined.extend_from_slice(&self.buf[payload]);
                if joined.len() > self.max_message {
                    return Err(Error::Protocol("fragmented message exceeds the limit".into()));
                }
                if fin {
                    Ok(Parsed::Message(*first, 0..0))
                } else {
                    Ok(Parsed::Control(OP_CONTINUATION, Vec::new()))
                }
            }
            OP_CLOSE => {
                let body = &self.buf[payload];
                let info = if body.len() >= 2 {
                    CloseInfo {
                        code: u16::from_be_bytes([body[0], body[1]]),
                        reason: String::from_utf8_lossy(&body[2..]).into_owned(),
                    }
                } else {
                    CloseInfo { code: CloseInfo::NO_STATUS, reason: String::new() }
                };
                Ok(Parsed::Closed(info))
            }
            OP_PING | OP_PONG => Ok(Parsed::Control(opcode, self.buf[payload].to_vec())),
            other => Err(Error::Protocol(format!("unknown opcode {other:#x}"))),
        }
    }

    /// Writes one masked frame (clients must mask, RFC 6455 §5.3).
    async fn write_frame(&mut self, opcode: u8, payload: &[u8]) -> Result<(), Error> {
        let mut frame = Vec::with_capacity(payload.len() + 14);
        frame.push(0x80 | opcode);
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= usize::from(u16::MAX) => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = (self.next_mask() as u32).to_be_bytes();
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await?;
        Ok(())
    }

    /// xorshift64*: masks only need to be unpredictable to intermediaries, not cryptographic.
    fn next_mask(&mut self) -> u64 {
        let mut x = self.mask_state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.mask_state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

enum Parsed {
    NeedMore,
    /// A complete message: opcode and payload range (empty range: the joined fragments).
    Message(u8, std::ops::Range<usize>),
    Control(u8, Vec<u8>),
    Closed(CloseInfo),
}

fn seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    // Never zero (xorshift's fixed point), different per connection.
    (nanos ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)) | 1
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected);
        }
        assert_eq!(base64(&[0u8; 16]).len(), 24);
    }

    #[test]
    fn find_locates_needles() {
        assert_eq!(find(b"HTTP/1.1 101\r\n\r\nxx", b"\r\n\r\n"), Some(12));
        assert_eq!(find(b"abc", b"\r\n\r\n"), None);
    }
}
