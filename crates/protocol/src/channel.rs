//! Channel names: what is allowed, and which namespace a channel belongs to.

use std::fmt;

/// Longest channel name accepted, in bytes.
pub const MAX_CHANNEL_LEN: usize = 255;

/// Why a channel name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelError {
    Empty,
    TooLong(usize),
    BadChar(char),
}

impl fmt::Display for ChannelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChannelError::Empty => f.write_str("channel name is empty"),
            ChannelError::TooLong(n) => {
                write!(f, "channel name is {n} bytes long; the limit is {MAX_CHANNEL_LEN}")
            }
            ChannelError::BadChar(c) => write!(
                f,
                "channel name contains {c:?}; allowed characters are A-Z a-z 0-9 _ . : @ -"
            ),
        }
    }
}

impl std::error::Error for ChannelError {}

/// Checks a channel name against `[A-Za-z0-9_.:@-]{1,255}`.
pub fn validate_channel(name: &str) -> Result<(), ChannelError> {
    if name.is_empty() {
        return Err(ChannelError::Empty);
    }
    if name.len() > MAX_CHANNEL_LEN {
        return Err(ChannelError::TooLong(name.len()));
    }
    match name.bytes().find(|b| !is_channel_byte(*b)) {
        None => Ok(()),
        Some(_) => {
            let bad = name.chars().find(|c| !c.is_ascii() || !is_channel_byte(*c as u8));
            Err(ChannelError::BadChar(bad.unwrap_or('?')))
        }
    }
}

fn is_channel_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'-')
}

/// The namespace of a channel: the part before the first `.`, or the whole name without one.
pub fn namespace_of(channel: &str) -> &str {
    channel.split_once('.').map_or(channel, |(ns, _)| ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_market_and_option_channels() {
        for ok in ["ticks.AAPL", "quotes.O:TSLA230616C00150000", "candles.SPY.1m", "a", "x@y-z_1"] {
            assert_eq!(validate_channel(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_bad_names_with_a_reason() {
        assert_eq!(validate_channel(""), Err(ChannelError::Empty));
        assert_eq!(validate_channel("a b"), Err(ChannelError::BadChar(' ')));
        assert_eq!(validate_channel("tické"), Err(ChannelError::BadChar('é')));
        let long = "x".repeat(256);
        assert_eq!(validate_channel(&long), Err(ChannelError::TooLong(256)));
        assert!(validate_channel(&long[..255]).is_ok());
    }

    #[test]
    fn namespace_is_before_first_dot() {
        assert_eq!(namespace_of("candles.SPY.1m"), "candles");
        assert_eq!(namespace_of("lobby"), "lobby");
    }
}
