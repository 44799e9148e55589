//! The channel registry: publish, subscribe (with recovery and snapshots), unsubscribe.
//!
//! Channels live in shards selected by a hash of the name, so publishers to different
//! channels rarely meet on a lock. Each channel has its own mutex, held while a publish
//! assigns the offset, appends to history and appends to every subscriber's queue. Holding it
//! for the fan-out is what makes recovery exact: a subscribe takes the same lock to push the
//! replay and register the subscriber, so every message is either in the replay or in the
//! live stream, never both and never neither. The fan-out itself only appends to queues and
//! never waits on a connection.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferrocast_protocol::server::{ChannelResult, SnapshotSent, encode_msg};
use ferrocast_protocol::{ChannelError, ErrorCode, StreamPosition, validate_channel};
use parking_lot::{Mutex, RwLock};
use rand::Rng;

use crate::history::HistoryRing;
use crate::metrics::HubMetrics;
use crate::namespace::{NamespaceConfig, Namespaces, OverflowPolicy, SnapshotMode};
use crate::queue::{
    ConnQueue, HistoryRead, HistorySource, Outbound, PublishKind, Replay, SharedForms,
};

/// Tuning for the hub.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Number of registry shards (rounded up to a power of two).
    pub shards: usize,
    /// The most channels held at once (`server.max_channels`); creating one more is refused.
    pub max_channels: usize,
}

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions { shards: 64, max_channels: 100_000 }
    }
}

/// Where a published message landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub offset: u64,
    pub epoch: Arc<str>,
}

/// Where a channel stands on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub epoch: Arc<str>,
    /// The last offset assigned (0 before the first retained message).
    pub top: u64,
    /// The oldest offset held in history, if any.
    pub first: Option<u64>,
}

/// What [`Hub::deliver`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Kept in history and fanned out.
    Applied,
    /// At or below the local top in the same epoch: a duplicate, dropped.
    Stale,
    /// Messages between the local top and this one are missing, so nothing was done. `top`
    /// is the last offset held in the message's epoch (0 when that epoch is new here).
    Gap { top: u64 },
    /// At or below the local top in the same epoch, but not the message this node holds at
    /// that offset: the broker's history went back (a failover lost writes this node had
    /// delivered) and the offset was given to another message. Nothing was done.
    Diverged,
}

/// About how many queue appends one chunk of a [`Hub::publish_run`] makes before the
/// writers are woken: 32 messages to 1,000 subscribers, one to 32,768 or more.
const RUN_CHUNK_PUSHES: usize = 32 * 1024;

/// What one fan-out did, counted after the channel lock is released.
#[derive(Debug, Default)]
struct Fanout {
    messages: u64,
    queued: u64,
    conflated: u64,
    dropped: u64,
    overflowed: u64,
}

impl Fanout {
    fn add(&mut self, other: Fanout) {
        self.messages += other.messages;
        self.queued += other.queued;
        self.conflated += other.conflated;
        self.dropped += other.dropped;
        self.overflowed += other.overflowed;
    }

    fn count(&self, m: &HubMetrics) {
        HubMetrics::add(&m.messages_in, self.messages);
        HubMetrics::add(&m.enqueued, self.queued);
        HubMetrics::add(&m.conflated, self.conflated);
        HubMetrics::add(&m.dropped, self.dropped);
        HubMetrics::add(&m.slow_consumer_disconnects, self.overflowed);
    }
}

/// Why a publish was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("invalid channel: {0}")]
    InvalidChannel(ChannelError),
    #[error(
        "the server holds {0} channels, its limit (server.max_channels); no channel can be created"
    )]
    ChannelLimit(usize),
}

/// A channel as listed by `GET /api/channels`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ChannelInfo {
    pub channel: String,
    pub subscribers: usize,
    pub offset: u64,
    pub epoch: String,
}

/// One page of `GET /api/channels`.
#[derive(Debug, Clone)]
pub struct ChannelPage {
    pub channels: Vec<ChannelInfo>,
    /// Channels held in all.
    pub total: usize,
    /// Pass as `after` to get the next page; `None` on the last one.
    pub next: Option<String>,
}

/// Retained messages of a channel, as returned by the history API.
#[derive(Debug, Clone)]
pub struct HistoryPage {
    pub channel: String,
    pub epoch: String,
    /// The channel's current top offset.
    pub offset: u64,
    /// `(offset, data)` pairs, oldest first.
    pub messages: Vec<(u64, Bytes)>,
}

/// The outcome of a successful subscribe, for the session to record.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub result: ChannelResult,
    /// Whether the subscription was newly added (false when it already existed).
    pub added: bool,
}

/// Told when a channel gains its first subscriber or loses its last one, so upstream
/// connectors subscribe only to what someone watches.
///
/// Notifications are made after the channel lock is released, so for one channel a "last
/// left" and a "first arrived" racing on two threads may be delivered in either order; a
/// listener that acts on "last left" later (connectors linger) should confirm with
/// [`Hub::subscriber_count`] first.
pub trait DemandListener: Send + Sync {
    fn demand_changed(&self, channel: &str, wanted: bool);

    /// Consulted before a connection is added to `channel`: `Err(reason)` refuses the
    /// subscription with `upstream_rejected`, because the upstream feed behind the channel
    /// cannot carry it (e.g. Massive's 1,000 option contracts with quotes per connection).
    /// Called outside every hub lock, for every subscribe request (also for channels that
    /// already have subscribers, which a listener should admit cheaply). An admitted
    /// subscribe normally follows with `demand_changed(channel, true)` when it is the first.
    fn admit(&self, channel: &str) -> Result<(), String> {
        let _ = channel;
        Ok(())
    }
}

/// Called after every retained publish on a namespace (used to build candles from ticks).
pub type Tap = Arc<dyn Fn(&str, &[u8]) + Send + Sync>;

struct Channel {
    id: u64,
    ns: Arc<NamespaceConfig>,
    epoch: Arc<str>,
    /// The last offset assigned; 0 before the first retained message.
    top: u64,
    history: HistoryRing,
    /// The latest ephemeral frame since the last retained message (e.g. the forming bar).
    latest_ephemeral: Option<Bytes>,
    subscribers: Vec<Arc<ConnQueue>>,
    /// Position of each subscriber in `subscribers`, by connection id.
    positions: HashMap<u64, usize>,
    last_active: Instant,
    /// Set by the sweeper when the channel leaves the registry; holders must look it up again.
    removed: bool,
}

