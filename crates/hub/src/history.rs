//! The retained history of one channel: a ring of encoded messages with contiguous offsets.
//!
//! Entries are the already-encoded `msg` frames, so a replay sends the very bytes live
//! subscribers got, with no re-encoding. The ring is bounded by count and by age.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// One retained message.
#[derive(Debug, Clone)]
pub struct Entry {
    pub offset: u64,
    /// The encoded `msg` frame.
    pub frame: Bytes,
    /// Where the message's `data` starts inside `frame` (it ends one byte before the end).
    data_start: u32,
    at: Instant,
}

impl Entry {
    /// The message's `data` JSON.
    pub fn data(&self) -> Bytes {
        self.frame.slice(self.data_start as usize..self.frame.len() - 1)
    }
}

/// History of one channel. Offsets of the entries held are always contiguous.
#[derive(Debug)]
pub struct HistoryRing {
    entries: VecDeque<Entry>,
    max_len: usize,
    max_age: Option<Duration>,
}

impl HistoryRing {
    pub fn new(max_len: usize, max_age: Option<Duration>) -> Self {
        HistoryRing { entries: VecDeque::new(), max_len, max_age }
    }

    /// Appends the message at `offset`, which must follow the last one held.
    pub fn push(&mut self, offset: u64, frame: Bytes, data_len: usize, at: Instant) {
        if self.max_len == 0 {
            return;
        }
        debug_assert!(self.entries.back().is_none_or(|e| e.offset + 1 == offset));
        if self.entries.len() == self.max_len {
            self.entries.pop_front();
        }
        let data_start = (frame.len() - 1 - data_len) as u32;
        self.entries.push_back(Entry { offset, frame, data_start, at });
    }

    /// Adds the message at `offset`, which must precede the oldest one held, unless the ring
    /// is full (then it is older than anything kept). Returns whether it was added.
    pub fn prepend(&mut self, offset: u64, frame: Bytes, data_len: usize, at: Instant) -> bool {
        if self.entries.len() >= self.max_len {
            return false;
        }
        debug_assert!(self.entries.front().is_none_or(|e| offset + 1 == e.offset));
        let data_start = (frame.len() - 1 - data_len) as u32;
        self.entries.push_front(Entry { offset, frame, data_start, at });
        true
    }

    /// Drops every entry (the channel starts over, or jumps past what it held).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Drops entries older than the age limit.
    pub fn expire(&mut self, now: Instant) {
        if let Some(max_age) = self.max_age {
            while self.entries.front().is_some_and(|e| now.duration_since(e.at) > max_age) {
                self.entries.pop_front();
            }
        }
    }

    /// The oldest offset held, if any.
    pub fn first_offset(&self) -> Option<u64> {
        self.entries.front().map(|e| e.offset)
    }

    /// Whether every message after `offset` up to `top` is held.
    pub fn covers_after(&self, offset: u64, top: u64) -> bool {
        if offset >= top {
            return true;
        }
        self.first_offset().is_some_and(|first| first <= offset + 1)
    }

    /// Entries with offsets greater than `offset`, oldest first, at most `limit` of them.
    pub fn since(&self, offset: u64, limit: usize) -> impl Iterator<Item = &Entry> {
        let skip = match self.first_offset() {
            Some(first) if offset >= first => (offset - first + 1) as usize,
            _ => 0,
        };
        self.entries.iter().skip(skip).take(limit)
    }

    /// The last `n` entries, oldest first.
    pub fn last(&self, n: usize) -> impl Iterator<Item = &Entry> {
        self.entries.iter().skip(self.entries.len().saturating_sub(n))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(offset: u64) -> (Bytes, usize) {
        let data = offset.to_string();
        (Bytes::from(format!("{{\"data\":{data}}}")), data.len())
    }

    #[test]
    fn data_is_sliced_out_of_the_frame() {
        let mut h = HistoryRing::new(10, None);
        let (f, n) = frame(1);
        h.push(1, f, n, Instant::now());
        assert_eq!(h.since(0, 10).next().unwrap().data(), Bytes::from_static(b"1"));
    }

    #[test]
    fn age_limit_expires_old_entries() {
        let mut h = HistoryRing::new(10, Some(Duration::from_secs(1)));
        let t0 = Instant::now();
        let (f, n) = frame(1);
        h.push(1, f, n, t0);
        h.expire(t0 + Duration::from_millis(500));
        assert_eq!(h.len(), 1);
        h.expire(t0 + Duration::from_secs(2));
        assert!(h.is_empty());
    }

    proptest! {
        /// Any sequence of appends and reads returns a contiguous run of offsets that starts
        /// right after the requested offset whenever the ring covers it.
        #[test]
        fn reads_are_contiguous(cap in 1usize..50, appends in 0u64..200, reads in proptest::collection::vec((0u64..220, 1usize..60), 1..20)) {
            let mut h = HistoryRing::new(cap, None);
            let now = Instant::now();
            for offset in 1..=appends {
                let (f, n) = frame(offset);
                h.push(offset, f, n, now);
            }
            prop_assert_eq!(h.len(), cap.min(appends as usize));
            for (since, limit) in reads {
                let got: Vec<u64> = h.since(since, limit).map(|e| e.offset).collect();
                for pair in got.windows(2) {
                    prop_assert_eq!(pair[0] + 1, pair[1]);
                }
                if let Some(first) = got.first() {
                    prop_assert!(*first > since);
                    if h.covers_after(since, appends) {
                        prop_assert_eq!(*first, since + 1);
                    }
                }
                prop_assert!(got.len() <= limit);
                if h.covers_after(since, appends) && since < appends {
                    prop_assert_eq!(got.len() as u64, (appends - since).min(limit as u64));
                }
            }
        }
    }
}
