//! The Redis broker's counters and their Prometheus rendering (`ferrocast_broker_*`).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use parking_lot::Mutex;

/// Upper bounds of the publish latency buckets, in microseconds.
const BUCKETS_US: [u64; 12] =
    [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 500_000, 1_000_000];

/// Counters of one broker.
#[derive(Debug, Default)]
pub struct BrokerMetrics {
    publish_latency: [AtomicU64; BUCKETS_US.len() + 1],
    publish_latency_sum_us: AtomicU64,
    pub published: AtomicU64,
    pub pubsub_reconnects: AtomicU64,
    pub gaps_filled: AtomicU64,
    pub messages_filled: AtomicU64,
    pub gaps_unfilled: AtomicU64,
    pub position_checks: AtomicU64,
    pub fences: AtomicU64,
    pub subscribed_channels: AtomicU64,
    errors: Mutex<Vec<(&'static str, u64)>>,
}

impl BrokerMetrics {
    /// Records one publish's time from the call to Redis's answer.
    pub fn publish_latency(&self, latency: Duration) {
        let us = latency.as_micros().min(u64::MAX as u128) as u64;
        let bucket = BUCKETS_US.iter().position(|b| us <= *b).unwrap_or(BUCKETS_US.len());
        self.publish_latency[bucket].fetch_add(1, Relaxed);
        self.publish_latency_sum_us.fetch_add(us, Relaxed);
    }

    /// Counts an error of `kind` (`timeout`, `connection`, `script`, `queue_full`, `protocol`).
    pub fn error(&self, kind: &'static str) {
        let mut errors = self.errors.lock();
        match errors.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => errors.push((kind, 1)),
        }
    }

    pub fn render(&self, out: &mut String) {
        let counters: [(&str, &str, &AtomicU64); 8] = [
            (
                "ferrocast_broker_published_total",
                "Messages published through Redis.",
                &self.published,
            ),
            (
                "ferrocast_broker_pubsub_reconnects_total",
                "Times the pub/sub connection to Redis was re-established.",
                &self.pubsub_reconnects,
            ),
            (
                "ferrocast_broker_gaps_filled_total",
                "Gaps in a channel's offsets filled from Redis history (pub/sub loss, late join).",
                &self.gaps_filled,
            ),
            (
                "ferrocast_broker_messages_filled_total",
                "Messages delivered from Redis history to fill gaps.",
                &self.messages_filled,
            ),
            (
                "ferrocast_broker_gaps_unfilled_total",
                "Gaps history could not fill (trimmed, expired or Redis unreachable).",
                &self.gaps_unfilled,
            ),
            (
                "ferrocast_broker_position_checks_total",
                "Channel positions compared with Redis.",
                &self.position_checks,
            ),
            (
                "ferrocast_broker_fences_total",
                "Channels found behind what this node delivered (writes lost in a failover) and moved to a new epoch.",
                &self.fences,
            ),
            (
                "ferrocast_broker_subscribed_channels",
                "Channels this node receives from Redis pub/sub.",
                &self.subscribed_channels,
            ),
        ];
        for (name, help, value) in counters {
            let kind = if name.ends_with("_total") { "counter" } else { "gauge" };
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {}", value.load(Relaxed));
        }
        let name = "ferrocast_broker_errors_total";
        let _ = writeln!(out, "# HELP {name} Redis broker errors by kind.\n# TYPE {name} counter");
        for (kind, n) in self.errors.lock().iter() {
            let _ = writeln!(out, "{name}{{kind=\"{kind}\"}} {n}");
        }
        let name = "ferrocast_broker_publish_latency_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from a publish to Redis's answer.\n# TYPE {name} histogram"
        );
        let mut cumulative = 0;
        for (i, bound) in BUCKETS_US.iter().enumerate() {
            cumulative += self.publish_latency[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cumulative}", *bound as f64 / 1e6);
        }
        cumulative += self.publish_latency[BUCKETS_US.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.publish_latency_sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}
