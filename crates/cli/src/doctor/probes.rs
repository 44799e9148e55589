//! Probes over open WebSockets: a minimal native-protocol connection (requests matched to
//! replies by id, server heartbeats answered), round-trip time, the largest message that
//! passes, and the idle-timeout probe.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, Message};

use super::net::{Connector, Upgrade, Ws};

/// How a WebSocket ended, as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// A close frame arrived with this code and reason.
    Closed(u16, String),
    /// The TCP connection ended without a close frame (what browsers report as 1006).
    Dropped,
    /// The TCP connection was reset.
    Reset,
    /// No answer in time.
    Timeout,
    Other(String),
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ended::Closed(code, reason) if reason.is_empty() => write!(f, "close frame {code}"),
            Ended::Closed(code, reason) => write!(f, "close frame {code} ({reason})"),
            Ended::Dropped => write!(f, "connection dropped without a close frame (1006)"),
            Ended::Reset => write!(f, "TCP reset"),
            Ended::Timeout => write!(f, "no answer in time"),
            Ended::Other(e) => write!(f, "{e}"),
        }
    }
}

impl Ended {
    fn from_error(e: tungstenite::Error) -> Ended {
        use tungstenite::error::ProtocolError;
        match e {
            tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
                Ended::Dropped
            }
            tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
                Ended::Dropped
            }
            tungstenite::Error::Io(io) => match io.kind() {
                std::io::ErrorKind::ConnectionReset => Ended::Reset,
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::BrokenPipe => {
                    Ended::Dropped
                }
                _ => Ended::Other(io.to_string()),
            },
            other => Ended::Other(other.to_string()),
        }
    }

    /// Whether the server itself closed with a code from the protocol (not a proxy's drop).
    pub fn code(&self) -> Option<u16> {
        match self {
            Ended::Closed(code, _) => Some(*code),
            _ => None,
        }
    }
}

/// Reads the next message, mapping the end of the connection to [`Ended`].
async fn next_message(ws: &mut Ws) -> Result<Message, Ended> {
    match ws.next().await {
        Some(Ok(Message::Close(frame))) => Err(match frame {
            Some(f) => Ended::Closed(u16::from(f.code), f.reason.to_string()),
            None => Ended::Closed(1005, String::new()),
        }),
        Some(Ok(m)) => Ok(m),
        Some(Err(e)) => Err(Ended::from_error(e)),
        None => Err(Ended::Dropped),
    }
}

/// The ferrocast welcome frame.
#[derive(Debug, Clone)]
pub struct Welcome {
    pub session: String,
    pub version: u64,
    pub ping_interval_ms: u64,
}

/// What the first frame after an upgrade says about the server.
#[derive(Debug, Clone)]
pub enum FirstFrame {
    Welcome(Welcome),
    /// An Engine.IO open packet (`0{"sid":...}`): a Socket.IO server.
    EngineIoOpen(Value),
    Other(String),
    /// Nothing within the wait: a server that waits for the client to speak first.
    Nothing,
    Ended(Ended),
}

/// Reads (at most `wait`) the first frame of a fresh WebSocket and classifies it.
pub async fn first_frame(ws: &mut Ws, wait: Duration) -> FirstFrame {
    let msg = match tokio::time::timeout(wait, next_message(ws)).await {
        Err(_) => return FirstFrame::Nothing,
        Ok(Err(end)) => return FirstFrame::Ended(end),
        Ok(Ok(m)) => m,
    };
    let Message::Text(text) = msg else {
        return FirstFrame::Other(format!("{msg:?}"));
    };
    if let Some(open) =
        text.strip_prefix('0').and_then(|rest| serde_json::from_str::<Value>(rest).ok())
        && open.get("sid").is_some()
    {
        return FirstFrame::EngineIoOpen(open);
    }
    match serde_json::from_str::<Value>(&text) {
        Ok(v) if v["type"] == "welcome" => FirstFrame::Welcome(Welcome {
            session: v["session"].as_str().unwrap_or_default().to_owned(),
            version: v["version"].as_u64().unwrap_or(0),
            ping_interval_ms: v["ping_interval_ms"].as_u64().unwrap_or(0),
        }),
        _ => FirstFrame::Other(text.chars().take(120).collect()),
    }
}

/// The first text frame of a fresh WebSocket, if one arrives within `wait`.
pub async fn first_text(ws: &mut Ws, wait: Duration) -> Option<String> {
    match tokio::time::timeout(wait, next_message(ws)).await {
        Ok(Ok(Message::Text(text))) => Some(text.to_string()),
        _ => None,
    }
}

/// A native-protocol connection: requests get ids and wait for their reply; heartbeats are
/// answered; messages arriving meanwhile are kept for [`NativeConn::next_msg`].
pub struct NativeConn {
    pub ws: Box<Ws>,
    pub welcome: Welcome,
    next_id: u64,
    pending: VecDeque<Value>,
    /// Answer server heartbeats (`{"type":"ping"}`) with `{"op":"pong"}`.
    pub answer_pings: bool,
}

