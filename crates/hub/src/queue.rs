//! A connection's outbound queue: bounded in bytes, never awaited by publishers.
//!
//! Everything a connection causes to be queued counts against one byte budget
//! (`queue_max_bytes`): live channel messages, replies to its requests (acks, errors, pongs),
//! and the bookkeeping of replays and snapshots. Publishers append with [`ConnQueue::push`],
//! which takes a short lock and returns at once. When the budget would be exceeded, the
//! message's overflow policy decides what gives way (see [`OverflowPolicy`]); where nothing
//! may give way the queue is marked overflowed and the connection's writer closes it with
//! 4008, which frees its memory.
//!
//! Making room is O(1) amortised whatever the queue holds: a conflating message replaces the
//! pending message of its channel in place (found through a per-channel index), and
//! drop-oldest pops the oldest droppable message from a FIFO of their positions. Removed
//! messages leave a tombstone that the writer skips; tombstones are compacted away once
//! they outnumber the live entries, so a queue nobody drains stays bounded too.
//!
//! Replays and snapshots are not copied into the queue: one [`ConnQueue::push_replay`] entry
//! holds a cursor into the channel's history, and [`ConnQueue::drain_into`] reads it a chunk
//! at a time as the writer asks for more, so a recovery larger than the budget streams as
//! the socket drains and never materialises in full.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::value::RawValue;
use tokio::sync::Notify;

use crate::namespace::OverflowPolicy;

/// Bookkeeping counted for every queued entry on top of its bytes, so a flood of tiny replies
/// is bounded by the budget too.
pub const ENTRY_COST: usize = 64;
/// What a pending replay or snapshot counts against the budget: the cursor itself is small,
/// but each one stands for a chunk of history the writer will hold, so a client cannot
/// queue thousands of them without reading. Never more than a sixteenth of the budget, so
/// even a tiny budget takes a recovery.
pub const REPLAY_COST: usize = 2048;
/// Most bytes of history one drain reads from a replay cursor.
const REPLAY_CHUNK_BYTES: usize = 64 * 1024;
/// Tombstones tolerated before a compaction is considered.
const COMPACT_MIN_TOMBSTONES: usize = 64;

/// Whether a published message is kept in history or is a transient, conflatable update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishKind {
    Retained,
    Ephemeral,
}

/// One frame ready to be written.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The encoded frame, shared with every other subscriber.
    pub bytes: Bytes,
    /// The hub's id of the channel; 0 for control frames.
    pub channel_id: u64,
    /// When the message was published, for the publish-to-write latency histogram.
    pub published_at: Option<Instant>,
    /// Forms of the message that transports derive from `bytes`, each made once for every
    /// subscriber: given only to queues that asked for them ([`ConnQueue::want_forms`]).
    pub forms: Option<Arc<SharedForms>>,
}

/// What transports make of one message, each computed at most once (by the first connection
/// that needs it; concurrent callers wait rather than compute it again) and shared by every
/// other subscriber. The hub only carries them: the transport that speaks a form fills it.
#[derive(Debug, Default)]
pub struct SharedForms {
    /// The channel's namespace compresses this message (`compress`, `compress_min_bytes`).
    pub compress: bool,
    deflated: OnceLock<Bytes>,
    socketio: OnceLock<Option<Box<RawValue>>>,
    socketio_frame: OnceLock<Option<Bytes>>,
}

impl SharedForms {
    pub fn new(compress: bool) -> Self {
        SharedForms { compress, ..SharedForms::default() }
    }

    /// The permessage-deflate payload (RFC 7692), made by `compress` on the first call only.
    pub fn get_or_compress(&self, compress: impl FnOnce() -> Bytes) -> &Bytes {
        self.deflated.get_or_init(compress)
    }

    /// The argument of the Socket.IO `message` event, made by `encode` on the first call only
    /// (`None` when the frame cannot be one).
    pub fn get_or_encode_socketio(
        &self,
        encode: impl FnOnce() -> Option<Box<RawValue>>,
    ) -> Option<&RawValue> {
        self.socketio.get_or_init(encode).as_deref()
    }

    /// The whole websocket frame carrying the Socket.IO `message` event (what a socket whose
    /// transport ferrocast writes itself sends), made by `frame` on the first call only
    /// (`None` when the frame cannot be one).
    pub fn get_or_frame_socketio(&self, frame: impl FnOnce() -> Option<Bytes>) -> Option<&Bytes> {
        self.socketio_frame.get_or_init(frame).as_ref()
    }
}

impl Outbound {
    /// A frame that is not a channel message (ack, error, pong).
    pub fn control(bytes: Bytes) -> Self {
        Outbound { bytes, channel_id: 0, published_at: None, forms: None }
    }

