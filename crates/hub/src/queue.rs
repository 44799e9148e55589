//! A connection's outbound queue: bounded in bytes, never awaited by publishers.
//!
//! Publishers append with [`ConnQueue::push`], which takes a short lock and returns at once.
//! When the queue would exceed its byte budget the message's overflow policy decides what
//! gives way (see [`OverflowPolicy`]); a policy that forbids dropping marks the queue as
//! overflowed and the connection's writer closes it with 4008. The writer takes everything
//! queued in one [`ConnQueue::drain`] and writes it with one flush.
//!
//! Control frames (acks, errors, pongs) and replayed history are pushed outside the budget:
//! they are bounded elsewhere (by the request rate and `max_replay`) and must never be lost.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::namespace::OverflowPolicy;

/// Whether a published message is kept in history or is a transient, conflatable update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishKind {
    Retained,
    Ephemeral,
}

/// One frame waiting to be written.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The encoded frame, shared with every other subscriber.
    pub bytes: Bytes,
    /// The hub's id of the channel, for conflation; 0 for control frames.
    pub channel_id: u64,
    /// When the message was published, for the publish-to-write latency histogram.
    pub published_at: Option<Instant>,
    policy: Option<OverflowPolicy>,
    /// Counted against the byte budget (live messages only).
    budgeted: bool,
    /// A reserved slot not yet filled: the writer stops here (see [`ConnQueue::reserve`]).
    pending: bool,
}

impl Outbound {
    /// A frame that is not a channel message (ack, error, pong, ping).
    pub fn control(bytes: Bytes) -> Self {
        Outbound {
            bytes,
            channel_id: 0,
            published_at: None,
            policy: None,
            budgeted: false,
            pending: false,
        }
    }

    /// A replayed or snapshot message: delivered outside the byte budget.
    pub fn history(bytes: Bytes, channel_id: u64) -> Self {
        Outbound { channel_id, ..Outbound::control(bytes) }
    }

    /// Whether this frame is a channel message (as opposed to a control frame).
    pub fn is_message(&self) -> bool {
        self.channel_id != 0
    }
}

/// What happened to a pushed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PushOutcome {
    /// Older queued messages replaced by newer ones of the same channel.
    pub conflated: u32,
    /// Messages discarded to make room (including, possibly, the new one).
    pub dropped: u32,
    /// The queue overflowed on a message that may not be dropped: close with 4008.
    pub overflowed: bool,
}

/// Handle to a reserved position in the queue (see [`ConnQueue::reserve`]).
#[derive(Debug)]
pub struct Reservation(u64);

/// The result of a [`ConnQueue::drain`].
#[derive(Debug, Default)]
pub struct Drained {
    pub frames: Vec<Outbound>,
    /// The queue overflowed: after writing `frames`, close the connection with 4008.
    pub overflowed: bool,
}

#[derive(Debug, Default)]
struct Inner {
    items: VecDeque<Outbound>,
    /// Bytes of budgeted items currently queued.
    bytes: usize,
    overflowed: bool,
    /// Sequence number of the next reservation, and of the first item in `items`.
    next_reservation: u64,
    reservations: VecDeque<(u64, usize)>,
}

/// The outbound queue of one connection. Shared between the hub (producers) and the
/// connection's writer (the only consumer).
#[derive(Debug)]
pub struct ConnQueue {
    conn_id: u64,
    max_bytes: usize,
    inner: Mutex<Inner>,
    notify: Notify,
}

impl ConnQueue {
    /// A queue for connection `conn_id` holding at most `max_bytes` of live messages.
    pub fn new(conn_id: u64, max_bytes: usize) -> Self {
        ConnQueue { conn_id, max_bytes, inner: Mutex::new(Inner::default()), notify: Notify::new() }
    }

    pub fn conn_id(&self) -> u64 {
        self.conn_id
    }

    /// Appends a live channel message under the byte budget, applying `policy` on overflow.
    pub fn push(
        &self,
        bytes: Bytes,
        channel_id: u64,
        published_at: Instant,
        policy: OverflowPolicy,
    ) -> PushOutcome {
        let mut outcome = PushOutcome::default();
        let mut q = self.inner.lock();
        if q.overflowed {
            // The connection is being closed; it will recover what it missed on reconnect.
            return outcome;
        }
        let len = bytes.len();
        if q.bytes + len > self.max_bytes {
            make_room(&mut q, self.max_bytes, len, channel_id, policy, &mut outcome);
            if outcome.overflowed {
                q.overflowed = true;
                drop(q);
                self.notify.notify_one();
                return outcome;
            }
            if q.bytes + len > self.max_bytes {
                // Nothing droppable left to evict and the new message may itself be dropped.
                outcome.dropped += 1;
                return outcome;
            }
        }
        let was_empty = q.items.is_empty();
        q.bytes += len;
        q.items.push_back(Outbound {
            bytes,
            channel_id,
            published_at: Some(published_at),
            policy: Some(policy),
            budgeted: true,
            pending: false,
        });
        drop(q);
        if was_empty {
            self.notify.notify_one();
        }
        outcome
    }

    /// Appends a frame outside the byte budget: control frames and replayed history.
    pub fn push_unbudgeted(&self, frame: Outbound) {
        let mut q = self.inner.lock();
        let was_empty = q.items.is_empty();
        q.items.push_back(frame);
        drop(q);
        if was_empty {
            self.notify.notify_one();
        }
    }

    /// Reserves the next position in the queue for a frame that is computed later, such as
    /// a subscribe ack that must precede the replayed messages pushed after it. The writer
    /// does not pass an unfilled reservation.
    pub fn reserve(&self) -> Reservation {
        let mut q = self.inner.lock();
        let seq = q.next_reservation;
        q.next_reservation += 1;
        let index = q.items.len();
        q.reservations.push_back((seq, index));
        q.items.push_back(Outbound {
            bytes: Bytes::new(),
            channel_id: 0,
            published_at: None,
            policy: None,
            budgeted: false,
            pending: true,
        });
        Reservation(seq)
    }