impl NativeConn {
    pub fn new(ws: Box<Ws>, welcome: Welcome) -> NativeConn {
        NativeConn { ws, welcome, next_id: 1, pending: VecDeque::new(), answer_pings: true }
    }

    /// Opens a new connection to `path` and waits for the welcome.
    pub async fn open(
        connector: &Connector,
        path: &str,
        extra: &[(&str, String)],
    ) -> Result<NativeConn, String> {
        match connector.upgrade(path, extra).await.map_err(|e| e.to_string())? {
            Upgrade::Refused(reply) => {
                Err(format!("upgrade refused: {}{}", reply.status, reply.origin_note()))
            }
            Upgrade::Upgraded { mut ws, .. } => match first_frame(&mut ws, connector.timeout).await
            {
                FirstFrame::Welcome(w) => Ok(NativeConn::new(ws, w)),
                FirstFrame::Ended(end) => Err(format!("closed before the welcome: {end}")),
                other => Err(format!("no ferrocast welcome: {other:?}")),
            },
        }
    }

    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub async fn send(&mut self, text: String) -> Result<(), Ended> {
        self.ws.send(Message::text(text)).await.map_err(Ended::from_error)
    }

    /// Reads one server frame (arrays are split), answering heartbeats.
    async fn read_frames(&mut self) -> Result<Vec<Value>, Ended> {
        loop {
            let Message::Text(text) = next_message(&mut self.ws).await? else { continue };
            let frames = match serde_json::from_str::<Value>(&text) {
                Ok(Value::Array(items)) => items,
                Ok(v) => vec![v],
                Err(_) => continue,
            };
            let mut out = Vec::with_capacity(frames.len());
            for f in frames {
                if f["type"] == "ping" {
                    if self.answer_pings {
                        self.send(json!({"op": "pong"}).to_string()).await?;
                    }
                } else {
                    out.push(f);
                }
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }

    /// Sends `frame` (which carries `id`) and waits for the reply with that id.
    pub async fn request(
        &mut self,
        id: u64,
        frame: String,
        timeout: Duration,
    ) -> Result<Value, Ended> {
        self.send(frame).await?;
        let wait = async {
            loop {
                for f in self.read_frames().await? {
                    if f["id"].as_u64() == Some(id) {
                        return Ok(f);
                    }
                    self.pending.push_back(f);
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(Err(Ended::Timeout))
    }

    /// The next `msg` frame on `channel`.
    pub async fn next_msg(&mut self, channel: &str, timeout: Duration) -> Result<Value, Ended> {
        if let Some(pos) =
            self.pending.iter().position(|f| f["type"] == "msg" && f["channel"] == channel)
        {
            return Ok(self.pending.remove(pos).expect("position is valid"));
        }
        let wait = async {
            loop {
                let mut found = None;
                for f in self.read_frames().await? {
                    if found.is_none() && f["type"] == "msg" && f["channel"] == channel {
                        found = Some(f);
                    } else {
                        self.pending.push_back(f);
                    }
                }
                if let Some(f) = found {
                    return Ok(f);
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(Err(Ended::Timeout))
    }

    /// A native `ping`; returns the round-trip time.
    pub async fn ping(&mut self, timeout: Duration) -> Result<Duration, Ended> {
        let id = self.next_id();
        let started = Instant::now();
        let reply = self.request(id, json!({"op": "ping", "id": id}).to_string(), timeout).await?;
        match reply["type"].as_str() {
            Some("pong") => Ok(started.elapsed()),
            _ => Err(Ended::Other(format!("unexpected reply to ping: {reply}"))),
        }
    }

    pub async fn subscribe(&mut self, channel: &str, timeout: Duration) -> Result<(), String> {
        let id = self.next_id();
        let reply = self
            .request(
                id,
                json!({"op": "subscribe", "id": id, "channels": [channel]}).to_string(),
                timeout,
            )
            .await
            .map_err(|e| e.to_string())?;
        match reply["result"][channel].get("error") {
            None if reply["type"] == "ack" => Ok(()),
            Some(err) => Err(format!("subscribe refused: {err}")),
            None => Err(format!("subscribe refused: {reply}")),
        }
    }

    /// Publishes `data` on `channel`; `Err` carries the server's refusal (e.g. `forbidden`).
    pub async fn publish(
        &mut self,
        channel: &str,
        data: Value,
        timeout: Duration,
    ) -> Result<(), String> {
        let id = self.next_id();
        let frame =
            json!({"op": "publish", "id": id, "channel": channel, "data": data}).to_string();
        let reply = self.request(id, frame, timeout).await.map_err(|e| e.to_string())?;
        match reply["type"].as_str() {
            Some("ack") => Ok(()),
            _ => Err(format!(
                "{}: {}",
                reply["code"].as_str().unwrap_or("error"),
                reply["message"].as_str().unwrap_or_default()
            )),
        }
    }

    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ws.close()).await;
    }
}

/// Round trips measured one after another.
#[derive(Debug, Clone)]
pub struct Rtt {
    pub samples: Vec<Duration>,
    pub lost: usize,
}

impl Rtt {
    pub fn median(&self) -> Option<Duration> {
        let mut s = self.samples.clone();
        s.sort();
        s.get(s.len() / 2).copied()
    }

    pub fn min(&self) -> Option<Duration> {
        self.samples.iter().min().copied()
    }

    pub fn max(&self) -> Option<Duration> {
        self.samples.iter().max().copied()
    }
}

/// Native pings over `conn`, `count` of them, `gap` apart.
pub async fn native_rtt(
    conn: &mut NativeConn,
    count: usize,
    gap: Duration,
    timeout: Duration,
) -> Rtt {
    let mut rtt = Rtt { samples: Vec::new(), lost: 0 };
    for i in 0..count {
        if i > 0 {
            tokio::time::sleep(gap).await;
        }
        match conn.ping(timeout).await {
            Ok(d) => rtt.samples.push(d),
            Err(Ended::Timeout) => rtt.lost += 1,
            Err(_) => {
                rtt.lost += count - i;
                break;
            }
        }
    }
    rtt
}

/// WebSocket control pings (RFC 6455 makes every server answer them), for servers that do
/// not speak ferrocast's protocol.
pub async fn control_rtt(ws: &mut Ws, count: usize, gap: Duration, timeout: Duration) -> Rtt {
    let mut rtt = Rtt { samples: Vec::new(), lost: 0 };
    for i in 0..count {
        if i > 0 {
            tokio::time::sleep(gap).await;
        }
        let payload = (i as u32).to_be_bytes().to_vec();
        let started = Instant::now();
        if ws.send(Message::Ping(payload.clone().into())).await.is_err() {
            rtt.lost += count - i;
            break;
        }
        let wait = async {
            loop {
                match next_message(ws).await {
                    Ok(Message::Pong(p)) if p.as_ref() == payload.as_slice() => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(true) => rtt.samples.push(started.elapsed()),
            _ => rtt.lost += 1,
        }
    }
    rtt
}

/// Outcome of sending one frame of a given size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeResult {
    Passed,
    /// Refused with a close frame (1009 from ferrocast when above `max_frame_bytes`).
    Refused(Ended),
    /// Could not even connect.
    NoConnection(String),
}

/// Sends one padded native ping of exactly `size` bytes on a fresh connection.
pub async fn try_frame_size(
    connector: &Connector,
    path: &str,
    extra: &[(&str, String)],
    size: usize,
) -> SizeResult {
    let mut conn = match NativeConn::open(connector, path, extra).await {
        Ok(c) => c,
        Err(e) => return SizeResult::NoConnection(e),
    };
    let id = conn.next_id();
    let frame = padded_ping(id, size);
    let result = match conn.request(id, frame, connector.timeout).await {
        Ok(reply) if reply["type"] == "pong" => SizeResult::Passed,
        Ok(reply) => SizeResult::Refused(Ended::Other(format!("unexpected reply: {reply}"))),
        Err(end) => SizeResult::Refused(end),
    };
    conn.close().await;
    result
}

/// `{"op":"ping","id":N,"pad":"xxx…"}`, exactly `size` bytes long (unknown fields are ignored
/// by the server, so the frame tests the path without needing any permission).
pub fn padded_ping(id: u64, size: usize) -> String {
    let head = format!("{{\"op\":\"ping\",\"id\":{id},\"pad\":\"");
    let tail = "\"}";
    let pad = size.saturating_sub(head.len() + tail.len());
    let mut s = String::with_capacity(size.max(head.len() + tail.len()));
    s.push_str(&head);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str(tail);
    s
}

/// When and how a held connection ended.
#[derive(Debug, Clone)]
pub struct Held {
    /// `None` if it was still open at the end of the probe.
    pub ended: Option<(Duration, Ended)>,
}

/// Holds a WebSocket without sending anything and without answering anything, until it ends
/// or `duration` passes.
pub async fn hold_silent(mut ws: Box<Ws>, duration: Duration) -> Held {
    let started = Instant::now();
    let wait = async {
        loop {
            if let Err(end) = next_message(&mut ws).await {
                return end;
            }
        }
    };
    let result = match tokio::time::timeout(duration, wait).await {
        Ok(end) => Held { ended: Some((started.elapsed(), end)) },
        Err(_) => Held { ended: None },
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close()).await;
    result
}

/// Holds a native connection like a well-behaved idle client: it answers heartbeats and
/// sends nothing else.
pub async fn hold_responsive(mut conn: NativeConn, duration: Duration) -> Held {
    let started = Instant::now();
    let wait = async {
        loop {
            if let Err(end) = conn.read_frames().await {
                return end;
            }
        }
    };
    let result = match tokio::time::timeout(duration, wait).await {
        Ok(end) => Held { ended: Some((started.elapsed(), end)) },
        Err(_) => Held { ended: None },
    };
    conn.close().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_ping_has_the_exact_size() {
        for size in [64, 1000, 65536] {
            let f = padded_ping(7, size);
            assert_eq!(f.len(), size, "{size}");
            let v: Value = serde_json::from_str(&f).unwrap();
            assert_eq!(v["op"], "ping");
            assert_eq!(v["id"], 7);
        }
    }
}