    /// A replayed or snapshot message.
    pub fn history(bytes: Bytes, channel_id: u64) -> Self {
        Outbound { bytes, channel_id, published_at: None, forms: None }
    }

    /// Whether this frame is a channel message (as opposed to a control frame).
    pub fn is_message(&self) -> bool {
        self.channel_id != 0
    }
}

/// Where a replay cursor reads retained messages from (a channel's history).
pub trait HistorySource: Send + Sync {
    /// Appends the retained frames with offsets in `(after, until]`, oldest first, stopping
    /// once `max_bytes` have been appended (at least one frame is). When the history no
    /// longer holds the message right after `after`, reads from its oldest message instead
    /// and says so.
    fn read_after(
        &self,
        after: u64,
        until: u64,
        max_bytes: usize,
        out: &mut Vec<Outbound>,
    ) -> HistoryRead;
}

/// What a [`HistorySource::read_after`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryRead {
    /// The offset of the last frame appended, or the position to go on from.
    pub last: u64,
    /// Messages right after `after` were no longer held and were skipped.
    pub skipped: bool,
}

/// A replay or snapshot waiting in the queue: a cursor, not the messages.
pub struct Replay {
    pub source: Arc<dyn HistorySource>,
    pub channel_id: u64,
    /// The last offset already delivered.
    pub after: u64,
    /// The last offset to deliver (the channel's top when the subscription was made).
    pub until: u64,
    /// Sent once the replay is complete (the forming bar of a candle channel).
    pub tail: Option<Bytes>,
    /// A recovery must be exact: if history was trimmed past the cursor while it waited, the
    /// connection is closed (4008) so the client recovers again and learns of the gap. A
    /// snapshot just skips ahead.
    pub exact: bool,
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay")
            .field("channel_id", &self.channel_id)
            .field("after", &self.after)
            .field("until", &self.until)
            .field("exact", &self.exact)
            .finish_non_exhaustive()
    }
}

/// What happened to a pushed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PushOutcome {
    /// Older queued messages replaced by newer ones of the same channel.
    pub conflated: u32,
    /// Messages discarded to make room (including, possibly, the new one).
    pub dropped: u32,
    /// The budget was exhausted by something that may not be dropped: close with 4008.
    pub overflowed: bool,
}

/// Handle to a reserved position in the queue (see [`ConnQueue::reserve`]).
#[derive(Debug)]
pub struct Reservation(u64);

/// The result of a [`ConnQueue::drain_into`].
#[derive(Debug, Default)]
pub struct Drained {
    pub frames: Vec<Outbound>,
    /// Channel messages (live or replayed) were among `frames`, rather than only replies.
    pub carried_messages: bool,
    /// The queue overflowed: after writing `frames`, close the connection with 4008.
    pub overflowed: bool,
    /// The server asked for the connection to be closed (see [`ConnQueue::request_close`]):
    /// after writing `frames`, close it with this code and reason.
    pub close: Option<(u16, Arc<str>)>,
}

/// Hasher for the per-channel index: channel ids are already unique integers.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Spread sequential ids over the table's buckets.
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type ChannelIndex = HashMap<u64, u64, BuildHasherDefault<IdHasher>>;

enum Slot {
    /// A live channel message, under its channel's overflow policy.
    Live {
        out: Outbound,
        policy: OverflowPolicy,
    },
    /// A reply or other frame that must not be dropped.
    Control(Outbound),
    /// A position held for a frame computed later (see [`ConnQueue::reserve`]).
    Reserved(u64),
    Replay(Box<Replay>),
    /// Removed to make room; skipped by the writer.
    Gone,
}

impl Slot {
    /// What the slot counts against the budget, given what a replay cursor counts.
    fn cost(&self, replay_cost: usize) -> usize {
        ENTRY_COST
            + match self {
                Slot::Live { out, .. } | Slot::Control(out) => out.bytes.len(),
                Slot::Replay(_) => replay_cost,
                Slot::Reserved(_) | Slot::Gone => 0,
            }
    }
}

#[derive(Default)]
struct Inner {
    slots: VecDeque<Slot>,
    /// Position of `slots[0]`. Positions grow as the writer pops, so the indexes below stay
    /// valid across drains; a compaction renumbers everything and rebuilds them.
    base: u64,
    /// Budgeted bytes of everything queued.
    cost: usize,
    /// The part of `cost` that is not live messages: what the connection's own requests
    /// caused (replies, reservations, replay cursors).
    reply_cost: usize,
    /// Tombstones among `slots`.
    gone: usize,
    /// Positions of live messages that may be dropped, oldest first; entries whose message
    /// was drained or removed are skipped lazily.
    droppable: VecDeque<u64>,
    /// The newest queued conflating message of each channel.
    latest: ChannelIndex,
    /// Open reservations: (reservation id, position).
    reservations: Vec<(u64, u64)>,
    next_reservation: u64,
    overflowed: bool,
    /// A close asked for by the server (API, proxy): code and reason.
    close: Option<(u16, Arc<str>)>,
    /// What a pending replay counts (see [`REPLAY_COST`]).
    replay_cost: usize,
}

