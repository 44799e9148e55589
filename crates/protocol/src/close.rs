//! WebSocket close codes used by ferrocast, and what each one tells a client.

/// A close code from the table in `PROTOCOL.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 1000: normal closure.
    Normal,
    /// 1001: the server is shutting down or draining; reconnect after the hinted delay.
    GoingAway,
    /// 1002: the peer broke the WebSocket protocol.
    ProtocolError,
    /// 1003: a frame type the server does not accept (binary frames).
    Unsupported,
    /// 1007: a text frame that is not valid UTF-8.
    InvalidPayload,
    /// 1008: policy violation, such as an Origin outside the allowlist.
    PolicyViolation,
    /// 1009: a frame larger than `max_frame_bytes`.
    TooBig,
    /// 1011: internal server error.
    Internal,
    /// 1013: try again later: the connection limit is reached or the server is overloaded.
    TryAgainLater,
    /// 4001: unauthorized.
    Unauthorized,
    /// 4003: forbidden.
    Forbidden,
    /// 4011: the connection's token expired and no fresh one arrived in time: get a new
    /// token, then reconnect.
    TokenExpired,
    /// 4008: slow consumer: the outbound queue overflowed on a channel that must not drop.
    SlowConsumer,
    /// 4009: heartbeat timeout: no pong within the configured timeout.
    HeartbeatTimeout,
    /// 4029: rate limited.
    RateLimited,
}

impl CloseCode {
    /// Every code, for documentation and metrics.
    pub const ALL: [CloseCode; 15] = [
        CloseCode::Normal,
        CloseCode::GoingAway,
        CloseCode::ProtocolError,
        CloseCode::Unsupported,
        CloseCode::InvalidPayload,
        CloseCode::PolicyViolation,
        CloseCode::TooBig,
        CloseCode::Internal,
        CloseCode::TryAgainLater,
        CloseCode::Unauthorized,
        CloseCode::Forbidden,
        CloseCode::TokenExpired,
        CloseCode::SlowConsumer,
        CloseCode::HeartbeatTimeout,
        CloseCode::RateLimited,
    ];

    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::ProtocolError => 1002,
            CloseCode::Unsupported => 1003,
            CloseCode::InvalidPayload => 1007,
            CloseCode::PolicyViolation => 1008,
            CloseCode::TooBig => 1009,
            CloseCode::Internal => 1011,
            CloseCode::TryAgainLater => 1013,
            CloseCode::Unauthorized => 4001,
            CloseCode::Forbidden => 4003,
            CloseCode::TokenExpired => 4011,
            CloseCode::SlowConsumer => 4008,
            CloseCode::HeartbeatTimeout => 4009,
            CloseCode::RateLimited => 4029,
        }
    }

    /// A short default reason text, sent in the close frame.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal closure",
            CloseCode::GoingAway => "server going away",
            CloseCode::ProtocolError => "protocol error",
            CloseCode::Unsupported => "binary frames are not supported; send JSON text frames",
            CloseCode::InvalidPayload => "text frame is not valid UTF-8",
            CloseCode::PolicyViolation => "origin not allowed",
            CloseCode::TooBig => "frame larger than the configured limit",
            CloseCode::Internal => "internal error",
            CloseCode::TryAgainLater => "connection limit reached; try again later",
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::Forbidden => "forbidden",
            CloseCode::TokenExpired => "token expired: get a new token, then reconnect",
            CloseCode::SlowConsumer => "slow consumer: outbound queue overflowed",
            CloseCode::HeartbeatTimeout => "heartbeat timeout: no pong received",
            CloseCode::RateLimited => "rate limited",
        }
    }
}
