//! Counters kept by the hub. Plain atomics, bumped once per publish rather than once per
//! subscriber wherever possible, and read by the server's `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

/// The hub's counters. All monotonic except `channels` and `subscriptions`.
#[derive(Debug, Default)]
pub struct HubMetrics {
    /// Messages accepted by `publish`.
    pub messages_in: AtomicU64,
    /// Messages put into subscriber queues.
    pub enqueued: AtomicU64,
    /// Queued messages replaced by newer ones of the same channel (conflate policy).
    pub conflated: AtomicU64,
    /// Messages dropped on overflow (drop_oldest policy).
    pub dropped: AtomicU64,
    /// Subscribers closed with 4008 because a must-not-drop message did not fit.
    pub slow_consumer_disconnects: AtomicU64,
    /// Messages replayed to recovering subscribers.
    pub replayed: AtomicU64,
    /// Recoveries that succeeded / failed.
    pub recoveries_ok: AtomicU64,
    pub recoveries_failed: AtomicU64,
    /// Messages sent as snapshots on subscribe.
    pub snapshot_messages: AtomicU64,
    /// Channels currently held in memory.
    pub channels: AtomicU64,
    /// Live subscriptions.
    pub subscriptions: AtomicU64,
    /// Channels forgotten after their idle TTL (or at once, when never published to).
    pub channels_expired: AtomicU64,
    /// Channel creations refused because `server.max_channels` were held.
    pub channels_refused: AtomicU64,
}

impl HubMetrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        if n != 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