impl Inner {
    fn end(&self) -> u64 {
        self.base + self.slots.len() as u64
    }

    fn slot_mut(&mut self, pos: u64) -> Option<&mut Slot> {
        let index = pos.checked_sub(self.base)?;
        self.slots.get_mut(index as usize)
    }

    fn push_slot(&mut self, slot: Slot) -> u64 {
        let pos = self.end();
        let cost = slot.cost(self.replay_cost);
        self.cost += cost;
        if !matches!(slot, Slot::Live { .. }) {
            self.reply_cost += cost;
        }
        self.slots.push_back(slot);
        pos
    }

    /// Replaces the queued conflating message of `channel_id`, if there is one, with `new`.
    /// Gives `new` back when there is none.
    fn conflate_in_place(&mut self, new: Outbound) -> Result<(), Outbound> {
        let Some(&pos) = self.latest.get(&new.channel_id) else { return Err(new) };
        let Some(Slot::Live { out, .. }) = self.slot_mut(pos) else { return Err(new) };
        let old = out.bytes.len();
        let added = new.bytes.len();
        *out = new;
        self.cost = self.cost + added - old;
        Ok(())
    }

    /// Removes the live message at `pos` (a tombstone stays). Returns its policy.
    fn remove_live(&mut self, pos: u64) -> Option<OverflowPolicy> {
        let slot = self.slot_mut(pos)?;
        let Slot::Live { out, policy } = slot else { return None };
        let (channel_id, policy, cost) = (out.channel_id, *policy, ENTRY_COST + out.bytes.len());
        *slot = Slot::Gone;
        self.cost -= cost;
        self.gone += 1;
        if policy == OverflowPolicy::Conflate && self.latest.get(&channel_id) == Some(&pos) {
            self.latest.remove(&channel_id);
        }
        Some(policy)
    }

    /// Frees room for `incoming` more bytes: first by replacing nothing (callers conflate),
    /// then by dropping the oldest droppable messages. Returns whether it now fits.
    fn evict_for(&mut self, incoming: usize, max: usize, outcome: &mut PushOutcome) -> bool {
        while self.cost + incoming > max {
            let Some(pos) = self.droppable.pop_front() else { return false };
            match self.remove_live(pos) {
                Some(OverflowPolicy::Conflate) => outcome.conflated += 1,
                Some(_) => outcome.dropped += 1,
                None => {}
            }
        }
        self.maybe_compact();
        true
    }

    /// Drops tombstones once they outnumber live entries, renumbering positions.
    fn maybe_compact(&mut self) {
        if self.gone < COMPACT_MIN_TOMBSTONES || self.gone * 2 < self.slots.len() {
            return;
        }
        let old = std::mem::take(&mut self.slots);
        self.slots.reserve(old.len() - self.gone);
        self.droppable.clear();
        self.latest.clear();
        self.gone = 0;
        for slot in old {
            let pos = self.base + self.slots.len() as u64;
            match &slot {
                Slot::Gone => continue,
                Slot::Live { out, policy } => {
                    if matches!(policy, OverflowPolicy::Conflate | OverflowPolicy::DropOldest) {
                        self.droppable.push_back(pos);
                    }
                    if *policy == OverflowPolicy::Conflate {
                        self.latest.insert(out.channel_id, pos);
                    }
                }
                Slot::Reserved(id) => {
                    if let Some(r) = self.reservations.iter_mut().find(|r| r.0 == *id) {
                        r.1 = pos;
                    }
                }
                Slot::Control(_) | Slot::Replay(_) => {}
            }
            self.slots.push_back(slot);
        }
        if self.slots.capacity() > 4 * self.slots.len().max(16) {
            self.slots.shrink_to_fit();
        }
    }

    /// Pops the front slot, releasing its budget and index entries.
    fn pop_front(&mut self) -> Option<Slot> {
        let slot = self.slots.pop_front()?;
        let pos = self.base;
        self.base += 1;
        let cost = slot.cost(self.replay_cost);
        match &slot {
            Slot::Gone => self.gone -= 1,
            Slot::Live { out, policy } => {
                self.cost -= cost;
                if *policy == OverflowPolicy::Conflate
                    && self.latest.get(&out.channel_id) == Some(&pos)
                {
                    self.latest.remove(&out.channel_id);
                }
            }
            _ => {
                self.cost -= cost;
                self.reply_cost -= cost;
            }
        }
        while self.droppable.front().is_some_and(|&p| p < self.base) {
            self.droppable.pop_front();
        }
        Some(slot)
    }
}

