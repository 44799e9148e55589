//! [`Client`]: one native-protocol WebSocket session with request/ack correlation and a buffer
//! for everything that arrives while a request is waiting for its answer.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::connect::{ConnectOptions, WsStream, close_info, connect_raw};
use crate::error::{CloseInfo, Error};
use crate::frame::{Message, ServerError, ServerFrame, Welcome, decode_text, scalar_to_string};

/// Something the server sent that the application should see.
#[derive(Debug, Clone)]
pub enum Event {
    /// A channel message.
    Msg(Message),
    /// An `error` frame not tied to a pending request (e.g. the answer to a malformed frame).
    Error(ServerError),
    /// The server ended a subscription.
    Unsubscribed { channel: String, reason: String },
    /// A server heartbeat `{"type":"ping"}` (already answered when auto-pong is on).
    Ping,
    /// A frame of a type this client does not know.
    Other(Value),
    /// The connection is closed; this is the last event, `next_event` returns `None` after it.
    Closed(CloseInfo),
}

/// A channel position: what a client remembers to recover missed messages after a reconnect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Position {
    /// Channel epoch.
    pub epoch: String,
    /// Last offset seen.
    pub offset: u64,
}

/// A successful per-channel subscribe result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribed {
    /// Channel epoch (empty when the server sent none).
    pub epoch: String,
    /// Current channel offset (the last message published, 0 for a fresh channel).
    pub offset: u64,
    /// Whether the requested recovery succeeded; `false` means the client must resynchronise.
    pub recovered: bool,
}

impl Subscribed {
    /// The position to pass to [`Client::subscribe_recover`] later.
    pub fn position(&self) -> Position {
        Position { epoch: self.epoch.clone(), offset: self.offset }
    }
}

/// A per-channel error inside an ack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorInfo {
    /// Machine-readable code such as `forbidden`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

/// The answer to a subscribe: one result per requested channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeAck {
    /// Result per channel, as the server reported it.
    pub channels: BTreeMap<String, Result<Subscribed, ErrorInfo>>,
}

impl SubscribeAck {
    /// True when every channel was subscribed.
    pub fn is_ok(&self) -> bool {
        self.channels.values().all(Result::is_ok)
    }

    /// The successful result for `channel`, if any.
    pub fn get(&self, channel: &str) -> Option<&Subscribed> {
        self.channels.get(channel).and_then(|r| r.as_ref().ok())
    }

    /// The error for `channel`, if it failed.
    pub fn error(&self, channel: &str) -> Option<&ErrorInfo> {
        self.channels.get(channel).and_then(|r| r.as_ref().err())
    }

    /// The first failed channel, if any.
    pub fn first_error(&self) -> Option<(&str, &ErrorInfo)> {
        self.channels.iter().find_map(|(ch, r)| r.as_ref().err().map(|e| (ch.as_str(), e)))
    }
}

/// The answer to a publish: where the message landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PublishAck {
    /// The channel published to.
    pub channel: String,
    /// The offset assigned to the message.
    pub offset: u64,
    /// The channel epoch, when the server reports it.
    pub epoch: Option<String>,
}

impl PublishAck {
    /// Reads a publish result object (`{"channel":..,"offset":..,"epoch":..}`), falling back
    /// to `channel` when the object does not name it.
    pub(crate) fn from_json(obj: &Value, channel: &str) -> Option<PublishAck> {
        Some(PublishAck {
            channel: obj.get("channel").and_then(Value::as_str).unwrap_or(channel).to_owned(),
            offset: obj.get("offset")?.as_u64()?,
            epoch: obj.get("epoch").and_then(scalar_to_string),
        })
    }
}

/// What a pending request received.
enum Reply {
    Ack(Value),
    Pong,
    Error(ServerError),
}

