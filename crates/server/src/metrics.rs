//! Server metrics and their Prometheus text exposition at `/metrics`.
//!
//! Counters are plain atomics updated once per write batch or per event, never per
//! subscriber inside the fan-out loop. The hub's own counters are rendered alongside.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use ferrocast_hub::HubMetrics;
use parking_lot::Mutex;

/// A client transport, for labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    Ws,
    Sse,
    SocketIo,
}

impl Transport {
    pub const ALL: [Transport; 3] = [Transport::Ws, Transport::Sse, Transport::SocketIo];

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
            Transport::SocketIo => "socketio",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Where a publish came from, for the ack latency histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishSource {
    /// `POST /api/publish`.
    Http,
    /// A client's `publish` request over a transport.
    Client(Transport),
    /// A feed connector or the simulator.
    Feed,
}

impl PublishSource {
    const ALL: [PublishSource; 5] = [
        PublishSource::Http,
        PublishSource::Client(Transport::Ws),
        PublishSource::Client(Transport::Sse),
        PublishSource::Client(Transport::SocketIo),
        PublishSource::Feed,
    ];

    fn as_str(self) -> &'static str {
        match self {
            PublishSource::Http => "http",
            PublishSource::Client(t) => t.as_str(),
            PublishSource::Feed => "feed",
        }
    }

    fn index(self) -> usize {
        match self {
            PublishSource::Http => 0,
            PublishSource::Client(t) => 1 + t.index(),
            PublishSource::Feed => 4,
        }
    }
}

/// Upper bounds of the latency histogram buckets, in microseconds.
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
    5_000_000,
];

