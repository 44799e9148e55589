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
//! | [`backfill`] | historical candles for a fresh channel: the [`backfill::Backfill`] trait and a plausible random-walk past |
//! | [`candles`] | OHLCV bars built from trades: a pure state machine the server feeds with trades and a clock |
//! | [`config`] | the `[[feeds]]` configuration of upstream connectors and its validation |
//! | [`feed`] | what connectors share: link state, counters, the demand interface, upstream-bar marks |
//! | [`interest`] | demand tracking: which channels a connector serves, with linger |
//! | [`backoff`] | reconnect delays: exponential with full jitter |
//! | [`http`] | one bounded HTTP(S) GET, for REST calls such as backfill |
//! | [`link`] | WebSocket plumbing: connect (ws/wss) with headers and deadlines |
//! | [`massive`] | the Massive (Polygon) connector: stocks and options clusters |
//! | [`generic`] | the generic JSON WebSocket connector, described by configuration |
//! | [`simulate`] | local simulators of the Massive, Binance and Coinbase protocols, for tests and demos |

#![warn(missing_docs)]

pub mod backfill;
pub mod backoff;
pub mod candles;
pub mod config;
pub mod feed;
pub mod generic;
pub mod http;
pub mod interest;
pub mod link;
pub mod market;
pub mod massive;
pub mod simulate;
pub mod simulator;
pub mod supervise;

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
