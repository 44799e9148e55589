//! Parsing of client frames sent over `/ws` (and the SSE control endpoint).
//!
//! A frame is one JSON object with an `op`. Unknown fields are ignored; an unknown `op`, a
//! missing field or a field of the wrong type gives a [`FrameError`] carrying the request id
//! when it could be read, so the server can answer with an `error` frame and keep the
//! connection open.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{ErrorCode, FrameError};

/// Where a client stands in a channel's stream: the epoch and the last offset it received.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct StreamPosition {
    pub epoch: String,
    pub offset: u64,
}

/// A parsed client frame. Borrowed from the input where possible.
#[derive(Debug)]
pub enum ClientFrame<'a> {
    Subscribe {
        id: Option<u64>,
        channels: Vec<Cow<'a, str>>,
        /// Recovery positions by channel, for channels the client had before a reconnect.
        recover: BTreeMap<String, StreamPosition>,
        /// Subscription tokens by channel.
        tokens: BTreeMap<String, String>,
    },
    Unsubscribe {
        id: Option<u64>,
        channels: Vec<Cow<'a, str>>,
    },
    Publish {
        id: Option<u64>,
        channel: Cow<'a, str>,
        data: &'a RawValue,
    },
    Ping {
        id: Option<u64>,
    },
    Pong,
    /// Presents (or refreshes) the connection's token.
    Auth {
        id: Option<u64>,
        token: Cow<'a, str>,
    },
}

impl ClientFrame<'_> {
    /// The request id, if the frame carries one.
    pub fn id(&self) -> Option<u64> {
        match self {
            ClientFrame::Subscribe { id, .. }
            | ClientFrame::Unsubscribe { id, .. }
            | ClientFrame::Publish { id, .. }
            | ClientFrame::Ping { id }
            | ClientFrame::Auth { id, .. } => *id,
            ClientFrame::Pong => None,
        }
    }
}

#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(borrow, default)]
    op: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    channels: Option<Vec<Cow<'a, str>>>,
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    recover: Option<BTreeMap<String, StreamPosition>>,
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
    /// Subscription tokens by channel (namespaces with `subscribe = "token"`).
    #[serde(default)]
    tokens: Option<BTreeMap<String, String>>,
}

/// Parses one client frame.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame<'_>, FrameError> {
    let raw: RawFrame<'_> = serde_json::from_str(text).map_err(|e| {
        FrameError::new(
            sniff_id(text),
            ErrorCode::BadRequest,
            format!("frame is not a valid JSON object: {e}"),
        )
    })?;
    let id = match raw.id {
        None => None,
        Some(v) if v.get() == "null" => None,
        Some(v) => Some(v.get().parse::<u64>().map_err(|_| {
            FrameError::new(
                None,
                ErrorCode::BadRequest,
                format!("\"id\" must be a non-negative integer, got {}", v.get()),
            )
        })?),
    };
    let Some(op) = raw.op else {
        return Err(FrameError::new(id, ErrorCode::BadRequest, "frame has no \"op\" field"));
    };
    let missing = |field: &str| {
        FrameError::new(id, ErrorCode::BadRequest, format!("\"{op}\" needs a \"{field}\" field"))
    };
    match op.as_ref() {
        "subscribe" => Ok(ClientFrame::Subscribe {
            id,
            channels: raw.channels.ok_or_else(|| missing("channels"))?,
            recover: raw.recover.unwrap_or_default(),
            tokens: raw.tokens.unwrap_or_default(),
        }),
        "unsubscribe" => Ok(ClientFrame::Unsubscribe {
            id,
            channels: raw.channels.ok_or_else(|| missing("channels"))?,
        }),
        "publish" => Ok(ClientFrame::Publish {
            id,
            channel: raw.channel.ok_or_else(|| missing("channel"))?,
            data: raw.data.ok_or_else(|| missing("data"))?,
        }),
        "ping" => Ok(ClientFrame::Ping { id }),
        "pong" => Ok(ClientFrame::Pong),
        "auth" => Ok(ClientFrame::Auth { id, token: raw.token.ok_or_else(|| missing("token"))? }),
        other => Err(FrameError::new(
            id,
            ErrorCode::UnknownOp,
            format!(
                "unknown op {other:?}; expected subscribe, unsubscribe, publish, auth, ping or pong"
            ),
        )),
    }
}