/// A fixed-bucket histogram with atomic counts.
#[derive(Debug, Default)]
pub struct Histogram {
    /// One count per bucket plus the overflow (+Inf) bucket.
    counts: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

/// Per-batch accumulation of latencies, flushed into a [`Histogram`] with few atomic ops.
#[derive(Debug, Default)]
pub struct LocalHistogram {
    counts: [u32; LATENCY_BUCKETS_US.len() + 1],
    sum_us: u64,
    any: bool,
}

impl Histogram {
    /// Counts one observation (for rare events; batches use a [`LocalHistogram`]).
    pub fn record(&self, latency: Duration) {
        let us = latency.as_micros().min(u64::MAX as u128) as u64;
        let bucket =
            LATENCY_BUCKETS_US.iter().position(|b| us <= *b).unwrap_or(LATENCY_BUCKETS_US.len());
        self.counts[bucket].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// Writes the histogram's `_bucket`, `_sum` and `_count` lines; `labels` (`k="v",` or
    /// empty) go before `le`.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BUCKETS_US.iter().enumerate() {
            cumulative += self.counts[i].load(Relaxed);
            let le = *bound as f64 / 1e6;
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{le}\"}} {cumulative}");
        }
        cumulative += self.counts[LATENCY_BUCKETS_US.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {cumulative}");
        let bare = labels.trim_end_matches(',');
        let braces = if bare.is_empty() { String::new() } else { format!("{{{bare}}}") };
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

impl LocalHistogram {
    pub fn record(&mut self, latency: Duration) {
        let us = latency.as_micros().min(u64::MAX as u128) as u64;
        let bucket =
            LATENCY_BUCKETS_US.iter().position(|b| us <= *b).unwrap_or(LATENCY_BUCKETS_US.len());
        self.counts[bucket] += 1;
        self.sum_us += us;
        self.any = true;
    }

    pub fn flush_into(&mut self, h: &Histogram) {
        if !self.any {
            return;
        }
        for (i, c) in self.counts.iter_mut().enumerate() {
            if *c != 0 {
                h.counts[i].fetch_add(u64::from(*c), Relaxed);
                *c = 0;
            }
        }
        h.sum_us.fetch_add(self.sum_us, Relaxed);
        self.sum_us = 0;
        self.any = false;
    }
}

/// Counters kept by the server (transports, API, lifecycle).
#[derive(Debug, Default)]
pub struct ServerMetrics {
    pub connections: [AtomicI64; 3],
    pub connections_total: [AtomicU64; 3],
    pub messages_out: [AtomicU64; 3],
    pub bytes_out: [AtomicU64; 3],
    /// Client frames refused with an `error` reply (bad JSON, unknown op, …), by error code.
    pub frame_errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Connections closed by the server or the client, by close code.
    pub closes: Mutex<BTreeMap<u16, u64>>,
    /// Publish-to-socket-write latency of live messages.
    pub delivery_latency: Histogram,
    /// From a publish request in hand to its answer handed over, by [`PublishSource`].
    pub publish_ack: [Histogram; 5],
    pub http_publish_requests: AtomicU64,
    pub http_publish_rejected: AtomicU64,
    /// Requests for an endpoint that is turned off or does not exist (e.g. `/socket.io/`), by path.
    pub wrong_endpoint: Mutex<BTreeMap<&'static str, u64>>,
    /// Upgrade requests refused before the handshake (not a WebSocket request, bad version).
    pub upgrade_rejected: AtomicU64,
    /// Socket.IO websocket frames written by ferrocast itself between the library's frames
    /// (see `sio_engine::Splice`).
    pub socketio_spliced_frames: AtomicU64,
    /// permessage-deflate on `/ws`.
    pub deflate: crate::ws::deflate::DeflateMetrics,
}

impl ServerMetrics {
    pub fn connection_opened(&self, t: Transport) {
        self.connections[t.index()].fetch_add(1, Relaxed);
        self.connections_total[t.index()].fetch_add(1, Relaxed);
    }

    pub fn connection_closed(&self, t: Transport, code: u16) {
        self.connections[t.index()].fetch_sub(1, Relaxed);
        *self.closes.lock().entry(code).or_default() += 1;
    }

    pub fn delivered(&self, t: Transport, messages: u64, bytes: u64) {
        if messages != 0 {
            self.messages_out[t.index()].fetch_add(messages, Relaxed);
        }
        self.bytes_out[t.index()].fetch_add(bytes, Relaxed);
    }

    /// Counts a publish answered `elapsed` after the server had the request.
    pub fn publish_acked(&self, source: PublishSource, elapsed: Duration) {
        self.publish_ack[source.index()].record(elapsed);
    }

    pub fn frame_error(&self, code: &'static str) {
        *self.frame_errors.lock().entry(code).or_default() += 1;
    }

    pub fn wrong_endpoint(&self, path: &'static str) {
        *self.wrong_endpoint.lock().entry(path).or_default() += 1;
    }

    pub fn open_connections(&self, t: Transport) -> i64 {
        self.connections[t.index()].load(Relaxed)
    }

    pub fn messages_out_total(&self) -> u64 {
        self.messages_out.iter().map(|c| c.load(Relaxed)).sum()
    }

    pub fn bytes_out_total(&self) -> u64 {
        self.bytes_out.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// Renders every metric in the Prometheus text format (version 0.0.4).
    pub fn render(&self, hub: &HubMetrics, extra: &str) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let g = HubMetrics::get;
        family(&mut out, "ferrocast_connections", "gauge", "Open client connections by transport.");
        for t in Transport::ALL {
            let _ = writeln!(
                out,
                "ferrocast_connections{{transport=\"{}\"}} {}",
                t.as_str(),
                self.open_connections(t)
            );
        }
        family(
            &mut out,
            "ferrocast_connections_total",
            "counter",
            "Client connections accepted by transport.",
        );
        for t in Transport::ALL {
            let _ = writeln!(
                out,
                "ferrocast_connections_total{{transport=\"{}\"}} {}",
                t.as_str(),
                self.connections_total[t.index()].load(Relaxed)
            );
        }
        family(&mut out, "ferrocast_subscriptions", "gauge", "Live channel subscriptions.");
        let _ = writeln!(out, "ferrocast_subscriptions {}", g(&hub.subscriptions));
        family(&mut out, "ferrocast_channels", "gauge", "Channels held in memory.");
        let _ = writeln!(out, "ferrocast_channels {}", g(&hub.channels));
        family(
            &mut out,
            "ferrocast_channels_expired_total",
            "counter",
            "Idle channels forgotten after their TTL.",
        );
        let _ = writeln!(out, "ferrocast_channels_expired_total {}", g(&hub.channels_expired));
        family(
            &mut out,
            "ferrocast_channels_refused_total",
            "counter",
            "Channel creations refused because server.max_channels channels were held.",
        );
        let _ = writeln!(out, "ferrocast_channels_refused_total {}", g(&hub.channels_refused));
        family(
            &mut out,
            "ferrocast_messages_in_total",
            "counter",
            "Messages published into the hub.",
        );
        let _ = writeln!(out, "ferrocast_messages_in_total {}", g(&hub.messages_in));
        family(
            &mut out,
            "ferrocast_messages_enqueued_total",
            "counter",
            "Messages put into subscriber queues.",
        );
        let _ = writeln!(out, "ferrocast_messages_enqueued_total {}", g(&hub.enqueued));
        family(
            &mut out,
            "ferrocast_messages_out_total",
            "counter",
            "Messages written to client sockets by transport.",
        );
        for t in Transport::ALL {
            let _ = writeln!(
                out,
                "ferrocast_messages_out_total{{transport=\"{}\"}} {}",
                t.as_str(),
                self.messages_out[t.index()].load(Relaxed)
            );
        }
        family(
            &mut out,
            "ferrocast_bytes_out_total",
            "counter",
            "Bytes written to client sockets by transport.",
        );
        for t in Transport::ALL {
            let _ = writeln!(
                out,
                "ferrocast_bytes_out_total{{transport=\"{}\"}} {}",
                t.as_str(),
                self.bytes_out[t.index()].load(Relaxed)
            );
        }
        family(
            &mut out,
            "ferrocast_queue_overflows_total",
            "counter",
            "Outbound queue overflows by the policy applied.",
        );
        let _ = writeln!(
            out,
            "ferrocast_queue_overflows_total{{policy=\"conflate\"}} {}",
            g(&hub.conflated)
        );
        let _ = writeln!(
            out,
            "ferrocast_queue_overflows_total{{policy=\"drop_oldest\"}} {}",
            g(&hub.dropped)
        );
        let _ = writeln!(
            out,
            "ferrocast_queue_overflows_total{{policy=\"disconnect\"}} {}",
            g(&hub.slow_consumer_disconnects)
        );
        family(
            &mut out,
            "ferrocast_recoveries_total",
            "counter",
            "Subscribe recoveries by outcome.",
        );
        let _ = writeln!(
            out,
            "ferrocast_recoveries_total{{outcome=\"recovered\"}} {}",
            g(&hub.recoveries_ok)
        );
        let _ = writeln!(
            out,
            "ferrocast_recoveries_total{{outcome=\"failed\"}} {}",
            g(&hub.recoveries_failed)
        );
        family(
            &mut out,
            "ferrocast_replayed_messages_total",
            "counter",
            "Messages replayed to recovering subscribers.",
        );
        let _ = writeln!(out, "ferrocast_replayed_messages_total {}", g(&hub.replayed));
        family(
            &mut out,
            "ferrocast_snapshot_messages_total",
            "counter",
            "Messages sent as snapshots on subscribe.",
        );
        let _ = writeln!(out, "ferrocast_snapshot_messages_total {}", g(&hub.snapshot_messages));
        family(
            &mut out,
            "ferrocast_closes_total",
            "counter",
            "Client connections closed, by close code.",
        );
        for (code, n) in self.closes.lock().iter() {
            let _ = writeln!(out, "ferrocast_closes_total{{code=\"{code}\"}} {n}");
        }
        family(
            &mut out,
            "ferrocast_frame_errors_total",
            "counter",
            "Client frames answered with an error, by error code.",
        );
        for (code, n) in self.frame_errors.lock().iter() {
            let _ = writeln!(out, "ferrocast_frame_errors_total{{code=\"{code}\"}} {n}");
        }
        family(
            &mut out,
            "ferrocast_http_publish_requests_total",
            "counter",
            "POST /api/publish requests.",
        );
        let _ = writeln!(
            out,
            "ferrocast_http_publish_requests_total {}",
            self.http_publish_requests.load(Relaxed)
        );
        family(
            &mut out,
            "ferrocast_http_publish_rejected_total",
            "counter",
            "POST /api/publish requests refused (auth or bad input).",
        );
        let _ = writeln!(
            out,
            "ferrocast_http_publish_rejected_total {}",
            self.http_publish_rejected.load(Relaxed)
        );
        family(
            &mut out,
            "ferrocast_upgrade_rejected_total",
            "counter",
            "WebSocket endpoint requests refused before the handshake.",
        );
        let _ = writeln!(
            out,
            "ferrocast_upgrade_rejected_total {}",
            self.upgrade_rejected.load(Relaxed)
        );
        family(
            &mut out,
            "ferrocast_socketio_spliced_frames_total",
            "counter",
            "Socket.IO websocket frames ferrocast wrote itself, bypassing the library's per-socket encoding.",
        );
        let _ = writeln!(
            out,
            "ferrocast_socketio_spliced_frames_total {}",
            self.socketio_spliced_frames.load(Relaxed)
        );
        let d = &self.deflate;
        for (name, help, counter) in [
            (
                "ferrocast_ws_deflate_connections_total",
                "WebSocket connections that negotiated permessage-deflate.",
                &d.connections,
            ),
            (
                "ferrocast_ws_deflate_compressions_total",
                "Messages compressed (once each, for every /ws and SSE subscriber).",
                &d.compressions,
            ),
            (
                "ferrocast_ws_deflate_frames_total",
                "Compressed messages written: /ws frames with RSV1, and messages in gzip SSE streams.",
                &d.frames,
            ),
        ] {
            family(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", counter.load(Relaxed));
        }
        family(
            &mut out,
            "ferrocast_ws_deflate_bytes_total",
            "counter",
            "Payload bytes of compressed frames written, before (plain) and after (wire) compression.",
        );
        let _ = writeln!(
            out,
            "ferrocast_ws_deflate_bytes_total{{form=\"plain\"}} {}",
            d.plain_bytes.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "ferrocast_ws_deflate_bytes_total{{form=\"wire\"}} {}",
            d.wire_bytes.load(Relaxed)
        );
        family(
            &mut out,
            "ferrocast_wrong_endpoint_total",
            "counter",
            "Requests for a transport that is off or unknown, by path.",
        );
        for (path, n) in self.wrong_endpoint.lock().iter() {
            let _ = writeln!(out, "ferrocast_wrong_endpoint_total{{path=\"{path}\"}} {n}");
        }
        family(
            &mut out,
            "ferrocast_delivery_latency_seconds",
            "histogram",
            "Time from publish to socket write of live messages.",
        );
        self.delivery_latency.render(&mut out, "ferrocast_delivery_latency_seconds", "");
        family(
            &mut out,
            "ferrocast_publish_ack_seconds",
            "histogram",
            "Time from a publish request in hand to its answer handed over, by source.",
        );
        for source in PublishSource::ALL {
            let labels = format!("source=\"{}\",", source.as_str());
            self.publish_ack[source.index()].render(
                &mut out,
                "ferrocast_publish_ack_seconds",
                &labels,
            );
        }
        out.push_str(extra);
        out
    }
}

/// Writes the `# HELP` and `# TYPE` lines of a metric family.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}
