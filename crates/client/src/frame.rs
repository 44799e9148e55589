//! Decoding of server frames of the native `/ws` protocol, without any I/O so it can be unit-tested.
//!
//! A server text frame is either one JSON object or, when the server batches, a JSON array of
//! objects. [`decode_text`] turns either shape into a list of [`ServerFrame`]s. Decoding is
//! deliberately lenient (unknown fields are ignored, ids, codes and epochs may be numbers or
//! strings) because the wire contract allows the server to grow.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_json::value::RawValue;

/// The first frame the server sends after the upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Server-assigned session id.
    pub session: String,
    /// Protocol version (1 for this contract).
    pub version: u32,
    /// How often the server sends `{"type":"ping"}`; the client must answer each with a pong.
    pub ping_interval_ms: u64,
}

/// A channel message (`{"type":"msg",...}`).
#[derive(Debug, Clone)]
pub struct Message {
    /// The channel the message was published to.
    pub channel: String,
    /// Position in the channel; grows by one per message within an epoch.
    pub offset: u64,
    /// The channel's epoch, when the server includes it in message frames.
    pub epoch: Option<String>,
    /// The message payload exactly as the server sent it (`null` when absent).
    pub data: Box<RawValue>,
}

impl Message {
    /// The payload parsed into a [`serde_json::Value`].
    pub fn data_value(&self) -> Value {
        // A RawValue always holds valid JSON, so this cannot fail.
        serde_json::from_str(self.data.get()).unwrap_or(Value::Null)
    }

    /// The payload deserialized into `T`.
    pub fn data_as<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.data.get())
    }
}

/// An `error` frame from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// The id of the request this answers; `None` when the offending frame had none.
    pub id: Option<u64>,
    /// Machine-readable code such as `bad_request` or `forbidden`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// One decoded server frame.
#[derive(Debug, Clone)]
pub enum ServerFrame {
    /// `{"type":"welcome",...}`
    Welcome(Welcome),
    /// `{"type":"msg",...}`
    Msg(Message),
    /// `{"type":"ack","id":N,...}`; `frame` is the whole object, because what an ack carries
    /// depends on the op it answers.
    Ack { id: Option<u64>, frame: Value },
    /// `{"type":"pong","id":N}`
    Pong { id: Option<u64> },
    /// `{"type":"ping"}`: must be answered with `{"op":"pong"}`.
    Ping,
    /// `{"type":"error",...}`
    Error(ServerError),
    /// `{"type":"unsubscribed","channel":C,"reason":R}`
    Unsubscribed { channel: String, reason: String },
    /// A frame of a type this client does not know (kept so callers can inspect it).
    Other(Value),
}

/// Why a text frame could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("undecodable server frame ({reason}): {snippet}")]
pub struct DecodeError {
    reason: String,
    snippet: String,
}

impl DecodeError {
    fn new(reason: impl std::fmt::Display, text: &str) -> Self {
        // Keep error messages readable even when the frame is megabytes long.
        let snippet: String = text.chars().take(200).collect();
        DecodeError { reason: reason.to_string(), snippet }
    }
}

/// Every field any known frame type may carry; absent ones stay `None`.
#[derive(Deserialize)]
struct WireFrame {
    #[serde(rename = "type")]
    kind: Option<String>,
    id: Option<Value>,
    channel: Option<String>,
    offset: Option<u64>,
    epoch: Option<Value>,
    data: Option<Box<RawValue>>,
    code: Option<Value>,
    message: Option<String>,
    reason: Option<String>,
    session: Option<String>,
    version: Option<u32>,
    ping_interval_ms: Option<u64>,
}

/// Decodes one server text frame (a single object or an array of objects).
pub fn decode_text(text: &str) -> Result<Vec<ServerFrame>, DecodeError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let items: Vec<&RawValue> =
            serde_json::from_str(trimmed).map_err(|e| DecodeError::new(e, text))?;
        items.into_iter().map(|raw| decode_object(raw.get())).collect()
    } else {
        Ok(vec![decode_object(trimmed)?])
    }
}

fn decode_object(text: &str) -> Result<ServerFrame, DecodeError> {
    let wire: WireFrame = serde_json::from_str(text).map_err(|e| DecodeError::new(e, text))?;
    let id = wire.id.as_ref().and_then(Value::as_u64);
    let frame = match wire.kind.as_deref() {
        Some("msg") => ServerFrame::Msg(Message {
            channel: wire.channel.ok_or_else(|| DecodeError::new("msg without channel", text))?,
            offset: wire.offset.ok_or_else(|| DecodeError::new("msg without offset", text))?,
            epoch: wire.epoch.as_ref().and_then(scalar_to_string),
            data: wire.data.unwrap_or_else(null_raw),
        }),
        Some("welcome") => ServerFrame::Welcome(Welcome {
            session: wire.session.unwrap_or_default(),
            version: wire.version.unwrap_or(1),
            ping_interval_ms: wire.ping_interval_ms.unwrap_or(25_000),
        }),
        Some("ack") => ServerFrame::Ack {
            id,
            frame: serde_json::from_str(text).map_err(|e| DecodeError::new(e, text))?,
        },
        Some("pong") => ServerFrame::Pong { id },
        Some("ping") => ServerFrame::Ping,
        Some("error") => ServerFrame::Error(ServerError {
            id,
            code: wire
                .code
                .as_ref()
                .and_then(scalar_to_string)
                .unwrap_or_else(|| "unknown".to_owned()),
            message: wire.message.unwrap_or_default(),
        }),
        Some("unsubscribed") => ServerFrame::Unsubscribed {
            channel: wire.channel.unwrap_or_default(),
            reason: wire.reason.unwrap_or_default(),
        },
        _ => ServerFrame::Other(serde_json::from_str(text).map_err(|e| DecodeError::new(e, text))?),
    };
    Ok(frame)
}

