//! ferrocast sources: everything that turns outside or made-up data into publishes.
//!
//! A source never talks to the hub or to clients directly: it hands serialized JSON to a
//! [`Sink`], which the server implements over the hub. That keeps this crate free of
//! transport and channel-registry concerns, and lets tests capture a source's output with a
//! few lines of code.
//!
//! | module | what it provides |
//! | --- | --- |
//! | [`market`] | the normalised market-data schema (trades, quotes, candles) shared by every source, and the channel names it is published on |
//! | [`simulator`] | the built-in demo market that `ferrocast serve` runs by default: random-walk trades and quotes for a set of symbols |
//! | [`candles`] | OHLCV bars built from trades: a pure state machine the server feeds with trades and a clock |
//!
//! Upstream connectors (Massive under `massive/`, a configurable generic WebSocket feed in
//! `generic.rs`) will sit beside the simulator and publish the same [`market`] types.

#![warn(missing_docs)]

pub mod candles;
pub mod market;
pub mod simulator;

/// Where sources put their output. Implemented by the server over the hub. Must never block.
pub trait Sink: Send + Sync + 'static {
    /// Publish serialized JSON `data` on `channel`. `kind` says whether the message is kept in
    /// history (`Retained`) or is a transient update that is never stored and may be conflated (`Ephemeral`).
    fn publish(&self, channel: &str, data: bytes::Bytes, kind: PublishKind);
}

/// How the hub treats a published message: `Retained` messages are stored in history and get
/// an offset (trades, quotes, closed candles); `Ephemeral` ones (a forming candle) are
/// delivered live, never stored, and may be conflated. The hub's own type, so sources and the
/// hub agree by construction.
pub use ferrocast_hub::PublishKind;