type Shard = RwLock<HashMap<Arc<str>, Arc<Mutex<Channel>>>>;

/// The hub. One per process, shared by every transport and source.
pub struct Hub {
    shards: Box<[Shard]>,
    shard_mask: usize,
    hasher: std::hash::RandomState,
    namespaces: Namespaces,
    next_channel_id: AtomicU64,
    metrics: HubMetrics,
    demand: RwLock<Vec<Arc<dyn DemandListener>>>,
    taps: RwLock<Vec<(String, Tap)>>,
    max_channels: usize,
    /// The epoch given to channels created from now on. It changes whenever a channel that
    /// held messages is forgotten, so no later incarnation of that channel can be mistaken
    /// for it; until then a channel forgotten while empty comes back under the same epoch,
    /// and a client that subscribed to it before its first message still recovers exactly.
    epoch_for_new: RwLock<Arc<str>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("shards", &self.shards.len()).finish_non_exhaustive()
    }
}

impl Hub {
    pub fn new(namespaces: Namespaces, options: HubOptions) -> Self {
        let n = options.shards.max(1).next_power_of_two();
        Hub {
            shards: (0..n).map(|_| RwLock::new(HashMap::new())).collect(),
            shard_mask: n - 1,
            hasher: std::hash::RandomState::new(),
            namespaces,
            next_channel_id: AtomicU64::new(1),
            metrics: HubMetrics::default(),
            demand: RwLock::new(Vec::new()),
            taps: RwLock::new(Vec::new()),
            max_channels: options.max_channels,
            epoch_for_new: RwLock::new(new_epoch()),
        }
    }

    pub fn metrics(&self) -> &HubMetrics {
        &self.metrics
    }

    pub fn namespaces(&self) -> &Namespaces {
        &self.namespaces
    }

    /// The policy of the namespace `channel` belongs to.
    pub fn namespace(&self, channel: &str) -> &Arc<NamespaceConfig> {
        self.namespaces.for_channel(channel)
    }

    /// Adds a listener told about first-subscriber / last-subscriber transitions (feed
    /// connectors and the Redis broker each add one).
    pub fn add_demand_listener(&self, listener: Arc<dyn DemandListener>) {
        self.demand.write().push(listener);
    }

    /// Calls `tap(channel, data)` after every retained publish in `namespace` (with a
    /// cluster broker, every one the broker brings while it follows taps:
    /// [`crate::Broker::follow_taps`]).
    pub fn add_tap(&self, namespace: &str, tap: Tap) {
        self.taps.write().push((namespace.to_owned(), tap));
    }

    /// The namespaces some tap watches.
    pub fn tap_namespaces(&self) -> Vec<String> {
        let mut out: Vec<String> = self.taps.read().iter().map(|(ns, _)| ns.clone()).collect();
        out.sort();
        out.dedup();
        out
    }

    /// How many connections are subscribed to `channel` now (0 for an unknown channel).
    pub fn subscriber_count(&self, channel: &str) -> usize {
        self.lookup(channel).map_or(0, |ch| ch.lock().subscribers.len())
    }