    /// Fills a reservation made with [`ConnQueue::reserve`].
    pub fn fill(&self, reservation: Reservation, bytes: Bytes) {
        let mut q = self.inner.lock();
        let Some(pos) = q.reservations.iter().position(|(seq, _)| *seq == reservation.0) else {
            return;
        };
        let (_, index) = q.reservations.remove(pos).expect("position is in range");
        let slot = &mut q.items[index];
        slot.bytes = bytes;
        slot.pending = false;
        drop(q);
        self.notify.notify_one();
    }

    /// Marks the queue overflowed (slow consumer) and wakes the writer to close with 4008.
    pub fn mark_overflowed(&self) {
        self.inner.lock().overflowed = true;
        self.notify.notify_one();
    }

    /// Takes every frame that can be written now, in order, appending to `out.frames`.
    pub fn drain_into(&self, out: &mut Drained) {
        let mut q = self.inner.lock();
        let ready = q.items.iter().position(|i| i.pending).unwrap_or(q.items.len());
        let mut freed = 0;
        for item in q.items.drain(..ready) {
            if item.budgeted {
                freed += item.bytes.len();
            }
            out.frames.push(item);
        }
        q.bytes -= freed;
        for r in q.reservations.iter_mut() {
            r.1 -= ready;
        }
        out.overflowed = q.overflowed;
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

    /// Whether the queue overflowed on a message that may not be dropped.
    pub fn is_overflowed(&self) -> bool {
        self.inner.lock().overflowed
    }

    /// Bytes of live messages currently queued.
    pub fn queued_bytes(&self) -> usize {
        self.inner.lock().bytes
    }

    /// Frames currently queued.
    pub fn len(&self) -> usize {
        self.inner.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Frees budget for a new message of `channel_id` under `policy`. Only ever removes budgeted
/// messages whose own policy allows it, so a channel that must not drop never loses one
/// silently: its subscriber is disconnected instead.
fn make_room(
    q: &mut Inner,
    max_bytes: usize,
    incoming: usize,
    channel_id: u64,
    policy: OverflowPolicy,
    outcome: &mut PushOutcome,
) {
    let fits = |q: &Inner| q.bytes + incoming <= max_bytes;
    // Conflation first: an older queued message of the same channel is superseded.
    if policy == OverflowPolicy::Conflate {
        remove_where(q, outcome, |i| {
            i.channel_id == channel_id && i.policy == Some(OverflowPolicy::Conflate)
        });
        if fits(q) {
            return;
        }
    }
    // Then the oldest messages that may be dropped or conflated away, oldest first.
    let mut index = 0;
    while !fits(q) && index < q.items.len() {
        let item = &q.items[index];
        let droppable = item.budgeted
            && !item.pending
            && matches!(item.policy, Some(OverflowPolicy::DropOldest | OverflowPolicy::Conflate));
        if droppable {
            let removed = q.items.remove(index).expect("index is in range");
            q.bytes -= removed.bytes.len();
            shift_reservations(q, index);
            if removed.policy == Some(OverflowPolicy::Conflate) {
                outcome.conflated += 1;
            } else {
                outcome.dropped += 1;
            }
        } else {
            index += 1;
        }
    }
    if !fits(q) && policy == OverflowPolicy::Disconnect {
        outcome.overflowed = true;
    }
}

fn remove_where(q: &mut Inner, outcome: &mut PushOutcome, pred: impl Fn(&Outbound) -> bool) {
    let mut index = 0;
    while index < q.items.len() {
        if q.items[index].budgeted && !q.items[index].pending && pred(&q.items[index]) {
            let removed = q.items.remove(index).expect("index is in range");
            q.bytes -= removed.bytes.len();
            shift_reservations(q, index);
            outcome.conflated += 1;
        } else {
            index += 1;
        }
    }
}

fn shift_reservations(q: &mut Inner, removed_index: usize) {
    for r in q.reservations.iter_mut() {
        if r.1 > removed_index {
            r.1 -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: usize) -> Bytes {
        Bytes::from(vec![b'x'; n])
    }

    #[test]
    fn conflation_keeps_latest_per_channel() {
        let q = ConnQueue::new(1, 100);
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
        assert_eq!(d.frames.iter().map(|f| f.channel_id).collect::<Vec<_>>(), vec![2, 1]);
        assert!(d.frames[1].bytes.starts_with(b"latest"));
        assert_eq!(q.queued_bytes(), 0);
    }

    #[test]
    fn drop_oldest_evicts_from_the_front() {
        let q = ConnQueue::new(1, 100);
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
        let q = ConnQueue::new(1, 100);
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
        let q = ConnQueue::new(1, 100);
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
        q.push_unbudgeted(Outbound::control(Bytes::from_static(b"replay")));
        assert!(q.drain().frames.is_empty());
        q.fill(r, Bytes::from_static(b"ack"));
        let d = q.drain();
        let got: Vec<_> = d.frames.iter().map(|f| f.bytes.clone()).collect();
        assert_eq!(got, vec![Bytes::from_static(b"ack"), Bytes::from_static(b"replay")]);
    }

    #[test]
    fn control_frames_bypass_the_budget() {
        let q = ConnQueue::new(1, 10);
        q.push_unbudgeted(Outbound::control(msg(100)));
        assert_eq!(q.queued_bytes(), 0);
        assert_eq!(
            q.push(msg(8), 1, Instant::now(), OverflowPolicy::Disconnect),
            PushOutcome::default()
        );
    }
}