/// A connected native-protocol session.
///
/// Methods take `&mut self`: a client is one connection driven by one task. Requests
/// (`subscribe`, `publish`, `ping`, ...) wait for their own answer by `id`; messages and other
/// events that arrive meanwhile are queued and returned by [`Client::next_event`] in order.
pub struct Client {
    ws: WsStream,
    welcome: Welcome,
    opts: ConnectOptions,
    next_id: u64,
    /// Events received but not yet handed to the application.
    pending: VecDeque<Event>,
    /// Set once the connection is closed; `Closed` has been queued or returned by then.
    closed: Option<CloseInfo>,
    closed_reported: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("session", &self.welcome.session)
            .field("pending", &self.pending.len())
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects with default options and waits for the welcome frame.
    ///
    /// `url` is `ws://host:port/path` (`http://` works too, an empty path means `/ws`). A server
    /// that closes instead of welcoming (connection limit, origin policy) yields
    /// [`Error::Closed`] with its close code.
    pub async fn connect(url: &str) -> Result<Client, Error> {
        Self::connect_with(url, ConnectOptions::default()).await
    }

    /// Connects with explicit options (origin, headers, auto-pong, source address, timeouts).
    pub async fn connect_with(url: &str, opts: ConnectOptions) -> Result<Client, Error> {
        let (ws, welcome, early) = connect_raw(url, &opts).await?;
        let mut client = Client {
            ws,
            welcome,
            opts,
            next_id: 1,
            pending: VecDeque::new(),
            closed: None,
            closed_reported: false,
        };
        for frame in early {
            client.route(frame, None).await;
        }
        Ok(client)
    }

    /// The session id from the welcome frame.
    pub fn session(&self) -> &str {
        &self.welcome.session
    }

    /// The server's heartbeat interval from the welcome frame.
    pub fn ping_interval_ms(&self) -> u64 {
        self.welcome.ping_interval_ms
    }

    /// The whole welcome frame.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// How the connection ended, once it has.
    pub fn close_info(&self) -> Option<&CloseInfo> {
        self.closed.as_ref()
    }

    /// Turns automatic answers to server pings on or off.
    pub fn set_auto_pong(&mut self, on: bool) {
        self.opts.auto_pong = on;
    }

    /// Subscribes to `channels`. Per-channel failures are reported inside the ack, not as `Err`.
    pub async fn subscribe(&mut self, channels: &[&str]) -> Result<SubscribeAck, Error> {
        self.subscribe_recover(channels, &BTreeMap::new()).await
    }

    /// Subscribes, asking the server to replay what was missed since `recover`'s positions.
    /// Replayed messages follow the ack and are returned by [`Client::next_event`].
    pub async fn subscribe_recover(
        &mut self,
        channels: &[&str],
        recover: &BTreeMap<String, Position>,
    ) -> Result<SubscribeAck, Error> {
        let id = self.take_id();
        let mut op = json!({"op": "subscribe", "id": id, "channels": channels});
        if !recover.is_empty() {
            op["recover"] = serde_json::to_value(recover).expect("positions serialize");
        }
        let ack = self.request(id, op).await?;
        Ok(parse_subscribe_ack(&ack, channels))
    }

    /// Unsubscribes from `channels`.
    pub async fn unsubscribe(&mut self, channels: &[&str]) -> Result<(), Error> {
        let id = self.take_id();
        self.request(id, json!({"op": "unsubscribe", "id": id, "channels": channels})).await?;
        Ok(())
    }

    /// Publishes `data` to `channel` over the WebSocket (where the namespace allows client
    /// publishing; otherwise the result is `Err(Error::Server)` with code `forbidden`).
    pub async fn publish(
        &mut self,
        channel: &str,
        data: impl Serialize,
    ) -> Result<PublishAck, Error> {
        let id = self.take_id();
        let data = serde_json::to_value(data)
            .map_err(|e| Error::Protocol(format!("publish data is not JSON: {e}")))?;
        let ack = self
            .request(id, json!({"op": "publish", "id": id, "channel": channel, "data": data}))
            .await?;
        // The offset may sit in `result` or at the top level of the ack; accept both.
        ack.get("result")
            .and_then(|r| PublishAck::from_json(r, channel))
            .or_else(|| PublishAck::from_json(&ack, channel))
            .ok_or_else(|| Error::Protocol(format!("publish ack without offset: {ack}")))
    }