    /// Channels that currently have at least one subscriber.
    pub fn demanded_channels(&self) -> Vec<String> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            for (name, ch) in shard.read().iter() {
                if !ch.lock().subscribers.is_empty() {
                    out.push(name.to_string());
                }
            }
        }
        out
    }

    fn shard(&self, channel: &str) -> &Shard {
        &self.shards[(self.hasher.hash_one(channel) as usize) & self.shard_mask]
    }

    fn lookup(&self, channel: &str) -> Option<Arc<Mutex<Channel>>> {
        self.shard(channel).read().get(channel).cloned()
    }

    /// The channel, created if needed and the channel limit allows it.
    fn lookup_or_create(&self, channel: &str) -> Result<Arc<Mutex<Channel>>, PublishError> {
        if let Some(ch) = self.lookup(channel) {
            return Ok(ch);
        }
        let mut shard = self.shard(channel).write();
        if let Some(ch) = shard.get(channel) {
            return Ok(ch.clone());
        }
        // Counted under the shard lock only, so concurrent creations may overshoot the limit
        // by at most one per shard.
        if self.metrics.channels.load(Ordering::Relaxed) as usize >= self.max_channels {
            HubMetrics::add(&self.metrics.channels_refused, 1);
            return Err(PublishError::ChannelLimit(self.max_channels));
        }
        let ns = self.namespaces.for_channel(channel).clone();
        let max_age = (ns.history_ttl_ms > 0).then(|| Duration::from_millis(ns.history_ttl_ms));
        let ch = Arc::new(Mutex::new(Channel {
            id: self.next_channel_id.fetch_add(1, Ordering::Relaxed),
            history: HistoryRing::new(ns.history_size, max_age),
            ns,
            epoch: self.epoch_for_new.read().clone(),
            top: 0,
            latest_ephemeral: None,
            subscribers: Vec::new(),
            positions: HashMap::new(),
            last_active: Instant::now(),
            removed: false,
        }));
        shard.insert(Arc::from(channel), ch.clone());
        self.metrics.channels.fetch_add(1, Ordering::Relaxed);
        Ok(ch)
    }

    /// Publishes `data` (one serialized JSON value) on `channel` and fans it out.
    pub fn publish(
        &self,
        channel: &str,
        data: &[u8],
        kind: PublishKind,
    ) -> Result<Published, PublishError> {
        validate_channel(channel).map_err(PublishError::InvalidChannel)?;
        let published = loop {
            let ch = self.lookup_or_create(channel)?;
            let mut c = ch.lock();
            if c.removed {
                continue;
            }
            let ephemeral = kind == PublishKind::Ephemeral;
            if !ephemeral {
                c.top += 1;
            }
            let fanout = self.emit(&mut c, channel, data, ephemeral);
            let published = Published { offset: c.top, epoch: c.epoch.clone() };
            drop(c);
            fanout.count(&self.metrics);
            if !ephemeral {
                self.run_taps(channel, data);
            }
            break published;
        };
        Ok(published)
    }

    /// Publishes a run of messages on one channel, as [`Hub::publish`] each, a chunk at a
    /// time: each chunk under one hold of the channel's lock, then each subscriber's writer
    /// woken once. A batch thus reaches a writer whole, to go out in one write, rather than
    /// waking it at its first message; chunks hold about [`RUN_CHUNK_PUSHES`] queue appends,
    /// so with many subscribers the writers start on a batch before all of it is queued.
    /// Answers with what was published and, if the run stopped, why (the channel is
    /// checked before the first message, so only a channel limit can stop it midway).
    pub fn publish_run(
        &self,
        channel: &str,
        data: &[&[u8]],
        kind: PublishKind,
    ) -> (Vec<Published>, Option<PublishError>) {
        if let Err(e) = validate_channel(channel) {
            return (Vec::new(), Some(PublishError::InvalidChannel(e)));
        }
        let ephemeral = kind == PublishKind::Ephemeral;
        let mut published = Vec::with_capacity(data.len());
        let mut owed = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            let ch = match self.lookup_or_create(channel) {
                Ok(ch) => ch,
                Err(e) => return (published, Some(e)),
            };
            let mut c = ch.lock();
            if c.removed {
                continue;
            }
            let chunk = (RUN_CHUNK_PUSHES / c.subscribers.len().max(1)).clamp(1, rest.len());
            let (now, later) = rest.split_at(chunk);
            owed.clear();
            owed.resize(c.subscribers.len(), false);
            let mut fanout = Fanout::default();
            for d in now {
                if !ephemeral {
                    c.top += 1;
                }
                fanout.add(self.emit_deferred(&mut c, channel, d, ephemeral, Some(&mut owed)));
                published.push(Published { offset: c.top, epoch: c.epoch.clone() });
            }
            let woken: Vec<Arc<ConnQueue>> = c
                .subscribers
                .iter()
                .zip(&owed)
                .filter(|(_, owed)| **owed)
                .map(|(q, _)| q.clone())
                .collect();
            drop(c);
            for queue in woken {
                queue.wake();
            }
            fanout.count(&self.metrics);
            if !ephemeral {
                for d in now {
                    self.run_taps(channel, d);
                }
            }
            rest = later;
        }
        (published, None)
    }

    /// Encodes `data` at the channel's top offset, keeps it (history, or the latest ephemeral
    /// frame) and appends it to every subscriber's queue. The caller holds the channel lock
    /// and has already moved `top` for a retained message.
    fn emit(&self, c: &mut Channel, channel: &str, data: &[u8], ephemeral: bool) -> Fanout {
        self.emit_deferred(c, channel, data, ephemeral, None)
    }

    /// [`Hub::emit`], with the writers' wake-ups left owed in `owed` (by subscriber index)
    /// when it is given.
    fn emit_deferred(
        &self,
        c: &mut Channel,
        channel: &str,
        data: &[u8],
        ephemeral: bool,
        mut owed: Option<&mut Vec<bool>>,
    ) -> Fanout {
        let now = Instant::now();
        let offset = c.top;
        let frame = encode_msg(channel, offset, &c.epoch, data, ephemeral);
        if ephemeral {
            c.latest_ephemeral = Some(frame.clone());
        } else {
            c.history.push(offset, frame.clone(), data.len(), now);
            c.history.expire(now);
            c.latest_ephemeral = None;
        }
        c.last_active = now;
        let policy = if ephemeral { OverflowPolicy::Conflate } else { c.ns.overflow };
        let mut fanout =
            Fanout { messages: 1, queued: c.subscribers.len() as u64, ..Fanout::default() };
        let compress = c.ns.compress && frame.len() >= c.ns.compress_min_bytes;
        let mut forms: Option<Arc<SharedForms>> = None;
        for (i, queue) in c.subscribers.iter().enumerate() {
            let forms = queue
                .wants_forms()
                .then(|| forms.get_or_insert_with(|| Arc::new(SharedForms::new(compress))).clone());
            let out =
                Outbound { bytes: frame.clone(), channel_id: c.id, published_at: Some(now), forms };
            let o = match owed.as_deref_mut() {
                Some(owed) => {
                    let (o, wake) = queue.push_deferred(out, policy);
                    owed[i] |= wake;
                    o
                }
                None => queue.push_message(out, policy),
            };
            fanout.conflated += u64::from(o.conflated);
            fanout.dropped += u64::from(o.dropped);
            fanout.overflowed += u64::from(o.overflowed);
        }
        fanout
    }

    /// Where `channel` stands on this node, if it is held.
    pub fn position(&self, channel: &str) -> Option<Position> {
        let ch = self.lookup(channel)?;
        let mut c = ch.lock();
        c.history.expire(Instant::now());
        Some(Position { epoch: c.epoch.clone(), top: c.top, first: c.history.first_offset() })
    }

    /// Delivers a retained message whose offset a broker assigned (the Redis broker calls it
    /// for every message its pub/sub brings): appended to history and fanned out like a
    /// local publish when it follows the local top in the same epoch.
    ///
    /// A message at or below the local top is a duplicate and is dropped ([`Delivery::Stale`]).
    /// One that would leave a hole is not applied ([`Delivery::Gap`]) so the caller can fetch
    /// the missing ones first, unless `force`: then the channel jumps to it (under the
    /// message's epoch, with the history it cannot keep contiguous dropped), which is how a
    /// broker applies what it could not fill.
    pub fn deliver(
        &self,
        channel: &str,
        epoch: &str,
        offset: u64,
        data: &[u8],
        force: bool,
    ) -> Result<Delivery, PublishError> {
        validate_channel(channel).map_err(PublishError::InvalidChannel)?;
        loop {
            let ch = self.lookup_or_create(channel)?;
            let mut c = ch.lock();
            if c.removed {
                continue;
            }
            let same_epoch = *c.epoch == *epoch;
            let top = if same_epoch { c.top } else { 0 };
            if same_epoch && offset <= c.top {
                let held = c.history.since(offset.saturating_sub(1), 1).next();
                if held.is_some_and(|e| e.offset == offset && e.data()[..] != *data) {
                    return Ok(Delivery::Diverged);
                }
                return Ok(Delivery::Stale);
            }
            if offset != top + 1 && !force {
                return Ok(Delivery::Gap { top });
            }
            if same_epoch && offset > c.top + 1 {
                Self::break_continuity(&c, channel, c.top + 1..offset);
            }
            if !same_epoch || offset != c.top + 1 {
                Self::reset(&mut c, epoch);
            }
            c.top = offset;
            let fanout = self.emit(&mut c, channel, data, false);
            drop(c);
            fanout.count(&self.metrics);
            return Ok(Delivery::Applied);
        }
    }

    /// The last offset up to which `entries` (a broker's history of `channel` in `epoch`,
    /// oldest first) agree with what this node delivered: the offset before the first one
    /// it still holds with other data, or else its top (0 for another epoch).
    pub fn agreed_until(&self, channel: &str, epoch: &str, entries: &[(u64, Vec<u8>)]) -> u64 {
        let Some(ch) = self.lookup(channel) else { return 0 };
        let c = ch.lock();
        if *c.epoch != *epoch {
            return 0;
        }
        for (offset, data) in entries.iter().filter(|(o, _)| *o > 0 && *o <= c.top) {
            let held = c.history.since(offset - 1, 1).next();
            if held.is_some_and(|e| e.offset == *offset && e.data()[..] != data[..]) {
                return offset - 1;
            }
        }
        c.top
    }

    /// Delivers an ephemeral message a broker carried (conflated, not kept in history).
    pub fn deliver_ephemeral(&self, channel: &str, data: &[u8]) -> Result<(), PublishError> {
        validate_channel(channel).map_err(PublishError::InvalidChannel)?;
        loop {
            let ch = self.lookup_or_create(channel)?;
            let mut c = ch.lock();
            if c.removed {
                continue;
            }
            let fanout = self.emit(&mut c, channel, data, true);
            drop(c);
            fanout.count(&self.metrics);
            return Ok(());
        }
    }

    /// Merges what a broker read from its shared history into the local copy of `channel`,
    /// atomically: `entries` (`(offset, data)`, oldest first, contiguous) at or below the
    /// local top extend the local history backwards (so a recovery from further back can be
    /// answered here); those above it are delivered like [`Hub::deliver`] in order; then the
    /// channel moves to the broker's `top` if it is still behind (dropping history that would
    /// not be contiguous). A different `epoch` starts the channel over under it. Returns how
    /// many messages were new here (fanned out).
    pub fn merge(
        &self,
        channel: &str,
        epoch: &str,
        top: u64,
        entries: &[(u64, Vec<u8>)],
    ) -> Result<u64, PublishError> {
        validate_channel(channel).map_err(PublishError::InvalidChannel)?;
        loop {
            let ch = self.lookup_or_create(channel)?;
            let mut c = ch.lock();
            if c.removed {
                continue;
            }
            let same_epoch = *c.epoch == *epoch;
            if !same_epoch {
                Self::reset(&mut c, epoch);
                c.top = 0;
            }
            let now = Instant::now();
            c.history.expire(now);
            let local_top = c.top;
            for (offset, data) in entries.iter().rev().filter(|(o, _)| *o <= local_top) {
                let next_older = c.history.first_offset().unwrap_or(local_top + 1) - 1;
                if *offset != next_older {
                    continue;
                }
                let frame = encode_msg(channel, *offset, &c.epoch, data, false);
                if !c.history.prepend(*offset, frame, data.len(), now) {
                    break;
                }
            }
            let mut applied = 0;
            let mut fanout = Fanout::default();
            for (offset, data) in entries.iter().filter(|(o, _)| *o > local_top) {
                if *offset <= c.top {
                    continue;
                }
                if *offset != c.top + 1 {
                    if same_epoch {
                        Self::break_continuity(&c, channel, c.top + 1..*offset);
                    }
                    c.history.clear();
                }
                c.top = *offset;
                let f = self.emit(&mut c, channel, data, false);
                fanout.queued += f.queued;
                fanout.conflated += f.conflated;
                fanout.dropped += f.dropped;
                fanout.overflowed += f.overflowed;
                applied += 1;
            }
            // Behind `top` with nothing more to deliver from the broker's history: the
            // messages in between are lost, and the channel moves there.
            if top > c.top {
                if same_epoch && local_top > 0 {
                    Self::break_continuity(&c, channel, c.top + 1..top + 1);
                }
                c.history.clear();
                c.top = top;
            }
            drop(c);
            if applied > 0 {
                fanout.count(&self.metrics);
                HubMetrics::add(&self.metrics.messages_in, applied - 1);
            }
            return Ok(applied);
        }
    }

    /// Messages `missing` of a channel will never reach its subscribers (the broker's history
    /// no longer holds them). Where the namespace's policy is `disconnect` (no message may be
    /// skipped silently), each subscriber is closed with 4008 as a slow consumer would be, so
    /// it recovers and learns of the gap with `recovered: false`; under `conflate` or
    /// `drop_oldest`, losing messages is what the subscribers accepted.
    fn break_continuity(c: &Channel, channel: &str, missing: std::ops::Range<u64>) {
        if c.ns.overflow != OverflowPolicy::Disconnect || c.subscribers.is_empty() {
            return;
        }
        tracing::warn!(
            channel,
            from = missing.start,
            to = missing.end - 1,
            subscribers = c.subscribers.len(),
            "messages lost for good; closing the channel's subscribers with 4008 so they recover"
        );
        for queue in &c.subscribers {
            queue.mark_overflowed();
        }
    }

    /// Starts the channel over under `epoch`: nothing held locally belongs to it.
    fn reset(c: &mut Channel, epoch: &str) {
        if *c.epoch != *epoch {
            c.epoch = Arc::from(epoch);
        }
        c.history.clear();
        c.latest_ephemeral = None;
    }

    /// Calls the taps of `channel`'s namespace with a retained message's `data`. A broker
    /// that assigns offsets elsewhere calls it for what it carries while following taps.
    pub fn run_taps(&self, channel: &str, data: &[u8]) {
        let taps = self.taps.read();
        if taps.is_empty() {
            return;
        }
        let ns = ferrocast_protocol::namespace_of(channel);
        for (tap_ns, tap) in taps.iter() {
            if tap_ns == ns {
                tap(channel, data);
            }
        }
    }

    /// Subscribes `queue` to `channel`. With `recover`, replays what the client missed into
    /// the queue (or, when that is impossible, the namespace's snapshot); without, sends the
    /// snapshot. Everything pushed here precedes any live message of the channel.
    pub fn subscribe(
        &self,
        channel: &str,
        queue: &Arc<ConnQueue>,
        recover: Option<&StreamPosition>,
    ) -> Subscription {
        if let Err(e) = validate_channel(channel) {
            return Subscription {
                result: ChannelResult::failed(ErrorCode::InvalidChannel, e.to_string()),
                added: false,
            };
        }
        let listeners = self.demand.read().clone();
        if let Some(Err(reason)) = listeners.iter().map(|l| l.admit(channel)).find(Result::is_err) {
            return Subscription {
                result: ChannelResult::failed(ErrorCode::UpstreamRejected, reason),
                added: false,
            };
        }
        let (subscription, first) = loop {
            let ch = match self.lookup(channel) {
                Some(ch) => ch,
                None if !self.namespaces.for_channel(channel).create_on_subscribe => {
                    let result = ChannelResult::failed(
                        ErrorCode::UnknownChannel,
                        format!(
                            "channel {channel:?} does not exist and namespace {:?} does not let a subscribe create it (create_on_subscribe = false)",
                            ferrocast_protocol::namespace_of(channel)
                        ),
                    );
                    return Subscription { result, added: false };
                }
                None => match self.lookup_or_create(channel) {
                    Ok(ch) => ch,
                    Err(e) => {
                        let result = ChannelResult::failed(ErrorCode::ChannelLimit, e.to_string());
                        return Subscription { result, added: false };
                    }
                },
            };
            let mut c = ch.lock();
            if c.removed {
                continue;
            }
            let now = Instant::now();
            c.history.expire(now);
            c.last_active = now;
            let conn_id = queue.conn_id();
            if c.positions.contains_key(&conn_id) {
                let result = ChannelResult::Subscribed {
                    epoch: c.epoch.to_string(),
                    offset: c.top,
                    recovered: None,
                    replayed: None,
                    snapshot: None,
                };
                break (Subscription { result, added: false }, false);
            }
            let mut recovered = None;
            let mut replayed = None;
            let mut snapshot = None;
            match recover {
                Some(pos) if self.can_recover(&c, pos) => {
                    let missed = c.top - pos.offset;
                    HubMetrics::add(&self.metrics.replayed, missed);
                    HubMetrics::add(&self.metrics.recoveries_ok, 1);
                    replayed = Some(missed as usize);
                    // The forming bar (if any) is current state, not history: send it too.
                    let tail = c.latest_ephemeral.clone();
                    self.push_history(&ch, &c, queue, pos.offset, tail, true);
                    recovered = Some(true);
                }
                Some(_) => {
                    HubMetrics::add(&self.metrics.recoveries_failed, 1);
                    recovered = Some(false);
                    snapshot = self.send_snapshot(&ch, &c, queue);
                }
                None => snapshot = self.send_snapshot(&ch, &c, queue),
            }
            let index = c.subscribers.len();
            c.subscribers.push(queue.clone());
            c.positions.insert(conn_id, index);
            let first = c.subscribers.len() == 1;
            let result = ChannelResult::Subscribed {
                epoch: c.epoch.to_string(),
                offset: c.top,
                recovered,
                replayed,
                snapshot,
            };
            break (Subscription { result, added: true }, first);
        };
        if subscription.added {
            self.metrics.subscriptions.fetch_add(1, Ordering::Relaxed);
        }
        if first {
            self.notify_demand(channel, true);
        }
        subscription
    }

    /// Queues a cursor over `c`'s history after `after` (up to its top), then `tail`. The
    /// messages are read as the connection's writer drains, not copied now.
    fn push_history(
        &self,
        ch: &Arc<Mutex<Channel>>,
        c: &Channel,
        queue: &ConnQueue,
        after: u64,
        tail: Option<Bytes>,
        exact: bool,
    ) {
        if after >= c.top && tail.is_none() {
            return;
        }
        let source: Arc<dyn HistorySource> = Arc::new(ChannelHistory(ch.clone()));
        queue.push_replay(Replay { source, channel_id: c.id, after, until: c.top, tail, exact });
    }

    fn can_recover(&self, c: &Channel, pos: &StreamPosition) -> bool {
        *pos.epoch == *c.epoch
            && pos.offset <= c.top
            && c.top - pos.offset <= c.ns.max_replay as u64
            && c.history.covers_after(pos.offset, c.top)
    }

    fn send_snapshot(
        &self,
        ch: &Arc<Mutex<Channel>>,
        c: &Channel,
        queue: &ConnQueue,
    ) -> Option<SnapshotSent> {
        let held = c.history.len();
        let from_history = match c.ns.snapshot {
            SnapshotMode::None => return None,
            SnapshotMode::Latest if c.latest_ephemeral.is_some() => 0,
            SnapshotMode::Latest => held.min(1),
            SnapshotMode::Last => held.min(c.ns.snapshot_size),
        };
        let tail = c.latest_ephemeral.clone();
        let count = from_history + usize::from(tail.is_some());
        HubMetrics::add(&self.metrics.snapshot_messages, count as u64);
        self.push_history(ch, c, queue, c.top - from_history as u64, tail, false);
        Some(match c.ns.snapshot {
            SnapshotMode::Latest => SnapshotSent::Latest { count },
            _ => SnapshotSent::Last { count },
        })
    }

    /// Removes connection `conn_id` from `channel`. Returns whether it was subscribed.
    pub fn unsubscribe(&self, channel: &str, conn_id: u64) -> bool {
        let Some(ch) = self.lookup(channel) else { return false };
        let mut c = ch.lock();
        let Some(index) = c.positions.remove(&conn_id) else { return false };
        c.subscribers.swap_remove(index);
        if let Some(moved) = c.subscribers.get(index) {
            let moved_id = moved.conn_id();
            c.positions.insert(moved_id, index);
        }
        c.last_active = Instant::now();
        let last = c.subscribers.is_empty();
        let never_published = last && c.top == 0 && c.latest_ephemeral.is_none();
        drop(c);
        self.metrics.subscriptions.fetch_sub(1, Ordering::Relaxed);
        if never_published {
            self.forget_if_unused(channel);
        }
        if last {
            self.notify_demand(channel, false);
        }
        true
    }

    /// Removes `channel` at once if it has no subscriber and was never published to: such a
    /// channel holds nothing worth keeping, and subscribe/unsubscribe churn must not mint
    /// channels that linger for their TTL.
    fn forget_if_unused(&self, channel: &str) {
        let mut shard = self.shard(channel).write();
        let Some(ch) = shard.get(channel) else { return };
        let mut c = ch.lock();
        if !(c.subscribers.is_empty() && c.top == 0 && c.latest_ephemeral.is_none()) {
            return;
        }
        c.removed = true;
        drop(c);
        shard.remove(channel);
        shrink_if_sparse(&mut shard);
        self.metrics.channels.fetch_sub(1, Ordering::Relaxed);
        HubMetrics::add(&self.metrics.channels_expired, 1);
    }

    fn notify_demand(&self, channel: &str, wanted: bool) {
        let listeners = self.demand.read().clone();
        for listener in listeners {
            listener.demand_changed(channel, wanted);
        }
    }

    /// Every channel held, with subscriber counts and the top offset, sorted by name.
    pub fn channels(&self) -> Vec<ChannelInfo> {
        self.channels_page(None, usize::MAX).channels
    }

    /// Up to `limit` channels whose names sort after `after`, with subscriber counts and the
    /// top offset, sorted by name.
    pub fn channels_page(&self, after: Option<&str>, limit: usize) -> ChannelPage {
        let mut names: Vec<(Arc<str>, Arc<Mutex<Channel>>)> = Vec::new();
        let mut total = 0;
        for shard in self.shards.iter() {
            let map = shard.read();
            total += map.len();
            names.extend(
                map.iter()
                    .filter(|(name, _)| after.is_none_or(|a| &***name > a))
                    .map(|(name, ch)| (name.clone(), ch.clone())),
            );
        }
        let more = names.len() > limit;
        if more {
            names.select_nth_unstable_by(limit, |a, b| a.0.cmp(&b.0));
            names.truncate(limit);
        }
        names.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let channels: Vec<ChannelInfo> = names
            .into_iter()
            .map(|(name, ch)| {
                let c = ch.lock();
                ChannelInfo {
                    channel: name.to_string(),
                    subscribers: c.subscribers.len(),
                    offset: c.top,
                    epoch: c.epoch.to_string(),
                }
            })
            .collect();
        let next = if more { channels.last().map(|c| c.channel.clone()) } else { None };
        ChannelPage { channels, total, next }
    }

    /// Retained messages of `channel` after `since`, at most `limit`.
    pub fn history(&self, channel: &str, since: u64, limit: usize) -> Option<HistoryPage> {
        let ch = self.lookup(channel)?;
        let mut c = ch.lock();
        c.history.expire(Instant::now());
        Some(HistoryPage {
            channel: channel.to_owned(),
            epoch: c.epoch.to_string(),
            offset: c.top,
            messages: c.history.since(since, limit).map(|e| (e.offset, e.data())).collect(),
        })
    }

    /// Forgets channels with no subscribers that have been idle past their namespace's
    /// `channel_ttl_ms`. Returns how many were removed. Run periodically.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut map = shard.write();
            map.retain(|_, ch| {
                let mut c = ch.lock();
                let ttl = Duration::from_millis(c.ns.channel_ttl_ms);
                let never_published = c.top == 0 && c.latest_ephemeral.is_none();
                let idle = c.subscribers.is_empty()
                    && (never_published || now.duration_since(c.last_active) > ttl);
                if idle {
                    c.removed = true;
                    removed += 1;
                    if c.top > 0 {
                        // Before the shard lock is released, so no new incarnation of this
                        // channel can be created under its old epoch.
                        *self.epoch_for_new.write() = new_epoch();
                    }
                } else {
                    c.history.expire(now);
                }
                !idle
            });
            shrink_if_sparse(&mut map);
        }
        self.metrics.channels.fetch_sub(removed as u64, Ordering::Relaxed);
        HubMetrics::add(&self.metrics.channels_expired, removed as u64);
        removed
    }
}