/// The outbound queue of one connection. Shared between the hub and the connection's own
/// request handling (producers) and the connection's writer (the only consumer).
pub struct ConnQueue {
    conn_id: u64,
    max_bytes: usize,
    /// The connection's transport reads [`SharedForms`] (see [`ConnQueue::want_forms`]).
    wants_forms: AtomicBool,
    inner: Mutex<Inner>,
    notify: Notify,
}

impl std::fmt::Debug for ConnQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnQueue")
            .field("conn_id", &self.conn_id)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

impl ConnQueue {
    /// A queue for connection `conn_id` holding at most `max_bytes` (see [`ENTRY_COST`]).
    pub fn new(conn_id: u64, max_bytes: usize) -> Self {
        let inner = Inner { replay_cost: REPLAY_COST.min(max_bytes / 16), ..Inner::default() };
        ConnQueue {
            conn_id,
            max_bytes,
            wants_forms: AtomicBool::new(false),
            inner: Mutex::new(inner),
            notify: Notify::new(),
        }
    }

    /// Asks for the [`SharedForms`] of the messages queued from now on: for a transport that
    /// sends something other than the plain frame (compressed, or Socket.IO). Other queues
    /// are not given them, so their subscribers do not pay for the sharing.
    pub fn want_forms(&self) {
        self.wants_forms.store(true, Ordering::Relaxed);
    }

    /// Whether [`ConnQueue::want_forms`] was called.
    pub fn wants_forms(&self) -> bool {
        self.wants_forms.load(Ordering::Relaxed)
    }

    pub fn conn_id(&self) -> u64 {
        self.conn_id
    }

    /// The byte budget.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Appends a live channel message, applying `policy` when the budget is exhausted.
    pub fn push(
        &self,
        bytes: Bytes,
        channel_id: u64,
        published_at: Instant,
        policy: OverflowPolicy,
    ) -> PushOutcome {
        let out = Outbound { bytes, channel_id, published_at: Some(published_at), forms: None };
        self.push_message(out, policy)
    }

    /// Appends a live channel message (with its shared forms, if any), applying
    /// `policy` when the budget is exhausted.
    pub fn push_message(&self, out: Outbound, policy: OverflowPolicy) -> PushOutcome {
        let (outcome, wake) = self.push_deferred(out, policy);
        if wake {
            self.wake();
        }
        outcome
    }

    /// Like [`ConnQueue::push_message`], but leaves the writer's wake-up to the caller: `true`
    /// says one is owed ([`ConnQueue::wake`]). A publisher appending a run of messages wakes
    /// each writer once, after the last, rather than after the first while it appends the rest.
    pub fn push_deferred(&self, mut out: Outbound, policy: OverflowPolicy) -> (PushOutcome, bool) {
        let channel_id = out.channel_id;
        let mut outcome = PushOutcome::default();
        let mut q = self.inner.lock();
        if q.overflowed {
            // The connection is being closed; it will recover what it missed on reconnect.
            return (outcome, false);
        }
        let cost = ENTRY_COST + out.bytes.len();
        if q.cost + cost > self.max_bytes {
            // Conflation first: the channel's pending message is replaced where it stands.
            if policy == OverflowPolicy::Conflate {
                match q.conflate_in_place(out) {
                    Ok(()) => {
                        outcome.conflated += 1;
                        if q.cost > self.max_bytes {
                            q.evict_for(0, self.max_bytes, &mut outcome);
                        }
                        return (outcome, false);
                    }
                    Err(returned) => out = returned,
                }
            }
            if !q.evict_for(cost, self.max_bytes, &mut outcome) {
                if policy == OverflowPolicy::Disconnect {
                    outcome.overflowed = true;
                    q.overflowed = true;
                    return (outcome, true);
                }
                // Nothing droppable is left and the new message may itself be dropped.
                outcome.dropped += 1;
                return (outcome, false);
            }
        }
        let was_empty = q.slots.len() == q.gone;
        let pos = q.push_slot(Slot::Live { out, policy });
        if matches!(policy, OverflowPolicy::Conflate | OverflowPolicy::DropOldest) {
            q.droppable.push_back(pos);
        }
        if policy == OverflowPolicy::Conflate {
            q.latest.insert(channel_id, pos);
        } else if !q.latest.is_empty() {
            // The channel's queued conflating message (a forming candle) is now followed by
            // this one (a closed bar): replacing it in place would carry a newer one ahead.
            q.latest.remove(&channel_id);
        }
        (outcome, was_empty)
    }