/// Renders a JSON string or number as text (ids, codes and epochs may be either on the wire).
pub(crate) fn scalar_to_string(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn null_raw() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).expect("`null` is valid JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> ServerFrame {
        let mut frames = decode_text(text).expect("decodes");
        assert_eq!(frames.len(), 1, "{frames:?}");
        frames.remove(0)
    }

    #[test]
    fn decodes_welcome() {
        let frame =
            one(r#"{"type":"welcome","session":"s1","version":1,"ping_interval_ms":25000}"#);
        let ServerFrame::Welcome(w) = frame else { panic!("{frame:?}") };
        assert_eq!(w, Welcome { session: "s1".into(), version: 1, ping_interval_ms: 25_000 });
    }

    #[test]
    fn decodes_single_message_keeping_raw_data() {
        let frame = one(
            r#"{"type":"msg","channel":"ticks.AAPL","offset":58,"epoch":"e1","data":{"p": 1.5,"q":[1,2]},"extra":true}"#,
        );
        let ServerFrame::Msg(m) = frame else { panic!("{frame:?}") };
        assert_eq!(m.channel, "ticks.AAPL");
        assert_eq!(m.offset, 58);
        assert_eq!(m.epoch.as_deref(), Some("e1"));
        assert_eq!(m.data.get(), r#"{"p": 1.5,"q":[1,2]}"#);
        assert_eq!(m.data_value()["q"][1], 2);
    }

    #[test]
    fn decodes_message_without_data_or_epoch() {
        let ServerFrame::Msg(m) = one(r#"{"type":"msg","channel":"a","offset":1}"#) else {
            panic!()
        };
        assert_eq!(m.epoch, None);
        assert_eq!(m.data.get(), "null");
    }

    #[test]
    fn numeric_epoch_is_accepted() {
        let ServerFrame::Msg(m) =
            one(r#"{"type":"msg","channel":"a","offset":1,"epoch":7,"data":1}"#)
        else {
            panic!()
        };
        assert_eq!(m.epoch.as_deref(), Some("7"));
    }

    #[test]
    fn decodes_batched_array() {
        let frames = decode_text(
            r#" [{"type":"msg","channel":"a","offset":1,"data":"x"},{"type":"msg","channel":"a","offset":2,"data":"y"},{"type":"ping"}]"#,
        )
        .unwrap();
        assert_eq!(frames.len(), 3);
        let offsets: Vec<u64> = frames
            .iter()
            .filter_map(|f| match f {
                ServerFrame::Msg(m) => Some(m.offset),
                _ => None,
            })
            .collect();
        assert_eq!(offsets, [1, 2]);
        assert!(matches!(frames[2], ServerFrame::Ping));
    }

    #[test]
    fn decodes_empty_batch() {
        assert!(decode_text("[]").unwrap().is_empty());
    }

    #[test]
    fn decodes_error_with_and_without_id() {
        let ServerFrame::Error(e) =
            one(r#"{"type":"error","id":3,"code":"forbidden","message":"no publish"}"#)
        else {
            panic!()
        };
        assert_eq!(
            e,
            ServerError { id: Some(3), code: "forbidden".into(), message: "no publish".into() }
        );
        let ServerFrame::Error(e) =
            one(r#"{"type":"error","id":null,"code":"bad_request","message":"x"}"#)
        else {
            panic!()
        };
        assert_eq!(e.id, None);
        assert_eq!(e.code, "bad_request");
    }

    #[test]
    fn decodes_ack_pong_ping_unsubscribed() {
        let ServerFrame::Ack { id, frame } = one(
            r#"{"type":"ack","id":1,"result":{"a":{"epoch":"e","offset":57,"recovered":true}}}"#,
        ) else {
            panic!()
        };
        assert_eq!(id, Some(1));
        assert_eq!(frame["result"]["a"]["offset"], 57);
        assert!(matches!(one(r#"{"type":"pong","id":4}"#), ServerFrame::Pong { id: Some(4) }));
        assert!(matches!(one(r#"{"type":"ping"}"#), ServerFrame::Ping));
        let ServerFrame::Unsubscribed { channel, reason } =
            one(r#"{"type":"unsubscribed","channel":"a","reason":"kicked"}"#)
        else {
            panic!()
        };
        assert_eq!((channel.as_str(), reason.as_str()), ("a", "kicked"));
    }

    #[test]
    fn unknown_type_is_kept() {
        let ServerFrame::Other(v) = one(r#"{"type":"presence","n":3}"#) else { panic!() };
        assert_eq!(v["n"], 3);
    }

    #[test]
    fn malformed_frames_are_errors() {
        assert!(decode_text("not json").is_err());
        assert!(decode_text(r#"{"type":"msg","channel":"a"}"#).is_err());
        assert!(decode_text(r#"[{"type":"msg","offset":1}]"#).is_err());
        let err = decode_text(&format!("[{}", "x".repeat(10_000))).unwrap_err();
        assert!(err.to_string().len() < 400, "snippet is bounded");
    }
}