/// Gives a shard's table memory back once most of it is empty (after a sweep or churn).
fn shrink_if_sparse<V>(map: &mut HashMap<Arc<str>, V>) {
    if map.capacity() > 64 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

/// Reads one channel's history for a replay cursor (see [`Replay`]).
struct ChannelHistory(Arc<Mutex<Channel>>);

impl HistorySource for ChannelHistory {
    fn read_after(
        &self,
        after: u64,
        until: u64,
        max_bytes: usize,
        out: &mut Vec<Outbound>,
    ) -> HistoryRead {
        let mut c = self.0.lock();
        if c.removed {
            return HistoryRead { last: until, skipped: true };
        }
        c.history.expire(Instant::now());
        let skipped = !c.history.covers_after(after, until);
        let mut last = after;
        let mut bytes = 0;
        for entry in c.history.since(after, usize::MAX) {
            if entry.offset > until {
                break;
            }
            out.push(Outbound::history(entry.frame.clone(), c.id));
            last = entry.offset;
            bytes += entry.frame.len();
            if bytes >= max_bytes {
                break;
            }
        }
        if last == after && skipped {
            last = until;
        }
        HistoryRead { last, skipped }
    }
}

/// A fresh epoch: 8 random characters from the channel-name alphabet, so it never needs
/// escaping in JSON and distinguishes this incarnation of a channel from any earlier one.
fn new_epoch() -> Arc<str> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let s: String = (0..8).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect();
    Arc::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::namespace::NamespaceConfig;
    use crate::queue::Drained;

    /// Refuses `quotes.*` channels and records demand changes.
    struct Guard(Mutex<Vec<(String, bool)>>);

    impl DemandListener for Guard {
        fn demand_changed(&self, channel: &str, wanted: bool) {
            self.0.lock().push((channel.to_owned(), wanted));
        }

        fn admit(&self, channel: &str) -> Result<(), String> {
            if channel.starts_with("quotes.") { Err("limit reached".into()) } else { Ok(()) }
        }
    }

    #[test]
    fn the_demand_listener_can_refuse_a_subscribe() {
        let hub = Hub::new(
            Namespaces::new(Default::default(), NamespaceConfig::default()),
            HubOptions::default(),
        );
        let guard = Arc::new(Guard(Mutex::new(Vec::new())));
        hub.add_demand_listener(guard.clone());
        let q = Arc::new(ConnQueue::new(1, 1 << 20));

        let refused = hub.subscribe("quotes.O:X", &q, None);
        assert!(!refused.added);
        assert_eq!(
            refused.result,
            ChannelResult::failed(ErrorCode::UpstreamRejected, "limit reached")
        );
        assert_eq!(hub.subscriber_count("quotes.O:X"), 0);

        assert!(hub.subscribe("ticks.A", &q, None).added);
        assert_eq!(hub.subscriber_count("ticks.A"), 1);
        hub.unsubscribe("ticks.A", 1);
        assert_eq!(hub.subscriber_count("ticks.A"), 0);
        assert_eq!(
            *guard.0.lock(),
            vec![("ticks.A".to_owned(), true), ("ticks.A".to_owned(), false)]
        );
    }

    fn hub() -> Hub {
        Hub::new(
            Namespaces::new(Default::default(), NamespaceConfig::default()),
            HubOptions::default(),
        )
    }

    /// Offsets of the `msg` frames a queue holds, in order.
    fn offsets(q: &ConnQueue) -> Vec<u64> {
        q.drain()
            .frames
            .iter()
            .filter(|f| f.is_message())
            .map(|f| {
                let v: serde_json::Value = serde_json::from_slice(&f.bytes).unwrap();
                v["offset"].as_u64().unwrap()
            })
            .collect()
    }

    #[tokio::test]
    async fn a_run_reaches_each_writer_whole_with_one_wake_up() {
        let hub = hub();
        let (a, b) = (Arc::new(ConnQueue::new(1, 1 << 20)), Arc::new(ConnQueue::new(2, 1 << 20)));
        hub.subscribe("chat.a", &a, None);
        hub.subscribe("chat.a", &b, None);
        let _ = a.drain();
        let _ = b.drain();
        let (published, stopped) =
            hub.publish_run("chat.a", &[b"1", b"2", b"3"], PublishKind::Retained);
        assert_eq!(stopped, None);
        let offsets_published: Vec<u64> = published.iter().map(|p| p.offset).collect();
        assert_eq!(offsets_published, vec![1, 2, 3]);
        assert_eq!(hub.metrics().messages_in.load(Ordering::Relaxed), 3);
        // The one wake-up is owed and given: the writer finds all three queued.
        tokio::time::timeout(Duration::from_secs(5), a.notified()).await.unwrap();
        assert_eq!(offsets(&a), vec![1, 2, 3]);
        assert_eq!(offsets(&b), vec![1, 2, 3]);
        let refused = hub.publish_run("bad channel", &[b"1"], PublishKind::Retained);
        assert!(refused.0.is_empty());
        assert!(matches!(refused.1, Some(PublishError::InvalidChannel(_))));
    }

    #[test]
    fn shared_forms_go_only_to_queues_that_want_them_and_are_made_once() {
        let hub = hub();
        let plain = Arc::new(ConnQueue::new(1, 1 << 20));
        let (a, b) = (Arc::new(ConnQueue::new(2, 1 << 20)), Arc::new(ConnQueue::new(3, 1 << 20)));
        a.want_forms();
        b.want_forms();
        for q in [&plain, &a, &b] {
            hub.subscribe("chat.forms", q, None);
        }
        hub.publish("chat.forms", b"1", PublishKind::Retained).unwrap();
        let (plain, a, b) = (plain.drain(), a.drain(), b.drain());
        assert!(plain.frames.iter().all(|f| f.forms.is_none()));
        let forms = |d: &Drained| d.frames.iter().find_map(|f| f.forms.clone()).unwrap();
        let (fa, fb) = (forms(&a), forms(&b));
        assert!(Arc::ptr_eq(&fa, &fb), "one set of forms per message, shared");
        let mut made = 0;
        for f in [&fa, &fb] {
            f.get_or_encode_socketio(|| {
                made += 1;
                serde_json::value::to_raw_value(&1).ok()
            });
        }
        assert_eq!(made, 1);
    }

    #[test]
    fn deliver_applies_in_order_drops_duplicates_and_reports_gaps() {
        let hub = hub();
        let q = Arc::new(ConnQueue::new(1, 1 << 20));
        hub.deliver("chat.a", "ep1", 1, b"1", false).unwrap();
        hub.subscribe("chat.a", &q, None);
        assert_eq!(hub.deliver("chat.a", "ep1", 2, b"2", false), Ok(Delivery::Applied));
        assert_eq!(hub.deliver("chat.a", "ep1", 2, b"2", false), Ok(Delivery::Stale));
        assert_eq!(hub.deliver("chat.a", "ep1", 1, b"1", false), Ok(Delivery::Stale));
        assert_eq!(hub.deliver("chat.a", "ep1", 5, b"5", false), Ok(Delivery::Gap { top: 2 }));
        assert_eq!(offsets(&q), vec![2], "neither a duplicate nor a message past a gap is sent");
        hub.deliver("chat.a", "ep1", 3, b"3", true).unwrap();
        hub.deliver("chat.a", "ep1", 4, b"4", true).unwrap();
        hub.deliver("chat.a", "ep1", 5, b"5", false).unwrap();
        assert_eq!(offsets(&q), vec![3, 4, 5]);
        let page = hub.history("chat.a", 0, 100).unwrap();
        assert_eq!(page.messages.iter().map(|m| m.0).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
        assert_eq!(page.epoch, "ep1");
    }

    #[test]
    fn a_new_epoch_or_a_forced_jump_starts_the_history_over() {
        let hub = hub();
        for offset in 1..=3 {
            hub.deliver("chat.a", "ep1", offset, b"0", false).unwrap();
        }
        assert_eq!(hub.deliver("chat.a", "ep2", 2, b"0", false), Ok(Delivery::Gap { top: 0 }));
        hub.deliver("chat.a", "ep2", 2, b"0", true).unwrap();
        let p = hub.position("chat.a").unwrap();
        assert_eq!((&*p.epoch, p.top, p.first), ("ep2", 2, Some(2)));
        hub.deliver("chat.a", "ep2", 9, b"0", true).unwrap();
        let p = hub.position("chat.a").unwrap();
        assert_eq!((p.top, p.first), (9, Some(9)), "history stays contiguous");
    }

    #[test]
    fn another_message_at_a_delivered_offset_is_a_divergence() {
        let hub = hub();
        for offset in 1..=3 {
            hub.deliver("chat.a", "ep1", offset, offset.to_string().as_bytes(), false).unwrap();
        }
        assert_eq!(hub.deliver("chat.a", "ep1", 2, b"2", false), Ok(Delivery::Stale));
        assert_eq!(hub.deliver("chat.a", "ep1", 2, b"\"x\"", false), Ok(Delivery::Diverged));
        assert_eq!(hub.position("chat.a").unwrap().top, 3, "nothing was applied");
        let redis = vec![(1, b"1".to_vec()), (2, b"\"x\"".to_vec()), (3, b"3".to_vec())];
        assert_eq!(hub.agreed_until("chat.a", "ep1", &redis), 1);
        assert_eq!(hub.agreed_until("chat.a", "ep1", &entries(1..=5)), 3, "up to what it holds");
        assert_eq!(hub.agreed_until("chat.a", "ep2", &entries(1..=3)), 0);
    }

    #[test]
    fn messages_lost_for_good_close_subscribers_only_where_nothing_may_be_skipped() {
        let mut spaces = std::collections::BTreeMap::new();
        let conflate = NamespaceConfig { overflow: OverflowPolicy::Conflate, ..Default::default() };
        spaces.insert("ticks".to_owned(), conflate);
        let hub =
            Hub::new(Namespaces::new(spaces, NamespaceConfig::default()), HubOptions::default());
        let (chat, ticks) =
            (Arc::new(ConnQueue::new(1, 1 << 20)), Arc::new(ConnQueue::new(2, 1 << 20)));
        for (channel, q) in [("chat.a", &chat), ("ticks.a", &ticks)] {
            hub.deliver(channel, "ep1", 1, b"1", false).unwrap();
            hub.subscribe(channel, q, None);
            hub.deliver(channel, "ep1", 4, b"4", true).unwrap();
        }
        assert!(chat.is_overflowed(), "a chat subscriber is closed (4008) to recover");
        assert!(!ticks.is_overflowed(), "a conflated feed just goes on");
        assert_eq!(offsets(&ticks), vec![4]);

        // The same for a merge that must jump, but not for another epoch.
        let later = Arc::new(ConnQueue::new(3, 1 << 20));
        hub.subscribe("chat.a", &later, None);
        hub.merge("chat.a", "ep2", 9, &[]).unwrap();
        assert!(!later.is_overflowed(), "a new epoch is announced by the messages themselves");
        hub.merge("chat.a", "ep2", 12, &entries(11..=12)).unwrap();
        assert!(later.is_overflowed(), "10 is lost");
    }

    fn entries(range: std::ops::RangeInclusive<u64>) -> Vec<(u64, Vec<u8>)> {
        range.map(|o| (o, o.to_string().into_bytes())).collect()
    }

    #[test]
    fn merge_moves_to_the_broker_position_and_recovery_follows_it() {
        let hub = hub();
        assert_eq!(hub.merge("chat.a", "ep1", 0, &[]), Ok(0));
        let p = hub.position("chat.a").unwrap();
        assert_eq!((&*p.epoch, p.top), ("ep1", 0), "the broker's epoch replaces the local one");
        let live = Arc::new(ConnQueue::new(9, 1 << 20));
        hub.subscribe("chat.a", &live, None);
        assert_eq!(hub.merge("chat.a", "ep1", 4, &entries(1..=4)), Ok(4));
        assert_eq!(offsets(&live), vec![1, 2, 3, 4], "new messages are fanned out");
        assert_eq!(hub.merge("chat.a", "ep1", 2, &entries(1..=2)), Ok(0));
        assert_eq!(hub.position("chat.a").unwrap().top, 4, "merge never moves back");
        assert!(offsets(&live).is_empty(), "nothing is delivered twice");
        let q = Arc::new(ConnQueue::new(1, 1 << 20));
        let pos = StreamPosition { epoch: "ep1".into(), offset: 1 };
        let sub = hub.subscribe("chat.a", &q, Some(&pos));
        assert!(matches!(sub.result, ChannelResult::Subscribed { recovered: Some(true), .. }));
        assert_eq!(offsets(&q), vec![2, 3, 4]);
        hub.merge("chat.a", "ep1", 10, &[]).unwrap();
        let p = hub.position("chat.a").unwrap();
        assert_eq!((p.top, p.first), (10, None), "a jump without messages keeps no history");
        let q2 = Arc::new(ConnQueue::new(2, 1 << 20));
        let sub = hub.subscribe("chat.a", &q2, Some(&pos));
        assert!(matches!(sub.result, ChannelResult::Subscribed { recovered: Some(false), .. }));
    }

    #[test]
    fn merge_extends_history_backwards_for_a_deeper_recovery() {
        let hub = hub();
        hub.merge("chat.a", "ep1", 5, &entries(3..=5)).unwrap();
        assert_eq!(hub.position("chat.a").unwrap().first, Some(3));
        let live = Arc::new(ConnQueue::new(9, 1 << 20));
        hub.subscribe("chat.a", &live, None);
        hub.merge("chat.a", "ep1", 5, &entries(1..=5)).unwrap();
        assert_eq!(hub.position("chat.a").unwrap().first, Some(1));
        assert!(offsets(&live).is_empty(), "older messages are history, not live traffic");
        let q = Arc::new(ConnQueue::new(1, 1 << 20));
        let pos = StreamPosition { epoch: "ep1".into(), offset: 0 };
        hub.subscribe("chat.a", &q, Some(&pos));
        assert_eq!(offsets(&q), vec![1, 2, 3, 4, 5]);
        let page = hub.history("chat.a", 0, 10).unwrap();
        assert_eq!(page.messages[0].1, Bytes::from_static(b"1"));
    }
}
