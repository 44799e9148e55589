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
    /// A `#` user suffix with an empty user id (`a#`, `a#1,,2`).
    EmptyUser,
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
                "channel name contains {c:?}; allowed characters are A-Z a-z 0-9 _ . : @ - \
                 (and one `#` before a user list: payments.eu#42,43)"
            ),
            ChannelError::EmptyUser => f.write_str(
                "channel name has an empty user id after `#`; a user channel is NAME#USER[,USER...]",
            ),
        }
    }
}

impl std::error::Error for ChannelError {}

/// Checks a channel name against `[A-Za-z0-9_.:@-]{1,255}`, optionally followed by a user
/// suffix `#USER[,USER...]` (user ids from the same character set; the whole name counts
/// against the 255 bytes).
pub fn validate_channel(name: &str) -> Result<(), ChannelError> {
    if name.is_empty() {
        return Err(ChannelError::Empty);
    }
    if name.len() > MAX_CHANNEL_LEN {
        return Err(ChannelError::TooLong(name.len()));
    }
    let (base, users) = match name.split_once('#') {
        Some((base, users)) => (base, Some(users)),
        None => (name, None),
    };
    if base.is_empty() {
        return Err(ChannelError::Empty);
    }
    check_chars(base)?;
    if let Some(users) = users {
        for user in users.split(',') {
            if user.is_empty() {
                return Err(ChannelError::EmptyUser);
            }
            check_chars(user)?;
        }
    }
    Ok(())
}

fn check_chars(name: &str) -> Result<(), ChannelError> {
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

/// The namespace of a channel: the part before the first `.`, or the whole name without one
/// (a user suffix `#...` is not part of it).
pub fn namespace_of(channel: &str) -> &str {
    let base = channel.split_once('#').map_or(channel, |(base, _)| base);
    base.split_once('.').map_or(base, |(ns, _)| ns)
}

/// The users a user channel (`payments.eu#42,43`) is readable by; `None` for other channels.
pub fn channel_users(channel: &str) -> Option<impl Iterator<Item = &str>> {
    channel.split_once('#').map(|(_, users)| users.split(','))
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
        assert_eq!(namespace_of("payments.eu#42"), "payments");
        assert_eq!(namespace_of("inbox#42"), "inbox");
    }

    #[test]
    fn user_suffix() {
        for ok in ["payments.eu#42", "inbox#a,b-1", "x#u@example.com"] {
            assert_eq!(validate_channel(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_channel("#42"), Err(ChannelError::Empty));
        assert_eq!(validate_channel("a#"), Err(ChannelError::EmptyUser));
        assert_eq!(validate_channel("a#1,,2"), Err(ChannelError::EmptyUser));
        assert_eq!(validate_channel("a#1#2"), Err(ChannelError::BadChar('#')));
        assert_eq!(validate_channel("a#1 2"), Err(ChannelError::BadChar(' ')));
        let users: Vec<_> = channel_users("payments.eu#42,43").unwrap().collect();
        assert_eq!(users, ["42", "43"]);
        assert!(channel_users("payments.eu").is_none());
    }
}