/// Best effort at the request id of a frame that failed to parse, so the error can name it.
fn sniff_id(text: &str) -> Option<u64> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: u64,
    }
    serde_json::from_str::<IdOnly>(text).ok().map(|f| f.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_subscribe_with_recovery() {
        let f = parse_client_frame(
            r#"{"op":"subscribe","id":1,"channels":["ticks.AAPL"],"recover":{"ticks.AAPL":{"epoch":"e","offset":41}},"extra":true}"#,
        )
        .unwrap();
        let ClientFrame::Subscribe { id, channels, recover, .. } = f else { panic!("{f:?}") };
        assert_eq!(id, Some(1));
        assert_eq!(channels, vec!["ticks.AAPL"]);
        assert_eq!(recover["ticks.AAPL"], StreamPosition { epoch: "e".into(), offset: 41 });
    }

    #[test]
    fn parses_auth_and_subscription_tokens() {
        let f = parse_client_frame(r#"{"op":"auth","id":1,"token":"a.b.c"}"#).unwrap();
        let ClientFrame::Auth { id, token } = f else { panic!("{f:?}") };
        assert_eq!((id, token.as_ref()), (Some(1), "a.b.c"));
        let e = parse_client_frame(r#"{"op":"auth","id":2}"#).unwrap_err();
        assert_eq!((e.id, e.code), (Some(2), ErrorCode::BadRequest));
        let f = parse_client_frame(r#"{"op":"subscribe","channels":["a"],"tokens":{"a":"t"}}"#)
            .unwrap();
        let ClientFrame::Subscribe { tokens, .. } = f else { panic!("{f:?}") };
        assert_eq!(tokens["a"], "t");
    }

    #[test]
    fn publish_keeps_raw_data() {
        let f = parse_client_frame(
            r#"{"op":"publish","id":3,"channel":"chat.lobby","data":{"a":[1,2]}}"#,
        )
        .unwrap();
        let ClientFrame::Publish { data, channel, .. } = f else { panic!() };
        assert_eq!(channel, "chat.lobby");
        assert_eq!(data.get(), r#"{"a":[1,2]}"#);
    }

    #[test]
    fn errors_keep_the_id() {
        let e = parse_client_frame(r#"{"op":"dance","id":7}"#).unwrap_err();
        assert_eq!((e.id, e.code), (Some(7), ErrorCode::UnknownOp));
        let e = parse_client_frame(r#"{"op":"subscribe","id":8}"#).unwrap_err();
        assert_eq!((e.id, e.code), (Some(8), ErrorCode::BadRequest));
        let e = parse_client_frame(r#"{"op":"subscribe","id":9,"channels":"x"}"#).unwrap_err();
        assert_eq!((e.id, e.code), (Some(9), ErrorCode::BadRequest));
    }

    #[test]
    fn malformed_json_is_bad_request() {
        for bad in ["", "{", "[]", "42", "{\"op\":1}", "\u{0}"] {
            let e = parse_client_frame(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{bad:?}");
        }
        let e = parse_client_frame(r#"{"op":"ping","id":-1}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
    }

    #[test]
    fn escaped_channel_names_are_decoded() {
        let f = parse_client_frame(r#"{"op":"unsubscribe","channels":["a\u002eb"]}"#).unwrap();
        let ClientFrame::Unsubscribe { id, channels } = f else { panic!("{f:?}") };
        assert_eq!((id, channels), (None, vec![Cow::from("a.b")]));
    }

    #[test]
    fn deep_data_and_deep_unknown_fields_parse_without_recursion() {
        // serde_json skips raw values and ignored fields iteratively: a million levels parse
        // on the test thread's stack. The depth of `data` is checked by the caller.
        let deep = "[".repeat(1_000_000) + &"]".repeat(1_000_000);
        let text = format!(r#"{{"op":"publish","channel":"chat.a","data":{deep},"x":{deep}}}"#);
        let ClientFrame::Publish { data, .. } = parse_client_frame(&text).unwrap() else {
            panic!()
        };
        assert_eq!(crate::nesting_depth(data.get().as_bytes()), 1_000_000);
        // Typed fields keep serde_json's recursion limit: a deep `recover` is a bad request.
        let text = format!(r#"{{"op":"subscribe","channels":[],"recover":{deep}}}"#);
        assert_eq!(parse_client_frame(&text).unwrap_err().code, ErrorCode::BadRequest);
    }
}