    /// Wakes the connection's writer (see [`ConnQueue::push_deferred`]).
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Appends a reply (ack, error, pong). Droppable live messages make room for it; when
    /// none is left the queue overflows (the connection is not reading what it asks for) and
    /// `false` is returned.
    pub fn push_control(&self, bytes: Bytes) -> bool {
        self.push_reply(Slot::Control(Outbound::control(bytes)))
    }

    /// Appends a replay or snapshot cursor, read as the writer drains (see [`Replay`]).
    pub fn push_replay(&self, replay: Replay) -> bool {
        self.push_reply(Slot::Replay(Box::new(replay)))
    }

    fn push_reply(&self, slot: Slot) -> bool {
        let mut q = self.inner.lock();
        if q.overflowed {
            return false;
        }
        let cost = slot.cost(q.replay_cost);
        let mut outcome = PushOutcome::default();
        if q.cost + cost > self.max_bytes && !q.evict_for(cost, self.max_bytes, &mut outcome) {
            q.overflowed = true;
            drop(q);
            self.notify.notify_one();
            return false;
        }
        let was_empty = q.slots.len() == q.gone;
        q.push_slot(slot);
        drop(q);
        if was_empty {
            self.notify.notify_one();
        }
        true
    }

    /// Reserves the next position in the queue for a frame that is computed later, such as
    /// a subscribe ack that must precede the replayed messages pushed after it. The writer
    /// does not pass an unfilled reservation. Reservations count against the budget but never
    /// overflow it: the reply that fills one is already accounted for by the request.
    pub fn reserve(&self) -> Reservation {
        let mut q = self.inner.lock();
        let id = q.next_reservation;
        q.next_reservation += 1;
        let pos = q.push_slot(Slot::Reserved(id));
        q.reservations.push((id, pos));
        Reservation(id)
    }

    /// Fills a reservation made with [`ConnQueue::reserve`] (an empty `bytes` just releases it).
    pub fn fill(&self, reservation: Reservation, bytes: Bytes) {
        let mut q = self.inner.lock();
        let Some(index) = q.reservations.iter().position(|r| r.0 == reservation.0) else {
            return;
        };
        let (_, pos) = q.reservations.swap_remove(index);
        let added = bytes.len();
        let Some(slot) = q.slot_mut(pos) else { return };
        *slot = if bytes.is_empty() { Slot::Gone } else { Slot::Control(Outbound::control(bytes)) };
        if added == 0 {
            q.cost -= ENTRY_COST;
            q.reply_cost -= ENTRY_COST;
            q.gone += 1;
        } else {
            q.cost += added;
            q.reply_cost += added;
            if q.cost > self.max_bytes {
                q.overflowed = true;
            }
        }
        drop(q);
        self.notify.notify_one();
    }

    /// Marks the queue overflowed (slow consumer) and wakes the writer to close with 4008.
    pub fn mark_overflowed(&self) {
        self.inner.lock().overflowed = true;
        self.notify.notify_one();
    }

    /// Asks the connection's writer to close it with `code` and `reason` once what is queued
    /// now is written (a server API disconnect, a proxy's `disconnect` answer). The first
    /// request wins.
    pub fn request_close(&self, code: u16, reason: &str) {
        let mut q = self.inner.lock();
        if q.close.is_none() {
            q.close = Some((code, reason.into()));
        }
        drop(q);
        self.notify.notify_one();
    }

    /// The close asked for with [`ConnQueue::request_close`], if any.
    pub fn close_requested(&self) -> Option<(u16, Arc<str>)> {
        self.inner.lock().close.clone()
    }

    /// Takes every frame that can be written now, in order, appending to `out.frames`. A
    /// replay cursor yields one chunk per call; the writer is woken again for the rest.
    pub fn drain_into(&self, out: &mut Drained) {
        let mut q = self.inner.lock();
        let mut carried_messages = false;
        loop {
            match q.slots.front() {
                None | Some(Slot::Reserved(_)) => break,
                Some(Slot::Replay(_)) => {
                    if !out.frames.is_empty() {
                        self.notify.notify_one();
                        break;
                    }
                    carried_messages = true;
                    q = self.read_replay(q, out);
                    if matches!(q.slots.front(), Some(Slot::Replay(_))) {
                        // More to stream: come back once this chunk is written.
                        self.notify.notify_one();
                        break;
                    }
                }
                Some(_) => match q.pop_front() {
                    Some(Slot::Live { out: frame, .. }) => {
                        carried_messages = true;
                        out.frames.push(frame);
                    }
                    Some(Slot::Control(frame)) => out.frames.push(frame),
                    _ => {}
                },
            }
        }
        // An emptied queue keeps its buffers while messages flow through it (no allocation
        // per delivery), but not after a large burst, nor when only replies went through:
        // an idle subscriber then holds no buffer at all (see docs/benchmarks.md, idle RSS).
        if q.slots.is_empty() && (q.slots.capacity() > 256 || !carried_messages) {
            q.slots = VecDeque::new();
            q.droppable = VecDeque::new();
            if q.reservations.is_empty() {
                q.reservations = Vec::new();
            }
        }
        out.carried_messages = carried_messages;
        out.overflowed = q.overflowed;
        out.close.clone_from(&q.close);
    }