    /// Measures the round-trip time of an application-level `ping` op.
    pub async fn ping(&mut self) -> Result<Duration, Error> {
        let id = self.take_id();
        let started = Instant::now();
        self.request(id, json!({"op": "ping", "id": id})).await?;
        Ok(started.elapsed())
    }

    /// Sends `{"op":"pong"}` by hand (for tests that turned auto-pong off).
    pub async fn send_pong(&mut self) -> Result<(), Error> {
        self.send_text(r#"{"op":"pong"}"#.to_owned()).await
    }

    /// Sends an arbitrary text frame, e.g. a malformed one to test error handling.
    pub async fn send_raw(&mut self, text: impl Into<String>) -> Result<(), Error> {
        self.send_text(text.into()).await
    }

    /// Sends a binary frame (the native protocol is text-only: servers close with 1003).
    pub async fn send_binary(&mut self, bytes: impl Into<Vec<u8>>) -> Result<(), Error> {
        self.ensure_open()?;
        let bytes: Vec<u8> = bytes.into();
        self.ws.send(WsMessage::Binary(bytes.into())).await?;
        Ok(())
    }

    /// The next event: buffered ones first, then whatever the server sends next.
    ///
    /// Returns `Some(Event::Closed(..))` once when the connection ends and `None` afterwards.
    /// Cancel-safe: it can be raced in `tokio::select!` or wrapped in `tokio::time::timeout`.
    pub async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                if matches!(event, Event::Closed(_)) {
                    self.closed_reported = true;
                }
                return Some(event);
            }
            if self.closed.is_some() {
                if self.closed_reported {
                    return None;
                }
                self.closed_reported = true;
                return self.closed.clone().map(Event::Closed);
            }
            // Errors close the connection and queue `Closed`, so they need no handling here.
            let _ = self.pump(None).await;
        }
    }

    /// The next channel message, skipping pings and unknown frames.
    ///
    /// An `error` frame, an `unsubscribed` notice or the close becomes an `Err`.
    pub async fn next_message(&mut self) -> Result<Message, Error> {
        loop {
            match self.next_event().await {
                Some(Event::Msg(m)) => return Ok(m),
                Some(Event::Ping | Event::Other(_)) => continue,
                Some(Event::Error(e)) => return Err(Error::Server(e)),
                Some(Event::Unsubscribed { channel, reason }) => {
                    return Err(Error::Protocol(format!(
                        "server unsubscribed {channel}: {reason}"
                    )));
                }
                Some(Event::Closed(info)) => return Err(Error::Closed(info)),
                None => {
                    return Err(Error::Closed(
                        self.closed.clone().unwrap_or_else(|| CloseInfo::abnormal("closed")),
                    ));
                }
            }
        }
    }

    /// Reads (and discards) events until the server closes, returning how it closed.
    /// Auto-pong keeps working meanwhile, if enabled.
    pub async fn wait_closed(&mut self) -> CloseInfo {
        while let Some(event) = self.next_event().await {
            if let Event::Closed(info) = event {
                return info;
            }
        }
        self.closed.clone().unwrap_or_else(|| CloseInfo::abnormal("closed"))
    }

    /// Closes the connection with code 1000 and waits briefly for the server's close reply.
    pub async fn close(mut self) -> Result<(), Error> {
        if self.closed.is_some() {
            return Ok(());
        }
        self.ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() })).await?;
        // Drain until the server acknowledges, so the server sees a clean 1000.
        let deadline = self.opts.request_timeout;
        let _ = tokio::time::timeout(deadline, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
        Ok(())
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn ensure_open(&self) -> Result<(), Error> {
        match &self.closed {
            Some(info) => Err(Error::Closed(info.clone())),
            None => Ok(()),
        }
    }

    async fn send_text(&mut self, text: String) -> Result<(), Error> {
        self.ensure_open()?;
        if let Err(e) = self.ws.send(WsMessage::Text(text.into())).await {
            let err = Error::from(e);
            // The server usually explains why it stopped reading (1009, 4008, ...) in a close
            // frame that is already waiting in the socket; prefer its code to the write error.
            let info = match tokio::time::timeout(Duration::from_millis(200), self.ws.next()).await
            {
                Ok(Some(Ok(WsMessage::Close(frame)))) => close_info(frame),
                _ => CloseInfo::abnormal(err.to_string()),
            };
            self.mark_closed(info);
            return Err(self.closed_error());
        }
        Ok(())
    }

    /// Sends a request and waits for the ack/pong/error carrying `id`.
    async fn request(&mut self, id: u64, op: Value) -> Result<Value, Error> {
        self.send_text(op.to_string()).await?;
        let timeout = self.opts.request_timeout;
        let wait = async {
            loop {
                if let Some(reply) = self.pump(Some(id)).await? {
                    return Ok(reply);
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Err(_) => Err(Error::Timeout("the server's reply")),
            Ok(Err(e)) => Err(e),
            Ok(Ok(Reply::Ack(frame))) => Ok(frame),
            Ok(Ok(Reply::Pong)) => Ok(Value::Null),
            Ok(Ok(Reply::Error(e))) => Err(Error::Server(e)),
        }
    }

    /// Reads one WebSocket message and routes its frames. Returns the reply for `awaiting` if
    /// this message carried it; everything else is queued in `pending`.
    async fn pump(&mut self, awaiting: Option<u64>) -> Result<Option<Reply>, Error> {
        self.ensure_open()?;
        let message = match self.ws.next().await {
            Some(Ok(message)) => message,
            Some(Err(e)) => {
                self.mark_closed(CloseInfo::abnormal(Error::from(e).to_string()));
                return Err(self.closed_error());
            }
            None => {
                self.mark_closed(CloseInfo::abnormal("connection closed without a close frame"));
                return Err(self.closed_error());
            }
        };
        match message {
            WsMessage::Text(text) => {
                let frames = match decode_text(text.as_str()) {
                    Ok(frames) => frames,
                    // One bad frame should not kill the session; surface it as an event.
                    Err(e) => {
                        self.pending.push_back(Event::Error(ServerError {
                            id: None,
                            code: "client_decode_error".into(),
                            message: e.to_string(),
                        }));
                        return Ok(None);
                    }
                };
                let mut reply = None;
                for frame in frames {
                    if let Some(r) = self.route(frame, awaiting).await {
                        reply = Some(r);
                    }
                }
                Ok(reply)
            }
            WsMessage::Close(frame) => {
                self.mark_closed(close_info(frame));
                // Let tungstenite send the close reply it queued; failure here is harmless.
                let _ = self.ws.flush().await;
                Err(self.closed_error())
            }
            WsMessage::Binary(bytes) => {
                self.pending.push_back(Event::Other(Value::String(format!(
                    "unexpected binary frame of {} bytes",
                    bytes.len()
                ))));
                Ok(None)
            }
            // WebSocket control frames are answered by tungstenite itself.
            WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => Ok(None),
        }
    }

    /// Routes one decoded frame: the awaited reply is returned, the rest is queued.
    async fn route(&mut self, frame: ServerFrame, awaiting: Option<u64>) -> Option<Reply> {
        let is_awaited = |id: Option<u64>| id.is_some() && id == awaiting;
        match frame {
            ServerFrame::Msg(m) => self.pending.push_back(Event::Msg(m)),
            ServerFrame::Ping => {
                if self.opts.auto_pong {
                    // A failed pong means the connection is going away; the next read says how.
                    let _ = self.ws.send(WsMessage::Text(r#"{"op":"pong"}"#.into())).await;
                }
                self.pending.push_back(Event::Ping);
            }
            ServerFrame::Ack { id, frame } if is_awaited(id) => return Some(Reply::Ack(frame)),
            ServerFrame::Pong { id } if is_awaited(id) => return Some(Reply::Pong),
            ServerFrame::Error(e) if is_awaited(e.id) => return Some(Reply::Error(e)),
            // Late answers to requests that timed out or were cancelled.
            ServerFrame::Ack { .. } | ServerFrame::Pong { .. } => {}
            ServerFrame::Error(e) => self.pending.push_back(Event::Error(e)),
            ServerFrame::Unsubscribed { channel, reason } => {
                self.pending.push_back(Event::Unsubscribed { channel, reason });
            }
            ServerFrame::Welcome(w) => {
                self.pending.push_back(Event::Other(json!({
                    "type": "welcome", "session": w.session, "version": w.version,
                    "ping_interval_ms": w.ping_interval_ms,
                })));
            }
            ServerFrame::Other(v) => self.pending.push_back(Event::Other(v)),
        }
        None
    }

    fn mark_closed(&mut self, info: CloseInfo) {
        if self.closed.is_none() {
            self.closed = Some(info);
        }
    }

    fn closed_error(&self) -> Error {
        Error::Closed(self.closed.clone().unwrap_or_else(|| CloseInfo::abnormal("closed")))
    }
}

fn parse_subscribe_ack(ack: &Value, channels: &[&str]) -> SubscribeAck {
    let result = ack.get("result").and_then(Value::as_object);
    let mut out = BTreeMap::new();
    for channel in channels {
        let entry = result.and_then(|r| r.get(*channel));
        let parsed = match entry {
            Some(v) if v.get("error").is_some() => {
                let err = &v["error"];
                Err(ErrorInfo {
                    code: err
                        .get("code")
                        .and_then(scalar_to_string)
                        .unwrap_or_else(|| "unknown".into()),
                    message: err
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                })
            }
            Some(v) => Ok(Subscribed {
                epoch: v.get("epoch").and_then(scalar_to_string).unwrap_or_default(),
                offset: v.get("offset").and_then(Value::as_u64).unwrap_or(0),
                recovered: v.get("recovered").and_then(Value::as_bool).unwrap_or(false),
            }),
            // A bare ack without per-channel detail still means success.
            None => Ok(Subscribed { epoch: String::new(), offset: 0, recovered: false }),
        };
        out.insert((*channel).to_owned(), parsed);
    }
    SubscribeAck { channels: out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribe_ack_mixes_results_and_errors() {
        let ack: Value = serde_json::from_str(
            r#"{"type":"ack","id":1,"result":{
                "ticks.AAPL":{"epoch":"e","offset":57,"recovered":true},
                "admin.x":{"error":{"code":"forbidden","message":"nope"}}}}"#,
        )
        .unwrap();
        let parsed = parse_subscribe_ack(&ack, &["ticks.AAPL", "admin.x", "bare"]);
        assert!(!parsed.is_ok());
        assert_eq!(
            parsed.get("ticks.AAPL"),
            Some(&Subscribed { epoch: "e".into(), offset: 57, recovered: true })
        );
        assert_eq!(parsed.error("admin.x").unwrap().code, "forbidden");
        assert_eq!(parsed.first_error().unwrap().0, "admin.x");
        assert_eq!(parsed.get("bare").unwrap().offset, 0);
        assert_eq!(parsed.get("ticks.AAPL").unwrap().position().offset, 57);
    }

    #[test]
    fn publish_ack_is_read_from_result_or_top_level() {
        let nested = json!({"type":"ack","id":3,"result":{"channel":"c","offset":9,"epoch":"e"}});
        let ack = PublishAck::from_json(&nested["result"], "c").unwrap();
        assert_eq!(ack.offset, 9);
        assert_eq!(ack.epoch.as_deref(), Some("e"));
        let flat = json!({"type":"ack","id":3,"offset":4});
        let ack = PublishAck::from_json(&flat, "chan").unwrap();
        assert_eq!((ack.channel.as_str(), ack.offset, ack.epoch), ("chan", 4, None));
        assert!(PublishAck::from_json(&json!({"type":"ack"}), "c").is_none());
    }
}
