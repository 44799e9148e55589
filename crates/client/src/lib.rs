//! `ferrocast-client`: a small async client for ferrocast's native WebSocket protocol (`/ws`)
//! and its HTTP API, used by the CLI (`ferrocast sub` / `pub` / `bench`) and by integration tests.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ferrocast_client::Error> {
//! use ferrocast_client::{Client, Event};
//!
//! let mut client = Client::connect("ws://127.0.0.1:8080/ws").await?;
//! let ack = client.subscribe(&["chat.lobby"]).await?;
//! assert!(ack.is_ok());
//! client.publish("chat.lobby", serde_json::json!({"text": "hi"})).await?;
//! while let Some(event) = client.next_event().await {
//!     match event {
//!         Event::Msg(m) => println!("{} #{}: {}", m.channel, m.offset, m.data),
//!         Event::Closed(close) => println!("closed: {close}"),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! The wire contract is `PROTOCOL.md`: JSON text frames, request/ack correlation by `id`,
//! server frames that may be batched into a JSON array, heartbeat pings that must be answered
//! with `{"op":"pong"}`, and close codes that tell why a connection ended. TLS is not supported;
//! connect to `ws://` (or put the client behind a TLS-terminating proxy).

mod client;
mod connect;
mod error;
pub mod frame;
pub mod http;
pub mod lean;

pub use client::{Client, ErrorInfo, Event, Position, PublishAck, SubscribeAck, Subscribed};
pub use connect::{ConnectOptions, WsStream, close_info, connect_raw, normalize_ws_url};
pub use error::{CloseInfo, Error};
pub use frame::{Message, ServerError, Welcome};
pub use http::{HttpClient, HttpResponse};
pub use lean::{LeanConn, LeanFrame};

/// Re-export so callers of [`connect_raw`] can name message types without their own dependency.
pub use tokio_tungstenite::tungstenite;
