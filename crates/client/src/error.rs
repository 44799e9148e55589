//! The client's error type and the close-frame summary ([`CloseInfo`]) that tests assert on.

use std::fmt;

use crate::frame::{DecodeError, ServerError};

/// How a WebSocket connection ended: the close code and reason the server sent.
///
/// When the connection dropped without a close frame the code is 1006 (abnormal closure, the
/// code RFC 6455 reserves for exactly this) and the reason describes what happened locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    /// The close code, e.g. 1000, 1001, 1008, 4009.
    pub code: u16,
    /// The close reason text (for 1001 a JSON hint such as `{"reconnect":true,"after_ms":1200}`).
    pub reason: String,
}

impl CloseInfo {
    /// Code used when the peer vanished without a close frame.
    pub const ABNORMAL: u16 = 1006;
    /// Code used when a close frame carried no status code.
    pub const NO_STATUS: u16 = 1005;

    pub(crate) fn abnormal(reason: impl Into<String>) -> Self {
        CloseInfo { code: Self::ABNORMAL, reason: reason.into() }
    }

    /// The well-known name of [`Self::code`] from the wire contract, if it has one.
    pub fn code_name(&self) -> Option<&'static str> {
        Some(match self.code {
            1000 => "normal closure",
            1001 => "going away",
            1002 => "protocol error",
            1003 => "unsupported data",
            1005 => "no status",
            1006 => "abnormal closure",
            1008 => "policy violation",
            1009 => "message too big",
            1011 => "internal error",
            1013 => "try again later",
            4001 => "unauthorized",
            4003 => "forbidden",
            4008 => "slow consumer",
            4009 => "heartbeat timeout",
            4029 => "rate limited",
            _ => return None,
        })
    }
}

impl fmt::Display for CloseInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "code {}", self.code)?;
        if let Some(name) = self.code_name() {
            write!(f, " ({name})")?;
        }
        if !self.reason.is_empty() {
            write!(f, ": {}", self.reason)?;
        }
        Ok(())
    }
}

/// Everything that can go wrong talking to a ferrocast server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL could not be parsed or uses an unsupported scheme.
    #[error("invalid URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    /// The TCP connection could not be established.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// An I/O error on an established connection.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The server answered the WebSocket upgrade with a non-101 HTTP response.
    #[error("WebSocket upgrade rejected with HTTP {status}: {body}")]
    Rejected { status: u16, body: String },
    /// A WebSocket-level failure (boxed: the underlying error is large).
    #[error("WebSocket error: {0}")]
    WebSocket(Box<tokio_tungstenite::tungstenite::Error>),
    /// The server closed the connection (the close code is what tests usually assert on).
    #[error("connection closed: {0}")]
    Closed(CloseInfo),
    /// The server answered a request with an `error` frame.
    #[error("server error: {0}")]
    Server(ServerError),
    /// The server sent something this client cannot make sense of.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The server sent a well-formed frame that breaks the protocol (e.g. no welcome first).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// No answer within the configured timeout.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// An HTTP API call answered with a non-2xx status.
    #[error("HTTP {status}: {body}")]
    Http { status: u16, body: String },
}

impl Error {
    /// The close code when this error is a server close, for `assert_eq!(err.close_code(), Some(1013))`.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            Error::Closed(info) => Some(info.code),
            _ => None,
        }
    }

    /// The close details when this error is a server close.
    pub fn close_info(&self) -> Option<&CloseInfo> {
        match self {
            Error::Closed(info) => Some(info),
            _ => None,
        }
    }

    /// The server's error code when this error is an `error` frame or an HTTP API error.
    pub fn server_code(&self) -> Option<&str> {
        match self {
            Error::Server(e) => Some(&e.code),
            _ => None,
        }
    }
}

impl From<tokio_tungstenite::tungstenite::Error> for Error {
    fn from(err: tokio_tungstenite::tungstenite::Error) -> Self {
        use tokio_tungstenite::tungstenite::Error as WsError;
        match err {
            WsError::Http(response) => {
                let body = response
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                Error::Rejected { status: response.status().as_u16(), body }
            }
            WsError::Io(io) => Error::Io(io),
            other => Error::WebSocket(Box::new(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_info_display_names_known_codes() {
        let info = CloseInfo { code: 4009, reason: "no pong".into() };
        assert_eq!(info.to_string(), "code 4009 (heartbeat timeout): no pong");
        let info = CloseInfo { code: 4321, reason: String::new() };
        assert_eq!(info.to_string(), "code 4321");
        assert_eq!(Error::Closed(info).close_code(), Some(4321));
    }
}