    /// Reads the next chunk of the replay at the front. The history lock is taken with the
    /// queue lock released: publishers take a channel lock and then queue locks, never the
    /// other way round.
    fn read_replay<'a>(
        &'a self,
        mut q: parking_lot::MutexGuard<'a, Inner>,
        out: &mut Drained,
    ) -> parking_lot::MutexGuard<'a, Inner> {
        let Some(Slot::Replay(replay)) = q.slots.front() else { return q };
        let (source, after, until) = (replay.source.clone(), replay.after, replay.until);
        drop(q);
        let already = out.frames.len();
        let read = if after < until {
            source.read_after(after, until, REPLAY_CHUNK_BYTES, &mut out.frames)
        } else {
            HistoryRead { last: until, skipped: false }
        };
        q = self.inner.lock();
        // Only this consumer removes non-droppable slots, so the replay is still in front.
        let Some(Slot::Replay(replay)) = q.slots.front_mut() else { return q };
        if read.skipped && replay.exact {
            out.frames.truncate(already);
            tracing::info!(
                conn = self.conn_id,
                "history was trimmed past a recovery still waiting to be sent; closing with 4008"
            );
            q.pop_front();
            q.overflowed = true;
            return q;
        }
        // A snapshot whose oldest messages expired meanwhile just sends what is left.
        if read.last < replay.until && read.last > replay.after {
            replay.after = read.last;
        } else {
            if let Some(tail) = replay.tail.take() {
                out.frames.push(Outbound::history(tail, replay.channel_id));
            }
            q.pop_front();
        }
        q
    }

    /// Takes every frame that can be written now.
    pub fn drain(&self) -> Drained {
        let mut out = Drained::default();
        self.drain_into(&mut out);
        out
    }

    /// Waits until something is pushed (returns at once if a push happened since the last wait).
    pub async fn notified(&self) {
        self.notify.notified().await
    }

    /// Whether the queue overflowed on something that may not be dropped.
    pub fn is_overflowed(&self) -> bool {
        self.inner.lock().overflowed
    }

    /// Budgeted bytes currently queued.
    pub fn queued_bytes(&self) -> usize {
        self.inner.lock().cost
    }

    /// Budgeted bytes queued because of the connection's own requests (replies, replays).
    /// Transports stop reading a client's requests while this exceeds half the budget.
    pub fn reply_backlog(&self) -> usize {
        self.inner.lock().reply_cost
    }

    /// Whether the connection's own requests have filled half the budget (see
    /// [`ConnQueue::reply_backlog`]).
    pub fn replies_over_budget(&self) -> bool {
        self.reply_backlog() > self.max_bytes / 2
    }

    /// Entries currently queued (tombstones excluded).
    pub fn len(&self) -> usize {
        let q = self.inner.lock();
        q.slots.len() - q.gone
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: usize) -> Bytes {
        Bytes::from(vec![b'x'; n])
    }

    /// Budget for `n` messages of `len` bytes.
    fn room(n: usize, len: usize) -> usize {
        n * (ENTRY_COST + len)
    }

    /// Bytes of buffer the queue holds, whatever is in it.
    fn held_capacity(q: &ConnQueue) -> usize {
        let q = q.inner.lock();
        q.slots.capacity() + q.droppable.capacity() + q.reservations.capacity()
    }

    #[test]
    fn an_idle_queue_gives_its_buffers_back_but_a_busy_one_keeps_them() {
        let q = ConnQueue::new(1, room(8, 40));
        let now = Instant::now();
        // A subscribe's reply: reserved, filled, drained. Nothing is left held.
        let ack = q.reserve();
        q.fill(ack, msg(30));
        assert!(held_capacity(&q) > 0);
        let d = q.drain();
        assert_eq!((d.frames.len(), d.carried_messages), (1, false));
        assert_eq!(held_capacity(&q), 0);
        // Messages flowing through keep the buffer between drains (no allocation per delivery).
        q.push(msg(40), 1, now, OverflowPolicy::DropOldest);
        let d = q.drain();
        assert!(d.carried_messages);
        assert!(held_capacity(&q) > 0);
    }

    #[test]
    fn conflation_never_moves_a_message_ahead_of_a_later_one_of_its_channel() {
        let q = ConnQueue::new(1, room(3, 40));
        let now = Instant::now();
        let body = |tag: &str| Bytes::from(format!("{tag:-<40}"));
        q.push(body("forming-1"), 1, now, OverflowPolicy::Conflate);
        q.push(body("closed"), 1, now, OverflowPolicy::Disconnect);
        q.push(body("other"), 2, now, OverflowPolicy::DropOldest);
        // Full: the next forming bar may not take the first one's place, ahead of `closed`.
        let o = q.push(body("forming-2"), 1, now, OverflowPolicy::Conflate);
        assert_eq!(o.conflated, 1, "the stale forming bar is dropped instead");
        let order: Vec<String> = q
            .drain()
            .frames
            .iter()
            .map(|f| String::from_utf8_lossy(&f.bytes).trim_end_matches('-').to_owned())
            .collect();
        assert_eq!(order, ["closed", "other", "forming-2"]);
    }

    #[test]
    fn conflation_replaces_the_pending_message_in_place() {
        let q = ConnQueue::new(1, room(2, 40));
        let now = Instant::now();
        assert_eq!(q.push(msg(40), 1, now, OverflowPolicy::Conflate), PushOutcome::default());
        q.push(msg(40), 2, now, OverflowPolicy::Conflate);
        let o = q.push(
            Bytes::from_static(b"latest-of-1-padded-to-40-bytes-xxxxxxxxx"),
            1,
            now,
            OverflowPolicy::Conflate,
        );
        assert_eq!(o.conflated, 1);
        let d = q.drain();
        assert_eq!(d.frames.iter().map(|f| f.channel_id).collect::<Vec<_>>(), vec![1, 2]);
        assert!(d.frames[0].bytes.starts_with(b"latest"));
        assert_eq!(q.queued_bytes(), 0);
    }

    #[test]
    fn a_requested_close_comes_after_what_was_queued_and_the_first_wins() {
        let q = ConnQueue::new(1, 4096);
        q.push_control(Bytes::from_static(b"bye"));
        q.request_close(4003, "banned");
        q.request_close(1000, "later");
        let d = q.drain();
        assert_eq!(d.frames.len(), 1);
        assert_eq!(d.close, Some((4003, "banned".into())));
        assert_eq!(q.close_requested(), Some((4003, "banned".into())));
        assert!(!d.overflowed);
    }

    #[test]
    fn drop_oldest_evicts_from_the_front() {
        let q = ConnQueue::new(1, room(3, 30));
        let now = Instant::now();
        for i in 0..5u8 {
            q.push(Bytes::from(vec![i; 30]), 7, now, OverflowPolicy::DropOldest);
        }
        let d = q.drain();
        assert_eq!(d.frames.iter().map(|f| f.bytes[0]).collect::<Vec<_>>(), vec![2, 3, 4]);
        assert!(!d.overflowed);
    }

    #[test]
    fn disconnect_policy_never_drops_silently() {
        let q = ConnQueue::new(1, room(1, 60) + 10);
        let now = Instant::now();
        q.push(msg(60), 1, now, OverflowPolicy::Disconnect);
        let o = q.push(msg(60), 1, now, OverflowPolicy::Disconnect);
        assert!(o.overflowed);
        assert_eq!(o.dropped, 0);
        let d = q.drain();
        assert!(d.overflowed);
        assert_eq!(d.frames.len(), 1, "the queued message is still delivered before the close");
    }

    #[test]
    fn disconnect_policy_evicts_droppable_messages_first() {
        let q = ConnQueue::new(1, room(1, 60) + 10);
        let now = Instant::now();
        q.push(msg(60), 2, now, OverflowPolicy::Conflate);
        let o = q.push(msg(60), 1, now, OverflowPolicy::Disconnect);
        assert_eq!((o.overflowed, o.conflated), (false, 1));
        assert_eq!(q.drain().frames[0].channel_id, 1);
    }

    #[test]
    fn reservation_holds_back_later_frames_until_filled() {
        let q = ConnQueue::new(1, 1000);
        let r = q.reserve();
        assert!(q.push_control(Bytes::from_static(b"replay")));
        assert!(q.drain().frames.is_empty());
        q.fill(r, Bytes::from_static(b"ack"));
        let d = q.drain();
        let got: Vec<_> = d.frames.iter().map(|f| f.bytes.clone()).collect();
        assert_eq!(got, vec![Bytes::from_static(b"ack"), Bytes::from_static(b"replay")]);
        assert_eq!(q.queued_bytes(), 0);
        assert_eq!(q.reply_backlog(), 0);
    }

    #[test]
    fn replies_count_against_the_budget_and_overflow_it() {
        let q = ConnQueue::new(1, room(10, 20));
        let mut accepted = 0;
        while q.push_control(msg(20)) {
            accepted += 1;
            assert!(accepted <= 10, "the budget bounds replies");
        }
        assert_eq!(accepted, 10);
        assert!(q.is_overflowed());
        assert!(q.replies_over_budget());
        // Live messages are no longer queued once the queue overflowed.
        assert_eq!(
            q.push(msg(8), 1, Instant::now(), OverflowPolicy::Disconnect),
            PushOutcome::default()
        );
        assert!(q.drain().overflowed);
    }

    #[test]
    fn replies_push_out_droppable_messages_before_overflowing() {
        let q = ConnQueue::new(1, room(2, 20));
        let now = Instant::now();
        q.push(msg(20), 5, now, OverflowPolicy::DropOldest);
        q.push(msg(20), 5, now, OverflowPolicy::DropOldest);
        assert!(q.push_control(msg(20)));
        assert!(!q.is_overflowed());
        let d = q.drain();
        assert_eq!(d.frames.len(), 2);
        assert!(!d.frames[1].is_message());
    }

    #[test]
    fn an_undrained_queue_stays_bounded_however_many_messages_pass() {
        let q = ConnQueue::new(1, room(100, 50));
        let now = Instant::now();
        for i in 0..100_000u64 {
            q.push(msg(50), 1 + i % 7, now, OverflowPolicy::DropOldest);
            q.push(msg(50), 100 + i % 3, now, OverflowPolicy::Conflate);
        }
        let inner = q.inner.lock();
        assert!(inner.cost <= room(100, 50));
        assert!(inner.slots.len() <= 2 * 100 + COMPACT_MIN_TOMBSTONES + 1, "{}", inner.slots.len());
        assert!(inner.droppable.len() <= inner.slots.len());
        assert!(inner.latest.len() <= 3);
    }

    /// A history of `n` frames of offsets 1..=n, each `len` bytes.
    struct FakeHistory {
        first: u64,
        n: u64,
        len: usize,
    }

    impl HistorySource for FakeHistory {
        fn read_after(
            &self,
            after: u64,
            until: u64,
            max_bytes: usize,
            out: &mut Vec<Outbound>,
        ) -> HistoryRead {
            let skipped = after + 1 < self.first;
            let after = after.max(self.first - 1);
            let mut bytes = 0;
            let mut last = after;
            for offset in after + 1..=until.min(self.n) {
                out.push(Outbound::history(Bytes::from(offset.to_string()), 9));
                bytes += self.len;
                last = offset;
                if bytes >= max_bytes {
                    break;
                }
            }
            HistoryRead { last, skipped }
        }
    }

    #[test]
    fn a_replay_larger_than_the_budget_streams_in_chunks() {
        let q = ConnQueue::new(1, 4096);
        let source = Arc::new(FakeHistory { first: 1, n: 10_000, len: 1000 });
        assert!(q.push_replay(Replay {
            source,
            channel_id: 9,
            after: 0,
            until: 10_000,
            tail: Some(Bytes::from_static(b"tail")),
            exact: true,
        }));
        q.push(msg(10), 9, Instant::now(), OverflowPolicy::Disconnect);
        let mut got = Vec::new();
        let mut drains = 0;
        loop {
            let d = q.drain();
            assert!(!d.overflowed);
            if d.frames.is_empty() {
                break;
            }
            drains += 1;
            assert!(d.frames.len() <= REPLAY_CHUNK_BYTES / 1000 + 2);
            got.extend(d.frames.into_iter().map(|f| f.bytes));
        }
        assert!(drains > 100);
        assert_eq!(got.len(), 10_000 + 2);
        assert_eq!(got[0], Bytes::from_static(b"1"));
        assert_eq!(got[9_999], Bytes::from_static(b"10000"));
        assert_eq!(got[10_000], Bytes::from_static(b"tail"));
        assert_eq!(got[10_001].len(), 10, "live messages follow the replay");
    }

    #[test]
    fn an_exact_replay_overtaken_by_trimming_overflows() {
        let q = ConnQueue::new(1, 4096);
        let source = Arc::new(FakeHistory { first: 50, n: 100, len: 10 });
        q.push_replay(Replay {
            source,
            channel_id: 9,
            after: 10,
            until: 100,
            tail: None,
            exact: true,
        });
        let d = q.drain();
        assert!(d.frames.is_empty());
        assert!(d.overflowed);
    }
}
