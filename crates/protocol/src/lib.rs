//! The ferrocast native wire protocol, without any I/O.
//!
//! Everything a transport needs to speak the contract in `PROTOCOL.md`:
//!
//! - [`channel`]: channel-name rules and namespaces;
//! - [`client`]: parsing client frames (`subscribe`, `unsubscribe`, `publish`, `ping`, `pong`);
//! - [`server`]: encoding server frames (`welcome`, `ack`, `msg`, `error`, `ping`, `pong`, …);
//! - [`close`]: WebSocket close codes and what each means;
//! - [`depth`]: how deeply JSON `data` nests, checked without recursion.
//!
//! Parsing and encoding are plain functions over byte slices, so they are easy to fuzz and to
//! benchmark, and the same code serves every transport.
#![forbid(unsafe_code)]

pub mod channel;
pub mod client;
pub mod close;
pub mod depth;
pub mod error;
pub mod server;

pub use channel::{ChannelError, channel_users, namespace_of, validate_channel};
pub use client::{ClientFrame, StreamPosition, parse_client_frame};
pub use close::CloseCode;
pub use depth::{TooDeep, check_depth, nesting_depth};
pub use error::{ErrorCode, FrameError};

/// Version number announced in the welcome frame.
pub const PROTOCOL_VERSION: u32 = 1;
