//! Error codes carried by `error` frames and per-channel ack errors.

use std::fmt;

/// A machine-readable error code (the `code` field of an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The frame is not valid JSON, or a field has the wrong type.
    BadRequest,
    /// The `op` is not one this server knows.
    UnknownOp,
    /// A channel name breaks the naming rules.
    InvalidChannel,
    /// More channels in one request than `max_channels_per_subscribe`.
    TooManyChannels,
    /// The connection already holds `max_subscriptions` subscriptions.
    LimitExceeded,
    /// The namespace does not allow this operation from clients.
    Forbidden,
    /// Unsubscribe or publish on a channel the connection is not subscribed to (where required).
    NotSubscribed,
    /// The server could not complete the request (for example the broker is down).
    Unavailable,
    /// An upstream feed refused the subscription (for example a contract limit).
    UpstreamRejected,
    /// Unexpected failure inside the server.
    Internal,
    /// The server holds `server.max_channels` channels and may not create another.
    ChannelLimit,
    /// The channel does not exist and its namespace does not let a subscribe create it.
    UnknownChannel,
    /// The connection has no valid identity for this request (no token, or a token refused).
    Unauthorized,
    /// The token presented has expired (`exp` is past, beyond the allowed clock skew).
    TokenExpired,
    /// The connection sends requests faster than `limits.commands_per_s` allows.
    RateLimited,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::InvalidChannel => "invalid_channel",
            ErrorCode::TooManyChannels => "too_many_channels",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::UpstreamRejected => "upstream_rejected",
            ErrorCode::Internal => "internal",
            ErrorCode::ChannelLimit => "channel_limit",
            ErrorCode::UnknownChannel => "unknown_channel",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::RateLimited => "rate_limited",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request that could not be carried out: answered with an `error` frame, connection kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    /// The request id, when the frame had one that could be read.
    pub id: Option<u64>,
    pub code: ErrorCode,
    pub message: String,
}

impl FrameError {
    pub fn new(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> Self {
        FrameError { id, code, message: message.into() }
    }
}
